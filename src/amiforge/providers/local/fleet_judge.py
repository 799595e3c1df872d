"""Judging a fleet member from its files alone (pure): its state now and every signal it has given, from its record,
its console and whether its QEMU runs. Readiness is what the console says (providers/guest.py frames it)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Literal

from amiforge.providers import guest as in_guest
from amiforge.providers.interface import BootSignal, Member, MemberState
from amiforge.providers.local import qemu
from amiforge.providers.local.fleet_files import MemberFile

# Guest uptime starts a little after the launch (QEMU start, firmware): a READY with an uptime within the limit
# may still be on its way this long after launch + limit, and must not flip a member from failed to ready.
READY_SLACK = 5.0


def console_lines(text: str) -> list[str]:
    """Complete lines only: QEMU may be half-way through writing the last one (`AMIFORGE-READY 1` of `12.3`)."""
    return [line.rstrip("\r") for line in text.split("\n")[:-1]]


def checks_grace(checks: Sequence[in_guest.GuestCheck]) -> float:
    """How long after READY the in-guest checks may take to report, as the boot test allows them."""
    return qemu.CHECKS_GRACE + in_guest.COMMAND_TIMEOUT * len(checks)


@dataclass(frozen=True)
class Outcome:
    state: Literal["ready", "failed"]
    detail: str
    at: datetime
    timed_out: bool = False  # failed because READY never came within the limit


def outcome_of(rec: MemberFile, lines: Sequence[str], ttr: float | None, horizon: datetime) -> Outcome | None:
    """Ready or failed as the console and the clock say (None: still launching at `horizon`)."""
    launched = rec.launched_at
    if rec.launch_error is not None:
        return Outcome("failed", f"launch failed: {rec.launch_error}", launched)
    if ttr is None:
        limit = launched + timedelta(seconds=rec.ready_within + READY_SLACK)
        if horizon >= limit:
            return Outcome("failed", f"not ready within {rec.ready_within:.0f}s", limit, timed_out=True)
        return None
    ready_at = launched + timedelta(seconds=ttr)
    if ttr > rec.ready_within:
        return Outcome("failed", f"ready only after {ttr:.1f}s (limit {rec.ready_within:.0f}s)", ready_at, True)
    # The checks report after the first print, whole or not (the copies come once they are done).
    after = next(i for i, line in enumerate(lines) if in_guest.READY_RE.search(line))
    if not any(in_guest.DONE_MARK in line for line in lines[after:]):
        limit = ready_at + timedelta(seconds=checks_grace(rec.checks))
        if horizon >= limit:
            return Outcome("failed", "the in-guest checks did not finish", limit)
        return None
    failed = [r for r in in_guest.guest_results(rec.checks, lines) if not r.passed]
    if failed:
        return Outcome("failed", "; ".join(f"{r.name}: {r.detail}" for r in failed), ready_at)
    return Outcome("ready", f"ready after {ttr:.1f}s", ready_at)


def ready_uptime(lines: Sequence[str]) -> float | None:
    """The uptime on the first whole readiness line. The unit prints it again later with the same uptime, so the
    first counts and the copies change nothing; a line another writer broke into (the kernel prints to the serial
    port directly: `AMIFORGE-READY 1[   13.0] ...` of 12.50) is not one, and the next copy stands in for it."""
    for line in lines:
        m = in_guest.READY_LINE_RE.search(line + "\n")
        if m:
            return float(m.group(1))
    return None


def last_heartbeat(lines: Sequence[str]) -> float | None:
    """The uptime on the last whole heartbeat line (amiforge-heartbeat.service), or None if none was heard."""
    for line in reversed(lines):
        m = in_guest.HEARTBEAT_RE.search(line)
        if m:
            return float(m.group(1))
    return None


def assess(
    rec: MemberFile,
    lines: Sequence[str],
    *,
    running: bool,
    now: datetime,
    exited_at: datetime | None = None,
    exit_detail: str = "QEMU exited",
) -> tuple[Member, list[BootSignal]]:
    """A member's state now and every signal it has given, from its record, its console and whether its QEMU
    runs. Times come from the record and the console (launch + uptime at READY), so they read the same every
    time; only a QEMU exit has no time of its own: `exited_at` is when it was first seen (default: now)."""
    ref = rec.version_ref
    ttr = ready_uptime(lines)
    signals = [BootSignal(rec.id, "launch", rec.launched_at, ref)]
    # Nothing more happens to a member once it is stopped on purpose or its QEMU is gone, so its clock stops
    # there: a guest stopped while it booted did not fail to boot, one that died was not merely slow.
    gone_at = None if running else (exited_at or now)
    horizon = min(t for t in (now, rec.stopped_at, gone_at) if t is not None)
    outcome = outcome_of(rec, lines, ttr, horizon)
    # What a failure leaves to read: the console's last lines (the on-call dashboard shows them per version).
    tail = in_guest.console_tail(lines)
    if outcome is not None:
        signals.append(BootSignal(rec.id, outcome.state, outcome.at, ref, ttr, outcome.detail, outcome.timed_out,
                                  console_tail=tail if outcome.state == "failed" else ()))  # fmt: skip
    crashed = gone_at is not None and (rec.stopped_at is None or gone_at < rec.stopped_at)
    if crashed and gone_at is not None and (outcome is None or outcome.state == "ready"):
        signals.append(BootSignal(rec.id, "failed", gone_at, ref, ttr, exit_detail, console_tail=tail))
        outcome = Outcome("failed", exit_detail, gone_at)
    beat = last_heartbeat(lines)
    if beat is not None:
        signals.append(BootSignal(rec.id, "heartbeat", rec.launched_at + timedelta(seconds=beat), ref, ttr))
    timeline = in_guest.boot_timing(lines)
    if timeline is not None and ttr is not None:  # printed right after READY: timed by it
        at = rec.launched_at + timedelta(seconds=ttr)
        signals.append(BootSignal(rec.id, "timing", at, ref, ttr, timeline=timeline))
    state: MemberState
    if rec.stopped_at is not None:
        state, detail = "stopped", rec.stop_reason + ("; QEMU is still running" if running else "")
        if rec.stop_cause == "replaced":
            signals.append(BootSignal(rec.id, "replaced", rec.stopped_at, ref, ttr, rec.stop_reason))
    elif outcome is not None:
        state, detail = outcome.state, outcome.detail
    else:
        waited = (now - rec.launched_at).total_seconds()
        state = "launching"
        detail = f"booting ({waited:.0f}s of {rec.ready_within:.0f}s)" if ttr is None else "running the checks"
    return Member(rec.id, ref, rec.location, state, rec.launched_at, ttr, detail), signals
