"""What the command modules share: options, and opening settings and the registry once per command.

Imports here stay light: every command, `--help` included, loads this module. The settings (pydantic) and the
registry (SQLAlchemy) are imported when a command opens them, and alembic only when the registry's schema is behind.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import TYPE_CHECKING

import typer

from amiforge.cli import logs

if TYPE_CHECKING:
    from amiforge.settings import Settings
    from amiforge.store.sql import SqlStore

logger = logging.getLogger(__name__)

JsonOption = typer.Option(False, "--json", help="Print one JSON document on stdout instead of text.")
PolicyOption = typer.Option(
    None,
    "--policy",
    help="The policy file to judge by (default: AMIFORGE_POLICY, else the built-in policy).",
)

# `retire`, `drift` and `report tags` exit with this when there is something to act on, as `terraform plan
# -detailed-exitcode` exits 2 (taken here by bad input).
CHANGES_EXIT = 10


def location_text(location: str) -> str:
    """An AMI id as it is; a local image by its file name (the folder is the store's)."""
    return Path(location).name if location.startswith("/") else location


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
# Read by app.main() from the arguments wherever it stands (an error must be shown with its traceback even when it
# happens while the arguments are parsed); declared on every command so that `amiforge images show X --debug` parses.
DebugOption = typer.Option(False, "--debug", expose_value=False, help="Show tracebacks for errors.")
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
    # Imported here: SQLAlchemy is needed only by commands that open the registry (alembic only when the schema is
    # behind: store/engine.py `migrate`).
    from amiforge.store import sql

    return settings, sql.open_store(settings.registry_url)
