"""Alembic environment for the registry schema.

`amiforge.store.engine.migrate()` hands over its own connection (already inside a transaction, holding the
migration lock) in `config.attributes["connection"]`. The alembic CLI, for writing new revisions, goes through
`alembic.ini` beside this file and builds a connection from `sqlalchemy.url` the same way the store does.
"""

from __future__ import annotations

from alembic import context
from sqlalchemy.engine import Connection

from amiforge.store.engine import create_store_engine
from amiforge.store.schema import metadata

config = context.config


def _run(connection: Connection) -> None:
    context.configure(
        connection=connection,
        target_metadata=metadata,
        # SQLite cannot ALTER most things; batch mode rebuilds the table instead.
        render_as_batch=connection.dialect.name == "sqlite",
        compare_type=True,
    )
    with context.begin_transaction():
        context.run_migrations()


def run_migrations_online() -> None:
    given = config.attributes.get("connection")
    if isinstance(given, Connection):
        _run(given)
        return
    url = config.get_main_option("sqlalchemy.url")
    if not url:
        raise RuntimeError("set sqlalchemy.url in alembic.ini to the registry URL")
    engine = create_store_engine(url)
    try:
        with engine.connect() as connection:
            _run(connection)
    finally:
        engine.dispose()


def run_migrations_offline() -> None:
    context.configure(
        url=config.get_main_option("sqlalchemy.url"),
        target_metadata=metadata,
        literal_binds=True,
        dialect_opts={"paramstyle": "named"},
    )
    with context.begin_transaction():
        context.run_migrations()


if context.is_offline_mode():
    run_migrations_offline()
else:
    run_migrations_online()
