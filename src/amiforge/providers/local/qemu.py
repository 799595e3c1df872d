"""QEMU guests for boot tests and fleets: an overlay on the artifact, the serial console as the only channel.

Readiness is the `AMIFORGE-READY` line the image's readiness unit prints after multi-user.target. In-guest
checks (units, commands) travel in by fw_cfg as a shell script whose results come back framed on the
console; port checks (HTTP, TCP) run from the host through hostfwd on 127.0.0.1. The guest network is
`restrict=on`: it reaches neither the host nor the outside, only forwarded ports reach it.
"""

from __future__ import annotations

import ctypes
import http.client
import json
import os
import re
import signal
import socket
import subprocess
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType

from amiforge.errors import ConfigError, InfraError
from amiforge.providers.local.initrd import NewcArchive
from amiforge.providers.local.tools import STATIC_BUSYBOX, end_process, require, run, write_atomic
from amiforge.settings import Settings

# One serial port, no keyboard/mouse probing, no boot-time crypto self-tests and no timer re-checks:
# a headless guest needs none of it, and each costs tenths of a second under TCG (BENCHMARKS.md).
KERNEL_ARGS = (
    "console=ttyS0 root=/dev/vda rw quiet panic=-1"
    " 8250.nr_uarts=1 i8042.noaux i8042.nokbd cryptomgr.notests no_timer_check tsc=reliable"
)


def _die_with_parent() -> None:
    # If amiforge itself is killed, the guest goes with it: no orphaned QEMU.
    libc = ctypes.CDLL("libc.so.6", use_errno=True)
    libc.prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


@dataclass(frozen=True)
class GuestSpec:
    disk: Path  # the artifact's qcow2; only ever a read-only backing file
    kernel: Path
    initrd: Path
    workdir: Path  # overlay and fw_cfg files live here; the caller removes it
    accel: str = "tcg"
    memory_mb: int = 512
    cpus: int = 2
    forwards: dict[int, int] = field(default_factory=dict)  # guest port -> host port on 127.0.0.1
    checks_script: str | None = None
    # /etc/amiforge/release for this guest (guest.release_file): the image is shared between versions, so the
    # guest learns which one it is booted as here; amiforge-release.service installs it before services start.
    release: bytes | None = None
    name: str = "amiforge"
    # None: the serial console is QEMU's stdout, read live (boot tests). A path: the console goes to that file,
    # so the guest can outlive the process that started it (fleet members).
    console: Path | None = None

    def command(self) -> list[str]:
        """The QEMU argv: the one place a boot-test guest and a fleet member are both described."""
        s = self
        accel = "kvm" if s.accel == "kvm" else "tcg,tb-size=64,thread=multi"
        fwd = "".join(f",hostfwd=tcp:127.0.0.1:{h}-:{g}" for g, h in sorted(s.forwards.items()))
        serial = "stdio" if s.console is None else f"file:{s.console}"
        argv = [
            require("qemu-system-x86_64"),
            "-name", s.name,
            "-accel", accel,
            "-smp", str(s.cpus),
            "-m", str(s.memory_mb),
            "-nodefaults", "-display", "none", "-serial", serial, "-no-reboot",
            "-kernel", str(s.kernel),
            "-initrd", str(s.initrd),
            "-append", KERNEL_ARGS,
            "-drive", f"file={option_value(s.overlay)},format=qcow2,if=virtio,cache=unsafe",
            "-netdev", f"user,id=n0,restrict=on{fwd}",
            "-device", "virtio-net-pci,netdev=n0",
            "-device", "virtio-rng-pci",
        ]  # fmt: skip
        if s.checks_script is not None:
            argv += ["-fw_cfg", f"name=opt/amiforge/checks,file={option_value(s.workdir / 'checks.sh')}"]
        if s.release is not None:
            argv += ["-fw_cfg", f"name=opt/amiforge/release,file={option_value(s.workdir / 'release')}"]
        return argv

    @property
    def overlay(self) -> Path:
        return self.workdir / "overlay.qcow2"


def option_value(path: Path) -> str:
    """A path as the value of a QEMU option: a comma would end it, unless doubled (a data dir may hold one)."""
    return str(path).replace(",", ",,")


def prepare(spec: GuestSpec) -> None:
    """Make the guest's own overlay on the artifact (which stays a read-only backing file) and its fw_cfg files."""
    run(
        ["qemu-img", "create", "-q", "-f", "qcow2", "-b", spec.disk.resolve(), "-F", "qcow2", spec.overlay],
        what="qemu-img create (boot overlay)",
    )
    if spec.checks_script is not None:
        (spec.workdir / "checks.sh").write_text(spec.checks_script)
    if spec.release is not None:
        (spec.workdir / "release").write_bytes(spec.release)


class Guest:
    """A running QEMU guest. Use as a context manager: leaving it always stops QEMU."""

    def __init__(self, spec: GuestSpec) -> None:
        self.spec = spec
        self._proc: subprocess.Popen[bytes] | None = None
        self._lines: list[tuple[float, str]] = []
        # The console's last line is cut off (no newline) when QEMU exits in the middle of writing it.
        self._cut_off = False
        self._read_all = False  # QEMU's output has ended and every line of it is in _lines
        self._cond = threading.Condition()
        self._reader: threading.Thread | None = None
        self.started = 0.0

    def __enter__(self) -> Guest:
        prepare(self.spec)
        self.started = time.monotonic()
        self._proc = subprocess.Popen(
            self.spec.command(),
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            preexec_fn=_die_with_parent,
        )
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()
        return self

    def _read(self) -> None:
        assert self._proc is not None and self._proc.stdout is not None
        for raw in self._proc.stdout:  # whole lines, but for a last one QEMU did not finish before it exited
            line = raw.decode("utf-8", "replace").rstrip("\r\n")
            with self._cond:
                self._lines.append((time.monotonic() - self.started, line))
                self._cut_off = not raw.endswith(b"\n")
                self._cond.notify_all()
        with self._cond:
            self._read_all = True
            self._cond.notify_all()

    def wait_for(self, pattern: re.Pattern[str] | str, timeout: float) -> tuple[float, str] | None:
        """The first console line matching `pattern` (with its time since start); None on timeout, or once QEMU has
        exited and every line it wrote was looked at. A line is matched with its newline, so a pattern that ends in
        one (guest.READY_LINE_RE) never takes a line QEMU was cut off in the middle of."""
        deadline = time.monotonic() + timeout
        regex = re.compile(re.escape(pattern)) if isinstance(pattern, str) else pattern
        seen = 0
        with self._cond:
            while True:
                last = len(self._lines) - 1
                for i, (t, line) in enumerate(self._lines[seen:], start=seen):
                    if regex.search(line if i == last and self._cut_off else line + "\n"):
                        return t, line
                seen = len(self._lines)
                left = deadline - time.monotonic()
                if left <= 0 or self._read_all:
                    return None
                self._cond.wait(min(left, 0.5))

    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    def console(self) -> str:
        with self._cond:
            return "\n".join(line for _, line in self._lines)

    def lines(self) -> list[str]:
        with self._cond:
            return [line for _, line in self._lines]

    def stop(self) -> None:
        if self._proc is None:
            return
        if self._proc.poll() is None:
            self._proc.terminate()
            end_process(self._proc, grace=5)
        if self._reader is not None:
            self._reader.join(timeout=5)
        if self._proc.stdout is not None:
            self._proc.stdout.close()
        self._proc = None

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()


# --- host-side port checks ---------------------------------------------------------------------------------


def http_check(
    host_port: int, path: str, expect_status: int, expect_body: str | None, deadline: float
) -> tuple[bool, str]:
    """GET http://127.0.0.1:port/path, retrying connection errors until `deadline` (the service may be
    finishing its start)."""
    last = ""
    while True:
        try:
            conn = http.client.HTTPConnection("127.0.0.1", host_port, timeout=5)
            try:
                conn.request("GET", path, headers={"Host": "localhost"})
                resp = conn.getresponse()
                body = resp.read(65536).decode("utf-8", "replace")
            finally:
                conn.close()
            problems = []
            if resp.status != expect_status:
                problems.append(f"status {resp.status}, expected {expect_status}")
            if expect_body is not None and expect_body not in body:
                problems.append(f"body lacks {expect_body!r}")
            if problems:
                return False, "; ".join(problems)
            return True, f"status {resp.status}, {len(body)} bytes"
        except (OSError, http.client.HTTPException) as e:
            last = f"{type(e).__name__}: {e}"
        if time.monotonic() >= deadline:
            return False, f"no HTTP answer: {last}"
        time.sleep(0.5)


def tcp_check(host_port: int, deadline: float) -> tuple[bool, str]:
    last = ""
    while True:
        try:
            with socket.create_connection(("127.0.0.1", host_port), timeout=3) as s:
                # slirp accepts the host side even when nothing listens in the guest; a closed port shows up
                # as an immediate EOF/reset, a listening one stays open.
                s.settimeout(1.0)
                try:
                    data = s.recv(1)
                    if data == b"":
                        raise ConnectionResetError("closed by the guest")
                except TimeoutError:
                    pass
                return True, "port open"
        except OSError as e:
            last = f"{type(e).__name__}: {e}"
        if time.monotonic() >= deadline:
            return False, f"port closed: {last}"
        time.sleep(0.5)


# --- KVM: used only when a real guest boots with it ----------------------------------------------------------

# Time allowed, after READY, for the in-guest checks to report (each command has its own 30 s cap).
CHECKS_GRACE = 60.0

KVM_PROBE_TIMEOUT = 6.0  # a working KVM boots the probe in well under a second; TCG needs ~2.3 s


def kvm_probe(kernel: Path, workdir: Path, cache_file: Path) -> tuple[bool, str]:
    """Boot a tiny busybox initrd with -accel kvm and wait for it to answer. /dev/kvm existing is not
    enough: on some hosts (PVM nested virtualisation) it opens fine and stock kernels then hang."""
    if not os.access("/dev/kvm", os.R_OK | os.W_OK):
        return False, "/dev/kvm is absent or not accessible"
    key = f"{os.uname().release} {kernel.stat().st_size}"
    if cache_file.is_file():
        try:
            cached = json.loads(cache_file.read_text())
        except ValueError:
            cached = {}  # damaged: probe again
        if cached.get("key") == key:
            return bool(cached["ok"]), str(cached["why"])
    archive = NewcArchive()
    archive.dir("bin")
    archive.file("bin/busybox", STATIC_BUSYBOX.read_bytes(), 0o755)
    archive.file("init", b"#!/bin/busybox sh\n/bin/busybox echo AMIFORGE-KVM-OK\n/bin/busybox poweroff -f\n", 0o755)
    (workdir / "probe.cpio").write_bytes(archive.finish())
    argv = [
        require("qemu-system-x86_64"), "-accel", "kvm", "-m", "128", "-nodefaults", "-display", "none",
        "-serial", "stdio", "-no-reboot", "-kernel", str(kernel), "-initrd", str(workdir / "probe.cpio"),
        "-append", "console=ttyS0 panic=-1 quiet",
    ]  # fmt: skip
    try:
        out = subprocess.run(
            argv, capture_output=True, timeout=KVM_PROBE_TIMEOUT, stdin=subprocess.DEVNULL, check=False
        )
        ok = b"AMIFORGE-KVM-OK" in out.stdout
        why = "a test guest booted under KVM" if ok else "the KVM test guest failed: " + out.stderr.decode()[-200:]
    except subprocess.TimeoutExpired:
        ok, why = False, f"a test guest hung under KVM for {KVM_PROBE_TIMEOUT:.0f}s (falling back to TCG)"
    write_atomic(cache_file, json.dumps({"key": key, "ok": ok, "why": why}))
    return ok, why


def kvm_report(cache: Path) -> tuple[bool, str]:
    """(usable, why) for `doctor`: the probe boots the newest cached base image's kernel; none cached, none run."""
    kernels = sorted(cache.glob("base/*/rootfs/boot/vmlinuz-*"))
    if not kernels:
        exists = os.path.exists("/dev/kvm")
        device = "/dev/kvm exists" if exists else "/dev/kvm is absent"
        return False, f"not probed yet: bake once (the probe boots the image's kernel); {device}"
    with tempfile.TemporaryDirectory(prefix="amiforge-kvm-") as tmp:
        return kvm_probe(kernels[-1], Path(tmp), cache / "kvm-probe.json")


def choose_accel(settings: Settings, kernel: Path, workdir: Path) -> tuple[str, str]:
    """(accel, why): KVM only if asked for or if a functional probe passes (AMIFORGE_ACCEL: auto, kvm, tcg)."""
    if settings.accel == "tcg":
        return "tcg", "AMIFORGE_ACCEL=tcg"
    ok, why = kvm_probe(kernel, workdir, settings.cache_dir / "kvm-probe.json")
    if settings.accel == "kvm" and not ok:
        raise ConfigError(f"AMIFORGE_ACCEL=kvm but KVM does not work here: {why}", fix="use auto or tcg")
    return ("kvm" if ok else "tcg"), why


def check_guest_alive(guest: Guest) -> None:
    if not guest.running():
        tail = "\n".join(guest.lines()[-15:])
        raise InfraError(
            f"QEMU exited unexpectedly:\n{tail}",
            fix="the lines above are QEMU's own; `amiforge doctor` checks QEMU and KVM, AMIFORGE_ACCEL=tcg avoids KVM",
        )
