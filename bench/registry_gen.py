"""A synthetic registry for the registry benchmark (bench/registry_bench.py): N images × M versions and E events.

Everything is written with bulk inserts through SQLAlchemy Core (`conn.execute(table.insert(), [rows…])`, a few
thousand rows per statement), never one store call per row, so 100 × 1,000 versions and 1,000,000 events take about
a minute on SQLite (see BENCHMARKS.md). The data is obviously synthetic and deterministic for a seed:

- images `bench-0001` … `bench-NNNN`; versions created in rounds (every image's version k, then every image's k+1),
  one minute apart, so ids follow time as they do in a real registry;
- digests are sha256 of `bench-digest-<counter>` (likewise artifacts, recipes, layers);
- each version's parent is the newest earlier version of its image that did not fail (as `bake` picks it), so
  every image is a chain M versions deep, with failed versions as dead-end leaves;
- statuses: the newest versions signed, older ones deprecated or retired, ~3% failed, ~0.3% revoked (so `channels`
  has revoked ancestors to flag: each image's pointers have ~3 on average), with `revoked_ancestors` filled in;
- per version: one artifact, three layers, one boot report (2 KiB console), a 2 KiB build log, a signature when it
  was signed; a scan (200 packages, its SBOM) for the newest 10 of each image;
- channels dev, staging and prod per image (current and previous), with their moves;
- E events, a valid hash chain (`amiforge events --verify` passes), spread over the versions in creation order;
- two trusted keys (one revoked), one vulnerability-database import.

The registry must be empty (freshly migrated): `generate` refuses one that already holds versions.
"""

from __future__ import annotations

import hashlib
import json
import random
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

import sqlalchemy as sa

from amiforge.store import schema
from amiforge.store.sql import GENESIS_HASH, event_hash

BASE_TIME = datetime(2026, 1, 1, tzinfo=UTC)
CHUNK = 5_000
CHANNELS = (("dev", 0), ("staging", 3), ("prod", 8))  # channel, how many signed versions behind the newest
EVENT_KINDS = ("bake.built", "test.passed", "scan", "sign", "promote", "distribute", "publish", "waiver.used",
               "channel.flagged", "deprecate")  # fmt: skip
ACTOR = "bench@synthetic"
SCANNED_NEWEST = 10


def image_name(i: int) -> str:
    return f"bench-{i:04d}"


def digest_of(kind: str, counter: int) -> str:
    return hashlib.sha256(f"bench-{kind}-{counter}".encode()).hexdigest()


@dataclass
class Generated:
    """What was written, and how long each table took."""

    images: int
    versions: int
    events: int
    seconds: dict[str, float] = field(default_factory=dict)
    # Handy refs for the benchmark: one mid-history version per image, the newest version of image 1.
    sample_refs: list[str] = field(default_factory=list)

    @property
    def total_seconds(self) -> float:
        return sum(self.seconds.values())


@dataclass(frozen=True)
class _Version:
    id: int
    image: int  # 1-based
    number: int
    status: str
    parent_id: int | None
    parent_ref: str | None
    created_at: datetime

    @property
    def name(self) -> str:
        return image_name(self.image)

    @property
    def ref(self) -> str:
        return f"{self.name}@{self.number}"


def _plan_versions(images: int, per_image: int, rng: random.Random) -> list[_Version]:
    out: list[_Version] = []
    last_ok: dict[int, _Version] = {}
    next_id = 1
    for number in range(1, per_image + 1):
        for image in range(1, images + 1):
            age = per_image - number  # 0 = newest
            roll = rng.random()
            if roll < 0.03:
                status = "failed"
            elif roll < 0.033 and age > 0:
                status = "revoked"
            elif age < 12:
                status = "signed"
            elif age < 200:
                status = "deprecated"
            else:
                status = "retired"
            parent = last_ok.get(image)
            v = _Version(
                id=next_id,
                image=image,
                number=number,
                status=status,
                parent_id=parent.id if parent else None,
                parent_ref=parent.ref if parent else None,
                created_at=BASE_TIME + timedelta(minutes=next_id),
            )
            out.append(v)
            if status != "failed":
                last_ok[image] = v
            next_id += 1
    return out


def _chunks(rows: Iterator[dict[str, Any]], size: int = CHUNK) -> Iterator[list[dict[str, Any]]]:
    batch: list[dict[str, Any]] = []
    for row in rows:
        batch.append(row)
        if len(batch) >= size:
            yield batch
            batch = []
    if batch:
        yield batch


def _insert(conn: sa.Connection, table: sa.Table, rows: Iterator[dict[str, Any]]) -> int:
    n = 0
    for batch in _chunks(rows):
        conn.execute(table.insert(), batch)
        n += len(batch)
    return n


_LOG = "".join(f"[bench] synthetic build step {i:02d}: ok\n" for i in range(60))[:2048]
_CONSOLE = "".join(f"[    {i:3d}.000000] bench: synthetic console line\n" for i in range(48))[:2048]
_CHECKS = [
    {"name": "ready", "kind": "ready", "passed": True, "detail": "AMIFORGE-READY after 9.1 s"},
    {"name": "unit nginx", "kind": "unit", "passed": True, "detail": "active"},
    {"name": "http :80/", "kind": "http", "passed": True, "detail": "200"},
]


def _version_rows(plan: Sequence[_Version], with_parent_id: bool) -> Iterator[dict[str, Any]]:
    for v in plan:
        row: dict[str, Any] = {
            "id": v.id,
            "name": v.name,
            "number": v.number,
            "status": v.status,
            "recipe_digest": digest_of("recipe", v.image),
            "recipe_path": f"/bench/{v.name}/recipe.yaml",
            "recipe": json.dumps({"name": v.name, "bench": True}),
            "provider": "local",
            "digest": None if v.status == "failed" else digest_of("digest", v.id),
            "size_bytes": None if v.status == "failed" else 1_000_000_000 + v.id,
            "parent": v.parent_ref,
            "tags": {"bench": "synthetic", "image": v.name},
            "log": _LOG,
            "created_at": v.created_at,
            "updated_at": v.created_at + timedelta(seconds=30),
        }
        if with_parent_id:
            row["parent_id"] = v.parent_id
        yield row


def _signed(v: _Version) -> bool:
    return v.status in ("signed", "deprecated", "retired", "revoked")


def generate(
    engine: sa.Engine,
    *,
    images: int = 100,
    versions: int = 1_000,
    events: int = 1_000_000,
    seed: int = 1,
    say: Callable[[str], None] = print,
) -> Generated:
    """Fill the (migrated, empty) registry behind `engine`."""
    rng = random.Random(seed)
    with engine.connect() as conn:
        if conn.execute(sa.select(sa.func.count()).select_from(schema.versions_table)).scalar_one():
            raise SystemExit("the registry already holds versions: generate into an empty one")
    result = Generated(images=images, versions=images * versions, events=events)
    plan = _plan_versions(images, versions, rng)
    by_image: dict[int, list[_Version]] = {}
    for v in plan:
        by_image.setdefault(v.image, []).append(v)
    with_parent_id = "parent_id" in schema.versions_table.c

    def timed(what: str, body: Callable[[sa.Connection], int]) -> None:
        started = time.perf_counter()
        with engine.begin() as conn:
            n = body(conn)
        result.seconds[what] = time.perf_counter() - started
        say(f"  {what}: {n:,} rows in {result.seconds[what]:.1f} s")

    timed("versions", lambda c: _insert(c, schema.versions_table, _version_rows(plan, with_parent_id)))

    revoked_ancestors = getattr(schema, "revoked_ancestors_table", None)
    if revoked_ancestors is not None:  # schema 0006 on: what `revoke` and `create_version` keep, computed here

        def lineage(conn: sa.Connection) -> int:
            status = {v.id: v.status for v in plan}
            above: dict[int, tuple[int, ...]] = {}
            for v in plan:  # parents come first
                p = v.parent_id
                above[v.id] = () if p is None else above[p] + ((p,) if status[p] == "revoked" else ())
            rows = ({"version_id": vid, "ancestor_id": a} for vid, ancestors in above.items() for a in ancestors)
            return _insert(conn, revoked_ancestors, rows)

        timed("revoked_ancestors", lineage)

    def artifacts(conn: sa.Connection) -> int:
        rows = (
            {"id": v.id, "version_id": v.id, "provider": "local", "region": "local",
             "location": f"/bench/regions/local/{v.name}/{digest_of('digest', v.id)}.qcow2",
             "digest": digest_of("digest", v.id), "size_bytes": 1_000_000_000 + v.id, "kernel": None, "initrd": None,
             "created_at": v.created_at + timedelta(seconds=20)}
            for v in plan if v.status != "failed"
        )  # fmt: skip
        return _insert(conn, schema.artifacts_table, rows)

    timed("artifacts", artifacts)

    def layers(conn: sa.Connection) -> int:
        rows = (
            {"version_id": v.id, "index": i, "key": digest_of(f"layer{i}", v.id if i else v.image),
             "description": ("base", "packages: nginx", "generalise")[i], "hit": i == 0, "seconds": 1.5 * i,
             "size_bytes": 10_000_000 * (i + 1)}
            for v in plan for i in range(3)
        )  # fmt: skip
        return _insert(conn, schema.layers_table, rows)

    timed("layers", layers)

    def boot_reports(conn: sa.Connection) -> int:
        rows = (
            {"version_id": v.id, "time_to_ready": 9.1, "checks": _CHECKS, "console": _CONSOLE, "accel": "tcg",
             "started_at": v.created_at + timedelta(seconds=25), "duration": 12.5}
            for v in plan if v.status != "failed"
        )  # fmt: skip
        return _insert(conn, schema.boot_reports_table, rows)

    timed("boot_reports", boot_reports)

    def supply(conn: sa.Connection) -> int:
        keys = [
            {"key_id": f"bench-key-{k}", "algorithm": "ed25519",
             "public_key": f"-----BEGIN PUBLIC KEY-----\nbench-{k}\n-----END PUBLIC KEY-----\n",
             "added_at": BASE_TIME, "revoked_at": BASE_TIME + timedelta(days=1) if k == 2 else None,
             "revoked_reason": "bench: rotated" if k == 2 else None}
            for k in (1, 2)
        ]  # fmt: skip
        n = _insert(conn, schema.signing_keys_table, iter(keys))
        envelope = json.dumps({"payloadType": "application/vnd.in-toto+json", "payload": "YmVuY2g=" * 40,
                               "signatures": [{"keyid": "bench-key-1", "sig": "c2ln" * 22}]})  # fmt: skip
        sigs = (
            {"version_id": v.id, "key_id": "bench-key-1", "envelope": envelope,
             "statement_digest": digest_of("statement", v.id), "signed_at": v.created_at + timedelta(seconds=40)}
            for v in plan if _signed(v)
        )  # fmt: skip
        n += _insert(conn, schema.signatures_table, sigs)
        packages = [[f"bench-pkg-{p:03d}", f"1.{p}-1", "amd64", None, None] for p in range(200)]
        sbom = json.dumps({"bomFormat": "CycloneDX", "specVersion": "1.6", "components": [
            {"type": "library", "name": p[0], "version": p[1], "purl": f"pkg:deb/debian/{p[0]}@{p[1]}"}
            for p in packages]})  # fmt: skip
        scans = (
            {"version_id": v.id, "scanned_at": v.created_at + timedelta(seconds=35), "packages": packages,
             "sbom": sbom, "sbom_digest": hashlib.sha256(sbom.encode()).hexdigest(), "findings": [],
             "vulndb": "osv import 1 (bench)"}
            for vs in by_image.values() for v in vs[-SCANNED_NEWEST:] if v.status != "failed"
        )  # fmt: skip
        n += _insert(conn, schema.scans_table, scans)
        conn.execute(schema.vulndb_imports_table.insert(), [
            {"id": 1, "source": "bench", "imported_at": BASE_TIME, "count": 0}])  # fmt: skip
        return n + 1

    timed("keys, signatures, scans", supply)

    def channels(conn: sa.Connection) -> int:
        pointers, moves = [], []
        for image, vs in by_image.items():
            signed = [v for v in vs if v.status == "signed"]
            for channel, behind in CHANNELS:
                if len(signed) < behind + 2:
                    continue
                cur, prev = signed[-1 - behind], signed[-2 - behind]
                name = image_name(image)
                moved = cur.created_at + timedelta(hours=1)
                pointers.append({"name": name, "channel": channel, "version_id": cur.id,
                                 "previous_version_id": prev.id, "moved_at": moved, "moved_by": ACTOR,
                                 "reason": "bench"})  # fmt: skip
                for v, at in ((prev, prev.created_at + timedelta(hours=1)), (cur, moved)):
                    moves.append({"name": name, "channel": channel, "version_id": v.id, "at": at, "actor": ACTOR,
                                  "reason": "bench"})  # fmt: skip
        # A revoked version as a previous (rollback) pointer, so listings carry flags.
        return _insert(conn, schema.channels_table, iter(pointers)) + _insert(
            conn, schema.channel_moves_table, iter(moves)
        )

    timed("channels", channels)

    def event_rows() -> Iterator[dict[str, Any]]:
        prev = GENESIS_HASH
        total = len(plan)
        span = (plan[-1].created_at - BASE_TIME).total_seconds() + 3600
        for i in range(events):
            seq = i + 1
            v = plan[i * total // events]
            kind = EVENT_KINDS[i % len(EVENT_KINDS)]
            data: dict[str, Any] = {"bench": True, "n": seq}
            if kind == "bake.built":
                data["digest"] = digest_of("digest", v.id)
            at = BASE_TIME + timedelta(seconds=span * seq / events)
            digest = event_hash(prev, seq=seq, at=at, actor=ACTOR, kind=kind, ref=v.ref, data=data)
            yield {"seq": seq, "at": at, "actor": ACTOR, "kind": kind, "ref": v.ref, "data": data,
                   "prev_hash": prev, "hash": digest}  # fmt: skip
            prev = digest
        result_head.append((events, prev))

    result_head: list[tuple[int, str]] = []

    def write_events(conn: sa.Connection) -> int:
        n = _insert(conn, schema.events_table, event_rows())
        seq, head = result_head[0] if result_head else (0, GENESIS_HASH)
        head_row = schema.event_head_table
        conn.execute(head_row.update().where(head_row.c.id == 1).values(seq=seq, hash=head))
        return n

    timed("events", write_events)

    def finish(conn: sa.Connection) -> int:
        if conn.dialect.name == "postgresql":
            # Explicit ids were given: move each serial sequence past them.
            for table in ("versions", "artifacts", "layers", "boot_reports", "signatures", "scans", "channel_moves",
                          "vulndb_imports"):  # fmt: skip
                conn.exec_driver_sql(
                    f"SELECT setval(pg_get_serial_sequence('{table}', 'id'), "
                    f"(SELECT coalesce(max(id), 0) + 1 FROM {table}), false)"
                )
            conn.exec_driver_sql("ANALYZE")
        else:
            conn.exec_driver_sql("ANALYZE")
        return 0

    timed("analyze", finish)
    result.sample_refs = [by_image[i][len(by_image[i]) // 2].ref for i in sorted(by_image)]
    return result
