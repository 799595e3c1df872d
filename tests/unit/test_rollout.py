"""Rollouts: wave arithmetic, gate decisions, burn rate (pure), and the controller on a fake fleet with a real SQLite
store — waves, automatic rollback, pause/abort, and kill-and-resume at every fleet and store call."""

from __future__ import annotations

import os
import socket
import time
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import ParamSpec, TypeVar

import pytest
from hypothesis import given
from hypothesis import strategies as st

from amiforge.errors import ConfigError, GateFailed, NotFound, StateError
from amiforge.lifecycle import leases as lease_module
from amiforge.lifecycle import rollout as rollout_module
from amiforge.lifecycle.controller import Controls, parse_target
from amiforge.lifecycle.leases import HERE, LEASE_SECONDS, controller_gone
from amiforge.lifecycle.rollout import drive, last_change, request, resume, rollback
from amiforge.lifecycle.slis import rollout_rates
from amiforge.model import Artifact, Rollout, Status
from amiforge.providers.interface import BootSignal, Fleet, Member, MemberState, Release, Replacement
from amiforge.recipe import Checks
from amiforge.settings import Settings
from amiforge.store.schema import rollouts_table
from amiforge.store.sql import SqlStore, open_store
from amiforge.strategy import Strategy, checkpoints, decide, p95, parse_strategy, plan_waves

T0 = datetime(2026, 1, 1, tzinfo=UTC)
P = ParamSpec("P")
R = TypeVar("R")


# --- strategy ----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("waves", "size", "already", "expected"),
    [
        (["1", "25%", "100%"], 8, 0, [1, 1, 6]),
        (["1", "25%", "100%"], 3, 0, [1, 2]),  # 25% of 3 rounds up to 1: that wave adds nobody
        (["1", "25%", "100%"], 3, 1, [2]),
        (["100%"], 5, 0, [5]),
        (["2", "50%", "100%"], 1, 0, [1]),
        (["1", "100%"], 4, 4, []),
    ],
)
def test_plan_waves(waves: list[str], size: int, already: int, expected: list[int]) -> None:
    assert plan_waves(Strategy(waves=waves), size, already) == expected


@given(
    st.lists(st.one_of(st.integers(1, 50).map(str), st.integers(1, 100).map(lambda p: f"{p}%")), max_size=5),
    st.integers(0, 60),
    st.data(),
)
def test_waves_always_cover_the_fleet_exactly_once(waves: list[str], size: int, data: st.DataObject) -> None:
    already = data.draw(st.integers(0, size))
    sizes = plan_waves(Strategy(waves=[*waves, "100%"]), size, already)
    assert sum(sizes) == size - already and all(s > 0 for s in sizes)


@pytest.mark.parametrize(
    ("waves", "size", "expected"),
    [(["1", "25%", "100%"], 8, [13, 25, 100]), (["25%", "100%"], 4, [25, 100]), (["100%"], 3, [100]),
     (["1", "100%"], 3, [34, 100]), (["1", "2", "100%"], 200, [1, 100])],
)  # fmt: skip
def test_waves_as_refresh_checkpoints(waves: list[str], size: int, expected: list[int]) -> None:
    assert checkpoints(Strategy(waves=waves), size) == expected


def test_p95_is_nearest_rank() -> None:
    assert p95([]) is None
    assert p95([3.0]) == 3.0
    assert p95([float(i) for i in range(1, 21)]) == 19.0  # rank ⌈0.95·20⌉ = 19
    assert p95([float(i) for i in range(1, 101)]) == 95.0


def _member(state: MemberState, ttr: float | None = None, i: int = 0, detail: str = "") -> Member:
    return Member(f"m{i}", "web@2", "x", state, T0, ttr, detail)


def test_decide_gates_and_numbers() -> None:
    strategy = Strategy(gates={"boot_success_rate": 1.0, "time_to_ready_p95": "20s"})
    ok = decide(strategy, [_member("ready", 10.0, i) for i in range(3)])
    assert ok.passed and ok.final and ok.success_rate == 1.0 and ok.time_to_ready_p95 == 10.0 and ok.burn_rate == 0
    slow = decide(strategy, [_member("ready", 10.0), _member("ready", 25.0, 1)])
    assert not slow.passed and slow.reasons == ("time-to-ready p95 25.0s > 20s",)
    waiting = decide(strategy, [_member("ready", 10.0), _member("launching", i=1)])
    assert not waiting.passed and not waiting.final and waiting.success_rate is None


def test_burn_rate_stops_a_wave_before_it_settles() -> None:
    strategy = Strategy(error_budget={"slo": 0.99, "max_burn_rate": 10})
    members = [_member("failed"), *(_member("launching", i=i) for i in range(1, 10))]
    verdict = decide(strategy, members)  # 1 of 10 failed: 10 % / 1 % budget = 10× — not more than allowed
    assert not verdict.final and verdict.burn_rate == 10.0
    members[1] = _member("failed", i=1, detail="not ready within 90s")  # 2 of 10: 20×
    verdict = decide(strategy, members)
    assert verdict.final and not verdict.passed
    # The verdict names each failed member and why, so an operator knows which console to read.
    assert verdict.reasons == ("burn rate 20.0× > 10× (2 of 10 failed: m0; m1: not ready within 90s; SLO 0.99)",)


def test_decide_alarms_only_those_the_strategy_names() -> None:
    strategy = Strategy(gates={"alarms": ["web-5xx"]})
    members = [_member("ready", 5.0)]
    assert decide(strategy, members, alarms_firing=["other"]).passed
    assert decide(strategy, members, alarms_firing=["web-5xx"]).reasons == ("alarm web-5xx is in ALARM",)


def test_strategy_file_problems_name_line_and_fix(tmp_path: Path) -> None:
    text = "waves: [0, 150%, 50%]\nbake_time: soon\ngates: {boot_success_rate: 2}\n"
    with pytest.raises(ConfigError) as caught:
        parse_strategy(text, tmp_path / "strategy.yaml")
    found = {(p.field, p.line) for p in caught.value.problems}
    assert found >= {("waves[0]", 1), ("waves[1]", 1), ("bake_time", 2), ("gates.boot_success_rate", 3)}
    assert all(p.fix for p in caught.value.problems)
    with pytest.raises(ConfigError) as unfinished:
        parse_strategy("waves: [1, 50%]\n", tmp_path / "s.yaml")
    assert '"100%"' in unfinished.value.diagnostics()
    good = parse_strategy("waves: [1, 100%]\nbake_time: 2m\n", tmp_path / "s.yaml")
    assert good.waves == ["1", "100%"] and good.bake_time == 120.0


def test_strategy_duplicate_keys_and_bad_fields_are_reported_together(tmp_path: Path) -> None:
    text = "waves: [1, 100%]\nbake_time: 1m\nbake_time: later\ngates: {boot_success_rate: 2}\n"
    with pytest.raises(ConfigError) as caught:
        parse_strategy(text, tmp_path / "strategy.yaml")
    lines = {p.line for p in caught.value.problems}
    assert 3 in lines  # the duplicate bake_time
    assert 4 in lines  # and the gate, in the same error


def test_targets() -> None:
    assert parse_target("web") == ("local", "web")
    assert parse_target("aws:eu-west-1/web-asg") == ("aws", "eu-west-1/web-asg")
    with pytest.raises(ConfigError):
        parse_target("gcp:web")


# --- the controller on a fake fleet -------------------------------------------------------------------------------


class Crash(Exception):
    """Stands for kill -9: nothing after it runs."""


@dataclass
class FakeFleet:
    """Members in memory. A version's behaviour decides whether its members become ready; replace() is idempotent
    per token like the real fleets. `crash_at` raises Crash at the K-th fleet call (before or after it acts)."""

    target: str = "local:web"
    members: dict[str, Member] = field(default_factory=dict)
    launched: Counter[str] = field(default_factory=Counter)  # token -> launches
    by_token: dict[str, str] = field(default_factory=dict)
    bad_versions: set[str] = field(default_factory=set)
    calls: int = 0
    crash_at: int | None = None
    crash_after: bool = False
    n: int = 0
    firing: set[str] = field(default_factory=set)
    given: list[tuple[str, str | None]] = field(default_factory=list)  # each replace call's release: (version, digest)

    def _tick(self) -> None:
        self.calls += 1
        if self.crash_at == self.calls and not self.crash_after:
            raise Crash(self.calls)

    def _tock(self) -> None:
        if self.crash_at == self.calls and self.crash_after:
            raise Crash(self.calls)

    def add(self, version: str, count: int) -> None:
        for _ in range(count):
            self._launch(version)

    def _launch(self, version: str) -> Member:
        self.n += 1
        state: MemberState = "failed" if version in self.bad_versions else "ready"
        member = Member(f"m{self.n:02d}", version, f"{version}.qcow2", state, T0, 5.0 if state == "ready" else None)
        self.members[member.id] = member
        return member

    def current(self) -> list[Member]:
        self._tick()
        out = list(self.members.values())
        self._tock()
        return out

    def replace(
        self, replacements: Sequence[Replacement], artifact: Artifact, release: Release, checks: Checks
    ) -> list[Member]:
        self._tick()
        assert release.digest == artifact.digest  # a machine is told the digest of the bytes it boots
        self.given.append((release.version, release.digest))
        out = []
        for r in replacements:
            if r.token in self.by_token:
                new = self.members[self.by_token[r.token]]
            else:
                new = self._launch(release.version)
                self.by_token[r.token] = new.id
                self.launched[r.token] += 1
            if new.state == "ready":
                old = self.members.get(r.member)
                if old is not None:
                    self.members[r.member] = replace(old, state="stopped")
            else:
                self.members[new.id] = replace(new, state="stopped")  # a failed newcomer is stopped; the old one stays
            out.append(new)
        self._tock()
        return out

    def signals(self, since: datetime) -> list[BootSignal]:
        return []

    def observe(self, since: datetime) -> tuple[list[Member], list[BootSignal]]:
        return self.current(), []

    def alarms_firing(self, names: Sequence[str]) -> list[str]:
        return [n for n in names if n in self.firing]

    def versions(self) -> Counter[str]:
        return Counter(m.version_ref or "" for m in self.members.values() if m.state != "stopped")


def _fleet_of(fake: FakeFleet) -> Callable[[str, Settings], tuple[Fleet, str, str]]:
    """A stand-in for the controller's fleet_of that answers with `fake` (typed: the fake must be a Fleet)."""
    return lambda _target, _settings: (fake, "local", "local")


@pytest.fixture
def store(tmp_path: Path) -> Iterator[SqlStore]:
    with open_store(f"sqlite:///{tmp_path}/r.db") as s:
        yield s


@pytest.fixture
def settings(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Settings:
    monkeypatch.delenv("AMIFORGE_CONFIG", raising=False)
    monkeypatch.chdir(tmp_path)  # no amiforge.toml here
    return Settings(data_dir=tmp_path / "data", actor="test")


@pytest.fixture
def fleet(monkeypatch: pytest.MonkeyPatch) -> FakeFleet:
    fake = FakeFleet()
    fake.add("web@1", 4)
    monkeypatch.setattr(rollout_module, "fleet_of", _fleet_of(fake))
    return fake


def _version(store: SqlStore, number_hint: str) -> int:
    v = store.create_version(name="web", recipe_digest="r" * 64, recipe_path="/r.yaml", provider="local", tags={},
                             parent=None, recipe='{"checks": {}}')  # fmt: skip
    store.add_artifact(v.id, Artifact("local", "local", f"/{number_hint}.qcow2", f"{v.number:064x}", 1))
    store.transition(v.id, Status.BUILT, expect=Status.BAKING, digest=f"{v.number:064x}", size_bytes=1)
    return v.id


NO_WAIT = Controls(sleep=lambda _s: None, clock=lambda: 0.0)


def _rollout(
    store: SqlStore, fleet: FakeFleet, waves: Sequence[str] = ("1", "50%", "100%"), bake_time: float = 0.0
) -> int:
    _version(store, "v1")
    v2 = _version(store, "v2")
    strategy = Strategy(waves=list(waves), bake_time=bake_time)
    live = [m for m in fleet.members.values() if m.state != "stopped"]
    return store.create_rollout(
        "local:web", v2, strategy=strategy.model_dump(mode="json"), waves=plan_waves(strategy, len(live)), actor="t"
    ).id


def test_good_version_rolls_through_every_wave(store: SqlStore, settings: Settings, fleet: FakeFleet) -> None:
    rid = _rollout(store, fleet)
    outcome = drive(rid, store=store, settings=settings, controls=NO_WAIT)
    assert outcome.rollout.state == "succeeded" and outcome.rollout.wave == 3
    assert fleet.versions() == Counter({"web@2": 4})
    assert [d.members for d in outcome.decisions] == [1, 1, 2]
    decisions = store.decisions(rid)
    assert [d.action for d in decisions] == ["continue"] * 3 and decisions[0].numbers["success_rate"] == 1.0
    assert all(n == 1 for n in fleet.launched.values()) and len(fleet.launched) == 4


def test_bad_version_stops_at_wave_one_and_the_fleet_ends_on_the_old_version(
    store: SqlStore, settings: Settings, fleet: FakeFleet
) -> None:
    fleet.bad_versions.add("web@2")
    rid = _rollout(store, fleet)
    with pytest.raises(GateFailed) as caught:
        drive(rid, store=store, settings=settings, controls=NO_WAIT)
    assert "boot success rate 0.00 < 1" in caught.value.diagnostics()
    rollout = store.get_rollout(rid)
    assert rollout.state == "failed" and rollout.wave == 0
    assert fleet.versions() == Counter({"web@1": 4})  # the newcomer failed, the old member kept running
    assert len(fleet.launched) == 1  # only wave 1 was tried


def test_a_wave_that_fails_later_rolls_back_every_replaced_member(
    store: SqlStore, settings: Settings, fleet: FakeFleet, monkeypatch: pytest.MonkeyPatch
) -> None:
    rid = _rollout(store, fleet)
    real_replace = fleet.replace
    waves_done = []

    def replace_then_break(rs: Sequence[Replacement], a: Artifact, r: Release, c: Checks) -> list[Member]:
        waves_done.append(len(rs))
        if len(waves_done) == 3:  # wave 3 launches on a host that breaks them
            fleet.bad_versions.add("web@2")
        return real_replace(rs, a, r, c)

    monkeypatch.setattr(fleet, "replace", replace_then_break)
    with pytest.raises(GateFailed):
        drive(rid, store=store, settings=settings, controls=NO_WAIT)
    assert fleet.versions() == Counter({"web@1": 4})  # waves 1 and 2 were rolled back too
    # Forward, the guests were told they run web@2; put back, web@1 (each with its own artifact's digest).
    assert fleet.given == [("web@2", f"{2:064x}")] * 3 + [("web@1", f"{1:064x}")]
    rolled = [r for r in store.replacements(rid) if r.kind == "rollback"]
    assert len(rolled) == 2 and all(r.state == "done" for r in rolled)
    assert store.get_rollout(rid).state == "failed"


def test_burn_rate_aborts_during_the_bake_time(store: SqlStore, settings: Settings, fleet: FakeFleet) -> None:
    rid = _rollout(store, fleet, waves=("2", "100%"), bake_time=600.0)
    clock = [0.0]
    sleeps: list[float] = []

    def sleep(seconds: float) -> None:
        sleeps.append(seconds)
        clock[0] += seconds
        if len(sleeps) == 2:  # a replaced member dies while the wave bakes
            victim = next(m for m in fleet.members.values() if m.version_ref == "web@2")
            fleet.members[victim.id] = replace(victim, state="failed")

    with pytest.raises(GateFailed, match="rollout"):
        drive(rid, store=store, settings=settings, controls=Controls(sleep=sleep, clock=lambda: clock[0]))
    assert clock[0] == 10.0  # stopped at the next look, not after the 600 s bake time
    assert store.decisions(rid)[-1].numbers["burn_rate"] == 50.0  # 1 of 2 failed against a 1 % budget


def test_pause_then_resume_and_abort(store: SqlStore, settings: Settings, fleet: FakeFleet) -> None:
    rid = _rollout(store, fleet)
    request(rid, "pause", store=store, settings=settings)
    paused = drive(rid, store=store, settings=settings, controls=NO_WAIT)
    assert paused.rollout.state == "paused" and fleet.launched == Counter()
    with pytest.raises(StateError):
        store.create_rollout("local:web", store.get_rollout(rid).version_id, strategy={}, waves=[1], actor="t")
    done = resume(rid, store=store, settings=settings, controls=NO_WAIT)
    assert done.rollout.state == "succeeded"
    with pytest.raises(StateError):
        request(rid, "abort", store=store, settings=settings)
    other = _rollout(store, fleet)
    request(other, "pause", store=store, settings=settings)
    drive(other, store=store, settings=settings, controls=NO_WAIT)
    assert request(other, "abort", store=store, settings=settings).state == "aborted"


def test_a_rollback_undoes_the_last_change_and_m6_counts_that_as_rolled_back(
    store: SqlStore, settings: Settings, fleet: FakeFleet, monkeypatch: pytest.MonkeyPatch
) -> None:
    rid = _rollout(store, fleet)
    drive(rid, store=store, settings=settings, controls=NO_WAIT)
    last = last_change("web", store)
    assert last is not None and (last[0].id, last[1]) == (rid, "web@1")
    # What is releasable is judged elsewhere (tests/unit/test_supply_lifecycle.py); these versions are bare.
    monkeypatch.setattr(rollout_module, "releasable", lambda *_a, **_k: None)

    back = rollback("web", store=store, settings=settings, controls=NO_WAIT)

    assert back.rollout.undoes == rid and back.rollout.version_ref == "web@1" and back.rollout.state == "succeeded"
    assert fleet.versions() == Counter({"web@1": 4})
    [started] = [e for e in store.events("web@1") if e.kind == "rollout.started"]
    assert started.data["undoes"] == rid
    # M6: the change that was undone by hand counts as rolled back; the rollback itself is not a change.
    now = datetime.now(UTC)
    [rate] = rollout_rates(store.rollouts(target="local:web"), start=now - timedelta(hours=1), now=now)
    assert (rate.succeeded, rate.rolled_back, rate.aborted) == (0, 1, 0)
    assert sorted(store.rollout_tally()) == [("web", "local:web", "succeeded", False, True, 1),
                                             ("web", "local:web", "succeeded", True, False, 1)]  # fmt: skip


def test_a_rollback_to_another_version_is_a_change_of_its_own(
    store: SqlStore, settings: Settings, fleet: FakeFleet, monkeypatch: pytest.MonkeyPatch
) -> None:
    rid = _rollout(store, fleet)
    drive(rid, store=store, settings=settings, controls=NO_WAIT)
    _version(store, "v3")  # web@3: a fix
    monkeypatch.setattr(rollout_module, "releasable", lambda *_a, **_k: None)
    forward = rollback("web", store=store, settings=settings, to="web@3", controls=NO_WAIT)
    assert forward.rollout.undoes is None and forward.rollout.version_ref == "web@3"


def test_a_wave_verdict_names_five_failed_members_and_counts_the_rest() -> None:
    strategy = Strategy(error_budget={"slo": 0.99, "max_burn_rate": 10})
    verdict = decide(strategy, [_member("failed", i=i, detail="not ready") for i in range(8)])
    assert verdict.reasons[0].endswith("m3: not ready; m4: not ready; and 3 more; SLO 0.99)")


def test_a_rollback_with_no_earlier_rollout_needs_to(store: SqlStore, settings: Settings, fleet: FakeFleet) -> None:
    with pytest.raises(NotFound, match="no earlier rollout on local:web") as refused:
        rollback("web", store=store, settings=settings, controls=NO_WAIT)
    assert refused.value.fix == "pass --to REF"


@pytest.mark.parametrize("after", [False, True])
def test_kill_and_resume_at_every_fleet_call(
    store: SqlStore, settings: Settings, fleet: FakeFleet, after: bool
) -> None:
    """Killed before or after the K-th fleet call, for every K of a clean run: resuming converges to the clean
    end state — every member on the new version, each replaced exactly once, none lost."""
    clean_calls = _clean_calls(settings, Path(settings.data_dir).parent)
    for k in range(1, clean_calls + 1):
        fake = FakeFleet()
        fake.add("web@1", 4)
        with pytest.MonkeyPatch.context() as patch:
            patch.setattr(rollout_module, "fleet_of", _fleet_of(fake))
            with open_store(f"sqlite:///{settings.data_dir.parent}/kill-{k}-{after}.db") as s:
                rid = _rollout(s, fake)
                fake.crash_at, fake.crash_after = k, after
                with pytest.raises(Crash):
                    drive(rid, store=s, settings=settings, controls=NO_WAIT)
                fake.crash_at = None
                outcome = resume(rid, store=s, settings=settings, controls=NO_WAIT)
                assert outcome.rollout.state == "succeeded", k
                assert fake.versions() == Counter({"web@2": 4}), k
                assert len(fake.launched) == 4 and all(n == 1 for n in fake.launched.values()), k


def _clean_calls(settings: Settings, tmp: Path) -> int:
    fake = FakeFleet()
    fake.add("web@1", 4)
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(rollout_module, "fleet_of", _fleet_of(fake))
        with open_store(f"sqlite:///{tmp}/clean.db") as s:
            drive(_rollout(s, fake), store=s, settings=settings, controls=NO_WAIT)
    assert fake.calls >= 6
    return fake.calls


WRITES = ("plan_replacements", "finish_replacement", "add_decision", "update_rollout")


def _crash_on_write(store: SqlStore, k: int, patch: pytest.MonkeyPatch) -> None:
    """Make the K-th registry write the controller attempts die (before it happens)."""
    count = [0]

    def crashing(original: Callable[P, R]) -> Callable[P, R]:
        def write(*args: P.args, **kwargs: P.kwargs) -> R:
            count[0] += 1
            if count[0] == k:
                raise Crash(k)
            return original(*args, **kwargs)

        return write

    for name in WRITES:
        patch.setattr(store, name, crashing(getattr(store, name)))


def test_kill_and_resume_at_every_store_write(settings: Settings, tmp_path: Path) -> None:
    """The same with the crash in the registry: before each write the controller makes."""
    for k in range(1, 12):
        fake = FakeFleet()
        fake.add("web@1", 4)
        with pytest.MonkeyPatch.context() as patch, open_store(f"sqlite:///{tmp_path}/w{k}.db") as s:
            patch.setattr(rollout_module, "fleet_of", _fleet_of(fake))
            rid = _rollout(s, fake)
            with pytest.MonkeyPatch.context() as crash:
                _crash_on_write(s, k, crash)
                with pytest.raises(Crash):
                    drive(rid, store=s, settings=settings, controls=NO_WAIT)
            resume(rid, store=s, settings=settings, controls=NO_WAIT)
            assert fake.versions() == Counter({"web@2": 4}), k
            assert len(fake.launched) == 4 and all(n == 1 for n in fake.launched.values()), k


def test_a_firing_alarm_fails_the_wave(store: SqlStore, settings: Settings, fleet: FakeFleet) -> None:
    _version(store, "v1")
    v2 = _version(store, "v2")
    strategy = Strategy(waves=["1", "100%"], bake_time=0.0, gates={"alarms": ["web-5xx"]})
    rid = store.create_rollout("local:web", v2, strategy=strategy.model_dump(mode="json"), waves=[1, 3], actor="t").id
    fleet.firing.add("web-5xx")
    with pytest.raises(GateFailed, match="rollout"):
        drive(rid, store=store, settings=settings, controls=NO_WAIT)
    assert store.decisions(rid)[0].numbers["alarms"] == ["web-5xx"]
    assert fleet.versions() == Counter({"web@1": 4})


def test_status_watch_follows_a_rollout_driven_elsewhere(
    settings: Settings, fleet: FakeFleet, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    from tests.cli_harness import make_cli

    monkeypatch.setenv("AMIFORGE_DATA_DIR", str(settings.data_dir))
    monkeypatch.delenv("AMIFORGE_STORE_URL", raising=False)
    with open_store(settings.registry_url) as s:
        rid = _rollout(s, fleet)
    looks = []

    def another_controller_moves(_seconds: float) -> None:  # the controller in another process takes a step
        looks.append(1)
        with open_store(settings.registry_url) as s:
            if len(looks) == 1:
                s.add_decision(rid, 0, passed=True, action="continue", numbers={"members": 1, "reasons": []})
            else:
                s.update_rollout(rid, expect="running", state="succeeded")

    monkeypatch.setattr("amiforge.cli.rollout_cmd.time.sleep", another_controller_moves)
    cli = make_cli(monkeypatch, capsys)
    watched = cli("rollout", "status", str(rid), "--watch")
    assert watched.code == 0 and len(looks) == 2
    heads = [line for line in watched.out.splitlines() if line.startswith(f"rollout #{rid} ")]
    assert [h.split(": ", 1)[1].split(" ")[0] for h in heads] == ["running", "running", "succeeded"]
    as_json = cli("rollout", "status", str(rid), "--watch", "--json")
    assert as_json.json()["rollout"]["state"] == "succeeded"  # one document, at the end


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--target", "gcp:x", "--version", "web@1"], "is not local:NAME or aws:REGION/GROUP"),
        (["--target", "local:x", "--version", "web@1", "--waves", "1,50%"], "waves: the last wave is 50%"),
        (["--target", "local:x", "--version", "web@1", "--bake-time", "soon"], "bake_time: 'soon' is not a duration"),
        (["--target", "local:x"], "exactly one of --channel IMAGE:CHANNEL or --version NAME@N"),
        (["--target", "local:x", "--channel", "web"], "is not IMAGE:CHANNEL"),
    ],
)
def test_rollout_start_usage_errors_name_the_flag_and_the_fix(
    settings: Settings,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    args: list[str],
    message: str,
) -> None:
    from tests.cli_harness import make_cli

    monkeypatch.setenv("AMIFORGE_DATA_DIR", str(settings.data_dir))
    monkeypatch.delenv("AMIFORGE_STORE_URL", raising=False)
    refused = make_cli(monkeypatch, capsys)("rollout", "start", *args)
    assert refused.code == 2 and message in refused.err and "fix:" in refused.err and "Traceback" not in refused.err


def test_one_controller_at_a_time_holds_a_rollout(store: SqlStore, settings: Settings, fleet: FakeFleet) -> None:
    """A live controller's lease refuses a second one (another `serve`, the CLI); a lease not renewed for
    LEASE_SECONDS, or held by a dead process on this host, is taken over; the lease is given up at the end."""
    rid = _rollout(store, fleet)
    elsewhere = "build-2.example:4242:other"
    assert store.claim_rollout(rid, elsewhere, expect=None)
    with pytest.raises(StateError, match=f"is driven by {elsewhere}"):
        drive(rid, store=store, settings=settings, controls=NO_WAIT)
    with pytest.raises(StateError, match="is driven by"):
        resume(rid, store=store, settings=settings, controls=NO_WAIT)
    assert fleet.launched == Counter()  # the refused controllers launched nothing
    stale = datetime.now(UTC) - timedelta(seconds=LEASE_SECONDS + 5)
    with store.engine.begin() as conn:
        conn.execute(rollouts_table.update().where(rollouts_table.c.id == rid).values(controller_seen_at=stale))
    assert controller_gone(store.get_rollout(rid))
    outcome = drive(rid, store=store, settings=settings, controls=NO_WAIT)  # takes over the stale lease
    assert outcome.rollout.state == "succeeded"
    after = store.get_rollout(rid)
    assert (after.controller, after.controller_seen_at) == (None, None)  # given up at the end
    now, here = datetime.now(UTC), socket.gethostname()
    finished = store.get_rollout(rid)

    def held_by(owner: str) -> Rollout:
        return replace(finished, controller=owner, controller_seen_at=now)

    assert controller_gone(held_by(f"{here}:{2**22 + 1}:{HERE}:gone"))  # above Linux's highest pid: no such process
    assert not controller_gone(held_by(f"{here}:{os.getpid()}:{HERE}:x"))  # this very process
    # The same host name and a dead pid in another PID namespace (a container): not judged by this one's processes.
    assert not controller_gone(held_by(f"{here}:{2**22 + 1}:other:x"))


def test_the_lease_is_renewed_while_a_wave_waits(
    store: SqlStore, settings: Settings, fleet: FakeFleet, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(lease_module, "RENEW_SECONDS", 0.05)
    rid = _rollout(store, fleet, waves=("100%",))
    seen: list[datetime | None] = []
    real_replace = fleet.replace

    def slow_replace(*args: object, **kwargs: object) -> list[Member]:
        first = store.get_rollout(rid).controller_seen_at
        time.sleep(0.5)  # a wave waiting on its fleet
        seen.extend([first, store.get_rollout(rid).controller_seen_at])
        return real_replace(*args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(fleet, "replace", slow_replace)
    drive(rid, store=store, settings=settings, controls=NO_WAIT)
    assert seen[0] is not None and seen[1] is not None and seen[1] > seen[0]


def test_a_controller_that_loses_its_lease_stops_at_its_next_step(
    store: SqlStore, settings: Settings, fleet: FakeFleet, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(lease_module, "RENEW_SECONDS", 0.05)
    rid = _rollout(store, fleet)  # waves 1, 50%, 100%
    real_replace = fleet.replace

    def stolen_during_wave_one(*args: object, **kwargs: object) -> list[Member]:
        out = real_replace(*args, **kwargs)  # type: ignore[arg-type]
        mine = store.get_rollout(rid)
        assert store.claim_rollout(rid, "build-2.example:7:elsewhere:x", expect=mine.controller,
                                   expect_seen=mine.controller_seen_at)  # fmt: skip
        time.sleep(0.3)  # the renewal finds it gone
        return out

    monkeypatch.setattr(fleet, "replace", stolen_during_wave_one)
    with pytest.raises(StateError, match="lost its lease"):
        drive(rid, store=store, settings=settings, controls=NO_WAIT)
    assert len(fleet.launched) == 1  # wave 1 only: the second wave was never asked for
    assert store.get_rollout(rid).controller == "build-2.example:7:elsewhere:x"  # not released by the loser


def test_a_claim_fails_when_the_lease_was_renewed_since_it_was_read(store: SqlStore, fleet: FakeFleet) -> None:
    rid = _rollout(store, fleet)
    assert store.claim_rollout(rid, "a:1:x:y", expect=None)
    seen = store.get_rollout(rid).controller_seen_at
    time.sleep(0.01)
    assert store.renew_rollout(rid, "a:1:x:y")  # the holder renews between another's read and its claim
    assert not store.claim_rollout(rid, "b:2:x:y", expect="a:1:x:y", expect_seen=seen)
    store.update_rollout(rid, expect="running", state="aborted")
    assert store.renew_rollout(rid, "a:1:x:y", release=True)
    assert not store.claim_rollout(rid, "b:2:x:y", expect=None)  # an aborted rollout is driven by nobody


def test_an_unattended_canary_aborts_at_once_but_a_rollback_or_a_refresh_waits_for_a_controller(
    store: SqlStore, settings: Settings, fleet: FakeFleet
) -> None:
    rid = _rollout(store, fleet)
    assert request(rid, "abort", store=store, settings=settings).state == "aborted"
    with pytest.raises(StateError, match="aborted: there is nothing to drive"):
        drive(rid, store=store, settings=settings, controls=NO_WAIT)  # a controller thread that starts late
    assert fleet.launched == Counter()
    back = store.create_rollout("local:web", store.get_version("web@1").id, strategy=Strategy().model_dump(mode="json"),
                                waves=[4], actor="t")  # fmt: skip
    store.update_rollout(back.id, expect="running", state="rolling-back")
    assert request(back.id, "abort", store=store, settings=settings).state == "rolling-back"  # asked, not done
    by_refresh = Strategy(mode="refresh").model_dump(mode="json")
    refresh = store.create_rollout("aws:eu-west-1/TEST-asg", store.get_version("web@2").id, strategy=by_refresh,
                                   waves=[1], actor="t")  # fmt: skip
    assert request(refresh.id, "abort", store=store, settings=settings).requested == "abort"
    assert store.get_rollout(refresh.id).state == "running"
