"""Tables that fit the terminal without cutting what a user has to type next.

A `whole` column (refs, channel names, versions, ids: what a user types next) is never truncated; a column with a
`drop` rank may be left out: when the table would be wider than the terminal, the highest rank goes first (as
`kubectl get` and `gh` leave out their wide columns), and a dim line says which ones were hidden and that `--json`
has them all. Only when no more can go does other text wrap (`wrap`) or end in an ellipsis. Every cell is rich
markup: escape text that comes from outside (recipes, tool output, users).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from rich.console import JustifyMethod, OverflowMethod
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


def _width(cell: Text) -> int:
    return max((line.cell_len for line in cell.split("\n")), default=0)


def fit_table(
    columns: Sequence[Col],
    rows: Sequence[Sequence[str]],
    *,
    title: str | None = None,
) -> None:
    """Print `rows` under `columns`, fitted to the console's width (see the module's docstring)."""
    out = console
    # Parsed once, here: rich would parse each cell's markup again (and run its highlighter on it) while rendering.
    texts = [[Text.from_markup(cell) for cell in row] for row in rows]
    natural = [max([_width(Text(c.header)), *(_width(row[i]) for row in texts)]) for i, c in enumerate(columns)]
    least = [
        n if c.whole else min(n, max(_MIN_SHRUNK, _width(Text(c.header))))
        for c, n in zip(columns, natural, strict=True)
    ]
    shown = list(range(len(columns)))

    def needed(widths: Sequence[int]) -> int:
        # Each column has one space of padding on either side, and one rule between two columns.
        return sum(widths[i] + 2 for i in shown) + len(shown) - 1

    # Leave columns out before cutting any: a column shown whole is worth more than two shown cut.
    while needed(natural) > out.width and any(columns[i].drop > 0 for i in shown):
        shown.remove(max((i for i in shown if columns[i].drop > 0), key=lambda i: (columns[i].drop, i)))
    if needed(least) > out.width:
        # Even the columns that must stay whole do not fit side by side: one record per row instead, every
        # column on its own line (as psql's expanded display does), so nothing is cut and nothing hidden.
        _records(columns, rows, title)
        return
    widths = _allot(shown, natural, least, out.width)
    table = Table(show_edge=False, title=title, title_justify="left")
    for i in shown:
        c = columns[i]
        # Every width is fixed here, not left to rich: rich shrinks all columns alike when a table is too wide,
        # whole ones included, and that is exactly what must not happen to a ref.
        overflow: OverflowMethod = "fold" if c.whole or c.wrap else "ellipsis"
        table.add_column(c.header, width=widths[i], no_wrap=not c.wrap, overflow=overflow, justify=c.justify)
    for row in texts:
        table.add_row(*(row[i] for i in shown))
    out.print(table)
    hidden = [columns[i].header for i in range(len(columns)) if i not in shown]
    if hidden:
        out.print(f"[dim]not shown at this width: {', '.join(hidden)} (--json has every column)[/]")


def _allot(shown: Sequence[int], natural: Sequence[int], least: Sequence[int], width: int) -> dict[int, int]:
    """Content widths for the shown columns within `width`: whole columns get their natural width (`least` is
    natural for them), the others at least `least`, and what is left goes to them in proportion to what they lack."""
    room = width - 3 * len(shown) + 1  # padding either side of each column, one rule between two
    widths = {i: least[i] for i in shown}
    spare = room - sum(widths.values())
    lacking = {i: natural[i] - least[i] for i in shown if natural[i] > least[i]}
    total = sum(lacking.values())
    if spare >= total:
        return {i: natural[i] for i in shown}
    for i, lack in lacking.items():
        widths[i] += spare * lack // total if total else 0
    return widths


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
