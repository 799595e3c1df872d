"""What both providers put into a guest and read back from it: the scripts that perform recipe steps, the
generalisation every bake ends with, readiness, and the in-guest checks whose results come back framed on the
console.

The local provider runs step scripts in a chroot and reads the console of a QEMU guest; the AWS provider runs the
same scripts through SSM Run Command and reads the EC2 console output. Keeping them in one module is what makes
an image baked on either provider mean the same thing.
"""

from __future__ import annotations

import base64
import re
import shlex
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import UTC
from importlib import resources
from pathlib import Path

from amiforge.model import CheckResult, RemovedFile
from amiforge.providers.interface import Release
from amiforge.recipe import Checks, FileStep, PackagesStep, ServiceStep, ShellStep, Step, UserStep, stage_source


def guest_file(name: str) -> bytes:
    """A file amiforge installs into every image (providers/guest_files/): the readiness unit and script, the
    host-key unit, and the local provider's initrd init."""
    return resources.files("amiforge.providers.guest_files").joinpath(name).read_bytes()


# --- readiness and framed results on the console ----------------------------------------------------------

# The readiness unit prints this line once multi-user.target is reached, then (amiforge-ready-repeat.service) the
# same line, with the same uptime, every 15 s for 15 min, so a console kept as a window of its last bytes (EC2: 64 KB)
# still holds it after a chatty boot. A boot's first complete line is its readiness; the copies say nothing new.
READY_RE = re.compile(r"AMIFORGE-READY (\d+(?:\.\d+)?)")
# The same line, complete: a console read while the line is being written can end inside its number ("12.3" of 12.34).
READY_LINE_RE = re.compile(READY_RE.pattern + r"[ \t]*\r?\n")
# The readiness unit also records its line here (a tmpfs: this boot's only), for a host whose console view may have
# lost it (EC2 keeps the last 64 KB; older instance types publish it only around state changes).
READY_FILE = "/run/amiforge-ready"
# amiforge-heartbeat.service prints this every 60 s once the machine is ready, for as long as it runs (M4).
HEARTBEAT_RE = re.compile(r"AMIFORGE-HEARTBEAT (\d+(?:\.\d+)?)[ \t]*$")
HEARTBEAT_EVERY = 60.0
# The readiness script prints the boot's timing as systemd measured it right after READY: the kernel (with the
# initrd) until systemd started, userspace until multi-user.target, and the three units slowest to start.
TIMING_RE = re.compile(r"AMIFORGE-TIMING kernel=(\d+\.\d+) userspace=(\d+\.\d+)((?: [^\s/]+/\d+\.\d+){0,3})[ \t]*$")
RESULT_RE = re.compile(r"AMIFORGE-RESULT (\d+) (\d+) ([A-Za-z0-9+/=]*)")
DONE_MARK = "AMIFORGE-CHECKS-DONE"
COMMAND_TIMEOUT = 30


# --- identity: what the image says it is -----------------------------------------------------------------------

RELEASE_FILE = "/etc/amiforge/release"


def release_file(release: Release) -> bytes:
    """/etc/amiforge/release: KEY=value lines (os-release style, sourceable by sh) naming what the machine was baked
    or booted as, for software on it (and amiforge's CloudWatch reporter). AMIFORGE_DIGEST is there when the
    artifact exists already (a local guest's); an AMI's id is in the instance's metadata (ami-id) instead."""
    values = {
        "AMIFORGE_IMAGE": release.image,
        "AMIFORGE_VERSION": release.version,
        **({"AMIFORGE_DIGEST": release.digest} if release.digest is not None else {}),
        "AMIFORGE_RECIPE_DIGEST": release.recipe_digest,
        "AMIFORGE_BUILT_AT": release.built_at.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%SZ"),
    }
    head = "# What this machine was baked or booted as (amiforge). KEY=value lines; sourceable by sh.\n"
    return (head + "".join(f"{k}={v}\n" for k, v in values.items())).encode()


# Terminal escapes (systemd's colours, cursor moves) and control characters: not text a reader can use.
_ESCAPES = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]|\x1b[()][A-Za-z0-9]|[\x00-\x08\x0b-\x1f\x7f]")
TAIL_LINES = 5


def printable(line: str) -> str:
    """A console line as a reader sees it: without terminal escapes and control characters."""
    return _ESCAPES.sub("", line).rstrip()


def console_tail(lines: Sequence[str], count: int = TAIL_LINES) -> tuple[str, ...]:
    """A failed boot's last words: the last `count` lines worth reading of its console — printable, not blank, none
    of amiforge's own markers (readiness and its copies, timing, framed check results, heartbeats, CloudWatch's
    reports: what failed is said by the verdict already) — each cut to 200 characters."""
    kept: list[str] = []
    for raw in reversed(lines):
        line = printable(raw)
        if line and "AMIFORGE-" not in line:
            kept.append(line[:200])
            if len(kept) == count:
                break
    return tuple(reversed(kept))


def boot_timing(lines: Iterable[str]) -> dict[str, float] | None:
    """The first whole timing line of a console as {phase: seconds} — `kernel`, `userspace`, then the slowest units
    by name, slowest first — or None if the guest printed none (a line another writer broke into is not one)."""
    for line in lines:
        m = TIMING_RE.search(line.rstrip("\r"))
        if m:
            phases = {"kernel": float(m.group(1)), "userspace": float(m.group(2))}
            for unit in m.group(3).split():
                name, _, seconds = unit.rpartition("/")
                phases[name] = float(seconds)
            return phases
    return None


# --- recipe steps ------------------------------------------------------------------------------------

STEP_TIMEOUT = 1800.0

APT_INSTALL = (
    "apt-get install -y -q --no-install-recommends"
    " -o Dpkg::Options::=--force-confdef -o Dpkg::Options::=--force-confold"
)

# Run at the end of every bake, inside the image. Host keys, machine identity, caches, logs, histories,
# temp files and build credentials must not be cloned into every machine booted from the image.
GENERALISE = r"""set -e
# First say which credentials and histories a step left behind (path and kind, never content): the bake reports
# them, so the recipe's author learns their recipe handled a credential.
report() {
    kind=$1; shift
    for f in "$@"; do
        if [ -e "$f" ] || [ -L "$f" ]; then printf 'AMIFORGE-GENERALISED %s\t%s\n' "$kind" "$f"; fi
    done
}
report "ssh key" /root/.ssh/id_* /home/*/.ssh/id_*
report "aws credentials" /root/.aws/credentials
report "netrc" /root/.netrc
report "docker credentials" /root/.docker/config.json
report "shell history" /root/.*_history /home/*/.*_history /root/.lesshst /root/.wget-hsts /root/.viminfo
rm -f /etc/ssh/ssh_host_*_key /etc/ssh/ssh_host_*_key.pub
: > /etc/machine-id
rm -f /var/lib/dbus/machine-id /var/lib/systemd/random-seed /var/lib/systemd/credential.secret
rm -rf /var/lib/apt/lists/* /var/cache/apt/*.bin /var/cache/apt/archives/*.deb /var/cache/debconf/*-old
rm -rf /var/lib/cloud /var/lib/dhcp/* /var/lib/systemd/network/*
find /var/log -type f -exec rm -f {} +
rm -f /root/.*_history /home/*/.*_history /root/.lesshst /root/.wget-hsts /root/.viminfo
rm -f /root/.ssh/id_* /home/*/.ssh/id_* /root/.aws/credentials /root/.netrc /root/.docker/config.json
rm -rf /tmp/* /tmp/.[!.]* /var/tmp/* /var/tmp/.[!.]*
find / -xdev -name '*.dpkg-old' -o -xdev -name '*.dpkg-dist' | xargs -r rm -f
printf '%s\n' "$AMIFORGE_HOSTNAME" > /etc/hostname
# The bake already did what systemd's ConditionNeedsUpdate units redo on a first boot (caches, users);
# stamp /etc and /var as up to date with /usr so every machine doesn't repeat it.
ldconfig
# Debian ships a compiled hwdb in /usr; only local additions (/etc/udev/hwdb.d) need compiling here.
if [ -n "$(ls -A /etc/udev/hwdb.d 2>/dev/null)" ]; then systemd-hwdb update; fi
for d in /etc /var; do
    printf 'TIMESTAMP_NSEC=%s\n' "$(stat -c %Y /usr)000000000" > "$d/.updated"
    touch -r /usr "$d/.updated"
done
# Uploads staged for the steps (a tmpfs on EC2; the local provider bind-mounts its stage here: the contents only).
rm -rf /run/amiforge/* /run/amiforge/.[!.]*
"""

GENERALISED_MARK = "AMIFORGE-GENERALISED "


def parse_generalised(lines: Iterable[str]) -> tuple[RemovedFile, ...]:
    """The files GENERALISE reported before deleting them, from its output lines (any provider's)."""
    found: dict[str, RemovedFile] = {}
    for line in lines:
        kind, tab, path = line.removeprefix(GENERALISED_MARK).partition("\t")
        if line.startswith(GENERALISED_MARK) and tab and path:
            found.setdefault(path, RemovedFile(path=path, kind=kind))
    return tuple(sorted(found.values(), key=lambda r: r.path))


def step_script(step: Step | None, stage: Path, folder: Path, hostname: str, *, leftovers: str = "") -> str:
    """The shell script that performs `step` inside the chroot; files it needs are copied into `stage`.
    For generalisation (`step` None), `leftovers` is the shell that removes what the communicator left on the machine
    (providers/aws/machine.py `Leftovers.script()`): it runs last, after GENERALISE."""
    q = shlex.quote
    if step is None:
        return f"AMIFORGE_HOSTNAME={q(hostname)}\n{GENERALISE}{leftovers}"
    if isinstance(step, PackagesStep):
        pkgs = " ".join(q(p) for p in step.packages)
        # The base keeps its package lists; refresh them only if they turn out stale.
        return f"set -e\n{APT_INSTALL} {pkgs} || {{ apt-get update -q && {APT_INSTALL} {pkgs}; }}\napt-get clean\n"
    if isinstance(step, FileStep):
        spec = step.file
        stage_source(folder, spec.src, stage / "file")
        # `install` runs inside the chroot, so symlinks in dest resolve within the image, never on the host.
        return (
            f"set -e\ninstall -D -m {q(spec.mode)} -o {q(spec.owner)} -g {q(spec.group)}"
            f" /run/amiforge/file {q(spec.dest)}\n"
        )
    if isinstance(step, ShellStep):
        (stage / "user.sh").write_text(step.shell)
        return "set -e\ncd /root\n/bin/sh -e /run/amiforge/user.sh\n"
    if isinstance(step, ServiceStep):
        lines = ["set -e"]
        if step.service.enable:
            lines.append("systemctl enable " + " ".join(q(u) for u in step.service.enable))
        if step.service.disable:
            lines.append("systemctl disable " + " ".join(q(u) for u in step.service.disable))
        return "\n".join(lines) + "\n"
    if isinstance(step, UserStep):
        u = step.user
        groups = f"--groups {q(','.join(u.groups))} " if u.groups else ""
        lines = [
            "set -e",
            f"id -u {q(u.name)} >/dev/null 2>&1 || useradd --create-home --shell {q(u.shell)} {groups}{q(u.name)}",
        ]
        if u.ssh_authorized_keys:
            keys = "\n".join(u.ssh_authorized_keys) + "\n"
            (stage / "authorized_keys").write_text(keys)
            home = f'"$(getent passwd {q(u.name)} | cut -d: -f6)"'
            owner = f"-o {q(u.name)} -g {q(u.name)}"
            lines += [
                f"install -d -m 0700 {owner} {home}/.ssh",
                f"install -m 0600 {owner} /run/amiforge/authorized_keys {home}/.ssh/authorized_keys",
            ]
        return "\n".join(lines) + "\n"
    raise AssertionError(f"unhandled step type {type(step).__name__}")


# --- in-guest checks ----------------------------------------------------------------------------------------


@dataclass(frozen=True)
class GuestCheck:
    name: str
    kind: str  # unit | command
    shell: str
    expect_exit: int = 0
    expect_output: str | None = None


# The serial getty starts late (Type=idle) and systemd hangs ttyS0 up before it runs (TTYVHangup=yes): a result
# written to the console opened before that fails with EIO and was lost (a boot test failing at random under
# load). Such a line is written again on a fresh open of the console, if the console is where it was going.
GUEST_PRELUDE = f"""r() {{
    out=$(timeout {COMMAND_TIMEOUT} sh -c "$2" 2>&1 </dev/null); rc=$?
    line=$(printf 'AMIFORGE-RESULT %s %s %s' "$1" "$rc" "$(printf '%s' "$out" | head -c 4000 | base64 -w0)")
    printf '\\n%s\\n' "$line" 2>/dev/null ||
        {{ [ /proc/$$/fd/1 -ef /dev/ttyS0 ] && printf '\\n%s\\n' "$line" >/dev/ttyS0; }}
}}
"""


def guest_checks(checks: Checks) -> list[GuestCheck]:
    """The recipe's in-guest checks (units, commands), in the order their results are numbered."""
    found = [GuestCheck(f"unit {u}", "unit", f"systemctl is-active -- {shlex.quote(u)}") for u in checks.units]
    found += [GuestCheck(f"command {c.run}", "command", c.run, c.expect_exit, c.expect_output) for c in checks.commands]
    return found


def guest_script(checks: Sequence[GuestCheck]) -> str:
    body = "".join(f"r {i} {shlex.quote(c.shell)}\n" for i, c in enumerate(checks))
    return GUEST_PRELUDE + body


def guest_results(checks: Sequence[GuestCheck], lines: Sequence[str]) -> list[CheckResult]:
    """Match the framed results on the console to the checks; a missing result is a failure."""
    found: dict[int, tuple[int, str]] = {}
    for line in lines:
        m = RESULT_RE.search(line)
        if m:
            try:
                out = base64.b64decode(m.group(3)).decode("utf-8", "replace")
            except ValueError:
                out = "(garbled result on the console)"
            found[int(m.group(1))] = (int(m.group(2)), out)
    results = []
    for i, c in enumerate(checks):
        if i not in found:
            results.append(CheckResult(c.name, c.kind, False, "no result came back from the guest"))
            continue
        rc, out = found[i]
        problems = []
        if rc != c.expect_exit:
            problems.append(f"exit {rc}, expected {c.expect_exit}")
        if c.expect_output is not None and c.expect_output not in out:
            problems.append(f"output lacks {c.expect_output!r}")
        detail = "; ".join(problems) if problems else f"exit {rc}"
        snippet = out.strip().replace("\n", " | ")[:300]
        results.append(CheckResult(c.name, c.kind, not problems, f"{detail}: {snippet}" if snippet else detail))
    return results
