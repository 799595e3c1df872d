"""The instance-refresh controller (lifecycle/refresh.py) on a fake refreshing fleet with a real SQLite store: its watch
is bounded — a refresh still running past its budget is rolled back and the rollout fails with the reason, a rollback
past its own budget is a retryable InfraError that `resume` picks up — a successful refresh names the instances it
left on the old image, and a refresh that had succeeded before a gate failed is rolled forward without AutoRollback."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path

import pytest

from amiforge.errors import GateFailed, InfraError
from amiforge.lifecycle.controller import POLL_SECONDS, Controls
from amiforge.lifecycle.refresh import REFRESH_SLACK, drive_refresh, refresh_budget
from amiforge.model import Artifact, Rollout, Status
from amiforge.providers.interface import BootSignal, Member, RefreshStatus, Replacement
from amiforge.recipe import Checks
from amiforge.settings import Settings
from amiforge.store.sql import SqlStore, open_store
from amiforge.strategy import Strategy

T0 = datetime(2026, 1, 1, tzinfo=UTC)
OLD, NEW = "ami-0000000000test01", "ami-0000000000test02"
STRATEGY = Strategy(mode="refresh", waves=["25%", "100%"], bake_time=120.0)
READY_WITHIN = 90.0  # the recipe default: the grace per replacement batch (the fake has no console delay)
# 4 instances at 90 % healthy: one at a time, 4 batches + one per checkpoint (2), each 90 s; 2 × 120 s bake time.
FORWARD = 2 * 120.0 + (4 + 2) * READY_WITHIN + REFRESH_SLACK
BACK = 4 * READY_WITHIN + REFRESH_SLACK


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


@dataclass
class FakeRefreshingGroup:
    """A group of 4 whose refresh reports `status` until told otherwise; a rollback ends `rollback_after` seconds
    after it was asked for (None: never)."""

    clock: Clock
    status: str = "InProgress"
    rollback_after: float | None = 30.0
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
        self, replacements: Sequence[Replacement], artifact: Artifact, version_ref: str, checks: Checks
    ) -> list[Member]:
        raise AssertionError("an instance refresh never replaces members itself")

    def signals(self, since: datetime) -> list[BootSignal]:
        return []

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
        return RefreshStatus(refresh_id, self.status, 25, 3, "")

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

    def drive(self) -> Rollout:
        version = self.store.get_version("web@1")
        drive_refresh(
            self.store.get_rollout(self.rollout.id), self.fleet, version, self.artifact, STRATEGY,
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


def test_the_budget_is_the_bake_times_and_a_grace_per_batch() -> None:
    assert refresh_budget(STRATEGY, 4, 2, READY_WITHIN) == FORWARD
    assert refresh_budget(STRATEGY, 4, 0, READY_WITHIN) == BACK
    wide = STRATEGY.model_copy(update={"min_healthy_percentage": 50})  # 2 at a time: 2 batches + 2
    assert refresh_budget(wide, 4, 2, READY_WITHIN) == 2 * 120.0 + 4 * READY_WITHIN + REFRESH_SLACK


def test_a_refresh_that_never_finishes_is_rolled_back_once_its_budget_is_spent(world: World) -> None:
    with pytest.raises(GateFailed) as caught:
        world.drive()
    assert world.fleet.rolled_back_at is not None and FORWARD < world.fleet.rolled_back_at <= FORWARD + POLL_SECONDS
    assert f"still InProgress at 25% after {FORWARD:.0f}s" in caught.value.diagnostics()
    rollout = world.store.get_rollout(world.rollout.id)
    assert rollout.state == "failed" and rollout.detail["refresh_status"] == "RollbackSuccessful"
    assert [d.action for d in world.store.decisions(world.rollout.id)][-1] == "rollback"


def test_a_rollback_that_never_ends_raises_and_resume_watches_it_again(world: World) -> None:
    world.fleet.rollback_after = None
    with pytest.raises(InfraError) as caught:
        world.drive()
    assert caught.value.retryable and "still RollbackInProgress" in caught.value.message
    assert world.clock.now <= FORWARD + POLL_SECONDS + BACK + POLL_SECONDS
    assert world.store.get_rollout(world.rollout.id).state == "rolling-back"
    world.fleet.status = "RollbackSuccessful"  # AWS finished it meanwhile
    with pytest.raises(GateFailed):
        world.drive()
    assert world.store.get_rollout(world.rollout.id).state == "failed" and world.fleet.started == 1


def test_a_rollback_aws_starts_itself_gets_its_own_budget(world: World) -> None:
    def sleep(seconds: float) -> None:
        Clock.sleep(world.clock, seconds)
        if world.clock.now >= FORWARD - 60 and world.fleet.rolled_back_at is None:
            world.fleet.rolled_back_at, world.fleet.status = world.clock.now, "RollbackInProgress"  # AutoRollback

    world.fleet.rollback_after = BACK - 60  # past the forward budget, within its own
    world.clock.sleep = sleep  # type: ignore[method-assign]
    with pytest.raises(GateFailed):
        world.drive()
    assert world.store.get_rollout(world.rollout.id).detail["refresh_status"] == "RollbackSuccessful"


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
