"""The retirement planner and apply against an oracle written apart from them (hypothesis, stateful).

Each example is a random world grown step by step: versions baked at random ages into two regions, promoted, revoked,
tagged to expire; images used by instances, launch templates, parameters, shares and fleet members; reference
sources that fail; time passing; `retire --apply` run, killed midway and run again. After every step the oracle —
which reads the world and the registry directly, never the planner's code — says which artifacts are in use, and:

- no artifact in use is planned to be deprecated, deregistered or have its snapshots deleted;
- in a region where a source failed, nothing at all changes;
- no region has more deregistrations planned than the cap;
- apply never removed an image while the world used it, never removed one twice, and every snapshot of a removed
  image is deleted or still recorded in the registry for the next run (none orphaned).
"""

from __future__ import annotations

import atexit
import os
import shutil
import tempfile
from collections import Counter
from collections.abc import Callable, Collection, Iterator, Sequence
from dataclasses import dataclass, field
from datetime import UTC, date, datetime, time, timedelta

import pytest
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, rule

from amiforge.errors import NotFound
from amiforge.lifecycle import retire
from amiforge.lifecycle.retire_plan import CHANGES, RetirePlan
from amiforge.model import EXPIRES_TAG, Artifact, ImageVersion, Status
from amiforge.policy.retention import Retention, RetentionRules
from amiforge.providers.interface import ImageState, Reference, RegionSurvey, Removal, Retirer, SourceFailure
from amiforge.store.sql import SqlStore, open_store
from tests.retire_rules import EAGER

REGIONS = ("test-east-1", "test-west-2")
SOURCES = ("instances", "launch templates", "parameters", "shares", "fleets")
START = datetime(2026, 1, 1, tzinfo=UTC)
WORLDS = int(os.environ.get("AMIFORGE_RETIRE_WORLDS", "200"))


class Killed(BaseException):
    """The process dies here (SIGKILL): nothing after it runs, no cleanup is owed by the fake."""


@dataclass
class World:
    """What uses images, per region and source, as a cloud would hold it (image ids, not versions), plus fleets
    naming versions, and the images themselves."""

    now: datetime = START
    uses: dict[tuple[str, str], set[str]] = field(default_factory=dict)  # (region, source) → image ids
    fleets: dict[str, set[str]] = field(default_factory=dict)  # region → NAME@N its members run
    broken: set[tuple[str, str]] = field(default_factory=set)  # (region, source) that cannot be read
    present: dict[tuple[str, str], bool] = field(default_factory=dict)
    snapshots: dict[tuple[str, str], tuple[str, ...]] = field(default_factory=dict)
    deleted_snapshots: set[str] = field(default_factory=set)
    removals: Counter[tuple[str, str]] = field(default_factory=Counter)
    violations: list[str] = field(default_factory=list)
    kill_after: int | None = None  # provider calls until the process is killed
    calls: int = 0

    def in_use(self, region: str, image: str) -> bool:
        return any(image in ids for (r, _), ids in self.uses.items() if r == region)


class FakeRetirer:
    """A provider over the world: reports each source's references (or its failure), and takes steps, noting any
    removal of an image the world uses at that moment."""

    def __init__(self, world: World, in_use: Callable[[str, str], bool]) -> None:
        self.world = world
        self.in_use = in_use  # the oracle's word on an image, asked at the moment it is removed

    def _tick(self) -> None:
        w = self.world
        w.calls += 1
        if w.kill_after is not None and w.calls > w.kill_after:
            raise Killed

    def survey(self, region: str, artifacts: Collection[Artifact]) -> RegionSurvey:
        w = self.world
        refs: list[Reference] = []
        failures = [SourceFailure(region, s, "throttled, never cleared") for r, s in sorted(w.broken) if r == region]
        asked = {a.location for a in artifacts}
        for (r, source), ids in sorted(w.uses.items()):
            if r == region and (region, source) not in w.broken:
                # Shares are read per image, as EC2's launch permissions are: only for the images asked about.
                listed = sorted(i for i in ids if source != "shares" or i in asked)
                refs += [Reference(source, f"{source} #{i}", region, image) for i, image in enumerate(listed)]
        if (region, "fleets") not in w.broken:
            refs += [Reference("fleet", f"member on {v}", region, version=v) for v in sorted(w.fleets.get(region, ()))]
        images = {
            a.location: ImageState(a.location, w.present.get((region, a.location), False),
                                   snapshots=w.snapshots.get((region, a.location), ()))
            for a in artifacts
        }  # fmt: skip
        return RegionSurvey(region, tuple(refs), tuple(failures), images)

    def deprecate(self, artifact: Artifact, at: datetime) -> tuple[str, ...]:
        self._tick()
        return self.world.snapshots.get((artifact.region, artifact.location), ())

    def deregister(self, artifact: Artifact) -> tuple[Removal, str]:
        self._tick()
        w, key = self.world, (artifact.region, artifact.location)
        if not w.present.get(key, False):
            return "gone", ""
        if self.in_use(*key):
            w.violations.append(f"deregistered {key} while it was in use")
        w.present[key] = False
        w.removals[key] += 1
        self._tick()  # killed right after the image went, before the registry heard of it
        return "removed", ""

    def delete_snapshots(self, region: str, snapshots: Sequence[str]) -> list[str]:
        """As EC2 does through the provider: a snapshot a present image uses is kept."""
        self._tick()
        w = self.world
        used = {s for key, present in w.present.items() if present and key[0] == region for s in w.snapshots[key]}
        w.deleted_snapshots.update(s for s in snapshots if s not in used)
        return [s for s in snapshots if s in used]

    def restore(self, artifact: Artifact) -> None:
        w, key = self.world, (artifact.region, artifact.location)
        if any(s in w.deleted_snapshots for s in w.snapshots[key]):
            raise NotFound(f"{key} is not in the Recycle Bin")
        w.present[key] = True
        w.removals[key] -= 1  # back: a later removal is not a second one of the same image


def _oracle_in_use(world: World, store: SqlStore) -> set[int]:
    """Artifact ids in use, read from the world and the registry's tables directly."""
    used: set[int] = set()
    channel_versions = set()
    for c in store.channels():
        channel_versions.add(c.current)
        if c.previous:
            channel_versions.add(c.previous)
    for ref, artifact in store.provider_artifacts("fake"):
        assert artifact.id is not None
        by_version = ref in channel_versions or ref in world.fleets.get(artifact.region, ())
        if by_version or world.in_use(artifact.region, artifact.location):
            used.add(artifact.id)
    return used


def _expired(version: ImageVersion, now: datetime) -> bool:
    """Past its amiforge:expires tag (a date: the end of that day, UTC; this test writes no other forms but a
    zoned time and a word, which is no expiry)."""
    text = version.tags.get(EXPIRES_TAG)
    if text is None:
        return False
    try:
        end = (datetime.combine(date.fromisoformat(text), time(), UTC) + timedelta(days=1) if len(text) == 10
               else datetime.fromisoformat(text))  # fmt: skip
    except ValueError:
        return False
    return end <= now


def _oracle_kept_by_rule(versions: list[ImageVersion], retention: Retention, now: datetime) -> set[str]:
    """The versions the policy's rules keep, judged here apart from the planner: being baked, an excluded tag, the
    newest keep_last usable versions (not failed, revoked, retired or expired), younger than keep_younger_than."""
    kept: set[str] = set()
    for name in {v.name for v in versions}:
        rules = retention.of(name)
        mine = sorted((v for v in versions if v.name == name), key=lambda v: -v.number)
        usable = [v for v in mine if v.status in (Status.BUILT, Status.TESTED, Status.SCANNED, Status.SIGNED,
                                                   Status.DEPRECATED) and not _expired(v, now)]  # fmt: skip
        kept |= {v.ref for v in usable[: rules.keep_last]}
        for v in mine:
            bad = v.status in (Status.REVOKED, Status.FAILED) or _expired(v, now)
            if v.status is Status.BAKING or (not bad and now - v.created_at < rules.keep_younger_than):
                kept.add(v.ref)
            if any(v.tags.get(k) is not None and want in ("*", v.tags[k]) for k, want in rules.exclude_tags.items()):
                kept.add(v.ref)
    return kept


def _rules() -> st.SearchStrategy[RetentionRules]:
    days = st.sampled_from([0, 0, 1, 7, 30]).map(lambda d: timedelta(days=d))
    return st.builds(
        RetentionRules,
        keep_last=st.integers(0, 3),
        keep_younger_than=days,
        deprecate_after=days,
        grace=days,
        snapshot_grace=days,
        delete_snapshots=st.booleans(),
        exclude_tags=st.sampled_from([{}, {"keep": "*"}, {"keep": "yes"}]),
    )


_SCRATCH = "/dev/shm" if os.path.isdir("/dev/shm") else None
_TEMPLATE: list[str] = []  # a migrated, empty registry: copied for each world (migrating costs ~0.2 s a time)


@pytest.fixture(scope="module", autouse=True)
def _template_goes_with_the_module() -> Iterator[None]:
    """The migrated registry the worlds copy, removed once this module's tests are done (an xdist worker may end
    without running atexit handlers)."""
    yield
    while _TEMPLATE:
        shutil.rmtree(os.path.dirname(_TEMPLATE.pop()), ignore_errors=True)


def _empty_registry(path: str) -> None:
    if not _TEMPLATE:
        folder = tempfile.mkdtemp(prefix="retire-oracle-template-", dir=_SCRATCH)
        atexit.register(shutil.rmtree, folder, True)
        template = os.path.join(folder, "r.db")
        open_store(f"sqlite:///{template}").close()
        _TEMPLATE.append(template)
    shutil.copyfile(_TEMPLATE[0], path)


class RetireWorlds(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.dir = tempfile.mkdtemp(prefix="retire-oracle-", dir=_SCRATCH)
        self.world = World()
        _empty_registry(f"{self.dir}/r.db")
        self.store = open_store(f"sqlite:///{self.dir}/r.db", clock=lambda: self.world.now)
        self.versions_of: dict[tuple[str, str], set[str]] = {}
        self.retirer = FakeRetirer(self.world, self._image_in_use)
        self.retention = Retention()
        self.images = 0

    def teardown(self) -> None:
        self.store.close()
        shutil.rmtree(self.dir, ignore_errors=True)

    @initialize(default=_rules(), web=st.none() | _rules(), cap=st.integers(0, 4))
    def policy(self, default: RetentionRules, web: RetentionRules | None, cap: int) -> None:
        images = {} if web is None else {"web": web.model_dump()}
        self.retention = Retention.model_validate({"max_deletions": cap, "default": default.model_dump(),
                                                   "images": images})  # fmt: skip

    def _image_in_use(self, region: str, image: str) -> bool:
        used = _oracle_in_use(self.world, self.store)
        return any(
            a.id in used for _, a in self.store.provider_artifacts("fake") if (a.region, a.location) == (region, image)
        )

    def _retirer(self, kind: str) -> Retirer:
        assert kind == "fake"
        return self.retirer

    # --- the world changes ------------------------------------------------------------------------------

    @rule(
        name=st.sampled_from(["web", "api"]),
        status=st.sampled_from(["signed", "signed", "built", "revoked", "failed"]),
        regions=st.sampled_from([REGIONS[:1], REGIONS, REGIONS[1:]]),
        tag=st.sampled_from([None, "keep", "expires-past", "expires-future", "expires-bad"]),
        share_image=st.sampled_from([False, True, True]),
    )
    def bake(self, name: str, status: str, regions: tuple[str, ...], tag: str | None, share_image: bool) -> None:
        tags = {
            None: {},
            "keep": {"keep": "yes"},
            "expires-past": {EXPIRES_TAG: (self.world.now - timedelta(days=1)).date().isoformat()},
            "expires-future": {EXPIRES_TAG: (self.world.now + timedelta(days=20)).isoformat()},
            "expires-bad": {EXPIRES_TAG: "someday"},
        }[tag]
        v = self.store.create_version(name=name, recipe_digest="r" * 64, recipe_path="/r.yaml", provider="fake",
                                      tags=tags, parent=None)  # fmt: skip
        existing = [k for k in self.versions_of if k[0] in regions]
        for region in regions:
            shared = [k for k in existing if k[0] == region]
            if share_image and shared:  # the same bytes as an earlier version (a local content-addressed image)
                image = shared[-1][1]
            else:
                self.images += 1
                image = f"img-{self.images:04d}"
                self.world.present[(region, image)] = True
                self.world.snapshots[(region, image)] = (f"snap-{self.images:04d}-a", f"snap-{self.images:04d}-b")
            self.versions_of.setdefault((region, image), set()).add(v.ref)
            self.store.add_artifact(v.id, Artifact("fake", region, image, "d" * 64, 1))
        self.store.transition(v.id, Status.BUILT, expect=Status.BAKING, digest="d" * 64, size_bytes=1)
        path = {"signed": [Status.TESTED, Status.SCANNED, Status.SIGNED], "built": [],
                "revoked": [Status.REVOKED], "failed": [Status.FAILED]}[status]  # fmt: skip
        current = Status.BUILT
        for step in path:
            self.store.transition(v.id, step, expect=current)
            current = step

    def _some_image(self, data: st.DataObject) -> tuple[str, str] | None:
        if not self.versions_of:
            return None
        return data.draw(st.sampled_from(sorted(self.versions_of)))

    @rule(data=st.data(), source=st.sampled_from(SOURCES[:4]))
    def use(self, data: st.DataObject, source: str) -> None:
        key = self._some_image(data)
        if key is not None:
            self.world.uses.setdefault((key[0], source), set()).add(key[1])

    @rule(data=st.data())
    def stop_using(self, data: st.DataObject) -> None:
        users = sorted((k, i) for k, ids in self.world.uses.items() for i in ids)
        if users:
            (key, image) = data.draw(st.sampled_from(users))
            self.world.uses[key].discard(image)

    @rule(data=st.data(), region=st.sampled_from(REGIONS))
    def fleet_runs(self, data: st.DataObject, region: str) -> None:
        versions = sorted({v for (r, _), vs in self.versions_of.items() if r == region for v in vs})
        if versions:
            self.world.fleets.setdefault(region, set()).add(data.draw(st.sampled_from(versions)))

    @rule(data=st.data())
    def fleet_leaves(self, data: st.DataObject) -> None:
        running = sorted((r, v) for r, vs in self.world.fleets.items() for v in vs)
        if running:
            region, version = data.draw(st.sampled_from(running))
            self.world.fleets[region].discard(version)

    @rule(data=st.data(), channel=st.sampled_from(["dev", "prod"]))
    def promote(self, data: st.DataObject, channel: str) -> None:
        signed = [v for v in self.store.list_versions(statuses=[Status.SIGNED])]
        if not signed:
            return
        v = data.draw(st.sampled_from(signed))
        current = self.store.channels(v.name, channel)
        expect = self.store.get_version(current[0].current).id if current else None
        if expect != v.id:
            self.store.move_channel(v.name, channel, v.id, expect_current=expect, actor="test", reason="oracle")

    @rule(data=st.data())
    def revoke(self, data: st.DataObject) -> None:
        signed = self.store.list_versions(statuses=[Status.SIGNED])
        if signed:
            v = data.draw(st.sampled_from(signed))
            self.store.transition(v.id, Status.REVOKED, expect=Status.SIGNED)

    @rule(region=st.sampled_from(REGIONS), source=st.sampled_from(SOURCES))
    def source_fails(self, region: str, source: str) -> None:
        self.world.broken.add((region, source))

    @rule()
    def sources_recover(self) -> None:
        self.world.broken.clear()

    @rule(days=st.sampled_from([1, 8, 31, 60]))
    def time_passes(self, days: int) -> None:
        self.world.now += timedelta(days=days)

    # --- retire ---------------------------------------------------------------------------------------------

    @rule()
    def apply(self) -> None:
        outcome = retire.apply(self.store, self.retention, self._retirer, actor="test", now=self.world.now)
        assert not outcome.failed, outcome.failed

    @rule(after=st.integers(0, 6))
    def apply_killed(self, after: int) -> None:
        self.world.kill_after, self.world.calls = after, 0
        try:
            retire.apply(self.store, self.retention, self._retirer, actor="test", now=self.world.now)
        except Killed:
            pass
        finally:
            self.world.kill_after = None

    @rule(data=st.data())
    def restore(self, data: st.DataObject) -> None:
        stages = self.store.retirements()
        deregistered = sorted({ref for ref, a in self.store.provider_artifacts("fake")
                               if a.id in stages and stages[a.id].stage == "deregistered"})  # fmt: skip
        if deregistered:
            ref = data.draw(st.sampled_from(deregistered))
            restored = retire.restore(self.store, ref, self._retirer, actor="test")
            assert restored.status in (Status.DEPRECATED, Status.REVOKED, Status.FAILED)

    # --- what must always hold ------------------------------------------------------------------------------

    def _plan(self) -> RetirePlan:
        return retire.plan(self.store, self.retention, self._retirer, now=self.world.now)

    @invariant()
    def the_plan_touches_nothing_in_use_and_keeps_the_rules(self) -> None:
        plan = self._plan()  # one plan for both judgements: planning is most of a world's time
        self._nothing_in_use_is_touched(plan)
        self._the_rules_keep_what_they_keep_and_time_each_step(plan)

    def _nothing_in_use_is_touched(self, plan: RetirePlan) -> None:
        used = _oracle_in_use(self.world, self.store)
        broken = {r for r, _ in self.world.broken}
        for step in plan.steps(*CHANGES):
            assert step.artifact_id not in used, f"{step} is in use"
            assert step.region not in broken, f"{step} in a region whose sources failed"
        for region in REGIONS:
            planned = {s.location for s in plan.steps("deregister") if s.region == region}
            assert len(planned) <= self.retention.max_deletions

    @invariant()
    def no_image_removed_wrongly_or_twice(self) -> None:
        assert not self.world.violations, self.world.violations
        assert all(n <= 1 for n in self.world.removals.values()), self.world.removals  # 0: restored

    def _the_rules_keep_what_they_keep_and_time_each_step(self, plan: RetirePlan) -> None:
        """Judged from the policy and the registry, apart from the planner: no artifact not yet on its way out is
        deprecated while a rule keeps its version, or before its age; no step comes before its grace is over."""
        now = self.world.now
        versions = {v.ref: v for v in self.store.list_versions()}
        kept = _oracle_kept_by_rule(list(versions.values()), self.retention, now)
        stages = self.store.retirements()
        for step in plan.steps("deprecate", "deregister", "delete-snapshots"):
            version, rules = versions[step.version], self.retention.of(versions[step.version].name)
            r = stages.get(step.artifact_id)
            if step.action == "deprecate":
                assert r is None and step.version not in kept, step
                going = version.status in (Status.REVOKED, Status.FAILED) or _expired(version, now)
                assert going or now - version.created_at >= rules.deprecate_after, step
            elif step.action == "deregister":
                assert r is not None and now >= r.deprecated_at + rules.grace, step
            else:
                assert r is not None and r.deregistered_at is not None, step
                assert now >= r.deregistered_at + rules.snapshot_grace, step

    @invariant()
    def a_present_image_keeps_its_snapshots(self) -> None:
        for key, present in self.world.present.items():
            if present:
                assert not set(self.world.snapshots[key]) & self.world.deleted_snapshots, key

    @invariant()
    def no_snapshot_orphaned(self) -> None:
        retirements = {r.artifact_id: r for r in self.store.retirements().values()}
        recorded = {s for r in retirements.values() if r.stage != "purged" for s in r.snapshots}
        for key, present in self.world.present.items():
            if present:
                continue
            for snapshot in self.world.snapshots[key]:
                assert snapshot in self.world.deleted_snapshots or snapshot in recorded, (key, snapshot)


RetireWorlds.TestCase.settings = settings(
    max_examples=WORLDS,
    stateful_step_count=12,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much],
)
test_retire_worlds = RetireWorlds.TestCase


def test_a_failing_source_stops_every_deletion_in_its_region_only() -> None:
    """Each source failing in turn, on one fixed world with work in both regions: nothing changes in its region,
    the other region's plan is untouched."""
    for source in SOURCES:
        machine = RetireWorlds()
        try:
            machine.retention = EAGER
            for _ in range(3):
                machine.bake("web", "signed", REGIONS, None, False)
            machine.world.now += timedelta(days=1)
            whole = machine._plan()
            assert {s.region for s in whole.steps("deprecate")} == set(REGIONS)
            machine.world.broken.add((REGIONS[0], source))
            plan = machine._plan()
            assert not [s for s in plan.steps(*CHANGES) if s.region == REGIONS[0]], source
            assert {s.artifact_id for s in plan.steps("blocked")} == {
                s.artifact_id for s in whole.steps(*CHANGES) if s.region == REGIONS[0]
            }
            assert [s for s in plan.steps(*CHANGES)] == [s for s in whole.steps(*CHANGES) if s.region == REGIONS[1]]
            assert any(f.source == source and f.region == REGIONS[0] for f in plan.failures)
        finally:
            machine.teardown()


def test_an_image_two_versions_hold_goes_only_with_both() -> None:
    """A local image serves every version baked to the same bytes: one version in a channel keeps it for both."""
    machine = RetireWorlds()
    try:
        machine.retention = EAGER
        machine.bake("web", "signed", REGIONS[:1], None, False)
        machine.bake("web", "signed", REGIONS[:1], None, True)  # the same image as web@1
        web2 = machine.store.get_version("web@2")
        machine.store.move_channel("web", "prod", web2.id, expect_current=None, actor="test", reason="oracle")
        machine.world.now += timedelta(days=1)
        machine.apply()
        machine.world.now += timedelta(days=1)
        plan = machine._plan()
        (web1,) = [s for s in plan.steps() if s.version == "web@1"]
        assert web1.action == "keep" and "also web@2's" in web1.why, web1
        machine.apply()
        assert machine.world.present[(REGIONS[0], "img-0001")] and not machine.world.violations
    finally:
        machine.teardown()


def test_an_image_over_the_cap_is_still_read_before_it_is_planned_out() -> None:
    """The per-image sources (shares) are read for every image a step could change, the cap aside: an image the cap
    would defer can take the place of one a reference keeps."""
    machine = RetireWorlds()
    try:
        machine.retention = Retention.model_validate({**EAGER.model_dump(mode="json"), "max_deletions": 1})
        for _ in range(2):
            machine.bake("web", "signed", REGIONS[:1], None, False)
        machine.world.now += timedelta(days=1)
        machine.apply()  # both deprecated
        machine.world.uses[(REGIONS[0], "instances")] = {"img-0001"}
        machine.world.uses[(REGIONS[0], "shares")] = {"img-0002"}
        steps = {s.location: (s.action, s.why) for s in machine._plan().steps()}
        assert steps["img-0001"] == ("keep", "in use: instances instances #0")
        assert steps["img-0002"] == ("keep", "in use: shares shares #0")
    finally:
        machine.teardown()
