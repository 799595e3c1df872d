"""Where database failures become amiforge errors: every store method runs inside `boundary`.

- a SQLAlchemy or driver failure is an InfraError (retryable when the same statement may well succeed later:
  locks, timeouts, lost connections), with a fix line for a busy, unreachable or read-only registry;
- a number too large for the database is bad input (ConfigError);
- a value the registry holds but cannot read back (JSON that is not JSON, a time that is not a time; raised as
  `schema.UndecodableValue` only while decoding rows) is an InfraError naming the damaged rows.
"""

from __future__ import annotations

import json
import os
import traceback
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import datetime
from typing import Any

import sqlalchemy as sa
from sqlalchemy.engine import Engine
from sqlalchemy.exc import DBAPIError, SQLAlchemyError

from amiforge.errors import ConfigError, InfraError
from amiforge.store.schema import UndecodableValue, UtcDateTime, metadata

# The fix for a registry amiforge cannot read back.
RESTORE = (
    "the registry was changed outside amiforge: restore it from a backup (`amiforge events --verify` checks the "
    "audit log)"
)

# SQLite primary result codes and PostgreSQL SQLSTATEs after which the same statement may well succeed.
_SQLITE_BUSY, _SQLITE_LOCKED, _SQLITE_READONLY, _SQLITE_CANTOPEN = 5, 6, 8, 14
_OUT_OF_RANGE = "22003"  # PostgreSQL numeric_value_out_of_range
_RETRYABLE_SQLSTATES = frozenset({"40001", "40P01", "55P03", "57P01", "57P02", "57P03", "53300"})


def describe(engine: Engine) -> str:
    """The registry's URL as errors show it: never with its password."""
    return engine.url.render_as_string(hide_password=True)


@contextmanager
def boundary(action: str, where: str, engine: Engine | None = None) -> Iterator[None]:
    """Translate every SQLAlchemy failure into InfraError, keeping the original as the cause; a number too large for
    the database is bad input (ConfigError). With `engine`, a value the registry holds but cannot read back (a
    damaged row: JSON that is not JSON, a time that is not a time) is an InfraError naming the rows at fault."""
    try:
        yield
    except SQLAlchemyError as e:
        if isinstance(e, DBAPIError) and getattr(e.orig, "sqlstate", None) == _OUT_OF_RANGE:
            raise out_of_range(action) from e
        read_only = engine is not None and engine.url.query.get("mode") == "ro"
        raise _infra_error(action, where, e, read_only=read_only) from e
    except OverflowError as e:
        if not _raised_by_database(e):
            raise  # our own arithmetic: a bug, reported as one
        raise out_of_range(action) from e  # sqlite3 refuses to bind an int beyond 64 bits
    except UndecodableValue as e:  # only row decoding raises it: a damaged registry, never a bug of ours
        damaged = _locate_damage(engine) if engine is not None else []
        raise InfraError(
            f"the registry at {where} holds data amiforge cannot read (while trying to {action}): "
            + ("; ".join(damaged) or str(e)),
            fix=RESTORE,
        ) from e


def out_of_range(action: str) -> ConfigError:
    return ConfigError(
        f"a number given is beyond what the registry can hold (while trying to {action})",
        fix="use a number below 2^63: version numbers, ids and limits are all far smaller",
    )


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


def _raised_by_database(error: BaseException) -> bool:
    """Whether `error` came out of SQLAlchemy or its driver (binding a parameter), not out of amiforge's own code:
    the innermost Python frame it passed through is SQLAlchemy's."""
    frames = traceback.extract_tb(error.__traceback__)
    return bool(frames) and f"{os.sep}sqlalchemy{os.sep}" in frames[-1].filename


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
