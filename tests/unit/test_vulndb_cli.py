"""vulndb update / status / export-bundle / --offline-bundle and rescan, through the CLI in-process, against a real
HTTP server on 127.0.0.1 serving each source in its publisher's format, and a real SQLite registry.

Every record here is synthetic: TEST-… advisory ids and CVE-2999-… CVE ids (no such year), for real Debian package
names (`openssl`, `zlib`) so the records read as the real formats do.
"""

from __future__ import annotations

import http.server
import io
import json
import os
import threading
import zipfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from test_supply_cli import Image, fake_image, registry, seed

from tests.cli_harness import Cli, make_cli

# openssl 3.0.15-1~deb12u1 (source openssl) as libssl3 and openssl; zlib as zlib1g.
DPKG = """\
Package: libssl3
Status: install ok installed
Architecture: amd64
Source: openssl
Version: 3.0.15-1~deb12u1

Package: openssl
Status: install ok installed
Architecture: amd64
Version: 3.0.15-1~deb12u1

Package: zlib1g
Status: install ok installed
Architecture: amd64
Source: zlib (1:1.2.13.dfsg-1)
Version: 1:1.2.13.dfsg-1

"""


def osv_record(cve: str, package: str, fixed: str | None) -> dict[str, Any]:
    events: list[dict[str, str]] = [{"introduced": "0"}] + ([{"fixed": fixed}] if fixed else [])
    return {
        "id": cve,
        "modified": "2026-11-30T00:00:00Z",
        "summary": f"{cve}: synthetic flaw in {package}",
        "affected": [{"package": {"ecosystem": "Debian:12", "name": package},
                      "ranges": [{"type": "ECOSYSTEM", "events": events}]}],
    }  # fmt: skip


def osv_zip(records: list[dict[str, Any]]) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as z:
        for r in records:
            z.writestr(f"{r['id']}.json", json.dumps(r))
    return buf.getvalue()


def tracker(entries: dict[str, dict[str, dict[str, Any]]]) -> bytes:
    """package -> CVE -> bookworm's release entry, in the tracker's export shape."""
    return json.dumps(
        {
            pkg: {cve: {"description": "synthetic", "releases": {"bookworm": rel}} for cve, rel in cves.items()}
            for pkg, cves in entries.items()
        }
    ).encode()


def nvd_page(scores: dict[str, str]) -> bytes:
    """One NVD API 2.0 page: CVE -> a CVSS 3.1 vector from NVD (Primary)."""
    vulns = [
        {"cve": {"id": cve, "metrics": {"cvssMetricV31": [
            {"source": "nvd@nist.gov", "type": "Primary", "cvssData": {"version": "3.1", "vectorString": vector}}]}}}
        for cve, vector in scores.items()
    ]  # fmt: skip
    return json.dumps({"resultsPerPage": len(vulns), "startIndex": 0, "totalResults": len(vulns),
                       "format": "NVD_CVE", "version": "2.0", "vulnerabilities": vulns}).encode()  # fmt: skip


CRITICAL = "CVSS:3.1/AV:N/AC:L/PR:N/UI:N/S:U/C:H/I:H/A:H"  # 9.8
LOW = "CVSS:3.1/AV:L/AC:H/PR:H/UI:R/S:U/C:L/I:N/A:N"  # 1.8


class Mirror:
    """A loopback HTTP server: path -> (status, body, extra headers); a body can be cut short on purpose."""

    def __init__(self) -> None:
        self.files: dict[str, tuple[int, bytes, dict[str, str]]] = {}
        self.seen: list[tuple[str, dict[str, str]]] = []  # (path, headers) of every request
        mirror = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                mirror.seen.append((self.path, {k.lower(): v for k, v in self.headers.items()}))
                status, body, headers = mirror.files.get(self.path.split("?")[0], (404, b"no such file", {}))
                self.send_response(status)
                self.send_header("Content-Length", headers.pop("X-Claim-Length", str(len(body))))
                for k, v in headers.items():
                    self.send_header(k, v)
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *_: object) -> None:
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.server.server_address[1]}{path}"

    def serve(self, osv: bytes, debian: bytes, cve: bytes) -> list[str]:
        self.files = {"/osv/all.zip": (200, osv, {}), "/tracker/json": (200, debian, {}), "/nvd": (200, cve, {})}
        return ["--url", f"osv={self.url('/osv/all.zip')}", "--url", f"debian={self.url('/tracker/json')}",
                "--url", f"cve={self.url('/nvd')}"]  # fmt: skip


@pytest.fixture
def mirror() -> Iterator[Mirror]:
    m = Mirror()
    yield m
    m.server.shutdown()
    m.server.server_close()


@pytest.fixture
def image(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Image:
    return fake_image(tmp_path, monkeypatch, DPKG)


@pytest.fixture
def cli(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> Cli:
    for key in ("AMIFORGE_STORE_URL", "AMIFORGE_CONFIG", "AMIFORGE_POLICY", "AMIFORGE_NVD_API_KEY"):
        monkeypatch.delenv(key, raising=False)
    monkeypatch.setenv("AMIFORGE_DATA_DIR", str(tmp_path / "data"))
    monkeypatch.chdir(tmp_path)
    return make_cli(monkeypatch, capsys)


def _data(first: bool = True) -> tuple[bytes, bytes, bytes]:
    """A day's data: openssl has a low CVE Debian postponed, a high one, and one Debian says is unimportant."""
    osv = osv_zip([osv_record("CVE-2999-0001", "openssl", "3.0.16-1~deb12u1"),
                   osv_record("CVE-2999-0002", "openssl", None),
                   osv_record("CVE-2999-0003", "openssl", None)]
                  + ([] if first else [osv_record("CVE-2999-0004", "zlib", "1:1.2.13.dfsg-2")]))  # fmt: skip
    debian = tracker({"openssl": {
        "CVE-2999-0001": {"status": "resolved", "fixed_version": "3.0.16-1~deb12u1", "urgency": "high"},
        "CVE-2999-0002": {"status": "open", "urgency": "low", "nodsa": "Minor issue", "nodsa_reason": "postponed"},
        "CVE-2999-0003": {"status": "open", "urgency": "unimportant"}}})  # fmt: skip
    cve = nvd_page({"CVE-2999-0001": LOW, "CVE-2999-0003": CRITICAL, "CVE-2999-0004": CRITICAL})
    return osv, debian, cve


def test_update_downloads_every_source_and_a_scan_rates_each_finding_with_its_source(
    cli: Cli, mirror: Mirror, image: Image
) -> None:
    urls = mirror.serve(*_data())
    r = cli("vulndb", "update", *urls, "--json")
    assert r.code == 0, r.out + r.err
    doc = r.json()
    assert doc["failed"] == []
    assert {s["name"]: s["state"]["count"] for s in doc["sources"]} == {"osv": 3, "debian": 3, "cve": 3}
    status = {s["name"]: s for s in cli("vulndb", "status", "--json").json()["sources"]}
    assert all(0 <= status[n]["age_days"] < 0.01 for n in ("osv", "debian", "cve"))
    assert status["debian"]["state"]["origin"] == mirror.url("/tracker/json")

    seed(image)
    scan = cli("scan", "web@1", "--json")
    assert scan.code == 0, scan.err
    found = {(f["id"], f["package"]): f for f in scan.json()["findings"]}
    assert sorted(found) == [(c, p) for c in ("CVE-2999-0001", "CVE-2999-0002", "CVE-2999-0003")
                             for p in ("libssl3", "openssl")]  # fmt: skip
    high = found[("CVE-2999-0001", "openssl")]
    assert (high["severity"], high["severity_source"], high["fixed"]) == ("high", "debian", "3.0.16-1~deb12u1")
    assert high["cvss"] == {"version": "3.1", "vector": LOW, "score": 1.8, "severity": "low", "source": "nvd"}
    postponed = found[("CVE-2999-0002", "openssl")]
    assert (postponed["severity"], postponed["debian"]["no_dsa"], postponed["debian"]["minor"]) == (
        "low", "postponed", True)  # fmt: skip
    unimportant = found[("CVE-2999-0003", "openssl")]
    assert (unimportant["severity"], unimportant["severity_source"]) == ("negligible", "debian")
    assert unimportant["cvss"]["severity"] == "critical"  # shown beside it, not chosen by default
    text = cli("scan", "web@1")
    assert "high (debian)" in text.out and "(Debian: minor)" in text.out
    shown = cli("images", "show", "web@1", "--json").json()["scan"]
    assert {(f["id"], f["package"], f["severity_source"]) for f in shown["cves"]} == {
        (f["id"], f["package"], f["severity_source"]) for f in found.values()
    }
    assert set(shown["vulndb_as_of"]) == {"osv", "debian", "cve"}
    assert "CVE severities from: debian 6;" in cli("images", "show", "web@1").out


def test_the_nvd_api_key_comes_from_the_settings_and_reaches_nvd_only(
    cli: Cli, mirror: Mirror, monkeypatch: pytest.MonkeyPatch
) -> None:
    urls = mirror.serve(*_data())
    monkeypatch.setenv("AMIFORGE_NVD_API_KEY", "00000000-0000-4000-8000-00000000test")
    assert cli("vulndb", "update", *urls).code == 0
    keys = {path.split("?")[0]: headers.get("apikey") for path, headers in mirror.seen}
    assert keys == {"/osv/all.zip": None, "/tracker/json": None, "/nvd": "00000000-0000-4000-8000-00000000test"}


def test_a_failed_update_keeps_the_previous_data_and_exits_3(cli: Cli, mirror: Mirror) -> None:
    urls = mirror.serve(*_data())
    assert cli("vulndb", "update", *urls).code == 0
    before = {s["name"]: s["state"] for s in cli("vulndb", "status", "--json").json()["sources"]}

    osv = _data(first=False)[0]
    mirror.files["/osv/all.zip"] = (200, osv[: len(osv) // 2], {"X-Claim-Length": str(len(osv))})  # cut short
    mirror.files["/tracker/json"] = (200, b"[]", {})  # the format changed under us
    r = cli("vulndb", "update", *urls, "--json")
    assert r.code == 3
    doc = r.json()
    assert doc["failed"] == ["osv", "debian"]
    errors = {s["name"]: s["error"] for s in doc["sources"]}
    assert errors["cve"] is None
    assert "was cut short: " in errors["osv"] and " bytes the server announced arrived" in errors["osv"]
    assert errors["debian"].endswith("expected a JSON object at the top, found a JSON array")
    after = {s["name"]: s["state"] for s in cli("vulndb", "status", "--json").json()["sources"]}
    assert after["osv"] == before["osv"] and after["debian"] == before["debian"]
    assert after["cve"]["imported_at"] != before["cve"]["imported_at"]  # the one that worked moved on
    text = cli("vulndb", "update", *urls)
    assert text.code == 3 and "osv: update failed, the previous data stays" in text.out
    with registry() as store:
        assert [e.data["source"] for e in store.events() if e.kind == "vulndb.update_failed"][:2] == ["osv", "debian"]


def test_an_offline_bundle_carries_every_source_with_its_age(
    cli: Cli, mirror: Mirror, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    urls = mirror.serve(*_data())
    assert cli("vulndb", "update", *urls).code == 0
    online = {s["name"]: s["state"] for s in cli("vulndb", "status", "--json").json()["sources"]}
    bundle = tmp_path / "vulndb.zip"
    exported = cli("vulndb", "export-bundle", str(bundle), "--json")
    assert exported.code == 0, exported.err
    assert sorted(exported.json()["sources"]) == ["cve", "debian", "osv"]

    monkeypatch.setenv("AMIFORGE_DATA_DIR", str(tmp_path / "air-gapped"))
    r = cli("vulndb", "update", "--offline-bundle", str(bundle), "--json")
    assert r.code == 0, r.out + r.err
    offline = {s["name"]: s["state"] for s in cli("vulndb", "status", "--json").json()["sources"]}
    for name in ("osv", "debian", "cve"):
        assert offline[name]["count"] == online[name]["count"]
        assert offline[name]["as_of"] == online[name]["as_of"]  # the age of the data, not of the copy
        assert offline[name]["origin"] == f"bundle vulndb.zip (from {online[name]['origin']})"

    # A bundle altered after export is refused whole, naming the file that does not check out.
    with zipfile.ZipFile(bundle) as z:
        members = {i.filename: z.read(i) for i in z.infolist()}
    listed = exported.json()["sources"]["debian"]["file"]
    members[listed["path"]] = members[listed["path"]].replace(b"unimportant", b"high       ")
    with zipfile.ZipFile(bundle, "w") as z:
        for name, data in members.items():
            z.writestr(name, data)
    bad = cli("vulndb", "update", "--offline-bundle", str(bundle), "--json")
    assert bad.code == 2
    assert [p["field"] for p in bad.json()["problems"]] == ["sources.debian.file.sha256"]


def test_rescan_flags_a_channel_whose_version_now_fails_its_gate(
    cli: Cli, mirror: Mirror, image: Image, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    policy = tmp_path / "policy.yaml"
    policy.write_text("channels:\n  dev: {max_cve_severity: medium}\n")
    monkeypatch.setenv("AMIFORGE_POLICY", str(policy))
    urls = mirror.serve(*_data())
    assert cli("vulndb", "update", *urls).code == 0
    assert cli("keys", "generate").code == 0
    seed(image)
    assert cli("scan", "web@1").code == 4  # the high openssl CVE fails dev (max medium) …
    policy.write_text(
        "channels:\n  dev: {max_cve_severity: medium}\nwaivers:\n  - {finding: CVE-2999-0001, reason: synthetic, "
        "by: tester, expires: 2999-01-01}\n"
    )
    assert cli("scan", "web@1").code == 0  # … until it is waived
    assert cli("sign", "web@1").code == 0
    promoted = cli("promote", "web@1", "--channel", "dev", "--json")
    assert promoted.code == 0, promoted.out

    quiet = cli("rescan", "--json")
    assert quiet.code == 0, quiet.out + quiet.err
    (same,) = quiet.json()["versions"]
    assert (same["version"], same["new"], same["gone"], same["channels"][0]["changed"]) == ("web@1", [], [], False)

    # Tomorrow's data: a critical zlib CVE (CVSS; Debian has not rated it).
    mirror.serve(*_data(first=False))
    assert cli("vulndb", "update", *urls).code == 0
    r = cli("rescan", "--json")
    assert r.code == 4
    (version,) = r.json()["versions"]
    assert [(f["id"], f["package"], f["severity"], f["severity_source"]) for f in version["new"]] == [
        ("CVE-2999-0004", "zlib1g", "critical", "cvss")
    ]
    (channel,) = version["channels"]
    assert (channel["channel"], channel["passed_before"], channel["passed"], channel["changed"]) == (
        "dev", True, False, True)  # fmt: skip
    assert r.json()["flagged"] == [{"version": "web@1", "channel": "dev"}]
    with registry() as store:
        flagged = [e for e in store.events("web@1") if e.kind == "rescan.flagged"]
        assert [(e.data["channel"], e.data["newly"]) for e in flagged] == [("dev", True)]
        reasons = flagged[0].data["reasons"]
        assert isinstance(reasons, list) and any("CVE-2999-0004" in str(reason) for reason in reasons)
        latest = store.latest_scan(store.get_version("web@1").id)
        assert latest is not None and "CVE-2999-0004" in {f.id for f in latest.findings}
    # Flagged like a revocation: `channels` says so until a newer scan of the version.
    (pointer,) = cli("channels", "--json").json()
    (reason,) = reasons
    assert str(reason).startswith("cve CVE-2999-0004 in zlib1g: ")
    assert pointer["flags"] == [f"current web@1 fails dev's gate since a rescan: {reason}"]
    # The image is what was signed; only what is known about its packages changed: verify says both.
    verified = cli("verify", "web@1", "--json").json()
    assert (verified["ok"], verified["findings_now"]["cve:critical"]) == (True, 1)
    assert "cve:critical" not in verified["findings_signed"]
    text = cli("rescan")
    assert text.code == 4 and "gate dev: FAILS now (it failed before)" in text.out
    assert cli("scan", "web@1").code == 4  # a fresh scan of the image that still fails: the flag stays
    assert len(cli("channels", "--json").json()[0]["flags"]) == 1
    policy.write_text(
        "channels:\n  dev: {max_cve_severity: medium}\nwaivers:\n"
        + "".join(f"  - {{finding: {c}, reason: synthetic, by: tester, expires: 2999-01-01}}\n"
                  for c in ("CVE-2999-0001", "CVE-2999-0004"))
    )  # fmt: skip
    cleared = cli("rescan", "--json")
    assert cleared.code == 0 and cleared.json()["flagged"] == []
    assert cli("channels", "--json").json()[0]["flags"] == []  # judged again, and it passes


def test_update_and_import_refuse_unknown_sources_and_bad_urls(cli: Cli, tmp_path: Path) -> None:
    r = cli("vulndb", "update", "--source", "nvd", "--json")
    assert r.code == 2 and r.json()["problems"][0]["field"] == "--source"
    assert cli("vulndb", "update", "--url", "osv", "--json").code == 2
    r = cli("vulndb", "update", "--source", "osv", "--url", "osv=ftp://mirror.test/all.zip", "--json")
    assert r.code == 2 and "its scheme is 'ftp'" in r.json()["message"]
    with registry() as store:
        assert store.vulndb_sources() == []
    r = cli("vulndb", "import", str(tmp_path / "none.json"), "--source", "debian", "--json")
    assert r.code == 2 and "no debian data at" in r.json()["message"]


def _rewrite(bundle: Path, change: Any) -> None:
    """The bundle with its manifest changed by `change(manifest)` (as someone altering it would)."""
    with zipfile.ZipFile(bundle) as z:
        members = {i.filename: z.read(i) for i in z.infolist()}
    manifest = json.loads(members["manifest.json"])
    change(manifest)
    members["manifest.json"] = json.dumps(manifest).encode()
    with zipfile.ZipFile(bundle, "w") as z:
        for name, data in members.items():
            z.writestr(name, data)


def test_a_bundle_whose_manifest_lies_is_refused_whole_naming_each_field(
    cli: Cli, mirror: Mirror, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    urls = mirror.serve(*_data())
    assert cli("vulndb", "update", *urls).code == 0
    good = tmp_path / "good.zip"
    assert cli("vulndb", "export-bundle", str(good)).code == 0
    monkeypatch.setenv("AMIFORGE_DATA_DIR", str(tmp_path / "air-gapped"))
    cases: list[tuple[Any, list[str]]] = [
        # Data said to be fresher than the bundle (or tomorrow's): the gate would never call it stale.
        (lambda m: m["sources"]["osv"].update(as_of="2999-01-01T00:00:00+00:00"), ["sources.osv.as_of"]),
        (lambda m: m["sources"]["osv"].update(as_of="2026-01-01T00:00:00"), ["sources.osv.as_of"]),  # no zone
        (lambda m: m.update(created="2999-01-01T00:00:00+00:00"), ["created"]),
        (lambda m: m["sources"]["debian"].update(file=5), ["sources.debian.file.path"]),
        (lambda m: m["sources"]["debian"]["file"].update(path="../../etc/passwd"), ["sources.debian.file.path"]),
        (lambda m: m["sources"]["debian"]["file"].update(path="osv/advisories.json"), ["sources.debian.file.path"]),
        (lambda m: m["sources"]["cve"]["file"].update(size=1), ["sources.cve.file.size"]),
        (lambda m: m["sources"].update(nvd={}), ["sources.nvd"]),
    ]  # fmt: skip
    for i, (change, fields) in enumerate(cases):
        bundle = tmp_path / f"bundle-{i}.zip"
        bundle.write_bytes(good.read_bytes())
        _rewrite(bundle, change)
        r = cli("vulndb", "update", "--offline-bundle", str(bundle), "--json")
        assert r.code == 2, (i, r.out)
        assert sorted(p["field"] for p in r.json()["problems"]) == fields, i
    with registry() as store:
        assert store.vulndb_sources() == []  # nothing of any of them was imported
    assert cli("vulndb", "update", "--offline-bundle", str(tmp_path / "none.zip")).code == 2
    (tmp_path / "not-a-zip.zip").write_text("hello")
    assert (
        "cannot read the offline bundle"
        in cli("vulndb", "update", "--offline-bundle", str(tmp_path / "not-a-zip.zip"), "--json").json()["message"]
    )


def test_the_age_of_data_is_never_fresher_than_its_publisher_says(cli: Cli, mirror: Mirror, tmp_path: Path) -> None:
    urls = mirror.serve(*_data())
    # A mirror serving a tracker export from last month says so in Last-Modified: that is its age, not the fetch's.
    debian = _data()[1]
    mirror.files["/tracker/json"] = (200, debian, {"Last-Modified": "Tue, 03 Nov 2026 10:00:00 GMT"})
    assert cli("vulndb", "update", *urls).code == 0
    status = {s["name"]: s["state"] for s in cli("vulndb", "status", "--json").json()["sources"]}
    assert status["debian"]["as_of"].startswith("2026-11-03T10:00:00")
    # Merging one fresh advisory into month-old osv data leaves the source as old as its oldest part.
    old = tmp_path / "old"
    old.mkdir()
    (old / "TEST-2026-0100.json").write_text(json.dumps(osv_record("CVE-2999-0100", "zlib", None)))
    month_ago = 1_700_000_000  # 2023-11-14
    os.utime(old / "TEST-2026-0100.json", (month_ago, month_ago))
    assert cli("vulndb", "import", str(old)).code == 0
    fresh = tmp_path / "fresh"
    fresh.mkdir()
    (fresh / "TEST-2026-0101.json").write_text(json.dumps(osv_record("CVE-2999-0101", "zlib", None)))
    merged = cli("vulndb", "import", str(fresh), "--json").json()["source"]
    assert merged["as_of"].startswith("2023-11-14")
    assert merged["count"] == 5  # 3 from the update, and the two imported


def test_rescan_checks_every_target_before_it_writes_anything(cli: Cli, mirror: Mirror, image: Image) -> None:
    assert "nothing to rescan" in cli("rescan").out
    urls = mirror.serve(*_data())
    assert cli("vulndb", "update", *urls).code == 0
    seed(image)
    assert cli("scan", "web@1").code == 0
    seed(image)  # web@2: never scanned
    r = cli("rescan", "web@1", "web@2", "--json")
    assert r.code == 3 and "web@2 has never been scanned" in r.json()["message"]
    with registry() as store:
        assert [e.kind for e in store.events("web@1") if e.kind.startswith("rescan")] == []  # web@1 untouched
    assert cli("rescan", "web@1", "--json").json()["versions"][0]["version"] == "web@1"
