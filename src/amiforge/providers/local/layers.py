"""Recipe steps as content-addressed overlay layers.

Each step is one layer: an overlayfs upper dir produced by running the step in a chroot over the base and the
layers below it. Its key is sha256(parent key + the step's fingerprint, which covers the bytes of any file it
copies), so an unchanged prefix of the recipe is served from the cache and an edit rebuilds from that step on.
A cached layer is never written again: it is only ever a read-only lower dir.

The last layer of every bake is generalisation (GENERALISE below): what must not ship in a golden image.
"""

from __future__ import annotations

import hashlib
import json
import shlex
import shutil
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

from amiforge.errors import ConfigError
from amiforge.inputs import file_sha256
from amiforge.model import RemovedFile
from amiforge.providers.interface import PhaseUpdate, RunContext
from amiforge.providers.local.overlay import run_in_chroot
from amiforge.providers.local.tools import cached_size, publish_cache_entry, temporary_dir
from amiforge.recipe import (
    FileStep,
    PackagesStep,
    ServiceStep,
    ShellStep,
    Step,
    UserStep,
    stage_source,
    step_fingerprint,
)

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
"""

# Bump when GENERALISE or the step scripts change meaning, so cached layers are rebuilt.
LAYER_FORMAT = 1

GENERALISED_MARK = "AMIFORGE-GENERALISED "
# What the generalisation layer's cache entry keeps of its report, for bakes that hit it.
GENERALISED_FILE = "generalised.json"


def parse_generalised(lines: Iterable[str]) -> tuple[RemovedFile, ...]:
    """The files GENERALISE reported before deleting them, from its output lines (any provider's)."""
    found: dict[str, RemovedFile] = {}
    for line in lines:
        kind, tab, path = line.removeprefix(GENERALISED_MARK).partition("\t")
        if line.startswith(GENERALISED_MARK) and tab and path:
            found.setdefault(path, RemovedFile(path=path, kind=kind))
    return tuple(sorted(found.values(), key=lambda r: r.path))


def generalised_files(layer_upper: Path) -> tuple[RemovedFile, ...]:
    """What the generalisation layer whose upper dir this is removed (recorded when the layer was built)."""
    record = layer_upper.parent / GENERALISED_FILE
    try:
        return tuple(RemovedFile(str(item["path"]), str(item["kind"])) for item in json.loads(record.read_text()))
    except (OSError, ValueError, TypeError, KeyError):
        return ()  # not recorded (a layer from before reports), or damaged: nothing known to report


@dataclass(frozen=True)
class LayerPlan:
    index: int  # 0 is the base; 1..n the steps; n+1 generalisation
    key: str
    description: str
    step: Step | None  # None for generalisation
    fingerprint: str = ""  # the step's fingerprint when the key was made (file steps are re-checked against it)


def chain_key(parent: str, material: str) -> str:
    return hashlib.sha256(f"{LAYER_FORMAT}\n{parent}\n{material}".encode()).hexdigest()


def plan_layers(base: str, steps: Sequence[Step], folder: Path, hostname: str) -> list[LayerPlan]:
    plans: list[LayerPlan] = []
    parent = base
    for i, step in enumerate(steps, start=1):
        fingerprint = step_fingerprint(step, folder)
        parent = chain_key(parent, fingerprint)
        plans.append(LayerPlan(i, parent, step.describe(), step, fingerprint))
    key = chain_key(parent, "generalise\n" + GENERALISE + hostname)
    plans.append(LayerPlan(len(steps) + 1, key, "generalise", None))
    return plans


def _step_script(step: Step | None, stage: Path, folder: Path, hostname: str) -> str:
    """The shell script that performs `step` inside the chroot; files it needs are copied into `stage`."""
    q = shlex.quote
    if step is None:
        return f"AMIFORGE_HOSTNAME={q(hostname)}\n{GENERALISE}"
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


def ensure_layer(
    plan: LayerPlan, lowers: Sequence[Path], cache: Path, folder: Path, hostname: str, ctx: RunContext
) -> tuple[Path, bool, float, int]:
    """Return (upper dir, hit, seconds, size) for the layer, building it if the cache lacks it.

    The layer is built in a temporary dir and renamed into place only when the step succeeded, so a failed or
    interrupted step never leaves a layer that a later bake would trust."""
    started = time.monotonic()
    final = cache / "layers" / plan.key
    name = f"layer {plan.index}: {plan.description}"
    if (final / "upper").is_dir():
        size = cached_size(final)
        seconds = time.monotonic() - started
        ctx.progress(PhaseUpdate(name, "done", "hit", seconds))
        return final / "upper", True, seconds, size
    ctx.progress(PhaseUpdate(name, "start", "miss"))
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = temporary_dir(ctx.cleanup, f".tmp-{plan.key[:12]}-", final.parent)
    for d in ("upper", "work", "merged", "stage"):
        (tmp / d).mkdir()
    script = _step_script(plan.step, tmp / "stage", folder, hostname)
    if isinstance(plan.step, FileStep):
        staged = file_sha256(tmp / "stage" / "file")
        if step_fingerprint(plan.step, folder, src_sha256=staged) != plan.fingerprint:
            # Edited between planning and copying: caching these bytes under the old key would poison the cache.
            raise ConfigError(
                f"{plan.step.file.src} changed while the image was being baked",
                fix="bake again once the file is saved",
            )
    (tmp / "stage" / "step.sh").write_text(script)
    ctx.log(f"--- {name}")
    output: list[str] = []

    def log(line: str) -> None:
        output.append(line)
        ctx.log(line)

    run_in_chroot(
        lowers=lowers,
        upper=tmp / "upper",
        work=tmp / "work",
        merged=tmp / "merged",
        stage=tmp / "stage",
        command=["/bin/sh", "/run/amiforge/step.sh"],
        log=log,
        timeout=STEP_TIMEOUT,
        what=name,
        drop_resolv_conf=plan.step is None,
    )
    for d in ("work", "merged", "stage"):
        shutil.rmtree(tmp / d)
    if plan.step is None:
        removed = [{"path": r.path, "kind": r.kind} for r in parse_generalised(output)]
        (tmp / GENERALISED_FILE).write_text(json.dumps(removed))
    size = publish_cache_entry(tmp, final, "upper")
    seconds = time.monotonic() - started
    ctx.phase_done(name, seconds, "miss")
    return final / "upper", False, seconds, size
