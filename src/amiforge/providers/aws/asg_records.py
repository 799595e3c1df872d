"""What amiforge reads from and writes on an Auto Scaling group and its instances: the tags that carry a rollout's
state (so a resumed controller finds what it launched), the records it reads back, and how they become `Member`s.
The behaviour is `AsgFleet` (fleet.py)."""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime
from typing import Any, Final

from amiforge.errors import ConfigError
from amiforge.model import AWS_REGION_RE
from amiforge.providers.aws.images import parse_aws_time
from amiforge.providers.interface import Member, MemberState, Replacement

# On the group: the owner's consent that amiforge may roll it (and the IAM condition for doing so).
ROLLOUT_TAG: Final = "amiforge:rollout"
ROLLOUT_ENABLED: Final = "enabled"
# On a new member.
TOKEN_TAG: Final = "amiforge:replacement"
VERSION_TAG: Final = "amiforge:version"
GROUP_TAG: Final = "amiforge:group"
REPLACES_TAG: Final = "amiforge:replaces"
REPLACED_AT_TAG: Final = "amiforge:replaced-at"
REPLACED_VERSION_TAG: Final = "amiforge:replaced-version"
READY_TAG: Final = "amiforge:ready"
FAILED_TAG: Final = "amiforge:failed"
FAILED_AT_TAG: Final = "amiforge:failed-at"
# On an old member, before it is terminated.
REPLACED_BY_TAG: Final = "amiforge:replaced-by"

# Values per EC2 filter in one request.
FILTER_VALUES: Final = 200
TAG_VALUE_MAX: Final = 256
IMAGE_ID_RE: Final = re.compile(r"ami-[0-9a-f]{8}(?:[0-9a-f]{9})?")
VERSION_RE: Final = re.compile(r"[1-9][0-9]*")
REGION_RE: Final = AWS_REGION_RE
ACTIVE_STATES: Final = frozenset({"Pending", "Pending:Wait", "Pending:Proceed", "InService"})
LEAVING_STATES: Final = ("Terminating", "Terminated", "Detaching", "Detached", "Warmed")
EC2_ALIVE: Final = frozenset({"pending", "running"})
KIND_ORDER: Final = {"replaced": 0, "launch": 1, "ready": 2, "failed": 3, "heartbeat": 4}


def parse_group_target(name: str) -> tuple[str, str]:
    """`eu-west-1/web` (a rollout target `aws:REGION/GROUP` without its prefix) → (region, group name)."""
    region, sep, group = name.partition("/")
    if not sep or REGION_RE.fullmatch(region) is None or not group or len(group) > 255 or ":" in group:
        raise ConfigError(
            f"Auto Scaling target {name!r} is not REGION/GROUP",
            fix="name the group with its region, e.g. aws:eu-west-1/web",
        )
    return region, group


@dataclass(frozen=True)
class Group:
    name: str
    raw: Mapping[str, Any]
    members: Mapping[str, Mapping[str, Any]]  # instance id -> the group's record of it (LifecycleState, HealthStatus)

    @property
    def tags(self) -> dict[str, str]:
        return {str(t["Key"]): str(t.get("Value", "")) for t in self.raw.get("Tags", [])}

    def active(self, instance_id: str) -> bool:
        """Launching or in service (a claimable replacement)."""
        record = self.members.get(instance_id)
        return record is not None and record.get("LifecycleState") in ACTIVE_STATES

    def present(self, instance_id: str) -> bool:
        """Still a member that can be terminated: anything but on its way out (Standby included)."""
        record = self.members.get(instance_id)
        return record is not None and not str(record.get("LifecycleState")).startswith(LEAVING_STATES)


@dataclass(frozen=True)
class Instance:
    id: str
    image_id: str
    state: str  # EC2's: pending, running, shutting-down, terminated, stopping, stopped
    launched_at: datetime
    tags: Mapping[str, str]


@dataclass
class Claim:
    replacement: Replacement
    ours: bool  # we terminated its old member (tagged replaced-by): its replacement is on the way
    old: Instance | None
    new: Instance | None = None


def chunks(values: list[str]) -> list[list[str]]:
    return [values[i : i + FILTER_VALUES] for i in range(0, len(values), FILTER_VALUES)]


def float_or_none(value: str | None) -> float | None:
    try:
        return float(value) if value is not None else None
    except ValueError:
        return None


def parse_time(value: str | None) -> datetime | None:
    if not value:
        return None
    try:
        return parse_aws_time(value)
    except ValueError:
        return None


def as_member(instance: Instance, state: MemberState, time_to_ready: float | None, detail: str) -> Member:
    return Member(
        id=instance.id,
        version_ref=instance.tags.get(VERSION_TAG),
        location=instance.image_id,
        state=state,
        launched_at=instance.launched_at,
        time_to_ready=time_to_ready,
        detail=detail,
    )
