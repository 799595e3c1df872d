"""What the command modules share: options, and opening settings and the registry once per command.

Imports here stay light: every command, `--help` included, loads this module. The settings (pydantic) and the
registry (SQLAlchemy) are imported when a command opens them, and alembic only when the registry's schema is behind.
"""

from __future__ import annotations

import functools
import logging
import re
from importlib import resources
from pathlib import Path
from typing import TYPE_CHECKING

import typer

from amiforge.cli import logs

if TYPE_CHECKING:
    from sqlalchemy.engine import Engine

    from amiforge.settings import Settings
    from amiforge.store.sql import SqlStore

logger = logging.getLogger(__name__)

JsonOption = typer.Option(False, "--json", help="Print one JSON document on stdout instead of text.")


def _verbose(ctx: typer.Context, value: int) -> None:
    if not ctx.resilient_parsing:
        logs.verbose(value)


def _log_file(ctx: typer.Context, value: str | None) -> None:
    if value is None or ctx.resilient_parsing:
        return
    logs.set_log_file(Path(value))


VerboseOption = typer.Option(
    0,
    "--verbose",
    "-v",
    count=True,
    show_default=False,
    metavar="",
    expose_value=False,
    callback=_verbose,
    help="Say more on stderr: -v what amiforge does (INFO), -vv every detail (DEBUG).",
)
LogFileOption = typer.Option(
    None,
    "--log-file",
    metavar="FILE",
    expose_value=False,
    callback=_log_file,
    help="Also write every detail (DEBUG, timestamped) to FILE, created mode 0600, appended to.",
)


def open_registry() -> tuple[Settings, SqlStore]:
    from amiforge.settings import load_settings

    settings = load_settings()
    return settings, _open_store(settings.registry_url)


def _open_store(url: str) -> SqlStore:
    """The registry at `url`; a schema at the newest migration opens without alembic (it costs a fifth of a second
    to import), otherwise `open_store` migrates it."""
    from amiforge.store import sql

    engine = sql.create_store_engine(url)
    try:
        current = _schema_is_current(engine)
    except BaseException:
        engine.dispose()
        raise
    if current:
        return sql.SqlStore(engine)
    engine.dispose()
    logger.info("registry schema is behind (or new): migrating")
    return sql.open_store(url)


def _schema_is_current(engine: Engine) -> bool:
    """Whether the registry's schema is at the newest migration this amiforge ships, read with one SELECT and no
    write lock. False when unsure (no schema yet, an unreadable database, migrations this check cannot read):
    open_store then decides, and reports any failure properly."""
    import sqlalchemy as sa

    head = migration_head()
    if head is None:
        return False
    try:
        with engine.connect() as conn, conn.begin():
            revisions = conn.execute(sa.text("SELECT version_num FROM alembic_version")).scalars().all()
    except sa.exc.SQLAlchemyError as e:
        logger.debug("schema version not readable directly (%s): open_store decides", type(e).__name__)
        return False
    return list(revisions) == [head]


_REVISION = re.compile(r"^revision\s*(?::[^=]*)?=\s*[\"']([^\"']+)[\"']\s*$", re.MULTILINE)
_DOWN_REVISION = re.compile(r"^down_revision\s*(?::[^=]*)?=\s*(?:[\"']([^\"']+)[\"']|None)\s*$", re.MULTILINE)


@functools.cache
def migration_head() -> str | None:
    """The newest revision among the migration scripts, read from their `revision = "…"` and `down_revision = "…"`
    lines; None unless every script has exactly one of each and they form one chain with one head (a merge or an
    unusual script: alembic decides instead). tests/unit/test_startup.py compares it with alembic's own answer."""
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
