"""The SQL registry: SQLite by default, PostgreSQL for a team, one code path through SQLAlchemy Core.

This module owns the table definitions (their history lives in `migrations/`), how a URL becomes a configured
engine, ref resolution (`NAME@N`, digest prefix), compare-and-set version transitions, the hash-chained event
log, and the translation of every database failure into `errors.InfraError` at the boundary.
"""

from __future__ import annotations

import hashlib
import json
import re
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import sqlalchemy as sa
from sqlalchemy import event as sa_event
from sqlalchemy.engine import Connection, Dialect, Engine, RowMapping
from sqlalchemy.exc import DBAPIError, IntegrityError, SQLAlchemyError
from sqlalchemy.pool import StaticPool

from amiforge.errors import ConfigError, InfraError, NotFound, Problem, StateError
from amiforge.model import (
    Artifact,
    BootReport,
    CheckResult,
    Event,
    ImageVersion,
    LayerRecord,
    Status,
    check_transition,
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

_REF_NAME_AT_N = re.compile(r"^(?P<name>[a-z0-9][a-z0-9-]{0,62})@(?P<number>[1-9][0-9]*)$")
_REF_CHANNEL = re.compile(r"^[a-z0-9][a-z0-9-]{0,62}:[a-z0-9][a-z0-9-]*$")
_HEX = re.compile(r"^[0-9a-f]+$")

# SQLite primary result codes and PostgreSQL SQLSTATEs after which the same statement may well succeed.
_SQLITE_BUSY, _SQLITE_LOCKED = 5, 6
_RETRYABLE_SQLSTATES = frozenset({"40001", "40P01", "55P03", "57P01", "57P02", "57P03", "53300"})


def _utcnow() -> datetime:
    return datetime.now(UTC)


def _aware(value: datetime, what: str) -> datetime:
    # Naive datetimes are a programming error: we cannot know which zone they meant.
    if value.tzinfo is None or value.utcoffset() is None:
        raise ValueError(f"{what} must be a timezone-aware datetime, got naive {value.isoformat()}")
    return value.astimezone(UTC)


class UtcDateTime(sa.types.TypeDecorator[datetime]):
    """Aware UTC in, aware UTC out. SQLite stores no zone, so results are tagged UTC on the way back."""

    impl = sa.DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        return _aware(value, "timestamp")

    def process_result_value(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:
            return value.replace(tzinfo=UTC)
        return value.astimezone(UTC)


metadata = sa.MetaData()

versions_table = sa.Table(
    "versions",
    metadata,
    sa.Column("id", sa.Integer, primary_key=True),
    sa.Column("name", sa.String(63), nullable=False),
    sa.Column("number", sa.Integer, nullable=False),
    sa.Column("status", sa.String(16), nullable=False),
    sa.Column("recipe_digest", sa.String(128), nullable=False),
    sa.Column("recipe_path", sa.Text, nullable=False),
    sa.Column("recipe", sa.Text, nullable=False, server_default=""),
    sa.Column("provider", sa.String(32), nullable=False),
    sa.Column("digest", sa.String(128), nullable=True),
    sa.Column("size_bytes", sa.BigInteger, nullable=True),
    sa.Column("parent", sa.String(128), nullable=True),
    sa.Column("tags", sa.JSON, nullable=False),
    sa.Column("log", sa.Text, nullable=False, server_default=""),
    sa.Column("created_at", UtcDateTime, nullable=False),
    sa.Column("updated_at", UtcDateTime, nullable=False),
    sa.UniqueConstraint("name", "number", name="uq_versions_name_number"),
    sa.Index("ix_versions_digest", "digest"),
)

artifacts_table = sa.Table(
    "artifacts",
    metadata,
    sa.Column("id", sa.Integer, primary_key=True),
    sa.Column(
        "version_id",
        sa.Integer,
        sa.ForeignKey("versions.id", name="fk_artifacts_version"),
        nullable=False,
    ),
    sa.Column("provider", sa.String(32), nullable=False),
    sa.Column("region", sa.String(128), nullable=False),
    sa.Column("location", sa.Text, nullable=False),
    sa.Column("digest", sa.String(128), nullable=False),
    sa.Column("size_bytes", sa.BigInteger, nullable=False),
    sa.Column("kernel", sa.Text, nullable=True),
    sa.Column("initrd", sa.Text, nullable=True),
    sa.Column("created_at", UtcDateTime, nullable=False),
    sa.UniqueConstraint("version_id", "provider", "region", "location", name="uq_artifacts_copy"),
)

layers_table = sa.Table(
    "layers",
    metadata,
    sa.Column("id", sa.Integer, primary_key=True),
    sa.Column(
        "version_id",
        sa.Integer,
        sa.ForeignKey("versions.id", name="fk_layers_version"),
        nullable=False,
    ),
    sa.Column("index", sa.Integer, nullable=False),
    sa.Column("key", sa.String(128), nullable=False),
    sa.Column("description", sa.Text, nullable=False),
    sa.Column("hit", sa.Boolean, nullable=False),
    sa.Column("seconds", sa.Float, nullable=False),
    sa.Column("size_bytes", sa.BigInteger, nullable=False),
    sa.UniqueConstraint("version_id", "index", name="uq_layers_version_index"),
)

boot_reports_table = sa.Table(
    "boot_reports",
    metadata,
    sa.Column("id", sa.Integer, primary_key=True),
    sa.Column(
        "version_id",
        sa.Integer,
        sa.ForeignKey("versions.id", name="fk_boot_reports_version"),
        nullable=False,
    ),
    sa.Column("passed", sa.Boolean, nullable=False),
    sa.Column("time_to_ready", sa.Float, nullable=True),
    sa.Column("checks", sa.JSON, nullable=False),
    sa.Column("console", sa.Text, nullable=False),
    sa.Column("accel", sa.String(16), nullable=False),
    sa.Column("started_at", UtcDateTime, nullable=False),
    sa.Column("duration", sa.Float, nullable=False),
    sa.Index("ix_boot_reports_version_id", "version_id"),
)

events_table = sa.Table(
    "events",
    metadata,
    # Chosen by the appender (head.seq + 1), never by the database: the hash covers it.
    sa.Column("seq", sa.Integer, primary_key=True, autoincrement=False),
    sa.Column("at", UtcDateTime, nullable=False),
    sa.Column("actor", sa.String(128), nullable=False),
    sa.Column("kind", sa.String(64), nullable=False),
    sa.Column("ref", sa.String(128), nullable=True),
    sa.Column("data", sa.JSON, nullable=False),
    sa.Column("prev_hash", sa.String(64), nullable=False),
    sa.Column("hash", sa.String(64), nullable=False),
    sa.Index("ix_events_ref", "ref"),
)

# One row (id = 1): seq and hash of the newest event. Appenders lock it by updating it, which serialises them,
# and verify_events compares it with the last row, so deleting the newest events is detected too.
event_head_table = sa.Table(
    "event_head",
    metadata,
    sa.Column("id", sa.Integer, primary_key=True, autoincrement=False),
    sa.Column("seq", sa.Integer, nullable=False),
    sa.Column("hash", sa.String(64), nullable=False),
    sa.CheckConstraint("id = 1", name="ck_event_head_single_row"),
)


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
    except sa.exc.ArgumentError as e:
        # The URL is not echoed back: it may carry a password.
        raise ConfigError(
            "the store URL is not a database URL",
            fix="use e.g. sqlite:////var/lib/amiforge/registry.db or postgresql+psycopg://user@host/db",
        ) from e
    if parsed.get_backend_name() != "sqlite":
        try:
            # pre_ping: a server restart between commands should cost a reconnect, not an error.
            return sa.create_engine(parsed, pool_pre_ping=True)
        except (ImportError, sa.exc.NoSuchModuleError) as e:
            raise InfraError(
                f"no database driver for {parsed.drivername}",
                fix="install the PostgreSQL extra: pip install 'amiforge[postgres]'",
            ) from e

    path = _sqlite_file(parsed)
    if path is None:
        # One shared connection, or every pool checkout would see a different empty in-memory database.
        engine = sa.create_engine(parsed, poolclass=StaticPool, connect_args={"check_same_thread": False})
    else:
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise InfraError(
                f"cannot create the registry directory {path.parent}: {e.strerror or e}",
                fix="choose a writable location for the SQLite store, or create the directory",
            ) from e
        engine = sa.create_engine(parsed)

    timeout_ms = int(busy_timeout_s * 1000)

    def on_connect(dbapi_connection: Any, _record: Any) -> None:
        # Take BEGIN away from the sqlite3 module (its legacy mode skips BEGIN before SELECT and DDL), so that
        # reads are repeatable and migrations are transactional; the `begin` hook below emits it instead.
        dbapi_connection.isolation_level = None
        cursor = dbapi_connection.cursor()
        try:
            cursor.execute(f"PRAGMA busy_timeout = {timeout_ms}")
            cursor.execute("PRAGMA foreign_keys = ON")
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


def _infra_error(action: str, where: str, error: SQLAlchemyError) -> InfraError:
    cause = error.orig if isinstance(error, DBAPIError) else error
    retryable = _retryable(error)
    fix = (
        f"the registry at {where} is busy or unreachable; retry, and check that the database is up"
        if retryable
        else f"check the registry at {where}: is the URL right, is the schema migrated? (`amiforge doctor`)"
    )
    return InfraError(
        f"registry error while trying to {action}: {type(cause).__name__}: {cause}",
        retryable=retryable,
        fix=fix,
    )


@contextmanager
def _boundary(action: str, where: str) -> Iterator[None]:
    """Translate every SQLAlchemy failure into InfraError, keeping the original as the cause."""
    try:
        yield
    except SQLAlchemyError as e:
        raise _infra_error(action, where, e) from e


def migrate(engine: Engine) -> None:
    """Bring the schema to the newest migration. Safe to run concurrently and repeatedly."""
    # Imported here: alembic is only needed at open time, not by every importer of the store.
    from alembic import command
    from alembic.config import Config
    from alembic.util.exc import CommandError

    config = Config()
    # ConfigParser interpolation: a literal % in the path must be doubled.
    config.set_main_option("script_location", str(MIGRATIONS_DIR).replace("%", "%%"))
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


def _version(m: RowMapping) -> ImageVersion:
    return ImageVersion(
        id=m["id"],
        name=m["name"],
        number=m["number"],
        status=Status(m["status"]),
        recipe_digest=m["recipe_digest"],
        recipe_path=m["recipe_path"],
        recipe=m["recipe"] or "",
        provider=m["provider"],
        created_at=m["created_at"],
        updated_at=m["updated_at"],
        digest=m["digest"],
        size_bytes=m["size_bytes"],
        parent=m["parent"],
        tags=dict(m["tags"] or {}),
        log=m["log"] or "",
    )


def _artifact(m: RowMapping) -> Artifact:
    return Artifact(
        provider=m["provider"],
        region=m["region"],
        location=m["location"],
        digest=m["digest"],
        size_bytes=m["size_bytes"],
        kernel=m["kernel"],
        initrd=m["initrd"],
        id=m["id"],
        version_id=m["version_id"],
        created_at=m["created_at"],
    )


def _layer(m: RowMapping) -> LayerRecord:
    return LayerRecord(
        index=m["index"],
        key=m["key"],
        description=m["description"],
        hit=bool(m["hit"]),
        seconds=m["seconds"],
        size_bytes=m["size_bytes"],
    )


def _boot_report(m: RowMapping) -> BootReport:
    checks = tuple(
        CheckResult(name=c["name"], kind=c["kind"], passed=bool(c["passed"]), detail=c["detail"]) for c in m["checks"]
    )
    return BootReport(
        passed=bool(m["passed"]),
        time_to_ready=m["time_to_ready"],
        checks=checks,
        console=m["console"],
        accel=m["accel"],
        started_at=m["started_at"],
        duration=m["duration"],
        id=m["id"],
        version_id=m["version_id"],
    )


def _event(m: RowMapping) -> Event:
    return Event(
        seq=m["seq"],
        at=m["at"],
        actor=m["actor"],
        kind=m["kind"],
        ref=m["ref"],
        data=dict(m["data"] or {}),
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
        with _boundary(f"create a version of {name}", self._where):
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
        text = ref.strip()
        match = _REF_NAME_AT_N.match(text)
        if match:
            where: sa.ColumnElement[bool] = sa.and_(
                versions_table.c.name == match["name"], versions_table.c.number == int(match["number"])
            )
            with _boundary(f"look up {text}", self._where), self._read() as conn:
                row = conn.execute(sa.select(versions_table).where(where)).mappings().one_or_none()
            if row is None:
                raise NotFound(
                    f"no image version {text}",
                    fix="`amiforge images list` shows the known versions",
                )
            return _version(row)
        return self._by_digest_prefix(text, _digest_prefix(text))

    def _by_digest_prefix(self, ref: str, prefix: str) -> ImageVersion:
        # Digests may be stored bare or as "sha256:<hex>"; a prefix matches either spelling.
        where = sa.or_(
            versions_table.c.digest.startswith(prefix),
            versions_table.c.digest.startswith("sha256:" + prefix),
        )
        with _boundary(f"look up {ref}", self._where), self._read() as conn:
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
        with _boundary("list versions", self._where), self._read() as conn:
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
        with _boundary(f"find the latest version of {name}", self._where), self._read() as conn:
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
        with _boundary(f"move version {version_id} to {target}", self._where), self._write() as conn:
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
        with _boundary(f"append to the log of version {version_id}", self._where), self._write() as conn:
            result = conn.execute(
                versions_table.update().where(versions_table.c.id == version_id).values(log=versions_table.c.log + text)
            )
            if result.rowcount == 0:
                raise self._not_found(version_id)

    # artifacts, layers, boot reports

    def add_artifact(self, version_id: int, artifact: Artifact) -> Artifact:
        created_at = _aware(artifact.created_at, "created_at") if artifact.created_at else self._now()
        with _boundary(f"record an artifact of version {version_id}", self._where), self._write() as conn:
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
        with _boundary(f"list the artifacts of version {version_id}", self._where), self._read() as conn:
            return [_artifact(r) for r in conn.execute(query).mappings()]

    def record_layers(self, version_id: int, layers: Sequence[LayerRecord]) -> None:
        with _boundary(f"record the layers of version {version_id}", self._where), self._write() as conn:
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
        with _boundary(f"list the layers of version {version_id}", self._where), self._read() as conn:
            return [_layer(r) for r in conn.execute(query).mappings()]

    def add_boot_report(self, version_id: int, report: BootReport) -> BootReport:
        started_at = _aware(report.started_at, "started_at")
        checks = [{"name": c.name, "kind": c.kind, "passed": c.passed, "detail": c.detail} for c in report.checks]
        with _boundary(f"record a boot report of version {version_id}", self._where), self._write() as conn:
            self._require_version(conn, version_id)
            result = conn.execute(
                boot_reports_table.insert().values(
                    version_id=version_id,
                    passed=report.passed,
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
        with _boundary(f"list the boot reports of version {version_id}", self._where), self._read() as conn:
            return [_boot_report(r) for r in conn.execute(query).mappings()]

    # events

    def append_event(
        self, kind: str, *, actor: str, ref: str | None = None, data: Mapping[str, object] | None = None
    ) -> Event:
        payload = _plain_json(data or {})
        with _boundary(f"record a {kind} event", self._where), self._write() as conn:
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
        with _boundary("read events", self._where), self._read() as conn:
            found = [_event(r) for r in conn.execute(query).mappings()]
        return found if limit is None else found[::-1]

    def verify_events(self) -> list[str]:
        problems: list[str] = []
        with _boundary("verify the event log", self._where), self._read() as conn:
            prev_hash, expected_seq, last_seq = GENESIS_HASH, 1, 0
            for row in conn.execute(sa.select(events_table).order_by(events_table.c.seq)).mappings():
                e = _event(row)
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


def _digest_prefix(ref: str) -> str:
    """The hex digest prefix a non-NAME@N ref stands for; ConfigError if it is no valid ref at all."""
    hexpart = ref[len("sha256:") :] if ref.lower().startswith("sha256:") else ref
    if not ref.lower().startswith("sha256:") and _REF_CHANNEL.match(ref):
        raise ConfigError(
            f"{ref!r} names a channel, and channels are not available yet",
            fix="use NAME@N or a digest prefix",
        )
    hexpart = hexpart.lower()
    if not hexpart or not _HEX.match(hexpart):
        raise ConfigError(
            f"{ref!r} is not a version reference",
            fix="use NAME@N or a digest prefix (at least 8 hex characters, optionally after sha256:)",
        )
    if len(hexpart) < _MIN_PREFIX:
        raise ConfigError(
            f"digest prefix {hexpart!r} is too short ({len(hexpart)} characters)",
            fix=f"use NAME@N or a digest prefix of at least {_MIN_PREFIX} hex characters",
        )
    return hexpart
