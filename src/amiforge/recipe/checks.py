"""The boot-test gate of a recipe (`checks:`): ready within a time, then every listed unit, command, HTTP and TCP
check passes.

Providers run these checks (QEMU locally, EC2 on AWS) and fleets reuse them as health checks; this module only
says what a valid check is. `ready_within` reads the one duration grammar of `amiforge.durations` (as policies
and strategies do) and adds the recipe's own bounds: a boot takes at least a second and at most an hour.
"""

from __future__ import annotations

from typing import Annotated

from pydantic import AfterValidator, BaseModel, BeforeValidator, Field, WithJsonSchema

from amiforge.durations import format_duration
from amiforge.recipe.fields import STRICT, UnitName
from amiforge.yamlfile import NonEmptyStr, checked_duration, duration_schema, fail

__all__ = ["READY_WITHIN_MAX", "READY_WITHIN_MIN", "Checks", "CommandCheck", "HttpCheck", "TcpCheck"]

# A guest that is not ready after an hour never will be; under a second is a typo (a bare 0.5 meant 500ms?).
READY_WITHIN_MIN = 1.0
READY_WITHIN_MAX = 3600.0


def _check_ready_within(value: object) -> float:
    seconds = checked_duration(value)  # the shared grammar and its messages first, then the recipe's bounds
    if not READY_WITHIN_MIN <= seconds <= READY_WITHIN_MAX:
        low, high = format_duration(READY_WITHIN_MIN), format_duration(READY_WITHIN_MAX)
        raise fail(
            f"ready_within is {format_duration(seconds)}; a boot test waits between {low} and {high}",
            f"use a duration from {low} to {high}, e.g. ready_within: 90s",
        )
    return seconds


ReadyWithin = Annotated[
    float,
    BeforeValidator(_check_ready_within),
    duration_schema(
        minimum=READY_WITHIN_MIN,
        maximum=READY_WITHIN_MAX,
        note=f"; from {format_duration(READY_WITHIN_MIN)} to {format_duration(READY_WITHIN_MAX)}",
    ),
]


def _check_http_path(value: str) -> str:
    if not value.startswith("/"):
        raise fail(f"http path {value!r} must start with '/'", f"write it as /{value}")
    return value


def _check_port(value: int) -> int:
    if not 1 <= value <= 65535:
        raise fail(f"port {value} is out of range; ports are 1 to 65535", "e.g. port: 80")
    return value


Port = Annotated[int, AfterValidator(_check_port), WithJsonSchema({"type": "integer", "minimum": 1, "maximum": 65535})]


class CommandCheck(BaseModel):
    model_config = STRICT

    run: NonEmptyStr
    expect_exit: Annotated[int, Field(ge=0, le=255)] = 0
    expect_output: str | None = Field(default=None, description="substring the output must contain")


class HttpCheck(BaseModel):
    model_config = STRICT

    port: Port
    path: Annotated[str, AfterValidator(_check_http_path)] = "/"
    expect_status: Annotated[int, Field(ge=100, le=599)] = 200
    expect_body: str | None = Field(default=None, description="substring the body must contain")


class TcpCheck(BaseModel):
    model_config = STRICT

    port: Port


class Checks(BaseModel):
    """The boot-test gate: ready within a time, then every listed check passes."""

    model_config = STRICT

    ready_within: ReadyWithin = 90.0
    units: list[UnitName] = Field(default_factory=list, description="units that must be active")
    commands: list[CommandCheck] = Field(default_factory=list)
    http: list[HttpCheck] = Field(default_factory=list)
    tcp: list[TcpCheck] = Field(default_factory=list)
