"""The web console's JSON API and pages (`amiforge serve`), through Starlette's TestClient over a real SQLite registry:
tokens and roles, the refusals that change nothing, the form key and origin checks of browser sessions, the error
tree as HTTP statuses, operations that go through the same gates and record the token as their actor, and the
documents the CLI's `--json` prints."""

from __future__ import annotations

import ipaddress
import json
import os
import re
import socket
import ssl
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from fastapi.routing import APIRoute
from fastapi.testclient import TestClient
from test_rollout import FakeFleet, _fleet_of, _version
from test_supply_lifecycle import (  # noqa: F401 (bare_world, world: fixtures)
    ACTOR,
    SECRET_PATH,
    WAIVER_POLICY,
    World,
    bare_world,
    flip_byte,
    private_key_pem,
    world,
)

from amiforge.errors import ConfigError, StateError
from amiforge.lifecycle import rollout as rollout_module
from amiforge.lifecycle.documents import version_document
from amiforge.lifecycle.leases import HERE
from amiforge.lifecycle.tokens import PREFIX, authenticate, create_token, first_token, revoke_token, secret_digest
from amiforge.model import Artifact, BootObservation, BootReport, CheckResult, Status, to_json
from amiforge.policy.document import default_policy
from amiforge.store.sql import open_store
from amiforge.strategy import Strategy
from amiforge.web.app import CSP, _routes
from amiforge.web.context import Context, Controllers
from amiforge.web.metrics import Metrics
from amiforge.web.server import Listen, Tls, WebServer, public_origin


@dataclass
class Site:
    world: World
    context: Context
    client: TestClient
    secrets: dict[str, str]  # role -> secret

    def bearer(self, role: str) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.secrets[role]}"}

    def state(self) -> object:
        """Everything an operation could change: events, versions' states, channels, rollouts, tokens."""
        store = self.world.store
        return (
            store.count_events(),
            [(v.ref, v.status) for v in store.list_versions(summary=True)],
            [(p.name, p.channel, p.current, p.previous) for p in store.channels()],
            [(r.id, r.state, r.requested) for r in store.rollouts()],
            [(t.name, t.revoked_at) for t in store.tokens()],
        )

    def log_in(self, role: str) -> str:
        """A browser session for `role`; its form key."""
        reply = self.client.post("/login", data={"token": self.secrets[role], "next": "/"}, follow_redirects=False)
        assert reply.status_code == 303 and reply.headers["location"] == "/"
        page = self.client.get("/").text
        found = re.search(r'name="form_key" value="([0-9a-f]{64})"', page)
        assert found is not None
        return found.group(1)


@pytest.fixture
def site(world: World) -> Iterator[Site]:  # noqa: F811 (the imported fixture)
    store, settings = world.store, world.settings
    secrets = {role: create_token(f"t-{role}", role, store=store, settings=settings).secret
               for role in ("read", "operate", "admin")}  # fmt: skip
    ctx = Context(store, settings, Metrics(store, default_policy()), Controllers(store))
    from amiforge.web.app import create_app

    with TestClient(create_app(ctx), base_url="http://127.0.0.1:9464", client=("127.0.0.1", 50000)) as client:
        yield Site(world, ctx, client, secrets)


def _rollout(site: Site) -> int:
    """A running rollout in the registry (nothing drives it: pause and abort only mark it)."""
    v = site.world.seed()
    strategy = Strategy().model_dump(mode="json")
    return site.world.store.create_rollout("local:web", v.id, strategy=strategy, waves=[1], actor=ACTOR).id


# --- tokens ---------------------------------------------------------------------------------------------------------


def test_a_token_is_kept_as_a_hash_and_dies_when_revoked(world: World) -> None:  # noqa: F811
    store, settings = world.store, world.settings
    created = create_token("ci-deploy", "operate", store=store, settings=settings)
    assert re.fullmatch(PREFIX + r"[A-Za-z0-9_-]{43}", created.secret)
    with store.engine.connect() as conn:
        dumped = "\n".join(str(row) for row in conn.exec_driver_sql("SELECT * FROM api_tokens"))
    assert created.secret not in dumped and secret_digest(created.secret) in dumped
    found = authenticate(store, created.secret)
    assert found is not None and (found.name, found.role) == ("ci-deploy", "operate")
    used = store.token_by_secret(secret_digest(created.secret))
    assert used is not None and used.last_used_at is not None  # the first use is noted
    assert authenticate(store, created.secret[:-1] + ("A" if created.secret[-1] != "A" else "B")) is None
    assert authenticate(store, "") is None and authenticate(store, created.secret + " ") is None
    with pytest.raises(StateError, match="exists"):
        create_token("ci-deploy", "read", store=store, settings=settings)
    for name, role in (("Bad Name", "read"), ("x" * 65, "read"), ("ok", "root")):
        with pytest.raises(ConfigError):
            create_token(name, role, store=store, settings=settings)
    assert revoke_token("ci-deploy", store=store, settings=settings).changed
    assert not revoke_token("ci-deploy", store=store, settings=settings).changed
    assert authenticate(store, created.secret) is None
    kinds = [(e.kind, e.data) for e in store.events() if e.kind.startswith("token.")]
    assert kinds == [("token.created", {"token": "ci-deploy", "role": "operate"}),
                     ("token.revoked", {"token": "ci-deploy", "role": "operate"})]  # fmt: skip


def test_serve_makes_an_admin_token_only_for_a_registry_that_never_had_one(world: World) -> None:  # noqa: F811
    store, settings = world.store, world.settings
    first = first_token(store=store, settings=settings)
    assert first is not None and first.token.role == "admin" and first.token.name == "admin"
    assert first_token(store=store, settings=settings) is None
    revoke_token("admin", store=store, settings=settings)
    assert first_token(store=store, settings=settings) is None  # revoked on purpose: none comes back by itself


def test_serve_started_by_a_service_puts_the_first_token_in_a_private_file(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("AMIFORGE_")}
    env |= {"AMIFORGE_DATA_DIR": str(tmp_path / "data"), "COLUMNS": "400"}
    port = _free_port()
    serve = subprocess.Popen([sys.executable, "-m", "amiforge", "serve", "--listen", f"127.0.0.1:{port}",
                              "--collect-every", "0"], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                             text=True, cwd=tmp_path)  # fmt: skip
    try:
        path = tmp_path / "data" / "first-admin-token"
        deadline = time.monotonic() + 60
        while not path.exists():
            assert time.monotonic() < deadline and serve.poll() is None, "serve made no token file"
            time.sleep(0.2)
        time.sleep(0.2)
        secret = path.read_text().strip()
        assert secret.startswith("amf_") and path.stat().st_mode & 0o777 == 0o600
        headers = {"Authorization": f"Bearer {secret}"}
        with urllib.request.urlopen(urllib.request.Request(f"http://127.0.0.1:{port}/api/v1/tokens",
                                                           headers=headers), timeout=10) as reply:  # fmt: skip
            assert [t["name"] for t in json.loads(reply.read())] == ["admin"]
    finally:
        serve.terminate()
        _, err = serve.communicate(timeout=30)
    assert "first-admin-token (mode 0600)" in err, err
    assert secret not in err, err


def test_serve_never_writes_the_first_token_into_a_file_it_did_not_make(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("AMIFORGE_")}
    env |= {"AMIFORGE_DATA_DIR": str(tmp_path / "data"), "COLUMNS": "400"}
    (tmp_path / "data").mkdir()
    planted = tmp_path / "data" / "first-admin-token"
    planted.write_text("")
    planted.chmod(0o666)  # readable by anyone: what another user would plant
    argv = [sys.executable, "-m", "amiforge", "serve", "--listen", f"127.0.0.1:{_free_port()}", "--collect-every", "0"]
    done = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert done.returncode == 2 and "cannot make" in done.stderr and "File exists" in done.stderr, done.stderr
    assert planted.read_text() == ""
    with open_store(f"sqlite:///{tmp_path / 'data' / 'registry.db'}") as store:
        assert store.tokens() == []  # no secret was made that nobody can read


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


# --- who may do what ------------------------------------------------------------------------------------------------

# Every route that changes something, with a body that would be valid, and the role it needs.
MUTATIONS: list[tuple[str, dict[str, object], str]] = [
    ("/api/v1/versions/web@1/promote", {"channel": "dev"}, "operate"),
    ("/api/v1/versions/web@1/revoke", {"reason": "test"}, "operate"),
    ("/api/v1/rollouts", {"target": "local:web", "version": "web@1"}, "operate"),
    ("/api/v1/rollouts/1/pause", {}, "operate"),
    ("/api/v1/rollouts/1/abort", {}, "operate"),
    ("/api/v1/rollouts/1/resume", {}, "operate"),
    ("/api/v1/rollback", {"target": "local:web"}, "operate"),
    ("/api/v1/tokens", {"name": "new", "role": "admin"}, "admin"),
    ("/api/v1/tokens/t-read/revoke", {}, "admin"),
    ("/api/v1/keys/TEST-KEY/revoke", {"reason": "test"}, "admin"),
]
FORMS: list[tuple[str, dict[str, str], str]] = [
    ("/versions/web@1/promote", {"channel": "dev"}, "operate"),
    ("/versions/web@1/revoke", {"reason": "test"}, "operate"),
    ("/rollouts/1/pause", {}, "operate"),
    ("/rollouts/1/abort", {}, "operate"),
    ("/rollouts/1/resume", {}, "operate"),
    ("/rollback", {"target": "local:web"}, "operate"),
]


def test_every_mutating_route_refuses_no_token_a_wrong_token_and_a_weak_role_and_changes_nothing(site: Site) -> None:
    _rollout(site)
    wrong = PREFIX + "A" * 43
    for path, body, role in MUTATIONS:
        weaker = "read" if role == "operate" else "operate"
        for headers, status in (({}, 401), ({"Authorization": f"Bearer {wrong}"}, 401),
                                ({"Authorization": "Basic dXNlcjpwYXNz"}, 401), (site.bearer("read"), 403),
                                (site.bearer(weaker), 403)):  # fmt: skip
            before = site.state()
            reply = site.client.post(path, json=body, headers=headers)
            assert reply.status_code == status, (path, headers, reply.text)
            assert reply.json()["error"] == ("unauthenticated" if status == 401 else "forbidden")
            assert site.state() == before, path
            if status == 401:
                assert reply.headers["WWW-Authenticate"] == 'Bearer realm="amiforge"'


def test_every_form_refuses_a_session_without_its_form_key_or_from_another_origin(site: Site) -> None:
    _rollout(site)
    for path, fields, _role in FORMS:
        reply = site.client.post(path, data=fields, follow_redirects=False)
        assert (reply.status_code, reply.headers["location"]) == (303, "/login?next=%2F")
    key = site.log_in("operate")
    for path, fields, _role in FORMS:
        before = site.state()
        for extra, headers in (({}, {}), ({"form_key": "0" * 64}, {}),
                               ({"form_key": key}, {"Origin": "http://evil.test"}),
                               ({"form_key": key}, {"Sec-Fetch-Site": "cross-site"}),
                               ({"form_key": key}, {"Origin": "null"}),
                               ({"form_key": key}, {"Origin": "null", "Sec-Fetch-Site": "cross-site"})):  # fmt: skip
            reply = site.client.post(path, data=fields | extra, headers=headers, follow_redirects=False)
            assert reply.status_code == 403, (path, extra, headers)
            assert site.state() == before, path
    # A browser that sends no referrer sends `Origin: null` with the site's own posts, and says same-origin.
    same = {"Origin": "null", "Sec-Fetch-Site": "same-origin"}
    reply = site.client.post("/rollouts/1/pause", data={"form_key": key}, headers=same, follow_redirects=False)
    assert reply.status_code == 303 and site.world.store.get_rollout(1).requested == "pause"
    site.client.cookies.clear()
    read_key = site.log_in("read")
    for path, fields, _role in FORMS:
        before = site.state()
        reply = site.client.post(path, data=fields | {"form_key": read_key}, follow_redirects=False)
        assert reply.status_code == 403 and "this needs operate" in reply.text
        assert site.state() == before


def test_reading_needs_a_token_and_a_revoked_token_or_session_is_refused_at_once(site: Site) -> None:
    site.world.seed()
    reads = ("/api/v1/catalog", "/api/v1/versions", "/api/v1/versions/web@1", "/api/v1/channels", "/api/v1/rollouts",
             "/api/v1/events", "/api/v1/events/verify", "/api/v1/openapi.json", "/metrics")  # fmt: skip
    for path in reads:
        assert site.client.get(path).status_code == 401, path
        assert site.client.get(path, headers=site.bearer("read")).status_code == 200, path
    assert site.client.get("/api/v1/tokens", headers=site.bearer("operate")).status_code == 403
    assert site.client.get("/healthz").json() == {"status": "ok"}  # for load balancers: says nothing more
    site.log_in("read")
    assert site.client.get("/versions/web@1").status_code == 200
    revoke_token("t-read", store=site.world.store, settings=site.world.settings)
    reply = site.client.get("/versions/web@1", follow_redirects=False)
    assert (reply.status_code, reply.headers["location"]) == (303, "/login?next=%2Fversions%2Fweb%401")
    assert site.client.get("/api/v1/catalog", headers=site.bearer("read")).status_code == 401


def test_login_refuses_a_wrong_token_and_never_redirects_off_site(site: Site) -> None:
    reply = site.client.post("/login", data={"token": "amf_nope", "next": "/"}, follow_redirects=False)
    assert reply.status_code == 401 and "not valid" in reply.text and "set-cookie" not in reply.headers
    for target in ("//evil.test/x", "https://evil.test/", "/\\evil.test", "javascript:alert(1)"):
        reply = site.client.post("/login", data={"token": site.secrets["read"], "next": target},
                                 follow_redirects=False)  # fmt: skip
        assert reply.headers["location"] == "/", target
    cookie = reply.headers["set-cookie"]
    assert "HttpOnly" in cookie and "SameSite=strict" in cookie and "Path=/" in cookie and "Max-Age=43200" in cookie
    assert "Secure" not in cookie  # plain HTTP on loopback: a Secure cookie would never come back
    reply = site.client.post("/login", data={"token": site.secrets["read"]}, headers={"Origin": "http://evil.test"})
    assert reply.status_code == 403


def test_pages_carry_the_security_headers_and_escape_what_recipes_and_consoles_say(site: Site) -> None:
    hostile = "<script>alert(1)</script>"
    v = site.world.store.create_version(
        name="web", recipe_digest="a" * 64, recipe_path=f"/r/{hostile}.yaml", provider="local",
        tags={"team": hostile}, parent=None, recipe=hostile,
    )  # fmt: skip
    report = BootReport(1.0, (CheckResult(hostile, "command", False, hostile),), f"console {hostile}", "tcg",
                        datetime.now(UTC), 2.0)  # fmt: skip
    site.world.store.add_boot_report(v.id, report)
    site.log_in("operate")
    for path in ("/", "/versions/web@1", "/rollouts", "/audit", "/login"):
        reply = site.client.get(path)
        assert reply.status_code == 200, path
        assert reply.headers["Content-Security-Policy"] == CSP
        assert (reply.headers["X-Frame-Options"], reply.headers["X-Content-Type-Options"]) == ("DENY", "nosniff")
        assert reply.headers["Cache-Control"] == "no-store"
        assert hostile not in reply.text, path
    page = site.client.get("/versions/web@1").text
    assert page.count("&lt;script&gt;alert(1)&lt;/script&gt;") >= 5  # path, tag, check name, detail, console, recipe


# --- errors and operations ------------------------------------------------------------------------------------------


def test_errors_are_the_error_trees_with_their_http_status(site: Site) -> None:
    site.world.seed()
    read, operate = site.bearer("read"), site.bearer("operate")
    reply = site.client.get("/api/v1/versions/web@9", headers=read)
    assert reply.status_code == 404 and reply.json()["error"] == "not_found" and reply.json()["fix"]
    reply = site.client.post("/api/v1/versions/web@1/promote", json={"channel": "dev"}, headers=operate)
    assert reply.status_code == 422 and reply.json()["error"] == "gate"
    assert {f["name"] for f in reply.json()["failures"]} >= {"scan", "signature"}
    reply = site.client.post("/api/v1/versions/web@1/promote", json={"channel": "Dev!", "x": 1}, headers=operate)
    assert reply.status_code == 422 and reply.json()["error"] == "invalid"
    assert {p["where"] for p in reply.json()["detail"]} == {"body.channel", "body.x"}
    reply = site.client.post("/api/v1/rollouts/99/pause", headers=operate)
    assert reply.status_code == 404
    reply = site.client.get("/api/v1/versions/web@1/sbom", headers=read)
    assert reply.status_code == 404 and "amiforge scan web@1" in reply.json()["fix"]


def test_promote_and_revoke_go_through_the_gates_and_name_the_token_as_actor(site: Site) -> None:
    v = site.world.signed()
    operate = site.bearer("operate")
    reply = site.client.post(f"/api/v1/versions/{v.ref}/promote", json={"channel": "dev", "reason": "web"},
                             headers=operate)  # fmt: skip
    assert reply.status_code == 200, reply.text
    assert reply.json()["moved"] and reply.json()["pointer"]["current"] == "web@1"
    [event] = [e for e in site.world.store.events(v.ref) if e.kind == "promote"]
    assert event.actor == "token:t-operate" and event.data["reason"] == "web"
    sbom = site.client.get(f"/api/v1/versions/{v.ref}/sbom?format=spdx", headers=operate)
    assert sbom.status_code == 200 and json.loads(sbom.text)["spdxVersion"] == "SPDX-2.3"
    assert sbom.headers["Content-Disposition"] == 'attachment; filename="web-1.spdx.json"'
    key = site.log_in("operate")
    reply = site.client.post(f"/versions/{v.ref}/revoke", data={"reason": "bad", "form_key": key},
                             follow_redirects=False)  # fmt: skip
    assert (reply.status_code, reply.headers["location"]) == (303, "/versions/web@1")
    assert site.world.store.get_version(v.ref).status is Status.REVOKED
    [revoked] = [e for e in site.world.store.events(v.ref) if e.kind == "revoke"]
    assert revoked.actor == "token:t-operate"
    channels = site.client.get("/api/v1/channels", headers=operate).json()
    assert channels[0]["flags"] == ["current web@1 is revoked"]


def test_pause_and_abort_are_requests_to_the_controller(site: Site) -> None:
    rollout_id = _rollout(site)
    operate = site.bearer("operate")
    reply = site.client.post(f"/api/v1/rollouts/{rollout_id}/pause", headers=operate)
    assert reply.status_code == 200 and reply.json()["rollout"]["requested"] == "pause"
    store = site.world.store
    store.update_rollout(rollout_id, expect="running", state="paused", clear_request=True)
    reply = site.client.post(f"/api/v1/rollouts/{rollout_id}/abort", headers=operate)
    assert reply.status_code == 200 and reply.json()["rollout"]["state"] == "aborted"
    [event] = [e for e in store.events() if e.kind == "rollout.aborted"]
    assert event.actor == "token:t-operate"
    reply = site.client.post(f"/api/v1/rollouts/{rollout_id}/resume", headers=operate)
    assert reply.status_code == 409 and reply.json()["error"] == "state"


def test_a_rollout_started_from_the_api_is_driven_here_to_its_end_and_rolled_back(
    site: Site, monkeypatch: pytest.MonkeyPatch
) -> None:
    fake = FakeFleet()
    fake.add("web@1", 2)
    monkeypatch.setattr(rollout_module, "fleet_of", _fleet_of(fake))
    monkeypatch.setattr(rollout_module, "releasable", lambda *_a, **_k: None)  # gates: test_rollout.py
    store = site.world.store
    _version(store, "v1")
    _version(store, "v2")
    body = {"target": "local:web", "version": "web@2", "strategy": {"waves": ["100%"], "bake_time": "0s"}}
    reply = site.client.post("/api/v1/rollouts", json=body, headers=site.bearer("operate"))
    assert reply.status_code == 202, reply.text
    rollout_id = reply.json()["rollout"]["id"]
    site.context.controllers.join(30)
    report = site.client.get(f"/api/v1/rollouts/{rollout_id}", headers=site.bearer("read")).json()
    assert report["rollout"]["state"] == "succeeded" and fake.versions() == Counter({"web@2": 2})
    assert [d["action"] for d in report["decisions"]] == ["continue"]
    reply = site.client.post("/api/v1/rollback", json={"target": "local:web"}, headers=site.bearer("operate"))
    assert reply.status_code == 202, reply.text
    site.context.controllers.join(30)
    back = store.get_rollout(reply.json()["rollout"]["id"])
    assert (back.state, back.undoes, back.actor) == ("succeeded", rollout_id, "token:t-operate")
    assert fake.versions() == Counter({"web@1": 2})
    started = [e for e in store.events() if e.kind == "rollout.started"]
    assert [e.actor for e in started] == ["token:t-operate"] * 2


def test_admin_tokens_make_and_revoke_tokens(site: Site) -> None:
    admin = site.bearer("admin")
    reply = site.client.post("/api/v1/tokens", json={"name": "ci", "role": "read"}, headers=admin)
    assert reply.status_code == 201
    secret = reply.json()["secret"]
    assert site.client.get("/api/v1/catalog", headers={"Authorization": f"Bearer {secret}"}).status_code == 200
    listed = site.client.get("/api/v1/tokens", headers=admin).json()
    assert [t["name"] for t in listed] == ["t-read", "t-operate", "t-admin", "ci"]
    assert all("secret" not in t for t in listed)
    assert site.client.post("/api/v1/tokens/ci/revoke", headers=admin).json()["revoked_at"] is not None
    assert site.client.get("/api/v1/catalog", headers={"Authorization": f"Bearer {secret}"}).status_code == 401
    [event] = [e for e in site.world.store.events() if e.kind == "token.created" and e.data["token"] == "ci"]
    assert event.actor == "token:t-admin"


# --- documents -----------------------------------------------------------------------------------------------------


def test_the_api_and_the_cli_render_one_version_document(site: Site) -> None:
    v = site.world.signed()
    site.world.signed(parent=v.ref)
    reply = site.client.get(f"/api/v1/versions/{v.ref}", headers=site.bearer("read"))
    assert reply.json() == json.loads(json.dumps(to_json(version_document(site.world.store, v.ref))))
    document = reply.json()
    assert document["children"] == ["web@2"] and document["ancestry"] == []
    assert document["older_events"] == 0
    total = site.world.store.count_events(v.ref)
    for i in range(200):
        site.world.store.append_event("test.note", actor=ACTOR, ref=v.ref, data={"i": i})
    busy = site.client.get(f"/api/v1/versions/{v.ref}", headers=site.bearer("read")).json()
    assert (len(busy["events"]), busy["older_events"]) == (200, total)  # the rest is a page away
    assert document["scan"]["packages"] == 4 and document["signatures"]
    assert all(r["console"] is None for r in document["boot_reports"]) and document["log"] is None
    child = site.client.get("/api/v1/versions/web@2?console=true&recipe=true", headers=site.bearer("read")).json()
    assert child["ancestry"] == ["web@1"] and child["recipe"] == "{}"


def test_listings_are_keyset_pages(site: Site) -> None:
    for _ in range(5):
        site.world.seed()
    site.world.seed("api")
    for i in range(4):
        site.world.store.append_event("test.note", actor=ACTOR, data={"i": i})
    read = site.bearer("read")
    seen, cursor = [], None
    while True:
        page = site.client.get("/api/v1/versions", params={"limit": 2, **({"before": cursor} if cursor else {})},
                               headers=read).json()  # fmt: skip
        seen += [item["ref"] for item in page["items"]]
        cursor = page["next_before"]
        if cursor is None:
            break
    assert seen == ["api@1", "web@5", "web@4", "web@3", "web@2", "web@1"]
    searched = site.client.get("/api/v1/versions", params={"search": "ap", "status": "tested"}, headers=read).json()
    assert [i["ref"] for i in searched["items"]] == ["api@1"]
    assert site.client.get("/api/v1/versions", params={"limit": 0}, headers=read).status_code == 422
    catalog = site.client.get("/api/v1/catalog", headers=read).json()
    assert [(i["name"], i["versions"], i["newest"]) for i in catalog["images"]] == [("api", 1, "api@1"),
                                                                                   ("web", 5, "web@5")]  # fmt: skip
    events = site.client.get("/api/v1/events", params={"limit": 3}, headers=read).json()
    older = site.client.get("/api/v1/events", params={"limit": 3, "before": events["next_before"]},
                            headers=read).json()  # fmt: skip
    combined = [e["seq"] for e in older["items"]] + [e["seq"] for e in events["items"]]
    total = site.world.store.count_events()
    assert total > 6 and combined == list(range(total - 5, total + 1))


def test_the_dashboards_render_as_pages_with_charts_and_as_documents(site: Site) -> None:
    v = site.world.seed()
    now = datetime.now(UTC)
    site.world.store.record_boots("local:web", [
        BootObservation(f"g-{i}", v.id, now - timedelta(hours=3 - i), "ready", 10.0 + i,
                        now - timedelta(hours=3 - i) + timedelta(seconds=10 + i))
        for i in range(3)
    ])  # fmt: skip
    site.log_in("read")
    page = site.client.get("/dashboards/debug", params={"window": "6h", "version": v.ref})
    assert page.status_code == 200
    assert page.text.count("<polyline") == 3  # p50, p95, p99 over the window
    assert "Boot tests by outcome" in page.text and "g-2" in page.text
    assert site.client.get("/dashboards/debug", params={"window": "2y"}).status_code == 400
    doc = site.client.get("/api/v1/dashboards/executive", params={"hours": 6}, headers=site.bearer("read")).json()
    [success] = [p for p in doc["panels"] if p["title"] == "Boot success (24 h)"]
    assert success["kind"] == "stat" and success["table"]["rows"] == [["web@1", "local:web", "100.0 %", "3"]]


def test_the_version_page_shows_findings_with_waivers_the_diff_and_a_verification_that_can_fail(site: Site) -> None:
    w = site.world
    w.plant(SECRET_PATH, private_key_pem())
    expires = (datetime.now(UTC) + timedelta(days=30)).date().isoformat()
    w.with_policy(WAIVER_POLICY.format(path=SECRET_PATH, expires=expires))
    site.context.settings = w.settings
    parent = w.signed()
    child = w.signed(parent=parent.ref)
    read = site.bearer("read")
    [row] = site.client.get(f"/api/v1/versions/{child.ref}/findings", headers=read).json()
    assert (row["finding"]["id"], row["finding"]["path"]) == ("private-key", SECRET_PATH)
    assert row["waivers"] == [f"waiver for private-key ({SECRET_PATH}) by TEST-0001, expires {expires} "
                              "(every channel)"]  # fmt: skip
    changes = site.client.get(f"/api/v1/versions/{child.ref}/diff", headers=read).json()
    assert (changes["old"]["number"], changes["new"]["number"], changes["packages"]) == (1, 2, [])
    assert site.client.get(f"/api/v1/versions/{parent.ref}/diff", headers=read).status_code == 404
    site.log_in("read")
    page = site.client.get(f"/versions/{child.ref}").text
    assert "Changes from web@1" in page and "0 package(s) changed" in page and "by TEST-0001" in page
    assert site.client.get(f"/api/v1/versions/{child.ref}/verify", headers=read).status_code == 200
    assert "verifies against a trusted key" in site.client.get(f"/versions/{child.ref}/verify").text
    [artifact] = w.store.artifacts(child.id)
    flip_byte(Path(artifact.location))
    refused = site.client.get(f"/api/v1/versions/{child.ref}/verify", headers=read)
    assert refused.status_code == 422 and refused.json()["failures"][0]["name"] == f"artifact {artifact.location}"
    page = site.client.get(f"/versions/{child.ref}/verify").text
    assert "signature gate failed" in page and f"artifact {artifact.location}" in page


def test_the_incident_view_lists_what_ran_a_version(site: Site) -> None:
    rollout_id = _rollout(site)
    site.world.store.append_event("rollout.started", actor=ACTOR, ref="web@1", data={"rollout": rollout_id})
    doc = site.client.get("/api/v1/versions/web@1/incident", headers=site.bearer("read")).json()
    assert [r["id"] for r in doc["rollouts"]] == [rollout_id] and doc["timeline"][0][1] == "rollout.started"
    assert 'amiforge revoke web@1 --reason "…"' in doc["rollback_commands"]
    site.log_in("read")
    page = site.client.get("/versions/web@1/incident")
    assert page.status_code == 200 and f"#{rollout_id}" in page.text
    assert site.client.get("/versions/web@1/incident", params={"hours": -1}).status_code == 400


def test_a_rollout_a_live_controller_drives_is_not_driven_twice_and_an_orphaned_one_can_be_resumed_or_aborted(
    site: Site,
) -> None:

    rollout_id = _rollout(site)
    store, operate = site.world.store, site.bearer("operate")
    me = f"{socket.gethostname()}:{os.getpid()}:{HERE}:test"  # this process is alive: a live controller
    assert store.claim_rollout(rollout_id, me, expect=None)
    reply = site.client.post(f"/api/v1/rollouts/{rollout_id}/resume", headers=operate)
    assert reply.status_code == 409 and f"is driven by {me}" in reply.json()["message"]
    assert site.context.controllers.driving() == []
    reply = site.client.post(f"/api/v1/rollouts/{rollout_id}/abort", headers=operate)
    assert reply.json()["rollout"]["state"] == "running" and reply.json()["rollout"]["requested"] == "abort"
    site.log_in("read")
    assert "No controller drives this rollout" not in site.client.get(f"/rollouts/{rollout_id}").text
    # Its process dies (a pid no process has): nobody drives it; the page offers Resume, and Abort is at once.
    assert store.renew_rollout(rollout_id, me, release=True)
    assert store.claim_rollout(rollout_id, f"{socket.gethostname()}:{2**22 + 1}:{HERE}:gone", expect=None)
    assert "No controller drives this rollout" in site.client.get(f"/rollouts/{rollout_id}").text
    site.client.cookies.clear()
    site.log_in("operate")
    assert ">Resume</button>" in site.client.get(f"/rollouts/{rollout_id}").text
    reply = site.client.post(f"/api/v1/rollouts/{rollout_id}/abort", headers=operate)
    assert reply.json()["rollout"]["state"] == "aborted"


# Routes anyone may reach: the log-in page, the health check, the static files, a redirect, and logging out (without
# a session it only clears the cookie).
PUBLIC = {("GET", "/login"), ("POST", "/login"), ("GET", "/healthz"), ("GET", "/dashboards"), ("POST", "/logout")}
EXAMPLES = {"ref": "web@1", "rollout_id": "1", "action": "pause", "name": "executive", "key_id": "TEST-KEY"}


def test_every_route_but_the_public_ones_refuses_a_request_without_a_token(site: Site) -> None:
    """Found from the app's own routes, so a route added without its token check fails here."""
    _rollout(site)
    checked = 0
    for route in _routes(site.client.app.routes):  # type: ignore[attr-defined]
        if not isinstance(route, APIRoute):
            continue
        examples = EXAMPLES | {"name": "t-read"} if route.path.startswith("/api/v1/tokens") else EXAMPLES
        path = re.sub(r"\{(\w+)\}", lambda m, ex=examples: ex[m.group(1)], route.path)  # type: ignore[misc]
        for method in sorted(route.methods or ()):
            if (method, route.path) in PUBLIC:
                continue
            before = site.state()
            reply = site.client.request(method, path, follow_redirects=False)
            if path.startswith("/api/") or path == "/metrics":
                assert reply.status_code == 401, (method, path, reply.status_code)
            else:
                assert (reply.status_code, reply.headers.get("location", "")[:7]) == (303, "/login?"), (method, path)
            assert site.state() == before
            checked += 1
    assert checked >= 39  # every method of every route that needs a token (39 when this was written)


def test_head_answers_like_get_without_a_body_and_405_names_every_method(site: Site) -> None:
    site.world.seed()
    read = site.bearer("read")
    for path in ("/api/v1/catalog", "/", "/versions/web@1", "/metrics"):
        got, head = site.client.get(path, headers=read), site.client.head(path, headers=read)
        assert (head.status_code, head.content) == (200, b""), path
        assert head.headers["content-type"] == got.headers["content-type"]
    reply = site.client.post("/api/v1/catalog", headers=read)
    assert reply.status_code == 405 and reply.headers["Allow"] == "GET, HEAD"
    reply = site.client.delete("/api/v1/tokens", headers=site.bearer("admin"))
    assert reply.status_code == 405 and reply.headers["Allow"] == "GET, HEAD, POST"


def test_a_large_body_is_refused_before_anything_reads_it(site: Site) -> None:
    before = site.state()
    big = b'{"name": "' + b"x" * (70 * 1024) + b'", "role": "admin"}'
    reply = site.client.post("/api/v1/tokens", content=big, headers={"Content-Type": "application/json"})
    assert reply.status_code == 413 and reply.json()["error"] == "too_large"

    def chunks() -> Iterator[bytes]:  # no Content-Length: the cap counts what arrives
        for _ in range(20):
            yield b"x" * 8192

    reply = site.client.post("/login", content=chunks(), headers={"Content-Type": "application/x-www-form-urlencoded"})
    assert reply.status_code in (400, 413) and site.state() == before


def test_htmx_sends_the_form_key_as_a_header(site: Site) -> None:
    rollout_id = _rollout(site)
    key = site.log_in("operate")
    refused = site.client.post(f"/api/v1/rollouts/{rollout_id}/pause")  # the cookie alone: no
    assert refused.status_code == 403 and site.world.store.get_rollout(rollout_id).requested is None
    reply = site.client.post(f"/api/v1/rollouts/{rollout_id}/pause", headers={"X-Amiforge-Form-Key": key})
    assert reply.status_code == 200 and site.world.store.get_rollout(rollout_id).requested == "pause"
    assert f'"X-Amiforge-Form-Key": "{key}"' in site.client.get("/").text  # what htmx is told to send


def test_a_browser_session_has_its_own_secret_and_ends_at_log_out(site: Site) -> None:
    key = site.log_in("operate")
    cookie = site.client.cookies["amiforge_session"]
    assert cookie.startswith("ams_") and cookie != site.secrets["operate"]  # the token never sits in the browser
    with site.world.store.engine.connect() as conn:
        stored = "\n".join(str(row) for row in conn.exec_driver_sql("SELECT * FROM api_sessions"))
    assert cookie not in stored and secret_digest(cookie) in stored
    site.client.cookies.clear()
    other = site.log_in("operate")
    assert other != key  # a form key belongs to one session
    site.client.cookies.clear()
    site.client.cookies.set("amiforge_session", cookie)
    assert site.client.get("/").status_code == 200
    reply = site.client.post("/logout", data={"form_key": key}, follow_redirects=False)
    assert (reply.status_code, reply.headers["location"]) == (303, "/login")
    site.client.cookies.set("amiforge_session", cookie)  # the old cookie, replayed
    assert site.client.get("/", follow_redirects=False).status_code == 303
    assert site.client.get("/api/v1/catalog", headers={"Authorization": f"Bearer {cookie}"}).status_code == 401


def _self_signed(folder: Path) -> Tls:
    """A throw-away certificate for 127.0.0.1 (synthetic: CN TEST-0001)."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "TEST-0001")])
    now = datetime.now(UTC)
    cert = (
        x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
        .serial_number(1).not_valid_before(now - timedelta(minutes=1)).not_valid_after(now + timedelta(hours=1))
        .add_extension(x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]), False)
        .sign(key, hashes.SHA256())
    )  # fmt: skip
    (folder / "cert.pem").write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    (folder / "key.pem").write_bytes(key.private_bytes(serialization.Encoding.PEM,
                                                       serialization.PrivateFormat.PKCS8,
                                                       serialization.NoEncryption()))  # fmt: skip
    return Tls(folder / "cert.pem", folder / "key.pem")


def test_under_tls_the_server_speaks_https_and_the_session_cookie_is_secure(site: Site, tmp_path: Path) -> None:
    tls = _self_signed(tmp_path)
    server = WebServer(Listen("127.0.0.1", 0), store=site.world.store, settings=site.world.settings,
                       policy=default_policy(), tls=tls)  # fmt: skip
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    try:
        assert server.url.startswith("https://127.0.0.1:")
        trust = ssl.create_default_context(cafile=str(tls.certificate))
        deadline = time.monotonic() + 10
        while True:
            try:
                with urllib.request.urlopen(f"{server.url}/healthz", context=trust, timeout=5) as reply:
                    assert reply.status == 200
                break
            except OSError:
                assert time.monotonic() < deadline
                time.sleep(0.1)
        body = urllib.parse.urlencode({"token": site.secrets["read"], "next": "/"}).encode()
        asked = urllib.request.Request(f"{server.url}/login", data=body, method="POST")

        class NoRedirect(urllib.request.HTTPRedirectHandler):
            def redirect_request(self, *args: object, **kwargs: object) -> None:
                return None

        opener = urllib.request.build_opener(urllib.request.HTTPSHandler(context=trust), NoRedirect)
        with pytest.raises(urllib.error.HTTPError) as answered:
            opener.open(asked, timeout=5)
        cookie = answered.value.headers["Set-Cookie"]
        assert answered.value.code == 303 and cookie.startswith("__Host-amiforge_session=ams_")
        assert "Secure" in cookie and "HttpOnly" in cookie
        with pytest.raises(ConfigError, match="TLS certificate"):
            WebServer(Listen("127.0.0.1", 0), store=site.world.store, settings=site.world.settings,
                      policy=default_policy(), tls=Tls(tls.key, tls.key))  # fmt: skip
    finally:
        server.stop()
        thread.join(10)


def test_expensive_reads_are_refused_at_once_when_their_places_are_taken(site: Site) -> None:
    read = site.bearer("read")
    with site.context.heavy(), site.context.heavy():  # two expensive reads under way
        reply = site.client.get("/api/v1/events/verify", headers=read)
        assert (reply.status_code, reply.json()["error"], reply.headers["Retry-After"]) == (503, "busy", "30")
        assert site.client.get("/api/v1/catalog", headers=read).status_code == 200  # the rest is unaffected
    assert site.client.get("/api/v1/events/verify", headers=read).json()["intact"] is True


def test_open_metrics_answer_loopback_names_only_and_htmx_is_sent_to_log_in(site: Site) -> None:
    site.context.open_metrics = True
    assert site.client.get("/metrics").status_code == 200  # Host: 127.0.0.1:9464
    for host in ("localhost:9464", "[::1]:9464"):
        assert site.client.get("/metrics", headers={"Host": host}).status_code == 200, host
    for host in ("rebound.example:9464", "127.0.0.1.rebound.example"):  # a page that rebound its own name
        assert site.client.get("/metrics", headers={"Host": host}).status_code == 401, host
    elsewhere = TestClient(site.client.app, base_url="http://127.0.0.1:9464", client=("192.0.2.7", 50000))
    assert elsewhere.get("/metrics").status_code == 401  # a Host of 127.0.0.1 sent from another machine
    htmx = {"HX-Request": "true", "HX-Current-URL": "http://127.0.0.1:9464/rollouts/1"}
    reply = site.client.get("/rollouts/1/live", headers=htmx)
    assert (reply.status_code, reply.headers["HX-Redirect"]) == (401, "/login?next=%2Frollouts%2F1")
    assert reply.content == b""  # nothing for htmx to swap in


def test_a_resume_clears_a_pause_not_yet_taken_and_bad_searches_are_bad_input(site: Site) -> None:
    rollout_id = _rollout(site)
    operate = site.bearer("operate")
    site.client.post(f"/api/v1/rollouts/{rollout_id}/pause", headers=operate)
    assert site.world.store.get_rollout(rollout_id).requested == "pause"
    from amiforge.lifecycle.rollout import reopen

    assert reopen(rollout_id, store=site.world.store, settings=site.world.settings).requested is None
    site.log_in("read")
    assert site.client.get("/", params={"search": "a\x00b"}).status_code == 400
    assert site.client.get("/api/v1/versions", params={"search": "a\x00b"}, headers=operate).status_code == 422
    page = site.client.get("/versions/web@1").text
    assert "web@1 is a first version: it has no parent to compare with" in page


def test_a_long_ancestry_names_the_nearest_ancestors_and_says_there_are_more(site: Site) -> None:
    parent = None
    for _ in range(23):
        parent = site.world.seed(parent=parent).ref
    doc = site.client.get("/api/v1/versions/web@23", headers=site.bearer("read")).json()
    assert doc["ancestry"] == [f"web@{n}" for n in range(22, 2, -1)] and doc["more_ancestors"] is True
    middle = site.client.get("/api/v1/versions/web@5", headers=site.bearer("read")).json()
    assert (middle["ancestry"], middle["more_ancestors"], middle["children"]) == (
        ["web@4", "web@3", "web@2", "web@1"], False, ["web@6"])  # fmt: skip


def test_behind_a_proxy_forms_are_judged_by_the_public_origin(site: Site) -> None:
    site.client.app.state.public_origin = public_origin("https://Amiforge.example/")  # type: ignore[attr-defined]
    assert site.client.app.state.public_origin == "https://amiforge.example"  # type: ignore[attr-defined]
    form = {"token": site.secrets["read"], "next": "/"}
    through_proxy = site.client.post("/login", data=form, headers={"Origin": "https://amiforge.example"},
                                     follow_redirects=False)  # fmt: skip
    assert through_proxy.status_code == 303
    direct = site.client.post("/login", data=form, headers={"Origin": "http://127.0.0.1:9464"})
    assert direct.status_code == 403 and "--public-url" in direct.text
    for bad in ("amiforge.example", "ftp://amiforge.example", "https://amiforge.example/console", "https://"):
        with pytest.raises(ConfigError, match="--public-url"):
            public_origin(bad)


def test_admins_revoke_signing_keys_and_everyone_reads_them(site: Site) -> None:
    [key] = site.client.get("/api/v1/keys", headers=site.bearer("read")).json()
    assert key["revoked_at"] is None
    path = f"/api/v1/keys/{key['key_id']}/revoke"
    assert site.client.post(path, json={"reason": "x"}, headers=site.bearer("operate")).status_code == 403
    reply = site.client.post(path, json={"reason": "leaked"}, headers=site.bearer("admin"))
    assert reply.status_code == 200 and reply.json()["revoked_reason"] == "leaked"
    [event] = [e for e in site.world.store.events() if e.kind == "key.revoked"]
    assert event.actor == "token:t-admin"


def test_the_retirement_page_and_api_show_the_plan_and_change_nothing(
    site: Site, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The plan under the server's policy (the built-in one: a revoked version is deprecated at once); with a
    provider that cannot say what uses its images, the region is blocked and the page says why."""
    import amiforge.providers
    from amiforge.providers.local.provider import LocalProvider

    store = site.world.store
    v = store.create_version(name="gone", recipe_digest="r" * 64, recipe_path="/r.yaml", provider="local", tags={},
                             parent=None)  # fmt: skip
    store.add_artifact(v.id, Artifact("local", site.world.settings.region, "/nowhere/gone.qcow2", "d" * 64, 1))
    store.transition(v.id, Status.BUILT, expect=Status.BAKING, digest="d" * 64, size_bytes=1)
    store.transition(v.id, Status.REVOKED, expect=Status.BUILT)
    monkeypatch.setattr(amiforge.providers, "PROVIDERS", {"local": LocalProvider})
    before = site.state()
    assert site.client.get("/api/v1/retirement", headers=site.bearer("read")).status_code == 403
    answer = site.client.get("/api/v1/retirement", headers=site.bearer("operate"))
    assert answer.status_code == 200
    steps = {s["version"]: (s["action"], s["why"]) for v in answer.json()["versions"] for s in v["steps"]}
    assert steps["gone@1"] == ("deprecate", "revoked (the image is already gone)")
    page = site.client.get("/retirement", headers=site.bearer("operate"))
    assert page.status_code == 200 and "gone@1" in page.text and "revoked (the image is already gone)" in page.text
    assert site.state() == before and not store.retirements()
    blind = {"local": lambda settings: object()}  # a provider without the Retirer protocol
    monkeypatch.setattr(amiforge.providers, "PROVIDERS", blind)
    page = site.client.get("/retirement", headers=site.bearer("operate"))
    assert "local provider could not be read (the local provider cannot say what uses its images)" in page.text
    assert "1 blocked" in page.text
