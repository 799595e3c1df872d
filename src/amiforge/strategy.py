"""The rollout strategy: waves, bake time, SLO gates and the error budget — and the gate decision itself.

A strategy file (or the defaults, or CLI flags over them) says how a version replaces a fleet:

```yaml
waves: [1, 25%, 100%]        # after each wave this many members run the new version (a count or a % of the fleet)
bake_time: 60s               # watch each wave this long after its members are ready, before the next one
gates:
  boot_success_rate: 1.0     # ≥: share of the wave's new members that became ready (their checks passed)
  time_to_ready_p95: 30s     # ≤: 95th percentile time-to-ready of the wave's new members
  alarms: []                 # AWS: CloudWatch alarms that must not be in ALARM
error_budget:
  slo: 0.99                  # the boot success rate the fleet promises
  max_burn_rate: 10          # a wave failing faster than 10× the budget allows aborts at once
```

`decide()` is pure, like `policy.evaluate()`: the controller gathers the wave's facts (its members as the fleet reports
them, the alarms in ALARM) and gets a `WaveDecision` with every number that drove it, which the store keeps.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, WithJsonSchema, field_validator

from amiforge.model import Member
from amiforge.yamlfile import (
    YamlKind,
    checked_duration,
    duration_schema,
    fail,
    parse_mapping,
    read_text,
    short,
    validate_mapping,
)

__all__ = ["Strategy", "WaveDecision", "decide", "load_strategy", "parse_strategy", "plan_waves"]

MAX_STRATEGY_BYTES = 64 * 1024
MAX_WAVE = 1_000_000  # members in one wave: more than any fleet
_FORBID = ConfigDict(extra="forbid", frozen=True)


def _check_wave(value: object) -> object:
    """A wave is a count of members (1, 3) or a share of the fleet ("25%"), normalised to the text form."""
    if isinstance(value, str) and value.isdigit() and len(value) <= len(str(MAX_WAVE)):
        value = int(value)  # the stored form of a count
    if isinstance(value, bool):
        raise fail(f"wave {value!r} is neither a count nor a percentage", "use a count like 1 or a share like 25%")
    if isinstance(value, int):
        if value < 1:
            raise fail(f"wave {value} is not a positive count", "use 1 or more, or a share like 25%")
        if value > MAX_WAVE:
            raise fail(f"wave {short(value)} is more members than any fleet has", 'use a share like "100%" instead')
        return str(value)
    if isinstance(value, str) and value.endswith("%"):
        try:
            share = float(value[:-1])
        except ValueError:
            share = math.nan
        if not 0 < share <= 100:
            raise fail(f"wave {short(value)} is not a share between 0% and 100%", "use a share like 25% or 100%")
        return value
    raise fail(f"wave {short(value)} is neither a count nor a percentage", "use a count like 1 or a share like 25%")


Wave = Annotated[
    str,
    BeforeValidator(_check_wave),
    WithJsonSchema({"anyOf": [{"type": "integer", "minimum": 1}, {"type": "string", "pattern": r"^\d+(\.\d+)?%$"}]}),
]


# The one duration grammar (durations.py); 0 is a duration here (no bake time).
Seconds = Annotated[
    float, BeforeValidator(lambda v: checked_duration(v, allow_zero=True)), duration_schema(minimum=0.0)
]


class Gates(BaseModel):
    """What each wave's new members must show before the rollout goes on."""

    model_config = _FORBID

    boot_success_rate: float = Field(default=1.0, ge=0.0, le=1.0, description="≥ this share of members ready")
    time_to_ready_p95: Seconds | None = Field(default=None, description="≤ this p95 time-to-ready (seconds or 30s)")
    alarms: list[str] = Field(default_factory=list, description="AWS CloudWatch alarms that must not be in ALARM")


class ErrorBudget(BaseModel):
    """The fleet's boot SLO; a wave burning its error budget faster than `max_burn_rate` aborts at once."""

    model_config = _FORBID

    slo: float = Field(default=0.99, gt=0.0, lt=1.0, description="promised boot success rate, e.g. 0.99")
    max_burn_rate: float = Field(
        default=10.0,
        gt=0.0,
        le=1000.0,
        allow_inf_nan=False,
        description="abort when failures burn the budget this fast",
    )


class Strategy(BaseModel):
    """How a version replaces a fleet: waves, bake time, gates, error budget."""

    model_config = _FORBID

    mode: Literal["canary", "refresh"] = Field(
        default="canary",
        description="canary: amiforge replaces each wave's members itself; refresh (Auto Scaling groups only): an "
        "instance refresh with a checkpoint per wave, AWS's automatic rollback, and the same gates at each checkpoint",
    )
    waves: list[Wave] = Field(default_factory=lambda: ["1", "25%", "100%"], min_length=1)
    bake_time: Seconds = Field(default=30.0, description="watch each wave this long once it is ready")
    gates: Gates = Field(default_factory=Gates)
    error_budget: ErrorBudget = Field(default_factory=ErrorBudget)
    min_healthy_percentage: int = Field(default=90, ge=0, le=100, description="refresh mode: capacity kept in service")

    @field_validator("waves")
    @classmethod
    def _ends_with_everyone(cls, waves: list[str]) -> list[str]:
        if waves[-1] != "100%":
            raise fail(
                f"the last wave is {waves[-1]}, so the rollout would never finish the fleet",
                'end the waves with "100%"',
            )
        return waves


def _kind() -> YamlKind:
    return YamlKind(
        noun="strategy",
        model=Strategy,
        schema_hint="see the strategy format in the README (waves, bake_time, gates, error_budget)",
        max_bytes=MAX_STRATEGY_BYTES,
        missing_fix="write one (README: Rollouts), or leave --strategy out for the defaults",
        default_name="strategy.yaml",
    )


_KIND = _kind()


def load_strategy(path: Path) -> Strategy:
    """Read and validate a strategy file; ConfigError listing every problem with file, line, field and fix."""
    return parse_strategy(read_text(path, _KIND), path)


def parse_strategy(text: str, path: Path) -> Strategy:
    parsed = parse_mapping(
        text,
        path,
        _KIND,
        top_keys="waves:, bake_time:, gates:",
        empty_fix="see the README's Rollouts section, or leave --strategy out for the defaults",
        mapping_fix="see the README's Rollouts section",
    )
    # Every problem at once: duplicate keys (which YAML accepts) and each field's.
    return validate_mapping(Strategy, parsed, path, _KIND)


# --- waves -----------------------------------------------------------------------------------------------------------


def checkpoints(strategy: Strategy, fleet_size: int) -> list[int]:
    """The waves as an instance refresh's CheckpointPercentages: the share of the fleet on the new version after
    each wave, rounded up, ascending, ending at 100."""
    done, points = 0, list[int]()
    for size in plan_waves(strategy, fleet_size):
        done += size
        share = math.ceil(100 * done / fleet_size)
        if not points or share > points[-1]:
            points.append(share)
    return points or [100]


def plan_waves(strategy: Strategy, fleet_size: int, already: int = 0) -> list[int]:
    """How many members each wave replaces, for a fleet of `fleet_size` of which `already` run the version.

    Each wave names how many members run the new version after it (a count, or a share rounded up, so 25% of 3 is
    1); a wave that adds nobody is dropped. The total replaced is always fleet_size - already."""
    sizes: list[int] = []
    done = already
    for wave in strategy.waves:
        target = math.ceil(fleet_size * float(wave[:-1]) / 100) if wave.endswith("%") else int(wave)
        target = min(max(target, done), fleet_size)
        if target > done:
            sizes.append(target - done)
            done = target
    return sizes


# --- the gate --------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class WaveDecision:
    """The verdict on one wave and the numbers behind it (what the store records and `rollout status` shows)."""

    passed: bool
    final: bool  # False while the wave's members are still launching (only a burn-rate abort is final early)
    members: int
    ready: int
    failed: int
    success_rate: float | None
    time_to_ready_p95: float | None
    burn_rate: float
    alarms: tuple[str, ...]
    reasons: tuple[str, ...]

    def as_dict(self) -> dict[str, Any]:
        return {
            "passed": self.passed,
            "final": self.final,
            "members": self.members,
            "ready": self.ready,
            "failed": self.failed,
            "success_rate": self.success_rate,
            "time_to_ready_p95": self.time_to_ready_p95,
            "burn_rate": self.burn_rate,
            "alarms": list(self.alarms),
            "reasons": list(self.reasons),
        }


def p95(values: Sequence[float]) -> float | None:
    """Nearest-rank 95th percentile (the value at rank ⌈0.95·n⌉): never interpolated below a real observation."""
    if not values:
        return None
    ordered = sorted(values)
    return ordered[math.ceil(0.95 * len(ordered)) - 1]


FAILED_NAMED = 5  # failed members a verdict names (the others are counted): a wave of 500 is not a 500-line reason


def decide(strategy: Strategy, members: Sequence[Member], *, alarms_firing: Sequence[str] = ()) -> WaveDecision:
    """Judge a wave by its new members. Every unmet gate is a reason; the burn rate is judged on the failures so far,
    so a wave that fails fast is stopped before its last members are even ready."""
    total = len(members)
    ready = [m for m in members if m.state == "ready"]
    failed = [m for m in members if m.state in ("failed", "stopped")]
    settled = len(ready) + len(failed) == total
    budget = 1.0 - strategy.error_budget.slo
    burn = (len(failed) / total) / budget if total else 0.0
    reasons: list[str] = []
    # Which members failed and why, so the verdict itself says where to look (the console of that guest).
    named = [f"{m.id}: {m.detail}" if m.detail else m.id for m in failed[:FAILED_NAMED]]
    why = "; ".join(named) + (f"; and {len(failed) - FAILED_NAMED} more" if len(failed) > FAILED_NAMED else "")
    if burn > strategy.error_budget.max_burn_rate:
        reasons.append(
            f"burn rate {burn:.1f}× > {strategy.error_budget.max_burn_rate:g}× "
            f"({len(failed)} of {total} failed: {why}; SLO {strategy.error_budget.slo:g})"
        )
    success = len(ready) / total if total and settled else None
    ttr = p95([m.time_to_ready for m in ready if m.time_to_ready is not None])
    if settled:
        gates = strategy.gates
        if success is not None and success < gates.boot_success_rate:
            reasons.append(f"boot success rate {success:.2f} < {gates.boot_success_rate:g} (failed: {why})")
        if gates.time_to_ready_p95 is not None and ttr is not None and ttr > gates.time_to_ready_p95:
            reasons.append(f"time-to-ready p95 {ttr:.1f}s > {gates.time_to_ready_p95:g}s")
    firing = tuple(a for a in alarms_firing if a in strategy.gates.alarms)
    reasons += [f"alarm {a} is in ALARM" for a in firing]
    return WaveDecision(
        passed=not reasons and settled,
        final=settled or bool(reasons),
        members=total,
        ready=len(ready),
        failed=len(failed),
        success_rate=success,
        time_to_ready_p95=ttr,
        burn_rate=round(burn, 3),
        alarms=firing,
        reasons=tuple(reasons),
    )
