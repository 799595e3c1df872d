"""The one duration grammar of recipes, policies, strategies and command-line flags.

`90s`, `2m`, `1h30m`, `1d12h`, `500ms` (units d, h, m, s, ms, each at most once, largest first), or a plain number of
seconds. Every duration is finite and at most a year: `inf`, `nan` and `999999999999h` are input errors, never a
timedelta overflow at run time.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping

from amiforge.errors import ConfigError

UNITS: Mapping[str, float] = {"d": 86400.0, "h": 3600.0, "m": 60.0, "s": 1.0, "ms": 0.001}
# For JSON Schemas: the strings the grammar accepts.
PATTERN = r"(?:\d+(?:\.\d+)?(?:ms|d|h|m|s))+|\d+(?:\.\d+)?"
# Longer than any soak, bake time, timeout or age amiforge deals in.
MAX_SECONDS = 366 * 86400.0
FORMS = "90s, 2m, 1h30m, 1d12h, 500ms (units d, h, m, s, ms, largest first) or a number of seconds"

_NAMES = "|".join(sorted(UNITS, key=len, reverse=True))  # "ms" before "m"


def seconds_of(value: object) -> float | None:
    """Seconds in `value` (a duration string or a number), or None if it is not a finite duration of 0 or more."""
    if isinstance(value, bool):
        return None
    if isinstance(value, int | float):
        try:
            seconds: float | None = float(value)
        except OverflowError:  # an int too big for a float
            return None
    elif isinstance(value, str):
        seconds = _parse(value.strip())
    else:
        return None
    if seconds is None or not math.isfinite(seconds) or seconds < 0:
        return None
    return seconds


def _parse(text: str) -> float | None:
    if re.fullmatch(r"\d+(?:\.\d+)?", text):
        return float(text)
    if re.fullmatch(rf"(?:\d+(?:\.\d+)?(?:{_NAMES}))+", text) is None:
        return None
    total, previous, order = 0.0, -1, list(UNITS)
    for number, unit in re.findall(rf"(\d+(?:\.\d+)?)({_NAMES})", text):
        rank = order.index(unit)
        if rank <= previous:  # "30s1m", "1m1m": typos, not durations
            return None
        previous = rank
        total += float(number) * UNITS[unit]
    return total


def parse_duration(
    value: object, *, what: str = "duration", allow_zero: bool = False, maximum: float = MAX_SECONDS
) -> float:
    """Seconds in `value`; ConfigError naming `what` (e.g. "--min-age"; "" inside a file, whose problems name the
    field already) for anything the grammar refuses, zero (unless allowed) or more than `maximum`."""
    seconds = seconds_of(value)
    subject = f"{what} " if what else ""
    if seconds is None or (seconds == 0 and not allow_zero):
        shown = repr(value) if len(repr(value)) <= 40 else repr(value)[:39] + "…"
        raise ConfigError(f"{subject}{shown} is not a {'' if allow_zero else 'positive '}duration", fix=f"use {FORMS}")
    if seconds > maximum:
        raise ConfigError(f"{subject}{format_duration(seconds)} is longer than {format_duration(maximum)}",
                          fix=f"use a duration of at most {format_duration(maximum)}")  # fmt: skip
    return seconds


def format_duration(seconds: float) -> str:
    """`93784.5` → `1d2h3m4s500ms`: the compact form the grammar reads back (to the microsecond: `0.0015` →
    `1.5ms`), so a value written out and read again is the same value."""
    left = round(seconds * 1_000_000)
    if left <= 0:
        return "0s"
    parts = []
    for unit, size in (("d", 86_400_000_000), ("h", 3_600_000_000), ("m", 60_000_000), ("s", 1_000_000)):
        count, left = divmod(left, size)
        if count:
            parts.append(f"{count}{unit}")
    if left:
        parts.append(f"{left / 1000:.3f}".rstrip("0").rstrip(".") + "ms")
    return "".join(parts)
