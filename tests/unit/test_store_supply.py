"""The registry's supply-chain records: scans, advisories, keys, signatures, channel pointers (SQLite and,
when AMIFORGE_TEST_POSTGRES_URL is set, PostgreSQL)."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from datetime import UTC, datetime

import pytest
import sqlalchemy as sa

from amiforge.errors import NotFound, StateError
from amiforge.model import (
    AdvisoryHead,
    AdvisoryRange,
    Artifact,
    ChangelogEntry,
    CvssScore,
    DebianVerdict,
    Finding,
    FindingKind,
    Package,
    ScanRecord,
    Severity,
    SignatureRecord,
    Status,
    StoredAdvisory,
    TrustedKey,
    VulnDbSource,
)
from amiforge.scanners.sbom import sbom_digest
from amiforge.store.schema import advisories_table, advisory_ranges_table, sboms_table, scans_table
from amiforge.store.sql import SqlStore, open_store

T0 = datetime(2026, 1, 2, 3, 4, 5, tzinfo=UTC)


@pytest.fixture
def store(store_url: str) -> SqlStore:
    return open_store(store_url)


def _built(store: SqlStore, name: str = "web") -> int:
    v = store.create_version(name=name, recipe_digest="r" * 64, recipe_path="/r.yaml", provider="local", tags={},
                             parent=None)  # fmt: skip
    store.transition(v.id, Status.BUILT, expect=Status.BAKING, digest=f"{v.number:064x}", size_bytes=1)
    return v.id


def test_scan_round_trip_keeps_packages_and_findings(store: SqlStore) -> None:
    vid = _built(store)
    finding = Finding(FindingKind.CVE, "TEST-0001", Severity.HIGH, "synthetic", "osv", package="openssl",
                      installed="3.0.1-1", fixed="3.0.2-1", aliases=("TEST-CVE-1",))  # fmt: skip
    secret = Finding(FindingKind.SECRET, "private-key", Severity.CRITICAL, "key", "secrets", path="/root/k", line=1,
                     redacted="-----BEGIN …")  # fmt: skip
    scan = ScanRecord(T0, (Package("openssl", "3.0.1-1", "amd64", "openssl", None),), "{}", sbom_digest("{}"),
                      (finding, secret), "osv import 1")  # fmt: skip
    saved = store.add_scan(vid, scan)
    assert saved.id is not None
    latest = store.latest_scan(vid)
    assert latest is not None
    assert latest.findings == (finding, secret)
    assert latest.packages == scan.packages
    assert latest.scanned_at == T0
    assert store.latest_scan(_built(store, "api")) is None


def test_scans_of_the_same_packages_share_one_sbom_document_and_a_wrong_digest_is_refused(store: SqlStore) -> None:
    first, second = _built(store), _built(store, "api")
    sbom = '{"bomFormat": "CycloneDX", "components": []}'
    for vid in (first, first, second):
        store.add_scan(vid, ScanRecord(T0, (), sbom, sbom_digest(sbom), (), "TEST"))
    with store.engine.connect() as conn:
        assert conn.execute(sa.select(sa.func.count()).select_from(sboms_table)).scalar_one() == 1
        assert conn.execute(sa.select(scans_table.c.sbom)).scalars().all() == ["", "", ""]  # "": in sboms
    for vid in (first, second):
        latest = store.latest_scan(vid)
        assert latest is not None and latest.sbom == sbom
    with pytest.raises(StateError, match="does not have the sha256"):
        store.add_scan(first, ScanRecord(T0, (), "{}", "d" * 64, (), "TEST"))
    with pytest.raises(StateError, match="does not have the sha256"):  # a digest already stored, another text
        store.add_scan(first, ScanRecord(T0, (), "{}", sbom_digest(sbom), (), "TEST"))
    with store.engine.connect() as conn:
        assert len(conn.execute(sa.select(scans_table.c.id)).all()) == 3  # nothing recorded


def _advisory(aid: str, *packages: str, record: dict[str, object] | None = None, title: str = "",
              withdrawn: bool = False, ecosystem: str = "Debian:12") -> StoredAdvisory:  # fmt: skip
    head = AdvisoryHead(aid, title or f"{aid} title", (f"CVE-2999-{aid[-4:]}",), Severity.HIGH, withdrawn)
    ranges = tuple(AdvisoryRange(aid, ecosystem, p, "0", "2.0-1", None, ("1.0-1",) if p == "zlib" else (),
                                 Severity.LOW) for p in packages)  # fmt: skip
    return StoredAdvisory(aid, "2026-01-01T00:00:00Z", record or {"id": aid}, head, ranges)


def _found(store: SqlStore, *packages: str, ecosystems: tuple[str, ...] = ("Debian:12", "Debian")) -> list[str]:
    heads, ranges = store.advisory_ranges(packages, ecosystems)
    assert set(heads) == {r.advisory_id for r in ranges}
    return sorted({f"{r.advisory_id}:{r.package}" for r in ranges})


def test_advisories_are_found_by_source_package_and_replaced_on_reimport(store: SqlStore) -> None:
    first = store.import_advisories(
        "fixture-a",
        [_advisory("TEST-0001", "openssl", record={"id": "TEST-0001", "v": 1}),
         _advisory("TEST-0002", "zlib", "openssl")],
    )  # fmt: skip
    assert first.count == 2
    assert _found(store, "openssl") == ["TEST-0001:openssl", "TEST-0002:openssl"]
    assert _found(store, "zlib", "nginx") == ["TEST-0002:zlib"]
    heads, ranges = store.advisory_ranges(["zlib"], ["Debian:12"])
    assert heads == {"TEST-0002": AdvisoryHead("TEST-0002", "TEST-0002 title", ("CVE-2999-0002",), Severity.HIGH,
                                               False)}  # fmt: skip
    assert ranges == [AdvisoryRange("TEST-0002", "Debian:12", "zlib", "0", "2.0-1", None, ("1.0-1",), Severity.LOW)]
    assert store.advisory_ranges(["zlib"], ["Debian:11"]) == ({}, [])  # another release's entries are not read
    store.import_advisories("fixture-b", [_advisory("TEST-0001", "bash", record={"id": "TEST-0001", "v": 2})])
    assert store.advisory_count() == 2
    assert _found(store, "openssl", "bash") == ["TEST-0001:bash", "TEST-0002:openssl"]  # its old ranges went
    assert {"id": "TEST-0001", "v": 2} in store.all_advisories()
    assert [i.source for i in store.vulndb_imports()] == ["fixture-a", "fixture-b"]


def test_withdrawn_advisories_are_never_read_for_matching(store: SqlStore) -> None:
    store.import_advisories("a", [_advisory("TEST-0001", "openssl", withdrawn=True), _advisory("TEST-0002", "openssl")])
    assert _found(store, "openssl") == ["TEST-0002:openssl"]


def test_advisories_stored_without_their_parsed_form_are_listed_until_it_is_stored(store: SqlStore) -> None:
    store.import_advisories("a", [_advisory("TEST-0001", "openssl"), _advisory("TEST-0002", "zlib")])
    assert store.unparsed_advisories(10) == []
    # What a registry migrated from 0007 holds: the raw record only.
    with store.engine.begin() as conn:
        conn.execute(advisory_ranges_table.delete())
        conn.execute(advisories_table.update().values(title=None, identifiers=sa.null(), severity=None, withdrawn=None))
    assert store.unparsed_advisories(1) == [("TEST-0001", {"id": "TEST-0001"})]
    assert _found(store, "openssl", "zlib") == []
    # An import replaces TEST-0002 between the read of the raw records and the write of their parse: its own,
    # newer parse is kept.
    store.import_advisories("b", [_advisory("TEST-0002", "bash", title="imported meanwhile")])
    stale = [_advisory("TEST-0001", "openssl", title="parsed"), _advisory("TEST-0002", "zlib", title="stale")]
    assert store.store_parsed(stale) == 1
    assert store.store_parsed(stale) == 0  # done: a second parse of the same rows writes nothing
    assert store.unparsed_advisories(10) == []
    heads, _ = store.advisory_ranges(["bash"], ["Debian:12"])
    assert heads["TEST-0002"].title == "imported meanwhile" and _found(store, "zlib") == []
    heads, _ = store.advisory_ranges(["openssl"], ["Debian:12"])
    assert heads["TEST-0001"].title == "parsed"
    assert _found(store, "openssl", "bash") == ["TEST-0001:openssl", "TEST-0002:bash"]


def test_a_scan_keeps_ratings_changelogs_and_the_age_of_its_data(store: SqlStore) -> None:
    vid = _built(store)
    verdict = DebianVerdict("open", "low", None, "postponed")
    score = CvssScore("3.1", "CVSS:3.1/AV:N/AC:L/PR:N/UI:N/S:U/C:H/I:H/A:H", 9.8, Severity.CRITICAL, "cna")
    finding = Finding(FindingKind.CVE, "TEST-0002", Severity.LOW, "synthetic", "osv", package="openssl",
                      installed="3.0.1-1", severity_source="debian", debian=verdict, cvss=score)  # fmt: skip
    changelogs = {"openssl": (ChangelogEntry("3.0.2-1", ("CVE-2999-0001", "CVE-2999-0002")),)}
    scan = ScanRecord(T0, (), "{}", sbom_digest("{}"), (finding,), "osv", changelogs=changelogs,
                      vulndb_as_of={"osv": T0}, release="12")  # fmt: skip
    store.add_scan(vid, scan)
    latest = store.latest_scan(vid)
    assert latest is not None
    assert latest.findings == (finding,)
    assert latest.changelogs == changelogs
    assert latest.vulndb_as_of == {"osv": T0} and latest.release == "12"


def _state(name: str, count: int = 0) -> VulnDbSource:
    return VulnDbSource(name, f"https://mirror.test/{name}", T0, T0, "e" * 64, 123, count)  # type: ignore[arg-type]


def test_debian_verdicts_and_cvss_scores_are_replaced_whole_and_found_by_package(store: SqlStore) -> None:
    low = DebianVerdict("open", "low", None, None)
    fixed = DebianVerdict("resolved", "medium", "3.0.2-1", None)
    state = store.replace_debian_tracker(
        [("openssl", "CVE-2999-0001", "bookworm", low), ("openssl", "CVE-2999-0001", "trixie", fixed),
         ("zlib", "CVE-2999-0002", "bookworm", fixed)],
        _state("debian"),
    )  # fmt: skip
    assert (state.name, state.count, state.origin, state.as_of) == ("debian", 3, "https://mirror.test/debian", T0)
    assert store.debian_verdicts(["openssl", "nginx"], "bookworm") == {("openssl", "CVE-2999-0001"): low}
    assert store.debian_verdicts(["openssl"], "trixie") == {("openssl", "CVE-2999-0001"): fixed}
    store.replace_debian_tracker([("nginx", "CVE-2999-0003", "bookworm", low)], _state("debian"))
    assert store.debian_verdicts(["openssl", "zlib"], "bookworm") == {}  # the old data went whole
    assert [(s.name, s.count) for s in store.vulndb_sources()] == [("debian", 1)]

    v31 = CvssScore("3.1", "CVSS:3.1/AV:N/AC:L/PR:N/UI:N/S:U/C:H/I:N/A:N", 7.5, Severity.HIGH, "cna")
    v40 = CvssScore("4.0", "CVSS:4.0/AV:N/AC:L/AT:N/PR:N/UI:N/VC:H/VI:N/VA:N/SC:N/SI:N/SA:N", 8.7, Severity.HIGH,
                    "adp:TEST")  # fmt: skip
    store.replace_cve_scores([("CVE-2999-0001", v31), ("CVE-2999-0001", v40), ("CVE-2999-0001", v31)], _state("cve"))
    found = store.cve_scores(["CVE-2999-0001", "CVE-2999-0009"])
    assert sorted(found["CVE-2999-0001"], key=lambda s: s.version) == [v31, v40] and list(found) == ["CVE-2999-0001"]
    assert [(s.name, s.count) for s in store.vulndb_sources()] == [("cve", 2), ("debian", 1)]


def test_an_osv_update_replaces_every_advisory_and_records_its_source(store: SqlStore) -> None:
    store.import_advisories("a", [_advisory("TEST-0001", "openssl")])
    store.import_advisories("b", [_advisory("TEST-0002", "zlib")], state=_state("osv"), replace_all=True)
    assert _found(store, "openssl", "zlib") == ["TEST-0002:zlib"]
    assert store.all_advisories() == [{"id": "TEST-0002"}]
    assert [(s.name, s.count) for s in store.vulndb_sources()] == [("osv", 1)]


def test_a_failed_replacement_keeps_the_previous_data(store: SqlStore) -> None:
    low = DebianVerdict("open", "low", None, None)
    store.replace_debian_tracker([("openssl", "CVE-2999-0001", "bookworm", low)], _state("debian"))

    def entries() -> Iterator[tuple[str, str, str, DebianVerdict]]:
        yield ("zlib", "CVE-2999-0002", "bookworm", low)
        raise RuntimeError("the parser failed midway")

    with pytest.raises(RuntimeError):
        store.replace_debian_tracker(entries(), _state("debian"))
    assert store.debian_verdicts(["openssl", "zlib"], "bookworm") == {("openssl", "CVE-2999-0001"): low}


def test_keys_are_trusted_once_and_revoked_once(store: SqlStore) -> None:
    key = TrustedKey("ed25519:00000000test0001", "ed25519", "PEM-A", T0)
    assert store.add_key(key, actor="TEST") == (key, True)
    assert store.add_key(key, actor="TEST") == (store.signing_keys()[0], False)  # idempotent
    with pytest.raises(StateError):
        store.add_key(TrustedKey(key.key_id, "ed25519", "PEM-B", T0), actor="TEST")
    revoked = store.revoke_key(key.key_id, "laptop lost", actor="TEST")
    assert revoked.revoked_at is not None and revoked.revoked_reason == "laptop lost"
    with pytest.raises(StateError):
        store.revoke_key(key.key_id, "again", actor="TEST")
    with pytest.raises(NotFound):
        store.revoke_key("ed25519:unknown", "x", actor="TEST")
    # One audit record per change that happened, each written with its change.
    assert [(e.kind, e.data["key"]) for e in store.events()] == [("key.added", key.key_id), ("key.revoked", key.key_id)]


def test_concurrent_trust_of_one_key_is_recorded_once(store_url: str) -> None:
    """Eight writers trusting the same key at once (as eight parallel `keys trust`): one row, one key.added."""
    from concurrent.futures import ThreadPoolExecutor

    key = TrustedKey("ed25519:00000000test0002", "ed25519", "PEM-C", T0)
    stores = [open_store(store_url) for _ in range(8)]
    try:
        barrier = threading.Barrier(8)

        def trust(s: SqlStore) -> bool:
            barrier.wait()
            return s.add_key(key, actor="TEST")[1]

        with ThreadPoolExecutor(8) as pool:
            added = list(pool.map(trust, stores))
        assert added.count(True) == 1
        assert [e.kind for e in stores[0].events()] == ["key.added"]
        assert len(stores[0].signing_keys()) == 1
    finally:
        for s in stores:
            s.close()


def test_signatures_round_trip(store: SqlStore) -> None:
    vid = _built(store)
    store.add_signature(vid, SignatureRecord("ed25519:00000000test0001", '{"payload": ""}', "s" * 64, T0))
    (sig,) = store.signatures(vid)
    assert sig.key_id == "ed25519:00000000test0001" and sig.statement_digest == "s" * 64 and sig.signed_at == T0


def test_channel_moves_keep_the_previous_pointer_and_are_compare_and_set(store: SqlStore) -> None:
    v1, v2, v3 = _built(store), _built(store), _built(store)
    first = store.move_channel("web", "prod", v1, expect_current=None, actor="TEST", reason="first")
    assert (first.current, first.previous) == ("web@1", None)
    with pytest.raises(StateError):  # someone else created it meanwhile
        store.move_channel("web", "prod", v2, expect_current=None, actor="TEST", reason="race")
    second = store.move_channel("web", "prod", v2, expect_current=v1, actor="TEST", reason="next")
    assert (second.current, second.previous) == ("web@2", "web@1")
    with pytest.raises(StateError):  # stale expectation: the pointer is at v2 now
        store.move_channel("web", "prod", v3, expect_current=v1, actor="TEST", reason="stale")
    store.move_channel("web", "dev", v3, expect_current=None, actor="TEST", reason="dev")
    assert [(p.channel, p.current) for p in store.channels("web")] == [("dev", "web@3"), ("prod", "web@2")]
    assert set(store.channel_entries(v1)) == {"prod"}
    assert store.channel_entries(v2)["prod"].tzinfo is not None


def test_a_revoked_version_is_never_put_in_a_channel_even_if_the_gates_passed_before(store: SqlStore) -> None:
    vid = _built(store)
    store.transition(vid, Status.REVOKED, expect=Status.BUILT)  # lands between a gate check and the move
    with pytest.raises(StateError, match="revoked"):
        store.move_channel("web", "prod", vid, expect_current=None, actor="TEST", reason="too late")
    assert store.channels("web") == []


def test_operations_share_the_first_attempts_run_id_and_keep_their_detail(store: SqlStore) -> None:
    vid, other = _built(store), _built(store, "api")
    first = store.begin_operation("distribute", vid, actor="ci", new_run_id="run-1")
    assert (first.run_id, first.state, first.finished_at) == ("run-1", "running", None)
    progress = store.update_operation(first.id, "running", {"copies": {"ami-00000000000000002": "ami-1"}})
    assert progress.finished_at is None and progress.detail["copies"] == {"ami-00000000000000002": "ami-1"}
    failed = store.update_operation(first.id, "failed", {"error": "interrupted"})
    assert failed.state == "failed" and failed.finished_at is not None
    # The rerun is a new attempt under the same run id, so it adopts what the first one made.
    second = store.begin_operation("distribute", vid, actor="ci", new_run_id="run-2")
    assert second.id != first.id and second.run_id == "run-1"
    # Another version, or another kind of operation, starts its own run.
    assert store.begin_operation("distribute", other, actor="ci", new_run_id="run-3").run_id == "run-3"
    assert store.begin_operation("rollout", vid, actor="ci", new_run_id="run-4").run_id == "run-4"
    assert [o.id for o in store.operations(vid, "distribute")] == [first.id, second.id]
    assert len(store.operations(vid)) == 3
    with pytest.raises(ValueError):
        store.update_operation(second.id, "paused", {})
    with pytest.raises(NotFound):
        store.begin_operation("distribute", 9999, actor="ci", new_run_id="x")


def test_rollout_records_round_trip_with_compare_and_set(store: SqlStore) -> None:
    vid = _built(store)
    r = store.create_rollout("local:web", vid, strategy={"waves": ["1", "100%"]}, waves=[1, 3], actor="ci")
    assert (r.state, r.wave, r.waves, r.version_ref, r.requested) == ("running", 0, (1, 3), "web@1", None)
    with pytest.raises(StateError, match="is running"):
        store.create_rollout("local:web", vid, strategy={}, waves=[4], actor="ci")  # one live rollout per target
    planned = store.plan_replacements(r.id, 0, "forward", [("m1", "web@0", "tok-1"), ("m2", None, "tok-2")])
    again = store.plan_replacements(r.id, 0, "forward", [("m1", "web@0", "tok-1")])  # a resumed wave
    assert [p.token for p in planned] == ["tok-1", "tok-2"] and [a.id for a in again] == [planned[0].id]
    done = store.finish_replacement("tok-1", new_member="m9", state="done")
    assert (done.new_member, done.state, done.old_version) == ("m9", "done", "web@0")
    decision = store.add_decision(r.id, 0, passed=True, action="continue", numbers={"members": 1, "burn_rate": 0.0})
    assert store.decisions(r.id) == [decision] and decision.numbers["members"] == 1
    assert store.request_rollout(r.id, "pause").requested == "pause"
    moved = store.update_rollout(r.id, expect="running", state="paused", wave=1, clear_request=True)
    assert (moved.state, moved.wave, moved.requested, moved.finished_at) == ("paused", 1, None, None)
    with pytest.raises(StateError, match="no longer running"):
        store.update_rollout(r.id, expect="running", wave=2)  # compare-and-set lost
    over = store.update_rollout(r.id, expect="paused", state="aborted")
    assert over.finished_at is not None
    with pytest.raises(StateError):
        store.request_rollout(r.id, "abort")
    assert [x.id for x in store.rollouts(target="local:web")] == [r.id] and store.rollouts(target="other") == []
    assert store.create_rollout("local:web", vid, strategy={}, waves=[1], actor="ci").id != r.id  # target free again
    with pytest.raises(NotFound):
        store.get_rollout(999)


def test_provider_artifacts_lists_every_version_in_one_read(store: SqlStore) -> None:
    first, second = _built(store), _built(store)
    store.add_artifact(first, Artifact("aws", "eu-west-1", "ami-00000000000000001", "a" * 64, 1))
    store.add_artifact(second, Artifact("aws", "us-east-1", "ami-00000000000000002", "b" * 64, 1))
    store.add_artifact(second, Artifact("local", "local", "/x.qcow2", "c" * 64, 1))
    found = [(ref, a.location, a.region) for ref, a in store.provider_artifacts("aws")]
    assert found == [("web@1", "ami-00000000000000001", "eu-west-1"), ("web@2", "ami-00000000000000002", "us-east-1")]
    assert store.provider_artifacts("gcp") == []
