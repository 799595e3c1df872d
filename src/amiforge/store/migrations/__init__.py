"""Alembic migrations of the registry schema. `sql.migrate()` runs them to head; nothing else applies them."""
