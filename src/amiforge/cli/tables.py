"""Tables that fit the terminal without cutting what a user has to type next.

A `whole` column (refs, channel names, versions, ids: what a user types next) is never truncated; a column with a
`drop` rank may be left out: when the table would be wider than the terminal, the highest rank goes first (as
`kubectl get` and `gh` leave out their wide columns), and a dim line says which ones were hidden and that `--json`
has them all. Other text wraps (`wrap`) or ends in an ellipsis. Every cell is rich markup: escape text that comes
from outside (recipes, tool output, users).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from rich.console import JustifyMethod
from rich.markup import escape
from rich.table import Table
from rich.text import Text

from amiforge.cli.output import console

# A column that may shrink keeps at least this many characters (or its whole width, if narrower).
_MIN_SHRUNK = 10


@dataclass(frozen=True)
class Col:
    header: str
    whole: bool = False  # refs, names, ids: never cut (a value wider than the terminal folds onto more lines)
    drop: int = 0  # 0: always shown; otherwise the higher, the sooner it is left out on a narrow terminal
    wrap: bool = False  # long text wraps onto more lines instead of ending in "…"
    justify: JustifyMethod = "left"


def _width(cell: str) -> int:
    return max((Text.from_markup(line).cell_len for line in cell.splitlines()), default=0)


def fit_table(
    columns: Sequence[Col],
    rows: Sequence[Sequence[str]],
    *,
    title: str | None = None,
) -> None:
    """Print `rows` under `columns`, fitted to the console's width (see the module's docstring)."""
    out = console
    natural = [max([_width(c.header), *(_width(row[i]) for row in rows)]) for i, c in enumerate(columns)]
    least = [
        n if c.whole else min(n, max(_MIN_SHRUNK, _width(c.header))) for c, n in zip(columns, natural, strict=True)
    ]
    shown = list(range(len(columns)))

    def needed() -> int:
        # Each column has one space of padding on either side, and one rule between two columns.
        return sum(least[i] + 2 for i in shown) + len(shown) - 1

    while needed() > out.width:
        droppable = [i for i in shown if columns[i].drop > 0]
        if not droppable:
            # Even the columns that must stay whole do not fit side by side: one record per row instead, every
            # column on its own line (as psql's expanded display does), so nothing is cut and nothing hidden.
            _records(columns, rows, title)
            return
        shown.remove(max(droppable, key=lambda i: (columns[i].drop, i)))

    table = Table(show_edge=False, title=title, title_justify="left")
    for i in shown:
        c = columns[i]
        if c.whole:
            table.add_column(c.header, no_wrap=True, min_width=natural[i], overflow="fold", justify=c.justify)
        elif c.wrap:
            table.add_column(c.header, overflow="fold", min_width=least[i], justify=c.justify)
        else:
            table.add_column(c.header, no_wrap=True, overflow="ellipsis", min_width=least[i], justify=c.justify)
    for row in rows:
        table.add_row(*(row[i] for i in shown))
    out.print(table)
    hidden = [columns[i].header for i in range(len(columns)) if i not in shown]
    if hidden:
        out.print(f"[dim]not shown at this width: {', '.join(hidden)} (--json has every column)[/]")


def _records(columns: Sequence[Col], rows: Sequence[Sequence[str]], title: str | None) -> None:
    if title:
        console.print(f"[bold]{escape(title)}[/]")
    label = max(len(c.header) for c in columns)
    for row in rows:
        console.print("─" * min(console.width, 40), style="dim")
        for c, cell in zip(columns, row, strict=True):
            grid = Table.grid(padding=(0, 1))
            grid.add_column(no_wrap=True, min_width=label)
            grid.add_column(overflow="fold")
            grid.add_row(f"[dim]{c.header or '-'}[/]", cell)
            console.print(grid)
