"""SqlStore behaviour on a real SQLite file, and on PostgreSQL too when AMIFORGE_TEST_POSTGRES_URL is set.

Every test that takes `store_url` (or `store`) runs once per backend; the PostgreSQL run gets a fresh schema.
"""

from __future__ import annotations

import json
import sqlite3
import threading
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta, timezone
from pathlib import Path

import pytest
import sqlalchemy as sa
from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from sqlalchemy.exc import SQLAlchemyError

from amiforge.errors import ConfigError, InfraError, NotFound, StateError
from amiforge.model import (
    TRANSITIONS,
    Artifact,
    BootReport,
    CheckResult,
    ImageVersion,
    LayerRecord,
    Status,
)
from amiforge.store.interface import Store
from amiforge.store.schema import events_table, metadata
from amiforge.store.sql import (
    GENESIS_HASH,
    SqlStore,
    create_store_engine,
    event_hash,
    migrate,
    open_store,
)
from tests.migrations import run_alembic

POSTGRES_ENV = "AMIFORGE_TEST_POSTGRES_URL"
# Not UTC on purpose: the store must hand back the same instant, tagged UTC.
START = datetime(2025, 3, 1, 12, 30, 45, 123456, tzinfo=timezone(timedelta(hours=2)))


class TickingClock:
    """A fixed clock that advances one millisecond per reading, so updates are visibly later."""

    def __init__(self, start: datetime = START) -> None:
        self.now = start
        self._lock = threading.Lock()

    def __call__(self) -> datetime:
        with self._lock:
            self.now += timedelta(milliseconds=1)
            return self.now


@pytest.fixture
def clock() -> TickingClock:
    return TickingClock()


@pytest.fixture
def store(store_url: str, clock: TickingClock) -> Iterator[SqlStore]:
    with open_store(store_url, clock=clock) as s:
        yield s


def _new(store: SqlStore, name: str = "web", **overrides: object) -> ImageVersion:
    fields: dict[str, object] = {
        "recipe_digest": "sha256:" + "r" * 8,
        "recipe_path": f"examples/{name}/recipe.yaml",
        "provider": "local",
        "tags": {"team": name},
        "parent": None,
    }
    fields.update(overrides)
    return store.create_version(name=name, **fields)  # type: ignore[arg-type]


def _built(store: SqlStore, name: str, digest: str) -> ImageVersion:
    v = _new(store, name)
    return store.transition(v.id, Status.BUILT, expect=Status.BAKING, digest=digest, size_bytes=1024)


def test_sql_store_satisfies_the_protocol(store: SqlStore) -> None:
    satisfied: Store = store  # checked by mypy; the assert keeps the name used
    assert satisfied is store


# --- versions ---------------------------------------------------------------------------------------------


def test_create_get_and_list(store: SqlStore) -> None:
    web1 = _new(store, "web", tags={"team": "web", "cost-center": "42"})
    db1 = _new(store, "db")
    web2 = _new(store, "web", parent="web@1")

    assert (web1.ref, web2.ref, db1.ref) == ("web@1", "web@2", "db@1")
    assert web1.status is Status.BAKING
    assert web1.tags == {"team": "web", "cost-center": "42"}
    assert web2.parent == "web@1"
    assert web1.digest is None and web1.log == ""
    assert web1.created_at == START + timedelta(milliseconds=1)
    assert web1.created_at.tzinfo is UTC

    assert store.get_version("web@2") == web2
    assert [v.ref for v in store.list_versions()] == ["web@2", "db@1", "web@1"]
    assert [v.ref for v in store.list_versions("web")] == ["web@2", "web@1"]
    assert store.list_versions("nothing") == []


def test_version_numbers_increment_per_name_independently(store: SqlStore) -> None:
    refs = [_new(store, name).ref for name in ["web", "db", "web", "web", "db", "cache"]]
    assert refs == ["web@1", "db@1", "web@2", "web@3", "db@2", "cache@1"]


def test_get_by_digest_prefix(store: SqlStore) -> None:
    web = _built(store, "web", "sha256:" + "ab12cd34" + "0" * 56)
    db = _built(store, "db", "ab12cd35" + "1" * 56)  # stored without the sha256: prefix

    assert store.get_version("ab12cd34") == web
    assert store.get_version("sha256:ab12cd34") == web
    assert store.get_version("AB12CD34") == web
    assert store.get_version("ab12cd35") == db

    for short in ["ab12cd3", "sha256:ab12cd"]:
        with pytest.raises(ConfigError, match="too short"):
            store.get_version(short)

    _built(store, "web", "sha256:" + "ab12cd34" + "f" * 56)
    with pytest.raises(ConfigError) as ambiguous:
        store.get_version("ab12cd34")
    rendered = ambiguous.value.diagnostics()
    assert "ambiguous" in rendered and "web@1" in rendered and "web@2" in rendered
    assert len(ambiguous.value.problems) == 2


@pytest.mark.parametrize("ref", ["web", "web@", "web@0", "web@x", "Web@1", "not a ref", "@1", "zz99zz99"])
def test_malformed_ref_is_a_config_error(store: SqlStore, ref: str) -> None:
    with pytest.raises(ConfigError) as err:
        store.get_version(ref)
    assert err.value.fix is not None and "NAME@N, NAME:CHANNEL or a digest prefix" in err.value.fix


def test_a_channel_ref_names_the_channels_current_version(store: SqlStore) -> None:
    with pytest.raises(NotFound, match="image 'web' has no channel 'prod'") as err:
        store.get_version("web:prod")
    assert err.value.fix is not None and "amiforge channels" in err.value.fix
    first = _built(store, "web", "ab12cd34" + "0" * 56).id
    second = _built(store, "web", "ab12cd35" + "0" * 56).id
    store.move_channel("web", "prod", first, expect_current=None, actor="TEST", reason="TEST")
    assert store.get_version("web:prod").ref == "web@1"
    store.move_channel("web", "prod", second, expect_current=first, actor="TEST", reason="TEST")
    assert store.get_version(" web:prod ").ref == "web@2"
    assert store.get_version("sha256:ab12cd35").ref == "web@2"  # a digest prefix is never read as a channel


@pytest.mark.parametrize("ref", ["web@9223372036854775808", "web@" + "9" * 5000])
def test_a_version_number_beyond_the_database_is_bad_input(store: SqlStore, ref: str) -> None:
    with pytest.raises(ConfigError, match="beyond what the registry can hold"):
        store.get_version(ref)


@pytest.mark.parametrize("ref", ["web@7", "deadbeef", "sha256:deadbeefcafe"])
def test_unknown_ref_is_not_found(store: SqlStore, ref: str) -> None:
    _built(store, "web", "ab12cd34" + "0" * 56)
    with pytest.raises(NotFound) as err:
        store.get_version(ref)
    assert err.value.fix is not None and "amiforge images list" in err.value.fix


def test_latest_by_status(store: SqlStore) -> None:
    first = _built(store, "web", "a" * 64)
    _built(store, "web", "b" * 64)
    _new(store, "web")  # web@3, still baking
    store.transition(first.id, Status.TESTED, expect=Status.BUILT)

    assert store.latest("web", [Status.TESTED]) == store.get_version("web@1")
    assert store.latest("web", [Status.BUILT, Status.TESTED]) == store.get_version("web@2")
    assert store.latest("web", [Status.BAKING, Status.BUILT]) == store.get_version("web@3")
    assert store.latest("web", [Status.SIGNED]) is None
    assert store.latest("web", []) is None
    assert store.latest("db", [Status.BAKING]) is None


def test_append_log(store: SqlStore) -> None:
    v = _new(store)
    store.append_log(v.id, "step 1 ok\n")
    store.append_log(v.id, "step 2 ok\n")
    assert store.get_version(v.ref).log == "step 1 ok\nstep 2 ok\n"
    with pytest.raises(NotFound):
        store.append_log(9999, "x")


# --- transitions ------------------------------------------------------------------------------------------


def test_transition_happy_path(store: SqlStore) -> None:
    v = _new(store)
    built = store.transition(v.id, Status.BUILT, expect=Status.BAKING, digest="d" * 64, size_bytes=123)
    assert (built.status, built.digest, built.size_bytes) == (Status.BUILT, "d" * 64, 123)
    assert built.updated_at > v.updated_at and built.created_at == v.created_at
    tested = store.transition(v.id, Status.TESTED, expect=Status.BUILT)
    assert tested.digest == "d" * 64  # untouched when not given
    assert store.get_version(v.ref) == tested


def test_illegal_transition_is_refused(store: SqlStore) -> None:
    v = _built(store, "web", "d" * 64)
    with pytest.raises(StateError, match="cannot become 'signed'"):
        store.transition(v.id, Status.SIGNED, expect=Status.BUILT)
    assert store.get_version(v.ref).status is Status.BUILT


def test_transition_of_unknown_version_is_not_found(store: SqlStore) -> None:
    with pytest.raises(NotFound):
        store.transition(424242, Status.BUILT, expect=Status.BAKING)


def test_lost_compare_and_set(store_url: str, store: SqlStore) -> None:
    v = _built(store, "web", "d" * 64)
    with open_store(store_url) as other:
        # Both workers saw web@1 in state built.
        assert store.get_version("web@1").status is other.get_version("web@1").status is Status.BUILT
        other.transition(v.id, Status.TESTED, expect=Status.BUILT)
        with pytest.raises(StateError) as lost:
            store.transition(v.id, Status.FAILED, expect=Status.BUILT)
    assert "now 'tested'" in lost.value.message
    assert store.get_version("web@1").status is Status.TESTED


def test_concurrent_create_version_yields_distinct_numbers(store_url: str, store: SqlStore) -> None:
    per_thread = 8
    barrier = threading.Barrier(2)
    numbers: list[int] = []
    failures: list[BaseException] = []

    def worker() -> None:
        try:
            with open_store(store_url) as mine:
                barrier.wait()
                for _ in range(per_thread):
                    numbers.append(_new(mine, "web").number)
        except BaseException as e:  # surfaced below; a thread's exception is otherwise lost
            failures.append(e)

    threads = [threading.Thread(target=worker) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert failures == []
    assert sorted(numbers) == list(range(1, 2 * per_thread + 1))


_STEPS = st.lists(
    # (target, the state the worker believes the version is in; None = the true current state)
    st.tuples(st.sampled_from(list(Status)), st.none() | st.sampled_from(list(Status))),
    max_size=8,
)


@settings(
    max_examples=40,
    deadline=None,
    # One store for all examples is intended: each example works on a version of its own.
    suppress_health_check=[HealthCheck.function_scoped_fixture],
)
@given(steps=_STEPS)
def test_store_accepts_exactly_the_legal_transitions(
    store: SqlStore, steps: list[tuple[Status, Status | None]]
) -> None:
    version = _new(store, "prop")
    current = Status.BAKING
    for target, believed in steps:
        expect = current if believed is None else believed
        legal = expect is current and target in TRANSITIONS[current]
        if legal:
            assert store.transition(version.id, target, expect=expect).status is target
            current = target
        else:
            with pytest.raises(StateError):
                store.transition(version.id, target, expect=expect)
        assert store.get_version(version.ref).status is current


# --- artifacts, layers, boot reports ----------------------------------------------------------------------


def test_artifacts_round_trip(store: SqlStore) -> None:
    v = _built(store, "web", "d" * 64)
    qcow = Artifact(
        provider="local",
        region="home",
        location="/data/regions/home/web/dd.qcow2",
        digest="d" * 64,
        size_bytes=2**33,  # larger than 32 bits
        kernel="/data/regions/home/web/vmlinuz",
        initrd="/data/regions/home/web/initrd.img",
        created_at=START,
    )
    ami = Artifact(provider="aws", region="eu-west-1", location="ami-0123", digest="d" * 64, size_bytes=8)

    stored_qcow = store.add_artifact(v.id, qcow)
    stored_ami = store.add_artifact(v.id, ami)
    assert stored_qcow.id is not None and stored_qcow.version_id == v.id
    assert stored_qcow.created_at == START and stored_ami.created_at is not None
    assert store.artifacts(v.id) == [stored_qcow, stored_ami]
    assert all(a.created_at is not None and a.created_at.tzinfo is UTC for a in store.artifacts(v.id))

    # Recording the same copy again (a resumed run) converges on the first record.
    assert store.add_artifact(v.id, qcow) == stored_qcow
    assert len(store.artifacts(v.id)) == 2
    with pytest.raises(StateError):
        store.add_artifact(v.id, Artifact("local", "home", qcow.location, "e" * 64, 1))
    with pytest.raises(NotFound):
        store.add_artifact(9999, ami)
    assert store.artifacts(9999) == []


def test_layers_round_trip_and_rerecording_replaces(store: SqlStore) -> None:
    v = _new(store)
    layers = [
        LayerRecord(index=0, key="k0", description="base bookworm", hit=True, seconds=0.25, size_bytes=10),
        LayerRecord(index=1, key="k1", description="packages: nginx", hit=False, seconds=7.5, size_bytes=2),
    ]
    store.record_layers(v.id, layers)
    assert store.layers(v.id) == layers
    store.record_layers(v.id, layers[:1])
    assert store.layers(v.id) == layers[:1]
    with pytest.raises(NotFound):
        store.record_layers(9999, layers)


def test_boot_reports_round_trip(store: SqlStore) -> None:
    v = _built(store, "web", "d" * 64)
    passed = BootReport(
        time_to_ready=12.75,
        checks=(
            CheckResult(name="unit nginx", kind="unit", passed=True, detail="active"),
            CheckResult(name="http :80/", kind="http", passed=True, detail="200, body matched"),
        ),
        console="[    0.000000] Linux version 6.1\nAMIFORGE-READY 12.75\n",
        accel="tcg",
        started_at=START,
        duration=20.5,
    )
    never_ready = BootReport(time_to_ready=None, checks=(), console="", accel="kvm", started_at=START, duration=90.0)
    first = store.add_boot_report(v.id, passed)
    second = store.add_boot_report(v.id, never_ready)
    assert first.id is not None and first.version_id == v.id
    assert store.boot_reports(v.id) == [first, second]
    assert [r.passed for r in store.boot_reports(v.id)] == [True, False]  # no checks: no evidence, never a pass
    assert store.boot_reports(v.id)[0].started_at.tzinfo is UTC
    with pytest.raises(ValueError, match="timezone-aware"):
        store.add_boot_report(v.id, BootReport(1.0, (), "", "tcg", datetime(2025, 1, 1), 1.0))


def test_a_boot_verdict_is_derived_from_its_checks(store: SqlStore) -> None:
    """The registry keeps no verdict apart from the checks: one failed check fails the report as read back, whatever
    the writer thought, and the table has no column that could say otherwise."""
    v = _built(store, "web", "e" * 64)
    checks = (CheckResult("ready", "ready", True, "ready after 3.0s"), CheckResult("unit x", "unit", False, "failed"))
    report = store.add_boot_report(v.id, BootReport(3.0, checks, "", "tcg", START, 5.0))
    assert report.passed is False and [r.passed for r in store.boot_reports(v.id)] == [False]
    assert "passed" not in {c["name"] for c in sa.inspect(store.engine).get_columns("boot_reports")}


# --- events -----------------------------------------------------------------------------------------------


def _append_five(store: SqlStore) -> None:
    store.append_event("bake.started", actor="alice", ref="web@1", data={"recipe": "web"})
    store.append_event("bake.finished", actor="alice", ref="web@1", data={"seconds": 31.5, "layers": (1, 2)})
    store.append_event("bake.started", actor="bob", ref="db@1")
    store.append_event("test.passed", actor="ci", ref="web@1", data={"when": START})
    store.append_event("gc", actor="cron", data={"removed": 0})


def test_event_chain_appends_and_verifies(store: SqlStore) -> None:
    first = store.append_event("bake.started", actor="alice", ref="web@1", data={"n": 1})
    assert first.seq == 1 and first.prev_hash == GENESIS_HASH
    assert first.hash == event_hash(
        GENESIS_HASH, seq=1, at=first.at, actor="alice", kind="bake.started", ref="web@1", data={"n": 1}
    )
    second = store.append_event("bake.finished", actor="alice", ref="web@1", data={"layers": (1, 2)})
    assert second.prev_hash == first.hash
    assert second.data == {"layers": [1, 2]}  # what is returned is what was stored and hashed
    assert store.events() == [first, second]
    assert store.verify_events() == []


def test_events_filter_and_limit(store: SqlStore) -> None:
    _append_five(store)
    assert [e.seq for e in store.events()] == [1, 2, 3, 4, 5]
    assert [e.seq for e in store.events("web@1")] == [1, 2, 4]
    assert [e.seq for e in store.events("web@1", limit=2)] == [2, 4]
    assert [e.seq for e in store.events(limit=3)] == [3, 4, 5]
    assert store.events("web@9") == []
    assert store.events()[3].data == {"when": str(START)}
    assert store.verify_events() == []


def test_events_of_some_kinds_only(store: SqlStore) -> None:
    _append_five(store)
    assert [e.seq for e in store.events(kinds={"bake.started", "gc"})] == [1, 3, 5]
    assert [e.seq for e in store.events("web@1", kinds={"bake.started", "test.passed"})] == [1, 4]
    assert [e.seq for e in store.events(kinds={"bake.started"}, limit=1)] == [3]
    assert store.events(kinds=set()) == []


def test_tampered_event_is_reported(store: SqlStore) -> None:
    _append_five(store)
    with store.engine.begin() as conn:
        conn.execute(events_table.update().where(events_table.c.seq == 3).values(data={"forged": True}))
    problems = store.verify_events()
    assert len(problems) == 1
    assert "seq 3" in problems[0] and "hash mismatch" in problems[0]


def test_deleted_events_are_reported(store: SqlStore) -> None:
    _append_five(store)
    with store.engine.begin() as conn:
        conn.execute(sa.delete(events_table).where(events_table.c.seq == 3))
    problems = store.verify_events()
    assert any("seq 3 missing" in p for p in problems)
    assert any(p.startswith("seq 4: prev_hash") for p in problems)

    with store.engine.begin() as conn:
        conn.execute(sa.delete(events_table).where(events_table.c.seq == 5))
    assert any(p.startswith("head mismatch") for p in store.verify_events())


# --- opening, migrations, errors --------------------------------------------------------------------------


def test_migrations_are_idempotent(store_url: str) -> None:
    with open_store(store_url) as first:
        _new(first)
    with open_store(store_url) as second:
        assert second.get_version("web@1").ref == "web@1"
        with second.engine.connect() as conn:
            heads = conn.execute(sa.text("SELECT version_num FROM alembic_version")).scalars().all()
    assert heads == [_script_head()]


def test_migration_0005_derives_boot_verdicts_from_checks(store_url: str) -> None:
    """Reports written under 0004 (with a stored flag) read back with the verdict their checks give, and a
    downgrade writes the derived flag back."""
    engine = create_store_engine(store_url)
    run_alembic(engine, "upgrade", "0004")
    ok = [{"name": "ready", "kind": "ready", "passed": True, "detail": ""}]
    bad = [*ok, {"name": "unit x", "kind": "unit", "passed": False, "detail": "failed"}]
    with engine.begin() as conn:
        conn.execute(sa.text(
            "INSERT INTO versions (id, name, number, status, recipe_digest, recipe_path, recipe, provider, parent,"
            " tags, log, created_at, updated_at) VALUES (1, 'web', 1, 'built', 'r', 'r.yaml', '', 'local', NULL,"
            " '{}', '', :at, :at)"), {"at": START})  # fmt: skip
        for i, (flag, checks) in enumerate([(True, ok), (True, bad)], start=1):
            conn.execute(
                sa.text(
                    "INSERT INTO boot_reports (id, version_id, passed, time_to_ready, checks, console, accel,"
                    " started_at, duration) VALUES (:id, 1, :flag, 1.0, :checks, '', 'tcg', :at, 1.0)"
                ),
                {"id": i, "flag": flag, "checks": json.dumps(checks), "at": START},
            )
    engine.dispose()
    with open_store(store_url) as s:  # migrates to the head
        assert [r.passed for r in s.boot_reports(1)] == [True, False]  # the stored True of #2 is gone
        run_alembic(s.engine, "downgrade", "0004")
        with s.engine.connect() as conn:
            flags = conn.execute(sa.text("SELECT passed FROM boot_reports ORDER BY id")).scalars().all()
        assert [bool(f) for f in flags] == [True, False]


def test_migrations_match_the_table_definitions(store: SqlStore) -> None:
    # Guards against editing sql.py's tables without writing a migration (or the other way round).
    with store.engine.connect() as conn:
        context = MigrationContext.configure(conn, opts={"compare_type": True})
        assert compare_metadata(context, metadata) == []


def test_schema_from_a_newer_amiforge_is_an_infra_error(store_url: str) -> None:
    with open_store(store_url) as s, s.engine.begin() as conn:
        conn.execute(sa.text("UPDATE alembic_version SET version_num = '9999'"))
    with pytest.raises(InfraError, match="9999") as err:
        open_store(store_url)
    assert err.value.fix is not None and "newer amiforge" in err.value.fix


def test_sqlite_file_settings(tmp_path: Path) -> None:
    path = tmp_path / "a" / "b" / "registry.db"
    with open_store(f"sqlite:///{path}") as s:
        assert path.exists()
        with s.engine.connect() as conn:
            assert conn.exec_driver_sql("PRAGMA foreign_keys").scalar() == 1
            assert conn.exec_driver_sql("PRAGMA journal_mode").scalar() == "wal"
            assert conn.exec_driver_sql("PRAGMA busy_timeout").scalar() == 5000


def test_in_memory_sqlite_works(clock: TickingClock) -> None:
    with open_store("sqlite://", clock=clock) as s:
        assert _new(s).ref == "web@1"
        assert s.get_version("web@1").created_at.tzinfo is UTC


def test_locked_database_is_a_retryable_infra_error(tmp_path: Path) -> None:
    path = tmp_path / "registry.db"
    engine = create_store_engine(f"sqlite:///{path}", busy_timeout_s=0.05)
    migrate(engine)
    s = SqlStore(engine)
    holder = sqlite3.connect(path, isolation_level=None)
    try:
        holder.execute("BEGIN IMMEDIATE")  # another process holds the write lock
        with pytest.raises(InfraError) as err:
            _new(s)
        assert err.value.retryable
        assert isinstance(err.value.__cause__, SQLAlchemyError)
        assert "retry" in err.value.diagnostics()
        assert s.list_versions() == []  # under WAL, reads still work while a writer holds the lock
    finally:
        holder.execute("ROLLBACK")
        holder.close()
        s.close()


def test_damaged_schema_is_a_non_retryable_infra_error(tmp_path: Path) -> None:
    with open_store(f"sqlite:///{tmp_path / 'r.db'}") as s:
        with s.engine.begin() as conn:
            conn.exec_driver_sql("DROP TABLE layers")
        with pytest.raises(InfraError) as err:
            s.layers(1)
    assert not err.value.retryable
    assert isinstance(err.value.__cause__, SQLAlchemyError)


def test_bad_url_is_a_config_error() -> None:
    with pytest.raises(ConfigError):
        open_store("not a url")


def test_unusable_directory_is_an_infra_error(tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    with pytest.raises(InfraError):
        open_store(f"sqlite:///{blocker / 'sub' / 'registry.db'}")


def _script_head() -> str:
    """The newest revision among the migration scripts: an opened store must be at it."""
    from alembic.config import Config
    from alembic.script import ScriptDirectory

    from amiforge.store.sql import MIGRATIONS_DIR

    config = Config()
    config.set_main_option("script_location", str(MIGRATIONS_DIR))
    (head,) = ScriptDirectory.from_config(config).get_heads()
    return str(head)


def test_opening_a_migrated_registry_takes_no_write_lock(tmp_path: Path) -> None:
    """Readers never wait on writers: with another process holding the write lock, a registry already at the newest
    schema opens and reads (it used to take the lock to migrate, on every command)."""
    url = f"sqlite:///{tmp_path / 'registry.db'}"
    with open_store(url) as first:
        _new(first)
    holder = sqlite3.connect(tmp_path / "registry.db", isolation_level=None)
    try:
        holder.execute("BEGIN IMMEDIATE")
        with open_store(url) as reader:
            assert [v.ref for v in reader.list_versions()] == ["web@1"]
    finally:
        holder.execute("ROLLBACK")
        holder.close()


def test_a_bug_is_never_blamed_on_a_damaged_row(tmp_path: Path) -> None:
    """Only values that cannot be decoded point at the registry: a caller's own bad value (NaN in event data) stays
    the bug it is, even with a damaged row in the registry."""
    url = f"sqlite:///{tmp_path / 'registry.db'}"
    with open_store(url) as store:
        store.append_event("TEST", actor="TEST", data={})
        with store.engine.begin() as conn:
            conn.exec_driver_sql("UPDATE events SET data = '{not json' WHERE seq = 1")
        with pytest.raises(InfraError, match="events row seq=1: data is not JSON"):
            store.events()
        with pytest.raises(ValueError, match="not JSON compliant") as caught:
            store.append_event("TEST", actor="TEST", data={"n": float("nan")})
        assert not isinstance(caught.value, InfraError)
