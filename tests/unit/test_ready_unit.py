"""The readiness script and units baked into every image (providers/guest_files/): the line is printed once, recorded,
and printed again with the same uptime by amiforge-ready-repeat.service, so a console kept as a window of its last
bytes (EC2's 64 KB) still holds it. The script runs here on a fake console (a file), with `modprobe` stubbed out; the
units are checked with systemd-analyze verify, and both providers must install every unit.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import time
from collections.abc import Iterator
from datetime import UTC, datetime
from importlib import resources
from pathlib import Path

import pytest

from amiforge.providers import guest as in_guest
from amiforge.providers.aws import bake as aws_bake
from amiforge.providers.interface import Release
from amiforge.providers.local import base
from tests.conftest import required_or_skip

SCRIPT_PATH = "/usr/local/lib/amiforge/ready"  # where both providers install the script
DONE = f"\n{in_guest.DONE_MARK}\n"


@pytest.fixture
def script(tmp_path: Path) -> Path:
    path = tmp_path / "ready"
    path.write_bytes(in_guest.guest_file("ready"))
    path.chmod(0o755)
    return path


def _env(tmp_path: Path, **extra: str) -> dict[str, str]:
    """The script's environment: a fake console and record, and a `modprobe` that does nothing (tests run as root
    here: the real one would load a module into this machine's kernel); a test may put its own stub first."""
    stubs = tmp_path / "stubs"
    stubs.mkdir(exist_ok=True)
    # `systemctl` too: on a machine booted with systemd the real one would answer for the host, not a guest.
    for stub in ("modprobe", "systemctl"):
        if not (stubs / stub).exists():
            (stubs / stub).write_text("#!/bin/sh\nexit 1\n")
            (stubs / stub).chmod(0o755)
    return {
        "PATH": f"{stubs}:{os.environ['PATH']}",
        "AMIFORGE_CONSOLE": str(tmp_path / "console"),
        "AMIFORGE_READY_FILE": str(tmp_path / "amiforge-ready"),
        **extra,
    }


def _run(script: Path, env: dict[str, str], *args: str) -> None:
    subprocess.run([str(script), *args], env=env, check=True, timeout=30, capture_output=True)


def test_the_line_is_printed_again_with_the_uptime_first_measured(script: Path, tmp_path: Path) -> None:
    env = _env(tmp_path, AMIFORGE_READY_EVERY="0.05", AMIFORGE_READY_TIMES="3")
    _run(script, env)
    record = (tmp_path / "amiforge-ready").read_text()
    found = in_guest.READY_LINE_RE.fullmatch(record)
    assert found is not None, record
    first = f"\n{record}"
    assert (tmp_path / "console").read_text() == first + DONE

    time.sleep(0.05)  # the uptime has moved on (/proc/uptime counts hundredths): a copy re-measured would differ
    _run(script, env, "repeat")
    assert (tmp_path / "console").read_text() == first + DONE + first * 3


def test_without_a_recorded_line_nothing_is_repeated(script: Path, tmp_path: Path) -> None:
    env = _env(tmp_path, AMIFORGE_READY_EVERY="0", AMIFORGE_READY_TIMES="3")
    _run(script, env, "repeat")
    (tmp_path / "amiforge-ready").write_text("garbage\n")  # not a readiness line: never printed as one
    _run(script, env, "repeat")
    assert not (tmp_path / "console").exists()


def test_the_heartbeat_beats_with_the_uptime_of_each_beat(script: Path, tmp_path: Path) -> None:
    env = _env(tmp_path, AMIFORGE_HEARTBEAT_EVERY="0.05", AMIFORGE_HEARTBEAT_TIMES="3")
    _run(script, env, "heartbeat")
    lines = [line for line in (tmp_path / "console").read_text().split("\n") if line]
    uptimes = []
    for line in lines:
        found = in_guest.HEARTBEAT_RE.fullmatch(line)
        assert found is not None, line
        uptimes.append(float(found.group(1)))
    assert len(uptimes) == 3 and uptimes == sorted(uptimes) and uptimes[0] < uptimes[-1]  # measured at each beat
    assert not (tmp_path / "amiforge-ready").exists()  # it beats; it says nothing about readiness


@pytest.fixture
def repeating(script: Path, tmp_path: Path) -> Iterator[subprocess.Popen[bytes]]:
    """`ready repeat` running in its own session, as systemd starts a service, printing every 0.2 s, 5 times."""
    (tmp_path / "amiforge-ready").write_text("AMIFORGE-READY 12.34\n")
    env = _env(tmp_path, AMIFORGE_READY_EVERY="0.2", AMIFORGE_READY_TIMES="5")
    proc = subprocess.Popen([str(script), "repeat"], env=env, start_new_session=True)
    yield proc
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()


def _copies(tmp_path: Path) -> int:
    console = tmp_path / "console"
    return console.read_text().count("\nAMIFORGE-READY 12.34\n") if console.exists() else 0


def test_the_getty_hanging_up_the_console_does_not_end_the_repeats(
    repeating: subprocess.Popen[bytes], tmp_path: Path
) -> None:
    """The serial getty hangs the console up when it starts (TTYVHangup=yes): a service that has it as its
    controlling terminal gets SIGHUP, which must not end the repeats."""
    deadline = time.monotonic() + 10
    while _copies(tmp_path) == 0 and time.monotonic() < deadline:
        time.sleep(0.02)
    repeating.send_signal(signal.SIGHUP)
    assert repeating.wait(timeout=10) == 0
    assert _copies(tmp_path) == 5


def test_stopping_the_repeats_ends_them_at_once(repeating: subprocess.Popen[bytes]) -> None:
    """Shutdown (the bake stops its builder, a fleet member is terminated) is never held up: systemd's SIGTERM to
    the service's processes ends the loop and its sleep at once."""
    time.sleep(0.1)
    os.killpg(repeating.pid, signal.SIGTERM)
    assert repeating.wait(timeout=2) == -signal.SIGTERM


# --- the units ----------------------------------------------------------------------------------------------


def _unit(name: str) -> dict[str, list[str]]:
    """A unit file's `Section.Key` entries, each with its values in order (a key may repeat)."""
    entries: dict[str, list[str]] = {}
    section = ""
    for raw in in_guest.guest_file(name).decode().splitlines():
        line = raw.strip()
        if line.startswith("[") and line.endswith("]"):
            section = line[1:-1]
        elif line and not line.startswith(("#", ";")):
            key, _, value = line.partition("=")
            entries.setdefault(f"{section}.{key.strip()}", []).append(value.strip())
    return entries


def _guest_units() -> list[str]:
    folder = resources.files("amiforge.providers.guest_files")
    return sorted(f.name for f in folder.iterdir() if f.name.endswith(".service"))


def test_the_ready_unit_starts_the_repeat_after_itself() -> None:
    ready, repeat = _unit("amiforge-ready.service"), _unit("amiforge-ready-repeat.service")
    assert ready["Unit.Wants"] == ["amiforge-ready-repeat.service amiforge-heartbeat.service"]
    assert ready["Service.ExecStart"] == [SCRIPT_PATH]
    # After the ready unit, a oneshot whose start ends once the checks reported: copies never land among results.
    assert repeat["Unit.After"] == ["amiforge-ready.service"]
    assert repeat["Service.ExecStart"] == [f"{SCRIPT_PATH} repeat"]
    assert repeat["Service.Type"] == ["exec"]  # started, not waited for: nothing is ordered behind it
    assert "Install.WantedBy" not in repeat  # started only by the ready unit, so only where readiness is


def test_the_ready_unit_starts_the_heartbeat_after_itself_for_good() -> None:
    ready, beat = _unit("amiforge-ready.service"), _unit("amiforge-heartbeat.service")
    assert "amiforge-heartbeat.service" in ready["Unit.Wants"][0].split()
    assert beat["Unit.After"] == ["amiforge-ready.service"]  # never among the check results
    assert beat["Service.ExecStart"] == [f"{SCRIPT_PATH} heartbeat"]
    assert beat["Service.Restart"] == ["always"] and "Install.WantedBy" not in beat


def test_the_release_unit_runs_before_services_start_and_only_where_a_local_base_enables_it() -> None:
    unit = _unit("amiforge-release.service")
    assert unit["Service.ExecStart"] == [f"{SCRIPT_PATH} release"]
    # Early: without the default dependencies (after sysinit.target) and before basic.target, which every
    # service with the default dependencies comes after.
    assert unit["Unit.DefaultDependencies"] == ["no"]
    assert unit["Unit.After"] == ["local-fs.target"]  # / is read-write by then (and the modules are there)
    assert unit["Unit.Before"] == ["basic.target shutdown.target"] and unit["Unit.Conflicts"] == ["shutdown.target"]
    assert unit["Install.WantedBy"] == ["basic.target"]
    assert "amiforge-release.service" not in {name for name, _, _ in aws_bake._READY_FILES}  # an AMI has its file


def _release_env(tmp_path: Path, passed: bytes | None) -> dict[str, str]:
    """The environment of `ready release`: a fw_cfg folder holding `passed` (None: the host passed nothing)."""
    fw_cfg = tmp_path / "fw_cfg"
    if passed is not None:
        (fw_cfg / "release").mkdir(parents=True)
        (fw_cfg / "release" / "raw").write_bytes(passed)
    return _env(tmp_path, AMIFORGE_FW_CFG=str(fw_cfg), AMIFORGE_RELEASE=str(tmp_path / "etc/amiforge/release"))


RELEASE = in_guest.release_file(
    Release("web", "web@7", "ab" * 32, datetime(2026, 1, 2, 3, 4, 5, tzinfo=UTC), "sha256:" + "cd" * 32)
)


def test_a_release_refuses_what_the_file_could_not_hold_plainly() -> None:
    at = datetime(2026, 1, 2, tzinfo=UTC)
    with pytest.raises(ValueError, match="image"):
        Release("web;reboot", "web@1", "ab" * 32, at)
    with pytest.raises(ValueError, match="digest"):
        Release("web", "web@1", "ab" * 32, at, "sha256 $(id)")
    with pytest.raises(ValueError, match="timezone"):
        Release("web", "web@1", "ab" * 32, datetime(2026, 1, 2))


def test_the_release_the_host_passed_becomes_the_release_file(script: Path, tmp_path: Path) -> None:
    env = _release_env(tmp_path, RELEASE)
    _run(script, env, "release")
    installed = tmp_path / "etc/amiforge/release"
    assert installed.read_bytes() == RELEASE
    assert installed.stat().st_mode & 0o777 == 0o644
    assert sorted(p.name for p in installed.parent.iterdir()) == ["release"]  # no temporary file stays
    fields = dict(line.split("=", 1) for line in RELEASE.decode().splitlines()[1:])
    assert fields == {
        "AMIFORGE_IMAGE": "web",
        "AMIFORGE_VERSION": "web@7",
        "AMIFORGE_DIGEST": "sha256:" + "cd" * 32,
        "AMIFORGE_RECIPE_DIGEST": "ab" * 32,
        "AMIFORGE_BUILT_AT": "2026-01-02T03:04:05Z",
    }


@pytest.mark.parametrize(
    "passed",
    [None, b"", b"not a release\n", b"AMIFORGE_VERSION=web@1\nreboot\n", b"AMIFORGE_VERSION=$(reboot)\n"],
    ids=["nothing", "empty", "garbled", "a-command-besides", "a-substitution"],
)
def test_without_a_release_from_the_host_the_file_is_left_as_it_is(
    script: Path, tmp_path: Path, passed: bytes | None
) -> None:
    env = _release_env(tmp_path, passed)
    baked = tmp_path / "etc/amiforge/release"  # an AMI's, written by its bake
    baked.parent.mkdir(parents=True)
    baked.write_bytes(b"AMIFORGE_VERSION=web@3\n")
    done = subprocess.run([str(script), "release"], env=env, timeout=30, capture_output=True, text=True, check=False)
    # Nothing passed: not an error (an AMI). Something that is not a release file: the unit fails, visibly.
    assert done.returncode == (0 if passed is None else 1)
    assert "is left as it is" in done.stderr
    assert baked.read_bytes() == b"AMIFORGE_VERSION=web@3\n"
    assert sorted(p.name for p in baked.parent.iterdir()) == ["release"]


def test_the_release_replaces_a_link_and_never_writes_through_one(script: Path, tmp_path: Path) -> None:
    env = _release_env(tmp_path, RELEASE)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.write_bytes(b"secret\n")
    elsewhere.chmod(0o600)
    installed = tmp_path / "etc/amiforge/release"
    installed.parent.mkdir(parents=True)
    installed.symlink_to(elsewhere)
    _run(script, env, "release")
    assert not installed.is_symlink() and installed.read_bytes() == RELEASE
    assert elsewhere.read_bytes() == b"secret\n" and elsewhere.stat().st_mode & 0o777 == 0o600
    # A link to a folder: replaced too, nothing put into the folder.
    folder = tmp_path / "folder"
    folder.mkdir()
    installed.unlink()
    installed.symlink_to(folder)
    _run(script, env, "release")
    assert not installed.is_symlink() and installed.read_bytes() == RELEASE and list(folder.iterdir()) == []


def test_the_checks_the_host_passed_run_after_the_line(script: Path, tmp_path: Path) -> None:
    fw_cfg = tmp_path / "fw_cfg"
    (fw_cfg / "checks").mkdir(parents=True)
    (fw_cfg / "checks" / "raw").write_text("echo checked-here\n")
    _run(script, _env(tmp_path, AMIFORGE_FW_CFG=str(fw_cfg)))
    console = (tmp_path / "console").read_text()
    record = (tmp_path / "amiforge-ready").read_text()
    assert console == f"\n{record}checked-here\n{DONE}"


def test_both_providers_install_every_unit_and_the_script() -> None:
    units = _guest_units()
    assert "amiforge-ready-repeat.service" in units
    assert sorted(base.GUEST_UNITS) == units  # the local base installs each (and its key hashes each)
    assert set(base.GUEST_FILES) >= {*units, "ready"}
    readiness = [u for u in units if u.startswith(("amiforge-ready", "amiforge-heartbeat"))]
    installed = {name: dest for name, dest, _ in aws_bake._READY_FILES}
    assert installed == {"ready": SCRIPT_PATH, **{u: f"/etc/systemd/system/{u}" for u in readiness}}


def test_systemd_analyze_verify_accepts_the_units(script: Path, tmp_path: Path) -> None:
    analyze = shutil.which("systemd-analyze")
    required_or_skip(analyze is not None, "systemd-analyze is missing", "apt-get install systemd")
    assert analyze is not None
    units = tmp_path / "units"
    units.mkdir()
    names = [u for u in _guest_units() if u.startswith(("amiforge-ready", "amiforge-heartbeat", "amiforge-release"))]
    for name in names:  # the script where this machine has it: verify checks that ExecStart can run
        text = in_guest.guest_file(name).decode().replace(SCRIPT_PATH, str(script))
        (units / name).write_text(text)
    done = subprocess.run(
        [analyze, "verify", "--man=no", *(str(units / n) for n in names)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    # verify exits 0 on an unknown key or section, but says so: any word from it is a finding
    assert (done.returncode, done.stdout + done.stderr) == (0, "")


# What systemd 252 (Debian 12) answers: the manager's timestamps, multi-user.target's, and every unit's, blocks
# separated by blank lines (monotonic microseconds; 0 where a unit never started).
FAKE_SYSTEMCTL = r"""#!/bin/sh
case "$*" in
  "show -p UserspaceTimestampMonotonic --value") echo 2104332 ;;
  "show -p ActiveEnterTimestampMonotonic --value multi-user.target") echo 56998210 ;;
  "show -p Id -p InactiveExitTimestampMonotonic -p ActiveEnterTimestampMonotonic *")
    printf 'Id=nginx.service\nInactiveExitTimestampMonotonic=9100000\nActiveEnterTimestampMonotonic=9630500\n\n'
    printf 'Id=slow-start.service\nInactiveExitTimestampMonotonic=11000000\nActiveEnterTimestampMonotonic=56012345\n\n'
    printf 'Id=never.service\nInactiveExitTimestampMonotonic=0\nActiveEnterTimestampMonotonic=0\n\n'
    printf 'Id=ssh.service\nInactiveExitTimestampMonotonic=9000000\nActiveEnterTimestampMonotonic=9311000\n\n'
    printf 'Id=journald.service\nInactiveExitTimestampMonotonic=2500000\nActiveEnterTimestampMonotonic=2700000\n' ;;
  *) exit 1 ;;
esac
"""


def test_the_boot_timing_follows_the_readiness_line_and_reads_back(script: Path, tmp_path: Path) -> None:
    stubs = tmp_path / "stubs"
    stubs.mkdir()
    (stubs / "systemctl").write_text(FAKE_SYSTEMCTL)
    (stubs / "systemctl").chmod(0o755)
    _run(script, _env(tmp_path))
    lines = (tmp_path / "console").read_text().splitlines()
    ready = next(i for i, line in enumerate(lines) if in_guest.READY_RE.search(line))
    assert lines[ready + 2] == (
        "AMIFORGE-TIMING kernel=2.104 userspace=54.894 slow-start.service/45.012 nginx.service/0.530 ssh.service/0.311"
    )
    assert in_guest.boot_timing(lines) == {
        "kernel": 2.104, "userspace": 54.894, "slow-start.service": 45.012, "nginx.service": 0.53,
        "ssh.service": 0.311,
    }  # fmt: skip


def test_no_timing_is_printed_where_systemd_cannot_say(script: Path, tmp_path: Path) -> None:
    _run(script, _env(tmp_path))  # the stub systemctl fails, as on a machine systemd did not boot
    assert "AMIFORGE-TIMING" not in (tmp_path / "console").read_text()


@pytest.mark.parametrize(
    "line",
    [
        "AMIFORGE-TIMING kernel=2.1[   13.000] random: crng init done",  # broken into by the kernel
        "AMIFORGE-TIMING kernel=2.104 userspace=5",  # cut off
        "AMIFORGE-TIMING kernel=2.104 userspace=5.000 a/1.0 b/1.0 c/1.0 d/1.0",  # more than three units
    ],
)
def test_a_broken_timing_line_is_not_read(line: str) -> None:
    assert in_guest.boot_timing([line]) is None


def test_a_console_tail_is_the_last_lines_worth_reading() -> None:
    lines = ["early", "\x1b[0;32m[  OK  ]\x1b[0m Started nginx.", "", "AMIFORGE-RESULT 0 0 YWN0aXZl",
             "AMIFORGE-HEARTBEAT 61.0", "x" * 300, "AMIFORGE-READY 12.5", "AMIFORGE-CHECKS-DONE", "  ", "the last",
             "AMIFORGE-CLOUDWATCH Heartbeat not reported: no instance metadata token (IMDSv2)"]  # fmt: skip
    assert in_guest.console_tail(lines, 3) == ("[  OK  ] Started nginx.", "x" * 200, "the last")
    assert in_guest.console_tail([]) == ()
