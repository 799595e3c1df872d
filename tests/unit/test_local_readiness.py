"""The local boot test's readiness wait (qemu.Guest.wait_for with guest.READY_LINE_RE): a readiness line counts once
QEMU has written it whole, and a line QEMU was cut off in the middle of (it exited while writing `AMIFORGE-READY 1` of
`AMIFORGE-READY 150`) never does. A shell stands in for QEMU: the console is its stdout either way."""

from __future__ import annotations

import shlex
from datetime import UTC, datetime
from pathlib import Path

import pytest

from amiforge.errors import InfraError
from amiforge.model import Artifact, BootReport
from amiforge.providers import guest as in_guest
from amiforge.providers.interface import Cleanups, Release, RunContext
from amiforge.providers.local import provider as local_provider
from amiforge.providers.local import qemu
from amiforge.providers.local.provider import LocalProvider
from amiforge.recipe import Checks
from amiforge.recipe.provider_specs import LocalProvider as LocalSpec
from amiforge.settings import Settings


def _guest(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, console: str) -> qemu.Guest:
    """A Guest whose "QEMU" prints `console` (exactly, newlines and all) and exits."""
    monkeypatch.setattr(qemu, "prepare", lambda spec: None)  # no overlay to make for a shell
    monkeypatch.setattr(qemu.GuestSpec, "command", lambda self: ["sh", "-c", f"printf %s {shlex.quote(console)}"])
    return qemu.Guest(
        qemu.GuestSpec(disk=tmp_path / "d", kernel=tmp_path / "k", initrd=tmp_path / "i", workdir=tmp_path)
    )


def test_a_whole_readiness_line_is_found(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    with _guest(tmp_path, monkeypatch, "booting\r\nAMIFORGE-READY 12.5\r\nmore\n") as guest:
        found = guest.wait_for(in_guest.READY_LINE_RE, 10)
    assert found is not None and found[1] == "AMIFORGE-READY 12.5"


def test_a_readiness_line_qemu_was_cut_off_in_does_not_count(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    with _guest(tmp_path, monkeypatch, "booting\nAMIFORGE-READY 1") as guest:
        assert guest.wait_for(in_guest.READY_LINE_RE, 10) is None
        assert guest.lines() == ["booting", "AMIFORGE-READY 1"]  # the console keeps it, as printed
        assert guest.wait_for("AMIFORGE-READY", 10) is not None  # a plain mark is still found in it


def _boot_test(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    consoles: list[str],
    log: list[str],
    release: Release | None = None,
    specs: list[qemu.GuestSpec] | None = None,
    silent_after: float = 2.0,
) -> BootReport:
    """LocalProvider.boot_test where each "QEMU" start prints the next of `consoles`, then keeps running; each
    guest's spec goes to `specs`."""
    starts = iter(consoles)
    seen: list[qemu.GuestSpec] = specs if specs is not None else []

    def command(spec: qemu.GuestSpec) -> list[str]:
        seen.append(spec)
        return ["sh", "-c", f"printf %s {shlex.quote(next(starts))}; exec sleep 300"]

    monkeypatch.setattr(qemu, "prepare", lambda spec: None)
    monkeypatch.setattr(qemu, "choose_accel", lambda *_a: ("tcg", "test"))
    monkeypatch.setattr(local_provider, "require", lambda _tool: None)
    monkeypatch.setattr(local_provider, "SILENT_AFTER", silent_after)  # by default, retried after 2 s, not 30
    monkeypatch.setattr(qemu.GuestSpec, "command", command)
    artifact = Artifact(
        provider="local", region="local", location=str(tmp_path / "d"), digest="sha256:x", size_bytes=0,
        kernel=str(tmp_path / "k"), initrd=str(tmp_path / "i"),
    )  # fmt: skip
    checks = Checks.model_validate({"ready_within": "2s"})
    with Cleanups() as stack:
        ctx = RunContext(run_id="TEST-0001", cleanup=stack, log=log.append, release=release)
        return LocalProvider(Settings(data_dir=tmp_path / "data")).boot_test(
            artifact, checks, ctx, LocalSpec(type="local")
        )


def test_a_silent_qemu_is_booted_again_and_twice_silent_is_an_error_not_a_verdict(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A VM that prints nothing at all for the whole wait never started: that is the host's failure, not the image's.
    One more boot; a second silent one is a retryable InfraError, so the version is not judged failed."""
    log: list[str] = []
    with pytest.raises(InfraError) as error:
        _boot_test(tmp_path, monkeypatch, ["", ""], log)
    assert error.value.retryable and "printed nothing" in error.value.message
    assert [line for line in log if "printed nothing" in line] == [
        "QEMU printed nothing in 2s (attempt 1)",
        "QEMU printed nothing in 2s (attempt 2)",
    ]
    # Silent once, then a guest that boots: the second boot's report, ready.
    boots = "booting\nAMIFORGE-READY 0.5\nAMIFORGE-CHECKS-DONE\n"
    report = _boot_test(tmp_path, monkeypatch, ["", boots], [])
    assert report.time_to_ready is not None and report.checks[0].passed
    # A guest that prints but never becomes ready is the image's verdict, at once (no second boot).
    log.clear()
    report = _boot_test(
        tmp_path, monkeypatch, ["booting\n", "booting\nAMIFORGE-READY 0.5\nAMIFORGE-CHECKS-DONE\n"], log
    )
    assert report.time_to_ready is None and report.checks[0].detail == "not ready within 2s"
    assert not [line for line in log if "printed nothing" in line]
    # A wait shorter than SILENT_AFTER may end before the kernel's first line: silence then is the verdict, once.
    report = _boot_test(tmp_path, monkeypatch, ["", boots], log, silent_after=30.0)
    assert report.time_to_ready is None and report.checks[0].detail == "not ready within 2s"
    assert not [line for line in log if "printed nothing" in line]


def test_the_booted_guest_is_given_the_release_of_the_version_by_fw_cfg(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    release = Release("web", "web@3", "ab" * 32, datetime(2026, 1, 2, tzinfo=UTC), "sha256:x")
    specs: list[qemu.GuestSpec] = []
    report = _boot_test(tmp_path, monkeypatch, ["AMIFORGE-READY 3.0\nAMIFORGE-CHECKS-DONE\n"], [], release, specs)
    assert report.passed
    assert [spec.release for spec in specs] == [in_guest.release_file(release)]


def test_fw_cfg_and_disk_paths_survive_a_comma(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """QEMU reads `a,b` in an option's value as the end of the value and another option; `a,,b` is the comma."""
    monkeypatch.setattr(qemu, "require", lambda tool: f"/usr/bin/{tool}")
    workdir = tmp_path / "data,1"
    spec = qemu.GuestSpec(
        disk=tmp_path / "d", kernel=tmp_path / "k", initrd=tmp_path / "i", workdir=workdir,
        checks_script="true\n", release=b"AMIFORGE_VERSION=web@3\n",
    )  # fmt: skip
    argv = spec.command()
    doubled = str(workdir).replace(",", ",,")
    assert argv[argv.index("-drive") + 1].startswith(f"file={doubled}/overlay.qcow2,format=qcow2,")
    fw_cfg = [argv[i + 1] for i, a in enumerate(argv) if a == "-fw_cfg"]
    assert fw_cfg == [
        f"name=opt/amiforge/checks,file={doubled}/checks.sh",
        f"name=opt/amiforge/release,file={doubled}/release",
    ]
    without = qemu.GuestSpec(disk=tmp_path / "d", kernel=tmp_path / "k", initrd=tmp_path / "i", workdir=workdir)
    assert "-fw_cfg" not in without.command()  # nothing to pass: no entry
