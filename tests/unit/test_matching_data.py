"""What a scan matches against, read from the registry (lifecycle/vulndb.MatchingData): the advisories parsed at
import and kept as ranges give exactly the findings of the records themselves (scanners/vulns.match); what was read
and rated is kept for the next version; a rescan leaves Python's cycle collector as it found it."""

from __future__ import annotations

import gc
import json
import random
from collections.abc import Iterator
from pathlib import Path

import pytest

from amiforge.errors import NotFound
from amiforge.lifecycle.rescan import rescan
from amiforge.lifecycle.vulndb import MatchingData, import_source
from amiforge.model import Package
from amiforge.scanners.vulns import load_osv, match
from amiforge.settings import Settings
from amiforge.store.sql import SqlStore, open_store

# Synthetic source packages and versions, with the shapes that matter: epochs, `~`, binNMUs, dpkg-equal spellings.
SOURCES = ["alpha", "beta", "gamma", "delta"]
VERSIONS = ["1.0-1", "1.0-2", "1:0.9-1", "1.1~rc1-1", "1.1-1", "1.01-1", "2.0-0", "2.0", "2.5-1+deb12u1", "3.0-1"]


def _record(rng: random.Random, n: int) -> dict[str, object]:
    """One synthetic OSV record: Debian:12, Debian:11 and bare Debian entries, ranges and listed versions."""
    affected = []
    for source in rng.sample(SOURCES, rng.randint(1, 2)):
        for ecosystem in rng.sample(["Debian:12", "Debian:11", "Debian"], rng.randint(1, 2)):
            entry: dict[str, object] = {"package": {"ecosystem": ecosystem, "name": source}}
            low, high = sorted(rng.sample(range(len(VERSIONS)), 2))
            events: list[dict[str, str]] = [{"introduced": rng.choice(["0", VERSIONS[low]])}]
            if rng.random() < 0.7:
                events.append({rng.choice(["fixed", "last_affected"]): VERSIONS[high]})
            if rng.random() < 0.8:
                entry["ranges"] = [{"type": "ECOSYSTEM", "events": events}]
            if rng.random() < 0.4 or "ranges" not in entry:
                entry["versions"] = rng.sample(VERSIONS, 3)
            if rng.random() < 0.5:
                entry["ecosystem_specific"] = {"urgency": rng.choice(["low", "medium", "high", "not yet assigned"])}
            affected.append(entry)
    record: dict[str, object] = {
        "id": f"TEST-{n:04d}",
        "modified": "2026-01-01T00:00:00Z",
        "summary": f"synthetic advisory {n}",
        "aliases": [f"CVE-2999-{n:04d}"],  # synthetic CVE ids
        "affected": affected,
    }
    if rng.random() < 0.1:
        record["withdrawn"] = "2026-02-01T00:00:00Z"
    return record


def _packages(rng: random.Random) -> list[Package]:
    packages = []
    for source in SOURCES:
        version = rng.choice(VERSIONS)
        packages.append(Package(source, version, "amd64", None, None))
        packages.append(Package(f"lib{source}1", f"{version}+b1", "amd64", source, version))  # a binNMU
        packages.append(Package(f"lib{source}1", f"{version}+b1", "i386", source, version))  # multiarch
    return packages


@pytest.fixture
def store(tmp_path: Path) -> Iterator[SqlStore]:
    with open_store(f"sqlite:///{tmp_path / 'registry.db'}") as opened:
        yield opened


@pytest.mark.parametrize("seed", range(6))
def test_the_ranges_kept_at_import_match_as_the_records_themselves(store: SqlStore, tmp_path: Path, seed: int) -> None:
    rng = random.Random(seed)
    folder = tmp_path / "osv"
    folder.mkdir()
    for n in range(40):
        (folder / f"TEST-{n:04d}.json").write_text(json.dumps(_record(rng, n)))
    import_source("osv", folder, store=store, actor="test")
    advisories = load_osv(folder)
    data = MatchingData(store)
    found_any = False
    for _ in range(8):  # versions sharing one MatchingData, as a rescan's do
        packages = _packages(rng)
        for release in ("12", "11"):
            expected = match(packages, advisories, release=release)
            assert data.matcher(SOURCES, release).match(packages) == expected
            found_any = found_any or bool(expected)
    assert found_any  # the data does match something: the comparison is not of two empty lists


def test_what_was_read_is_kept_and_a_wider_matcher_is_built_when_more_packages_are_asked(
    store: SqlStore, tmp_path: Path
) -> None:
    folder = tmp_path / "osv"
    folder.mkdir()
    rng = random.Random(7)
    for n in range(20):
        (folder / f"TEST-{n:04d}.json").write_text(json.dumps(_record(rng, n)))
    import_source("osv", folder, store=store, actor="test")
    data = MatchingData(store)
    first = data.matcher({"alpha"}, "12")
    assert data.matcher({"alpha"}, "12") is first  # kept
    wider = data.matcher({"alpha", "beta"}, "12")
    assert wider is not first and data.matcher({"beta"}, "12") is wider
    packages = [Package("libbeta1", "1.0-1", "amd64", "beta", None)]
    assert wider.match(packages) == match(packages, load_osv(folder), release="12")


def test_a_rescan_that_fails_leaves_the_cycle_collector_enabled(store: SqlStore, tmp_path: Path) -> None:
    assert gc.isenabled()
    with pytest.raises(NotFound):
        rescan(["nothing@1"], store=store, settings=Settings(data_dir=tmp_path / "data", actor="test"))
    assert gc.isenabled()
