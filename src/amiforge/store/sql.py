"""The SQL registry: SQLite by default, PostgreSQL for a team, one code path through SQLAlchemy Core.

`SqlStore` is composed of one class per aggregate, each in its own module of this package:

- versions.py — versions (NAME@N, ref resolution, compare-and-set transitions, pages), artifacts, layers, boot
  reports;
- lineage.py — ancestry, descendants and revoked ancestors, each one query;
- events.py — the hash-chained audit log;
- supply.py — scans, the vulnerability database, signing keys, signatures;
- operations.py — resumable operations and rollouts;
- channels.py — channel pointers and their moves;
- telemetry.py — boots of versions on targets and their running totals;
- tokens.py — tokens of the web console and API (hashes only);
- retirements.py — each artifact's way out (deprecated, deregistered, purged);

on top of base.py (engine, clock, transactions), with engine.py (opening a URL, read-only registries, migrations),
boundary.py (database failures -> amiforge errors), rows.py (the one generic row mapper) and schema.py (the
tables). The public surface is `store.interface.Store`.
"""

from __future__ import annotations

from collections.abc import Callable
from datetime import datetime

from amiforge.store.channels import Channels
from amiforge.store.engine import MIGRATIONS_DIR, create_store_engine, head_revision, migrate, schema_revision
from amiforge.store.events import GENESIS_HASH, EventLog, event_hash
from amiforge.store.lineage import Lineage
from amiforge.store.operations import Operations
from amiforge.store.retirements import Retirements
from amiforge.store.supply import SupplyChain
from amiforge.store.telemetry import Telemetry
from amiforge.store.tokens import Tokens
from amiforge.store.versions import Versions

__all__ = [
    "GENESIS_HASH",
    "MIGRATIONS_DIR",
    "SqlStore",
    "create_store_engine",
    "event_hash",
    "head_revision",
    "migrate",
    "open_store",
    "schema_revision",
]


class SqlStore(Versions, Lineage, EventLog, SupplyChain, Operations, Channels, Telemetry, Tokens, Retirements):
    """The registry over one SQLAlchemy engine; satisfies `store.interface.Store`. Safe to share across threads, and
    any number of SqlStore objects (in any number of processes) may use the same database."""


def open_store(url: str, *, clock: Callable[[], datetime] | None = None) -> SqlStore:
    """Open (creating and migrating if needed) the registry at `url`: `sqlite:///path` or `postgresql+psycopg://…`."""
    engine = create_store_engine(url)
    try:
        migrate(engine)
    except BaseException:
        engine.dispose()
        raise
    return SqlStore(engine, clock=clock)
