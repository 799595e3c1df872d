"""The constrained scalars of a policy's fields: channel names, severities, soak durations and expiry times.

They live apart from the models so that a reader of `document` sees the rules of a channel and a waiver, and
finds here what each value may be. Soaks read the one duration grammar of `amiforge.durations`; a time without
a zone means UTC, as YAML and the registry read it.
"""

from __future__ import annotations

from datetime import UTC, date, datetime, timedelta
from typing import Annotated

from pydantic import BeforeValidator, ConfigDict, PlainSerializer, WithJsonSchema

from amiforge.durations import format_duration
from amiforge.model import Severity
from amiforge.yamlfile import checked_duration, duration_schema, fail, matching, short, yaml_type

__all__ = [
    "CHANNEL_PATTERN",
    "STRICT",
    "ChannelName",
    "Expiry",
    "MaxAge",
    "SeverityLevel",
    "SoakDuration",
    "as_utc",
    "soak_of",
]

# Every policy model: unknown keys are mistakes, and a validated policy never changes.
STRICT = ConfigDict(extra="forbid", frozen=True)

CHANNEL_PATTERN = r"[a-z][a-z0-9-]{0,31}"

ChannelName = Annotated[
    str,
    *matching(
        CHANNEL_PATTERN,
        "channel name",
        "lowercase letters, digits and '-', starting with a letter, at most 32 characters",
        "'dev', 'staging' or 'prod-eu'",
    ),
]

_SEVERITY_ORDER = " < ".join(Severity)


def _check_severity(value: object) -> object:
    if isinstance(value, Severity):
        return value
    if isinstance(value, str) and value.strip().lower() in {s.value for s in Severity}:
        return Severity(value.strip().lower())
    raise fail(
        f"{short(value)} is not a severity; from least to most severe: {_SEVERITY_ORDER}",
        "e.g. max_cve_severity: high",
    )


SeverityLevel = Annotated[
    Severity,
    BeforeValidator(_check_severity),
    WithJsonSchema({"enum": [s.value for s in Severity], "description": f"ordered {_SEVERITY_ORDER}"}),
]


def soak_of(value: object) -> timedelta:
    """A soak (a duration, 0 allowed, or a timedelta from code) as a timedelta; a located problem otherwise."""
    seconds = value.total_seconds() if isinstance(value, timedelta) else value
    return timedelta(seconds=checked_duration(seconds, allow_zero=True))


def _soak_text(value: timedelta) -> str:
    return format_duration(value.total_seconds())


SoakDuration = Annotated[
    timedelta,
    BeforeValidator(soak_of),
    PlainSerializer(_soak_text, return_type=str, when_used="json"),
    duration_schema(),
]


def _age_of(value: object) -> timedelta:
    """A positive duration: how old vulnerability data may be (0 would refuse every scan)."""
    seconds = value.total_seconds() if isinstance(value, timedelta) else value
    return timedelta(seconds=checked_duration(seconds))


MaxAge = Annotated[
    timedelta,
    BeforeValidator(_age_of),
    PlainSerializer(_soak_text, return_type=str, when_used="json"),
    duration_schema(minimum=1.0),
]


def as_utc(value: datetime) -> datetime:
    """`value` in UTC. A naive time means UTC: YAML reads a time without a zone so, and the store tags times UTC."""
    return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)


def _check_expires(value: object) -> date | datetime:
    fix = "write a date (2027-01-31) or an ISO 8601 time (2027-01-31T12:00:00Z)"
    if isinstance(value, str):
        text = value.strip()
        try:
            value = date.fromisoformat(text) if len(text) == 10 else datetime.fromisoformat(text)
        except ValueError as e:
            raise fail(f"{short(value)} is not a date or time ({e})", fix) from None
    if isinstance(value, datetime):
        return as_utc(value)
    if isinstance(value, date):
        return value
    raise fail(f"expires must be a date, got {yaml_type(value)}", fix)


Expiry = Annotated[
    datetime | date,
    BeforeValidator(_check_expires),
    WithJsonSchema(
        {
            "anyOf": [{"type": "string", "format": "date"}, {"type": "string", "format": "date-time"}],
            "description": "a date (valid through that day, UTC) or a time; required: every waiver expires",
        },
        mode="validation",
    ),
]
