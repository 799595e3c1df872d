"""Prometheus's text exposition format 0.0.4, written straight from rows for amiforge's own metric families.

Why not prometheus_client's `generate_latest`: a scrape of a large registry holds ~13,000 samples, and building a
`Sample` (with its own label dict) for each, then checking and escaping every label name of every sample again,
took 155 of the 200 ms a scrape cost (BENCHMARKS.md). Here a family's metric and label names are checked once, when
it is declared, label values are escaped once per row, and a row that did not change since the last scrape can keep
its text. The output is byte-for-byte what `generate_latest` writes for the same samples (tests/unit/test_exposition.py
holds the two side by side), so prometheus_client stays the reference and the parser the tests read it back with.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable, Sequence
from typing import Final, Literal

CONTENT_TYPE: Final = "text/plain; version=0.0.4; charset=utf-8"

_NAME_RE: Final = re.compile(r"^[a-zA-Z_:][a-zA-Z0-9_:]*$")
_LABEL_RE: Final = re.compile(r"^[a-zA-Z_][a-zA-Z0-9_]*$")

Kind = Literal["counter", "gauge", "histogram"]


def go_float(value: float) -> str:
    """A sample value as Prometheus (Go) writes it: `12.0`, `1.5e+07`, `+Inf`, `NaN`."""
    d = float(value)
    if math.isinf(d):
        return "+Inf" if d > 0 else "-Inf"
    if math.isnan(d):
        return "NaN"
    s = repr(d)
    dot = s.find(".")
    if d > 0 and dot > 6:  # Go switches to an exponent sooner than Python does
        mantissa = f"{s[0]}.{s[1:dot]}{s[dot + 1 :]}".rstrip("0.")
        return f"{mantissa}e+{dot - 1:02d}"
    return s


def escape(value: str) -> str:
    """A label value inside its double quotes: backslash, newline and double quote escaped."""
    if "\\" in value or "\n" in value or '"' in value:
        return value.replace("\\", r"\\").replace("\n", r"\n").replace('"', r"\"")
    return value


class Family:
    """One metric family: its HELP and TYPE lines and its samples, in the order they were added.

    `labels` are the family's label names in the order values are passed; the text writes them sorted by name, as
    the exposition does. A counter's samples are named `<name>_total`; a histogram's `_bucket` (with `le`),
    `_count` and `_sum`."""

    def __init__(self, name: str, kind: Kind, documentation: str, labels: Sequence[str]) -> None:
        bad = [n for n in labels if not _LABEL_RE.match(n) or n.startswith("__") or n == "le"]
        # A counter is named without its `_total`: the text adds it (prometheus_client would strip a given one).
        if not _NAME_RE.match(name) or bad or (kind == "counter" and name.endswith("_total")):
            raise ValueError(f"metric {name!r} or its label names {bad} are not valid Prometheus names")
        self.name = f"{name}_total" if kind == "counter" else name
        self.kind = kind
        self.documentation = documentation
        # (position of the value, its `name="` prefix) in the order the text writes them: sorted by name.
        self._slots = [(i, f'{labels[i]}="') for i in sorted(range(len(labels)), key=lambda i: labels[i])]
        # A histogram's buckets put `le` among the sorted names: the names before it and those after.
        self._before_le = sum(1 for n in labels if n < "le")
        self.lines: list[str] = []

    def labels(self, values: Sequence[str]) -> tuple[str, ...]:
        """The `name="value"` pairs of one row, in the order the text writes them (reusable for several samples)."""
        if len(values) != len(self._slots):
            raise ValueError(f"{self.name}: {len(values)} label values for {len(self._slots)} labels")
        return tuple([prefix + escape(values[i]) + '"' for i, prefix in self._slots])

    def sample(self, pairs: Sequence[str], value: float) -> str:
        """A counter's or a gauge's sample line."""
        return f"{self.name}{{{','.join(pairs)}}} {go_float(value)}\n" if pairs else f"{self.name} {go_float(value)}\n"

    def histogram(self, pairs: Sequence[str], buckets: Iterable[tuple[str, float]], total: float) -> str:
        """A histogram row's lines: cumulative `buckets` as (le label, count), the last one `+Inf`, then count and
        sum."""
        head, tail = ",".join(pairs[: self._before_le]), ",".join(pairs[self._before_le :])
        open_, close = (f"{{{head}," if head else "{"), (f",{tail}}}" if tail else "}")
        out = [f'{self.name}_bucket{open_}le="{le}"{close} {go_float(n)}\n' for le, n in buckets]
        count = out[-1].rsplit(" ", 1)[1] if out else "0.0\n"
        labels = f"{{{','.join(pairs)}}}" if pairs else ""
        out.append(f"{self.name}_count{labels} {count}")
        out.append(f"{self.name}_sum{labels} {go_float(total)}\n")
        return "".join(out)

    def add(self, values: Sequence[str], value: float) -> None:
        self.lines.append(self.sample(self.labels(values), value))

    def text(self) -> str:
        doc = self.documentation.replace("\\", r"\\").replace("\n", r"\n")
        return f"# HELP {self.name} {doc}\n# TYPE {self.name} {self.kind}\n" + "".join(self.lines)


def render(families: Iterable[Family]) -> bytes:
    return "".join(f.text() for f in families).encode()
