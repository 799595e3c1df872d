"""Start-up benchmark (`make bench-startup`): what a command costs before it does anything.

What it measures, for this working tree and (with --ref REV) for a git revision, side by side:
  1. Wall time, and CPU time (user + system, which machine load disturbs less), of `amiforge --help`,
     `amiforge keys list --json` and `amiforge images list --json`: the median of --runs fresh processes each
     (`python -m amiforge …`), on a private data dir whose registry is already at the newest schema (one untimed
     warm-up run per command creates it and fills the bytecode caches), so the figures are start-up plus one small
     read, never a migration.
  2. Import time: the seconds a process spends importing modules, summed over the top-level entries of
     `python -X importtime` (each one's cumulative time), for `import amiforge.cli.app` alone and for each command
     above. The median of the same runs. -X importtime itself slows imports a little; compare like with like.

A revision (--ref, and --after instead of the working tree) is measured from `git archive REV src` unpacked to a
temporary folder and put first on PYTHONPATH, with the project venv's interpreter and packages, so both sides differ
only in amiforge's own code. Each side has its own data dir (a revision may not know a newer schema). Runs alternate
between the sides, so machine noise falls on both alike. Nothing is written outside temporary folders; nothing
reaches the network (AWS_* and AMIFORGE_* variables of the caller are dropped).

Targets (issue: start-up): `--help` and read-only commands spend < 0.3 s in imports.
"""

from __future__ import annotations

import argparse
import os
import platform
import re
import resource
import statistics
import subprocess
import sys
import tarfile
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
COMMANDS: dict[str, list[str]] = {
    "amiforge --help": ["--help"],
    "amiforge keys list --json": ["keys", "list", "--json"],
    "amiforge images list --json": ["images", "list", "--json"],
}
IMPORT_ONLY = "import amiforge.cli.app"
IMPORT_TARGET_S = 0.3
_IMPORTTIME = re.compile(r"^import time:\s+\d+ \|\s+(\d+) \| (\S.*)$")


@dataclass
class Side:
    """One amiforge to measure: this working tree (pythonpath None) or a revision unpacked under `pythonpath`."""

    label: str
    pythonpath: Path | None
    data_dir: Path
    wall: dict[str, list[float]] = field(default_factory=dict)
    cpu: dict[str, list[float]] = field(default_factory=dict)
    imports: dict[str, list[float]] = field(default_factory=dict)

    def env(self) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith(("AMIFORGE_", "AWS_", "PYTHON"))}
        env["AMIFORGE_DATA_DIR"] = str(self.data_dir)
        env["COLUMNS"] = "120"
        if self.pythonpath is not None:
            env["PYTHONPATH"] = str(self.pythonpath)
        return env


def _argv(args: Sequence[str], *, importtime: bool) -> list[str]:
    flags = ["-X", "importtime"] if importtime else []
    if args and args[0] == "-c":
        return [sys.executable, *flags, *args]
    return [sys.executable, *flags, "-m", "amiforge", *args]


def _children_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def _run(side: Side, args: Sequence[str], *, importtime: bool) -> tuple[float, float, str]:
    cpu = _children_cpu()
    started = time.perf_counter()
    done = subprocess.run(
        _argv(args, importtime=importtime),
        capture_output=True,
        text=True,
        env=side.env(),
        cwd=side.data_dir.parent,
        timeout=300,
        check=False,
    )
    wall = time.perf_counter() - started
    if done.returncode != 0:
        raise SystemExit(f"{side.label}: amiforge {' '.join(args)} exited {done.returncode}:\n{done.stderr[-2000:]}")
    return wall, _children_cpu() - cpu, done.stderr


def import_seconds(stderr: str) -> float:
    """Seconds spent importing: the cumulative times of the top-level entries of -X importtime's report."""
    total_us = 0
    for line in stderr.splitlines():
        m = _IMPORTTIME.match(line)
        if m:  # the regex matches top-level entries only (one space before the name)
            total_us += int(m.group(1))
    return total_us / 1e6


def _unpack(rev: str, into: Path) -> Path:
    archive = subprocess.run(["git", "-C", str(ROOT), "archive", rev, "src"], capture_output=True, check=True).stdout
    tar = into / "src.tar"
    tar.write_bytes(archive)
    with tarfile.open(tar) as t:
        t.extractall(into, filter="data")
    return into / "src"


def measure(sides: list[Side], runs: int) -> None:
    jobs: list[tuple[str, list[str]]] = [(name, args) for name, args in COMMANDS.items()]
    jobs.append((IMPORT_ONLY, ["-c", "import amiforge.cli.app"]))
    for side in sides:  # warm-up: registry created and migrated, bytecode compiled
        for _, args in jobs:
            _run(side, args, importtime=False)
    for _ in range(runs):
        for name, args in jobs:
            for side in sides:
                if name != IMPORT_ONLY:
                    wall, cpu, _ = _run(side, args, importtime=False)
                    side.wall.setdefault(name, []).append(wall)
                    side.cpu.setdefault(name, []).append(cpu)
                _, _, report = _run(side, args, importtime=True)
                side.imports.setdefault(name, []).append(import_seconds(report))


def _fmt(values: list[float] | None) -> str:
    return f"{statistics.median(values):.3f} s" if values else "-"


def report(sides: list[Side], runs: int) -> str:
    head = [
        f"amiforge start-up, {datetime.now(UTC):%Y-%m-%d %H:%M} UTC; {platform.node()}: {os.cpu_count()} CPU, "
        f"Python {platform.python_version()}, load average {' '.join(f'{x:.2f}' for x in os.getloadavg())}",
        f"median of {runs} fresh processes per figure",
        "",
        "| figure | " + " | ".join(s.label for s in sides) + " |",
        "| --- |" + " --- |" * len(sides),
    ]
    rows = []
    for name in COMMANDS:
        rows.append(f"| `{name}` wall | " + " | ".join(_fmt(s.wall.get(name)) for s in sides) + " |")
    for name in COMMANDS:
        rows.append(f"| `{name}` CPU (user+sys) | " + " | ".join(_fmt(s.cpu.get(name)) for s in sides) + " |")
    for name in [*COMMANDS, IMPORT_ONLY]:
        label = f"`{name}` imports" if name != IMPORT_ONLY else f"`{IMPORT_ONLY}` imports"
        rows.append(f"| {label} | " + " | ".join(_fmt(s.imports.get(name)) for s in sides) + " |")
    after = sides[-1]
    over = [n for n in COMMANDS if statistics.median(after.imports[n]) >= IMPORT_TARGET_S]
    verdict = (
        f"target: imports < {IMPORT_TARGET_S} s for --help and the read-only commands: "
        + ("met" if not over else "NOT met by " + ", ".join(over))
        + f" ({after.label})"
    )
    return "\n".join([*head, *rows, "", verdict])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument("--runs", "-n", type=int, default=7, help="fresh processes per figure (median; default 7)")
    parser.add_argument("--ref", help="also measure this git revision (before), e.g. a commit before a change")
    parser.add_argument("--after", help="measure this git revision instead of the working tree (after)")
    args = parser.parse_args(argv)
    if args.runs < 1:
        parser.error("--runs must be at least 1")
    with tempfile.TemporaryDirectory(prefix="amiforge-startup-") as tmp:
        base = Path(tmp)
        sides: list[Side] = []
        if args.ref:
            before = base / "before"
            before.mkdir()
            sides.append(Side(f"before ({args.ref})", _unpack(args.ref, before), before / "data"))
        after = base / "after"
        after.mkdir()
        if args.after:
            sides.append(Side(f"after ({args.after})", _unpack(args.after, after), after / "data"))
        else:
            sides.append(Side("this tree" if not args.ref else "after (this tree)", None, after / "data"))
        for side in sides:
            side.data_dir.parent.mkdir(parents=True, exist_ok=True)
        measure(sides, args.runs)
        print(report(sides, args.runs))
    return 0


if __name__ == "__main__":
    sys.exit(main())
