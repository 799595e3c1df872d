"""Opening the registry: how a URL becomes a configured engine, read-only registries, and the schema migrations.

- SQLite is configured for concurrent use (WAL, foreign keys, a busy timeout, explicit BEGIN; writers take the write
  lock up front when a connection carries the `WRITE_OPTION` execution option);
- a SQLite file this process can only read is opened read-only (immutable on a read-only file system, or a private
  consistent copy when its folder cannot hold SQLite's locks);
- `migrate` brings the schema to the newest revision in `migrations/`, and only reads when it is there already;
  alembic is imported only when the schema is behind.
"""

from __future__ import annotations

import atexit
import functools
import os
import re
import shutil
import tempfile
import threading
import urllib.parse
from importlib import resources
from pathlib import Path
from typing import Any

import sqlalchemy as sa
from sqlalchemy import event as sa_event
from sqlalchemy.engine import Connection, Engine
from sqlalchemy.pool import StaticPool

from amiforge.errors import ConfigError, InfraError
from amiforge.store.boundary import boundary, describe
from amiforge.store.schema import decode_json, encode_json

MIGRATIONS_DIR = Path(__file__).resolve().parent / "migrations"

# Execution option read by the SQLite `begin` hook: writers take the write lock up front (BEGIN IMMEDIATE).
WRITE_OPTION = "amiforge_write"

_DEFAULT_BUSY_TIMEOUT_S = 5.0
# Arbitrary constant: every amiforge process migrating the same PostgreSQL database takes this advisory lock.
_MIGRATION_LOCK_KEY = 0x616D69666F726765  # "amiforge"
_MIGRATION_THREAD_LOCK = threading.Lock()


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
            return sa.create_engine(
                parsed, pool_pre_ping=True, json_deserializer=decode_json, json_serializer=encode_json
            )
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
            parsed,
            poolclass=StaticPool,
            connect_args={"check_same_thread": False},
            json_deserializer=decode_json,
            json_serializer=encode_json,
        )
    elif path.is_file() and not _writable(path):
        # A registry this process may only read (a read-only file, folder or file system): opened read-only, so
        # every read works and any write fails with the database's own "read-only" error.
        read_only = True
        engine = sa.create_engine(_read_only_url(path), json_deserializer=decode_json, json_serializer=encode_json)
    else:
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise InfraError(
                f"cannot create the registry directory {path.parent}: {e.strerror or e}",
                fix="choose a writable location for the SQLite store, or create the directory",
            ) from e
        engine = sa.create_engine(
            parsed.set(database=str(path)), json_deserializer=decode_json, json_serializer=encode_json
        )

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
        write = bool(conn.get_execution_options().get(WRITE_OPTION, False))
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


# --- migrations -------------------------------------------------------------------------------------------


def schema_is_current(engine: Engine) -> bool:
    """Whether the registry's schema is at the newest migration this amiforge ships, read with one SELECT and no
    write lock. False when there is no schema yet or the migration scripts cannot be read this way (alembic then
    decides). A database that cannot be reached or read is the caller's error, reported once (no second try)."""
    head = migration_head()
    if head is None:
        return False
    with boundary("read the registry's schema version", describe(engine)), engine.connect() as conn, conn.begin():
        if not sa.inspect(conn).has_table("alembic_version"):
            return False
        revisions = conn.execute(sa.text("SELECT version_num FROM alembic_version")).scalars().all()
    return list(revisions) == [head]


_REVISION = re.compile(r"^revision\s*(?::[^=]*)?=\s*[\"']([^\"']+)[\"']\s*$", re.MULTILINE)
_DOWN_REVISION = re.compile(r"^down_revision\s*(?::[^=]*)?=\s*(?:[\"']([^\"']+)[\"']|None)\s*$", re.MULTILINE)


@functools.cache
def migration_head() -> str | None:
    """The newest revision among the migration scripts, read from their `revision = "…"` and `down_revision = "…"`
    lines; None unless every script has exactly one of each and they form one chain with one head (a merge or an
    unusual script: alembic decides instead). tests/unit/test_startup.py checks it against `head_revision`."""
    try:
        folder = resources.files("amiforge.store.migrations") / "versions"
        scripts = [p for p in folder.iterdir() if p.name.endswith(".py") and p.name != "__init__.py"]
        texts = [p.read_text(encoding="utf-8") for p in scripts]
    except (OSError, ModuleNotFoundError):
        return None
    revisions: set[str] = set()
    downs: set[str] = set()
    for text in texts:
        revision, down = _REVISION.findall(text), _DOWN_REVISION.findall(text)
        if len(revision) != 1 or len(down) != 1:
            return None
        revisions.add(revision[0])
        if down[0]:
            downs.add(down[0])
    heads = revisions - downs
    if len(revisions) != len(texts) or not downs <= revisions or len(heads) != 1:
        return None
    return heads.pop()


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

    with boundary("read the registry's schema version", describe(engine)), engine.connect() as conn, conn.begin():
        return MigrationContext.configure(conn).get_current_revision()


def migrate(engine: Engine) -> None:
    """Bring the schema to the newest migration. Safe to run concurrently and repeatedly. A registry already at the
    newest revision is only read: opening it takes no write lock, so readers never wait on a writer (and a
    read-only registry opens at all)."""
    # The common case costs one SELECT: alembic (a fifth of a second to import) only when the schema is behind.
    if schema_is_current(engine) or schema_revision(engine) == head_revision():
        return
    from alembic import command
    from alembic.util.exc import CommandError

    config = _alembic_config()
    # Alembic keeps its running context in module globals, so one process migrates one database at a time.
    with (
        _MIGRATION_THREAD_LOCK,
        boundary("migrate the registry schema", describe(engine)),
        engine.connect() as conn,
    ):
        conn.execution_options(**{WRITE_OPTION: True})
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
                    f"cannot migrate the registry schema at {describe(engine)}: {e}",
                    fix="the database was probably written by a newer amiforge; upgrade amiforge",
                ) from e
