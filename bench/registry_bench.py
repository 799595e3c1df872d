"""Registry benchmark (`make bench-registry`): store reads and read commands on a large synthetic registry.

Builds a registry of --images × --versions versions and --events events (default 100 × 1,000 and 1,000,000; see
bench/registry_gen.py for what it holds and how it is written) on SQLite, and also on PostgreSQL when --postgres URL
or AMIFORGE_TEST_POSTGRES_URL is given (in a private schema, dropped afterwards). Then, per database:

- store reads, each --runs times on varied inputs: get_version (NAME@N, and a digest prefix), one version's events,
  one image's versions page (first, and one further down through the keyset cursor), the newest page of every
  version with its count, latest, the revoked ancestors of a version 1,000 generations deep (promote's gate) and
  its whole ancestry (1,000 versions: no command reads that much), channels with their flags (every pointer's
  revoked ancestors), the newest page of events with its count;
- read commands run in-process (`amiforge.cli.app.main`, output into memory, a --width column terminal), each
  --cli-runs times: images list, images show, channels, events --limit 50, keys list. Interpreter start-up and
  imports are not counted (every command runs twice first); opening the registry is.

Prints p50 and p99 of each, against the targets: p99 ≤ 20 ms for a store read, ≤ 100 ms for a read command.
Results go to BENCHMARKS.md by hand. --db PATH keeps the SQLite registry there and reuses it on the next run (it is
generated only if the file does not exist), so a rerun skips the minute of generation.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import io
import os
import platform
import random
import shutil
import signal
import statistics
import sys
import tempfile
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import sqlalchemy as sa
from registry_gen import generate, image_name

STORE_TARGET_P99_MS = 20.0
CLI_TARGET_MS = 100.0
POSTGRES_ENV = "AMIFORGE_TEST_POSTGRES_URL"


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    k = max(0, min(len(ordered) - 1, round(q * (len(ordered) - 1))))
    return ordered[k]


class Results:
    def __init__(self, label: str) -> None:
        self.label = label
        self.rows: list[tuple[str, str, float, float, float]] = []  # kind, figure, p50, p99, target

    def measure(self, kind: str, figure: str, runs: int, work: Callable[[int], object], target: float) -> None:
        times = []
        for i in range(runs):
            started = time.perf_counter()
            work(i)
            times.append((time.perf_counter() - started) * 1000)
        p50, p99 = statistics.median(times), percentile(times, 0.99)
        self.rows.append((kind, figure, p50, p99, target))
        print(f"  {kind:<6} {figure:<52} p50 {p50:8.2f} ms  p99 {p99:8.2f} ms", flush=True)

    def table(self) -> str:
        lines = [f"\n{self.label}", f"| {'kind':<6} | {'figure':<52} | p50 ms | p99 ms | target | ratio (p99) |",
                 f"| {'-' * 6} | {'-' * 52} | ---: | ---: | ---: | ---: |"]  # fmt: skip
        for kind, figure, p50, p99, target in self.rows:
            ratio = f"**{p99 / target:.2f}**" if p99 > target else f"{p99 / target:.2f}"
            lines.append(f"| {kind:<6} | {figure:<52} | {p50:.1f} | {p99:.1f} | {target:.0f} ms | {ratio} |")
        return "\n".join(lines)


# --- the in-process CLI -----------------------------------------------------------------------------------------


class InProcessCli:
    """`amiforge ARGV…` in this interpreter, every console (rich, stdout, stderr) into memory at a fixed width."""

    def __init__(self, width: int) -> None:
        import pkgutil

        from rich.console import Console

        import amiforge.cli

        self.buffer = io.StringIO()
        consoles = {
            "console": Console(file=self.buffer, width=width, color_system=None, highlight=False),
            "err_console": Console(file=self.buffer, width=width, color_system=None, highlight=False),
        }
        for info in pkgutil.iter_modules(amiforge.cli.__path__, "amiforge.cli."):
            module = importlib.import_module(info.name)
            for name, replacement in consoles.items():
                if hasattr(module, name):
                    setattr(module, name, replacement)
        from amiforge.cli import app

        self.main: Callable[[list[str]], int] = app.main

    def __call__(self, *argv: str) -> str:
        self.buffer.seek(0)
        self.buffer.truncate()
        out = io.StringIO()
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(out):
            code = self.main(list(argv))
        if code != 0:
            raise SystemExit(f"amiforge {' '.join(argv)} exited {code}: {out.getvalue()}{self.buffer.getvalue()}")
        return out.getvalue() + self.buffer.getvalue()


# --- one database -------------------------------------------------------------------------------------------------


def sample_refs(engine: sa.Engine, rng: random.Random, n: int) -> list[tuple[int, str, str, str]]:
    """(id, NAME@N, digest prefix, name) of n random versions that have a digest."""
    with engine.connect() as conn:
        top = conn.execute(sa.text("SELECT max(id) FROM versions")).scalar_one()
        rows = conn.execute(
            sa.text("SELECT id, name, number, digest FROM versions WHERE digest IS NOT NULL AND id IN :ids").bindparams(
                sa.bindparam("ids", expanding=True)
            ),
            {"ids": rng.sample(range(1, top + 1), min(top, n * 2))},
        ).all()
    return [(r.id, f"{r.name}@{r.number}", r.digest[:12], r.name) for r in rows[:n]]


def bench_database(label: str, url: str, args: argparse.Namespace, data_dir: Path) -> Results:
    from amiforge.lifecycle.bake import BUILT_STATES
    from amiforge.lifecycle.views import channels_flags
    from amiforge.store.sql import open_store

    results = Results(label)
    rng = random.Random(7)
    with open_store(url) as store:
        refs = sample_refs(store.engine, rng, max(args.runs, 20))
        names = [image_name(i) for i in range(1, args.images + 1)]
        deepest = store.list_versions(names[0], limit=1)[0]
        deep_page = store.list_versions(names[0], limit=args.versions // 2, summary=True)[-1].id
        n = args.runs
        print(f"\n{label}: store reads ({n} runs each)", flush=True)
        results.measure("store", "get_version NAME@N", n, lambda i: store.get_version(refs[i % len(refs)][1]),
                        STORE_TARGET_P99_MS)  # fmt: skip
        results.measure("store", "get_version digest prefix", n, lambda i: store.get_version(refs[i % len(refs)][2]),
                        STORE_TARGET_P99_MS)  # fmt: skip
        results.measure("store", "one version's events", n, lambda i: store.events(refs[i % len(refs)][1]),
                        STORE_TARGET_P99_MS)  # fmt: skip
        results.measure("store", "one image's versions, first page (50)", n,
                        lambda i: store.list_versions(names[i % len(names)], limit=50, summary=True),
                        STORE_TARGET_P99_MS)  # fmt: skip
        results.measure("store", "one image's versions, page via keyset cursor", n,
                        lambda i: store.list_versions(names[0], limit=50, before=deep_page, summary=True),
                        STORE_TARGET_P99_MS)  # fmt: skip
        results.measure("store", "list page: newest 50 of all + count", n,
                        lambda i: (store.list_versions(limit=50, summary=True), store.count_versions()),
                        STORE_TARGET_P99_MS)  # fmt: skip
        results.measure("store", "latest(name, built..signed)", n,
                        lambda i: store.latest(names[i % len(names)], BUILT_STATES), STORE_TARGET_P99_MS)  # fmt: skip
        results.measure("store", f"revoked ancestors of {deepest.ref} (promote)", n,
                        lambda i: store.revoked_ancestors([deepest.id]), STORE_TARGET_P99_MS)  # fmt: skip
        results.measure("store", f"ancestry of {deepest.ref}: {args.versions} rows", n,
                        lambda i: store.ancestry(deepest.id), STORE_TARGET_P99_MS)  # fmt: skip
        results.measure("store", "channels with flags (revoked ancestors)", n,
                        lambda i: channels_flags(store.channels(), store), STORE_TARGET_P99_MS)  # fmt: skip
        results.measure("store", "events: newest 50 + count", n,
                        lambda i: (store.events(limit=50), store.count_events()), STORE_TARGET_P99_MS)  # fmt: skip

    os.environ["AMIFORGE_STORE_URL"] = url
    os.environ["AMIFORGE_DATA_DIR"] = str(data_dir)
    cli = InProcessCli(args.width)
    commands = [
        ("images list", ("images", "list")),
        ("images list --json", ("images", "list", "--json")),
        ("images list --name N", ("images", "list", "--name", names[len(names) // 2])),
        (f"images show {refs[0][1]}", ("images", "show", refs[0][1])),
        ("channels", ("channels",)),
        ("channels --json", ("channels", "--json")),
        ("events --limit 50", ("events", "--limit", "50")),
        (f"events {refs[1][1]}", ("events", refs[1][1])),
        ("keys list", ("keys", "list")),
    ]
    print(f"\n{label}: read commands in-process, {args.width} columns ({args.cli_runs} runs each)", flush=True)
    for figure, argv in commands:
        for _ in range(2):
            cli(*argv)  # imports, caches
        results.measure("cli", figure, args.cli_runs, lambda i, argv=argv: cli(*argv), CLI_TARGET_MS)
    return results


def _pg_schema_url(base: str, schema: str) -> str:
    return (
        sa.make_url(base)
        .update_query_dict({"options": f"-csearch_path={schema}"})
        .render_as_string(hide_password=False)
    )


@contextlib.contextmanager
def postgres_schema(base: str, keep: bool) -> Iterator[str]:
    name = f"amiforge_bench_{uuid.uuid4().hex[:10]}"
    admin = sa.create_engine(base)
    with admin.begin() as conn:
        conn.exec_driver_sql(f'CREATE SCHEMA "{name}"')
    try:
        yield _pg_schema_url(base, name)
    finally:
        if keep:
            print(f"kept PostgreSQL schema {name}")
        else:
            with admin.begin() as conn:
                conn.exec_driver_sql(f'DROP SCHEMA "{name}" CASCADE')
        admin.dispose()


def build(url: str, args: argparse.Namespace) -> dict[str, Any]:
    from amiforge.store.sql import open_store

    print(f"generating {args.images} images × {args.versions} versions, {args.events:,} events …", flush=True)
    started = time.perf_counter()
    with open_store(url) as store:
        generated = generate(store.engine, images=args.images, versions=args.versions, events=args.events)
        if store.engine.dialect.name == "postgresql":
            # What autovacuum would have done by the time anyone reads: visibility map (index-only counts), stats.
            with store.engine.connect().execution_options(isolation_level="AUTOCOMMIT") as conn:
                conn.exec_driver_sql("VACUUM ANALYZE")
    total = time.perf_counter() - started
    print(f"  generated in {total:.1f} s (rows: {generated.total_seconds:.1f} s)", flush=True)
    return {"seconds": total}


def main() -> None:
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--images", type=int, default=100)
    parser.add_argument("--versions", type=int, default=1_000, help="per image")
    parser.add_argument("--events", type=int, default=1_000_000)
    parser.add_argument("--runs", type=int, default=100, help="runs of each store read")
    parser.add_argument("--cli-runs", type=int, default=20, help="runs of each command")
    parser.add_argument("--width", type=int, default=160, help="terminal columns for the commands")
    parser.add_argument("--db", type=Path, help="keep the SQLite registry here, and reuse it if it exists")
    parser.add_argument(
        "--postgres", default=os.environ.get(POSTGRES_ENV), help=f"PostgreSQL URL (default ${POSTGRES_ENV})"
    )
    parser.add_argument("--keep-postgres", action="store_true", help="do not drop the PostgreSQL schema afterwards")
    parser.add_argument("--no-sqlite", action="store_true", help="PostgreSQL only")
    args = parser.parse_args()
    for key in [k for k in os.environ if k.startswith("AMIFORGE_")]:
        del os.environ[key]

    work = Path(tempfile.mkdtemp(prefix="amiforge-bench-registry-", dir="/var/tmp"))
    tables = []
    try:
        if not args.no_sqlite:
            path = args.db or work / "registry.db"
            url = f"sqlite:///{path}"
            if path.exists():
                print(f"reusing {path}")
            else:
                build(url, args)
            tables.append(
                bench_database(f"SQLite ({path.stat().st_size / 2**30:.1f} GiB file)", url, args, work / "data")
            )
        if args.postgres:
            with postgres_schema(args.postgres, args.keep_postgres) as url:
                build(url, args)
                tables.append(bench_database("PostgreSQL", url, args, work / "data"))
        for table in tables:
            print(table.table())
        print(
            f"\nmachine: {os.cpu_count()} cores, {platform.machine()}, Linux {os.uname().release}, "
            f"Python {platform.python_version()}, SQLite {__import__('sqlite3').sqlite_version}; "
            f"load average {os.getloadavg()[0]:.2f}; date {time.strftime('%Y-%m-%d')}"
        )
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
