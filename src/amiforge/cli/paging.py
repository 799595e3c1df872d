"""Listings that can grow without bound (`images list`, `events`) show the newest N by default, and say on stderr how
many more there are and how to see them (as gh and kubectl do); `--json` honours the same limit."""

from __future__ import annotations

import typer

from amiforge.cli.output import err_console
from amiforge.errors import ConfigError

DEFAULT_LIMIT = 50

LimitOption = typer.Option(None, "--limit", min=1, help=f"Only the newest N (default {DEFAULT_LIMIT}).")
AllOption = typer.Option(False, "--all", help="Every one, however many (instead of the newest N).")


def page_size(limit: int | None, show_all: bool) -> int | None:
    """How many to show: None (every one) for --all, else --limit or the default."""
    if show_all and limit is not None:
        raise ConfigError("--limit and --all contradict each other", fix="give --limit N (the newest N) or --all")
    return None if show_all else (limit or DEFAULT_LIMIT)


def note_more(shown: int, total: int, what: str, command: str) -> None:
    """On stderr, when `total` exceeds what was shown: how many more, and the commands that show them."""
    more = total - shown
    if more <= 0:
        return
    err_console.print(
        f"showing the newest {shown:,} of {total:,} {what}; {more:,} more: `{command} --limit N` shows the newest N, "
        f"`{command} --all` every one",
        markup=False,
        soft_wrap=True,
    )
