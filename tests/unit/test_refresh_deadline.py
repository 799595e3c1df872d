"""The instance-refresh controller (lifecycle/refresh.py) on a fake refreshing fleet with a real SQLite store. A refresh
is judged stuck by its progress: one that has not moved for STALL_BATCHES batch times (the fleet's batch time plus
the readiness allowance; plus the checkpoint delay at a checkpoint) is rolled back and the rollout fails saying so,
while one that keeps moving is watched for as long as it takes, up to the backstop; a rollback that stops moving is a
retryable InfraError that `resume` picks up, and a resumed controller watches the progress afresh. A successful
refresh names the instances it left on the old image, and a refresh that had succeeded before a gate failed is rolled
forward without AutoRollback."""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path

import pytest

from amiforge.errors import GateFailed, InfraError
from amiforge.lifecycle.controller import POLL_SECONDS, Controls
from amiforge.lifecycle.refresh import REFRESH_SLACK, STALL_BATCHES, drive_refresh, refresh_budget
from amiforge.model import Artifact, Rollout, Status
from amiforge.providers.interface import BootSignal, Member, RefreshStatus, Release, Replacement
from amiforge.recipe import Checks
from amiforge.settings import Settings
from amiforge.store.sql import SqlStore, open_store
from amiforge.strategy import Strategy

T0 = datetime(2026, 1, 1, tzinfo=UTC)
OLD, NEW = "ami-0000000000test01", "ami-0000000000test02"
STRATEGY = Strategy(mode="refresh", waves=["25%", "100%"], bake_time=120.0)
READY_WITHIN = 90.0  # the recipe default: the readiness allowance (the fake has no console delay)
WARMUP = 300.0  # what the fake group says a batch waits for (its instance warm-up)
BATCH = READY_WITHIN + WARMUP
# Stuck: still for three batch times, plus the 120 s checkpoint delay when the last move reached a checkpoint (the
# fake's first look shows 25 %, the first checkpoint).
STALL = STALL_BATCHES * BATCH
# The backstop. 4 instances at 90 % healthy: one at a time, 4 batches + one per checkpoint (2), twice the batch time
# each; 2 × 120 s bake time.
FORWARD = 2 * 120.0 + 2 * (4 + 2) * BATCH + REFRESH_SLACK
BACK = 2 * 4 * BATCH + REFRESH_SLACK


class Clock:
    """The controller's clock: sleep() only advances it, and gives up (instead of hanging) on a watch that never
    ends."""

    def __init__(self) -> None:
        self.now = 0.0
        self.sleeps = 0

    def sleep(self, seconds: float) -> None:
        self.sleeps += 1
        assert self.sleeps < 10_000, "the controller watched the refresh forever"
        self.now += seconds

    def controls(self) -> Controls:
        return Controls(sleep=self.sleep, clock=lambda: self.now)


def still(_now: float) -> tuple[int, int]:
    return 25, 3


@dataclass
class FakeRefreshingGroup:
    """A group of 4 whose refresh reports `status` until told otherwise, at the (PercentageComplete, InstancesToUpdate)
    `progress` gives for the clock's time (an InProgress refresh that reaches 100 % is Successful); a rollback ends
    `rollback_after` seconds after it was asked for (None: never). Its batch time is `batch_time`."""

    clock: Clock
    status: str = "InProgress"
    rollback_after: float | None = 30.0
    progress: Callable[[float], tuple[int, int]] = still
    batch_time: dict[str, float] = field(default_factory=lambda: {"instance warm-up": WARMUP})
    batch_time_reads: int = 0
    members: list[Member] = field(default_factory=list)
    target: str = "aws:eu-west-1/web"
    region: str = "eu-west-1"
    console_grace: float = 0.0
    rolled_back_at: float | None = None
    started: int = 0
    starts: list[tuple[str, bool]] = field(default_factory=list)  # (token, auto_rollback) of each start_refresh
    roll_forward_fails: bool = False  # a refresh started without AutoRollback ends Failed

    def now(self) -> datetime:
        return T0

    def current(self) -> list[Member]:
        return list(self.members)

    def replace(
        self, replacements: Sequence[Replacement], artifact: Artifact, release: Release, checks: Checks
    ) -> list[Member]:
        raise AssertionError("an instance refresh never replaces members itself")

    def signals(self, since: datetime) -> list[BootSignal]:
        return []

    def observe(self, since: datetime) -> tuple[list[Member], list[BootSignal]]:
        return self.current(), []

    def alarms_firing(self, names: Sequence[str]) -> list[str]:
        return []

    def start_refresh(
        self,
        artifact: Artifact,
        version_ref: str,
        *,
        checkpoints: Sequence[int],
        checkpoint_delay: int,
        alarms: Sequence[str],
        token: str,
        min_healthy_percentage: int = 90,
        auto_rollback: bool = True,
    ) -> str:
        self.started += 1
        self.starts.append((token, auto_rollback))
        if not auto_rollback and self.roll_forward_fails:
            self.status = "Failed"  # without AutoRollback, AWS leaves the group where the refresh stopped
        return f"refresh-{self.started}"

    def refresh_status(self, refresh_id: str) -> RefreshStatus:
        back, after = self.rolled_back_at, self.rollback_after
        if back is not None and after is not None and self.clock.now >= back + after:
            self.status = "RollbackSuccessful"
        percentage, to_update = self.progress(self.clock.now)
        if self.status == "InProgress" and percentage >= 100:
            self.status = "Successful"
        return RefreshStatus(refresh_id, self.status, percentage, to_update, "")

    def refresh_batch_time(self) -> dict[str, float]:
        self.batch_time_reads += 1
        return dict(self.batch_time)

    def roll_back_refresh(self, refresh_id: str) -> RefreshStatus:
        self.rolled_back_at, self.status = self.clock.now, "RollbackInProgress"
        return self.refresh_status(refresh_id)


def _member(name: str, image: str) -> Member:
    return Member(name, None, image, "ready", T0, 5.0)


@pytest.fixture
def store(tmp_path: Path) -> Iterator[SqlStore]:
    with open_store(f"sqlite:///{tmp_path}/r.db") as s:
        yield s


@pytest.fixture
def settings(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Settings:
    monkeypatch.delenv("AMIFORGE_CONFIG", raising=False)
    monkeypatch.chdir(tmp_path)  # no amiforge.toml here
    return Settings(data_dir=tmp_path / "data", actor="test")


@dataclass
class World:
    store: SqlStore
    settings: Settings
    clock: Clock
    fleet: FakeRefreshingGroup
    rollout: Rollout
    artifact: Artifact

    def drive(self, strategy: Strategy = STRATEGY) -> Rollout:
        version = self.store.get_version("web@1")
        drive_refresh(
            self.store.get_rollout(self.rollout.id), self.fleet, version, self.artifact, strategy,
            store=self.store, settings=self.settings, controls=self.clock.controls(),
        )  # fmt: skip
        return self.store.get_rollout(self.rollout.id)


@pytest.fixture
def world(store: SqlStore, settings: Settings) -> World:
    v = store.create_version(name="web", recipe_digest="r" * 64, recipe_path="/r.yaml", provider="aws", tags={},
                             parent=None, recipe='{"checks": {}}')  # fmt: skip
    artifact = Artifact("aws", "eu-west-1", NEW, f"{v.number:064x}", 1)
    store.add_artifact(v.id, artifact)
    store.transition(v.id, Status.BUILT, expect=Status.BAKING, digest=f"{v.number:064x}", size_bytes=1)
    rollout = store.create_rollout(
        "aws:eu-west-1/web", v.id, strategy=STRATEGY.model_dump(mode="json"), waves=[1, 3], actor="t"
    )
    clock = Clock()
    fleet = FakeRefreshingGroup(clock, members=[_member("i-new", NEW), *(_member(f"i-old{i}", OLD) for i in range(3))])
    return World(store, settings, clock, fleet, rollout, artifact)


def test_the_backstop_is_the_bake_times_and_twice_the_batch_time_per_batch() -> None:
    assert refresh_budget(STRATEGY, 4, 2, BATCH) == FORWARD
    assert refresh_budget(STRATEGY, 4, 0, BATCH) == BACK
    wide = STRATEGY.model_copy(update={"min_healthy_percentage": 50})  # 2 at a time: 2 batches + 2
    assert refresh_budget(wide, 4, 2, BATCH) == 2 * 120.0 + 2 * 4 * BATCH + REFRESH_SLACK
    # The example that made the old budget wrong: 10 instances at 90 % replace one at a time; a batch that takes 10
    # minutes of warm-up is well inside the backstop (the old budget allowed 90 s a batch, under 100 min in all).
    assert refresh_budget(STRATEGY, 10, 2, READY_WITHIN + 600.0) > 12 * (READY_WITHIN + 600.0) + 2 * 120.0


def test_a_refresh_that_stops_moving_is_rolled_back_after_three_batch_times(world: World) -> None:
    """The fake stays at 25 % from its first look (a checkpoint: its delay is allowed on top)."""
    with pytest.raises(GateFailed) as caught:
        world.drive()
    stuck = STALL + STRATEGY.bake_time
    assert world.fleet.rolled_back_at is not None and stuck < world.fleet.rolled_back_at <= stuck + POLL_SECONDS
    diagnostics = caught.value.diagnostics()
    assert (
        "made no progress for" in diagnostics and "still InProgress at 25% with 3 instance(s) to update" in diagnostics
    )
    assert f"{STALL_BATCHES} batch times of {BATCH:g}s (readiness {READY_WITHIN:g}s, instance warm-up" in diagnostics
    assert "plus the 120s checkpoint delay" in diagnostics
    rollout = world.store.get_rollout(world.rollout.id)
    assert rollout.state == "failed" and rollout.detail["refresh_status"] == "RollbackSuccessful"
    assert rollout.detail["batch_time"] == {"readiness": READY_WITHIN, "instance warm-up": WARMUP}
    assert [d.action for d in world.store.decisions(world.rollout.id)][-1] == "rollback"


def _one_instance_every(seconds: float) -> Callable[[float], tuple[int, int]]:
    def progress(now: float) -> tuple[int, int]:
        done = min(4, int(now // seconds))
        return done * 25, 4 - done

    return progress


def test_a_slow_refresh_that_keeps_moving_is_not_rolled_back(world: World) -> None:
    """One instance every 1000 s — warm-up, hooks, draining — 4000 s in all: far past what a readiness grace per batch
    allowed (the old deadline), never still for three batch times."""
    world.fleet.progress = _one_instance_every(1000.0)
    assert STALL > 1000.0 and 2 * 120.0 + (4 + 2) * READY_WITHIN + REFRESH_SLACK < 4000.0
    rollout = world.drive()
    assert rollout.state == "succeeded" and world.fleet.rolled_back_at is None and world.clock.now >= 4000.0


def test_at_a_checkpoint_its_delay_is_allowed_on_top(world: World) -> None:
    """Reaching 25 % (a checkpoint), AWS waits the bake time there on purpose: still for longer than three batch times,
    but not longer than that plus the delay, it is not stuck."""
    long_bake = STRATEGY.model_copy(update={"bake_time": 3000.0})
    plateau = long_bake.bake_time + STALL - 100

    def progress(now: float) -> tuple[int, int]:
        return (25, 3) if now < 500 + plateau else (100, 0)

    world.fleet.progress = lambda now: (0, 4) if now < 500 else progress(now)
    rollout = world.drive(long_bake)
    assert rollout.state == "succeeded" and world.fleet.rolled_back_at is None


def test_a_refresh_that_keeps_moving_but_never_ends_meets_the_backstop(world: World) -> None:
    world.fleet.progress = lambda now: (25, 3 if int(now // POLL_SECONDS) % 2 else 2)  # it moves at every look
    with pytest.raises(GateFailed) as caught:
        world.drive()
    assert world.fleet.rolled_back_at is not None and FORWARD < world.fleet.rolled_back_at <= FORWARD + POLL_SECONDS
    assert f"still InProgress at 25% after {FORWARD:.0f}s, the most a refresh of 4 instance(s)" in (
        caught.value.diagnostics()
    )


def test_a_rollback_that_stops_moving_raises_and_resume_watches_it_again(world: World) -> None:
    world.fleet.rollback_after = None
    with pytest.raises(InfraError) as caught:
        world.drive()
    assert caught.value.retryable and "still RollbackInProgress" in caught.value.message
    assert "made no progress" in caught.value.message
    rolled_back_at = world.fleet.rolled_back_at
    assert rolled_back_at is not None and world.clock.now <= rolled_back_at + STALL + POLL_SECONDS
    assert world.store.get_rollout(world.rollout.id).state == "rolling-back"
    world.fleet.status = "RollbackSuccessful"  # AWS finished it meanwhile
    with pytest.raises(GateFailed):
        world.drive()
    assert world.store.get_rollout(world.rollout.id).state == "failed" and world.fleet.started == 1


def test_a_rollback_aws_starts_itself_gets_its_own_watch(world: World) -> None:
    """AWS rolls back (AutoRollback) just before the refresh would be judged stuck: the rollback is watched afresh, and
    it may take longer than what was left of the refresh's allowance."""
    stuck = STALL + STRATEGY.bake_time

    def sleep(seconds: float) -> None:
        Clock.sleep(world.clock, seconds)
        if world.clock.now >= stuck - 60 and world.fleet.rolled_back_at is None:
            world.fleet.rolled_back_at, world.fleet.status = world.clock.now, "RollbackInProgress"  # AutoRollback

    world.fleet.rollback_after = STALL - 60  # past the refresh's allowance, within the rollback's own
    world.clock.sleep = sleep  # type: ignore[method-assign]
    with pytest.raises(GateFailed):
        world.drive()
    assert world.store.get_rollout(world.rollout.id).detail["refresh_status"] == "RollbackSuccessful"


def test_a_resumed_controller_watches_the_progress_afresh(world: World) -> None:
    """Killed mid-watch, `rollout resume` finds the same refresh, reads the group's batch time again (what AWS waits
    for now) and gives the refresh three batch times from its own first look before judging it stuck."""
    killed_at = 1000.0
    kills: list[float] = []

    def sleep(seconds: float) -> None:
        Clock.sleep(world.clock, seconds)
        if world.clock.now >= killed_at and not kills:
            kills.append(world.clock.now)
            raise KeyboardInterrupt  # the controller dies, once

    world.clock.sleep = sleep  # type: ignore[method-assign]
    with pytest.raises(KeyboardInterrupt):
        world.drive()
    resumed_at = world.clock.now
    with pytest.raises(GateFailed):
        world.drive()
    assert world.fleet.started == 1 and world.fleet.batch_time_reads == 2
    rolled_back_at = world.fleet.rolled_back_at
    stuck = STALL + STRATEGY.bake_time  # the resumed watch's first look shows the checkpoint reached
    assert rolled_back_at is not None and resumed_at + stuck < rolled_back_at <= resumed_at + stuck + POLL_SECONDS


def test_a_successful_refresh_names_the_instances_it_left_on_the_old_image(world: World) -> None:
    world.fleet.status = "Successful"
    world.fleet.members = [_member(f"i-new{i}", NEW) for i in range(3)] + [_member("i-protected", OLD)]
    rollout = world.drive()
    assert rollout.state == "succeeded" and rollout.detail["not_refreshed"] == ["i-protected"]
    (event,) = [e for e in world.store.events() if e.kind == "rollout.succeeded"]
    assert event.data["not_refreshed"] == ["i-protected"]


def _ran_before(world: World) -> None:
    """The group ran base@1 (OLD) before; the refresh to web@1 (NEW) has succeeded and every new member failed."""
    store = world.store
    base = store.create_version(name="base", recipe_digest="b" * 64, recipe_path="/b.yaml", provider="aws", tags={},
                                parent=None, recipe='{"checks": {}}')  # fmt: skip
    store.add_artifact(base.id, Artifact("aws", "eu-west-1", OLD, "b" * 64, 1))
    store.transition(base.id, Status.BUILT, expect=Status.BAKING, digest="b" * 64, size_bytes=1)
    world.fleet.status = "Successful"
    world.fleet.members = [Member(f"i-new{i}", None, NEW, "failed", T0, None, "hung") for i in range(3)]
    world.fleet.members.append(_member("i-protected", OLD))


def test_a_refresh_that_had_succeeded_is_rolled_forward_without_auto_rollback(world: World) -> None:
    """The roll-forward starts from the bad version: were it AWS-rolled-back, the bad image would come back."""
    _ran_before(world)
    with pytest.raises(GateFailed):
        world.drive()
    token = f"r{world.rollout.id}"
    assert world.fleet.starts == [(token, True), (f"{token}-back", False)]
    rollout = world.store.get_rollout(world.rollout.id)
    assert rollout.state == "failed" and rollout.detail["refresh_status"] == "Successful (rolled forward to base@1)"


def test_a_roll_forward_that_stops_part_way_says_the_group_may_run_both(world: World) -> None:
    _ran_before(world)
    world.fleet.roll_forward_fails = True
    with pytest.raises(GateFailed) as caught:
        world.drive()
    rollout = world.store.get_rollout(world.rollout.id)
    assert rollout.state == "failed" and "roll-forward to base@1 did not finish" in str(
        rollout.detail["refresh_status"]
    )
    assert (
        caught.value.fix is not None and "amiforge rollback --target aws:eu-west-1/web --to base@1" in caught.value.fix
    )
