"""Migrations on registries written under older revisions: 0006 (lineage and pages: parent ids and revoked ancestors
filled in from the rows already there, and a downgrade that gives 0005 back its schema with the data intact), 0007
(the osv source's age) and 0008 (advisories parsed at import; those stored raw before are parsed once)."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta

import sqlalchemy as sa

from amiforge.lifecycle.vulndb import MatchingData, parse_stored_advisories
from amiforge.model import Package, ScanRecord, Status
from amiforge.scanners.sbom import sbom_digest
from amiforge.store.sql import create_store_engine, open_store
from tests.migrations import run_alembic

AT = datetime(2026, 1, 1, tzinfo=UTC)

# (id, name, number, status, parent) as 0005 stored them.
VERSIONS = [
    (1, "web", 1, "signed", None),
    (2, "web", 2, "revoked", "web@1"),
    (3, "web", 3, "signed", "web@2"),
    (4, "web", 4, "built", "web@3"),
    (5, "web", 5, "signed", "web@1"),  # a second branch from web@1
    (6, "api", 1, "revoked", None),
    (7, "api", 2, "built", "api@1"),
    (8, "api", 3, "built", "api@9"),  # a parent that does not exist
    (9, "api", 4, "built", " api:dev "),  # not NAME@N
    (10, "db", 1, "built", "web@4"),  # another image's version
]


def _seed_0005(engine: sa.Engine) -> None:
    run_alembic(engine, "upgrade", "0005")
    with engine.begin() as conn:
        for vid, name, number, status, parent in VERSIONS:
            conn.execute(
                sa.text(
                    "INSERT INTO versions (id, name, number, status, recipe_digest, recipe_path, recipe, provider,"
                    " parent, tags, log, created_at, updated_at) VALUES (:id, :name, :number, :status, 'r', 'r.yaml',"
                    " '', 'local', :parent, '{}', '', :at, :at)"
                ),
                {"id": vid, "name": name, "number": number, "status": status, "parent": parent, "at": AT},
            )
        if conn.dialect.name == "postgresql":  # ids were given: the sequence must move past them
            conn.execute(
                sa.text("SELECT setval(pg_get_serial_sequence('versions', 'id'), :top)"), {"top": len(VERSIONS)}
            )


def _schema(engine: sa.Engine) -> tuple[set[str], set[str], set[str]]:
    inspector = sa.inspect(engine)
    columns = {c["name"] for c in inspector.get_columns("versions")}
    indexes = {i["name"] or "" for i in inspector.get_indexes("versions")}
    return columns, indexes, set(inspector.get_table_names())


def test_upgrade_fills_in_lineage_and_downgrade_takes_it_away(store_url: str) -> None:
    engine = create_store_engine(store_url)
    try:
        _seed_0005(engine)
        columns, indexes, tables = _schema(engine)
        assert "parent_id" not in columns and "revoked_ancestors" not in tables
        run_alembic(engine, "upgrade", "0006")

        columns, indexes, tables = _schema(engine)
        assert "parent_id" in columns and "revoked_ancestors" in tables
        assert {"ix_versions_parent_id", "ix_versions_name_id"} <= indexes
        with engine.connect() as conn:
            links = {vid: pid for vid, pid in conn.execute(sa.text("SELECT id, parent_id FROM versions"))}
            reach = sorted(conn.execute(sa.text("SELECT version_id, ancestor_id FROM revoked_ancestors")).all())
        assert links == {1: None, 2: 1, 3: 2, 4: 3, 5: 1, 6: None, 7: 6, 8: None, 9: None, 10: 4}
        assert reach == [(3, 2), (4, 2), (7, 6), (10, 2)]

        with open_store(store_url) as store:  # at the head already: opens without migrating
            assert [v.ref for v in store.ancestry(10)] == ["web@4", "web@3", "web@2", "web@1"]
            assert store.revoked_ancestors([4, 5, 7, 10]) == {4: ["web@2"], 5: [], 7: ["api@1"], 10: ["web@2"]}
            # A version made after the migration inherits what it filled in.
            child = store.create_version(name="db", recipe_digest="r", recipe_path="r.yaml", provider="local",
                                         tags={}, parent="db@1")  # fmt: skip
            assert store.revoked_ancestors([child.id]) == {child.id: ["web@2"]}
            store.transition(child.id, Status.BUILT, expect=Status.BAKING)

        run_alembic(engine, "downgrade", "0005")
        columns, indexes, tables = _schema(engine)
        assert "parent_id" not in columns and "revoked_ancestors" not in tables
        assert not {"ix_versions_parent_id", "ix_versions_name_id"} & indexes
        with engine.connect() as conn:
            kept = conn.execute(sa.text("SELECT id, parent, status FROM versions ORDER BY id")).all()
        assert [tuple(r) for r in kept] == [(v[0], v[4], v[3]) for v in VERSIONS] + [(11, "db@1", "built")]

        run_alembic(engine, "upgrade", "head")  # and up again: the same links, the same reach
        with engine.connect() as conn:
            reach = sorted(conn.execute(sa.text("SELECT version_id, ancestor_id FROM revoked_ancestors")).all())
            assert conn.execute(sa.text("SELECT parent_id FROM versions WHERE id = 11")).scalar_one() == 10
        assert reach == [(3, 2), (4, 2), (7, 6), (10, 2), (11, 2)]
    finally:
        engine.dispose()


def test_0007_gives_advisories_already_imported_a_source_as_old_as_their_last_import(store_url: str) -> None:
    engine = create_store_engine(store_url)
    try:
        run_alembic(engine, "upgrade", "0006")
        with engine.begin() as conn:
            for iid, at in ((1, AT), (2, datetime(2026, 2, 1, tzinfo=UTC))):
                conn.execute(
                    sa.text("INSERT INTO vulndb_imports (id, source, imported_at, count) VALUES (:i, :s, :at, 1)"),
                    {"i": iid, "s": f"/srv/osv-{iid}", "at": at},
                )
            conn.execute(
                sa.text("INSERT INTO advisories (id, import_id, modified, record) VALUES ('TEST-0001', 2, '', '{}')")
            )
        run_alembic(engine, "upgrade", "0007")
        with open_store(store_url) as store:
            (osv,) = store.vulndb_sources()
            assert (osv.name, osv.origin, osv.as_of, osv.count) == (
                "osv",
                "/srv/osv-2",
                datetime(2026, 2, 1, tzinfo=UTC),
                1,
            )
        run_alembic(engine, "downgrade", "0006")
        assert "vulndb_sources" not in sa.inspect(engine).get_table_names()
    finally:
        engine.dispose()


# An OSV record as 0007 stored it: raw only (synthetic id and package versions).
_RAW = {
    "id": "TEST-0008",
    "modified": "2026-01-01T00:00:00Z",
    "summary": "synthetic advisory",
    "aliases": ["CVE-2999-0008"],
    "affected": [
        {"package": {"ecosystem": "Debian:12", "name": "openssl"},
         "ranges": [{"type": "ECOSYSTEM", "events": [{"introduced": "0"}, {"fixed": "3.0.2-1"}]}]},
        {"package": {"ecosystem": "Debian:11", "name": "openssl"},
         "ranges": [{"type": "ECOSYSTEM", "events": [{"introduced": "0"}, {"fixed": "1.1.1w-0"}]}]},
    ],
}  # fmt: skip


def test_0008_advisories_stored_raw_are_parsed_once_by_the_first_scan_after_the_upgrade(store_url: str) -> None:
    engine = create_store_engine(store_url)
    try:
        run_alembic(engine, "upgrade", "0007")
        with engine.begin() as conn:
            conn.execute(sa.text("INSERT INTO vulndb_imports (id, source, imported_at, count) VALUES (1, 's', :at, 1)"),
                         {"at": AT})  # fmt: skip
            conn.execute(sa.text("INSERT INTO advisories (id, import_id, modified, record) VALUES (:id, 1, '', :r)"),
                         {"id": _RAW["id"], "r": json.dumps(_RAW)})  # fmt: skip
            conn.execute(
                sa.text("INSERT INTO advisory_packages (advisory_id, package) VALUES ('TEST-0008', 'openssl')")
            )
        with open_store(store_url) as store:  # migrates to the head
            assert [i for i, _ in store.unparsed_advisories(10)] == ["TEST-0008"]
            libssl = Package("libssl3", "3.0.1-1", "amd64", "openssl", None)
            (finding,) = MatchingData(store).matcher({"openssl"}, "12").match([libssl])
            assert (finding.id, finding.title, finding.aliases) == (
                "TEST-0008",
                "synthetic advisory",
                ("CVE-2999-0008",),
            )
            assert (finding.package, finding.fixed) == ("libssl3", "3.0.2-1")  # Debian 12's range, not 11's
            assert store.unparsed_advisories(10) == [] and parse_stored_advisories(store) == 0
            assert store.all_advisories() == [_RAW]  # the raw record itself is untouched
        run_alembic(engine, "downgrade", "0007")
        assert "advisory_ranges" not in sa.inspect(engine).get_table_names()
        with engine.connect() as conn:
            record = conn.execute(sa.text("SELECT record FROM advisories")).scalar_one()
            assert (json.loads(record) if isinstance(record, str) else record) == _RAW  # PostgreSQL decodes JSON
    finally:
        engine.dispose()


def test_0008_scans_made_before_keep_their_sbom_and_later_ones_reference_it(store_url: str) -> None:
    engine = create_store_engine(store_url)
    try:
        _seed_0005(engine)
        run_alembic(engine, "upgrade", "0007")
        with engine.begin() as conn:
            conn.execute(
                sa.text("INSERT INTO scans (version_id, scanned_at, packages, sbom, sbom_digest, findings, vulndb) "
                        "VALUES (1, :at, '[]', :sbom, :digest, '[]', 'TEST')"),
                {"at": AT, "sbom": '{"old": 1}', "digest": sbom_digest('{"old": 1}')},
            )  # fmt: skip
        with open_store(store_url) as store:
            old = store.latest_scan(1)
            assert old is not None and old.sbom == '{"old": 1}'  # its own copy, read as before
            store.add_scan(1, ScanRecord(AT, (), '{"new": 1}', sbom_digest('{"new": 1}'), (), "TEST"))
            new = store.latest_scan(1)
            assert new is not None and new.sbom == '{"new": 1}'
        run_alembic(engine, "downgrade", "0007")
        with engine.connect() as conn:  # every scan has its copy again, as 0007 requires
            assert conn.execute(sa.text("SELECT sbom FROM scans ORDER BY id")).scalars().all() == [
                '{"old": 1}',
                '{"new": 1}',
            ]
    finally:
        engine.dispose()


def test_0009_boot_reports_become_boot_test_boots_with_their_totals(store_url: str) -> None:
    engine = create_store_engine(store_url)
    checks = {"passed": json.dumps([{"name": "unit nginx", "kind": "unit", "passed": True, "detail": "ok"}]),
              "failed": json.dumps([{"name": "unit nginx", "kind": "unit", "passed": False, "detail": "x"}]),
              "none": "[]"}  # fmt: skip
    try:
        _seed_0005(engine)
        run_alembic(engine, "upgrade", "0008")
        reports = [(1, 12.4, "passed"), (1, 30.0, "failed"), (1, None, "passed"), (1, 5.0, "none"), (2, 7.0, "passed")]
        with engine.begin() as conn:
            for version_id, ttr, kind in reports:
                conn.execute(
                    sa.text("INSERT INTO boot_reports (version_id, time_to_ready, checks, console, accel, started_at,"
                            " duration) VALUES (:v, :ttr, :checks, '', 'tcg', :at, 40.0)"),
                    {"v": version_id, "ttr": ttr, "checks": checks[kind], "at": AT},
                )  # fmt: skip
        with open_store(store_url) as store:
            boots = store.boots_in_window(AT, AT.replace(year=2027))
            assert [(b.version_ref, b.outcome, b.time_to_ready, b.target) for b in boots] == [
                ("web@1", "ready", 12.4, "boot-test"),
                ("web@1", "failed", 30.0, "boot-test"),
                ("web@1", "timeout", None, "boot-test"),
                ("web@1", "failed", 5.0, "boot-test"),  # no checks is no evidence: not a good boot
                ("web@2", "ready", 7.0, "boot-test"),
            ]
            assert all(b.stopped_at == b.ended_at == AT + timedelta(seconds=40) for b in boots)
            web1 = next(t for t in store.boot_totals() if t.version_id == 1)
            assert (web1.ready, web1.failed, web1.timeout, dict(web1.ttr_seconds)) == (1, 2, 1, {13: 1})
            assert store.running_targets() == []
        run_alembic(engine, "downgrade", "0008")
        assert {"boots", "boot_totals"}.isdisjoint(sa.inspect(engine).get_table_names())
    finally:
        engine.dispose()


def test_0010_adds_rollback_links_to_a_registry_whose_rollouts_other_rows_reference(store_url: str) -> None:
    engine = create_store_engine(store_url)
    try:
        _seed_0005(engine)
        run_alembic(engine, "upgrade", "0009")
        with engine.begin() as conn:  # a rollout with a replacement and a decision, both referencing it
            conn.execute(
                sa.text("INSERT INTO rollouts (id, target, version_id, strategy, waves, wave, state, actor, started_at,"
                        " updated_at, finished_at, detail) VALUES (1, 'local:web', 1, '{}', '[1]', 1, 'succeeded',"
                        " 't', :at, :at, :at, '{}')"),
                {"at": AT},
            )  # fmt: skip
            conn.execute(
                sa.text("INSERT INTO rollout_replacements (rollout_id, wave, kind, old_member, old_version, token,"
                        " state, at) VALUES (1, 0, 'forward', 'g-1', 'web@3', 'r1-w0-g-1', 'done', :at)"),
                {"at": AT},
            )  # fmt: skip
            if conn.dialect.name == "postgresql":
                conn.execute(sa.text("SELECT setval(pg_get_serial_sequence('rollouts', 'id'), 1)"))
        with open_store(store_url) as store:  # migrates to the head
            [before] = store.rollouts(target="local:web")
            assert before.undoes is None  # which earlier rollouts were rollbacks was not recorded: none is guessed
            assert store.rollout_tally() == [("web", "local:web", "succeeded", False, False, 1)]
        run_alembic(engine, "downgrade", "0009")
        assert "undoes" not in {c["name"] for c in sa.inspect(engine).get_columns("rollouts")}
    finally:
        engine.dispose()
