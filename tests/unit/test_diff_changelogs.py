"""`images diff`: per upgraded package, the CVE ids its changelog names between the two versions, beside the
database's view of each (fixed / introduced / still open / not in the database), and the CLI's table and --json.

The registry and command tests use a real SQLite registry. Package names are real; every CVE id is synthetic
(CVE-2999-NNNN: no such CVE exists), and so is the DSA-style id (DSA-9999-1).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from datetime import UTC, datetime
from pathlib import Path

import pytest

from amiforge.lifecycle.diff import (
    ChangelogCve,
    ChangelogState,
    DbView,
    UpgradeFixes,
    VersionDiff,
    diff,
    diff_scans,
)
from amiforge.model import ChangelogEntry, Finding, FindingKind, ImageVersion, Package, ScanRecord, Severity, Status
from amiforge.scanners.sbom import sbom_digest
from amiforge.settings import load_settings
from amiforge.store.interface import Store
from amiforge.store.sql import SqlStore, open_store
from tests.cli_harness import Cli, isolate, make_cli

T0 = datetime(2026, 1, 2, 3, 4, 5, tzinfo=UTC)

OLD_PACKAGES = (
    Package("bash", "5.2.15-2+b2", "amd64", source="bash", source_version="5.2.15-2"),
    Package("curl", "7.88.1-10+deb12u5", "amd64"),
    # gcc-defaults builds cpp with a version of its own: the source's (1.203) is what its changelog lists.
    Package("cpp", "4:12.2.0-3", "amd64", source="gcc-defaults", source_version="1.203"),
    Package("libssl3", "3.0.11-1~deb12u2", "amd64", source="openssl"),
    Package("openssl", "3.0.11-1~deb12u2", "amd64"),
    Package("zlib1g", "1:1.2.13.dfsg-1", "amd64", source="zlib"),
)
NEW_PACKAGES = (
    Package("bash", "5.2.15-2+b7", "amd64", source="bash", source_version="5.2.15-2"),  # a binNMU: same source
    Package("cpp", "4:12.2.0-3", "amd64", source="gcc-defaults", source_version="1.204"),  # same binary version
    Package("libssl3", "3.0.13-1~deb12u1", "amd64", source="openssl"),
    Package("nano", "7.2-1", "amd64"),
    Package("openssl", "3.0.13-1~deb12u1", "amd64"),
    Package("zlib1g", "1:1.2.13.dfsg-1+deb12u1", "amd64", source="zlib"),
)
Changelogs = Mapping[str, tuple[ChangelogEntry, ...]]
# What the newer image's changelogs name (newest first). Synthetic CVE ids.
CHANGELOGS: Changelogs = {
    "openssl": (
        ChangelogEntry("3.0.13-1~deb12u1", ("CVE-2999-0001", "CVE-2999-0002")),
        ChangelogEntry("3.0.12-1~deb12u1", ("CVE-2999-0003", "CVE-2999-0004", "CVE-2999-0001")),
        ChangelogEntry("3.0.11-1~deb12u2", ("CVE-2999-0010",)),  # the old version: already in the older image
    ),
    "bash": (ChangelogEntry("5.2.15-2", ("CVE-2999-0020",)),),
    "gcc-defaults": (),  # read, names no CVE
    # zlib: no changelog in the image
}


def cve(cve_id: str, package: str, installed: str, *, aliases: tuple[str, ...] = ()) -> Finding:
    return Finding(FindingKind.CVE, cve_id, Severity.HIGH, "synthetic", "osv", package=package, installed=installed,
                   aliases=aliases)  # fmt: skip


OLD_FINDINGS = (
    cve("CVE-2999-0001", "libssl3", "3.0.11-1~deb12u2"),  # gone in the newer scan: fixed
    cve("CVE-2999-0003", "libssl3", "3.0.11-1~deb12u2"),  # in both: still open
    cve("DSA-9999-1", "libssl3", "3.0.11-1~deb12u2", aliases=("CVE-2999-0004",)),  # by alias: fixed
    cve("CVE-2999-0099", "curl", "7.88.1-10+deb12u5"),  # removed package: the old cves_fixed, not a changelog's
)
NEW_FINDINGS = (
    cve("CVE-2999-0002", "libssl3", "3.0.13-1~deb12u1"),  # only in the newer scan: introduced
    cve("CVE-2999-0003", "libssl3", "3.0.13-1~deb12u1"),
)


def scan(packages: tuple[Package, ...], findings: tuple[Finding, ...], changelogs: Changelogs) -> ScanRecord:
    return ScanRecord(T0, packages, "{}", sbom_digest("{}"), findings, "TEST", changelogs=changelogs)


def version(number: int) -> ImageVersion:
    return ImageVersion(id=number, name="web", number=number, status=Status.SCANNED, recipe_digest="r" * 64,
                        recipe_path="/r.yaml", provider="local", created_at=T0, updated_at=T0,
                        digest=f"{number:064x}", size_bytes=1000 * number)  # fmt: skip


OLD_SCAN = scan(OLD_PACKAGES, OLD_FINDINGS, {"openssl": CHANGELOGS["openssl"][2:]})
NEW_SCAN = scan(NEW_PACKAGES, NEW_FINDINGS, CHANGELOGS)
# As a scan made before changelogs were read (or of an image with no /usr/share/doc) records them.
NO_CHANGELOGS_OLD = dataclasses.replace(OLD_SCAN, changelogs={})
NO_CHANGELOGS_NEW = dataclasses.replace(NEW_SCAN, changelogs={})


def upgrade(d: VersionDiff, name: str) -> UpgradeFixes:
    [found] = [u for u in d.upgrades if u.name == name]
    return found


EXPECTED_UPGRADES = (
    UpgradeFixes("bash", "amd64", "bash", "5.2.15-2+b2", "5.2.15-2+b7", ChangelogState.READ, ()),
    UpgradeFixes("libssl3", "amd64", "openssl", "3.0.11-1~deb12u2", "3.0.13-1~deb12u1", ChangelogState.READ, (
        ChangelogCve("CVE-2999-0001", DbView.FIXED),
        ChangelogCve("CVE-2999-0002", DbView.INTRODUCED),
        ChangelogCve("CVE-2999-0003", DbView.STILL_OPEN),
        ChangelogCve("CVE-2999-0004", DbView.FIXED),
    )),
    # The findings name libssl3, not the openssl binary: for this package the database knows none of them.
    UpgradeFixes("openssl", "amd64", "openssl", "3.0.11-1~deb12u2", "3.0.13-1~deb12u1", ChangelogState.READ, (
        ChangelogCve("CVE-2999-0001", DbView.NOT_IN_DATABASE),
        ChangelogCve("CVE-2999-0002", DbView.NOT_IN_DATABASE),
        ChangelogCve("CVE-2999-0003", DbView.NOT_IN_DATABASE),
        ChangelogCve("CVE-2999-0004", DbView.NOT_IN_DATABASE),
    )),
    UpgradeFixes("zlib1g", "amd64", "zlib", "1:1.2.13.dfsg-1", "1:1.2.13.dfsg-1+deb12u1", ChangelogState.MISSING, ()),
)  # fmt: skip


def test_each_upgrade_lists_its_changelog_cves_with_the_database_view() -> None:
    d = diff_scans(version(1), version(2), OLD_SCAN, NEW_SCAN)
    assert d.changelogs_recorded is True
    assert d.upgrades == EXPECTED_UPGRADES
    # cpp's binary version did not change (only its source's): not an upgrade, whatever its changelog says.
    assert [p.name for p in d.packages] == ["bash", "curl", "libssl3", "nano", "openssl", "zlib1g"]
    assert [p.change for p in d.packages] == ["upgraded", "removed", "upgraded", "added", "upgraded", "upgraded"]


def test_db_view_states() -> None:
    assert {c.id: c.db for c in upgrade(diff_scans(version(1), version(2), OLD_SCAN, NEW_SCAN), "libssl3").cves} == {
        "CVE-2999-0001": DbView.FIXED,  # a finding in A, none in B
        "CVE-2999-0002": DbView.INTRODUCED,  # only in B
        "CVE-2999-0003": DbView.STILL_OPEN,  # in both
        "CVE-2999-0004": DbView.FIXED,  # A's finding is DSA-9999-1, naming it among its aliases
    }
    assert [v.label for v in DbView] == ["fixed", "introduced", "still open", "not in the database"]


def test_the_range_is_the_source_versions() -> None:
    # bash's binNMU (+b2 -> +b7) rebuilt the same source: the changelog's 5.2.15-2 entry is not in the range.
    assert upgrade(diff_scans(version(1), version(2), OLD_SCAN, NEW_SCAN), "bash").cves == ()
    # A binary versioned apart from its source: the source's versions bound the range, not 4:12.2.0-x.
    old = (Package("cpp", "4:12.2.0-3", "amd64", source="gcc-defaults", source_version="1.203"),)
    new = (Package("cpp", "4:12.2.0-4", "amd64", source="gcc-defaults", source_version="1.204"),)
    entries = {
        "gcc-defaults": (ChangelogEntry("1.204", ("CVE-2999-0030",)), ChangelogEntry("1.203", ("CVE-2999-0031",)))
    }
    d = diff_scans(version(1), version(2), scan(old, (), {}), scan(new, (), entries))
    assert upgrade(d, "cpp").cves == (ChangelogCve("CVE-2999-0030", DbView.NOT_IN_DATABASE),)


def test_a_newer_scan_without_changelogs_says_so_instead_of_none() -> None:
    assert OLD_SCAN.changelogs  # the older scan's changelogs say nothing of what the newer image fixed
    d = diff_scans(version(1), version(2), OLD_SCAN, NO_CHANGELOGS_NEW)
    assert d.changelogs_recorded is False
    assert [(u.name, u.changelog, u.cves) for u in d.upgrades] == [
        ("bash", ChangelogState.NOT_RECORDED, ()),
        ("libssl3", ChangelogState.NOT_RECORDED, ()),
        ("openssl", ChangelogState.NOT_RECORDED, ()),
        ("zlib1g", ChangelogState.NOT_RECORDED, ()),
    ]


# --- through the registry ------------------------------------------------------------------------------------------


def seed(store: Store, old: ScanRecord, new: ScanRecord) -> tuple[str, str]:
    """web@1 and web@2, scanned as `old` and `new`; their refs."""
    refs = []
    for number, record in ((1, old), (2, new)):
        v = store.create_version(name="web", recipe_digest="r" * 64, recipe_path="/r.yaml", provider="local", tags={},
                                 parent=None)  # fmt: skip
        store.transition(v.id, Status.BUILT, expect=Status.BAKING, digest=f"{number:064x}", size_bytes=1000 * number)
        store.add_scan(v.id, record)
        refs.append(v.ref)
    return refs[0], refs[1]


@pytest.fixture
def store(tmp_path: Path) -> SqlStore:
    return open_store(f"sqlite:///{tmp_path / 'state' / 'registry.db'}")


def test_a_scan_made_before_changelogs_were_read_diffs_as_not_recorded(store: SqlStore) -> None:
    old, new = seed(store, NO_CHANGELOGS_OLD, NO_CHANGELOGS_NEW)
    d = diff(old, new, store=store)
    assert d.changelogs_recorded is False
    assert {u.name: u.changelog for u in d.upgrades} == dict.fromkeys(
        ["bash", "libssl3", "openssl", "zlib1g"], ChangelogState.NOT_RECORDED
    )
    # What diff said before stays as it was.
    assert [f.key for f in d.cves_fixed] == ["CVE-2999-0001:libssl3", "CVE-2999-0099:curl", "DSA-9999-1:libssl3"]
    assert [f.key for f in d.cves_introduced] == ["CVE-2999-0002:libssl3"]
    assert d.size_delta == 1000


def test_changelogs_stored_with_the_scans_reach_the_diff(store: SqlStore) -> None:
    old, new = seed(store, OLD_SCAN, NEW_SCAN)
    latest = store.latest_scan(store.get_version(new).id)
    assert latest is not None and latest.changelogs == CHANGELOGS
    d = diff(old, new, store=store)
    assert d.changelogs_recorded is True
    assert d.upgrades == EXPECTED_UPGRADES


# --- the command ----------------------------------------------------------------------------------------------------


@pytest.fixture
def cli(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> Cli:
    isolate(tmp_path, monkeypatch)
    return make_cli(monkeypatch, capsys)


def registry() -> SqlStore:
    return open_store(load_settings().registry_url)


EXPECTED_JSON_UPGRADES = [
    {"name": "bash", "arch": "amd64", "source": "bash", "old": "5.2.15-2+b2", "new": "5.2.15-2+b7",
     "changelog": "read", "cves": []},
    {"name": "libssl3", "arch": "amd64", "source": "openssl", "old": "3.0.11-1~deb12u2", "new": "3.0.13-1~deb12u1",
     "changelog": "read", "cves": [
         {"id": "CVE-2999-0001", "db": "fixed"},
         {"id": "CVE-2999-0002", "db": "introduced"},
         {"id": "CVE-2999-0003", "db": "still-open"},
         {"id": "CVE-2999-0004", "db": "fixed"},
     ]},
    {"name": "openssl", "arch": "amd64", "source": "openssl", "old": "3.0.11-1~deb12u2", "new": "3.0.13-1~deb12u1",
     "changelog": "read", "cves": [{"id": f"CVE-2999-000{n}", "db": "not-in-database"} for n in (1, 2, 3, 4)]},
    {"name": "zlib1g", "arch": "amd64", "source": "zlib", "old": "1:1.2.13.dfsg-1", "new": "1:1.2.13.dfsg-1+deb12u1",
     "changelog": "missing", "cves": []},
]  # fmt: skip


def test_cli_diff_json_and_table_show_the_changelog_cves(cli: Cli) -> None:
    with registry() as store:
        old, new = seed(store, OLD_SCAN, NEW_SCAN)
    r = cli("images", "diff", old, new, "--json")
    assert r.code == 0, r.err
    data = r.json()
    assert data["upgrades"] == EXPECTED_JSON_UPGRADES
    assert data["changelogs_recorded"] is True
    assert (data["old"], data["new"], data["size_delta"]) == ("web@1", "web@2", 1000)
    assert [c["id"] for c in data["cves_introduced"]] == ["CVE-2999-0002"]

    r = cli("images", "diff", old, new)
    assert r.code == 0, r.err
    lines = r.out.splitlines()
    assert "what the upgrades fixed, by their changelogs" in r.out

    def line_with(*parts: str) -> str:
        [found] = [line for line in lines if all(p in line for p in parts)]
        return found

    # One row per upgrade; a CVE and its view of the database on one line.
    line_with("libssl3:amd64", "3.0.11-1~deb12u2 → 3.0.13-1~deb12u1", "CVE-2999-0001", "fixed")
    line_with("CVE-2999-0002", "introduced")
    line_with("CVE-2999-0003", "still open")
    line_with("bash:amd64", "none named")
    line_with("zlib1g:amd64", "no changelog in the image")
    assert "removed    curl:amd64 7.88.1-10+deb12u5 →" in r.out  # the other changes, as before
    assert "upgraded   libssl3" not in r.out  # upgrades are in the table, once


def test_cli_diff_says_when_the_newer_scan_recorded_no_changelogs(cli: Cli) -> None:
    with registry() as store:
        old, new = seed(store, NO_CHANGELOGS_OLD, NO_CHANGELOGS_NEW)
    data = cli("images", "diff", old, new, "--json").json()
    assert data["changelogs_recorded"] is False
    assert [(u["name"], u["changelog"], u["cves"]) for u in data["upgrades"]] == [
        ("bash", "not-recorded", []),
        ("libssl3", "not-recorded", []),
        ("openssl", "not-recorded", []),
        ("zlib1g", "not-recorded", []),
    ]
    r = cli("images", "diff", old, new)
    assert r.code == 0, r.err
    assert "the scan of web@2 recorded no changelogs" in " ".join(r.out.split())
    assert "none named" not in r.out
    assert r.out.count("not recorded") == 4
