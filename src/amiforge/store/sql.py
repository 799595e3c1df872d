"""The SQL registry: SQLite by default, PostgreSQL for a team, one code path through SQLAlchemy Core.

This module owns the table definitions (their history lives in `migrations/`), how a URL becomes a configured
engine, ref resolution (`NAME@N`, digest prefix), compare-and-set version transitions, the hash-chained event
log, and the translation of every database failure into `errors.InfraError` at the boundary.
"""

from __future__ import annotations

import atexit
import functools
import hashlib
import json
import os
import re
import shutil
import tempfile
import threading
import time
import traceback
import urllib.parse
from collections.abc import Callable, Collection, Iterator, Mapping, Sequence
from contextlib import AbstractContextManager, contextmanager
from dataclasses import replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, TypeVar, cast

import sqlalchemy as sa
from sqlalchemy import event as sa_event
from sqlalchemy.engine import Connection, Engine, RowMapping
from sqlalchemy.exc import DBAPIError, IntegrityError, SQLAlchemyError
from sqlalchemy.pool import StaticPool

from amiforge.errors import ConfigError, InfraError, NotFound, Problem, StateError
from amiforge.model import (
    IMAGE_NAME_PATTERN,
    ROLLOUT_LIVE,
    Artifact,
    BootReport,
    ChannelPointer,
    CheckResult,
    Event,
    Finding,
    FindingKind,
    ImageVersion,
    LayerRecord,
    Operation,
    Package,
    Rollout,
    RolloutDecision,
    RolloutReplacement,
    ScanRecord,
    Severity,
    SignatureRecord,
    Status,
    TrustedKey,
    VulnDbImport,
    check_transition,
)
from amiforge.store.schema import (
    UndecodableValue,
    UtcDateTime,
    _aware,
    _utcnow,
    advisories_table,
    advisory_packages_table,
    artifacts_table,
    boot_reports_table,
    channel_moves_table,
    channels_table,
    decode_json,
    event_head_table,
    events_table,
    layers_table,
    metadata,
    operations_table,
    rollout_decisions_table,
    rollout_replacements_table,
    rollouts_table,
    scans_table,
    signatures_table,
    signing_keys_table,
    versions_table,
    vulndb_imports_table,
)

__all__ = [
    "GENESIS_HASH",
    "MIGRATIONS_DIR",
    "SqlStore",
    "create_store_engine",
    "event_hash",
    "migrate",
    "open_store",
]

GENESIS_HASH = "0" * 64
MIGRATIONS_DIR = Path(__file__).resolve().parent / "migrations"

_DEFAULT_BUSY_TIMEOUT_S = 5.0
_CREATE_ATTEMPTS = 5
_MIN_PREFIX = 8
# Arbitrary constant: every amiforge process migrating the same PostgreSQL database takes this advisory lock.
_MIGRATION_LOCK_KEY = 0x616D69666F726765  # "amiforge"
_MIGRATION_THREAD_LOCK = threading.Lock()
# Execution option read by the SQLite `begin` hook: writers take the write lock up front (BEGIN IMMEDIATE).
_WRITE_OPTION = "amiforge_write"

_REF_NAME_AT_N = re.compile(rf"^(?P<name>{IMAGE_NAME_PATTERN})@(?P<number>[1-9][0-9]*)$")
_REF_CHANNEL = re.compile(rf"^{IMAGE_NAME_PATTERN}:[a-z0-9][a-z0-9-]*$")
_HEX = re.compile(r"^[0-9a-f]+$")

# SQLite primary result codes and PostgreSQL SQLSTATEs after which the same statement may well succeed.
_SQLITE_BUSY, _SQLITE_LOCKED, _SQLITE_READONLY, _SQLITE_CANTOPEN = 5, 6, 8, 14
# The fix for a registry amiforge cannot read back.
_RESTORE = (
    "the registry was changed outside amiforge: restore it from a backup (`amiforge events --verify` checks the "
    "audit log)"
)
_OUT_OF_RANGE = "22003"  # PostgreSQL numeric_value_out_of_range
_RETRYABLE_SQLSTATES = frozenset({"40001", "40P01", "55P03", "57P01", "57P02", "57P03", "53300"})


# The tables and the UTC column type live in schema.py.


def event_hash(
    prev_hash: str,
    *,
    seq: int,
    at: datetime,
    actor: str,
    kind: str,
    ref: str | None,
    data: Mapping[str, object],
) -> str:
    """sha256(prev_hash + canonical JSON of the event's fields). The one definition of the chain."""
    body = json.dumps(
        {
            "seq": seq,
            "at": _aware(at, "event time").isoformat(),
            "actor": actor,
            "kind": kind,
            "ref": ref,
            "data": data,
        },
        sort_keys=True,
        separators=(",", ":"),
        default=str,
    )
    return hashlib.sha256((prev_hash + body).encode("utf-8")).hexdigest()


def _plain_json(data: Mapping[str, object]) -> dict[str, Any]:
    # What is hashed must be exactly what is stored and read back: tuples become lists, keys strings, and
    # anything else (datetimes, paths, enums) its str(), as the hash's `default=str` would.
    plain: dict[str, Any] = json.loads(json.dumps(dict(data), default=str, allow_nan=False))
    return plain


# --- engine -----------------------------------------------------------------------------------------------


def _sqlite_file(url: sa.URL) -> Path | None:
    database = url.database
    if not database or database == ":memory:" or url.query.get("uri") or url.query.get("mode") == "memory":
        return None
    return Path(database).expanduser()


def create_store_engine(url: str, *, busy_timeout_s: float = _DEFAULT_BUSY_TIMEOUT_S) -> Engine:
    """An engine for the registry at `url`, with SQLite configured for concurrent use (WAL, foreign keys,
    busy timeout, explicit BEGIN). Creates a SQLite file's parent directory. Does not migrate."""
    try:
        parsed = sa.make_url(url)
    except (sa.exc.ArgumentError, ValueError) as e:
        # The URL is not echoed back: it may carry a password.
        raise ConfigError(
            "the store URL is not a database URL",
            fix="use e.g. sqlite:////var/lib/amiforge/registry.db or postgresql+psycopg://user@host/db",
        ) from e
    if parsed.get_backend_name() != "sqlite":
        try:
            # pre_ping: a server restart between commands should cost a reconnect, not an error.
            return sa.create_engine(parsed, pool_pre_ping=True, json_deserializer=decode_json)
        except (ImportError, sa.exc.NoSuchModuleError) as e:
            raise InfraError(
                f"no database driver for {parsed.drivername}",
                fix="install the PostgreSQL extra: pip install 'amiforge[postgres]'",
            ) from e

    path = _sqlite_file(parsed)
    read_only = False
    if path is None:
        # One shared connection, or every pool checkout would see a different empty in-memory database.
        engine = sa.create_engine(
            parsed, poolclass=StaticPool, connect_args={"check_same_thread": False}, json_deserializer=decode_json
        )
    elif path.is_file() and not _writable(path):
        # A registry this process may only read (a read-only file, folder or file system): opened read-only, so
        # every read works and any write fails with the database's own "read-only" error.
        read_only = True
        engine = sa.create_engine(_read_only_url(path), json_deserializer=decode_json)
    else:
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise InfraError(
                f"cannot create the registry directory {path.parent}: {e.strerror or e}",
                fix="choose a writable location for the SQLite store, or create the directory",
            ) from e
        engine = sa.create_engine(parsed.set(database=str(path)), json_deserializer=decode_json)

    timeout_ms = int(busy_timeout_s * 1000)

    def on_connect(dbapi_connection: Any, _record: Any) -> None:
        # Take BEGIN away from the sqlite3 module (its legacy mode skips BEGIN before SELECT and DDL), so that
        # reads are repeatable and migrations are transactional; the `begin` hook below emits it instead.
        dbapi_connection.isolation_level = None
        cursor = dbapi_connection.cursor()
        try:
            cursor.execute(f"PRAGMA busy_timeout = {timeout_ms}")
            cursor.execute("PRAGMA foreign_keys = ON")
            if not read_only:
                # WAL: readers never block the writer and the writer never blocks readers.
                cursor.execute("PRAGMA journal_mode = WAL")
        finally:
            cursor.close()

    def on_begin(conn: Connection) -> None:
        # A writer that began DEFERRED and read first cannot upgrade its lock once another writer has
        # committed (SQLITE_BUSY, no waiting); IMMEDIATE takes the write lock up front, waiting busy_timeout.
        write = bool(conn.get_execution_options().get(_WRITE_OPTION, False))
        conn.exec_driver_sql("BEGIN IMMEDIATE" if write else "BEGIN")

    sa_event.listen(engine, "connect", on_connect)
    sa_event.listen(engine, "begin", on_begin)
    return engine


def _writable(path: Path) -> bool:
    """Whether this process can write the SQLite file and create its journal files beside it."""
    return os.access(path, os.W_OK) and os.access(path.parent, os.W_OK | os.X_OK)


def _read_only_url(path: Path) -> sa.URL:
    """A SQLite URI reading `path` without writing it. In WAL mode a reader needs the shared-memory file beside the
    database, and takes locks there so that a writer cannot change pages under it:
    - on a read-only file system nobody writes the file: it is opened `immutable` (no locks, no shared memory);
    - in a folder this process can write (only the file is read-only): `mode=ro`, and SQLite keeps its locks;
    - in a folder it cannot write, locks are impossible while another user may still write the file: a consistent
      private copy is read instead (`_snapshot`), never the live file without locks."""
    if os.statvfs(path).f_flag & os.ST_RDONLY:
        return _sqlite_uri(path, immutable=True)
    if os.access(path.parent, os.W_OK | os.X_OK):
        return _sqlite_uri(path, immutable=False)
    return _sqlite_uri(_snapshot(path), immutable=True)


def _sqlite_uri(path: Path, *, immutable: bool) -> sa.URL:
    query = {"mode": "ro", "uri": "true"} | ({"immutable": "1"} if immutable else {})
    return sa.URL.create("sqlite", database=f"file:{urllib.parse.quote(str(path))}", query=query)


def _snapshot(path: Path, *, attempts: int = 3) -> Path:
    """A private copy of the registry taken while no writer touched it: no write-ahead log beside it (its content
    would be missing from the copy) and the same file, size and modification time before and after the copy. The
    copy goes when the process ends."""
    wal = path.with_name(path.name + "-wal")
    for _ in range(attempts):
        before = path.stat()
        if wal.exists():
            break
        fd, name = tempfile.mkstemp(prefix="amiforge-registry-", suffix=".db")
        os.close(fd)
        copy = Path(name)
        atexit.register(copy.unlink, missing_ok=True)
        shutil.copyfile(path, copy)
        after = path.stat()
        same = (before.st_ino, before.st_size, before.st_mtime_ns) == (after.st_ino, after.st_size, after.st_mtime_ns)
        if same and not wal.exists():
            return copy
        copy.unlink(missing_ok=True)
    raise InfraError(
        f"the registry {path} is being written by someone else, and this user cannot take the locks needed to read it "
        "while it changes (its folder is read-only here)",
        retryable=True,
        fix="retry once the other writer is done, or make the folder writable for this user (group-writable)",
    )


def _describe(engine: Engine) -> str:
    return engine.url.render_as_string(hide_password=True)


def _retryable(error: SQLAlchemyError) -> bool:
    """Whether the same operation may succeed if tried again: locks, timeouts, lost connections."""
    if isinstance(error, sa.exc.TimeoutError | sa.exc.DisconnectionError):
        return True
    if not isinstance(error, DBAPIError):
        return False
    if error.connection_invalidated:
        return True
    # Decide on the driver's error codes, never on message text.
    code = getattr(error.orig, "sqlite_errorcode", None)
    if isinstance(code, int):
        return code & 0xFF in (_SQLITE_BUSY, _SQLITE_LOCKED)
    sqlstate = getattr(error.orig, "sqlstate", None)
    if isinstance(sqlstate, str):
        return sqlstate.startswith("08") or sqlstate in _RETRYABLE_SQLSTATES
    # No code (e.g. psycopg failing to connect at all): an OperationalError is by definition environmental.
    return isinstance(error, sa.exc.OperationalError)


def _infra_error(action: str, where: str, error: SQLAlchemyError, *, read_only: bool = False) -> InfraError:
    cause = error.orig if isinstance(error, DBAPIError) else error
    retryable = _retryable(error)
    fix = (
        f"the registry at {where} is busy or unreachable; retry, and check that the database is up"
        if retryable
        else f"check the registry at {where}: is the URL right, is the schema migrated? (`amiforge doctor`)"
    )
    code = (getattr(cause, "sqlite_errorcode", 0) or 0) & 0xFF
    if code == _SQLITE_READONLY or (read_only and code == _SQLITE_CANTOPEN):
        fix = (
            f"the registry at {where} can only be read here (a read-only file, folder or file system); run commands "
            "that change it where it can be written"
        )
    return InfraError(
        f"registry error while trying to {action}: {type(cause).__name__}: {cause}",
        retryable=retryable,
        fix=fix,
    )


@contextmanager
def _boundary(action: str, where: str, engine: Engine | None = None) -> Iterator[None]:
    """Translate every SQLAlchemy failure into InfraError, keeping the original as the cause; a number too large for
    the database is bad input (ConfigError). With `engine`, a value the registry holds but cannot read back (a
    damaged row: JSON that is not JSON, a time that is not a time) is an InfraError naming the rows at fault."""
    try:
        yield
    except SQLAlchemyError as e:
        if isinstance(e, DBAPIError) and getattr(e.orig, "sqlstate", None) == _OUT_OF_RANGE:
            raise _out_of_range(action) from e
        read_only = engine is not None and engine.url.query.get("mode") == "ro"
        raise _infra_error(action, where, e, read_only=read_only) from e
    except OverflowError as e:
        if not _raised_by_database(e):
            raise  # our own arithmetic: a bug, reported as one
        raise _out_of_range(action) from e  # sqlite3 refuses to bind an int beyond 64 bits
    except UndecodableValue as e:  # only row decoding raises it: a damaged registry, never a bug of ours
        damaged = _locate_damage(engine) if engine is not None else []
        raise InfraError(
            f"the registry at {where} holds data amiforge cannot read (while trying to {action}): "
            + ("; ".join(damaged) or str(e)),
            fix=_RESTORE,
        ) from e


def _raised_by_database(error: BaseException) -> bool:
    """Whether `error` came out of SQLAlchemy or its driver (binding a parameter), not out of amiforge's own code:
    the innermost Python frame it passed through is SQLAlchemy's."""
    frames = traceback.extract_tb(error.__traceback__)
    return bool(frames) and f"{os.sep}sqlalchemy{os.sep}" in frames[-1].filename


def _out_of_range(action: str) -> ConfigError:
    return ConfigError(
        f"a number given is beyond what the registry can hold (while trying to {action})",
        fix="use a number below 2^63: version numbers, ids and limits are all far smaller",
    )


def _locate_damage(engine: Engine, *, limit: int = 5) -> list[str]:
    """Rows whose JSON or time columns do not parse, read without the column types (which would raise on them)."""
    found: list[str] = []
    for table in metadata.sorted_tables:
        pk = next(iter(table.primary_key.columns), None)
        columns = [c for c in table.columns if isinstance(c.type, sa.JSON | UtcDateTime)]
        if pk is None or not columns:
            continue
        names = ", ".join(f'"{c.name}"' for c in (pk, *columns))
        try:
            with engine.connect() as conn:
                rows = conn.exec_driver_sql(f'SELECT {names} FROM "{table.name}"').all()
        except SQLAlchemyError:
            continue
        for row in rows:
            for column, value in zip(columns, row[1:], strict=True):
                problem = _unreadable(column, value)
                if problem is not None:
                    found.append(f"{table.name} row {pk.name}={row[0]}: {column.name} {problem}")
                    if len(found) >= limit:
                        return found
    return found


def _unreadable(column: sa.Column[Any], value: object) -> str | None:
    if value is None or not isinstance(value, str | bytes):
        return None  # a driver that decodes itself (PostgreSQL json, timestamptz) validated it on the way in
    if isinstance(column.type, sa.JSON):
        try:
            json.loads(value)
        except ValueError:
            return "is not JSON"
        return None
    try:
        datetime.fromisoformat(value if isinstance(value, str) else value.decode())
    except ValueError:
        return "is not a date and time"
    return None


def _alembic_config() -> Any:
    from alembic.config import Config  # imported here: alembic is needed at open time only

    config = Config()
    # ConfigParser interpolation: a literal % in the path must be doubled.
    config.set_main_option("script_location", str(MIGRATIONS_DIR).replace("%", "%%"))
    return config


@functools.cache
def head_revision() -> str:
    """The newest migration this amiforge knows."""
    from alembic.script import ScriptDirectory

    return str(ScriptDirectory.from_config(_alembic_config()).get_current_head())


def schema_revision(engine: Engine) -> str | None:
    """The revision the registry's schema is at (None: no schema yet), read without taking the write lock."""
    from alembic.migration import MigrationContext

    with _boundary("read the registry's schema version", _describe(engine)), engine.connect() as conn, conn.begin():
        return MigrationContext.configure(conn).get_current_revision()


def migrate(engine: Engine) -> None:
    """Bring the schema to the newest migration. Safe to run concurrently and repeatedly. A registry already at the
    newest revision is only read: opening it takes no write lock, so readers never wait on a writer (and a
    read-only registry opens at all)."""
    if schema_revision(engine) == head_revision():
        return
    from alembic import command
    from alembic.util.exc import CommandError

    config = _alembic_config()
    # Alembic keeps its running context in module globals, so one process migrates one database at a time.
    with (
        _MIGRATION_THREAD_LOCK,
        _boundary("migrate the registry schema", _describe(engine)),
        engine.connect() as conn,
    ):
        conn.execution_options(**{_WRITE_OPTION: True})
        with conn.begin():
            if conn.dialect.name == "postgresql":
                # Two processes opening a fresh database must not both create the tables.
                conn.execute(sa.text("SELECT pg_advisory_xact_lock(:key)"), {"key": _MIGRATION_LOCK_KEY})
            config.attributes["connection"] = conn
            try:
                command.upgrade(config, "head")
            except CommandError as e:
                # Typically a database stamped by a newer amiforge, whose revision this install does not know.
                raise InfraError(
                    f"cannot migrate the registry schema at {_describe(engine)}: {e}",
                    fix="the database was probably written by a newer amiforge; upgrade amiforge",
                ) from e


def open_store(url: str, *, clock: Callable[[], datetime] | None = None) -> SqlStore:
    """Open (creating and migrating if needed) the registry at `url`: `sqlite:///path` or `postgresql+psycopg://…`."""
    engine = create_store_engine(url)
    try:
        migrate(engine)
    except BaseException:
        engine.dispose()
        raise
    return SqlStore(engine, clock=clock)


# --- rows -> domain types ---------------------------------------------------------------------------------

_M = TypeVar("_M")


def _int_or_none(value: object) -> int | None:
    return None if value is None else int(value)  # type: ignore[call-overload]


def _float_or_none(value: object) -> float | None:
    return None if value is None else float(value)  # type: ignore[arg-type]


def _mapping(value: object) -> dict[str, object]:
    """A JSON column that must hold an object (null reads as empty)."""
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise TypeError(f"expected a JSON object, found {type(value).__name__}")
    return value


def _reads(table: str, key: str = "id") -> Callable[[Callable[[RowMapping], _M]], Callable[[RowMapping], _M]]:
    """Decorate a row mapper: a row it cannot turn into a domain value (an unknown status, a list where a mapping
    belongs …) is an InfraError naming the table and the row, not a crash."""

    def decorate(mapper: Callable[[RowMapping], _M]) -> Callable[[RowMapping], _M]:
        @functools.wraps(mapper)
        def mapped(row: RowMapping) -> _M:
            try:
                return mapper(row)
            except (ValueError, TypeError, KeyError, AttributeError, IndexError) as e:
                ident = row.get(key, "?")
                raise InfraError(
                    f"the registry's {table} row {key}={ident} is damaged: {type(e).__name__}: {e}",
                    fix=_RESTORE,
                ) from e

        return mapped

    return decorate


@_reads("versions")
def _version(m: RowMapping) -> ImageVersion:
    return ImageVersion(
        id=m["id"],
        name=m["name"],
        number=int(m["number"]),
        status=Status(m["status"]),
        recipe_digest=m["recipe_digest"],
        recipe_path=m["recipe_path"],
        recipe=m["recipe"] or "",
        provider=m["provider"],
        created_at=m["created_at"],
        updated_at=m["updated_at"],
        digest=m["digest"],
        size_bytes=_int_or_none(m["size_bytes"]),
        parent=m["parent"],
        tags={str(k): str(v) for k, v in _mapping(m["tags"]).items()},
        log=m["log"] or "",
    )


@_reads("rollouts")
def _rollout(row: RowMapping) -> Rollout:
    return Rollout(
        id=row["id"],
        target=row["target"],
        version_id=row["version_id"],
        version_ref=f"{row['name']}@{row['number']}",
        strategy=dict(row["strategy"] or {}),
        waves=tuple(int(w) for w in row["waves"] or ()),
        wave=row["wave"],
        state=row["state"],
        requested=row["requested"],
        actor=row["actor"],
        started_at=row["started_at"],
        updated_at=row["updated_at"],
        finished_at=row["finished_at"],
        detail=dict(row["detail"] or {}),
    )


@_reads("rollout_replacements")
def _replacement(row: RowMapping) -> RolloutReplacement:
    return RolloutReplacement(
        id=row["id"],
        rollout_id=row["rollout_id"],
        wave=row["wave"],
        kind=row["kind"],
        old_member=row["old_member"],
        old_version=row["old_version"],
        token=row["token"],
        new_member=row["new_member"],
        state=row["state"],
        at=row["at"],
    )


@_reads("rollout_decisions")
def _decision(row: RowMapping) -> RolloutDecision:
    return RolloutDecision(
        id=row["id"],
        rollout_id=row["rollout_id"],
        wave=row["wave"],
        at=row["at"],
        passed=bool(row["passed"]),
        action=row["action"],
        numbers=dict(row["numbers"] or {}),
    )


@_reads("operations")
def _operation(row: RowMapping) -> Operation:
    return Operation(
        id=row["id"],
        kind=row["kind"],
        version_id=row["version_id"],
        run_id=row["run_id"],
        state=row["state"],
        actor=row["actor"],
        started_at=row["started_at"],
        finished_at=row["finished_at"],
        detail=dict(row["detail"] or {}),
    )


@_reads("artifacts")
def _artifact(m: RowMapping) -> Artifact:
    return Artifact(
        provider=m["provider"],
        region=m["region"],
        location=m["location"],
        digest=m["digest"],
        size_bytes=int(m["size_bytes"]),
        kernel=m["kernel"],
        initrd=m["initrd"],
        id=m["id"],
        version_id=m["version_id"],
        created_at=m["created_at"],
    )


@_reads("layers", "index")
def _layer(m: RowMapping) -> LayerRecord:
    return LayerRecord(
        index=int(m["index"]),
        key=m["key"],
        description=m["description"],
        hit=bool(m["hit"]),
        seconds=float(m["seconds"]),
        size_bytes=int(m["size_bytes"]),
    )


@_reads("boot_reports")
def _boot_report(m: RowMapping) -> BootReport:
    checks = tuple(
        CheckResult(name=c["name"], kind=c["kind"], passed=bool(c["passed"]), detail=c["detail"]) for c in m["checks"]
    )
    return BootReport(
        time_to_ready=_float_or_none(m["time_to_ready"]),
        checks=checks,
        console=m["console"],
        accel=m["accel"],
        started_at=m["started_at"],
        duration=float(m["duration"]),
        id=m["id"],
        version_id=m["version_id"],
    )


@_reads("events", "seq")
def _event(m: RowMapping) -> Event:
    return Event(
        seq=int(m["seq"]),
        at=m["at"],
        actor=m["actor"],
        kind=m["kind"],
        ref=m["ref"],
        data=_mapping(m["data"]),
        prev_hash=m["prev_hash"],
        hash=m["hash"],
    )


def _inserted_id(result: sa.CursorResult[Any]) -> int:
    key = result.inserted_primary_key
    if key is None:  # pragma: no cover - every table here has an integer primary key
        raise AssertionError("INSERT returned no primary key")
    return int(key[0])


def _name_lock_key(name: str) -> int:
    """A stable signed 64-bit advisory-lock key for one image name."""
    return int.from_bytes(hashlib.sha256(b"amiforge-version:" + name.encode()).digest()[:8], "big", signed=True)


def _short(digest: str) -> str:
    return digest[:12] + "…"


# --- the store --------------------------------------------------------------------------------------------


class SqlStore:
    """The registry over one SQLAlchemy engine; satisfies `store.interface.Store`. Safe to share across
    threads, and any number of SqlStore objects (in any number of processes) may use the same database."""

    def __init__(self, engine: Engine, *, clock: Callable[[], datetime] | None = None) -> None:
        self._engine = engine
        self._clock = clock or _utcnow
        self._where = _describe(engine)

    @property
    def engine(self) -> Engine:
        return self._engine

    def close(self) -> None:
        self._engine.dispose()

    def __enter__(self) -> SqlStore:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # transactions

    def _guard(self, action: str) -> AbstractContextManager[None]:
        """`_boundary` for this store: database failures and damaged rows become InfraError."""
        return _boundary(action, self._where, self._engine)

    def _now(self) -> datetime:
        return _aware(self._clock(), "clock()")

    @contextmanager
    def _read(self) -> Iterator[Connection]:
        with self._engine.connect() as conn, conn.begin():
            yield conn

    @contextmanager
    def _write(self) -> Iterator[Connection]:
        with self._engine.connect() as conn:
            conn.execution_options(**{_WRITE_OPTION: True})
            with conn.begin():
                yield conn

    @staticmethod
    def _fetch_version(conn: Connection, version_id: int) -> ImageVersion | None:
        row = conn.execute(sa.select(versions_table).where(versions_table.c.id == version_id)).mappings().one_or_none()
        return None if row is None else _version(row)

    @staticmethod
    def _not_found(version_id: int) -> NotFound:
        return NotFound(
            f"no image version with id {version_id}",
            fix="`amiforge images list` shows the known versions",
        )

    def _require_version(self, conn: Connection, version_id: int) -> ImageVersion:
        version = self._fetch_version(conn, version_id)
        if version is None:
            raise self._not_found(version_id)
        return version

    # versions

    def create_version(
        self,
        *,
        name: str,
        recipe_digest: str,
        recipe_path: str,
        provider: str,
        tags: Mapping[str, str],
        parent: str | None,
        recipe: str = "",
    ) -> ImageVersion:
        with self._guard(f"create a version of {name}"):
            for attempt in range(1, _CREATE_ATTEMPTS + 1):
                now = self._now()
                try:
                    with self._write() as conn:
                        if conn.dialect.name == "postgresql":
                            # Serialise creators of one name; the IntegrityError retry stays a backstop.
                            conn.execute(sa.select(sa.func.pg_advisory_xact_lock(_name_lock_key(name))))
                        top = conn.execute(
                            sa.select(sa.func.max(versions_table.c.number)).where(versions_table.c.name == name)
                        ).scalar_one()
                        result = conn.execute(
                            versions_table.insert().values(
                                name=name,
                                number=(top or 0) + 1,
                                status=Status.BAKING.value,
                                recipe_digest=recipe_digest,
                                recipe_path=recipe_path,
                                recipe=recipe,
                                provider=provider,
                                parent=parent,
                                tags=dict(tags),
                                log="",
                                created_at=now,
                                updated_at=now,
                            )
                        )
                        return self._require_version(conn, _inserted_id(result))
                except IntegrityError:
                    # A concurrent creator took the same number (PostgreSQL; SQLite writers are serialised).
                    if attempt == _CREATE_ATTEMPTS:
                        raise
                    time.sleep(0.01 * attempt)
        raise AssertionError("unreachable")  # pragma: no cover

    def get_version(self, ref: str) -> ImageVersion:
        """The version a ref names: `NAME@N`, `NAME:CHANNEL` (the channel's current version) or a digest prefix."""
        text = ref.strip()
        match = _REF_NAME_AT_N.match(text)
        if match:
            if len(match["number"]) > 18:  # beyond the database's integers (and Python's int() of huge text)
                raise _out_of_range(f"look up {text[:40]}")
            where: sa.ColumnElement[bool] = sa.and_(
                versions_table.c.name == match["name"], versions_table.c.number == int(match["number"])
            )
            with self._guard(f"look up {text}"), self._read() as conn:
                row = conn.execute(sa.select(versions_table).where(where)).mappings().one_or_none()
            if row is None:
                raise NotFound(
                    f"no image version {text}",
                    fix="`amiforge images list` shows the known versions",
                )
            return _version(row)
        if not text.lower().startswith("sha256:") and _REF_CHANNEL.match(text):
            name, channel = text.split(":", 1)
            pointers = self.channels(name, channel)
            if not pointers:
                raise NotFound(
                    f"image {name!r} has no channel {channel!r}",
                    fix="`amiforge channels` lists the channels; use NAME@N for a version in none",
                )
            return self.get_version(pointers[0].current)
        return self._by_digest_prefix(text, _digest_prefix(text))

    def _by_digest_prefix(self, ref: str, prefix: str) -> ImageVersion:
        # Digests may be stored bare or as "sha256:<hex>"; a prefix matches either spelling.
        where = sa.or_(
            versions_table.c.digest.startswith(prefix),
            versions_table.c.digest.startswith("sha256:" + prefix),
        )
        with self._guard(f"look up {ref}"), self._read() as conn:
            rows = conn.execute(sa.select(versions_table).where(where).order_by(versions_table.c.id)).mappings().all()
        found = [_version(r) for r in rows]
        if not found:
            raise NotFound(
                f"no image version has a digest starting with {prefix}",
                fix="`amiforge images list` shows the known versions and their digests",
            )
        if len(found) > 1:
            raise ConfigError(
                f"digest prefix {prefix} is ambiguous: it matches {len(found)} versions",
                problems=[Problem(message=f"{v.ref} has digest {v.digest}", field="ref") for v in found],
                fix="give more characters of the digest, or use NAME@N",
            )
        return found[0]

    def list_versions(self, name: str | None = None) -> list[ImageVersion]:
        query = sa.select(versions_table).order_by(versions_table.c.id.desc())
        if name is not None:
            query = query.where(versions_table.c.name == name)
        with self._guard("list versions"), self._read() as conn:
            return [_version(r) for r in conn.execute(query).mappings()]

    def latest(self, name: str, statuses: Sequence[Status]) -> ImageVersion | None:
        if not statuses:
            return None
        query = (
            sa.select(versions_table)
            .where(versions_table.c.name == name, versions_table.c.status.in_([s.value for s in statuses]))
            .order_by(versions_table.c.number.desc())
            .limit(1)
        )
        with self._guard(f"find the latest version of {name}"), self._read() as conn:
            row = conn.execute(query).mappings().one_or_none()
        return None if row is None else _version(row)

    def transition(
        self,
        version_id: int,
        target: Status,
        *,
        expect: Status,
        digest: str | None = None,
        size_bytes: int | None = None,
    ) -> ImageVersion:
        check_transition(expect, target)
        values: dict[str, object] = {"status": target.value, "updated_at": self._now()}
        if digest is not None:
            values["digest"] = digest
        if size_bytes is not None:
            values["size_bytes"] = size_bytes
        with self._guard(f"move version {version_id} to {target}"), self._write() as conn:
            # The compare-and-set: the row changes only if nobody moved it since the caller looked.
            result = conn.execute(
                versions_table.update()
                .where(versions_table.c.id == version_id, versions_table.c.status == expect.value)
                .values(**values)
            )
            current = self._require_version(conn, version_id)
            if result.rowcount == 0:
                raise StateError(
                    f"{current.ref} is now '{current.status}', not '{expect}': another worker changed it first",
                    fix=f"re-read the version (`amiforge images show {current.ref}`) and decide again",
                )
            return current

    def append_log(self, version_id: int, text: str) -> None:
        with self._guard(f"append to the log of version {version_id}"), self._write() as conn:
            result = conn.execute(
                versions_table.update().where(versions_table.c.id == version_id).values(log=versions_table.c.log + text)
            )
            if result.rowcount == 0:
                raise self._not_found(version_id)

    # artifacts, layers, boot reports

    def add_artifact(self, version_id: int, artifact: Artifact) -> Artifact:
        created_at = _aware(artifact.created_at, "created_at") if artifact.created_at else self._now()
        with self._guard(f"record an artifact of version {version_id}"), self._write() as conn:
            version = self._require_version(conn, version_id)
            # Idempotent for a resumed run: recording the same copy twice returns the first record.
            existing = (
                conn.execute(
                    sa.select(artifacts_table).where(
                        artifacts_table.c.version_id == version_id,
                        artifacts_table.c.provider == artifact.provider,
                        artifacts_table.c.region == artifact.region,
                        artifacts_table.c.location == artifact.location,
                    )
                )
                .mappings()
                .one_or_none()
            )
            if existing is not None:
                if existing["digest"] != artifact.digest:
                    raise StateError(
                        f"{version.ref} already has an artifact at {artifact.region}:{artifact.location} "
                        f"with digest {existing['digest']}, not {artifact.digest}",
                        fix="an artifact's content never changes; give the new copy a new location",
                    )
                return _artifact(existing)
            result = conn.execute(
                artifacts_table.insert().values(
                    version_id=version_id,
                    provider=artifact.provider,
                    region=artifact.region,
                    location=artifact.location,
                    digest=artifact.digest,
                    size_bytes=artifact.size_bytes,
                    kernel=artifact.kernel,
                    initrd=artifact.initrd,
                    created_at=created_at,
                )
            )
            artifact_id = _inserted_id(result)
        return replace(artifact, id=artifact_id, version_id=version_id, created_at=created_at)

    def artifacts(self, version_id: int) -> list[Artifact]:
        query = (
            sa.select(artifacts_table).where(artifacts_table.c.version_id == version_id).order_by(artifacts_table.c.id)
        )
        with self._guard(f"list the artifacts of version {version_id}"), self._read() as conn:
            return [_artifact(r) for r in conn.execute(query).mappings()]

    def provider_artifacts(self, provider: str) -> list[tuple[str, Artifact]]:
        query = (
            sa.select(artifacts_table, versions_table.c.name, versions_table.c.number)
            .join(versions_table, versions_table.c.id == artifacts_table.c.version_id)
            .where(artifacts_table.c.provider == provider)
            .order_by(artifacts_table.c.id)
        )
        with self._guard(f"list the {provider} artifacts"), self._read() as conn:
            return [(f"{r['name']}@{r['number']}", _artifact(r)) for r in conn.execute(query).mappings()]

    def record_layers(self, version_id: int, layers: Sequence[LayerRecord]) -> None:
        with self._guard(f"record the layers of version {version_id}"), self._write() as conn:
            self._require_version(conn, version_id)
            # Replace, not append: a resumed bake records its layers again and must not duplicate them.
            conn.execute(layers_table.delete().where(layers_table.c.version_id == version_id))
            if layers:
                conn.execute(
                    layers_table.insert(),
                    [
                        {
                            "version_id": version_id,
                            "index": layer.index,
                            "key": layer.key,
                            "description": layer.description,
                            "hit": layer.hit,
                            "seconds": layer.seconds,
                            "size_bytes": layer.size_bytes,
                        }
                        for layer in layers
                    ],
                )

    def layers(self, version_id: int) -> list[LayerRecord]:
        query = sa.select(layers_table).where(layers_table.c.version_id == version_id).order_by(layers_table.c["index"])
        with self._guard(f"list the layers of version {version_id}"), self._read() as conn:
            return [_layer(r) for r in conn.execute(query).mappings()]

    def add_boot_report(self, version_id: int, report: BootReport) -> BootReport:
        started_at = _aware(report.started_at, "started_at")
        checks = [{"name": c.name, "kind": c.kind, "passed": c.passed, "detail": c.detail} for c in report.checks]
        with self._guard(f"record a boot report of version {version_id}"), self._write() as conn:
            self._require_version(conn, version_id)
            result = conn.execute(
                boot_reports_table.insert().values(
                    version_id=version_id,
                    time_to_ready=report.time_to_ready,
                    checks=checks,
                    console=report.console,
                    accel=report.accel,
                    started_at=started_at,
                    duration=report.duration,
                )
            )
            report_id = _inserted_id(result)
        return replace(report, id=report_id, version_id=version_id, started_at=started_at)

    def boot_reports(self, version_id: int) -> list[BootReport]:
        query = (
            sa.select(boot_reports_table)
            .where(boot_reports_table.c.version_id == version_id)
            .order_by(boot_reports_table.c.id)
        )
        with self._guard(f"list the boot reports of version {version_id}"), self._read() as conn:
            return [_boot_report(r) for r in conn.execute(query).mappings()]

    # events

    def append_event(
        self, kind: str, *, actor: str, ref: str | None = None, data: Mapping[str, object] | None = None
    ) -> Event:
        with self._guard(f"record a {kind} event"), self._write() as conn:
            return self._append(conn, kind, actor=actor, ref=ref, data=data)

    def _append(
        self, conn: Connection, kind: str, *, actor: str, ref: str | None, data: Mapping[str, object] | None
    ) -> Event:
        """Append an event inside the caller's write transaction: a change and its audit record commit together."""
        payload = _plain_json(data or {})
        # FOR UPDATE locks the head row on PostgreSQL; on SQLite, BEGIN IMMEDIATE holds the write lock.
        head = conn.execute(
            sa.select(event_head_table.c.seq, event_head_table.c.hash)
            .where(event_head_table.c.id == 1)
            .with_for_update()
        ).one_or_none()
        if head is None:
            raise InfraError(
                "the event log has no head row: the registry schema is damaged",
                fix="restore the registry from a backup; `amiforge events --verify` shows what is broken",
            )
        seq = head.seq + 1
        at = self._now()
        digest = event_hash(head.hash, seq=seq, at=at, actor=actor, kind=kind, ref=ref, data=payload)
        conn.execute(
            events_table.insert().values(
                seq=seq,
                at=at,
                actor=actor,
                kind=kind,
                ref=ref,
                data=payload,
                prev_hash=head.hash,
                hash=digest,
            )
        )
        moved = conn.execute(
            event_head_table.update()
            .where(event_head_table.c.id == 1, event_head_table.c.hash == head.hash)
            .values(seq=seq, hash=digest)
        )
        if moved.rowcount != 1:
            # Only possible if something bypassed the lock; refuse rather than fork the chain.
            raise InfraError(f"the event log head moved while appending seq {seq}", retryable=True)
        return Event(seq=seq, at=at, actor=actor, kind=kind, ref=ref, data=payload, prev_hash=head.hash, hash=digest)

    def events(self, ref: str | None = None, *, limit: int | None = None) -> list[Event]:
        query = sa.select(events_table)
        if ref is not None:
            query = query.where(events_table.c.ref == ref)
        if limit is None:
            query = query.order_by(events_table.c.seq)
        else:
            # The newest `limit`, fetched newest-first and turned around below.
            query = query.order_by(events_table.c.seq.desc()).limit(max(limit, 0))
        with self._guard("read events"), self._read() as conn:
            found = [_event(r) for r in conn.execute(query).mappings()]
        return found if limit is None else found[::-1]

    def verify_events(self) -> list[str]:
        problems: list[str] = []
        # `data` and `at` are read raw and decoded here, so a row whose data is no longer JSON or whose time is no
        # longer a time is reported as the tampering it is, instead of stopping the check that exists to find it.
        raw_columns = ("data", "at")
        columns = [c for c in events_table.columns if c.name not in raw_columns]
        raw_values = [sa.type_coerce(events_table.c[name], sa.Text).label(name) for name in raw_columns]
        query = sa.select(*columns, *raw_values)
        with self._guard("verify the event log"), self._read() as conn:
            prev_hash, expected_seq, last_seq = GENESIS_HASH, 1, 0
            for raw in conn.execute(query.order_by(events_table.c.seq)).mappings():
                try:
                    data = json.loads(raw["data"]) if isinstance(raw["data"], str | bytes) else raw["data"]
                    at = raw["at"] if isinstance(raw["at"], datetime) else datetime.fromisoformat(str(raw["at"]))
                    e = _event(
                        cast(RowMapping, {**raw, "data": data, "at": at if at.tzinfo else at.replace(tzinfo=UTC)})
                    )
                except (ValueError, InfraError):
                    problems.append(f"seq {raw['seq']}: its data or time cannot be read; the row was changed after it "
                                    "was written")  # fmt: skip
                    prev_hash, expected_seq, last_seq = raw["hash"], int(raw["seq"]) + 1, int(raw["seq"])
                    continue
                if e.seq != expected_seq:
                    missing = f"seq {expected_seq}" if e.seq == expected_seq + 1 else f"seq {expected_seq}..{e.seq - 1}"
                    problems.append(f"{missing} missing: events were deleted before seq {e.seq}")
                if e.prev_hash != prev_hash:
                    problems.append(
                        f"seq {e.seq}: prev_hash {_short(e.prev_hash)} does not match the hash of the event "
                        f"before it ({_short(prev_hash)})"
                    )
                recomputed = event_hash(
                    e.prev_hash, seq=e.seq, at=e.at, actor=e.actor, kind=e.kind, ref=e.ref, data=e.data
                )
                if recomputed != e.hash:
                    problems.append(
                        f"seq {e.seq}: hash mismatch: the stored hash {_short(e.hash)} does not match the "
                        f"event's contents ({_short(recomputed)}); the row was changed after it was written"
                    )
                prev_hash, expected_seq, last_seq = e.hash, e.seq + 1, e.seq
            head = conn.execute(
                sa.select(event_head_table.c.seq, event_head_table.c.hash).where(event_head_table.c.id == 1)
            ).one_or_none()
        if head is None:
            problems.append("head: the event_head row is missing")
        elif head.seq != last_seq or head.hash != prev_hash:
            problems.append(
                f"head mismatch: the head records seq {head.seq} ({_short(head.hash)}) but the newest "
                f"event is seq {last_seq} ({_short(prev_hash)}); the newest events were deleted or "
                "written outside amiforge"
            )
        return problems

    # scans

    def add_scan(self, version_id: int, scan: ScanRecord) -> ScanRecord:
        with self._guard(f"record a scan of version {version_id}"), self._write() as conn:
            self._require_version(conn, version_id)
            result = conn.execute(
                scans_table.insert().values(
                    version_id=version_id,
                    scanned_at=scan.scanned_at,
                    packages=[[p.name, p.version, p.arch, p.source, p.source_version] for p in scan.packages],
                    sbom=scan.sbom,
                    sbom_digest=scan.sbom_digest,
                    findings=[_finding_row(f) for f in scan.findings],
                    vulndb=scan.vulndb,
                )
            )
            return replace(scan, id=_inserted_id(result), version_id=version_id)

    def latest_scan(self, version_id: int) -> ScanRecord | None:
        query = (
            sa.select(scans_table).where(scans_table.c.version_id == version_id).order_by(scans_table.c.id.desc())
        ).limit(1)
        with self._guard(f"read the scan of version {version_id}"), self._read() as conn:
            row = conn.execute(query).mappings().one_or_none()
            return None if row is None else _scan(row)

    # the vulnerability database

    def import_advisories(
        self, source: str, records: Sequence[tuple[str, str, Mapping[str, Any], Sequence[str]]]
    ) -> VulnDbImport:
        """Store raw OSV records (id, modified, record, source packages it names); a re-imported id is replaced."""
        now = self._now()
        with self._guard(f"import advisories from {source}"), self._write() as conn:
            import_id = _inserted_id(
                conn.execute(vulndb_imports_table.insert().values(source=source, imported_at=now, count=len(records)))
            )
            ids = [r[0] for r in records]
            for chunk in range(0, len(ids), 500):
                part = ids[chunk : chunk + 500]
                conn.execute(advisory_packages_table.delete().where(advisory_packages_table.c.advisory_id.in_(part)))
                conn.execute(advisories_table.delete().where(advisories_table.c.id.in_(part)))
            if records:
                conn.execute(
                    advisories_table.insert(),
                    [{"id": i, "import_id": import_id, "modified": m, "record": dict(r)} for i, m, r, _ in records],
                )
                links = [{"advisory_id": i, "package": p} for i, _, _, pkgs in records for p in sorted(set(pkgs))]
                if links:
                    conn.execute(advisory_packages_table.insert(), links)
        return VulnDbImport(import_id, source, now, len(records))

    def advisories_for(self, packages: Collection[str]) -> list[dict[str, Any]]:
        """The raw records of every advisory naming one of these (source) package names."""
        names = sorted(set(packages))
        found: dict[str, dict[str, Any]] = {}
        with self._guard("read advisories"), self._read() as conn:
            for chunk in range(0, len(names), 500):
                query = (
                    sa.select(advisories_table.c.id, advisories_table.c.record)
                    .join(advisory_packages_table, advisory_packages_table.c.advisory_id == advisories_table.c.id)
                    .where(advisory_packages_table.c.package.in_(names[chunk : chunk + 500]))
                )
                for advisory_id, record in conn.execute(query):
                    found[advisory_id] = record
        return [found[k] for k in sorted(found)]

    def vulndb_imports(self) -> list[VulnDbImport]:
        with self._guard("list advisory imports"), self._read() as conn:
            rows = conn.execute(sa.select(vulndb_imports_table).order_by(vulndb_imports_table.c.id)).mappings()
            return [VulnDbImport(r["id"], r["source"], r["imported_at"], r["count"]) for r in rows]

    def advisory_count(self) -> int:
        with self._guard("count advisories"), self._read() as conn:
            return int(conn.execute(sa.select(sa.func.count()).select_from(advisories_table)).scalar_one())

    # signing keys and signatures

    def add_key(self, key: TrustedKey, *, actor: str) -> tuple[TrustedKey, bool]:
        """Trust `key`; (the trusted key, whether this call added it). Adding it and its `key.added` event are one
        transaction, and the existence check is inside it: callers racing to trust one key record it once."""
        for attempt in (1, 2):
            try:
                with self._guard(f"trust key {key.key_id}"), self._write() as conn:
                    row = conn.execute(
                        sa.select(signing_keys_table).where(signing_keys_table.c.key_id == key.key_id)
                    ).mappings().one_or_none()  # fmt: skip
                    if row is not None:
                        if row["public_key"].strip() != key.public_key.strip():
                            raise StateError(
                                f"a different public key is already trusted as {key.key_id}",
                                fix="key ids are derived from the public key; this should not happen — check the "
                                "key files",
                            )
                        return _key(row), False
                    conn.execute(
                        signing_keys_table.insert().values(
                            key_id=key.key_id, algorithm=key.algorithm, public_key=key.public_key, added_at=key.added_at
                        )
                    )
                    self._append(conn, "key.added", actor=actor, ref=None,
                                 data={"key": key.key_id, "algorithm": key.algorithm})  # fmt: skip
                return key, True
            except InfraError as e:
                # PostgreSQL: a concurrent insert of the same key won the race; read it back as existing.
                if attempt == 2 or not isinstance(e.__cause__, IntegrityError):
                    raise
        raise AssertionError("unreachable")  # pragma: no cover

    def signing_keys(self) -> list[TrustedKey]:
        with self._guard("list signing keys"), self._read() as conn:
            rows = conn.execute(sa.select(signing_keys_table).order_by(signing_keys_table.c.added_at)).mappings()
            return [_key(r) for r in rows]

    def revoke_key(self, key_id: str, reason: str, *, actor: str) -> TrustedKey:
        """Stop trusting a key; the `key.revoked` event is recorded in the same transaction."""
        now = self._now()
        with self._guard(f"revoke key {key_id}"), self._write() as conn:
            result = conn.execute(
                signing_keys_table.update()
                .where(signing_keys_table.c.key_id == key_id, signing_keys_table.c.revoked_at.is_(None))
                .values(revoked_at=now, revoked_reason=reason)
            )
            row = conn.execute(
                sa.select(signing_keys_table).where(signing_keys_table.c.key_id == key_id)
            ).mappings().one_or_none()  # fmt: skip
            if row is None:
                raise NotFound(f"no signing key {key_id}", fix="`amiforge keys list` shows the trusted keys")
            if result.rowcount == 0:
                raise StateError(
                    f"key {key_id} was already revoked at {row['revoked_at']:%Y-%m-%d %H:%M}Z",
                    fix="nothing to do: its signatures no longer verify",
                )
            self._append(conn, "key.revoked", actor=actor, ref=None, data={"key": key_id, "reason": reason})
            return _key(row)

    def add_signature(self, version_id: int, signature: SignatureRecord) -> SignatureRecord:
        with self._guard(f"record a signature of version {version_id}"), self._write() as conn:
            self._require_version(conn, version_id)
            result = conn.execute(
                signatures_table.insert().values(
                    version_id=version_id,
                    key_id=signature.key_id,
                    envelope=signature.envelope,
                    statement_digest=signature.statement_digest,
                    signed_at=signature.signed_at,
                )
            )
            return replace(signature, id=_inserted_id(result), version_id=version_id)

    def signatures(self, version_id: int) -> list[SignatureRecord]:
        query = sa.select(signatures_table).where(signatures_table.c.version_id == version_id).order_by(
            signatures_table.c.id
        )  # fmt: skip
        with self._guard(f"list signatures of version {version_id}"), self._read() as conn:
            return [
                SignatureRecord(r["key_id"], r["envelope"], r["statement_digest"], r["signed_at"], r["id"], version_id)
                for r in conn.execute(query).mappings()
            ]

    # operations

    def begin_operation(self, kind: str, version_id: int, *, actor: str, new_run_id: str) -> Operation:
        with self._guard(f"start {kind} of version {version_id}"), self._write() as conn:
            self._require_version(conn, version_id)
            earlier = conn.execute(
                sa.select(operations_table.c.run_id)
                .where(operations_table.c.version_id == version_id, operations_table.c.kind == kind)
                .order_by(operations_table.c.id)
                .limit(1)
            ).scalar_one_or_none()
            row_id = _inserted_id(conn.execute(
                operations_table.insert().values(
                    kind=kind, version_id=version_id, run_id=earlier or new_run_id, state="running", actor=actor,
                    started_at=self._now(), finished_at=None, detail={},
                )
            ))  # fmt: skip
        return self._operation(row_id)

    def update_operation(self, operation_id: int, state: str, detail: Mapping[str, object]) -> Operation:
        if state not in ("running", "done", "failed"):
            raise ValueError(f"an operation is running, done or failed, not {state!r}")
        with self._guard(f"finish operation {operation_id}"), self._write() as conn:
            conn.execute(
                operations_table.update()
                .where(operations_table.c.id == operation_id)
                .values(state=state, finished_at=None if state == "running" else self._now(), detail=dict(detail))
            )
        return self._operation(operation_id)

    def operations(self, version_id: int, kind: str | None = None) -> list[Operation]:
        query = sa.select(operations_table).where(operations_table.c.version_id == version_id)
        if kind is not None:
            query = query.where(operations_table.c.kind == kind)
        with self._guard(f"list operations of version {version_id}"), self._read() as conn:
            return [_operation(r) for r in conn.execute(query.order_by(operations_table.c.id)).mappings()]

    def _operation(self, operation_id: int) -> Operation:
        with self._guard(f"read operation {operation_id}"), self._read() as conn:
            row = conn.execute(sa.select(operations_table).where(operations_table.c.id == operation_id)).mappings()
            found = row.one_or_none()
        if found is None:
            raise NotFound(f"no operation {operation_id}")
        return _operation(found)

    # rollouts

    def create_rollout(
        self, target: str, version_id: int, *, strategy: Mapping[str, object], waves: Sequence[int], actor: str
    ) -> Rollout:
        now = self._now()
        with self._guard(f"start a rollout on {target}"), self._write() as conn:
            self._require_version(conn, version_id)
            busy = conn.execute(
                sa.select(rollouts_table.c.id, rollouts_table.c.state).where(
                    rollouts_table.c.target == target, rollouts_table.c.state.in_(ROLLOUT_LIVE)
                )
            ).first()
            if busy is not None:
                raise StateError(
                    f"rollout #{busy.id} on {target} is {busy.state}",
                    fix=f"amiforge rollout resume {busy.id} (or abort it) before starting another",
                )
            row_id = _inserted_id(conn.execute(
                rollouts_table.insert().values(
                    target=target, version_id=version_id, strategy=dict(strategy), waves=list(waves), wave=0,
                    state="running", requested=None, actor=actor, started_at=now, updated_at=now, finished_at=None,
                    detail={},
                )
            ))  # fmt: skip
        return self.get_rollout(row_id)

    def get_rollout(self, rollout_id: int) -> Rollout:
        found = self._rollout_rows(rollouts_table.c.id == rollout_id)
        if not found:
            raise NotFound(f"no rollout #{rollout_id}", fix="amiforge rollout status lists the rollouts")
        return found[0]

    def rollouts(self, *, target: str | None = None, version_id: int | None = None) -> list[Rollout]:
        where: sa.ColumnElement[bool] = sa.true()
        if target is not None:
            where = where & (rollouts_table.c.target == target)
        if version_id is not None:
            where = where & (rollouts_table.c.version_id == version_id)
        return self._rollout_rows(where)

    def _rollout_rows(self, where: sa.ColumnElement[bool]) -> list[Rollout]:
        query = (
            sa.select(rollouts_table, versions_table.c.name, versions_table.c.number)
            .join(versions_table, versions_table.c.id == rollouts_table.c.version_id)
            .where(where)
            .order_by(rollouts_table.c.id)
        )
        with self._guard("read rollouts"), self._read() as conn:
            return [_rollout(r) for r in conn.execute(query).mappings()]

    def update_rollout(
        self,
        rollout_id: int,
        *,
        expect: str,
        state: str | None = None,
        wave: int | None = None,
        detail: Mapping[str, object] | None = None,
        clear_request: bool = False,
    ) -> Rollout:
        now = self._now()
        values: dict[str, object] = {"updated_at": now}
        if state is not None:
            values["state"] = state
            if state not in ROLLOUT_LIVE:
                values["finished_at"] = now
        if wave is not None:
            values["wave"] = wave
        if detail is not None:
            values["detail"] = dict(detail)
        if clear_request:
            values["requested"] = None
        with self._guard(f"update rollout #{rollout_id}"), self._write() as conn:
            result = conn.execute(
                rollouts_table.update()
                .where(rollouts_table.c.id == rollout_id, rollouts_table.c.state == expect)
                .values(**values)
            )
            if result.rowcount == 0:
                raise StateError(
                    f"rollout #{rollout_id} is no longer {expect} (another controller moved it)",
                    fix=f"amiforge rollout status {rollout_id}",
                )
        return self.get_rollout(rollout_id)

    def request_rollout(self, rollout_id: int, request: str) -> Rollout:
        if request not in ("pause", "abort"):
            raise ValueError(f"a rollout can be asked to pause or abort, not {request!r}")
        with self._guard(f"ask rollout #{rollout_id} to {request}"), self._write() as conn:
            result = conn.execute(
                rollouts_table.update()
                .where(rollouts_table.c.id == rollout_id, rollouts_table.c.state.in_(ROLLOUT_LIVE))
                .values(requested=request, updated_at=self._now())
            )
        if result.rowcount == 0:
            rollout = self.get_rollout(rollout_id)  # NotFound, or:
            raise StateError(f"rollout #{rollout_id} is {rollout.state} already", fix="nothing to do")
        return self.get_rollout(rollout_id)

    def plan_replacements(
        self, rollout_id: int, wave: int, kind: str, items: Sequence[tuple[str, str | None, str]]
    ) -> list[RolloutReplacement]:
        now = self._now()
        with self._guard(f"plan replacements of rollout #{rollout_id}"), self._write() as conn:
            for old_member, old_version, token in items:
                known = conn.execute(
                    sa.select(rollout_replacements_table.c.id).where(rollout_replacements_table.c.token == token)
                ).first()
                if known is None:
                    conn.execute(
                        rollout_replacements_table.insert().values(
                            rollout_id=rollout_id, wave=wave, kind=kind, old_member=old_member,
                            old_version=old_version, token=token, new_member=None, state="planned", at=now,
                        )
                    )  # fmt: skip
        tokens = {token for _, _, token in items}
        return [r for r in self.replacements(rollout_id) if r.token in tokens]

    def finish_replacement(self, token: str, *, new_member: str, state: str) -> RolloutReplacement:
        if state not in ("done", "failed"):
            raise ValueError(f"a replacement ends done or failed, not {state!r}")
        table = rollout_replacements_table
        with self._guard(f"record replacement {token}"), self._write() as conn:
            conn.execute(
                table.update().where(table.c.token == token).values(new_member=new_member, state=state, at=self._now())
            )
            row = conn.execute(sa.select(table).where(table.c.token == token)).mappings().one_or_none()
        if row is None:
            raise NotFound(f"no replacement with token {token}")
        return _replacement(row)

    def replacements(self, rollout_id: int) -> list[RolloutReplacement]:
        table = rollout_replacements_table
        query = sa.select(table).where(table.c.rollout_id == rollout_id).order_by(table.c.id)
        with self._guard(f"list replacements of rollout #{rollout_id}"), self._read() as conn:
            return [_replacement(r) for r in conn.execute(query).mappings()]

    def add_decision(
        self, rollout_id: int, wave: int, *, passed: bool, action: str, numbers: Mapping[str, object]
    ) -> RolloutDecision:
        with self._guard(f"record a decision of rollout #{rollout_id}"), self._write() as conn:
            row_id = _inserted_id(conn.execute(
                rollout_decisions_table.insert().values(
                    rollout_id=rollout_id, wave=wave, at=self._now(), passed=passed, action=action,
                    numbers=dict(numbers),
                )
            ))  # fmt: skip
        (decision,) = [d for d in self.decisions(rollout_id) if d.id == row_id]
        return decision

    def decisions(self, rollout_id: int) -> list[RolloutDecision]:
        table = rollout_decisions_table
        query = sa.select(table).where(table.c.rollout_id == rollout_id).order_by(table.c.id)
        with self._guard(f"list decisions of rollout #{rollout_id}"), self._read() as conn:
            return [_decision(r) for r in conn.execute(query).mappings()]

    # channels

    def move_channel(
        self, name: str, channel: str, version_id: int, *, expect_current: int | None, actor: str, reason: str
    ) -> ChannelPointer:
        """Point `name:channel` at the version, compare-and-set on the current pointer (None: no pointer yet).
        The old current becomes `previous` (the rollback image). A lost race raises StateError."""
        now = self._now()
        key = (channels_table.c.name == name) & (channels_table.c.channel == channel)
        with self._guard(f"move {name}:{channel}"), self._write() as conn:
            version = self._require_version(conn, version_id)
            # Re-checked inside the write transaction: a revoke that lands after the gates were judged still wins.
            if version.status not in (Status.SIGNED, Status.SCANNED, Status.TESTED, Status.BUILT):
                raise StateError(
                    f"{version.ref} is {version.status} and cannot be put in a channel",
                    fix="promote another version",
                )
            if expect_current is None:
                try:
                    conn.execute(
                        channels_table.insert().values(
                            name=name, channel=channel, version_id=version_id, previous_version_id=None,
                            moved_at=now, moved_by=actor, reason=reason,
                        )
                    )  # fmt: skip
                except IntegrityError as e:
                    raise StateError(
                        f"{name}:{channel} was created by someone else meanwhile", fix="look again and retry"
                    ) from e
            else:
                result = conn.execute(
                    channels_table.update()
                    .where(key, channels_table.c.version_id == expect_current)
                    .values(
                        version_id=version_id, previous_version_id=expect_current, moved_at=now, moved_by=actor,
                        reason=reason,
                    )
                )  # fmt: skip
                if result.rowcount == 0:
                    raise StateError(
                        f"{name}:{channel} moved meanwhile (compare-and-set lost)", fix="look again and retry"
                    )
            conn.execute(
                channel_moves_table.insert().values(
                    name=name, channel=channel, version_id=version_id, at=now, actor=actor, reason=reason
                )
            )
        (pointer,) = self.channels(name, channel)
        return pointer

    def channels(self, name: str | None = None, channel: str | None = None) -> list[ChannelPointer]:
        cur = versions_table.alias("cur")
        prev = versions_table.alias("prev")
        query = (
            sa.select(channels_table, cur.c.name.label("cur_name"), cur.c.number.label("cur_number"),
                      prev.c.number.label("prev_number"))
            .join(cur, cur.c.id == channels_table.c.version_id)
            .outerjoin(prev, prev.c.id == channels_table.c.previous_version_id)
            .order_by(channels_table.c.name, channels_table.c.channel)
        )  # fmt: skip
        if name is not None:
            query = query.where(channels_table.c.name == name)
        if channel is not None:
            query = query.where(channels_table.c.channel == channel)
        with self._guard("list channels"), self._read() as conn:
            return [
                ChannelPointer(
                    name=r["name"],
                    channel=r["channel"],
                    current=f"{r['cur_name']}@{r['cur_number']}",
                    previous=f"{r['name']}@{r['prev_number']}" if r["prev_number"] is not None else None,
                    moved_at=r["moved_at"],
                    moved_by=r["moved_by"],
                    reason=r["reason"],
                )
                for r in conn.execute(query).mappings()
            ]

    def channel_entries(self, version_id: int) -> dict[str, datetime]:
        """channel -> when this version last entered it (for soak times)."""
        query = sa.select(channel_moves_table.c.channel, sa.func.max(channel_moves_table.c.at)).where(
            channel_moves_table.c.version_id == version_id
        ).group_by(channel_moves_table.c.channel)  # fmt: skip
        with self._guard(f"read channel history of version {version_id}"), self._read() as conn:
            # max() keeps the column type (UtcDateTime), so the values come back aware.
            return {ch: at for ch, at in conn.execute(query)}


def _digest_prefix(ref: str) -> str:
    """The hex digest prefix a non-NAME@N ref stands for; ConfigError if it is no valid ref at all."""
    hexpart = ref[len("sha256:") :] if ref.lower().startswith("sha256:") else ref
    hexpart = hexpart.lower()
    if not hexpart or not _HEX.match(hexpart):
        raise ConfigError(
            f"{ref!r} is not a version reference",
            fix="use NAME@N, NAME:CHANNEL or a digest prefix (at least 8 hex characters, optionally after sha256:)",
        )
    if len(hexpart) < _MIN_PREFIX:
        raise ConfigError(
            f"digest prefix {hexpart!r} is too short ({len(hexpart)} characters)",
            fix=f"use NAME@N or a digest prefix of at least {_MIN_PREFIX} hex characters",
        )
    return hexpart


# --- supply chain rows ------------------------------------------------------------------------------------------


def _finding_row(f: Finding) -> dict[str, Any]:
    return {
        "kind": f.kind.value,
        "id": f.id,
        "severity": f.severity.value,
        "title": f.title,
        "source": f.source,
        "package": f.package,
        "installed": f.installed,
        "fixed": f.fixed,
        "aliases": list(f.aliases),
        "path": f.path,
        "line": f.line,
        "redacted": f.redacted,
    }


def _finding(d: Mapping[str, Any]) -> Finding:
    return Finding(
        kind=FindingKind(d["kind"]),
        id=d["id"],
        severity=Severity(d["severity"]),
        title=d["title"],
        source=d["source"],
        package=d.get("package"),
        installed=d.get("installed"),
        fixed=d.get("fixed"),
        aliases=tuple(d.get("aliases") or ()),
        path=d.get("path"),
        line=d.get("line"),
        redacted=d.get("redacted"),
    )


@_reads("scans")
def _scan(m: RowMapping) -> ScanRecord:
    return ScanRecord(
        scanned_at=m["scanned_at"],
        packages=tuple(Package(*p) for p in m["packages"]),
        sbom=m["sbom"],
        sbom_digest=m["sbom_digest"],
        findings=tuple(_finding(f) for f in m["findings"]),
        vulndb=m["vulndb"],
        id=m["id"],
        version_id=m["version_id"],
    )


@_reads("signing_keys", "key_id")
def _key(m: RowMapping) -> TrustedKey:
    return TrustedKey(
        key_id=m["key_id"],
        algorithm=m["algorithm"],
        public_key=m["public_key"],
        added_at=m["added_at"],
        revoked_at=m["revoked_at"],
        revoked_reason=m["revoked_reason"],
    )
