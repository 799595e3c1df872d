"""Local fleets: named sets of long-running QEMU guests booted from local image versions.

Its files are described in fleet_files.py; a member is judged from them by fleet_judge.py, and its QEMU found and
stopped by guest_processes.py.

Lifecycle of a member: recorded (member.json is written before QEMU starts, so no guest ever runs unrecorded) →
launching (QEMU runs detached: its own session, stdin /dev/null, console to a file, so it outlives the CLI that
started it) → ready (READY on the console within the deadline and every in-guest check passed) or failed (a check
failed, not ready in time, QEMU exited) → stopped (on purpose: replaced by a ready member, a failed replacement).

State is derived each time from member.json, the console file and /proc (`current()`, `signals()`); a recorded
pid counts only while /proc/PID/cmdline is our QEMU on that member's overlay (pids get reused). Readiness is what
the console says: the recipe's port checks (HTTP, TCP) are not run against members, but their ports are forwarded
to 127.0.0.1 (member.json `forwards`, `fleet show`) for whoever wants to reach a member.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import re
import secrets
import shutil
import tempfile
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from dataclasses import replace as evolve
from datetime import UTC, datetime
from pathlib import Path

from amiforge.errors import AmiforgeError, ConfigError, InfraError, NotFound, StateError
from amiforge.model import IMAGE_NAME_PATTERN, Artifact
from amiforge.providers import guest as in_guest
from amiforge.providers.interface import (
    BootSignal,
    FleetDetail,
    Member,
    MemberDetail,
    PhaseUpdate,
    Release,
    Replacement,
)
from amiforge.providers.local import qemu
from amiforge.providers.local.fleet_files import FleetFile, MemberFile, StopCause, load_state
from amiforge.providers.local.fleet_judge import assess, checks_grace, console_lines
from amiforge.providers.local.guest_processes import (
    CHILDREN,
    end_guests,
    find_guests,
    first_seen,
    last_line,
    qemu_args,
    runs_disk,
    seen_at,
    spawn_guest,
)
from amiforge.providers.local.tools import write_atomic
from amiforge.recipe import Checks
from amiforge.settings import Settings

# Guests booting at once: on 2 cores, 2–3 concurrent TCG boots use the CPU fully and more only stretch every
# boot out (notes/local-backend.md §10); an idle guest costs ~5 % of a core, so only booting ones count.
MAX_BOOTING = 2
POLL_SECONDS = 0.5
# A member recorded this long ago with neither a pid file nor a process never got its QEMU (its launcher died).
START_GRACE = 30.0
NAME_RE = re.compile(f"^{IMAGE_NAME_PATTERN}$")  # fleets are named like images


@dataclass(frozen=True)
class MemberStatus:
    """A member as `fleet show` prints it: the protocol's view plus where to reach it."""

    member: Member
    signals: list[BootSignal]
    pid: int | None
    forwards: Mapping[int, int]
    record: MemberFile


@dataclass
class _Launch:
    """What every member launched by one replace/create call shares."""

    artifact: Artifact
    release: Release
    checks: Checks
    guest_checks: list[in_guest.GuestCheck] = field(default_factory=list)
    release_text: str = ""  # the release file each member is given
    accel: str | None = None  # decided on the first real launch (a probe), not for reused members


def fleets_dir(settings: Settings) -> Path:
    return settings.data_dir / "fleets"


class LocalFleet:
    """The Fleet protocol over a folder of member records and the QEMU processes they name."""

    def __init__(self, settings: Settings, name: str) -> None:
        self.settings = settings
        self.target = name
        self.dir = fleets_dir(settings) / name

    # --- reading ------------------------------------------------------------------------------------------

    def info(self) -> FleetFile:
        try:
            return load_state(FleetFile, self.dir / "fleet.json")
        except FileNotFoundError:
            raise NotFound(f"no fleet {self.target!r}", fix="`amiforge fleet list` shows the fleets") from None

    def records(self) -> list[MemberFile]:
        return [self._record(mid) for mid in self.info().members]

    def _record(self, mid: str) -> MemberFile:
        try:
            return load_state(MemberFile, self.dir / mid / "member.json")
        except FileNotFoundError:
            raise InfraError(
                f"fleet {self.target!r} lists member {mid} but its member.json is missing",
                fix=f"the fleet's files are damaged; `amiforge fleet destroy {self.target}` stops its guests",
            ) from None

    def _pid(self, rec: MemberFile, now: datetime) -> tuple[int | None, bool]:
        """(pid, running) of the member's QEMU. The pid file is trusted only while /proc agrees that pid is our
        QEMU on this overlay; with no pid file (a launcher killed between start and record), /proc is searched."""
        mdir = self.dir / rec.id
        overlay = mdir / "overlay.qcow2"
        try:
            pid = int((mdir / "qemu.pid").read_text())
        except (OSError, ValueError):
            if rec.launch_error is not None:
                return None, False
            found = find_guests(mdir)
            if found:
                return found[0], True
            # Not started yet, or never will be: give its launcher a moment before calling it failed.
            return None, (now - rec.launched_at).total_seconds() < START_GRACE
        args = qemu_args(pid)
        running = args is not None and runs_disk(args, overlay)
        return (pid if running else None), running

    def _status(self, rec: MemberFile, now: datetime) -> MemberStatus:
        mdir = self.dir / rec.id
        pid, running = self._pid(rec, now)
        try:
            lines = console_lines((mdir / "console.log").read_text(errors="replace"))
        except FileNotFoundError:
            lines = []
        exited_at, exit_detail = None, "QEMU exited"
        if not running and rec.launch_error is None:
            if not (mdir / "qemu.pid").is_file():
                exited_at, exit_detail = rec.launched_at, "QEMU never started (its launcher stopped first)"
            elif rec.stopped_at is None:
                # The time of this very look, not `now` (taken before): a stop recorded meanwhile precedes it.
                exited_at = first_seen(mdir / "exited", datetime.now(UTC))
            else:  # stopped on purpose: an exit seen before that still counts, but none is recorded now
                exited_at = seen_at(mdir / "exited")
            why = last_line(mdir / "qemu.log")
            exit_detail += f" ({why})" if why else ""
        member, signals = assess(rec, lines, running=running, now=now, exited_at=exited_at, exit_detail=exit_detail)
        return MemberStatus(member, signals, pid, rec.forwards, rec)

    def status(self) -> list[MemberStatus]:
        now = datetime.now(UTC)
        return [self._status(rec, now) for rec in self.records()]

    def detail(self) -> FleetDetail:
        """The fleet as `fleet show` prints it (the FleetKeeper protocol's view)."""
        info = self.info()
        members = [
            MemberDetail(s.member, s.pid, dict(s.forwards), str(self.dir / s.member.id / "console.log"),
                         s.record.replaces)
            for s in self.status()
        ]  # fmt: skip
        return FleetDetail(info.name, info.created, str(self.dir), members)

    def current(self) -> list[Member]:
        return [s.member for s in self.status()]

    def signals(self, since: datetime) -> list[BootSignal]:
        return self.observe(since)[1]

    def observe(self, since: datetime) -> tuple[list[Member], list[BootSignal]]:
        if since.tzinfo is None:
            since = since.replace(tzinfo=UTC)
        statuses = self.status()
        found = [sig for s in statuses for sig in s.signals if sig.at >= since]
        return [s.member for s in statuses], sorted(found, key=lambda sig: sig.at)

    def alarms_firing(self, names: Sequence[str]) -> list[str]:
        """A local fleet has no alarms; its gates are its members' signals. Naming one is an error, not a pass:
        a strategy that relies on an alarm must not have that gate silently switched off."""
        if names:
            raise ConfigError(
                f"local fleet {self.target!r} has no alarms to check ({', '.join(names)})",
                fix="drop gates.alarms from the strategy for local targets; the readiness and SLO gates still apply",
            )
        return []

    # --- changing -----------------------------------------------------------------------------------------

    @contextlib.contextmanager
    def _lock(self) -> Iterator[None]:
        """Serialise the read-check-write of records across processes (two controllers, a CLI)."""
        fd = os.open(self.dir / ".lock", os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            os.close(fd)

    def _write(self, rec: MemberFile) -> None:
        write_atomic(self.dir / rec.id / "member.json", rec.model_dump_json(indent=2) + "\n")

    @staticmethod
    def _launched_for(
        token: str, replaces: str | None, plan: _Launch, records: Sequence[MemberFile]
    ) -> MemberFile | None:
        """The member `token` launched already, if any; StateError if it was for another replacement or version."""
        rec = next((r for r in records if r.token == token), None)
        if rec is not None and (rec.replaces != replaces or rec.version_ref != plan.release.version):
            raise StateError(
                f"token {token!r} launched {rec.id} as {rec.version_ref} to replace {rec.replaces}, not as "
                f"{plan.release.version} to replace {replaces}",
                fix="use a new token for a different replacement",
            )
        return rec

    def _launch(self, token: str, replaces: str | None, plan: _Launch) -> tuple[str, bool]:
        """(member id, reused: launched by an earlier call). The member is recorded under the lock before its QEMU
        exists, so a token seen once is never launched twice and a QEMU never runs without a record naming it. The
        lock is held until the pid is recorded too: under it, a record with neither a pid file nor a QEMU is one
        whose launcher died before the start (a controller killed in that window); its token starts it now."""
        with self._lock():
            rec = self._launched_for(token, replaces, plan, self.records())
            if rec is not None:
                if not self._never_started(rec):
                    return rec.id, True
                # Its clock starts now: the first launch never happened, so nothing of it is a boot to judge.
                # A record from an amiforge that gave its guests no release file gets this call's (same version).
                release = rec.release if rec.release is not None else plan.release_text
                rec = rec.model_copy(update={"launched_at": datetime.now(UTC), "release": release})
                self._write(rec)
                for stale in ("exited", "console.log", "qemu.log", "overlay.qcow2", "checks.sh", "release"):
                    (self.dir / rec.id / stale).unlink(missing_ok=True)
                self._start(rec)
                return rec.id, False  # launched by this call after all
            rec = self._record_new(token, replaces, plan)
            self._start(rec)
            return rec.id, False

    def _never_started(self, rec: MemberFile) -> bool:
        """Under the lock only: the launcher recorded `rec` and died before its QEMU started. A console file means
        QEMU did start (it makes the file): one that is gone since booted and exited, and that stays its verdict."""
        mdir = self.dir / rec.id
        return (
            rec.launch_error is None
            and rec.stopped_at is None
            and not (mdir / "qemu.pid").exists()
            and not (mdir / "console.log").exists()
            and not find_guests(mdir)
        )

    def _record_new(self, token: str, replaces: str | None, plan: _Launch) -> MemberFile:
        if plan.accel is None:
            with tempfile.TemporaryDirectory(prefix="amiforge-accel-") as tmp:
                plan.accel, _ = qemu.choose_accel(self.settings, Path(str(plan.artifact.kernel)), Path(tmp))
        mid = f"g-{secrets.token_hex(4)}"
        while (self.dir / mid).exists():
            mid = f"g-{secrets.token_hex(4)}"
        (self.dir / mid).mkdir()
        ports = sorted({h.port for h in plan.checks.http} | {t.port for t in plan.checks.tcp})
        rec = MemberFile(
            id=mid,
            token=token,
            version_ref=plan.release.version,
            location=plan.artifact.location,
            kernel=str(plan.artifact.kernel),
            initrd=str(plan.artifact.initrd),
            launched_at=datetime.now(UTC),
            ready_within=plan.checks.ready_within,
            checks=plan.guest_checks,
            accel=plan.accel,
            forwards={p: qemu.free_port() for p in ports},
            replaces=replaces,
            release=plan.release_text,
        )
        self._write(rec)
        info = self.info()
        write_atomic(
            self.dir / "fleet.json", info.model_copy(update={"members": [*info.members, mid]}).model_dump_json()
        )
        return rec

    def _start(self, rec: MemberFile) -> None:
        """Start the member's QEMU and record its pid (or why it could not start). Called under the lock."""
        mdir = self.dir / rec.id
        spec = qemu.GuestSpec(
            disk=Path(rec.location),
            kernel=Path(rec.kernel),
            initrd=Path(rec.initrd),
            workdir=mdir,
            accel=rec.accel,
            memory_mb=self.settings.guest_memory_mb,
            cpus=self.settings.guest_cpus,
            forwards=rec.forwards,
            checks_script=in_guest.guest_script(rec.checks),
            release=rec.release.encode() if rec.release is not None else None,
            name=f"amiforge-{self.target}-{rec.id}",
            console=mdir / "console.log",
        )
        try:
            proc = spawn_guest(spec)
        except AmiforgeError as e:
            self._write(rec.model_copy(update={"launch_error": e.diagnostics()}))
            return
        except OSError as e:
            self._write(rec.model_copy(update={"launch_error": f"{type(e).__name__}: {e}"}))
            return
        CHILDREN[proc.pid] = proc
        write_atomic(mdir / "qemu.pid", f"{proc.pid}\n")

    def _bring_up(
        self,
        wanted: Sequence[tuple[str, str | None]],
        plan: _Launch,
        progress: Callable[[PhaseUpdate], None],
    ) -> list[str]:
        """Launch (or find, by token) one member per (token, member it replaces), at most MAX_BOOTING booting at
        once, and wait until each is ready or failed. Returns their ids in the order asked."""
        _check_artifact(plan.artifact)
        plan.guest_checks = in_guest.guest_checks(plan.checks)
        plan.release_text = in_guest.release_file(plan.release).decode()
        with self._lock():  # every token asked before any is launched: a mismatch refuses the whole call
            records = self.records()
            for token, replaces in wanted:
                self._launched_for(token, replaces, plan, records)
        ids: list[str] = []
        booting: dict[str, float] = {}  # member id -> give up waiting at (monotonic; a backstop, see assess)
        pending = list(wanted)

        def settled(m: Member) -> None:
            if m.state == "ready":
                progress(PhaseUpdate(m.id, "done", "ready", m.time_to_ready))
            else:
                progress(PhaseUpdate(m.id, "failed", m.detail))

        while pending or booting:
            now = datetime.now(UTC)
            for mid in list(booting):
                m = self._status(self._record(mid), now).member
                if m.state != "launching" or time.monotonic() > booting[mid]:
                    del booting[mid]
                    settled(m)
            while pending and len(booting) < MAX_BOOTING:
                token, replaces = pending.pop(0)
                mid, reused = self._launch(token, replaces, plan)
                ids.append(mid)
                rec = self._record(mid)
                m = self._status(rec, datetime.now(UTC)).member
                if m.state != "launching":
                    settled(m)
                    continue
                progress(PhaseUpdate(mid, "start", ("waiting for " if reused else "booting ") + rec.version_ref))
                booting[mid] = time.monotonic() + rec.ready_within + checks_grace(rec.checks) + 60
            if booting:
                time.sleep(POLL_SECONDS)
        return ids

    def _stop(self, mid: str, cause: StopCause, reason: str, **extra: object) -> None:
        """Record the stop first (so nobody reads the exit as a failure), then end the QEMU. Idempotent: the
        first reason recorded stays, and a QEMU that survived an earlier attempt is ended again."""
        with self._lock():
            rec = self._record(mid)
            if rec.stopped_at is None:
                rec = rec.model_copy(
                    update={"stopped_at": datetime.now(UTC), "stop_cause": cause, "stop_reason": reason, **extra}
                )
                self._write(rec)
        pid, running = self._pid(rec, datetime.now(UTC))
        if pid is not None and running:
            end_guests([pid])

    def replace(
        self, replacements: Sequence[Replacement], artifact: Artifact, release: Release, checks: Checks
    ) -> list[Member]:
        """Launch one member per replacement, wait for each, then stop each old member whose replacement is
        ready. A failed replacement is stopped and its old member left running: what next is the caller's call.
        Asking again with the same tokens (a resumed controller) launches nothing new and converges."""
        known = {rec.id for rec in self.records()}
        unknown = sorted({r.member for r in replacements} - known)
        if unknown:
            raise NotFound(f"fleet {self.target!r} has no member {', '.join(unknown)}", fix="see `amiforge fleet show`")
        plan = _Launch(artifact, release, checks)
        ids = self._bring_up([(r.token, r.member) for r in replacements], plan, lambda _u: None)
        now = datetime.now(UTC)
        result = []
        for r, mid in zip(replacements, ids, strict=True):
            member = self._status(self._record(mid), now).member
            if member.state == "ready":
                self._stop(r.member, "replaced", f"replaced by {mid}", replaced_by=mid)
            elif member.state == "failed":
                self._stop(mid, "failed", f"stopped: {member.detail}", failure=member.detail)
            elif member.state == "stopped":
                rec = self._record(mid)
                if rec.stop_cause == "failed":  # asked again after it failed: the same answer as the first time
                    member = evolve(member, state="failed", detail=rec.failure or member.detail)
            result.append(member)
        return result


def _check_artifact(artifact: Artifact) -> None:
    if artifact.provider != "local" or artifact.kernel is None or artifact.initrd is None:
        raise ConfigError(
            f"artifact {artifact.location} is not a local image (provider {artifact.provider})",
            fix="a local fleet runs the local artifact of a version",
        )
    for path in (artifact.location, artifact.kernel, artifact.initrd):
        if not Path(path).is_file():
            raise NotFound(f"{path} is missing from the local image store", fix="bake the version again")


def _check_name(name: str) -> None:
    if not NAME_RE.match(name):
        raise ConfigError(f"invalid fleet name {name!r}", fix="use lower-case letters, digits and '-', 1–63 characters")


def create_fleet(
    settings: Settings,
    name: str,
    size: int,
    artifact: Artifact,
    release: Release,
    checks: Checks,
    *,
    progress: Callable[[PhaseUpdate], None] = lambda _u: None,
) -> LocalFleet:
    """Boot `size` members (MAX_BOOTING at a time) and wait for them. Members that fail stay in the fleet as
    failed (the caller reports them); an error or interruption midway destroys the half-made fleet."""
    _check_name(name)
    if size < 1:
        raise ConfigError(f"a fleet needs at least one member, not {size}", fix="pass --size 1 or more")
    _check_artifact(artifact)
    fleet = LocalFleet(settings, name)
    fleet.dir.parent.mkdir(parents=True, exist_ok=True)
    try:
        fleet.dir.mkdir()
    except FileExistsError:
        raise StateError(
            f"fleet {name!r} exists already", fix=f"`amiforge fleet show {name}`, or `amiforge fleet destroy {name}`"
        ) from None
    try:
        write_atomic(
            fleet.dir / "fleet.json", FleetFile(name=name, created=datetime.now(UTC), members=[]).model_dump_json()
        )
        plan = _Launch(artifact, release, checks)
        fleet._bring_up([(f"create-{i}", None) for i in range(size)], plan, progress)
    except BaseException:
        # The first error is what the caller must see; a failing cleanup must not replace it.
        with contextlib.suppress(AmiforgeError, OSError):
            destroy_fleet(settings, name)
        raise
    return fleet


def open_fleet(settings: Settings, name: str) -> LocalFleet:
    _check_name(name)
    fleet = LocalFleet(settings, name)
    fleet.info()  # NotFound if there is none
    return fleet


def list_fleets(settings: Settings) -> list[str]:
    root = fleets_dir(settings)
    return sorted(p.parent.name for p in root.glob("*/fleet.json")) if root.is_dir() else []


def destroy_fleet(settings: Settings, name: str) -> list[str]:
    """Stop every guest of the fleet and remove its folder; returns the members whose QEMU was running.
    Idempotent: a fleet that is not there is already destroyed. Besides the recorded pids, /proc is searched
    for any QEMU on a disk in the fleet's folder, so even a guest whose pid was never recorded goes."""
    _check_name(name)
    fleet = LocalFleet(settings, name)
    if not fleet.dir.is_dir():
        return []
    now = datetime.now(UTC)
    running: list[str] = []
    pids: set[int] = set()
    with fleet._lock():
        with contextlib.suppress(NotFound, InfraError):  # damaged records: /proc below still finds every QEMU
            for rec in fleet.records():
                pid, alive = fleet._pid(rec, now)
                if pid is not None and alive:
                    running.append(rec.id)
                    pids.add(pid)
        pids.update(find_guests(fleet.dir))
        end_guests(sorted(pids))
        shutil.rmtree(fleet.dir)
    return running
