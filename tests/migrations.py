"""Running one alembic command against a test's engine (upgrade or downgrade to a revision)."""

from __future__ import annotations

import sqlalchemy as sa


def run_alembic(engine: sa.Engine, verb: str, revision: str) -> None:
    """`alembic <verb> <revision>` (verb: upgrade, downgrade) on `engine`, in one transaction."""
    from alembic import command
    from alembic.config import Config

    from amiforge.store.engine import MIGRATIONS_DIR

    config = Config()
    config.set_main_option("script_location", str(MIGRATIONS_DIR))
    with engine.begin() as conn:
        config.attributes["connection"] = conn
        getattr(command, verb)(config, revision)
