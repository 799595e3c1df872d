"""Time series as server-rendered SVG: no chart library, no JavaScript; each chart's numbers are also a table."""

from __future__ import annotations

from dataclasses import dataclass

from amiforge.lifecycle.boards import Series

WIDTH, HEIGHT, PAD = 640, 160, 4
# Distinguishable on white and for the common colour-vision deficiencies (Okabe–Ito).
PALETTE = ("#0072b2", "#d55e00", "#009e73", "#cc79a7", "#e69f00", "#56b4e9", "#000000")


@dataclass(frozen=True)
class Line:
    name: str
    colour: str
    points: str  # "x,y x,y …" for <polyline points>: the buckets that have data, joined across those that have none
    dots: list[tuple[str, str]]  # each bucket's point: a lone value draws no line, so every point is a dot too


@dataclass(frozen=True)
class Chart:
    width: int
    height: int
    top: float  # the value at the top edge
    lines: list[Line]


def chart(series: list[Series], *, percent: bool = False) -> Chart | None:
    """The chart of `series`, scaled to their largest value (1 for shares); None when no bucket has data."""
    values = [v for s in series for _, v in s.points if v is not None]
    if not values:
        return None
    top = 1.0 if percent else max(max(values), 1e-9) * 1.1
    lines = []
    for n, s in enumerate(series):
        count = max(len(s.points) - 1, 1)
        xy = [
            (f"{PAD + (WIDTH - 2 * PAD) * k / count:.1f}", f"{HEIGHT - PAD - (HEIGHT - 2 * PAD) * v / top:.1f}")
            for k, (_, v) in enumerate(s.points)
            if v is not None
        ]
        lines.append(Line(s.name, PALETTE[n % len(PALETTE)], " ".join(f"{x},{y}" for x, y in xy), xy))
    return Chart(WIDTH, HEIGHT, top, lines)
