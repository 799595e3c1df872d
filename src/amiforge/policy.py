"""The promotion policy: per channel, what a version must satisfy to be promoted into it, and the waivers.

This module owns the policy file (DESIGN.md §2 Channel, §5): the pydantic models (all `extra="forbid"`,
frozen); `load_policy()` / `parse_policy()`, which report every problem at once with file, line, field and fix
(the YAML machinery is shared with recipes, in `amiforge.yamlfile`); `default_policy()`; the JSON Schema
export; and `evaluate()`, the promotion gate itself.

`evaluate()` is pure: the caller gathers the facts about a version into a `Candidate` (status, boot test,
findings, signature check, revocations, when it entered each channel) and passes `now`; nothing here reads the
store, the clock or the network. It returns a `GateDecision` listing every unmet requirement, never just the
first; raising `GateFailed` is the caller's move (`GateDecision.raise_if_unmet()`).

Fail-closed choices worth knowing: a channel whose name starts with `prod` cannot switch signatures off;
residue and policy findings always gate (only a waiver excuses them); a waiver matches a finding's own id
only (never one of its aliases: an advisory's aliases may cover other CVEs than the one a person waived); an
expired waiver gates instead of waiving; deprecated, retired, failed and unfinished versions never pass.
"""

from __future__ import annotations

import difflib
import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, date, datetime, time, timedelta
from pathlib import Path
from typing import Annotated, Any, NoReturn, assert_never

from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    PlainSerializer,
    PrivateAttr,
    StrictBool,
    ValidationError,
    ValidationInfo,
    WithJsonSchema,
    model_validator,
)

from amiforge import durations
from amiforge.errors import ConfigError, GateFailed, GateFailure, Problem
from amiforge.model import Finding, FindingKind, Severity, Status
from amiforge.yamlfile import (
    YamlKind,
    dotted,
    fail,
    line_of,
    parse_mapping,
    problems_from_validation,
    raise_problems,
    read_text,
    short,
    yaml_type,
)

__all__ = [
    "Candidate",
    "ChannelPolicy",
    "GateDecision",
    "Policy",
    "Waiver",
    "default_policy",
    "evaluate",
    "load_policy",
    "parse_policy",
    "policy_json_schema",
]

# A policy is a few KB; anything far bigger is a mistake, not a policy.
MAX_POLICY_BYTES = 256 * 1024
# A soak longer than a year is a typo (1000h for 100h), and keeps timedelta far from overflowing.
_MAX_SOAK = timedelta(days=365)

_FORBID = ConfigDict(extra="forbid", frozen=True)
_SCHEMA_HINT = "`policy_json_schema()` lists every key and the values it allows; examples/policy.yaml has them all"
_EXAMPLE = "examples/policy.yaml"


# ----------------------------------------------------------------------------------------------------------
# Scalars


_CHANNEL_RE = r"[a-z][a-z0-9-]{0,31}"


def _check_channel_name(value: str) -> str:
    if re.fullmatch(_CHANNEL_RE, value) is None:
        raise fail(
            f"{short(value)} is not a valid channel name: lowercase letters, digits and '-', starting with a "
            "letter, at most 32 characters",
            "use something like 'dev', 'staging' or 'prod-eu'",
        )
    return value


ChannelName = Annotated[
    str, AfterValidator(_check_channel_name), WithJsonSchema({"type": "string", "pattern": f"^{_CHANNEL_RE}$"})
]


def _non_empty(value: str) -> str:
    if not value.strip():
        raise fail("must not be empty", "write a value")
    if "\x00" in value:
        raise fail("must not contain a NUL character", "remove it")
    return value


NonEmptyStr = Annotated[str, AfterValidator(_non_empty), WithJsonSchema({"type": "string", "minLength": 1})]

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

# Durations in the one grammar of amiforge.durations (90s, 30m, 1h, 1d12h, or a number of seconds).
_SOAK_RE = durations.PATTERN


def _check_soak(value: object) -> timedelta:
    fix = f"use e.g. {durations.FORMS}"
    seconds = value.total_seconds() if isinstance(value, timedelta) else durations.seconds_of(value)
    if seconds is None or not math.isfinite(seconds) or seconds < 0:
        raise fail(f"{short(value)} is not a duration", fix)
    if seconds > _MAX_SOAK.total_seconds():
        raise fail(f"{short(value)} is longer than {_format_duration(_MAX_SOAK)}", "a soak is hours or days")
    return timedelta(seconds=seconds)


def _format_duration(value: timedelta) -> str:
    """`timedelta(days=1, hours=2)` → `1d2h`: the compact form `min_soak` accepts back."""
    micros = round(value.total_seconds() * 1_000_000)
    if micros <= 0:
        return "0s"
    days, rest = divmod(micros, 86_400_000_000)
    hours, rest = divmod(rest, 3_600_000_000)
    minutes, rest = divmod(rest, 60_000_000)
    seconds = f"{rest / 1_000_000:.6f}".rstrip("0").rstrip(".")
    parts = [f"{n}{unit}" for n, unit in ((days, "d"), (hours, "h"), (minutes, "m")) if n]
    if rest:
        parts.append(f"{seconds}s")
    return "".join(parts)


def _human(value: timedelta) -> str:
    """A duration for a person, rounded up to whole seconds (so "0s left" never appears on a failing gate)."""
    return _format_duration(timedelta(seconds=max(0, math.ceil(value.total_seconds()))))


SoakDuration = Annotated[
    timedelta,
    BeforeValidator(_check_soak),
    PlainSerializer(_format_duration, return_type=str, when_used="json"),
    WithJsonSchema(
        {
            "anyOf": [
                {"type": "number", "minimum": 0},
                {"type": "string", "pattern": f"^(?:{_SOAK_RE})$"},
            ],
            "description": "seconds, or a duration such as 90s, 30m, 1h, 1d, 1d12h",
        },
        mode="validation",
    ),
]


def _utc(value: datetime) -> datetime:
    # YAML reads a timestamp without a zone as UTC, and the store tags its times UTC: a naive time means UTC.
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
        return _utc(value)
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


# ----------------------------------------------------------------------------------------------------------
# The models


# Set in the validation context by parse_policy(), which runs the checks across keys on the raw data itself.
_CROSS_CHECKED = "amiforge.policy.cross_checked"

_SOAK_WITHOUT_AFTER = (
    "min_soak is set but after is not: soak is time spent in the channel named by after",
    "add after: <previous channel>, or remove min_soak",
)
_PACKAGE_AND_PATH = (
    "a waiver names a package or a path, not both (a finding has one or the other)",
    "keep one; write two waivers if both are meant",
)
_NO_CHANNELS = ("channels is empty, so this waiver waives nothing", "list channels, or omit the key for all")


def _cross_checked(info: ValidationInfo) -> bool:
    return isinstance(info.context, Mapping) and bool(info.context.get(_CROSS_CHECKED))


def _none_is_defaults(value: object) -> object:
    # `dev:` with nothing under it is a channel with every default, not an error.
    return {} if value is None else value


class ChannelPolicy(BaseModel):
    """What a version must satisfy to be promoted into one channel."""

    model_config = _FORBID

    require_boot_test: StrictBool = True
    require_signature: StrictBool = Field(
        default=True, description="may not be false for a channel whose name starts with 'prod'"
    )
    max_cve_severity: SeverityLevel = Field(default=Severity.HIGH, description="highest CVE severity allowed")
    fixed_only: StrictBool = Field(
        default=False, description="if true, only CVEs with a fixed version count against max_cve_severity"
    )
    # Fail closed: an advisory without a rating (common for fresh Debian CVEs) is judged as this severity, never
    # waved through as the lowest.
    unknown_cve_severity: SeverityLevel = Field(
        default=Severity.HIGH, description="the severity a CVE without a rating is judged as"
    )
    allow_secrets: StrictBool = Field(
        default=False, description="if false, any secret finding fails the gate unless waived"
    )
    after: ChannelName | None = Field(default=None, description="the channel a version must have been in first")
    min_soak: SoakDuration = Field(
        default=timedelta(0),
        description="how long the version must have been in `after` (needs `after`)",
        json_schema_extra={"default": "0s"},
    )

    @model_validator(mode="after")
    def _soak_needs_after(self, info: ValidationInfo) -> ChannelPolicy:
        if not _cross_checked(info) and self.min_soak > timedelta(0) and self.after is None:
            raise fail(_SOAK_WITHOUT_AFTER[0], _SOAK_WITHOUT_AFTER[1], key="min_soak")
        return self


class Waiver(BaseModel):
    """An explicit, expiring, attributed excuse for one finding (DESIGN.md §5)."""

    model_config = _FORBID

    finding: NonEmptyStr = Field(description="finding id: advisory id, or a secret/residue rule id")
    package: NonEmptyStr | None = Field(default=None, description="only for this package")
    path: NonEmptyStr | None = Field(default=None, description="only for this file")
    channels: tuple[ChannelName, ...] | None = Field(default=None, description="only in these channels; default all")
    reason: NonEmptyStr
    by: NonEmptyStr
    expires: Expiry

    @model_validator(mode="after")
    def _package_or_path(self, info: ValidationInfo) -> Waiver:
        if _cross_checked(info):
            return self
        if self.package is not None and self.path is not None:
            raise fail(*_PACKAGE_AND_PATH, key="path")
        if self.channels is not None and not self.channels:
            raise fail(*_NO_CHANNELS, key="channels")
        return self

    @property
    def expires_at(self) -> datetime:
        """The first instant the waiver no longer holds: a date is valid through the end of that day (UTC)."""
        if isinstance(self.expires, datetime):
            return self.expires
        return datetime.combine(self.expires + timedelta(days=1), time(0), tzinfo=UTC)

    def expired(self, now: datetime) -> bool:
        return _utc(now) >= self.expires_at

    def matches(self, finding: Finding, channel: str) -> bool:
        """Same finding id, same package/path if the waiver names one, and a channel the waiver covers."""
        return (
            finding.id == self.finding
            and (self.package is None or finding.package == self.package)
            and (self.path is None or finding.path == self.path)
            and (self.channels is None or channel in self.channels)
        )

    def describe(self) -> str:
        where = f" ({self.package or self.path})" if self.package or self.path else ""
        return f"waiver for {self.finding}{where} by {self.by}, expires {self.expires.isoformat()}"


class Policy(BaseModel):
    """The whole policy: channels in promotion order as written, and the waivers."""

    model_config = ConfigDict(extra="forbid", frozen=True, title="amiforge policy")

    channels: dict[ChannelName, Annotated[ChannelPolicy, BeforeValidator(_none_is_defaults)]] = Field(
        min_length=1, json_schema_extra={"propertyNames": {"pattern": f"^{_CHANNEL_RE}$"}}
    )
    waivers: tuple[Waiver, ...] = ()

    # Not part of the schema: the file it was read from, for messages.
    _source: str | None = PrivateAttr(default=None)

    @model_validator(mode="after")
    def _consistent(self, info: ValidationInfo) -> Policy:
        # load_policy() checks the raw data itself (so these problems come with lines, next to every other
        # problem); this guard keeps a Policy built in code from ever holding a cycle or an unsigned prod.
        if _cross_checked(info):
            return self
        raw = {
            "channels": {name: rule.model_dump() for name, rule in self.channels.items()},
            "waivers": [
                {**w.model_dump(), "channels": list(w.channels) if w.channels is not None else None}
                for w in self.waivers
            ],
        }
        found = _cross_problems(raw)
        if found:
            raise fail(
                "; ".join(f"{dotted(loc)}: {message}" for loc, message, _ in found),
                found[0][2],
            )
        return self

    @property
    def source(self) -> str | None:
        return self._source

    def channel(self, name: str) -> ChannelPolicy:
        """The rules of channel `name`; ConfigError listing the channels if the policy has none by that name."""
        rule = self.channels.get(name)
        if rule is not None:
            return rule
        known = ", ".join(self.channels)
        where = f" ({self._source})" if self._source else ""
        fix = f"use one of: {known}; or add channels.{name} to the policy"
        raise ConfigError(
            f"channel {name!r} is not in the policy{where}; channels: {known}",
            problems=[
                Problem(message=f"unknown channel {name!r}; channels: {known}", file=self._source, field="channels")
            ],
            fix=fix,
        )

    def bound_to(self, source: str) -> Policy:
        copy = self.model_copy()
        copy._source = source
        return copy


# ----------------------------------------------------------------------------------------------------------
# Checks across keys: after, cycles, prod signatures, waiver channels. They read the raw data so they run (and
# report with lines) even when another part of the file fails pydantic, and every problem shows at once.

_Loc = tuple[str | int, ...]


def _cross_problems(data: Mapping[str, Any]) -> list[tuple[_Loc, str, str]]:
    found: list[tuple[_Loc, str, str]] = []
    channels = data.get("channels")
    rules: dict[str, Mapping[str, Any]] = {}
    if isinstance(channels, Mapping):
        rules = {k: (v if isinstance(v, Mapping) else {}) for k, v in channels.items() if isinstance(k, str)}
    names = list(rules)
    known = ", ".join(names) or "none"

    for name, rule in rules.items():
        after = rule.get("after")
        if isinstance(after, str) and after not in rules:
            found.append(
                (
                    ("channels", name, "after"),
                    f"after names {after!r}, which is not a channel of this policy (channels: {known})",
                    _suggest(after, names, "name one of the channels above, or add that channel"),
                )
            )
        if rule.get("after") is None and _positive_soak(rule.get("min_soak")):
            found.append((("channels", name, "min_soak"), *_SOAK_WITHOUT_AFTER))
        # DESIGN §5: nothing reaches production unsigned; a policy may relax signatures for dev only.
        if name.startswith("prod") and rule.get("require_signature") is False:
            found.append(
                (
                    ("channels", name, "require_signature"),
                    f"channel {name!r} is a production channel (its name starts with 'prod'); "
                    "it must require a signature",
                    "remove require_signature: false (sign the version with `amiforge sign REF`)",
                )
            )

    # Cycles in `after`: no version could ever enter a channel on one. Each cycle is reported once, at the
    # channel of the cycle that comes first in the file.
    nexts = {n: r.get("after") for n, r in rules.items() if isinstance(r.get("after"), str) and r["after"] in rules}
    reported: set[str] = set()
    for start in names:
        path: list[str] = []
        node: str | None = start
        while node is not None and node not in path and node not in reported:
            path.append(node)
            node = nexts.get(node)
        if node is not None and node in path:
            cycle = path[path.index(node) :]
            reported.update(cycle)
            first = min(cycle, key=names.index)
            ring = cycle[cycle.index(first) :] + cycle[: cycle.index(first)]
            shown = " → ".join([*ring, first])
            found.append(
                (
                    ("channels", first, "after"),
                    f"after forms a cycle ({shown}): no version could ever enter these channels",
                    "break the cycle: the first channel (usually dev) has no after",
                )
            )
        reported.update(path)

    waivers = data.get("waivers")
    if isinstance(waivers, list):
        for i, waiver in enumerate(waivers):
            if not isinstance(waiver, Mapping):
                continue
            if waiver.get("package") is not None and waiver.get("path") is not None:
                found.append((("waivers", i, "path"), *_PACKAGE_AND_PATH))
            listed = waiver.get("channels")
            if not isinstance(listed, list):
                continue
            if not listed:
                found.append((("waivers", i, "channels"), *_NO_CHANNELS))
            for j, channel in enumerate(listed):
                if isinstance(channel, str) and channel not in rules:
                    found.append(
                        (
                            ("waivers", i, "channels", j),
                            f"waiver names channel {channel!r}, which is not a channel of this policy "
                            f"(channels: {known})",
                            _suggest(channel, names, "name one of the channels above"),
                        )
                    )
    return found


def _positive_soak(value: object) -> bool:
    try:
        return value is not None and _check_soak(value) > timedelta(0)
    except ValueError:  # not a duration: reported where min_soak itself is validated
        return False


def _suggest(value: str, names: Sequence[str], fix: str) -> str:
    close = difflib.get_close_matches(value, names, n=1)
    return f"did you mean '{close[0]}'? {fix}" if close else fix


# ----------------------------------------------------------------------------------------------------------
# Loading


def _kind() -> YamlKind:
    return YamlKind(
        noun="policy",
        model=Policy,
        schema_hint=_SCHEMA_HINT,
        max_bytes=MAX_POLICY_BYTES,
        missing_fix=f"start from the example: cp {_EXAMPLE} {{path}}",
        default_name="policy.yaml",
    )


_KIND = _kind()


def load_policy(path: Path) -> Policy:
    """Read, validate and return the policy at `path`; raise ConfigError listing every problem found."""
    return parse_policy(read_text(path, _KIND), path)


def parse_policy(text: str, path: Path) -> Policy:
    """Validate policy YAML `text` as if read from `path`."""
    start = f"start from {_EXAMPLE}; at least 'channels:' is required"
    node, data, problems = parse_mapping(
        text, path, _KIND, top_keys="channels:, waivers:", empty_fix=start, mapping_fix=start
    )
    file = str(path)
    problems += [
        Problem(message=message, file=file, line=line_of(node, loc), field=dotted(loc), fix=fix)
        for loc, message, fix in _cross_problems(data)
    ]
    try:
        policy = Policy.model_validate(data, context={_CROSS_CHECKED: True})
    except ValidationError as e:
        _raise(path, problems + problems_from_validation(e, node, file, _KIND))
    if problems:
        _raise(path, problems)
    return policy.bound_to(file)


def _raise(path: Path, problems: list[Problem]) -> NoReturn:
    raise_problems(_KIND, path, problems)


def default_policy() -> Policy:
    """dev → staging (1h soak) → prod (24h soak), as in examples/policy.yaml, without waivers."""
    return Policy(
        channels={
            "dev": ChannelPolicy(max_cve_severity=Severity.CRITICAL),
            "staging": ChannelPolicy(after="dev", min_soak=timedelta(hours=1), max_cve_severity=Severity.HIGH),
            "prod": ChannelPolicy(
                after="staging", min_soak=timedelta(hours=24), max_cve_severity=Severity.MEDIUM, fixed_only=True
            ),
        }
    )


def policy_json_schema() -> dict[str, object]:
    """JSON Schema (draft 2020-12) of a policy file, for editors and the CLI."""
    schema: dict[str, object] = Policy.model_json_schema(mode="validation")
    return {"$schema": "https://json-schema.org/draft/2020-12/schema", **schema, "title": "amiforge policy"}


# ----------------------------------------------------------------------------------------------------------
# The gate


@dataclass(frozen=True, kw_only=True)
class Candidate:
    """Facts about one version, gathered by the caller; `evaluate()` only judges them.

    Keyword-only: several fields are booleans, and a swapped pair must not silently pass a gate.
    """

    ref: str
    status: Status
    boot_test_passed: bool
    findings: Sequence[Finding]
    signature_error: str | None  # None: a signature verified against the artifact's current bytes
    scanned: bool
    revoked: bool
    revoked_ancestors: Sequence[str]
    entered: Mapping[str, datetime]  # channel -> when this version was last promoted into it


@dataclass(frozen=True)
class GateDecision:
    """Whether a version may enter a channel, with every unmet requirement and the waivers involved."""

    channel: str
    passed: bool
    unmet: tuple[GateFailure, ...]
    waivers_used: tuple[Waiver, ...] = ()  # valid waivers that excused a finding (to record in the event)
    expired_waivers: tuple[Waiver, ...] = ()  # expired waivers that would have excused a finding

    def raise_if_unmet(self) -> None:
        """Raise GateFailed listing every unmet requirement; return if the gate passed."""
        if not self.passed:
            raise GateFailed(
                f"promotion to {self.channel}",
                self.unmet,
                fix="fix each item listed, or add an expiring waiver to the policy for a finding you accept",
            )


# States in which a version can never be promoted, whatever the rest says.
_NOT_PROMOTABLE: Mapping[Status, str] = {
    Status.BAKING: "is still baking",
    Status.FAILED: "failed (bake or boot test)",
    Status.DEPRECATED: "is deprecated (on its way to retirement)",
    Status.RETIRED: "is retired",
}


def evaluate(policy: Policy, channel: str, candidate: Candidate, *, now: datetime) -> GateDecision:
    """Judge `candidate` against the rules of `channel` at time `now`; list every unmet requirement.

    Raises ConfigError (listing the channels) if the policy has no such channel. Pure: no store, no clock.
    """
    rule = policy.channel(channel)
    now = _utc(now)
    ref = candidate.ref
    unmet: list[GateFailure] = []

    if candidate.revoked or candidate.status is Status.REVOKED:
        unmet.append(GateFailure("revoked", f"{ref} is revoked and can never be promoted; bake a new version"))
    if candidate.revoked_ancestors:
        ancestors = ", ".join(candidate.revoked_ancestors)
        unmet.append(
            GateFailure(
                "revoked-ancestor",
                f"{ref} descends from revoked {ancestors}; rebake it from a parent that is not revoked",
            )
        )
    if candidate.status in _NOT_PROMOTABLE:
        unmet.append(
            GateFailure("status", f"{ref} {_NOT_PROMOTABLE[candidate.status]}; only a tested, scanned version moves")
        )
    if not candidate.scanned:
        unmet.append(GateFailure("scan", f"{ref} has not been scanned; run `amiforge scan {ref}`"))
    if rule.require_boot_test and not candidate.boot_test_passed:
        unmet.append(
            GateFailure(
                "boot-test", f"{ref} has no passing boot test; run `amiforge test {ref}` and fix what it reports"
            )
        )
    if rule.require_signature and candidate.signature_error is not None:
        unmet.append(
            GateFailure(
                "signature",
                f"{ref}: no signature verifies against its artifact ({candidate.signature_error}); "
                f"if it was never signed run `amiforge sign {ref}`, if the artifact changed find out why first",
            )
        )

    used: list[Waiver] = []
    expired: list[Waiver] = []
    for finding in candidate.findings:
        reason = _offence(rule, channel, finding)
        if reason is None:
            continue
        matching = [w for w in policy.waivers if w.matches(finding, channel)]
        valid = [w for w in matching if not w.expired(now)]
        if valid:
            used.extend(w for w in valid[:1] if w not in used)
            continue
        stale = [w for w in matching if w.expired(now)]
        expired.extend(w for w in stale if w not in expired)
        unmet.append(GateFailure(_finding_name(finding), _finding_detail(finding, reason, stale)))

    if rule.after is not None:
        entered = candidate.entered.get(rule.after)
        if entered is None:
            unmet.append(
                GateFailure(
                    "after",
                    f"{ref} has never been in {rule.after}; {channel} takes versions from {rule.after}: "
                    f"run `amiforge promote {ref} --channel {rule.after}` first",
                )
            )
        elif rule.min_soak > timedelta(0):
            soaked = now - _utc(entered)
            if soaked < rule.min_soak:
                ready = _utc(entered) + rule.min_soak
                unmet.append(
                    GateFailure(
                        "soak",
                        f"{ref} has been in {rule.after} for {_human(soaked)} of the {_human(rule.min_soak)} "
                        f"{channel} requires: {_human(rule.min_soak - soaked)} left "
                        f"(promote after {ready.isoformat(timespec='seconds')})",
                    )
                )

    return GateDecision(
        channel=channel,
        passed=not unmet,
        unmet=tuple(unmet),
        waivers_used=tuple(used),
        expired_waivers=tuple(expired),
    )


def _offence(rule: ChannelPolicy, channel: str, finding: Finding) -> str | None:
    """Why `finding` counts against `channel`, or None if the channel's rules let it through."""
    match finding.kind:
        case FindingKind.CVE:
            if rule.fixed_only and finding.fixed is None:
                return None
            severity = rule.unknown_cve_severity if finding.severity is Severity.UNKNOWN else finding.severity
            if severity.rank <= rule.max_cve_severity.rank:
                return None
            judged = f" (unrated, judged {severity})" if finding.severity is Severity.UNKNOWN else ""
            return f"severity {finding.severity}{judged} is above {channel}'s max_cve_severity {rule.max_cve_severity}"
        case FindingKind.SECRET:
            if rule.allow_secrets:
                return None
            return f"a secret in the image ({channel} does not allow secrets)"
        case FindingKind.RESIDUE:
            return "build residue breaks every clone of the image (shared host keys, machine-id, histories)"
        case FindingKind.POLICY:
            return "a policy violation"
        case _:
            assert_never(finding.kind)


def _finding_name(finding: Finding) -> str:
    where = f" in {finding.package}" if finding.package else f" at {finding.path}" if finding.path else ""
    return f"{finding.kind} {finding.id}{where}"


def _finding_detail(finding: Finding, reason: str, stale: Sequence[Waiver]) -> str:
    text = f"{finding.title}: {reason}"
    match finding.kind:
        case FindingKind.CVE:
            if finding.fixed is not None:
                text += f"; upgrade {finding.package or 'the package'} to {finding.fixed} or later and rebake"
            else:
                text += "; no fix is published yet"
        case FindingKind.SECRET:
            at = f"{finding.path}:{finding.line}" if finding.line is not None else str(finding.path)
            seen = f" ({finding.redacted})" if finding.redacted else ""
            text += f"; remove it from {at}{seen}, rotate the credential and rebake"
        case FindingKind.RESIDUE:
            text += f"; clean {finding.path or 'it'} up at the end of the bake and rebake"
        case FindingKind.POLICY:
            text += "; fix the recipe and rebake"
        case _:
            assert_never(finding.kind)
    for waiver in stale:
        text += f"; the {waiver.describe()} has EXPIRED: renew it (new expires) only if the reason still holds"
    if not stale:
        scope = (
            f", package: {finding.package}" if finding.package else f", path: {finding.path}" if finding.path else ""
        )
        text += f"; to accept it, waive it: {{finding: {finding.id}{scope}, reason, by, expires}}"
    return text
