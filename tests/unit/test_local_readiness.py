"""The local boot test's readiness wait (qemu.Guest.wait_for with guest.READY_LINE_RE): a readiness line counts once
QEMU has written it whole, and a line QEMU was cut off in the middle of (it exited while writing `AMIFORGE-READY 1` of
`AMIFORGE-READY 150`) never does. A shell stands in for QEMU: the console is its stdout either way."""

from __future__ import annotations

import shlex
from pathlib import Path

import pytest

from amiforge.providers import guest as in_guest
from amiforge.providers.local import qemu


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
