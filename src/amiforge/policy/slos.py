"""Service level objectives of images in their fleets (the policy's `slos:`), per image or by default.

Two objectives are judged from boots (docs/architecture.md §13): boot success (ready boots / launches, a timeout
counting as a failure) and time to ready (a share of launches ready within a threshold: "p95 under 120 s" is 95 %
ready within 120 s). Each has an error budget, 100 % minus its objective, spent over the SLO window. The burn-rate
alerts that `amiforge export prometheus-rules` writes are generated from these same numbers.
"""

from __future__ import annotations

from datetime import timedelta
from typing import Annotated

from pydantic import BaseModel, BeforeValidator, Field, PlainSerializer

from amiforge.durations import format_duration
from amiforge.model import IMAGE_NAME_PATTERN
from amiforge.policy.fields import STRICT
from amiforge.yamlfile import checked_duration, duration_schema, fail, short, yaml_type

__all__ = ["ImageSlos", "ReadyObjective", "SloOverrides", "Slos"]


def _percent(value: object) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float | str):
        raise fail(f"an objective is a percentage, got {yaml_type(value)}", "e.g. boot_success: 99.9")
    text = str(value).strip().removesuffix("%").strip()
    try:
        number = float(text)
    except ValueError:
        raise fail(f"{short(value)} is not a percentage", "e.g. boot_success: 99.9") from None
    if not 0 < number < 100:
        raise fail(
            f"{short(value)} is not a percentage above 0 and below 100",
            "an objective of 100 % leaves no error budget; e.g. 99.9",
        )
    return number


Percent = Annotated[
    float,
    BeforeValidator(_percent),
    Field(json_schema_extra={"description": "a percentage above 0 and below 100, e.g. 99.9 or '99.9%'"}),
]


def _window(value: object) -> timedelta:
    seconds = value.total_seconds() if isinstance(value, timedelta) else value
    seconds = checked_duration(seconds)
    if seconds < 3600:
        raise fail(f"{short(value)} is too short for an SLO window", "use days, e.g. window: 30d")
    return timedelta(seconds=seconds)


def _threshold(value: object) -> float:
    """A time-to-ready threshold: whole seconds, so the exported histogram has a bucket exactly at it."""
    seconds = value.total_seconds() if isinstance(value, timedelta) else value
    seconds = checked_duration(seconds)
    if seconds != int(seconds) or seconds < 1:
        raise fail(
            f"{short(value)} is not a whole number of seconds",
            "a threshold is a histogram bucket boundary and buckets are whole seconds; e.g. under: 120s",
        )
    return seconds


def _duration_text(value: timedelta | float) -> str:
    return format_duration(value.total_seconds() if isinstance(value, timedelta) else value)


Window = Annotated[
    timedelta,
    BeforeValidator(_window),
    PlainSerializer(_duration_text, return_type=str, when_used="json"),
    duration_schema(minimum=3600.0),
]
Threshold = Annotated[
    float,
    BeforeValidator(_threshold),
    PlainSerializer(_duration_text, return_type=str, when_used="json"),
    duration_schema(minimum=1.0, note="; whole seconds"),
]
Freshness = Annotated[
    timedelta,
    BeforeValidator(
        lambda v: timedelta(seconds=checked_duration(v.total_seconds() if isinstance(v, timedelta) else v))
    ),
    PlainSerializer(_duration_text, return_type=str, when_used="json"),
    duration_schema(minimum=1.0),
]


class ReadyObjective(BaseModel):
    """`percentile` % of launches ready within `under`: the error budget is the rest."""

    model_config = STRICT

    percentile: Percent = 95.0
    under: Threshold = Field(default=120.0, json_schema_extra={"default": "120s"})


class Slos(BaseModel):
    """The objectives of one image (every field set)."""

    model_config = STRICT

    window: Window = Field(
        default=timedelta(days=30), description="the SLO window", json_schema_extra={"default": "30d"}
    )
    boot_success: Percent = Field(default=99.9, description="% of launches that become ready")
    time_to_ready: ReadyObjective = ReadyObjective()
    heartbeat_within: Freshness = Field(
        default=timedelta(minutes=3),
        description="an instance counts as covered (M4) if its heartbeat was heard this recently (it beats each 60s)",
        json_schema_extra={"default": "3m"},
    )

    @property
    def boot_budget(self) -> float:
        """The share of launches that may fail (0.001 for 99.9 %)."""
        return 1 - self.boot_success / 100

    @property
    def ready_budget(self) -> float:
        return 1 - self.time_to_ready.percentile / 100


class SloOverrides(BaseModel):
    """An image's own objectives: what it leaves out is the default's."""

    model_config = STRICT

    window: Window | None = None
    boot_success: Percent | None = None
    time_to_ready: ReadyObjective | None = None
    heartbeat_within: Freshness | None = None


class ImageSlos(BaseModel):
    """`slos:` — the default objectives and each image's own."""

    model_config = STRICT

    default: Slos = Slos()
    images: dict[Annotated[str, Field(pattern=f"^{IMAGE_NAME_PATTERN}$")], SloOverrides] = {}

    def of(self, image: str) -> Slos:
        own = self.images.get(image)
        if own is None:
            return self.default
        update = {name: getattr(own, name) for name in SloOverrides.model_fields if getattr(own, name) is not None}
        return self.default.model_copy(update=update)

    def thresholds(self) -> list[float]:
        """Every time-to-ready threshold any image is judged by (histogram buckets)."""
        found = {self.default.time_to_ready.under}
        found |= {o.time_to_ready.under for o in self.images.values() if o.time_to_ready is not None}
        return sorted(found)
