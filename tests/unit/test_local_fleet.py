"""Local fleets without QEMU: how a member is judged from its console and the clock (pure), reconciliation with
real processes standing in for QEMU, and replace/create/destroy with the launch function swapped for a fake QEMU.

The fake is a Python process whose argv[0] is `qemu-system-x86_64` and whose argv names the member's overlay
the way QEMU's does, so /proc reads exactly as for a real guest; it writes a console file and then idles.
"""

from __future__ import annotations

import base64
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from amiforge.errors import ConfigError, InfraError, NotFound, StateError
from amiforge.lifecycle import logs, telemetry
from amiforge.model import Artifact, Status
from amiforge.providers import guest as in_guest
from amiforge.providers.interface import Fleet, Member, PhaseUpdate, Release, Replacement
from amiforge.providers.local import fleet as fleet_mod
from amiforge.providers.local import fleet_judge, qemu
from amiforge.providers.local.fleet import (
    MAX_BOOTING,
    LocalFleet,
    create_fleet,
    destroy_fleet,
    list_fleets,
    open_fleet,
)
from amiforge.providers.local.fleet_files import MemberFile
from amiforge.providers.local.fleet_judge import READY_SLACK, assess, checks_grace, console_lines
from amiforge.recipe import Checks
from amiforge.settings import Settings
from amiforge.store.sql import open_store
from tests.cli_harness import Cli, make_cli

T0 = datetime(2025, 3, 1, 12, 0, 0, tzinfo=UTC)
CHECKS = Checks.model_validate(
    {"ready_within": 30, "units": ["nginx"], "commands": [{"run": "id deploy", "expect_output": "deploy"}]}
)
GUEST_CHECKS = in_guest.guest_checks(CHECKS)


def _frame(i: int, rc: int, out: str) -> str:
    return f"AMIFORGE-RESULT {i} {rc} {base64.b64encode(out.encode()).decode()}"


BOOT = ["\x1b[c\x1b[2J[    0.000000] Linux version 6.1", "[  OK  ] Reached target multi-user.target."]
READY = [*BOOT, "AMIFORGE-READY 12.50"]
PASSED = [*READY, _frame(0, 0, "active"), _frame(1, 0, "uid=1000(deploy)"), in_guest.DONE_MARK]
FAILED_UNIT = [*READY, _frame(0, 3, "inactive"), _frame(1, 0, "uid=1000(deploy)"), in_guest.DONE_MARK]
# What the fake QEMU prints by default: it is ready a moment after its start, so its uptime must be short too
# (signal times are launch + uptime).
QUICK = [line.replace("AMIFORGE-READY 12.50", "AMIFORGE-READY 0.10") for line in PASSED]


def _rec(**changes: object) -> MemberFile:
    base = MemberFile(
        id="g-0000beef",
        token="t1",
        version_ref="web@1",
        location="/img/web.qcow2",
        kernel="/img/vmlinuz",
        initrd="/img/initrd",
        launched_at=T0,
        ready_within=30.0,
        checks=GUEST_CHECKS,
        accel="tcg",
        forwards={},
    )
    return base.model_copy(update=changes)


def _at(seconds: float) -> datetime:
    return T0 + timedelta(seconds=seconds)


# --- judging a member (pure) --------------------------------------------------------------------------------


def test_console_lines_drop_the_line_qemu_is_still_writing() -> None:
    assert console_lines("a\r\nAMIFORGE-READY 12.5\nAMIFORGE-READY 1") == ["a", "AMIFORGE-READY 12.5"]
    assert console_lines("") == []


def test_booting_then_ready_once_every_check_passed() -> None:
    member, signals = assess(_rec(), BOOT, running=True, now=_at(5))
    assert (member.state, member.time_to_ready, member.detail) == ("launching", None, "booting (5s of 30s)")
    assert [s.kind for s in signals] == ["launch"]

    member, _ = assess(_rec(), READY, running=True, now=_at(13))
    assert (member.state, member.time_to_ready, member.detail) == ("launching", 12.5, "running the checks")

    member, signals = assess(_rec(), PASSED, running=True, now=_at(20))
    assert (member.state, member.time_to_ready) == ("ready", 12.5)
    assert [(s.kind, s.at, s.time_to_ready) for s in signals] == [("launch", T0, None), ("ready", _at(12.5), 12.5)]
    assert member.location == "/img/web.qcow2" and member.version_ref == "web@1"


def test_the_copies_of_the_readiness_line_make_one_readiness() -> None:
    """amiforge-ready-repeat.service prints the line again, with its first uptime, once the checks reported."""
    copies = ["AMIFORGE-READY 12.50", "[  OK  ] Started amiforge-ready-repeat.service.", "AMIFORGE-READY 12.50"]
    member, signals = assess(_rec(), [*PASSED, *copies], running=True, now=_at(60))
    assert (member.state, member.time_to_ready, member.detail) == ("ready", 12.5, "ready after 12.5s")
    assert [(s.kind, s.at, s.time_to_ready) for s in signals] == [("launch", T0, None), ("ready", _at(12.5), 12.5)]


def test_the_boot_timing_after_readiness_is_a_signal_of_its_own() -> None:
    timing = "AMIFORGE-TIMING kernel=2.104 userspace=9.870 slow.service/5.012 nginx.service/0.530"
    member, signals = assess(_rec(), [*READY, timing, *PASSED[len(READY) :]], running=True, now=_at(20))
    assert member.state == "ready"
    [timed] = [s for s in signals if s.kind == "timing"]
    assert (timed.at, timed.time_to_ready) == (_at(12.5), 12.5)
    assert timed.timeline == {"kernel": 2.104, "userspace": 9.87, "slow.service": 5.012, "nginx.service": 0.53}
    _, without = assess(_rec(), PASSED, running=True, now=_at(20))
    assert "timing" not in {s.kind for s in without}


def test_a_readiness_line_the_kernel_broke_into_waits_for_a_whole_copy() -> None:
    """printk writes to the serial port itself, so its line can land inside ours: `AMIFORGE-READY 1` is not 1 s."""
    broken = [*BOOT, "AMIFORGE-READY 1[   13.020511] random: crng init done", "2.50", *PASSED[len(READY) :]]
    member, signals = assess(_rec(), broken, running=True, now=_at(20))
    assert (member.state, member.time_to_ready) == ("launching", None)
    assert [s.kind for s in signals] == ["launch"]
    member, signals = assess(_rec(), [*broken, "AMIFORGE-READY 12.50"], running=True, now=_at(30))
    assert (member.state, member.time_to_ready) == ("ready", 12.5)  # the checks that ran after the first print count
    assert [(s.kind, s.at) for s in signals] == [("launch", T0), ("ready", _at(12.5))]


def test_a_failed_check_fails_the_member_and_names_the_check() -> None:
    member, signals = assess(_rec(), FAILED_UNIT, running=True, now=_at(20))
    assert member.state == "failed"
    assert member.detail == "unit nginx: exit 3, expected 0: inactive"
    assert [(s.kind, s.at) for s in signals] == [("launch", T0), ("failed", _at(12.5))]


def test_not_ready_in_time_fails_at_the_deadline_and_stays_failed() -> None:
    limit = 30 + READY_SLACK
    assert assess(_rec(), BOOT, running=True, now=_at(limit - 1))[0].state == "launching"
    member, signals = assess(_rec(), BOOT, running=True, now=_at(limit))
    assert (member.state, member.detail) == ("failed", "not ready within 30s")
    assert signals[-1].at == _at(limit)
    # READY arriving later with an uptime past the limit does not make it ready.
    late = [*BOOT, "AMIFORGE-READY 41.0", *PASSED[len(READY) :]]
    member, _ = assess(_rec(), late, running=True, now=_at(45))
    assert (member.state, member.detail) == ("failed", "ready only after 41.0s (limit 30s)")


def test_checks_that_never_finish_fail_after_their_grace() -> None:
    grace = checks_grace(GUEST_CHECKS)
    assert assess(_rec(), READY, running=True, now=_at(12.5 + grace - 1))[0].state == "launching"
    member, _ = assess(_rec(), READY, running=True, now=_at(12.5 + grace))
    assert (member.state, member.detail) == ("failed", "the in-guest checks did not finish")


def test_a_qemu_that_exits_unasked_fails_when_first_seen_gone() -> None:
    member, signals = assess(_rec(), PASSED, running=False, now=_at(100), exited_at=_at(60))
    assert (member.state, member.detail) == ("failed", "QEMU exited")
    assert [(s.kind, s.at) for s in signals] == [("launch", T0), ("ready", _at(12.5)), ("failed", _at(60))]
    # Gone while booting: its clock stops there, so it is the exit that failed it, not the deadline.
    member, signals = assess(_rec(), BOOT, running=False, now=_at(100), exited_at=_at(3))
    assert (member.state, member.detail) == ("failed", "QEMU exited")
    assert [(s.kind, s.at) for s in signals] == [("launch", T0), ("failed", _at(3))]
    # What it printed last travels with the failure, as a reader sees it (no terminal escapes).
    assert signals[-1].console_tail == (
        "[    0.000000] Linux version 6.1",
        "[  OK  ] Reached target multi-user.target.",
    )
    ready = next(s for s in assess(_rec(), PASSED, running=True, now=_at(20))[1] if s.kind == "ready")
    assert ready.console_tail == ()


def test_a_member_stopped_on_purpose_is_stopped_not_failed() -> None:
    replaced = _rec(stopped_at=_at(50), stop_cause="replaced", stop_reason="replaced by g-1", replaced_by="g-1")
    member, signals = assess(replaced, PASSED, running=False, now=_at(100))
    assert (member.state, member.detail) == ("stopped", "replaced by g-1")
    assert [(s.kind, s.at, s.detail) for s in signals][1:] == [
        ("ready", _at(12.5), "ready after 12.5s"),
        ("replaced", _at(50), "replaced by g-1"),
    ]
    # Stopped while booting, long before the deadline: no failure, ever.
    early = _rec(stopped_at=_at(5), stop_cause="failed", stop_reason="stopped")
    member, signals = assess(early, BOOT, running=False, now=_at(1000))
    assert member.state == "stopped" and [s.kind for s in signals] == ["launch"]
    # An exit seen before the stop still counts.
    member, signals = assess(replaced, PASSED, running=False, now=_at(100), exited_at=_at(40))
    assert member.state == "stopped" and [s.kind for s in signals] == ["launch", "ready", "failed", "replaced"]


def test_the_latest_whole_heartbeat_is_a_signal() -> None:
    """amiforge-heartbeat.service beats every 60 s; only the latest whole line counts (M4 asks how recent it is)."""
    beats = [*PASSED, "AMIFORGE-HEARTBEAT 13.01", "AMIFORGE-HEARTBEAT 73.02", "AMIFORGE-HEARTBEAT 13[  133.0] rcu"]
    member, signals = assess(_rec(), beats, running=True, now=_at(140))
    assert member.state == "ready"
    assert [(s.kind, s.at) for s in signals if s.kind == "heartbeat"] == [("heartbeat", _at(73.02))]
    assert not any(s.kind == "heartbeat" for s in assess(_rec(), PASSED, running=True, now=_at(20))[1])


def test_only_readiness_that_never_came_in_time_is_a_timeout() -> None:
    _, signals = assess(_rec(), BOOT, running=True, now=_at(60))
    assert [(s.kind, s.timed_out) for s in signals][-1] == ("failed", True)
    late = [*BOOT, "AMIFORGE-READY 41.0", *PASSED[len(READY) :]]
    assert assess(_rec(), late, running=True, now=_at(45))[1][-1].timed_out
    assert not assess(_rec(), FAILED_UNIT, running=True, now=_at(20))[1][-1].timed_out
    assert not assess(_rec(), BOOT, running=False, now=_at(100), exited_at=_at(3))[1][-1].timed_out


def test_a_recorded_launch_error_is_a_failure() -> None:
    member, _ = assess(_rec(launch_error="qemu-img create failed"), [], running=False, now=_at(1))
    assert (member.state, member.detail) == ("failed", "launch failed: qemu-img create failed")


def release(ref: str) -> Release:
    return Release(
        ref.partition("@")[0], ref, "ab" * 32, datetime(2026, 1, 2, 3, 4, 5, tzinfo=UTC), "sha256:" + "d" * 64
    )


# --- the fake QEMU and a fleet to run it in -----------------------------------------------------------------

# Builtin modules only, and the interpreter's own home: renamed argv[0] makes Python look for its library by
# that name, and it would find a different Python's.
FAKE_QEMU = """
import sys, time
console, delay, text = sys.argv[1], float(sys.argv[2]), bytes.fromhex(sys.argv[3]).decode()
open(console, "w").close()
time.sleep(delay)
with open(console, "a") as f:
    f.write(text)
time.sleep(600)
"""


def start_fake(overlay: Path, console: Path, lines: list[str], delay: float = 0.3) -> subprocess.Popen[bytes]:
    text = "".join(line + "\n" for line in lines)
    argv = ["qemu-system-x86_64", "-S", "-c", FAKE_QEMU, str(console), str(delay), text.encode().hex()]
    argv += ["-drive", f"file={qemu.option_value(overlay)},format=qcow2,if=virtio"]  # as GuestSpec.command writes it
    return subprocess.Popen(
        argv,
        executable=sys.executable,
        env={"PYTHONHOME": sys.base_prefix},
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        start_new_session=True,
    )


@dataclass
class FakeLauncher:
    """Stands in for spawn_guest: starts a fake QEMU whose console says what `plan` says for that launch."""

    settings: Settings
    plan: list[list[str]] = field(default_factory=list)  # console of the 1st, 2nd, … launch; default QUICK
    launched: list[str] = field(default_factory=list)  # member ids, in launch order
    specs: list[qemu.GuestSpec] = field(default_factory=list)  # what each launch was asked to start, in order
    most_booting: int = 0
    procs: list[subprocess.Popen[bytes]] = field(default_factory=list)
    die_after_start: bool = False  # the launcher is killed right after QEMU starts, before the pid is recorded
    die_before_start: bool = False  # … once the member is recorded, before QEMU starts (qemu-img create takes time)

    def __call__(self, spec: qemu.GuestSpec) -> subprocess.Popen[bytes]:
        if self.die_before_start:
            spec.overlay.write_bytes(b"half")  # what qemu-img create may leave
            raise KeyboardInterrupt
        fleet = LocalFleet(self.settings, spec.workdir.parent.name)
        booting = sum(1 for m in fleet.current() if m.state == "launching")  # this one included: it is recorded
        self.most_booting = max(self.most_booting, booting)
        assert spec.console == spec.workdir / "console.log"
        lines = self.plan[len(self.launched)] if len(self.launched) < len(self.plan) else QUICK
        self.launched.append(spec.workdir.name)
        self.specs.append(spec)
        proc = start_fake(spec.overlay, spec.console, lines)
        self.procs.append(proc)
        if self.die_after_start:
            raise KeyboardInterrupt
        return proc


@pytest.fixture
def settings(tmp_path: Path) -> Settings:
    # A comma in the data dir: QEMU reads it doubled, and amiforge must still find its guests by their disks.
    return Settings(data_dir=tmp_path / "data,1", accel="tcg")


@pytest.fixture
def artifact(tmp_path: Path) -> Artifact:
    img = tmp_path / "img"
    img.mkdir()
    for name in ("web.qcow2", "vmlinuz", "initrd"):
        (img / name).write_bytes(b"")
    return Artifact("local", "local", str(img / "web.qcow2"), "d" * 64, 0, str(img / "vmlinuz"), str(img / "initrd"))


@pytest.fixture
def launcher(settings: Settings, monkeypatch: pytest.MonkeyPatch) -> Iterator[FakeLauncher]:
    fake = FakeLauncher(settings)
    monkeypatch.setattr(fleet_mod, "spawn_guest", fake)
    monkeypatch.setattr(fleet_mod, "POLL_SECONDS", 0.05)
    yield fake
    for proc in fake.procs:
        if proc.poll() is None:
            proc.kill()
        proc.wait()


def _web(settings: Settings, artifact: Artifact, size: int) -> LocalFleet:
    return create_fleet(settings, "web", size, artifact, release("web@1"), CHECKS)


@pytest.fixture
def web1(settings: Settings, artifact: Artifact, launcher: FakeLauncher) -> tuple[LocalFleet, Member]:
    """A one-member fleet on web@1 and its member."""
    fleet = _web(settings, artifact, 1)
    (member,) = fleet.current()
    return fleet, member


def _alive(proc: subprocess.Popen[bytes]) -> bool:
    return proc.poll() is None


def _states(fleet: LocalFleet) -> dict[str, str]:
    return {m.id: m.state for m in fleet.current()}


# --- reconciliation with real processes ----------------------------------------------------------------------


def test_a_pid_counts_only_while_it_is_our_qemu_on_that_overlay(
    settings: Settings, artifact: Artifact, launcher: FakeLauncher
) -> None:
    fleet = _web(settings, artifact, 1)
    (member,) = fleet.current()
    assert member.state == "ready" and member.time_to_ready == 0.1
    mdir = fleet.dir / member.id
    (status,) = fleet.status()
    assert status.pid == launcher.procs[0].pid

    # The pid is reused by something else: not our guest any more.
    sleeper = subprocess.Popen(["sleep", "60"])
    other = start_fake(fleet.dir / "elsewhere" / "overlay.qcow2", fleet.dir / "elsewhere.log", [])
    try:
        for stranger in (sleeper, other):
            (mdir / "qemu.pid").write_text(str(stranger.pid))
            (m,) = fleet.current()
            assert (m.state, m.detail) == ("failed", "QEMU exited")
            (mdir / "exited").unlink()
    finally:
        for p in (sleeper, other):
            p.kill()
            p.wait()

    # No pid file (the launcher died between start and record): /proc is searched for the overlay.
    (mdir / "qemu.pid").unlink()
    (status,) = fleet.status()
    assert (status.member.state, status.pid) == ("ready", launcher.procs[0].pid)


def test_a_killed_guest_is_failed_from_when_it_was_first_seen_gone(
    settings: Settings, artifact: Artifact, launcher: FakeLauncher
) -> None:
    fleet = _web(settings, artifact, 2)
    first, second = fleet.current()
    before = datetime.now(UTC)
    os.kill(launcher.procs[0].pid, signal.SIGKILL)
    launcher.procs[0].wait()
    states = _states(fleet)
    assert states == {first.id: "failed", second.id: "ready"}
    failed = [s for s in fleet.signals(before) if s.kind == "failed"]
    assert [(s.member, s.detail) for s in failed] == [(first.id, "QEMU exited")]
    # Durable: read again later, the failure keeps the time it was first seen.
    time.sleep(0.05)
    assert [s.at for s in fleet.signals(before) if s.kind == "failed"] == [failed[0].at]


def test_a_member_whose_qemu_never_started_fails_after_a_grace(
    settings: Settings, artifact: Artifact, launcher: FakeLauncher, monkeypatch: pytest.MonkeyPatch
) -> None:
    fleet = _web(settings, artifact, 1)
    (member,) = fleet.current()
    # As if its launcher had died after recording it and before starting QEMU: no process, no pid, no console.
    os.kill(launcher.procs[0].pid, signal.SIGKILL)
    launcher.procs[0].wait()
    for name in ("qemu.pid", "console.log"):
        (fleet.dir / member.id / name).unlink()
    monkeypatch.setattr(fleet_mod, "START_GRACE", 3600.0)
    assert _states(fleet) == {member.id: "launching"}  # its launcher may be starting it right now
    monkeypatch.setattr(fleet_mod, "START_GRACE", 0.0)
    (m,) = fleet.current()
    assert (m.state, m.detail) == ("failed", "QEMU never started (its launcher stopped first)")


# --- create, replace, destroy with the fake launcher ---------------------------------------------------------


def test_create_boots_at_most_max_booting_at_once_and_records_each_member(
    settings: Settings, artifact: Artifact, launcher: FakeLauncher
) -> None:
    updates: list[PhaseUpdate] = []
    fleet = create_fleet(settings, "web", 3, artifact, release("web@1"), CHECKS, progress=updates.append)
    as_protocol: Fleet = fleet  # mypy checks that LocalFleet is a Fleet
    assert as_protocol.target == "web"
    assert launcher.most_booting == MAX_BOOTING
    assert list_fleets(settings) == ["web"]
    members = open_fleet(settings, "web").current()
    assert [m.id for m in members] == launcher.launched
    assert {m.state for m in members} == {"ready"}
    rows = {(u.name, u.state, u.detail, u.seconds) for u in updates}
    assert rows == {(m.id, "start", "booting web@1", None) for m in members} | {
        (m.id, "done", "ready", 0.1) for m in members
    }
    info = json.loads((fleet.dir / "fleet.json").read_text())
    assert info["members"] == launcher.launched
    record = json.loads((fleet.dir / members[0].id / "member.json").read_text())
    assert record["token"] == "create-0" and record["version_ref"] == "web@1"
    # Each guest is given what it is booted as (the image is shared between versions), and its record keeps it.
    assert {spec.release for spec in launcher.specs} == {in_guest.release_file(release("web@1"))}
    assert record["release"] == in_guest.release_file(release("web@1")).decode()
    assert record["location"] == artifact.location and record["stopped_at"] is None
    assert all(m.id.startswith("g-") and len(m.id) == 10 for m in members)


def test_create_returns_with_failed_members_shown_failed(
    settings: Settings, artifact: Artifact, launcher: FakeLauncher
) -> None:
    launcher.plan = [QUICK, FAILED_UNIT]
    fleet = _web(settings, artifact, 2)
    assert sorted(m.state for m in fleet.current()) == ["failed", "ready"]


def test_replace_stops_the_old_member_once_the_new_one_is_ready(
    settings: Settings, artifact: Artifact, launcher: FakeLauncher
) -> None:
    fleet = _web(settings, artifact, 2)
    old, keep = fleet.current()
    since = datetime.now(UTC)

    (new,) = fleet.replace([Replacement(old.id, "wave-1/0")], artifact, release("web@2"), CHECKS)

    assert (new.state, new.version_ref) == ("ready", "web@2")
    assert launcher.specs[-1].release == in_guest.release_file(release("web@2"))
    assert not _alive(launcher.procs[0]) and _alive(launcher.procs[1])
    now = {m.id: (m.state, m.detail) for m in fleet.current()}
    assert now == {
        old.id: ("stopped", f"replaced by {new.id}"),
        keep.id: ("ready", "ready after 0.1s"),
        new.id: ("ready", "ready after 0.1s"),
    }
    assert [(s.member, s.kind) for s in fleet.signals(since)] == [
        (new.id, "launch"),
        (new.id, "ready"),
        (old.id, "replaced"),
    ]
    all_signals = fleet.signals(datetime(2000, 1, 1))
    assert [s.at for s in all_signals] == sorted(s.at for s in all_signals)
    assert sum(s.kind == "launch" for s in all_signals) == 3
    # One reading for the collector: the same members and signals, each console read once.
    consoles: list[str] = []
    real = fleet_judge.console_lines

    def counted(text: str) -> list[str]:
        consoles.append(text)
        return real(text)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(fleet_mod, "console_lines", counted)
        members, signals = fleet.observe(datetime(2000, 1, 1))
    assert len(consoles) == 3
    assert (members, signals) == (fleet.current(), all_signals)


def test_telemetry_records_each_member_once_and_its_stop_when_the_fleet_is_gone(
    settings: Settings, artifact: Artifact, launcher: FakeLauncher, tmp_path: Path
) -> None:
    """The collector's view of a real LocalFleet (fake QEMU): boots, outcomes, replacement, heartbeat, and a
    destroyed fleet's boots stopped; reading again changes nothing."""
    store = open_store(f"sqlite:///{tmp_path}/r.db")
    for _ in (1, 2):
        store.create_version(name="web", recipe_digest="r" * 64, recipe_path="/r.yaml", provider="local", tags={},
                             parent=None)  # fmt: skip
    launcher.plan = [[*QUICK, "AMIFORGE-HEARTBEAT 0.20"], FAILED_UNIT]
    fleet = _web(settings, artifact, 2)
    (old, _failed) = fleet.current()
    fleet.replace([Replacement(old.id, "wave-1/0")], artifact, release("web@2"), CHECKS)
    [collected] = telemetry.collect(store, settings)  # every known target: this machine's fleets
    assert (collected.target, collected.members, collected.changed, collected.error) == ("local:web", 3, 3, None)
    assert telemetry.collect(store, settings, ["web"])[0].changed == 0
    boots = {b.instance: b for b in store.boots_in_window(T0, datetime.now(UTC) + timedelta(minutes=1))}
    assert {b.instance: (b.version_ref, b.outcome) for b in boots.values()} == {
        old.id: ("web@1", "ready"),
        _failed.id: ("web@1", "failed"),
        launcher.launched[2]: ("web@2", "ready"),
    }
    assert boots[old.id].replaced and boots[old.id].stopped_at is not None
    assert boots[old.id].last_heartbeat_at == boots[old.id].launched_at + timedelta(seconds=0.2)
    destroy_fleet(settings, "web")
    [gone] = telemetry.collect(store, settings, ["local:web"])
    assert sorted(gone.stopped) == sorted([_failed.id, launcher.launched[2]])
    assert store.running_targets() == []
    store.close()


def test_logs_are_ecs_json_lines_timed_by_the_guest_uptime_and_follow_new_lines(
    settings: Settings, artifact: Artifact, launcher: FakeLauncher, tmp_path: Path
) -> None:
    store = open_store(f"sqlite:///{tmp_path}/r.db")
    for _ in (1, 2):
        store.create_version(name="web", recipe_digest="r" * 64, recipe_path="/r.yaml", provider="local", tags={},
                             parent=None)  # fmt: skip
    launcher.plan = [["[    0.000000] Linux version 6.1", "\x1b[0;32m  OK  \x1b[0m] Reached target", *QUICK[2:]]]
    fleet = _web(settings, artifact, 1)
    (member,) = fleet.current()
    lines = list(logs.console_lines(store=store, settings=settings, target="local:web"))
    assert [line.message for line in lines][:2] == ["[    0.000000] Linux version 6.1", "  OK  ] Reached target"]
    ready = next(line for line in lines if line.message.startswith("AMIFORGE-READY"))
    assert ready.at == member.launched_at + timedelta(seconds=0.1)  # launch + the uptime it printed
    doc = ready.ecs()
    assert doc["host"]["name"] == doc["cloud"]["instance"]["id"] == member.id
    assert doc["labels"] == {"image": "web", "version": "web@1", "target": "local:web"}
    assert doc["@timestamp"].endswith("Z") and doc["message"] == "AMIFORGE-READY 0.10"
    assert list(logs.console_lines(store=store, settings=settings, ref="web@2", target="local:web")) == []
    # --follow: what is printed once is not printed again; a line still being written waits until it is whole.
    console = fleet.dir / member.id / "console.log"
    polls = iter(range(3))

    def until() -> bool:
        step = next(polls, None)
        if step == 0:
            with console.open("a") as f:
                f.write("AMIFORGE-HEARTBEAT 61.00\nhalf a li")
        elif step == 1:
            with console.open("a") as f:
                f.write("ne\n")
        return step is None

    followed = list(logs.console_lines(store=store, settings=settings, target="local:web", follow=True, poll=0,
                                       until=until))  # fmt: skip
    new = [line.message for line in followed[len(lines) :]]
    assert new == ["AMIFORGE-HEARTBEAT 61.00", "half a line"]
    assert followed[-1].at == member.launched_at + timedelta(seconds=61)
    store.close()


def test_the_same_token_never_launches_twice(settings: Settings, artifact: Artifact, launcher: FakeLauncher) -> None:
    fleet = _web(settings, artifact, 2)
    old = fleet.current()[0]
    first = fleet.replace([Replacement(old.id, "wave-1/0")], artifact, release("web@2"), CHECKS)
    again = fleet.replace([Replacement(old.id, "wave-1/0")], artifact, release("web@2"), CHECKS)
    assert [m.id for m in again] == [m.id for m in first]
    assert len(launcher.launched) == 3
    with pytest.raises(StateError, match="not"):
        fleet.replace([Replacement(fleet.current()[1].id, "wave-1/0")], artifact, release("web@2"), CHECKS)
    assert len(launcher.launched) == 3


def _killed_right_after_the_start(
    fleet: LocalFleet, old: Member, artifact: Artifact, launcher: FakeLauncher, checks: Checks = CHECKS
) -> str:
    """Replace `old`, the controller killed once its guest's QEMU started and before its pid was recorded; the new
    member's id."""
    launcher.die_after_start = True
    with pytest.raises(KeyboardInterrupt):
        fleet.replace([Replacement(old.id, "wave-1/0")], artifact, release("web@2"), checks)
    launcher.die_after_start = False
    new_id = launcher.launched[-1]
    assert not (fleet.dir / new_id / "qemu.pid").exists()
    return new_id


def test_a_controller_killed_right_after_the_start_resumes_without_a_second_guest(
    web1: tuple[LocalFleet, Member], artifact: Artifact, launcher: FakeLauncher
) -> None:
    fleet, old = web1
    new_id = _killed_right_after_the_start(fleet, old, artifact, launcher)

    (new,) = fleet.replace([Replacement(old.id, "wave-1/0")], artifact, release("web@2"), CHECKS)

    assert (new.id, new.state) == (new_id, "ready")
    assert len(launcher.launched) == 2
    assert _states(fleet) == {old.id: "stopped", new_id: "ready"}


def test_a_call_with_one_token_of_another_version_launches_nothing(
    settings: Settings, artifact: Artifact, launcher: FakeLauncher
) -> None:
    fleet = _web(settings, artifact, 2)
    first, second = fleet.current()
    fleet.replace([Replacement(first.id, "wave-1/0")], artifact, release("web@2"), CHECKS)
    launched = list(launcher.launched)
    with pytest.raises(StateError, match="as web@2"):  # a new token first, then one web@2 launched already
        fleet.replace(
            [Replacement(second.id, "wave-2/0"), Replacement(first.id, "wave-1/0")], artifact, release("web@3"), CHECKS
        )
    assert launcher.launched == launched


def test_a_member_recorded_without_a_release_is_started_with_the_one_of_its_version(
    web1: tuple[LocalFleet, Member], artifact: Artifact, launcher: FakeLauncher
) -> None:
    """A member an older amiforge recorded (no release in member.json) and never started: the resumed call gives it
    the release of its own version, never another version's."""
    fleet, old = web1
    launcher.die_before_start = True
    with pytest.raises(KeyboardInterrupt):
        fleet.replace([Replacement(old.id, "wave-1/0")], artifact, release("web@2"), CHECKS)
    (new_id,) = set(_states(fleet)) - {old.id}
    record = fleet.dir / new_id / "member.json"
    record.write_text(json.dumps({k: v for k, v in json.loads(record.read_text()).items() if k != "release"}))
    launcher.die_before_start = False
    with pytest.raises(StateError):  # asked as another version: refused before anything starts
        fleet.replace([Replacement(old.id, "wave-1/0")], artifact, release("web@3"), CHECKS)
    fleet.replace([Replacement(old.id, "wave-1/0")], artifact, release("web@2"), CHECKS)
    assert launcher.specs[-1].release == in_guest.release_file(release("web@2"))
    assert fleet._record(new_id).release == in_guest.release_file(release("web@2")).decode()


def test_a_controller_killed_before_the_start_resumes_by_starting_that_member(
    web1: tuple[LocalFleet, Member], artifact: Artifact, launcher: FakeLauncher
) -> None:
    """A launch that never happened is not a failed boot of the image: the resumed controller starts it."""
    fleet, old = web1
    launcher.die_before_start = True
    with pytest.raises(KeyboardInterrupt):
        fleet.replace([Replacement(old.id, "wave-1/0")], artifact, release("web@2"), CHECKS)
    (new_id,) = set(_states(fleet)) - {old.id}
    assert not (fleet.dir / new_id / "qemu.pid").exists()
    first_launch = fleet._record(new_id).launched_at
    launcher.die_before_start = False

    (new,) = fleet.replace([Replacement(old.id, "wave-1/0")], artifact, release("web@2"), CHECKS)

    assert (new.id, new.state) == (new_id, "ready")
    assert launcher.launched == [old.id, new_id]  # started once, by the resumed call
    assert _states(fleet) == {old.id: "stopped", new_id: "ready"}
    assert new.launched_at > first_launch  # judged from its real start
    # Asked once more, the same token finds it running and starts nothing.
    assert [m.id for m in fleet.replace([Replacement(old.id, "wave-1/0")], artifact, release("web@2"), CHECKS)] == [
        new_id
    ]
    assert launcher.launched == [old.id, new_id]


def test_a_guest_that_started_and_died_before_its_pid_was_recorded_is_not_started_again(
    web1: tuple[LocalFleet, Member], artifact: Artifact, launcher: FakeLauncher
) -> None:
    fleet, old = web1
    # A guest that never gets ready (whenever the kill lands); without a pid, only its readiness deadline says it is
    # not coming: a short one.
    launcher.plan = [QUICK, BOOT]
    quick = CHECKS.model_copy(update={"ready_within": 2.0})
    new_id = _killed_right_after_the_start(fleet, old, artifact, launcher, quick)
    console = fleet.dir / new_id / "console.log"
    deadline = time.monotonic() + 10
    while not console.exists():  # QEMU makes its console file as it starts
        assert time.monotonic() < deadline
        time.sleep(0.02)
    launcher.procs[-1].kill()  # … and then dies, its pid never recorded
    launcher.procs[-1].wait()

    (new,) = fleet.replace([Replacement(old.id, "wave-1/0")], artifact, release("web@2"), quick)

    assert (new.id, new.state) == (new_id, "failed")  # its verdict stands: no second boot erases it
    assert new.detail == "not ready within 2s", new.detail
    assert launcher.launched == [old.id, new_id]
    assert console.exists()


def test_a_stopped_or_failed_launch_is_never_started_again(
    web1: tuple[LocalFleet, Member], artifact: Artifact, launcher: FakeLauncher
) -> None:
    fleet, old = web1
    launcher.plan = [QUICK, FAILED_UNIT]
    (failed,) = fleet.replace([Replacement(old.id, "wave-1/0")], artifact, release("web@2"), CHECKS)
    assert failed.state == "failed"
    (fleet.dir / failed.id / "qemu.pid").unlink()  # gone with its QEMU: only the recorded stop says why
    (again,) = fleet.replace([Replacement(old.id, "wave-1/0")], artifact, release("web@2"), CHECKS)
    assert (again.id, again.state) == (failed.id, "failed")
    assert len(launcher.launched) == 2


def test_a_failed_replacement_is_stopped_and_the_old_member_keeps_running(
    web1: tuple[LocalFleet, Member], artifact: Artifact, launcher: FakeLauncher
) -> None:
    fleet, old = web1
    launcher.plan = [QUICK, FAILED_UNIT]

    (new,) = fleet.replace([Replacement(old.id, "wave-1/0")], artifact, release("web@2"), CHECKS)

    assert (new.state, new.detail) == ("failed", "unit nginx: exit 3, expected 0: inactive")
    assert _alive(launcher.procs[0]) and not _alive(launcher.procs[1])
    now = {m.id: (m.state, m.detail) for m in fleet.current()}
    assert now == {
        old.id: ("ready", "ready after 0.1s"),
        new.id: ("stopped", "stopped: unit nginx: exit 3, expected 0: inactive"),
    }
    # Asked again (a resumed controller): the same answer, and still no second launch.
    (again,) = fleet.replace([Replacement(old.id, "wave-1/0")], artifact, release("web@2"), CHECKS)
    assert (again.id, again.state, again.detail) == (new.id, new.state, new.detail)
    assert len(launcher.launched) == 2


def test_replacing_a_member_that_is_already_gone_is_fine(
    web1: tuple[LocalFleet, Member], artifact: Artifact, launcher: FakeLauncher
) -> None:
    fleet, old = web1
    launcher.procs[0].kill()
    launcher.procs[0].wait()
    (new,) = fleet.replace([Replacement(old.id, "t")], artifact, release("web@2"), CHECKS)
    assert new.state == "ready"
    assert _states(fleet) == {old.id: "stopped", new.id: "ready"}
    kinds = [(s.member, s.kind) for s in fleet.signals(datetime(2000, 1, 1))]
    assert (old.id, "failed") in kinds and (old.id, "replaced") in kinds


def test_replace_refuses_unknown_members_before_launching_anything(
    settings: Settings, artifact: Artifact, launcher: FakeLauncher
) -> None:
    fleet = _web(settings, artifact, 1)
    with pytest.raises(NotFound, match="g-nothere"):
        fleet.replace([Replacement("g-nothere", "t")], artifact, release("web@2"), CHECKS)
    assert len(launcher.launched) == 1


def test_a_launch_that_fails_is_a_failed_member_and_no_process(
    settings: Settings, artifact: Artifact, monkeypatch: pytest.MonkeyPatch
) -> None:
    def broken(spec: qemu.GuestSpec) -> subprocess.Popen[bytes]:
        raise InfraError("qemu-img create (boot overlay) failed (exit 1)")

    monkeypatch.setattr(fleet_mod, "spawn_guest", broken)
    fleet = _web(settings, artifact, 1)
    (m,) = fleet.current()
    assert m.state == "failed"
    assert m.detail.startswith("launch failed: qemu-img create (boot overlay) failed (exit 1)\n  fix: ")


def test_an_interrupted_create_leaves_nothing(settings: Settings, artifact: Artifact, launcher: FakeLauncher) -> None:
    launcher.die_after_start = True
    with pytest.raises(KeyboardInterrupt):
        create_fleet(settings, "web", 2, artifact, release("web@1"), CHECKS)
    assert list_fleets(settings) == []
    assert not (settings.data_dir / "fleets" / "web").exists()
    launcher.procs[0].wait(timeout=10)  # its QEMU, never recorded by pid, was found and stopped


def test_destroy_stops_every_guest_even_unrecorded_ones_and_is_idempotent(
    settings: Settings, artifact: Artifact, launcher: FakeLauncher
) -> None:
    fleet = _web(settings, artifact, 2)
    stray = start_fake(fleet.dir / "g-stray" / "overlay.qcow2", fleet.dir / "stray.log", [])
    launcher.procs.append(stray)
    ids = [m.id for m in fleet.current()]

    assert sorted(destroy_fleet(settings, "web")) == sorted(ids)

    assert not fleet.dir.exists()
    for proc in launcher.procs:
        proc.wait(timeout=10)
    assert destroy_fleet(settings, "web") == []
    with pytest.raises(NotFound):
        open_fleet(settings, "web")


def test_names_sizes_and_existing_fleets_are_checked(
    settings: Settings, artifact: Artifact, launcher: FakeLauncher
) -> None:
    with pytest.raises(ConfigError):
        create_fleet(settings, "Web_1", 1, artifact, release("web@1"), CHECKS)
    with pytest.raises(ConfigError):
        create_fleet(settings, "web", 0, artifact, release("web@1"), CHECKS)
    with pytest.raises(NotFound, match="missing"):
        create_fleet(
            settings, "web", 1, Artifact("local", "local", "/nope.qcow2", "d", 0, "/k", "/i"), release("web@1"), CHECKS
        )
    create_fleet(settings, "web", 1, artifact, release("web@1"), CHECKS)
    with pytest.raises(StateError, match="exists"):
        create_fleet(settings, "web", 1, artifact, release("web@1"), CHECKS)


# --- the CLI -------------------------------------------------------------------------------------------------


@pytest.fixture
def fleet_cli(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], launcher: FakeLauncher
) -> Cli:
    for key in list(os.environ):
        if key.startswith("AMIFORGE_"):
            monkeypatch.delenv(key)
    monkeypatch.setenv("AMIFORGE_DATA_DIR", str(launcher.settings.data_dir))
    monkeypatch.setenv("AMIFORGE_ACCEL", "tcg")
    monkeypatch.chdir(tmp_path)
    return make_cli(monkeypatch, capsys)


def _seed(settings: Settings, artifact: Artifact, status: Status) -> str:
    with open_store(settings.registry_url) as store:
        v = store.create_version(
            name="web", recipe_digest="a" * 64, recipe_path="/r/web/recipe.yaml", provider="local", tags={},
            parent=None, recipe=json.dumps({"checks": CHECKS.model_dump(mode="json")}),
        )  # fmt: skip
        store.transition(v.id, Status.BUILT, expect=Status.BAKING, digest="d" * 64, size_bytes=1)
        store.add_artifact(v.id, artifact)
        if status is not Status.BUILT:
            store.transition(v.id, Status.TESTED, expect=Status.BUILT)
        return v.ref


def test_cli_create_show_list_destroy(fleet_cli: Cli, launcher: FakeLauncher, artifact: Artifact) -> None:
    ref = _seed(launcher.settings, artifact, Status.TESTED)

    created = fleet_cli("fleet", "create", "web", "--size", "2", "--version", ref, "--json")
    assert created.code == 0, created.out + created.err
    assert [m["state"] for m in created.json()["members"]] == ["ready", "ready"]

    shown = fleet_cli("fleet", "show", "web", "--json").json()
    assert [(m["version_ref"], m["time_to_ready"]) for m in shown["members"]] == [(ref, 0.1), (ref, 0.1)]
    assert shown["members"][0]["pid"] == launcher.procs[0].pid
    text = fleet_cli("fleet", "show", "web")
    assert text.code == 0 and "ready after 0.1s" in text.out and ref in text.out

    assert fleet_cli("fleet", "list", "--json").json() == [
        {"name": "web", "created": shown["created"], "members": 2, "states": {"ready": 2}, "versions": [ref]}
    ]
    destroyed = fleet_cli("fleet", "destroy", "web", "--json").json()
    assert sorted(destroyed["stopped"]) == sorted(m["id"] for m in shown["members"])
    assert fleet_cli("fleet", "destroy", "web", "--json").json() == {"fleet": "web", "existed": False, "stopped": []}
    assert fleet_cli("fleet", "show", "web").code == 3


def test_cli_create_exits_4_naming_members_that_are_not_ready(
    fleet_cli: Cli, launcher: FakeLauncher, artifact: Artifact
) -> None:
    ref = _seed(launcher.settings, artifact, Status.TESTED)
    launcher.plan = [QUICK, FAILED_UNIT]
    out = fleet_cli("fleet", "create", "web", "-n", "2", "--version", ref, "--json")
    assert out.code == 4
    assert [f["detail"] for f in out.json()["failures"]] == ["failed: unit nginx: exit 3, expected 0: inactive"]


@pytest.mark.parametrize(
    ("argv", "code", "message"),
    [
        (("--version", "web@1"), 3, "web@1 is built; only tested, scanned or signed versions can be run by a fleet"),
        ((), 2, "pass exactly one of --channel IMAGE:CHANNEL or --version NAME@N"),
        (("--channel", "web"), 2, "is not IMAGE:CHANNEL"),
        (("--channel", "web:prod"), 3, "image 'web' has no channel 'prod'"),
    ],
)
def test_cli_create_refuses_what_it_cannot_run(
    fleet_cli: Cli,
    launcher: FakeLauncher,
    artifact: Artifact,
    argv: tuple[str, ...],
    code: int,
    message: str,
) -> None:
    _seed(launcher.settings, artifact, Status.BUILT)
    out = fleet_cli("fleet", "create", "web", "--size", "1", *argv)
    assert out.code == code
    assert message in out.err
    if code == 2 and "built" in message:
        assert "amiforge test web@1" in out.err
    assert launcher.launched == []


def test_cli_create_from_a_channel(fleet_cli: Cli, launcher: FakeLauncher, artifact: Artifact) -> None:
    # Moving a channel takes the promotion gates (signed, scanned…); the pointer is faked, the version is real.
    ref = _seed(launcher.settings, artifact, Status.TESTED)
    resolved: list[str] = []

    class Pointer:
        current = ref

    def channels(self: object, name: str | None = None, channel: str | None = None) -> list[Pointer]:
        resolved.append(f"{name}:{channel}")
        return [Pointer()]

    from amiforge.store.sql import SqlStore

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(SqlStore, "channels", channels)
        out = fleet_cli("fleet", "create", "web", "--size", "1", "--channel", "web:dev", "--json")
    assert out.code == 0, out.err
    assert resolved == ["web:dev"]
    assert out.json()["members"][0]["version_ref"] == ref


# --- as the rollout controller finds it ---------------------------------------------------------------------


def test_the_local_provider_serves_its_fleets_to_the_rollout_controller(
    settings: Settings, artifact: Artifact, launcher: FakeLauncher
) -> None:
    from amiforge.lifecycle.controller import fleet_of
    from amiforge.providers.interface import FleetProvider
    from amiforge.providers.local.provider import LocalProvider

    assert isinstance(LocalProvider(settings), FleetProvider)
    with pytest.raises(NotFound, match="no fleet 'web'"):
        fleet_of("local:web", settings)
    _web(settings, artifact, 1)
    fleet, provider, region = fleet_of("local:web", settings)
    assert (fleet.target, provider, region) == ("web", "local", "local")
    assert [m.state for m in fleet.current()] == ["ready"]
    assert fleet.alarms_firing([]) == []
    with pytest.raises(ConfigError, match="no alarms"):
        fleet.alarms_firing(["web-5xx"])
