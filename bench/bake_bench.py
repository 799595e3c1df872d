"""Bake and boot benchmark for the local provider (`make bench`); results go to BENCHMARKS.md by hand.

Runs the real CLI against a private, empty data dir, so "cold" really is cold (the mmdebstrap base too):
  1. cold bake of examples/web including its boot test
  2. no-op rebuild (unchanged recipe, --no-test)
  3. one changed step (the page edited, --no-test)
  4. time-to-ready over N boots (`amiforge test`), p50 / p95
Prints each phase (base, each layer, generalise, initrd, mkfs, convert, boot) so regressions show, and the
ratio of each figure to its target (< 1.00 meets it).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
TARGETS = {
    "cold bake + boot test": 60.0,
    "no-op rebuild": 2.0,
    "one changed step": 10.0,
    "time-to-ready p95": 10.0,
}


def amiforge(env: dict[str, str], *args: str) -> tuple[float, Any]:
    started = time.monotonic()
    proc = subprocess.run(
        [sys.executable, "-m", "amiforge", *args, "--json"],
        env=env,
        capture_output=True,
        text=True,
        check=False,
    )
    elapsed = time.monotonic() - started
    if proc.returncode != 0:
        sys.exit(f"amiforge {' '.join(args)} failed (exit {proc.returncode}):\n{proc.stdout}\n{proc.stderr}")
    return elapsed, json.loads(proc.stdout)


def show_phases(label: str, out: dict[str, Any]) -> None:
    phases = dict(out.get("phases", {}))
    report = out.get("boot_report")
    if report:
        phases["boot (time-to-ready)"] = report["time_to_ready"]
    print(f"  {label} phases: " + ", ".join(f"{k} {v:.2f}s" for k, v in phases.items()))


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    k = max(0, min(len(ordered) - 1, round(q * (len(ordered) - 1))))
    return ordered[k]


def main() -> None:
    # A SIGTERM unwinds like Ctrl-C, so the private data dir below is always removed.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--boots", type=int, default=5, help="boots for the time-to-ready figure")
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="amiforge-bench-", dir="/var/tmp"))
    try:
        shutil.copytree(REPO / "examples" / "web", work / "web")
        recipe = str(work / "web" / "recipe.yaml")
        env = {k: v for k, v in os.environ.items() if not k.startswith("AMIFORGE_")}
        env["AMIFORGE_DATA_DIR"] = str(work / "data")
        results: dict[str, float] = {}

        results["cold bake + boot test"], out = amiforge(env, "bake", recipe)
        show_phases("cold", out)
        results["no-op rebuild"], out = amiforge(env, "bake", recipe, "--no-test")
        show_phases("no-op", out)
        page = work / "web" / "files" / "index.html"
        page.write_text(page.read_text().replace("Baked by amiforge.", "Baked by amiforge, edited."))
        results["one changed step"], out = amiforge(env, "bake", recipe, "--no-test")
        show_phases("changed", out)
        ref = f"web@{out['version']['number']}"
        ready = []
        for _ in range(args.boots):
            _, tested = amiforge(env, "test", ref)
            ready.append(float(tested["boot_report"]["time_to_ready"]))
        results["time-to-ready p95"] = percentile(ready, 0.95)
        print(f"  time-to-ready over {len(ready)} boots: " + ", ".join(f"{r:.1f}" for r in ready))
        print(f"  time-to-ready p50 {statistics.median(ready):.2f}s, accel {tested['boot_report']['accel']}")

        print(f"\n{'figure':<24}{'measured':>10}{'target':>10}{'ratio':>8}")
        for name, value in results.items():
            target = TARGETS[name]
            print(f"{name:<24}{value:>9.2f}s{target:>9.1f}s{value / target:>8.2f}")
        print(f"\nmachine: {os.cpu_count()} cores, {os.uname().release}; date {time.strftime('%Y-%m-%d')}")
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
