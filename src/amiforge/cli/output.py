"""How commands speak: rich text for people, one JSON document for machines (`--json`), progress on stderr."""

from __future__ import annotations

import json
import sys
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from rich.console import Console

from amiforge.model import to_json

if TYPE_CHECKING:
    # Only a type here: importing providers (and with them the local provider and the scanners) would cost every
    # command, `--help` included, a tenth of a second.
    from rich.progress import TaskID

    from amiforge.providers.interface import PhaseUpdate

console = Console(highlight=False)
err_console = Console(stderr=True, highlight=False)


# Domain objects and documents -> JSON-ready values: the one rule the CLI and the web API share.
plain = to_json


def emit_json(data: Any) -> None:
    sys.stdout.write(json.dumps(plain(data), indent=2, sort_keys=True) + "\n")


def human_size(n: int | None) -> str:
    if n is None:
        return "-"
    size = float(n)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if size < 1024 or unit == "GiB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    return f"{size:.1f} GiB"


class PhaseProgress:
    """Rich progress on stderr: one row per phase (base, each layer, initrd, mkfs, convert, boot) and an
    overall bar. Disabled for --json so stdout stays one JSON document and stderr stays quiet."""

    def __init__(self, title: str, total: int, *, enabled: bool) -> None:
        from rich.progress import BarColumn, Progress, SpinnerColumn, TextColumn, TimeElapsedColumn
        from rich.table import Column

        self.enabled = enabled
        self.progress = Progress(
            SpinnerColumn(finished_text="[green]✓[/]"),
            # One terminal line per row, whatever the width: a wrapped row breaks the live redraw.
            TextColumn(
                "{task.description}", markup=False, table_column=Column(no_wrap=True, overflow="ellipsis", max_width=40)
            ),
            BarColumn(bar_width=10),
            TextColumn(
                "{task.fields[detail]}",
                markup=False,
                table_column=Column(no_wrap=True, overflow="ellipsis", max_width=40),
            ),
            TimeElapsedColumn(),
            console=err_console,
            disable=not enabled,
            transient=False,
        )
        self.overall = self.progress.add_task(title, total=total, detail="")
        self.rows: dict[str, TaskID] = {}

    def __enter__(self) -> PhaseProgress:
        self.progress.__enter__()
        return self

    def __exit__(self, exc_type: type[BaseException] | None, *exc: object) -> None:
        if exc_type is None:
            # Cache hits can fold several phases into one (a cached disk skips initrd, mkfs and convert).
            self.progress.update(self.overall, completed=self.progress.tasks[self.overall].total)
        self.progress.__exit__(None, None, None)

    def update(self, u: PhaseUpdate) -> None:
        row = self.rows.get(u.name)
        if row is None:
            row = self.progress.add_task(u.name, total=1, detail=u.detail)
            self.rows[u.name] = row
        if u.state == "start":
            self.progress.update(row, detail=u.detail)
            return
        secs = f" {u.seconds:.1f}s" if u.seconds is not None else ""
        mark = "FAILED " if u.state == "failed" else ""
        self.progress.update(row, completed=1, detail=f"{mark}{u.detail}{secs}")
        self.progress.advance(self.overall)

    def callback(self) -> Callable[[PhaseUpdate], None]:
        return self.update
