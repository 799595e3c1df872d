"""Telemetry benchmark (`make bench-telemetry`): the Prometheus exposition `/metrics` of `amiforge serve` on a large
registry, against its targets: **p95 of a scrape ≤ 100 ms**, and **memory flat across scrapes** (no growth in
proportion to the number of scrapes). It also says how many series Prometheus stores for it, per exported version.

The registry (SQLite, generated through the store API, deterministic for --seed; `--db PATH` keeps it and reuses it):

- --versions versions (default 1,000): images `img-000` … of --per-image versions each (default 50 × 20), each
  built with a digest, parents chained; 90% scanned (TESTED, SCANNED) with 12–60 synthetic CVE findings each (ids
  TEST-000000 …, packages `synthNNNN`: no real CVE), the older ones no longer in a channel DEPRECATED, one in 25
  FAILED after its boot test; channels `prod` (current: the version the fleets run, previous: the one before) and
  `dev` (the newest two) on every image;
- --fleets fleets (default 100), targets `local:fleet-000` …, fleet N running image N mod images. Every version
  after the first is rolled out to its image's fleets (`create_rollout` + `update_rollout`): 85% succeeded, 10%
  failed (rolled back), 5% aborted, and one fleet in 25 has the newest fleet version's rollout still running;
- --boots boots (default 1,000,000), recorded through `store.record_boots(target, observations)` in batches of
  --batch (default 5,000), as a collector would (boots and their totals in one transaction): 3–8 boot tests
  (`boot-test`) per version at its release; on the fleets, launches spread over a year of releases, each on the
  version the fleet ran at the time, lifetimes of hours (mean 8 h), stopped (`stopped_at`) when they ended and
  `replaced` when a rollout or self-healing took their place; 96.5% ready in 8–90 s (log-normal around 22 s),
  2% failed, 1.5% timeout (300 s); each fleet has 8–12 members running now (no `stopped_at`) on its current
  version (split with the new one during a running rollout), 95% with a heartbeat of the last minute, the rest
  10–30 minutes old. Every boot goes through record_boots, none is inserted behind its back: its rows/s is
  printed (15,000/s before feeac1a, 3,200/s after: a million in 1 or 5 minutes, slow but not too slow to use), and
  the totals it kept are checked against the boots table after generation.

What is measured, in this process (the same App `amiforge serve` runs):

1. a scrape: GET /metrics of the ASGI app (`web.app.create_app`) through Starlette's TestClient; one warm-up scrape
   first (it reads every exported scan's findings once and keeps the counts per scan id), then --runs scrapes
   (default 200): p50/p95/p99/max of wall time against the 100 ms target, and of the CPU time this process spent
   (time.process_time; on a shared machine wall time also waits for a core);
2. the same through a real HTTP server (`amiforge.web.server.serve` on 127.0.0.1, an ephemeral port, in a thread;
   urllib GET), --http-runs times (default 50);
3. where a scrape's time goes (--runs / 10 collections): each store read the collector makes and the writing of the
   text, beside the peer for the writing (prometheus_client's generate_latest of the same samples, which must be
   byte-identical); when the p95 misses its target (--profile auto), a cProfile of 5
   scrapes, the top functions by own time and amiforge's by cumulative time;
4. the peer: what the counters would cost without the totals table (`boot_totals`): one GROUP BY over all the boots
   per (version, target, outcome) with sum(time to ready) and sum(replaced), plus the running-instance counts (a
   GROUP BY of the running boots), --peer-runs times (default 5); and the same GROUP BY with the histogram's buckets
   as conditional sums (all that `boot_totals` gives). Printed as a ratio to the reads that replace them
   (`boot_totals(exported)` and the same running counts) and to a whole scrape. Over all the boots, not only the
   exported versions': without the totals the set of versions that booted comes from the boots too;
5. memory: RSS (VmRSS of /proc/self/status) before the timed scrapes, after, its largest growth and its growth over
   the second half of the scrapes; then tracemalloc's net growth (one frame) after each quarter of --trace-runs
   more scrapes (default 100, after 10 under tracing to warm up; not timed), with the lines that grew most: a leak
   grows quarter after quarter, a warm-up once;
6. series: the samples of one exposition (each is a series Prometheus stores), by family, the exported versions
   (versions with an `amiforge_version_info` sample), samples per exported version, and what one version costs per
   (version, target) pair on a fleet, on boot tests, and per version (vulnerabilities, version_info).

Results go to BENCHMARKS.md by hand. A reused --db keeps its boots where they were in time: at reuse the running
members' heartbeats are renewed through record_boots (as the collector thread would), but `recent_boot_seconds`
(boots decided in the last 24 h) thins out as the registry ages.
"""

from __future__ import annotations

import argparse
import cProfile
import dataclasses
import gc
import hashlib
import math
import os
import platform
import pstats
import random
import shutil
import signal
import sqlite3
import statistics
import sys
import tempfile
import threading
import time
import tracemalloc
import urllib.request
from collections import Counter
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

import sqlalchemy as sa
from measured import tree_state

from amiforge.model import BootObservation

if TYPE_CHECKING:
    from amiforge.model import BootOutcome
    from amiforge.policy.document import Policy
    from amiforge.store.interface import Store
    from amiforge.store.sql import SqlStore

SCRAPE_TARGET_MS = 100.0
ACTOR = "bench@synthetic"
BOOT_TEST = "boot-test"
DAY = timedelta(days=1)
HISTORY = timedelta(days=365)  # the first versions were released this long ago
MEAN_LIFETIME_H = 8.0  # hours a fleet member runs, on average (autoscaling, spot, self-healing)
RUNNING_ROLLOUT_EVERY = 25  # one fleet in N has a rollout still running
FAILED_EVERY = 25  # one version in N fails its boot test (and is FAILED)
SEVERITIES = ("critical", "high", "medium", "low", "negligible", "unknown")
SEVERITY_WEIGHTS = (3, 12, 35, 30, 12, 8)


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    k = max(0, min(len(ordered) - 1, round(q * (len(ordered) - 1))))
    return ordered[k]


def rss() -> int:
    """This process's resident set size now, in bytes (VmRSS of /proc/self/status)."""
    status = Path("/proc/self/status").read_text()
    return next(int(line.split()[1]) * 1024 for line in status.splitlines() if line.startswith("VmRSS:"))


def mib(n: float) -> str:
    return f"{n / 2**20:,.1f} MiB"


def image_name(i: int) -> str:
    return f"img-{i:03d}"


def fleet_target(f: int) -> str:
    return f"local:fleet-{f:03d}"


# --- generation -----------------------------------------------------------------------------------------------------


@dataclass
class Fleet:
    """One fleet's history: which version it ran when (from its rollouts), and the rollouts that did not stick."""

    index: int
    image: int
    serving: list[tuple[int, datetime, datetime]] = field(default_factory=list)  # (version id, from, until)
    waves: list[tuple[int, datetime]] = field(default_factory=list)  # (version id, when) of failed/aborted rollouts
    rolling: int | None = None  # the version of a rollout still running

    @property
    def target(self) -> str:
        return fleet_target(self.index)


@dataclass
class Layout:
    versions: dict[int, list[int]]  # image -> version ids, oldest first
    released: dict[int, datetime]  # version id -> release time
    failed: set[int]
    scanned: set[int]
    fleets: list[Fleet]


@dataclass
class Generated:
    seconds: float = 0.0
    versions_seconds: float = 0.0
    boots_seconds: float = 0.0
    boots: int = 0
    record_calls: int = 0
    rollouts: Counter[str] = field(default_factory=Counter)


def synthetic_findings(rng: random.Random, n: int) -> tuple[Any, ...]:
    from amiforge.model import Finding, FindingKind, Severity

    picked = rng.sample(range(1_000_000), n)
    severities = rng.choices(SEVERITIES, SEVERITY_WEIGHTS, k=n)
    return tuple(
        Finding(FindingKind.CVE, f"TEST-{k:06d}", Severity(s), "synthetic finding", "osv",
                package=f"synth{k % 5000:04d}", installed="1.0-1", fixed="1.0-2" if k % 3 else None)
        for k, s in zip(picked, severities, strict=True)
    )  # fmt: skip


def make_versions(store: SqlStore, rng: random.Random, args: argparse.Namespace, now: datetime, gen: Generated
                  ) -> Layout:  # fmt: skip
    """Versions, scans, channels and rollouts through the store API (a few thousand transactions)."""
    from amiforge.model import ScanRecord, Status
    from amiforge.scanners.sbom import sbom_digest
    from amiforge.strategy import Strategy

    images = max(1, args.versions // args.per_image)
    per_image = args.per_image if args.versions >= args.per_image else args.versions
    sbom = '{"bomFormat": "CycloneDX", "specVersion": "1.6", "metadata": {"component": {"name": "synthetic"}}}'
    digest_of_sbom = sbom_digest(sbom)
    start = now - HISTORY
    step = (HISTORY - 5 * DAY) / max(1, per_image - 1)  # the newest version was released 5 days ago
    layout = Layout({}, {}, set(), set(), [])
    for i in range(images):
        name = image_name(i)
        ids: list[int] = []
        parent: str | None = None
        offset = timedelta(hours=rng.uniform(0, 48))
        for k in range(per_image):
            v = store.create_version(name=name, recipe_digest=hashlib.sha256(f"{name}-{k}".encode()).hexdigest(),
                                     recipe_path=f"/bench/{name}.yaml", provider="local", tags={"owner": "bench"},
                                     parent=parent, recipe="{}")  # fmt: skip
            store.transition(v.id, Status.BUILT, expect=Status.BAKING, digest=f"sha256:{v.id:064x}",
                             size_bytes=2 << 30)  # fmt: skip
            layout.released[v.id] = start + step * k + offset
            if 0 < k < per_image - 2 and rng.randrange(FAILED_EVERY) == 0:  # its boot test failed
                store.transition(v.id, Status.FAILED, expect=Status.BUILT)
                layout.failed.add(v.id)
            else:
                store.transition(v.id, Status.TESTED, expect=Status.BUILT)
                if rng.random() < 0.9 or k >= per_image - 2:
                    findings = synthetic_findings(rng, rng.randint(12, 60))
                    scanned = layout.released[v.id]
                    store.add_scan(v.id, ScanRecord(scanned, (), sbom, digest_of_sbom, findings,
                                                    "synthetic vulndb (bench)", release="12"))  # fmt: skip
                    store.transition(v.id, Status.SCANNED, expect=Status.TESTED)
                    layout.scanned.add(v.id)
                parent = v.ref
            ids.append(v.id)
        layout.versions[i] = ids

    # Fleets and their rollouts: every version after the first that did not fail, in order.
    strategy = Strategy().model_dump(mode="json")
    for f in range(args.fleets):
        fleet = Fleet(f, f % images)
        ids = [vid for vid in layout.versions[fleet.image] if vid not in layout.failed]
        # The newest two are in dev only; the newest fleet version may be rolling out on one fleet in 25.
        candidates = ids[: max(1, len(ids) - 2)]
        current, since = candidates[0], layout.released[candidates[0]]
        for n, vid in enumerate(candidates[1:], 1):
            when = layout.released[vid] + timedelta(days=rng.uniform(1, 3))
            rollout = store.create_rollout(fleet.target, vid, strategy=strategy, waves=[3, 3, 4], actor=ACTOR)
            if n == len(candidates) - 1 and f % RUNNING_ROLLOUT_EVERY == RUNNING_ROLLOUT_EVERY // 2:
                fleet.rolling, state = vid, "running"
            else:
                state = rng.choices(("succeeded", "failed", "aborted"), (85, 10, 5))[0]
                store.update_rollout(rollout.id, expect="running", state=state, wave=3)
            gen.rollouts[state] += 1
            if state == "succeeded":
                fleet.serving.append((current, since, when))
                current, since = vid, when
            elif state != "running":
                fleet.waves.append((vid, when))
        fleet.serving.append((current, since, now))
        layout.fleets.append(fleet)

    # Channels: prod holds what the image's first fleet runs (previous: what it ran before), dev the newest two.
    for i, ids in layout.versions.items():
        name = image_name(i)
        good = [vid for vid in ids if vid not in layout.failed]
        first = next((fl for fl in layout.fleets if fl.image == i), None)
        prod = [vid for vid, _, _ in first.serving[-2:]] if first else good[-4:-2]
        for channel, chain in (("prod", prod), ("dev", good[-2:])):
            held: int | None = None
            for vid in chain:
                store.move_channel(name, channel, vid, expect_current=held, actor=ACTOR, reason="bench seed")
                held = vid
        # Versions older than prod's previous that no channel holds and no fleet runs now: deprecated.
        keep = set(prod) | set(good[-2:]) | {fl.serving[-1][0] for fl in layout.fleets if fl.image == i}
        floor = min(prod) if prod else 0
        for vid in good:
            if vid < floor and vid not in keep:
                was = Status.SCANNED if vid in layout.scanned else Status.TESTED
                store.transition(vid, Status.DEPRECATED, expect=was)
    return layout


def _outcome(rng: random.Random, weights: tuple[float, float, float]) -> BootOutcome:
    outcomes: tuple[BootOutcome, ...] = ("ready", "failed", "timeout")
    return rng.choices(outcomes, weights)[0]


def _ttr(rng: random.Random) -> float:
    return round(min(90.0, max(8.0, math.exp(rng.gauss(math.log(22.0), 0.45)))), 3)


def a_boot(rng: random.Random, instance: str, vid: int, launched: datetime, weights: tuple[float, float, float],
           stopped: datetime | None, replaced: bool, heartbeat: datetime | None, *, heal: bool = True
           ) -> BootObservation:  # fmt: skip
    """One boot: its outcome drawn from `weights` (ready, failed, timeout). A stopped member that did not become ready
    was stopped a few minutes after its outcome, replaced by another when `heal` (a fleet's self-healing)."""
    outcome = _outcome(rng, weights)
    if outcome == "ready":
        ttr: float | None = _ttr(rng)
        ended = launched + timedelta(seconds=ttr or 0)
    else:
        ttr = None
        ended = launched + timedelta(seconds=300 if outcome == "timeout" else rng.uniform(15, 120))
        heartbeat = None  # it never became ready: no agent heard
        if stopped is not None:
            stopped = min(stopped, ended + timedelta(minutes=rng.uniform(2, 10)))
            replaced = heal  # self-healing put another member in its place
    if stopped is not None:
        stopped = max(stopped, ended)
        if heartbeat is not None:
            heartbeat = max(ended, stopped - timedelta(seconds=rng.uniform(0, 60)))
    detail = "" if outcome == "ready" else f"synthetic {outcome}"
    return BootObservation(instance, vid, launched, outcome, ttr, ended, stopped, replaced, heartbeat, detail)


def fleet_boots(rng: random.Random, fleet: Fleet, count: int, now: datetime) -> list[BootObservation]:
    """`count` boots of one fleet: its running members now, the waves of rollouts that did not stick, and the
    rest spread over the time it ran each version."""
    boots: list[BootObservation] = []
    serial = iter(range(10**7))
    weights = (96.5, 2.0, 1.5)
    name = fleet.target.partition(":")[2]
    current, since, _ = fleet.serving[-1]
    # Members running now (8-12), launched since the current version took over (at most 3 days ago).
    for m in range(rng.randint(8, 12)):
        vid = fleet.rolling if fleet.rolling is not None and m % 2 == 0 else current
        launched = now - timedelta(seconds=rng.uniform(600, min(3 * 86400, (now - since).total_seconds())))
        boot = a_boot(rng, f"{name}-{next(serial):07d}", vid, launched, (97.0, 3.0, 0.0), None, False, None)
        if boot.outcome == "ready":
            stale = rng.random() < 0.05
            heard = now - timedelta(seconds=rng.uniform(600, 1800) if stale else rng.uniform(5, 60))
            boot = dataclasses.replace(boot, last_heartbeat_at=heard)
        if m == 0:  # one member still booting: launched a moment ago, no outcome yet
            boot = BootObservation(boot.instance, vid, now - timedelta(seconds=rng.uniform(2, 7)))
        boots.append(boot)
    # The wave of each failed or aborted rollout: 3 members of the new version, replaced back within the hour.
    for vid, when in fleet.waves:
        for _ in range(3):
            launched = when + timedelta(seconds=rng.uniform(0, 120))
            stopped = launched + timedelta(minutes=rng.uniform(20, 60))
            boots.append(a_boot(rng, f"{name}-{next(serial):07d}", vid, launched, (80.0, 12.0, 8.0), stopped, True,
                                stopped))  # fmt: skip
    # The rest: launches uniform over the fleet's life, each on the version it ran then.
    first = fleet.serving[0][1]
    span = (now - timedelta(hours=1) - first).total_seconds()
    rest = max(0, count - len(boots))
    starts = sorted(first + timedelta(seconds=rng.uniform(0, span)) for _ in range(rest))
    k = 0
    for launched in starts:
        while k < len(fleet.serving) - 1 and launched >= fleet.serving[k][2]:
            k += 1
        vid, _, until = fleet.serving[k]
        stopped = launched + timedelta(hours=rng.expovariate(1 / MEAN_LIFETIME_H))
        replaced = False
        if k < len(fleet.serving) - 1 and stopped > until:  # a rollout replaced it
            stopped, replaced = until + timedelta(minutes=rng.uniform(0, 30)), True
        if stopped >= now:
            stopped = now - timedelta(minutes=rng.uniform(1, 50))
        boots.append(a_boot(rng, f"{name}-{next(serial):07d}", vid, launched, weights, stopped, replaced, stopped))
    return boots


def boot_tests(rng: random.Random, layout: Layout, count: int) -> list[BootObservation]:
    boots: list[BootObservation] = []
    ids = sorted(layout.released)
    per = [count // len(ids) + (1 if n < count % len(ids) else 0) for n in range(len(ids))]
    for vid, n in zip(ids, per, strict=True):
        for j in range(n):
            launched = layout.released[vid] - timedelta(hours=2, minutes=10 * j)
            weights = (0.0, 80.0, 20.0) if vid in layout.failed and j == 0 else (90.0, 7.0, 3.0)
            ended = launched + timedelta(minutes=6)
            boots.append(a_boot(rng, f"run-{vid}-{j}", vid, launched, weights, ended, False, ended, heal=False))
    return boots


def record(store: SqlStore, target: str, boots: list[BootObservation], batch: int, gen: Generated) -> None:
    boots.sort(key=lambda b: b.launched_at)
    for start in range(0, len(boots), batch):
        started = time.perf_counter()
        store.record_boots(target, boots[start : start + batch])
        gen.boots_seconds += time.perf_counter() - started
        gen.record_calls += 1
    gen.boots += len(boots)


def generate(url: str, args: argparse.Namespace) -> Generated:
    from amiforge.store.sql import open_store

    gen = Generated()
    rng = random.Random(args.seed)
    now = datetime.now(UTC)
    started = time.perf_counter()
    with open_store(url) as store:
        print(f"generating {args.versions:,} versions, {args.fleets} fleets, {args.boots:,} boots (seed {args.seed})"
              " …", flush=True)  # fmt: skip
        layout = make_versions(store, rng, args, now, gen)
        gen.versions_seconds = time.perf_counter() - started
        print(f"  versions, scans, channels, rollouts: {gen.versions_seconds:.1f} s "
              f"(rollouts {dict(gen.rollouts)})", flush=True)  # fmt: skip
        tests = min(args.boots, sum(rng.randint(3, 8) for _ in layout.released))
        record(store, BOOT_TEST, boot_tests(rng, layout, tests), args.batch, gen)
        fleet_total = args.boots - tests
        fleets = layout.fleets
        for n, fleet in enumerate(fleets):
            count = fleet_total // len(fleets) + (1 if n < fleet_total % len(fleets) else 0) if fleets else 0
            record(store, fleet.target, fleet_boots(rng, fleet, count, now), args.batch, gen)
            if (n + 1) % 20 == 0:
                print(f"  {n + 1} fleets, {gen.boots:,} boots recorded, {gen.boots / gen.boots_seconds:,.0f} rows/s "
                      "in record_boots", flush=True)  # fmt: skip
    gen.seconds = time.perf_counter() - started
    rate = gen.boots / max(gen.boots_seconds, 1e-9)
    print(f"  generated in {gen.seconds:.1f} s: {gen.boots:,} boots in {gen.record_calls} record_boots calls, "
          f"{gen.boots_seconds:.1f} s ({rate:,.0f} rows/s)", flush=True)  # fmt: skip
    return gen


def check_totals(engine: sa.Engine) -> str:
    """The totals record_boots kept against the boots they count (they must agree exactly)."""
    with engine.connect() as conn:
        boots = conn.execute(sa.text(
            "SELECT count(*), count(outcome), sum(outcome = 'ready'), sum(replaced), sum(stopped_at IS NULL), "
            "count(DISTINCT target) FROM boots")).one()  # fmt: skip
        totals = conn.execute(sa.text("SELECT count(*), sum(ready + failed + timeout), sum(ready), sum(replaced) "
                                      "FROM boot_totals")).one()  # fmt: skip
    agree = (boots[1], boots[2], boots[3]) == (totals[1], totals[2], totals[3])
    line = (f"registry: {boots[0]:,} boots on {boots[5]} targets ({boots[4]:,} running), {totals[0]:,} boot_totals "
            f"rows; outcomes {boots[1]:,} (ready {boots[2]:,}), replaced {boots[3]:,}: totals "
            f"{'agree' if agree else f'DISAGREE ({totals[1]}, {totals[2]}, {totals[3]})'}")  # fmt: skip
    if not agree:
        raise SystemExit(line)
    return line


def renew_heartbeats(store: SqlStore) -> int:
    """A reused registry: the running members' heartbeats as the collector would renew them now (all but the
    stale 5%, chosen by instance)."""
    now = datetime.now(UTC)
    by_target: dict[str, list[BootObservation]] = {}
    running = [b for b in store.boots_in_window(now, now + timedelta(seconds=1)) if b.stopped_at is None]
    for b in running:
        if b.outcome == "ready" and int(hashlib.sha256(b.instance.encode()).hexdigest(), 16) % 20:
            by_target.setdefault(b.target, []).append(BootObservation(b.instance, b.version_id, b.launched_at,
                                                                      last_heartbeat_at=now))  # fmt: skip
    return sum(store.record_boots(target, boots) for target, boots in by_target.items())


# --- measuring --------------------------------------------------------------------------------------------------------


class Scraper:
    """GET /metrics through the ASGI app `amiforge serve` runs (FastAPI), in this process (Starlette's TestClient;
    /metrics open, as `serve --open-metrics` serves it)."""

    def __init__(self, store: Store, policy: Policy) -> None:
        from fastapi.testclient import TestClient

        from amiforge.settings import Settings
        from amiforge.web.app import create_app
        from amiforge.web.context import Context, Controllers
        from amiforge.web.metrics import Metrics

        settings = Settings(actor=ACTOR)
        self.metrics = Metrics(store, policy)
        context = Context(store, settings, self.metrics, Controllers(store), open_metrics=True)
        self.client = TestClient(create_app(context))

    def __call__(self) -> bytes:
        reply = self.client.get("/metrics")
        if reply.status_code != 200:
            raise SystemExit(f"/metrics answered {reply.status_code}: {reply.content[:500]!r}")
        return bytes(reply.content)


def timed(runs: int, work: Callable[[], object]) -> list[float]:
    times = []
    for _ in range(runs):
        started = time.perf_counter()
        work()
        times.append((time.perf_counter() - started) * 1000)
    return times


def summary(times: list[float]) -> dict[str, float]:
    return {"p50": statistics.median(times), "p95": percentile(times, 0.95), "p99": percentile(times, 0.99),
            "max": max(times), "mean": statistics.fmean(times)}  # fmt: skip


class TimedStore:
    """The store, with the time spent in each method the collector calls added up."""

    def __init__(self, store: Store) -> None:
        self._store = store
        self.spent: dict[str, float] = {}

    def __getattr__(self, name: str) -> Any:
        attr = getattr(self._store, name)
        if not callable(attr):
            return attr

        def call(*args: Any, **kwargs: Any) -> Any:
            started = time.perf_counter()
            try:
                return attr(*args, **kwargs)
            finally:
                self.spent[name] = self.spent.get(name, 0.0) + time.perf_counter() - started

        return call


def breakdown(store: Store, policy: Policy, runs: int) -> list[tuple[str, float]]:
    """Mean ms per scrape: each store read, writing the text (the rest of render()), and the peer for the writing:
    prometheus_client's `generate_latest` of the same samples (parsed back from our text, which must be the bytes it
    writes: the bench stops if not)."""
    from prometheus_client import CollectorRegistry, generate_latest
    from prometheus_client.core import Metric
    from prometheus_client.parser import text_string_to_metric_families
    from prometheus_client.registry import Collector

    from amiforge.lifecycle.exporter import TelemetryCollector

    proxy = TimedStore(store)
    collector = TelemetryCollector(cast("Store", proxy), policy)
    text = collector.render()  # the scans' counts and the rows' text, once
    proxy.spent.clear()

    class Frozen(Collector):
        def __init__(self, families: list[Metric]) -> None:
            self.families = families

        def collect(self) -> Iterable[Metric]:
            return iter(self.families)

    registry = CollectorRegistry(auto_describe=False)
    registry.register(Frozen(list(text_string_to_metric_families(text.decode()))))
    if generate_latest(registry) != text:
        raise SystemExit("the exposition differs from prometheus_client's generate_latest of the same samples")
    render_s = cold_s = peer_s = 0.0
    for _ in range(runs):
        started = time.perf_counter()
        collector.render()
        render_s += time.perf_counter() - started
        collector._caches.boots.clear()  # the next render writes every row afresh (a scrape after everything moved)
        reads_before = sum(proxy.spent.values())
        started = time.perf_counter()
        collector.render()
        cold_s += time.perf_counter() - started - (sum(proxy.spent.values()) - reads_before)
        started = time.perf_counter()
        generate_latest(registry)
        peer_s += time.perf_counter() - started
    reads = sum(proxy.spent.values()) / 2  # two renders a run
    rows = [(f"store.{name}()", s / 2 / runs * 1000)
            for name, s in sorted(proxy.spent.items(), key=lambda kv: -kv[1])]  # fmt: skip
    rows.append(("writing the text (render() less its reads), unchanged rows reused", (render_s - reads) / runs * 1000))
    rows.append(("writing the text with every row written afresh", cold_s / runs * 1000))
    rows.append(
        ("peer: prometheus_client's generate_latest of the same samples (rendering only)", peer_s / runs * 1000)
    )
    return rows


PEER_COUNTERS = """SELECT version_id, target, outcome, count(*), sum(time_to_ready), sum(replaced)
FROM boots GROUP BY version_id, target, outcome"""
PEER_RUNNING = "SELECT version_id, target, count(*) FROM boots WHERE stopped_at IS NULL GROUP BY version_id, target"


def peer_histogram(buckets: Iterable[float]) -> str:
    sums = ", ".join(f"sum(time_to_ready <= {b:g})" for b in buckets)
    return (f"SELECT version_id, target, outcome, count(*), sum(time_to_ready), sum(replaced), {sums} "
            "FROM boots GROUP BY version_id, target, outcome")  # fmt: skip


def peer(engine: sa.Engine, query: str) -> Callable[[], object]:
    def run() -> object:
        with engine.connect() as conn:
            return [*conn.execute(sa.text(query)).all(), *conn.execute(sa.text(PEER_RUNNING)).all()]

    return run


def exported_ids(store: Store, policy: Policy) -> list[int]:
    from amiforge.lifecycle.exporter import TelemetryCollector

    collector = TelemetryCollector(store, policy)
    channels = store.channels()
    held = store.version_states({p.current for p in channels} | {p.previous for p in channels if p.previous})
    return sorted(collector._exported(channels_ids={vid for vid, _ in held.values()},
                                      running_ids={vid for vid, _, _ in store.running_members()},
                                      booted=store.versions_with_boots()))  # fmt: skip


@dataclass
class Series:
    total: int
    families: list[tuple[str, str, int]]  # name, type, samples
    versions: int
    with_version: int  # samples with a version label
    pair_costs: Counter[tuple[str, int]]  # (fleet|boot-test, samples per (version, target)) -> pairs
    per_version_costs: Counter[int]  # samples per version without a target label -> versions
    info_channels: int  # version_info samples
    recent: int


def count_series(text: str) -> Series:
    from prometheus_client.parser import text_string_to_metric_families

    families: list[tuple[str, str, int]] = []
    versions: set[str] = set()
    with_version = 0
    pairs: Counter[tuple[str, str]] = Counter()
    per_version: Counter[str] = Counter()
    info = recent = 0
    for family in text_string_to_metric_families(text):
        families.append((family.name, family.type, len(family.samples)))
        for s in family.samples:
            version = s.labels.get("version")
            if version is None:
                continue
            with_version += 1
            if family.name == "amiforge_version_info":
                versions.add(version)
                info += 1
            if family.name == "amiforge_recent_boot_seconds":
                recent += 1
            elif "target" in s.labels:
                pairs[(version, s.labels["target"])] += 1
            else:
                per_version[version] += 1
    pair_costs = Counter(("boot-test" if t == BOOT_TEST else "fleet", n) for (_, t), n in pairs.items())
    total = sum(n for _, _, n in families)
    return Series(total, families, len(versions), with_version, pair_costs, Counter(per_version.values()), info,
                  recent)  # fmt: skip


def http_scrapes(store: Store, policy: Policy, data_dir: Path, runs: int) -> list[float]:
    from amiforge.settings import Settings
    from amiforge.web.server import Listen, serve

    urls: list[str] = []
    up = threading.Event()

    def ready(url: str) -> None:
        urls.append(url)
        up.set()

    settings = Settings(data_dir=data_dir, actor=ACTOR)
    thread = threading.Thread(target=serve, args=(Listen("127.0.0.1", 0),), daemon=True,
                              kwargs={"store": store, "settings": settings, "policy": policy, "collect_every": None,
                                      "ready": ready, "open_metrics": True})  # fmt: skip
    thread.start()  # a daemon: it ends with this process (serve() has no stop but a signal)
    if not up.wait(30):
        raise SystemExit("amiforge serve did not start listening in 30 s")

    def get() -> bytes:
        with urllib.request.urlopen(f"{urls[0]}/metrics", timeout=60) as reply:
            return bytes(reply.read())

    for _ in range(2):
        get()  # its collector's scan counts, the connection pool
    return timed(runs, get)


def profile_scrapes(scrape: Callable[[], bytes], runs: int, top: int) -> list[str]:
    """cProfile of `runs` scrapes: the top functions by own time, and amiforge's own by cumulative time."""
    profiler = cProfile.Profile()
    profiler.enable()
    for _ in range(runs):
        scrape()
    profiler.disable()
    stats = pstats.Stats(profiler)
    rows = stats.stats.items()  # type: ignore[attr-defined]
    total = sum(t for (_, _, t, _, _) in stats.stats.values())  # type: ignore[attr-defined]
    lines = [f"cProfile of {runs} scrapes ({total / runs * 1000:.0f} ms of function time a scrape under the profiler)"]
    for title, index, only in (("by own time", 2, ""), ("amiforge's own, by cumulative time", 3, "/amiforge/")):
        lines += [f"  {title}:", f"  {'own ms':>8} {'cum ms':>8} {'calls':>9}  (a scrape)  where"]
        ranked = sorted((kv for kv in rows if only in kv[0][0]), key=lambda kv: kv[1][index], reverse=True)
        for (file, line, name), (_cc, calls, own, cum, _callers) in ranked[:top]:
            for marker in ("/site-packages/", "/src/", "/lib/python3.11/"):
                file = file.split(marker, 1)[-1]
            lines.append(
                f"  {own / runs * 1000:8.1f} {cum / runs * 1000:8.1f} {calls // runs:>9,}  {file}:{line} {name}"
            )
    return lines


def traced_growth(scrape: Callable[[], bytes], runs: int) -> tuple[list[int], list[str]]:
    """tracemalloc's net growth (bytes) since the start after each quarter of `runs` scrapes (10 under tracing
    first): a leak grows quarter after quarter, a warm-up does not. Also the lines that grew most in all."""
    tracemalloc.start(1)  # one frame: lines are enough (ten make a scrape several times slower again)
    try:
        for _ in range(10):
            scrape()
        gc.collect()
        before, first = tracemalloc.get_traced_memory()[0], tracemalloc.take_snapshot()
        growth = []
        for quarter in range(4):
            for _ in range(runs * (quarter + 1) // 4 - runs * quarter // 4):
                scrape()
            gc.collect()
            growth.append(tracemalloc.get_traced_memory()[0] - before)
        last = tracemalloc.take_snapshot()
    finally:
        tracemalloc.stop()
    top = last.compare_to(first, "lineno")[:5]
    return growth, [f"    {stat}" for stat in top if stat.size_diff > 0]


# --- the whole ------------------------------------------------------------------------------------------------------


def ms_row(label: str, s: dict[str, float], target: float | None = None) -> str:
    ratio = ""
    if target:
        r = s["p95"] / target
        ratio = f"**{r:.2f}**" if r > 1 else f"{r:.2f}"
    return (f"| {label} | {s['p50']:.1f} | {s['p95']:.1f} | {s['p99']:.1f} | {s['max']:.1f} | "
            f"{f'{target:g} ms' if target else ''} | {ratio} |")  # fmt: skip


def measure(url: str, args: argparse.Namespace, data_dir: Path, gen: Generated | None) -> None:
    from amiforge.lifecycle.exporter import histogram_buckets
    from amiforge.policy.document import default_policy
    from amiforge.store.sql import open_store

    policy = default_policy()
    with open_store(url) as store:
        if gen is None:
            print(f"  renewed {renew_heartbeats(store):,} running members' heartbeats", flush=True)
        print(check_totals(store.engine), flush=True)
        scrape = Scraper(store, policy)
        started = time.perf_counter()
        body = scrape()
        warm_ms = (time.perf_counter() - started) * 1000
        series = count_series(body.decode())
        print(f"warm-up scrape (reads every exported scan's findings): {warm_ms:.0f} ms, {len(body):,} bytes, "
              f"{series.total:,} samples", flush=True)  # fmt: skip

        # 1. Scrapes in-process, with RSS after each.
        gc.collect()
        rss_before = rss()
        rss_after_each: list[int] = []
        times: list[float] = []
        cpu: list[float] = []  # this process's CPU time: on a shared machine, wall time also waits for a core
        for _ in range(args.runs):
            started, cpu_started = time.perf_counter(), time.process_time()
            scrape()
            times.append((time.perf_counter() - started) * 1000)
            cpu.append((time.process_time() - cpu_started) * 1000)
            rss_after_each.append(rss())
        rss_after = rss()
        half = len(rss_after_each) // 2
        second_half_growth = rss_after_each[-1] - rss_after_each[half] if half else 0
        in_process, in_process_cpu = summary(times), summary(cpu)
        print(f"{args.runs} scrapes in-process: p50 {in_process['p50']:.1f} ms, p95 {in_process['p95']:.1f} ms, "
              f"p99 {in_process['p99']:.1f} ms, max {in_process['max']:.1f} ms (target p95 ≤ {SCRAPE_TARGET_MS:g} ms)",
              flush=True)  # fmt: skip
        print(f"  RSS {mib(rss_before)} before, {mib(rss_after)} after; largest growth "
              f"{mib(max(rss_after_each) - rss_before)}; over the second half ({args.runs - half} scrapes) "
              f"{mib(second_half_growth)}", flush=True)  # fmt: skip

        # 2. Through a real HTTP server.
        http: dict[str, float] | None = None
        if args.http_runs:
            http = summary(http_scrapes(store, policy, data_dir, args.http_runs))
            print(f"{args.http_runs} scrapes over HTTP: p50 {http['p50']:.1f} ms, p95 {http['p95']:.1f} ms, "
                  f"p99 {http['p99']:.1f} ms", flush=True)  # fmt: skip

        # 3. Where the time goes.
        parts = breakdown(store, policy, max(5, args.runs // 10))
        print("where a scrape's time goes (mean ms):", flush=True)
        for label, ms in parts:
            print(f"  {ms:8.2f}  {label}", flush=True)
        print(f"  rendering: {parts[-1][1] * 1000 / series.total:.1f} µs a sample", flush=True)
        missed = in_process["p95"] > SCRAPE_TARGET_MS
        profile = []
        if args.profile == "always" or (args.profile == "auto" and missed):
            profile = profile_scrapes(scrape, 5, args.top)

        # 4. The peer: the counters from the boots themselves.
        exported = exported_ids(store, policy)

        def peer_running() -> object:
            with store.engine.connect() as conn:
                return conn.execute(sa.text(PEER_RUNNING)).all()

        with_totals = summary(timed(max(args.peer_runs, 20), lambda: (store.boot_totals(exported), peer_running())))
        print(f"counters from boot_totals ({len(exported)} exported versions) + running counts: "
              f"p50 {with_totals['p50']:.1f} ms", flush=True)  # fmt: skip
        peer_plain = summary(timed(args.peer_runs, peer(store.engine, PEER_COUNTERS)))
        print(f"peer: GROUP BY (version, target, outcome) over the boots + running counts: "
              f"p50 {peer_plain['p50']:.0f} ms", flush=True)  # fmt: skip
        buckets = histogram_buckets(policy)
        peer_hist = summary(timed(args.peer_runs, peer(store.engine, peer_histogram(buckets))))
        print(f"peer with the histogram's {len(buckets)} buckets as sums: p50 {peer_hist['p50']:.0f} ms", flush=True)

        # 5. tracemalloc across the last scrapes.
        quarters, grew = traced_growth(scrape, args.trace_runs) if args.trace_runs else ([0], [])
        growth = quarters[-1]
        steps = " → ".join(f"{g / 1024:+,.1f}" for g in quarters)
        if args.trace_runs:
            print(f"tracemalloc: net growth {growth / 1024:+,.1f} KiB across {args.trace_runs} scrapes "
                  f"(after each quarter: {steps} KiB)", flush=True)  # fmt: skip
            if growth > 0:
                print("\n".join(grew))
        rss_end = rss()
        cached = len(scrape.metrics.collector._caches.vulns)

    # --- the report --------------------------------------------------------------------------------------------------
    print("\n| figure | p50 ms | p95 ms | p99 ms | max ms | target (p95) | ratio |")
    print("| --- | ---: | ---: | ---: | ---: | ---: | ---: |")
    print(ms_row(f"**scrape /metrics, in-process ASGI** ({args.runs} runs)", in_process, SCRAPE_TARGET_MS))
    print(ms_row("the same scrapes' CPU time (this process)", in_process_cpu, SCRAPE_TARGET_MS))
    if http:
        print(ms_row(f"scrape /metrics over HTTP, `serve` on 127.0.0.1 ({args.http_runs} runs)", http,
                     SCRAPE_TARGET_MS))  # fmt: skip
    print(ms_row(f"counters from `boot_totals` ({len(exported)} versions) + running counts", with_totals))
    print(ms_row(f"peer: GROUP BY over all boots + running counts ({args.peer_runs} runs)", peer_plain))
    print(ms_row(f"peer with histogram buckets ({len(buckets)} sums)", peer_hist))
    ratio_reads = peer_plain["p50"] / with_totals["p50"]
    ratio_scrape = peer_plain["p50"] / in_process["p50"]
    print(f"\npeer ÷ totals read: {ratio_reads:,.0f}× (p50); peer ÷ whole scrape: {ratio_scrape:.1f}×; "
          f"with buckets ÷ whole scrape: {peer_hist['p50'] / in_process['p50']:.1f}×")  # fmt: skip

    print("\n| memory | value |")
    print("| --- | ---: |")
    print(f"| RSS before the {args.runs} timed scrapes | {mib(rss_before)} |")
    print(f"| RSS after them | {mib(rss_after)} |")
    print(f"| largest RSS growth during them | {mib(max(rss_after_each) - rss_before)} |")
    print(f"| RSS growth over their second half | {mib(second_half_growth)} |")
    if args.trace_runs:
        print(f"| tracemalloc net growth across {args.trace_runs} more scrapes (after each quarter) | {steps} KiB |")
    print(f"| RSS at the end (after HTTP, peer, tracing) | {mib(rss_end)} |")
    print(f"| scans' counts kept by the collector | {cached} |")

    print(f"\nseries: {series.total:,} samples in one exposition ({len(body):,} bytes); {series.versions} exported "
          f"versions; {series.with_version:,} samples name a version: {series.with_version / series.versions:.1f} a "
          f"version ({series.total / series.versions:.1f} counting every sample)")  # fmt: skip
    print("\n| family | type | samples |")
    print("| --- | --- | ---: |")
    for name, kind, n in series.families:
        print(f"| {name} | {kind} | {n:,} |")
    n_buckets = len(buckets) + 1
    print(f"\nper (version, target) pair (boot_attempts ×3 outcomes, time_to_ready {n_buckets} buckets with "
          f"+Inf, _sum, _count = {n_buckets + 2}; replacements 1, instances 1, heartbeat_instances 1 while it runs):",
          flush=True)  # fmt: skip
    for (kind, n), pairs in sorted(series.pair_costs.items()):
        print(f"  {kind}: {n} samples × {pairs:,} pairs")
    print(
        "per version without a target (vulnerabilities ×6 severities when scanned, version_info ×channels or 1): "
        + ", ".join(f"{n} samples × {v:,}" for n, v in sorted(series.per_version_costs.items()))
    )
    print(f"per boot (recent_boot_seconds, capped at 200): {series.recent}")
    print("\n| where a scrape's time goes | mean ms |")
    print("| --- | ---: |")
    for label, ms in parts:
        print(f"| {label} | {ms:.1f} |")
    if profile:
        print("\n" + "\n".join(profile))
    if gen is not None:
        print(f"\ngeneration: {gen.seconds:.1f} s (versions, scans, channels, rollouts {gen.versions_seconds:.1f} s; "
              f"record_boots {gen.boots_seconds:.1f} s for {gen.boots:,} boots in {gen.record_calls} calls, "
              f"{gen.boots / max(gen.boots_seconds, 1e-9):,.0f} rows/s)")  # fmt: skip
    print(
        f"\nmachine: {os.cpu_count()} cores, {os.sysconf('SC_PAGE_SIZE') * os.sysconf('SC_PHYS_PAGES') / 2**30:.0f}"
        f" GiB, {platform.machine()}, Linux {os.uname().release}, Python {platform.python_version()}, SQLite "
        f"{sqlite3.sqlite_version}, prometheus_client {_version('prometheus_client')}; load average "
        f"{os.getloadavg()[0]:.2f}; date {time.strftime('%Y-%m-%d %H:%M')}; registry "
        f"{mib(Path(sa.make_url(url).database or '').stat().st_size)}; {tree_state()}"
    )


def _version(package: str) -> str:
    from importlib.metadata import version

    return version(package)


def main() -> None:
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--versions", type=int, default=1_000, help="versions in all")
    parser.add_argument("--per-image", type=int, default=20, help="versions of each image")
    parser.add_argument("--fleets", type=int, default=100)
    parser.add_argument("--boots", type=int, default=1_000_000)
    parser.add_argument("--batch", type=int, default=5_000, help="boots per record_boots call")
    parser.add_argument("--seed", type=int, default=2990)
    parser.add_argument("--runs", type=int, default=200, help="timed scrapes in-process")
    parser.add_argument("--http-runs", type=int, default=50, help="timed scrapes over HTTP (0: none)")
    parser.add_argument("--peer-runs", type=int, default=5, help="runs of each peer query")
    parser.add_argument("--trace-runs", type=int, default=100, help="scrapes under tracemalloc (0: none)")
    parser.add_argument("--profile", choices=["auto", "always", "never"], default="auto",
                        help="cProfile 5 scrapes: when the p95 misses its target (auto), always or never")  # fmt: skip
    parser.add_argument("--top", type=int, default=12, help="rows of each profile table")
    parser.add_argument("--db", type=Path, help="keep the SQLite registry here, and reuse it if it exists")
    args = parser.parse_args()
    if args.versions < 1 or args.per_image < 3 or args.fleets < 0 or args.boots < 0:
        parser.error("--versions ≥ 1, --per-image ≥ 3, --fleets and --boots ≥ 0")
    for key in [k for k in os.environ if k.startswith("AMIFORGE_")]:
        del os.environ[key]
    work = Path(tempfile.mkdtemp(prefix="amiforge-bench-telemetry-", dir="/tmp"))
    os.environ["AMIFORGE_DATA_DIR"] = str(work / "data")
    try:
        path = args.db or work / "registry.db"
        url = f"sqlite:///{path}"
        print(tree_state(), flush=True)
        gen: Generated | None = None
        if path.exists():
            print(f"reusing {path}", flush=True)
        else:
            gen = generate(url, args)
        measure(url, args, work / "data", gen)
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
