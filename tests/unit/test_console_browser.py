"""The web console in a real browser: Debian's Chromium (headless), driven by Playwright, against a real `WebServer`
on a real SQLite registry filled through the store's own methods with synthetic versions, channels, a boot report,
a finished rollout and events.

It logs in (a wrong token, then a right one), reads every page, shows that hostile text in the registry is shown
as text (no dialog ever opens), promotes and revokes through the forms, logs out, and checks a read token gets no
forms. Every page is saved as a full-page screenshot (AMIFORGE_SCREENSHOTS=DIR keeps them), and every page passes
axe-core's WCAG 2 A/AA rules. axe-core is never fetched here: scripts/fetch_axe.sh puts a pinned, checked copy in
.cache/axe-core/, and the pages get it from a Playwright route on their own origin, so their strict CSP
(script-src 'self') stays on while axe runs.
"""

from __future__ import annotations

import itertools
import os
import re
import threading
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from playwright.sync_api import Browser, expect

from amiforge.lifecycle.tokens import create_token
from amiforge.model import (
    Artifact,
    BootReport,
    CheckResult,
    Finding,
    FindingKind,
    LayerRecord,
    Package,
    ScanRecord,
    Severity,
    SignatureRecord,
    Status,
)
from amiforge.policy.document import default_policy
from amiforge.scanners.sbom import sbom_digest
from amiforge.settings import Settings
from amiforge.store.sql import SqlStore, open_store
from amiforge.web.server import Listen, WebServer
from tests.browser import AXE, CHROMIUM, Tab, chromium, open_tab, screenshot_folder
from tests.conftest import required_or_skip

HOSTILE_CONSOLE = "<script>alert(1)</script>"
HOSTILE_TAG = "<b>x</b>"
HOSTILE_DETAIL = '<img src="x" onerror="alert(2)">'


# --- the registry, the server and the browser --------------------------------------------------------------------


@dataclass(frozen=True)
class Console:
    url: str
    store: SqlStore
    operate: str  # the secret of the operate token "operator"
    read: str  # the secret of the read token "viewer"
    rollout: int


def _clock() -> Iterator[datetime]:
    at = datetime(2026, 3, 2, 9, 0, tzinfo=UTC)
    while True:
        yield at
        at += timedelta(minutes=7)


def _version(store: SqlStore, name: str, upto: Status, *, digest: str, parent: str | None = None,
             tags: dict[str, str] | None = None) -> int:  # fmt: skip
    """A version of `name` moved from baking through built, tested, scanned, signed as far as `upto`."""
    v = store.create_version(name=name, recipe_digest="r" * 64, recipe_path=f"/srv/recipes/{name}.yaml",
                             provider="local", tags=tags or {}, parent=parent,
                             recipe='{"name":"' + name + '","base":"debian-12"}')  # fmt: skip
    store.transition(v.id, Status.BUILT, expect=Status.BAKING, digest=digest, size_bytes=734_003_200)
    path = [Status.BUILT, Status.TESTED, Status.SCANNED, Status.SIGNED]
    for before, after in itertools.pairwise(path[: path.index(upto) + 1]):
        store.transition(v.id, after, expect=before)
    return v.id


def _fill(store: SqlStore) -> int:
    """Two images, six versions, two channels, a boot report, a scan, a finished rollout, events; the rollout's id."""
    when = _clock()
    actor = "alice@build-1"
    web1 = _version(store, "web", Status.SIGNED, digest="a" * 64)
    web2 = _version(store, "web", Status.SIGNED, digest="b" * 64, parent="web@1", tags={"team": HOSTILE_TAG})
    _version(store, "web", Status.BUILT, digest="c" * 64, parent="web@2")  # web@3: in no channel
    api1 = _version(store, "api", Status.SIGNED, digest="d" * 64)
    _version(store, "api", Status.TESTED, digest="e" * 64, parent="api@1")
    for ref in ("web@1", "web@2", "web@3", "api@1", "api@2"):
        store.append_event("bake", actor=actor, ref=ref, data={"seconds": 312.5})
    store.add_artifact(web2, Artifact(provider="local", region="local", digest="b" * 64, size_bytes=734_003_200,
                                      location="/var/lib/amiforge/regions/local/web-2.qcow2",
                                      kernel="vmlinuz-6.1.0-31-amd64", initrd="initrd.img-6.1.0-31-amd64"))  # fmt: skip
    store.record_layers(web2, [
        LayerRecord(0, "k" * 64, "base debian-12 (bookworm)", True, 0.4, 512_000_000),
        LayerRecord(1, "l" * 64, "apt install nginx", False, 41.7, 38_000_000),
    ])  # fmt: skip
    console = "\n".join([
        "[    0.000000] Linux version 6.1.0-31-amd64",
        *(f"[   {i:2d}.{i * 37 % 1000:06d}] systemd[1]: Started unit-{i}.service." for i in range(1, 40)),
        f"web login: {HOSTILE_CONSOLE}",
        "AMIFORGE-READY",
    ])  # fmt: skip
    checks = (CheckResult("ready", "ready", True, "marker after 12.3 s"),
              CheckResult("unit nginx", "unit", True, "active (running)"),
              CheckResult("http :80/", "http", True, f"200 OK, body {HOSTILE_DETAIL}"))  # fmt: skip
    store.add_boot_report(web2, BootReport(time_to_ready=12.3, checks=checks, console=console, accel="tcg",
                                           started_at=next(when), duration=31.8))  # fmt: skip
    store.append_event("test", actor=actor, ref="web@2", data={"passed": True})
    sbom = '{"bomFormat":"CycloneDX","specVersion":"1.6","components":[]}'
    finding = Finding(kind=FindingKind.CVE, id="TEST-0001", severity=Severity.LOW, title="synthetic",
                      source="osv", package="libexample", installed="1.0-1", fixed="1.0-2")  # fmt: skip
    store.add_scan(web2, ScanRecord(scanned_at=next(when), packages=(Package("libexample", "1.0-1", "amd64"),),
                                    sbom=sbom, sbom_digest=sbom_digest(sbom), findings=(finding,),
                                    vulndb="osv import 1 (synthetic)"))  # fmt: skip
    store.append_event("scan", actor=actor, ref="web@2", data={"findings": 1})
    store.add_signature(web2, SignatureRecord(key_id="ed25519:test-key-1", envelope='{"payloadType":"test"}',
                                              statement_digest="f" * 64, signed_at=next(when)))  # fmt: skip
    store.append_event("sign", actor=actor, ref="web@2", data={"key": "ed25519:test-key-1"})
    for name, channel, version_id, current in (("web", "prod", web1, None), ("web", "prod", web2, web1),
                                              ("web", "dev", web2, None), ("api", "prod", api1, None)):  # fmt: skip
        pointer = store.move_channel(name, channel, version_id, expect_current=current, actor=actor, reason="test")
        store.append_event("promote", actor=actor, ref=pointer.current, data={"channel": channel})
    rollout = store.create_rollout("local:web", web2, strategy={"waves": [1, 2], "soak": "5m"}, waves=[1, 2],
                                   actor=actor)  # fmt: skip
    store.plan_replacements(rollout.id, 0, "forward", [("web-m1", "web@1", "tok-1")])
    store.finish_replacement("tok-1", new_member="web-m4", state="done")
    store.add_decision(rollout.id, 0, passed=True, action="continue", numbers={"boots": 1, "ready_p95": 12.3})
    store.update_rollout(rollout.id, expect="running", wave=1)
    store.plan_replacements(rollout.id, 1, "forward", [("web-m2", "web@1", "tok-2"), ("web-m3", "web@1", "tok-3")])
    store.finish_replacement("tok-2", new_member="web-m5", state="done")
    store.finish_replacement("tok-3", new_member="web-m6", state="done")
    store.add_decision(rollout.id, 1, passed=True, action="done", numbers={"boots": 3, "ready_p95": 13.1})
    store.update_rollout(rollout.id, expect="running", state="succeeded", wave=2)
    store.append_event("rollout.succeeded", actor=actor, ref="web@2", data={"rollout": rollout.id})
    return rollout.id


@pytest.fixture(scope="module", autouse=True)
def _chromium() -> None:
    required_or_skip(os.access(CHROMIUM, os.X_OK), f"no Chromium at {CHROMIUM}", "apt-get install chromium")


@pytest.fixture(scope="module")
def console(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Console]:
    """A real server on a loopback port, over a registry only this module uses."""
    settings = Settings(data_dir=tmp_path_factory.mktemp("console") / "data")
    with open_store(settings.registry_url) as store:
        rollout = _fill(store)
        operate = create_token("operator", "operate", store=store, settings=settings).secret
        read = create_token("viewer", "read", store=store, settings=settings).secret
        server = WebServer(Listen("127.0.0.1", 0), store=store, settings=settings, policy=default_policy())
        thread = threading.Thread(target=server.run, name="console-under-test", daemon=True)
        thread.start()
        try:
            with urllib.request.urlopen(f"{server.url}/healthz", timeout=10) as reply:  # listening from the start
                assert reply.status == 200
            yield Console(server.url, store, operate, read, rollout)
        finally:
            server.stop()
            thread.join(15)
        assert not thread.is_alive(), "the server did not stop"


@pytest.fixture(scope="module")
def browser() -> Iterator[Browser]:
    with chromium() as opened:
        yield opened


@pytest.fixture
def screenshots(tmp_path: Path) -> Path:
    return screenshot_folder(tmp_path)


@pytest.fixture(scope="module")
def axe_source() -> str:
    required_or_skip(AXE.is_file(), f"axe-core is not at {AXE}", "run scripts/fetch_axe.sh (bootstrap runs it)")
    return AXE.read_text(encoding="utf-8")


@pytest.fixture
def tab(browser: Browser, console: Console, screenshots: Path) -> Iterator[Tab]:
    with open_tab(browser, console.url, screenshots) as opened:
        yield opened


def _violations(where: str, found: list[dict[str, Any]]) -> str:
    lines = [f"{where}: {len(found)} axe violation(s)"]
    for v in found:
        lines.append(f"  {v['id']} ({v['impact']}): {v['help']}")
        lines.extend(f"    at {t}" for t in v["targets"][:8])
    return "\n".join(lines)


# --- the tests --------------------------------------------------------------------------------------------------


def test_logging_in_refuses_a_wrong_token_and_the_keyboard_reaches_the_form(tab: Tab, console: Console) -> None:
    page = tab.page
    page.goto("/")
    expect(page).to_have_url(f"{console.url}/login?next=%2F")
    expect(page.get_by_role("heading", level=1)).to_have_text("Log in")
    tab.shot("login")

    # From the top of the page, Tab reaches the skip link, then the token's field, then the button.
    stops = []
    for _ in range(4):
        page.keyboard.press("Tab")
        stops.append(page.evaluate("() => document.activeElement.id || document.activeElement.textContent.trim()"))
    assert stops == ["Skip to content", "amiforge", "token", "Log in"]
    # The skip link shows itself when focused and leads past the header, straight to the form.
    page.keyboard.press("Shift+Tab")
    page.keyboard.press("Shift+Tab")
    page.keyboard.press("Shift+Tab")
    expect(page.get_by_role("link", name="Skip to content")).to_be_focused()
    assert (page.get_by_role("link", name="Skip to content").bounding_box() or {"x": -1.0})["x"] >= 0
    page.keyboard.press("Enter")
    page.keyboard.press("Tab")
    expect(page.get_by_label("Token")).to_be_focused()

    page.keyboard.type("amf_" + "x" * 43)
    page.keyboard.press("Enter")  # submitted from the keyboard
    expect(page.get_by_role("alert")).to_contain_text("That token is not valid")
    expect(page.get_by_label("Token")).to_have_value("")  # never echoed back
    tab.shot("login-refused")

    page.goto("/login?next=//evil.example/")  # where to go after logging in: only a path of this server
    tab.log_in(console.operate)
    expect(page).to_have_url(f"{console.url}/")
    expect(page.get_by_role("navigation", name="Main")).to_contain_text("operator (operate)")
    assert tab.dialogs == [] and tab.errors == []


def test_an_operator_reads_every_page_promotes_revokes_and_logs_out(tab: Tab, console: Console) -> None:
    page = tab.page
    page.goto("/")
    tab.log_in(console.operate)

    # The catalog: both images, their channels (current / rollback), every version.
    images = page.get_by_role("region", name="Images").get_by_role("table")
    expect(images.get_by_role("row")).to_have_count(3)
    web_row = images.get_by_role("row").filter(has=page.get_by_role("link", name="web", exact=True))
    expect(web_row).to_contain_text("prod: web@2 / web@1")
    expect(web_row).to_contain_text("dev: web@2 / –")
    api_row = images.get_by_role("row").filter(has=page.get_by_role("link", name="api", exact=True))
    expect(api_row).to_contain_text("prod: api@1 / –")
    versions = page.get_by_role("region", name="Versions").get_by_role("table")
    expect(versions.get_by_role("row")).to_have_count(6)
    tab.shot("catalog")

    # A version: its facts, artifacts, boot report and scan; what its tags and console hold is shown as text.
    page.get_by_role("link", name="web@2").first.click()
    expect(page).to_have_url(re.compile(r"/versions/web(@|%40)2$"))
    expect(page.get_by_role("heading", level=1)).to_have_text("web@2 signed")
    facts = page.locator("dl.facts")
    expect(facts).to_contain_text("b" * 64)
    expect(facts).to_contain_text("web@1")
    expect(facts).to_contain_text("prod (current)")
    expect(facts).to_contain_text("dev (current)")
    expect(facts.locator("code", has_text="team=")).to_have_text(f"team={HOSTILE_TAG}")
    expect(facts.locator("b")).to_have_count(0)
    artifacts = page.get_by_role("region", name="Artifacts")
    expect(artifacts).to_contain_text("/var/lib/amiforge/regions/local/web-2.qcow2")
    expect(artifacts).to_contain_text("734003200")
    expect(page.get_by_role("region", name="Layers").get_by_role("row")).to_have_count(3)
    boots = page.get_by_role("region", name="Boot reports")
    expect(boots.get_by_role("heading", level=3)).to_contain_text("passed, ready in 12.3 s (tcg)")
    expect(boots.get_by_role("row")).to_have_count(4)
    expect(boots.get_by_role("row", name="http :80/")).to_contain_text(HOSTILE_DETAIL)
    boots.get_by_text("Console", exact=True).click()
    console_text = boots.locator("pre")
    expect(console_text).to_be_visible()
    expect(console_text).to_contain_text(f"web login: {HOSTILE_CONSOLE}")
    expect(page.locator("main script, main img, main b")).to_have_count(0)
    expect(page.get_by_role("region", name="Scan")).to_contain_text("TEST-0001")
    expect(page.get_by_role("region", name="Signatures")).to_contain_text("ed25519:test-key-1")
    tab.shot("version-web-2")

    # Rollouts, and the finished one: both gate decisions, the three members replaced.
    page.get_by_role("link", name="Rollouts").click()
    row = page.get_by_role("row").filter(has=page.get_by_role("link", name=f"#{console.rollout}"))
    expect(row).to_contain_text("local:web")
    expect(row).to_contain_text("succeeded")
    expect(row).to_contain_text("2 / 2")
    tab.shot("rollouts")
    row.get_by_role("link", name=f"#{console.rollout}").click()
    expect(page.get_by_role("heading", level=1)).to_have_text(f"Rollout #{console.rollout}: web@2 onto local:web")
    tables = page.get_by_role("table")
    expect(tables.nth(0).locator("tbody tr")).to_have_count(2)
    expect(tables.nth(0)).to_contain_text("ready_p95=13.1")
    expect(tables.nth(1).locator("tbody tr")).to_have_count(3)
    for member in ("web-m4", "web-m5", "web-m6"):
        expect(tables.nth(1)).to_contain_text(member)
    expect(page.get_by_role("button", name="Roll local:web back")).to_be_visible()  # offered, never pressed here
    tab.shot("rollout")

    # The audit log, and its hash chain recomputed on request.
    page.get_by_role("link", name="Audit").click()
    expect(page.get_by_role("table")).to_contain_text("rollout.succeeded")
    tab.shot("audit")
    page.get_by_role("link", name="Verify the hash chain").click()
    expect(page.get_by_role("status")).to_contain_text("is intact")
    tab.shot("audit-verified")

    # Promote through the form: the gates refuse a version that was never boot-tested or signed, and say so.
    page.goto("/versions/web@3")
    expect(page.get_by_role("heading", level=1)).to_have_text("web@3 built")
    channel = page.get_by_label("Promote to channel")
    channel.fill("Dev!")  # the browser checks the name before anything is sent
    assert channel.evaluate("e => !e.checkValidity() && e.validity.patternMismatch")
    channel.fill("dev")
    assert channel.evaluate("e => e.checkValidity()")
    page.get_by_label("Reason", exact=True).fill("try it")
    page.get_by_role("button", name="Promote").click()
    expect(page.get_by_role("alert")).to_contain_text("promotion to dev gate failed")
    tab.shot("promote-refused")
    refused = console.store.events("web@3", kinds=["promote.refused"])
    assert [(e.actor, e.data["channel"]) for e in refused] == [("token:operator", "dev")]

    # Revoke through the form: the state shown changes, and the registry records who did it and why.
    page.goto("/versions/web@3")
    page.get_by_label("Revoke, because").fill("built from a poisoned mirror")
    page.get_by_role("button", name="Revoke").click()
    expect(page).to_have_url(re.compile(r"/versions/web(@|%40)3$"))
    expect(page.get_by_role("heading", level=1)).to_have_text("web@3 revoked")
    assert console.store.get_version("web@3").status is Status.REVOKED
    revoked = console.store.events("web@3", kinds=["revoke"])
    assert [(e.actor, e.data) for e in revoked] == [("token:operator", {"reason": "built from a poisoned mirror"})]
    expect(page.get_by_role("region", name="Events")).to_contain_text("token:operator")
    tab.shot("version-web-3-revoked")

    # Log out: back to the log-in page, and the session is gone.
    page.get_by_role("button", name="Log out").click()
    expect(page).to_have_url(f"{console.url}/login")
    page.goto("/audit")
    expect(page).to_have_url(f"{console.url}/login?next=%2Faudit")
    assert tab.dialogs == [], tab.dialogs
    assert tab.errors == [], tab.errors


def test_a_read_token_sees_everything_and_no_operation(tab: Tab, console: Console) -> None:
    page = tab.page
    page.goto("/versions/web@2")
    expect(page).to_have_url(f"{console.url}/login?next=%2Fversions%2Fweb%402")
    tab.log_in(console.read)
    expect(page).to_have_url(re.compile(r"/versions/web(@|%40)2$"))  # back where it was going
    expect(page.get_by_role("navigation", name="Main")).to_contain_text("viewer (read)")
    expect(page.get_by_role("heading", level=1)).to_contain_text("web@2")
    expect(page.get_by_role("region", name="Operations")).to_have_count(0)
    expect(page.locator("form[action*='/promote'], form[action*='/revoke']")).to_have_count(0)
    expect(page.get_by_role("button")).to_have_text(["Log out"])
    tab.shot("version-web-2-read")
    page.goto(f"/rollouts/{console.rollout}")
    expect(page.get_by_role("button")).to_have_text(["Log out"])
    assert tab.dialogs == [] and tab.errors == []


def test_the_header_and_the_forms_fit_a_narrow_screen(tab: Tab, console: Console) -> None:
    """At 360 px the navigation and the operation forms wrap: nothing of them is out of reach to the right (tables
    may scroll sideways, as WCAG's reflow rule allows)."""
    page = tab.page
    page.set_viewport_size({"width": 360, "height": 740})
    page.goto("/versions/web@2")
    tab.log_in(console.operate)
    for element in (page.get_by_role("button", name="Log out"), page.get_by_role("button", name="Promote"),
                    page.get_by_role("button", name="Revoke"), page.locator("dl.facts code").first):  # fmt: skip
        box = element.bounding_box()
        assert box is not None and box["x"] >= 0 and box["x"] + box["width"] <= 360, (element, box)
    tab.shot("version-web-2-narrow")


def test_every_page_passes_axe(tab: Tab, console: Console, axe_source: str) -> None:
    page = tab.page
    tab.serve_axe(axe_source)
    problems: list[str] = []

    def audit(where: str) -> None:
        found = tab.axe()
        if found:
            problems.append(_violations(where, found))

    page.goto("/login")
    audit("/login")
    page.get_by_label("Token").fill("amf_" + "y" * 43)
    page.get_by_role("button", name="Log in").click()
    expect(page.get_by_role("alert")).to_be_visible()
    audit("/login (refused)")
    tab.log_in(console.operate)
    for path in ("/", "/versions/web@2", "/versions/api@2", "/rollouts", f"/rollouts/{console.rollout}",
                 "/audit", "/audit?verify=true", "/versions/nope@9", "/dashboards/executive", "/dashboards/oncall",
                 "/dashboards/debug", "/versions/web@2/incident", "/retirement", "/retirement?all=true"):  # fmt: skip
        page.goto(path)
        for summary in page.locator("details > summary").all():  # what a reader would open is checked too
            summary.click()
        audit(path)
        tab.shot("axe-" + (re.sub(r"[^a-z0-9]+", "-", path).strip("-") or "catalog"))
    assert not problems, "\n".join(problems)
    assert tab.dialogs == [] and tab.errors == []
