"""The policy file (docs/architecture.md §3 step 6, §7): per channel, what a version must satisfy to be promoted
into it, and the waivers; `load_policy()` / `parse_policy()`, `default_policy()` and the JSON Schema.

Loading reports every problem at once with file, line, field and fix (the YAML machinery is shared with recipes,
in `amiforge.yamlfile`). The checks that span keys (an `after` naming a channel, cycles, unsigned prod, waiver
channels) read the raw data, so they report with lines even when another part of the file fails pydantic; the
same checks guard a `Policy` built in code.

Fail-closed choices worth knowing: a channel whose name starts with `prod` cannot switch signatures off; a
waiver matches a finding's own id only (never one of its aliases: an advisory's aliases may cover other CVEs
than the one a person waived); every waiver expires.
"""

from __future__ import annotations

import difflib
from collections.abc import Mapping, Sequence
from datetime import UTC, datetime, time, timedelta
from pathlib import Path
from typing import Annotated, Any

from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    PrivateAttr,
    StrictBool,
    ValidationInfo,
    model_validator,
)

from amiforge.errors import ConfigError, Problem
from amiforge.model import Finding, Severity
from amiforge.policy.fields import (
    CHANNEL_PATTERN,
    STRICT,
    ChannelName,
    Expiry,
    MaxAge,
    SeverityLevel,
    SoakDuration,
    as_utc,
    soak_of,
)
from amiforge.policy.reporting import TagRules
from amiforge.policy.retention import Retention
from amiforge.policy.severity import SeveritySource
from amiforge.policy.slos import ImageSlos
from amiforge.yamlfile import (
    NonEmptyStr,
    YamlKind,
    dotted,
    fail,
    line_of,
    parse_mapping,
    read_text,
    validate_mapping,
)

__all__ = [
    "MAX_POLICY_BYTES",
    "ChannelPolicy",
    "Policy",
    "Waiver",
    "default_policy",
    "load_policy",
    "parse_policy",
    "policy_json_schema",
]

# A policy is a few KB; anything far bigger is a mistake, not a policy.
MAX_POLICY_BYTES = 256 * 1024

_SCHEMA_HINT = "`policy_json_schema()` lists every key and the values it allows; examples/policy.yaml has them all"
_EXAMPLE = "examples/policy.yaml"


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

    model_config = STRICT

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
    # Debian calls these not worth a security update; a team that disagrees says so here.
    count_debian_minor: StrictBool = Field(
        default=False,
        description="if true, CVEs Debian rates unimportant or issues no security update for (no-dsa, postponed, "
        "ignored) count against max_cve_severity like any other; if false they are shown and never fail the gate",
    )
    # Fail closed: findings matched against old data say nothing about what was published since.
    max_vulndb_age: MaxAge = Field(
        default=timedelta(days=7),
        description="how old the vulnerability data a scan matched against may be (`amiforge vulndb update`, then "
        "`amiforge rescan`); a scan with no advisories at all fails too",
        json_schema_extra={"default": "7d"},
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
    """An explicit, expiring, attributed excuse for one finding (docs/architecture.md §8)."""

    model_config = STRICT

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
        return as_utc(now) >= self.expires_at

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
        min_length=1, json_schema_extra={"propertyNames": {"pattern": f"^{CHANNEL_PATTERN}$"}}
    )
    waivers: tuple[Waiver, ...] = ()
    severity_source: SeveritySource = Field(
        default="debian",
        description="which rating a CVE's severity is: debian (Debian's urgency when assigned, else the scanner's, "
        "else CVSS), cvss (CVSS first), or max (the most severe)",
    )
    slos: Annotated[ImageSlos, BeforeValidator(_none_is_defaults)] = Field(
        default=ImageSlos(),
        description="service level objectives of images in their fleets: default and per image (boot success, "
        "time to ready, heartbeat freshness, window)",
    )
    tags: Annotated[TagRules, BeforeValidator(_none_is_defaults)] = Field(
        default=TagRules(),
        description="the tags every version and image must carry (amiforge report tags), and the tags that name an "
        "image's owner and cost center (amiforge report cost)",
    )
    retention: Annotated[Retention, BeforeValidator(_none_is_defaults)] = Field(
        default=Retention(),
        description="how long versions are kept and how they leave (amiforge retire): keep rules, deprecation, "
        "grace, snapshots, the blast-radius cap; default and per image",
    )

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
        # docs/architecture.md §8: nothing reaches production unsigned; a policy may relax signatures for dev only.
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
        return value is not None and soak_of(value) > timedelta(0)
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
        text,
        path,
        _KIND,
        top_keys="channels:, waivers:, severity_source:, slos:, tags:, retention:",
        empty_fix=start,
        mapping_fix=start,
    )
    file = str(path)
    problems += [
        Problem(message=message, file=file, line=line_of(node, loc), field=dotted(loc), fix=fix)
        for loc, message, fix in _cross_problems(data)
    ]
    policy = validate_mapping(Policy, (node, data, problems), path, _KIND, context={_CROSS_CHECKED: True})
    return policy.bound_to(file)


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
