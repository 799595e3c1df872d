"""What every part of the SQL store shares: the engine, the clock, transactions, and the version row that every
other record hangs off.

Each aggregate (versions.py, lineage.py, events.py, supply.py, operations.py, channels.py) is a class deriving from
`StoreCore`; sql.py composes them into `SqlStore`.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager
from datetime import datetime
from typing import Any, Self

import sqlalchemy as sa
from sqlalchemy.engine import Connection, Engine

from amiforge.errors import NotFound
from amiforge.model import ImageVersion, Status
from amiforge.store.boundary import boundary, describe
from amiforge.store.engine import WRITE_OPTION
from amiforge.store.rows import int_or_none, json_object, row_mapper, text_or_empty
from amiforge.store.schema import aware, utcnow, versions_table


def _tags(value: object) -> dict[str, str]:
    return {str(k): str(v) for k, v in json_object(value).items()}


version_from_row = row_mapper(
    ImageVersion,
    "versions",
    number=int,
    status=Status,
    recipe=text_or_empty,
    size_bytes=int_or_none,
    tags=_tags,
    log=text_or_empty,
)

# What a listing reads of a version: everything but the build log and the recipe, which can be large.
VERSION_SUMMARY = [c for c in versions_table.columns if c.name not in ("log", "recipe")]


def inserted_id(result: sa.CursorResult[Any]) -> int:
    key = result.inserted_primary_key
    if key is None:  # pragma: no cover - every table here has an integer primary key
        raise AssertionError("INSERT returned no primary key")
    return int(key[0])


def advisory_key(text: str) -> int:
    """A stable signed 64-bit PostgreSQL advisory-lock key for `text`."""
    return int.from_bytes(hashlib.sha256(text.encode()).digest()[:8], "big", signed=True)


class StoreCore:
    """The registry over one SQLAlchemy engine. Safe to share across threads, and any number of stores (in any
    number of processes) may use the same database."""

    def __init__(self, engine: Engine, *, clock: Callable[[], datetime] | None = None) -> None:
        self._engine = engine
        self._clock = clock or utcnow
        self._where = describe(engine)

    @property
    def engine(self) -> Engine:
        return self._engine

    def close(self) -> None:
        self._engine.dispose()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # transactions

    def _guard(self, action: str) -> AbstractContextManager[None]:
        """`boundary` for this store: database failures and damaged rows become InfraError."""
        return boundary(action, self._where, self._engine)

    def _now(self) -> datetime:
        return aware(self._clock(), "clock()")

    @contextmanager
    def _read(self) -> Iterator[Connection]:
        with self._engine.connect() as conn, conn.begin():
            yield conn

    @contextmanager
    def _write(self) -> Iterator[Connection]:
        with self._engine.connect() as conn:
            conn.execution_options(**{WRITE_OPTION: True})
            with conn.begin():
                yield conn

    # the version every record belongs to

    @staticmethod
    def _fetch_version(conn: Connection, version_id: int) -> ImageVersion | None:
        row = conn.execute(sa.select(versions_table).where(versions_table.c.id == version_id)).mappings().one_or_none()
        return None if row is None else version_from_row(row)

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
