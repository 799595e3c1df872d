"""The base layer: a minimal Debian root built once by mmdebstrap and kept, extracted, in the cache.

The key covers everything that shapes the base (suites, mirror, packages, the guest files amiforge bakes in,
the mmdebstrap version), so a change to any of them builds a new base and an unchanged one is reused.
The base already carries what every amiforge image needs: the cloud kernel (initramfs-tools diverted —
amiforge builds its own small initrd), systemd, networkd on DHCP, and the readiness unit.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

from amiforge.providers.guest import guest_file
from amiforge.providers.interface import RunContext
from amiforge.providers.local.tools import cached_size, publish_cache_entry, require, run, temporary_dir

# Bump when the way the base is built changes in a way the key cannot see.
BASE_FORMAT = 1

BASE_PACKAGES = ("linux-image-cloud-amd64", "systemd-sysv", "udev", "kmod", "ca-certificates")

# The systemd units amiforge bakes in (installed, not all enabled: amiforge-ready.service pulls in its repeat).
GUEST_UNITS = (
    "amiforge-ready.service",
    "amiforge-ready-repeat.service",
    "amiforge-heartbeat.service",
    "amiforge-ssh-keygen.service",
    "amiforge-release.service",
)
GUEST_FILES = (*GUEST_UNITS, "ready", "init")

# The local guest network (QEMU user networking, restrict=on) is IPv4 only. Asking for DHCPv6 or an IPv6
# link-local address there only delays network-online.target — which nginx and most daemons wait for — by
# ~1.5 s of IPv6 duplicate-address detection under TCG (measured with journalctl in the guest).
NETWORK_UNIT = """[Match]
Name=en* eth*

[Network]
DHCP=ipv4
LinkLocalAddressing=no
IPv6AcceptRA=no
"""

FSTAB = "LABEL=root / ext4 rw,relatime 0 0\n"

# Units a headless server image does not need at boot and that each cost ~0.5–2 s under TCG emulation
# (measured with systemd-analyze blame; notes in BENCHMARKS.md): debug/tracing/hugepage/fuse/configfs
# mounts, modules loaded "just in case", VT gettys (there is no screen), and LVM snapshot reaping.
# Security hardening of the remaining units is deliberately left alone.
BOOT_TRIM = (
    "modprobe@configfs.service",
    "modprobe@dm_mod.service",
    "modprobe@efi_pstore.service",
    "modprobe@fuse.service",
    "modprobe@loop.service",
    "sys-kernel-debug.mount",
    "sys-kernel-tracing.mount",
    "dev-hugepages.mount",
    "sys-fs-fuse-connections.mount",
    "sys-kernel-config.mount",
    "kmod-static-nodes.service",
    "systemd-network-generator.service",
    "systemd-pstore.service",
    "systemd-update-utmp-runlevel.service",
    "e2scrub_reap.service",
    "getty-static.service",
    "getty@tty1.service",
)

# Generators for storage this image never has (encrypted, verity, integrity volumes, GPT auto-discovery on a
# whole-disk ext4 root, hibernation in a VM). Each is an exec before systemd can even queue the boot job.
MASKED_GENERATORS = (
    "systemd-cryptsetup-generator",
    "systemd-gpt-auto-generator",
    "systemd-hibernate-resume-generator",
    "systemd-integritysetup-generator",
    "systemd-veritysetup-generator",
)


@dataclass(frozen=True)
class BaseSpec:
    suite: str
    mirror: str
    security_mirror: str
    packages: tuple[str, ...]

    def sources(self) -> list[str]:
        # All three suites: with only `bookworm` apt resolves an old kernel (notes/local-backend.md §3).
        return [
            f"deb {self.mirror} {self.suite} main",
            f"deb {self.mirror} {self.suite}-updates main",
            f"deb {self.security_mirror} {self.suite}-security main",
        ]

    def includes(self) -> list[str]:
        return sorted(set(BASE_PACKAGES) | set(self.packages))


def _mmdebstrap_version() -> str:
    return run(["mmdebstrap", "--version"]).strip()


def base_key(spec: BaseSpec) -> str:
    material = {
        "format": BASE_FORMAT,
        "sources": spec.sources(),
        "variant": "minbase",
        "includes": spec.includes(),
        "guest": {n: hashlib.sha256(guest_file(n)).hexdigest() for n in GUEST_FILES},
        "network": NETWORK_UNIT,
        "fstab": FSTAB,
        "trim": BOOT_TRIM,
        "generators": MASKED_GENERATORS,
        "mmdebstrap": _mmdebstrap_version(),
    }
    return hashlib.sha256(json.dumps(material, sort_keys=True).encode()).hexdigest()


def ensure_base(spec: BaseSpec, cache: Path, ctx: RunContext) -> tuple[str, Path, bool, int]:
    """Return (key, rootfs dir, hit, size in bytes). Builds into a temporary dir and renames it into place only when
    complete, so an interrupted build never leaves a half base that a later bake would trust."""
    key = base_key(spec)
    final = cache / "base" / key
    if (final / "rootfs").is_dir():
        return key, final / "rootfs", True, cached_size(final)
    require("mmdebstrap")
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = temporary_dir(ctx.cleanup, f".tmp-{key[:12]}-", final.parent)
    guest = tmp / "guest"
    guest.mkdir()
    for name in GUEST_FILES:
        (guest / name).write_bytes(guest_file(name))
    (guest / "network").write_text(NETWORK_UNIT)
    (guest / "fstab").write_text(FSTAB)
    g = str(guest)
    hooks = [
        # Debian's initramfs costs ~12 s to build and ~4 s per boot; amiforge makes a 1 MB one instead.
        'chroot "$1" dpkg-divert --quiet --local --rename --add /usr/sbin/update-initramfs'
        ' && ln -s /bin/true "$1/usr/sbin/update-initramfs"',
    ]
    customize = [
        *(f'install -D -m 0644 {g}/{unit} "$1/etc/systemd/system/{unit}"' for unit in GUEST_UNITS),
        f'install -D -m 0755 {g}/ready "$1/usr/local/lib/amiforge/ready"',
        f'install -D -m 0644 {g}/network "$1/etc/systemd/network/80-amiforge-dhcp.network"',
        f'install -D -m 0644 {g}/fstab "$1/etc/fstab"',
        'chroot "$1" systemctl enable --quiet amiforge-ready.service amiforge-ssh-keygen.service'
        " amiforge-release.service systemd-networkd.service",
        'chroot "$1" systemctl mask --quiet ' + " ".join(BOOT_TRIM),
        'mkdir -p "$1/etc/systemd/system-generators"',
        *(f'ln -sf /dev/null "$1/etc/systemd/system-generators/{g}"' for g in MASKED_GENERATORS),
    ]
    argv: list[str] = [
        "mmdebstrap",
        "--variant=minbase",
        "--include=" + ",".join(spec.includes()),
        "--aptopt=Acquire::Check-Valid-Until false",
        # Keep the package lists so steps install without an apt-get update; generalisation drops them.
        "--skip=cleanup/apt/lists",
    ]
    argv += [f"--essential-hook={h}" for h in hooks]
    argv += [f"--customize-hook={h}" for h in customize]
    argv += [spec.suite, str(tmp / "rootfs"), *spec.sources()]
    env = {"SOURCE_DATE_EPOCH": os.environ.get("SOURCE_DATE_EPOCH", "1700000000")}
    run(argv, log=ctx.log, timeout=1800, env=env, what="mmdebstrap (base layer)")
    shutil.rmtree(guest)
    size = publish_cache_entry(tmp, final, "rootfs")
    return key, final / "rootfs", False, size
