"""Web console benchmark (`make bench-web`): the console's pages and API on a large registry, through a real
`amiforge serve` (WebServer on 127.0.0.1, an ephemeral port, in a thread), against the targets of the web console's
issue: catalog and version pages at p95 ≤ 150 ms with 10,000 versions and 1,000,000 events, and a live rollout's
page showing a gate decision within 2 s of it.

The registry is bench/registry_gen.py's (10 images × 1,000 versions, 1,000,000 events by default; obviously
synthetic, deterministic), written once to --db and reused. Measured, each --runs times after two warm-up requests:

1. over HTTP (urllib, a new connection each time, as a browser's first visit): the catalog's first page, a page
   deep in the listing (a keyset cursor half-way down), a version page of the newest and of the oldest version, the
   same version as JSON, the rollouts and audit pages, each against the 150 ms target;
2. the peer, side by side: the same version document built in this process without HTTP, templates or JSON
   (`lifecycle.documents.version_document`), so the ratio says what the web layer adds to the registry's reads;
3. a rollout's live part: a rollout is recorded, then 10 gate decisions are added at random moments while a client
   asks for `/rollouts/{id}/live` every second (what the page's htmx does); the delay from each decision to the
   first answer that shows it, against 2 s.
"""

from __future__ import annotations

import argparse
import platform
import random
import statistics
import sys
import threading
import time
import urllib.request
from collections.abc import Callable
from pathlib import Path

from measured import tree_state
from registry_gen import generate

from amiforge.lifecycle.documents import version_document
from amiforge.lifecycle.tokens import create_token
from amiforge.policy.document import default_policy
from amiforge.settings import Settings
from amiforge.store.sql import SqlStore, open_store
from amiforge.strategy import Strategy
from amiforge.web.server import Listen, WebServer

PAGE_TARGET_MS = 150.0
UPDATE_TARGET_S = 2.0
ACTOR = "bench@synthetic"


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(q * (len(ordered) - 1))))]


def timed(runs: int, work: Callable[[], object]) -> list[float]:
    for _ in range(2):
        work()
    times = []
    for _ in range(runs):
        started = time.perf_counter()
        work()
        times.append((time.perf_counter() - started) * 1000)
    return times


def row(label: str, times: list[float], target: float | None, peer: list[float] | None = None) -> str:
    p95 = percentile(times, 0.95)
    verdict = "" if target is None else ("met" if p95 <= target else "MISSED")
    ratio = f"{p95 / percentile(peer, 0.95):.1f}×" if peer else ""
    return (f"| {label} | {statistics.median(times):.1f} | {p95:.1f} | {max(times):.1f} | "
            f"{'' if target is None else f'{target:.0f}'} {verdict} | {ratio} |")  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--db", type=Path, default=Path("/tmp/amiforge-web-bench/registry.db"))
    parser.add_argument("--images", type=int, default=10)
    parser.add_argument("--versions", type=int, default=1_000, help="versions per image")
    parser.add_argument("--events", type=int, default=1_000_000)
    parser.add_argument("--runs", type=int, default=100)
    parser.add_argument("--decisions", type=int, default=10)
    args = parser.parse_args()

    args.db.parent.mkdir(parents=True, exist_ok=True)
    fresh = not args.db.exists()
    store = open_store(f"sqlite:///{args.db}")
    if fresh:
        started = time.perf_counter()
        generate(store.engine, images=args.images, versions=args.versions, events=args.events, say=print)
        print(f"generated in {time.perf_counter() - started:.0f} s", flush=True)
    settings = Settings(data_dir=args.db.parent / "data", actor=ACTOR)
    secret = create_token(f"bench-{int(time.time())}", "operate", store=store, settings=settings).secret
    server = WebServer(Listen("127.0.0.1", 0), store=store, settings=settings, policy=default_policy())
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    time.sleep(0.5)
    headers = {"Authorization": f"Bearer {secret}"}  # pages take a bearer token as the API does

    def get(path: str) -> Callable[[], bytes]:
        def fetch() -> bytes:
            with urllib.request.urlopen(urllib.request.Request(server.url + path, headers=headers), timeout=60) as r:
                return bytes(r.read())

        return fetch

    versions, events = store.count_versions(), store.count_events()
    newest = store.list_versions(limit=1, summary=True)[0]
    oldest = store.list_versions(limit=1, before=2, summary=True)[0]
    middle = newest.id // 2
    print(f"\n## Web console benchmark ({time.strftime('%Y-%m-%d')}, {platform.machine()}, {tree_state()})")
    print(f"registry: {versions:,} versions, {events:,} events; Python {platform.python_version()}\n")
    print("| figure (ms) | p50 | p95 | max | target (p95) | ratio to the in-process document |")
    print("| --- | ---: | ---: | ---: | ---: | ---: |")
    peer_new = timed(args.runs, lambda: version_document(store, newest.ref, console=True, recipe=True))
    peer_old = timed(args.runs, lambda: version_document(store, oldest.ref, console=True, recipe=True))
    for label, path, peer in (
        ("catalog, first page `/`", "/", None),
        ("catalog, a page half-way down `/?before=…`", f"/?before={middle}", None),
        (f"version page, newest ({newest.ref})", f"/versions/{newest.ref}", peer_new),
        (f"version page, oldest ({oldest.ref})", f"/versions/{oldest.ref}", peer_old),
        (f"version JSON `/api/v1/versions/{newest.ref}`", f"/api/v1/versions/{newest.ref}", peer_new),
        ("versions JSON, first page", "/api/v1/versions?limit=50", None),
        ("rollouts page", "/rollouts", None),
        ("audit page (newest 100 events)", "/audit", None),
    ):
        print(row(label, timed(args.runs, get(path)), PAGE_TARGET_MS, peer), flush=True)
    print(row(f"peer: version_document({newest.ref}) in process", peer_new, None))
    print(row(f"peer: version_document({oldest.ref}) in process", peer_old, None))

    # A live rollout: decisions appear while a client polls its live part every second, as htmx does.
    rollout = store.create_rollout("local:bench", newest.id, strategy=Strategy().model_dump(mode="json"),
                                   waves=[1] * args.decisions, actor=ACTOR)  # fmt: skip
    made: list[float] = []
    seen: dict[int, float] = {}
    done = threading.Event()

    def decide(target: SqlStore) -> None:
        rng = random.Random(1)
        for wave in range(args.decisions):
            time.sleep(rng.uniform(0.3, 2.5))
            target.add_decision(rollout.id, wave, passed=True, action="continue",
                                numbers={"marker": f"bench-decision-{wave}-end"})  # fmt: skip
            made.append(time.monotonic())
        done.set()

    writer = threading.Thread(target=decide, args=(store,), daemon=True)
    writer.start()
    poll = get(f"/rollouts/{rollout.id}/live")
    while not done.is_set() or len(seen) < args.decisions:
        body = poll().decode()
        now = time.monotonic()
        for wave in range(args.decisions):
            if wave not in seen and f"bench-decision-{wave}-end" in body:
                seen[wave] = now
        if len(seen) == args.decisions:
            break
        time.sleep(1.0)
    delays = [seen[w] - made[w] for w in range(args.decisions)]
    worst = max(delays)
    print(f"\nrollout page: {args.decisions} decisions shown {statistics.median(delays):.2f} s (median), "
          f"{worst:.2f} s (worst) after they were made, polling every 1 s; target {UPDATE_TARGET_S:.0f} s: "
          f"{'met' if worst <= UPDATE_TARGET_S else 'MISSED'}")  # fmt: skip
    store.update_rollout(rollout.id, expect="running", state="aborted")
    server.stop()
    thread.join(10)
    sys.exit(0)


if __name__ == "__main__":
    main()
