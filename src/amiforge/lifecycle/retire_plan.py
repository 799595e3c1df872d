"""The retirement planner: from what the registry holds, what uses it, and the retention rules, to one decision per
artifact, each with the rule or the reference behind it. Pure: no I/O, no clock (lifecycle/retire.py reads the world
and applies the plan; tests/unit/test_retire_oracle.py holds it against an oracle written apart from it).

An artifact's way out is deprecate → (grace) → deregister → delete its snapshots (docs/architecture.md §15). What
decides, in order:

1. A stage already reached decides what is left: a purged artifact is done; a deregistered one has its snapshots
   deleted (when the rules say so).
2. Anything that uses the artifact keeps it: a reference to its version (a channel, a rollout, a fleet member…,
   in any region) or to its image in its region (an instance, a launch template, …). Nothing overrides this.
3. The rules keep it: a version being baked, a tag the rules exclude, the newest `keep_last` usable versions of the
   image, versions younger than `keep_younger_than`. A version past its `amiforge:expires` tag, a revoked and a
   failed version are kept by none of the last two.
4. Otherwise: deprecated once it is `deprecate_after` old (at once when revoked, failed or expired); deregistered
   once deprecated for `grace`.
5. A region where any reference source could not be read changes nothing ("blocked"); one image shared by two
   versions goes only with both; beyond `max_deletions` images per region the oldest go first, the rest wait
   ("deferred").
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime, timedelta
from typing import Literal

from amiforge.model import EXPIRES_TAG, Artifact, ChannelPointer, ImageVersion, Retirement, Status, expiry_time
from amiforge.policy.retention import Retention, RetentionRules
from amiforge.providers.interface import ImageState, Reference, SourceFailure

Action = Literal["keep", "deprecate", "wait", "deregister", "delete-snapshots", "deferred", "blocked", "done"]
# The actions that change something when applied.
CHANGES: frozenset[str] = frozenset({"deprecate", "deregister", "delete-snapshots"})
# States whose versions count towards keep_last (the usable ones; deprecated ones still boot).
USABLE = frozenset({Status.BUILT, Status.TESTED, Status.SCANNED, Status.SIGNED, Status.DEPRECATED})
# A reference's region when it names a version wherever its copies are (a channel, a rollout).
EVERY_REGION = ""
# How many references a step's reason names before "and N more".
SHOWN_REFERENCES = 3


@dataclass(frozen=True)
class Holding:
    """One artifact of a version as retire sees it: the registry's record and where it stands on its way out."""

    artifact: Artifact
    retirement: Retirement | None = None


@dataclass(frozen=True)
class Entry:
    """One version and its artifacts."""

    version: ImageVersion
    holdings: tuple[Holding, ...]


@dataclass(frozen=True)
class Step:
    """The decision on one artifact, and why."""

    version: str
    provider: str
    region: str
    location: str
    artifact_id: int
    action: Action
    why: str
    stage: str | None = None  # where it stands now: None (in use), deprecated, deregistered, purged
    snapshots: tuple[str, ...] = ()
    references: tuple[str, ...] = ()  # what uses it (all of them; `why` names the first few)


@dataclass(frozen=True)
class VersionPlan:
    __computed__ = ("changes",)

    version: str
    image: str
    status: str
    created_at: datetime
    steps: tuple[Step, ...]
    retire: bool  # every artifact is done: the registry marks the version retired

    @property
    def changes(self) -> bool:
        return self.retire or any(s.action in CHANGES for s in self.steps)


@dataclass(frozen=True)
class RetirePlan:
    __computed__ = ("changes",)

    at: datetime
    versions: tuple[VersionPlan, ...]
    failures: tuple[SourceFailure, ...] = ()
    notes: tuple[str, ...] = ()
    calls: Mapping[str, Mapping[str, int]] = field(default_factory=dict)  # region → API operation → calls
    max_deletions: int = 10

    @property
    def changes(self) -> bool:
        return any(v.changes for v in self.versions)

    def steps(self, *actions: str) -> list[Step]:
        return [s for v in self.versions for s in v.steps if not actions or s.action in actions]


def expiry_of(version: ImageVersion) -> datetime | None:
    """When the version's `amiforge:expires` tag says it may go (a date: the end of that day, UTC); None if it has
    none. ValueError for a tag that is not a date or a time."""
    text = version.tags.get(EXPIRES_TAG)
    return None if text is None else expiry_time(text)


def finished(r: Retirement | None, rules: RetentionRules) -> bool:
    """Whether an artifact's way out is over: purged, or deregistered with no snapshots left to delete."""
    if r is None:
        return False
    return r.stage == "purged" or (r.stage == "deregistered" and (not r.snapshots or not rules.delete_snapshots))


def _day(moment: datetime) -> str:
    return moment.astimezone(UTC).strftime("%Y-%m-%d %H:%M UTC")


def _age(delta: timedelta) -> str:
    days = delta.total_seconds() / 86400
    return f"{days:.0f}d" if days >= 1 else f"{delta.total_seconds() / 3600:.0f}h"


def _used_by(refs: Sequence[Reference]) -> str:
    names = sorted({r.describe() for r in refs})
    shown = ", ".join(names[:SHOWN_REFERENCES])
    more = f" and {len(names) - SHOWN_REFERENCES} more" if len(names) > SHOWN_REFERENCES else ""
    return f"in use: {shown}{more}"


class _Index:
    """References by version (in a region, or in every region) and by image (in its region)."""

    def __init__(self, references: Iterable[Reference]) -> None:
        self.by_version: dict[str, list[Reference]] = defaultdict(list)
        self.by_image: dict[tuple[str, str], list[Reference]] = defaultdict(list)
        for ref in references:
            if ref.version is not None:
                self.by_version[ref.version].append(ref)
            if ref.location is not None:
                self.by_image[(ref.region, ref.location)].append(ref)

    def of(self, version: str, artifact: Artifact) -> list[Reference]:
        found = [r for r in self.by_version.get(version, ()) if r.region in (EVERY_REGION, artifact.region)]
        found += [r for r in self.by_image.get((artifact.region, artifact.location), ()) if r not in found]
        return found


def channel_references(channels: Iterable[ChannelPointer]) -> list[Reference]:
    """Every channel's current version and the previous one (its rollback image), in every region."""
    found = []
    for c in channels:
        found.append(Reference("channel", f"{c.name}:{c.channel} (current)", EVERY_REGION, version=c.current))
        if c.previous is not None:
            found.append(
                Reference("channel", f"{c.name}:{c.channel} (previous: the rollback image)", EVERY_REGION,
                          version=c.previous)
            )  # fmt: skip
    return found


def _rule_keeps(
    version: ImageVersion, rules: RetentionRules, *, newest: bool, expired: bool, now: datetime
) -> str | None:
    """Why the rules keep the version (not its references), or None."""
    if version.status is Status.BAKING:
        return "being baked"
    for key, wanted in rules.exclude_tags.items():
        value = version.tags.get(key)
        if value is not None and wanted in ("*", value):
            return f"excluded by its tag {key}={value}"
    if expired or version.status in (Status.REVOKED, Status.FAILED):
        return None
    if newest:
        return f"one of the newest {rules.keep_last} usable versions of {version.name}"
    age = now - version.created_at
    if age < rules.keep_younger_than:
        return f"younger than {_age(rules.keep_younger_than)} ({_age(age)} old)"
    return None


def _going(version: ImageVersion, expires: datetime | None, now: datetime) -> str | None:
    """Why the version goes at once, whatever its age, or None."""
    if version.status is Status.REVOKED:
        return "revoked"
    if version.status is Status.FAILED:
        return "failed"
    if expires is not None and expires <= now:
        return f"expired {_day(expires)} ({EXPIRES_TAG})"
    return None


def _decide(
    entry: Entry,
    holding: Holding,
    *,
    rules: RetentionRules,
    refs: Sequence[Reference],
    kept_by_rule: str | None,
    going: str | None,
    images: Mapping[tuple[str, str], ImageState],
    now: datetime,
) -> Step:
    version, artifact, r = entry.version, holding.artifact, holding.retirement
    stage = r.stage if r is not None else None
    step = Step(
        version.ref, artifact.provider, artifact.region, artifact.location, artifact.id or 0, "keep", "", stage,
        r.snapshots if r is not None else (), tuple(sorted({x.describe() for x in refs})),
    )  # fmt: skip
    if finished(holding.retirement, rules):
        return replace(step, action="done", why=f"{stage} {_day(_stamp(r))}" if r else "done")
    if r is not None and r.stage == "deregistered":
        until = (r.deregistered_at or r.deprecated_at) + rules.snapshot_grace
        if until > now:
            why = (f"deregistered {_day(_stamp(r))}; its {len(r.snapshots)} snapshot(s) are kept until {_day(until)} "
                   "(`amiforge retire restore` until then)")  # fmt: skip
            return replace(step, action="wait", why=why)
        return replace(step, action="delete-snapshots", why=f"deregistered {_day(_stamp(r))}; "
                       f"its {len(r.snapshots)} snapshot(s) go")  # fmt: skip
    if refs:
        return replace(step, why=_used_by(refs))
    if kept_by_rule is not None:
        return replace(step, why=kept_by_rule)
    image = images.get((artifact.region, artifact.location))
    gone = " (the image is already gone)" if image is not None and not image.present else ""
    if r is None:
        due = now if going is not None else version.created_at + rules.deprecate_after
        if due > now:
            return replace(step, why=f"no rule keeps it; deprecated from {_day(due)}")
        reason = going or f"older than {_age(rules.deprecate_after)}, and no rule keeps it"
        return replace(step, action="deprecate", why=reason + gone)
    # deprecated
    until = r.deprecated_at + rules.grace
    cooling = _cooldown_end(image.protection, now) if image is not None and image.present else None
    if cooling is not None and cooling > now:
        # Protection lifted with a cool-down ("disabled after …"): EC2 refuses the deregistration until it ends.
        return replace(step, action="wait", why=f"deregistration protection lifted; EC2 holds it until {_day(cooling)}")
    if until > now:
        return replace(step, action="wait", why=f"deprecated {_day(r.deprecated_at)}; deregistered from {_day(until)}")
    protected_on = image is not None and image.protection is not None and image.protection.startswith("enabled")
    if protected_on and not rules.lift_protection:
        return replace(step, why="its deregistration protection is on and the policy keeps protected images "
                       "(lift_protection: false)")  # fmt: skip
    protected = ""
    if image is not None and image.protection is not None and image.protection.startswith("enabled"):
        protected = " (its deregistration protection is lifted first" + (
            ", with a 24 h cool-down: a later run deregisters it)" if "cooldown" in image.protection else ")"
        )
    return replace(
        step, action="deregister", why=f"deprecated {_day(r.deprecated_at)}, grace over, nothing uses it{protected}"
        + gone
    )  # fmt: skip


def _cooldown_end(protection: str | None, now: datetime) -> datetime | None:
    """When a lifted protection's cool-down ends ("disabled after 2026-12-08T10:00:00Z"); None if none runs. A time
    that cannot be read is taken as a day from now: waiting is safe, guessing it over is not."""
    if protection is None or not protection.startswith("disabled"):
        return None
    text = protection.split("after", 1)[-1].strip()
    try:
        moment = datetime.fromisoformat(text.replace("Z", "+00:00"))
    except ValueError:
        return now + timedelta(days=1)
    return moment.replace(tzinfo=UTC) if moment.tzinfo is None else moment


def _stamp(r: Retirement | None) -> datetime:
    assert r is not None
    return r.purged_at or r.deregistered_at or r.deprecated_at


def plan_retirement(
    entries: Sequence[Entry],
    *,
    references: Iterable[Reference],
    failures: Sequence[SourceFailure] = (),
    images: Mapping[tuple[str, str], ImageState] | None = None,
    retention: Retention,
    now: datetime,
) -> tuple[tuple[VersionPlan, ...], tuple[str, ...]]:
    """(one plan per version that has artifacts, oldest first; notes). `references` are every source's, the
    registry's included (channel_references); `failures` the sources that could not be read; `images` what the
    providers see of each (region, location)."""
    index = _Index(references)
    images = images or {}
    notes: list[str] = []
    by_image: dict[str, list[Entry]] = defaultdict(list)
    for entry in entries:
        by_image[entry.version.name].append(entry)
    plans: list[VersionPlan] = []
    for name, group in by_image.items():
        rules = retention.of(name)
        usable = 0
        for entry in sorted(group, key=lambda e: e.version.number, reverse=True):
            version = entry.version
            try:
                expires = expiry_of(version)
            except ValueError:
                expires = None
                notes.append(f"{version.ref}: its {EXPIRES_TAG} tag {version.tags[EXPIRES_TAG]!r} is not a date "
                             "or a time (2027-01-31, 2027-01-31T12:00:00Z); it is ignored")  # fmt: skip
            going = _going(version, expires, now)
            newest = False
            if version.status in USABLE and going is None:
                newest = usable < rules.keep_last
                usable += 1
            kept = _rule_keeps(version, rules, newest=newest, expired=going is not None, now=now)
            if not entry.holdings or (
                version.status is Status.RETIRED and all(finished(h.retirement, rules) for h in entry.holdings)
            ):
                continue  # nothing of it is left to decide on
            steps = tuple(
                _decide(entry, h, rules=rules, refs=index.of(version.ref, h.artifact), kept_by_rule=kept,
                        going=going, images=images, now=now)
                for h in entry.holdings
            )  # fmt: skip
            plans.append(VersionPlan(version.ref, name, version.status.value, version.created_at, steps, False))
    plans.sort(key=lambda p: (p.created_at, p.version))
    plans = _shared_images(plans)
    plans = _blocked(plans, failures)
    plans = _capped(plans, retention.max_deletions)
    statuses = {e.version.ref: e.version.status for e in entries}
    plans = [
        replace(p, retire=statuses[p.version] is not Status.RETIRED and all(s.action == "done" for s in p.steps))
        for p in plans
    ]
    return tuple(plans), tuple(notes)


def _map_steps(plans: Sequence[VersionPlan], change: dict[int, Step]) -> list[VersionPlan]:
    if not change:
        return list(plans)
    return [replace(p, steps=tuple(change.get(id(s), s) for s in p.steps)) for p in plans]


def _shared_images(plans: Sequence[VersionPlan]) -> list[VersionPlan]:
    """An image that two versions hold (a local image serves every version baked to the same bytes) is deregistered
    only when every holder goes."""
    holders: dict[tuple[str, str, str], list[Step]] = defaultdict(list)
    for p in plans:
        for s in p.steps:
            holders[(s.provider, s.region, s.location)].append(s)
    change: dict[int, Step] = {}
    for steps in holders.values():
        staying = [s for s in steps if s.action not in ("deregister", "delete-snapshots", "done")]
        if not staying:
            continue
        names = ", ".join(sorted({s.version for s in staying}))
        for s in steps:
            if s.action == "deregister":
                change[id(s)] = replace(s, action="keep", why=f"the same image is also {names}'s, which stays")
    return _map_steps(plans, change)


def _blocked(plans: Sequence[VersionPlan], failures: Sequence[SourceFailure]) -> list[VersionPlan]:
    """Fail closed: in a region where a reference source could not be read completely, nothing changes."""
    why: dict[str, str] = {}
    for f in failures:
        why.setdefault(f.region, f"nothing changes in {f.region}: {f.source} could not be read ({f.why})")
    change = {
        id(s): replace(s, action="blocked", why=why[s.region])
        for p in plans
        for s in p.steps
        if s.action in CHANGES and s.region in why
    }
    return _map_steps(plans, change)


def _capped(plans: Sequence[VersionPlan], cap: int) -> list[VersionPlan]:
    """At most `cap` images deregistered per region per run, the oldest versions first (plans are oldest first)."""
    taken: dict[tuple[str, str], set[str]] = defaultdict(set)
    change: dict[int, Step] = {}
    for p in plans:
        for s in p.steps:
            if s.action != "deregister":
                continue
            images = taken[(s.provider, s.region)]
            if s.location in images or len(images) < cap:
                images.add(s.location)
            else:
                change[id(s)] = replace(
                    s, action="deferred", why=f"{s.why}; over this run's cap of {cap} deletion(s) in {s.region}"
                )
    return _map_steps(plans, change)
