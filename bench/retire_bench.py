"""Retire benchmark (`make bench-retire`): plan and apply on 10,000 images across 4 regions, against the targets of
the retirement issue — plan ≤ 2 s of CPU; apply ≤ 1.1 × the token-bucket floor, regions in parallel; DescribeImages
calls ≤ ⌈N/1000⌉ per region — and the oracle's random worlds (≥ 1,000 of them).

The registry is real (SQLite, in --db's folder): 2,500 versions of 25 images, each with a copy in 4 regions (10,000
images, ids `ami-…` of the obviously synthetic form `ami-0000<n>test`). The cloud is a fake at the boto3 client
level (the AWS provider's own code runs unchanged on it: `paginate`, `call`, the survey, the steps): each region
holds its images, their snapshots, and instances, launch templates, parameters and groups using some of them.
Every API of every region has its own token bucket, as EC2 throttles: non-mutating calls (Describe*, Get*, List*) a
bucket of 100 refilled at 20 a second, mutating ones 200 at 5 a second (the EC2 developer guide, "Request throttling
for the Amazon EC2 API"). A call that finds its bucket empty waits for the next token — the best any client can do —
on a clock that runs `--time-scale` times faster than the wall clock, so a floor of minutes takes seconds.

Measured:

1. plan: process CPU time of `retire.plan` (the registry read, the four regions surveyed, the planner), its wall
   time, and the DescribeImages calls per region;
2. apply: `retire.apply` deregistering `--apply-per-region` images in each region (deprecated long ago, protected as
   distribute leaves them: each needs DisableImageDeregistrationProtection and DeregisterImage), its wall time on
   the fake clock against the token-bucket floor of those calls, and the same regions one after another as the peer
   (what a client without parallel regions would take);
3. the oracle: `tests/unit/test_retire_oracle.py` with AMIFORGE_RETIRE_WORLDS=--worlds.
"""

from __future__ import annotations

import argparse
import math
import os
import platform
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import botocore.session
from botocore import xform_name
from measured import tree_state

from amiforge.lifecycle import retire
from amiforge.model import Artifact, Status
from amiforge.policy.retention import Retention
from amiforge.providers.aws.provider import AwsProvider
from amiforge.settings import Settings
from amiforge.store.sql import SqlStore, open_store

REGIONS = ("us-east-1", "eu-west-1", "ap-southeast-2", "sa-east-1")
REPO = Path(__file__).resolve().parents[1]
_MODELS = {s: botocore.session.get_session().get_service_model(s) for s in ("ec2", "autoscaling", "ssm", "rbin")}
# (capacity, refill per second) by kind of call (EC2 developer guide, request throttling).
NON_MUTATING = (100, 20.0)
MUTATING = (200, 5.0)


def _kind(operation: str) -> tuple[int, float]:
    return NON_MUTATING if operation.startswith(("Describe", "Get", "List")) else MUTATING


class Clock:
    """A clock `scale` times faster than the wall clock; sleeping on it sleeps 1/scale as long."""

    def __init__(self, scale: float) -> None:
        self.scale = scale
        self.start = time.monotonic()

    def now(self) -> float:
        return (time.monotonic() - self.start) * self.scale

    def sleep(self, seconds: float) -> None:
        if seconds > 0:
            time.sleep(seconds / self.scale)


@dataclass
class Bucket:
    capacity: int
    refill: float
    tokens: float
    at: float
    lock: threading.Lock = field(default_factory=threading.Lock)

    def take(self, clock: Clock) -> None:
        with self.lock:
            now = clock.now()
            self.tokens = min(self.capacity, self.tokens + (now - self.at) * self.refill)
            self.at = now
            if self.tokens < 1:
                wait = (1 - self.tokens) / self.refill
                clock.sleep(wait)
                self.at += wait
                self.tokens = 0.0
            else:
                self.tokens -= 1


@dataclass
class Region:
    name: str
    images: dict[str, dict[str, Any]] = field(default_factory=dict)
    snapshots: dict[str, dict[str, Any]] = field(default_factory=dict)
    instances: list[dict[str, Any]] = field(default_factory=list)
    templates: dict[str, list[dict[str, Any]]] = field(default_factory=dict)
    parameters: dict[str, str] = field(default_factory=dict)
    groups: list[dict[str, Any]] = field(default_factory=list)
    buckets: dict[str, Bucket] = field(default_factory=dict)
    calls: Counter[str] = field(default_factory=Counter)
    log: list[str] = field(default_factory=list)  # every call, in order


class FakeAws:
    """The regions, their buckets and the clock: what every fake client of every service shares."""

    def __init__(self, clock: Clock) -> None:
        self.clock = clock
        self.regions = {r: Region(r) for r in REGIONS}

    def charge(self, region: str, operation: str) -> None:
        r = self.regions[region]
        bucket = r.buckets.get(operation)
        if bucket is None:
            capacity, refill = _kind(operation)
            bucket = r.buckets[operation] = Bucket(capacity, refill, float(capacity), self.clock.now())
        r.calls[operation] += 1
        r.log.append(operation)
        bucket.take(self.clock)

    def reset(self) -> None:
        """Full buckets, no calls counted: a quiet account."""
        for r in self.regions.values():
            r.buckets.clear()
            r.calls.clear()
            r.log.clear()


def _page(items: list[Any], key: str, kwargs: Mapping[str, Any], size_param: str = "MaxResults") -> dict[str, Any]:
    start = int(kwargs.get("NextToken") or 0)
    size = int(kwargs.get(size_param) or 1000)
    page: dict[str, Any] = {key: items[start : start + size]}
    if start + size < len(items):
        page["NextToken"] = str(start + size)
    return page


class FakeClient:
    """The calls of one service in one region, answered from the fake world (only what retire calls)."""

    def __init__(self, aws: FakeAws, service: str, region: str) -> None:
        self.aws, self.service, self.region = aws, service, region
        self.world = aws.regions[region]
        self.meta = type("Meta", (), {"service_model": _MODELS[service], "region_name": region})()

    def get_paginator(self, name: str) -> FakePaginator:
        return FakePaginator(self, name)

    def __getattr__(self, name: str) -> Callable[..., Any]:
        operation = next((o for o in _MODELS[self.service].operation_names if xform_name(o) == name), None)
        if operation is None:
            raise AttributeError(name)

        def answer(**kwargs: Any) -> Any:
            self.aws.charge(self.region, operation)
            return getattr(self, f"_{operation}")(**kwargs)

        return answer

    # --- ec2 ---

    def _DescribeImages(self, **kw: Any) -> Any:
        ids = kw.get("ImageIds")
        images = (
            [self.world.images[i] for i in ids if i in self.world.images] if ids else list(self.world.images.values())
        )
        return _page(images, "Images", kw)

    def _DescribeInstances(self, **kw: Any) -> Any:
        return _page([{"OwnerId": "000000000000", "Instances": [i]} for i in self.world.instances], "Reservations", kw)

    def _DescribeLaunchTemplates(self, **kw: Any) -> Any:
        templates = [{"LaunchTemplateId": t, "LaunchTemplateName": t, "DefaultVersionNumber": 1,
                      "LatestVersionNumber": len(v)} for t, v in self.world.templates.items()]  # fmt: skip
        return _page(templates, "LaunchTemplates", kw)

    def _DescribeLaunchTemplateVersions(self, **kw: Any) -> Any:
        return _page(self.world.templates[kw["LaunchTemplateId"]], "LaunchTemplateVersions", kw)

    def _DescribeImageAttribute(self, **kw: Any) -> Any:
        return {"ImageId": kw["ImageId"], "LaunchPermissions": []}

    def _DescribeImageReferences(self, **kw: Any) -> Any:
        return {"ImageReferences": []}

    def _DisableImageDeregistrationProtection(self, **kw: Any) -> Any:
        self.world.images[kw["ImageId"]]["DeregistrationProtection"] = "disabled"
        return {"Return": "disabled"}

    def _DeregisterImage(self, **kw: Any) -> Any:
        del self.world.images[kw["ImageId"]]
        return {"Return": True}

    def _EnableImageDeprecation(self, **kw: Any) -> Any:
        self.world.images[kw["ImageId"]]["DeprecationTime"] = kw["DeprecateAt"]
        return {"Return": True}

    # --- autoscaling, ssm, rbin ---

    def _DescribeAutoScalingGroups(self, **kw: Any) -> Any:
        return _page(self.world.groups, "AutoScalingGroups", kw, "MaxRecords")

    def _DescribeLaunchConfigurations(self, **kw: Any) -> Any:
        return _page([], "LaunchConfigurations", kw, "MaxRecords")

    def _DescribeParameters(self, **kw: Any) -> Any:
        return _page([{"Name": n} for n in self.world.parameters], "Parameters", kw)

    def _GetParameters(self, **kw: Any) -> Any:
        return {"Parameters": [{"Name": n, "Value": self.world.parameters[n]} for n in kw["Names"]]}

    def _ListRules(self, **kw: Any) -> Any:
        return {"Rules": [{"Identifier": "bench", "LockState": "unlocked"}]}


class FakePaginator:
    def __init__(self, client: FakeClient, name: str) -> None:
        self.client, self.method = client, getattr(client, name)

    def paginate(self, PaginationConfig: Mapping[str, int] | None = None, **kwargs: Any) -> Iterator[Any]:
        size = (PaginationConfig or {}).get("PageSize")
        token: str | None = None
        while True:
            ask = dict(kwargs)
            if size is not None:
                ask["MaxRecords" if self.client.service == "autoscaling" else "MaxResults"] = size
            if token:
                ask["NextToken"] = token
            page = self.method(**ask)
            yield page
            token = page.get("NextToken")
            if not token:
                return


class FakeSession:
    def __init__(self, aws: FakeAws) -> None:
        self.aws = aws
        self._clients: dict[tuple[str, str], FakeClient] = {}

    def client(self, service: str, region: str | None = None, **_: Any) -> FakeClient:
        key = (service, region or REGIONS[0])
        if key not in self._clients:
            self._clients[key] = FakeClient(self.aws, *key)
        return self._clients[key]


class BenchProvider(AwsProvider):
    def __init__(self, settings: Settings, aws: FakeAws) -> None:
        super().__init__(settings)
        self._fake = FakeSession(aws)

    def session(self, region: str) -> Any:
        return self._fake


# --- the world ---------------------------------------------------------------------------------------------------


def build(store: SqlStore, aws: FakeAws, *, images: int, versions: int, removable: int) -> None:
    """`images` × `versions` versions, each with a copy per region; the oldest `removable` versions per region
    deprecated long ago (grace over) and protected; instances, a template, a parameter and a group on the newest."""
    old = datetime.now(UTC) - timedelta(days=400)
    n = 0
    removable_left = removable
    for v in range(versions):
        for i in range(images):
            version = store.create_version(name=f"img{i:02d}", recipe_digest="r" * 64, recipe_path="/bench.yaml",
                                           provider="aws", tags={}, parent=None)  # fmt: skip
            store.transition(version.id, Status.BUILT, expect=Status.BAKING, digest="d" * 64, size_bytes=8)
            deprecated = removable_left > 0 and v < versions - 3
            if deprecated:
                removable_left -= 1
            for region in REGIONS:
                n += 1
                ami = f"ami-{n:012d}test"[:21]
                snap = f"snap-{n:012d}test"
                aws.regions[region].images[ami] = {
                    "ImageId": ami, "Name": f"img{i:02d}-{v}", "State": "available", "OwnerId": "000000000000",
                    "DeregistrationProtection": "enabled-without-cooldown", "CreationDate": old.isoformat(),
                    "BlockDeviceMappings": [{"DeviceName": "/dev/xvda", "Ebs": {"SnapshotId": snap}}],
                }  # fmt: skip
                artifact = store.add_artifact(version.id, Artifact("aws", region, ami, "d" * 64, 8))
                if deprecated:
                    store.advance_retirement(artifact.id or 0, "deprecated", expect=None, run_id="bench", actor="bench",
                                             ref=version.ref, data={}, snapshots=(snap,), at=old)  # fmt: skip
                if v == versions - 1 and i < 5:  # the newest versions of a few images are in use
                    w = aws.regions[region]
                    w.instances.append({"InstanceId": f"i-{n:017d}", "ImageId": ami, "State": {"Name": "running"}})
                    w.templates.setdefault("lt-bench", []).append(
                        {"VersionNumber": len(w.templates.get("lt-bench", [])) + 1,
                         "LaunchTemplateData": {"ImageId": ami}})  # fmt: skip
                    w.parameters[f"/bench/img{i:02d}"] = ami


def _rules(cap: int) -> Retention:
    return Retention.model_validate({
        "max_deletions": cap,
        "default": {"keep_last": 3, "keep_younger_than": "0s", "deprecate_after": "366d", "grace": "1d",
                    "snapshot_grace": "0s"},
    })  # fmt: skip


def ideal_seconds(calls: list[str]) -> float:
    """The time these calls take, one after another, through full buckets, with nothing else taking any time: the
    token-bucket floor of that sequence."""
    t = 0.0
    buckets: dict[str, list[float]] = {}  # operation → [tokens, at]
    for operation in calls:
        capacity, refill = _kind(operation)
        tokens, at = buckets.get(operation, [float(capacity), 0.0])
        tokens = min(capacity, tokens + (t - at) * refill)
        if tokens < 1:
            t += (1 - tokens) / refill
            tokens = 0.0
        else:
            tokens -= 1
        buckets[operation] = [tokens, t]
    return t


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=25, help="image names (× --versions × 4 regions images)")
    parser.add_argument("--versions", type=int, default=100)
    parser.add_argument("--apply-per-region", type=int, default=300, help="images each region deregisters")
    parser.add_argument(
        "--time-scale",
        type=float,
        default=1.0,
        help="the fake clock runs this much faster (>1 shortens the run, and inflates amiforge's own time by as much)",
    )
    parser.add_argument("--worlds", type=int, default=1000, help="oracle worlds (0: skip)")
    args = parser.parse_args()
    print(f"amiforge retire benchmark — {tree_state()}; {platform.node()}, {os.cpu_count()} CPU(s), "
          f"Python {platform.python_version()}")  # fmt: skip
    with tempfile.TemporaryDirectory(prefix="retire-bench-") as tmp:
        settings = Settings(data_dir=Path(tmp) / "data", actor="bench")
        store = open_store(f"sqlite:///{tmp}/registry.db")
        aws = FakeAws(Clock(args.time_scale))
        started = time.monotonic()
        build(store, aws, images=args.images, versions=args.versions, removable=args.apply_per_region)
        total = sum(len(r.images) for r in aws.regions.values())
        print(f"world: {args.images * args.versions} versions, {total} images in {len(REGIONS)} regions "
              f"(built in {time.monotonic() - started:.1f} s)")  # fmt: skip
        provider = BenchProvider(settings, aws)
        rules = _rules(cap=args.apply_per_region)

        # 1. plan
        aws.reset()
        cpu, wall = time.process_time(), time.monotonic()
        plan = retire.plan(store, rules, lambda _k: provider)
        cpu, wall = time.process_time() - cpu, time.monotonic() - wall
        deregister = Counter(s.region for s in plan.steps("deregister"))
        print(f"plan: {cpu:.2f} s CPU (target ≤ 2 s: {'met' if cpu <= 2 else 'MISSED'}), {wall:.2f} s wall; "
              f"{sum(deregister.values())} to deregister, {len(plan.steps('keep'))} kept, "
              f"{len(plan.steps('deprecate'))} to deprecate")  # fmt: skip
        for region, r in sorted(aws.regions.items()):
            bound = math.ceil(len(r.images) / 1000)
            print(f"  {region}: DescribeImages {r.calls['DescribeImages']} call(s) for {len(r.images)} images "
                  f"(≤ {bound}: {'met' if r.calls['DescribeImages'] <= bound else 'MISSED'}); "
                  f"{sum(r.calls.values())} calls in all")  # fmt: skip

        # 2. apply, regions in parallel, against the token-bucket floor of the calls it made in each region
        aws.reset()
        clock = aws.clock
        began = clock.now()
        outcome = retire.apply(store, rules, lambda _k: provider, actor="bench")
        took = clock.now() - began
        floors = {name: ideal_seconds(r.log) for name, r in aws.regions.items()}
        floor = max(floors.values())
        removed = Counter(o.step.region for o in outcome.outcomes if o.outcome == "done")
        ratio = f"ratio {took / floor:.3f}" if floor else "no floor (within the buckets)"
        print(
            f"apply: {sum(removed.values())} image(s) deregistered ({min(removed.values(), default=0)}–"
            f"{max(removed.values(), default=0)} per region), {len(outcome.failed)} step(s) failed; "
            f"{took:.1f} s on the AWS clock, floor {floor:.1f} s (the slowest region's calls through full buckets "
            f"with no time of their own): {ratio} (target ≤ 1.1: {'met' if took <= 1.1 * floor else 'MISSED'})"
        )
        busiest = max(aws.regions.values(), key=lambda r: floors[r.name])
        print(f"  {busiest.name}'s calls: " + ", ".join(f"{op} {n}" for op, n in busiest.calls.most_common()))
        print(f"  peer, the regions one after another: {sum(floors.values()):.1f} s at best "
              f"({sum(floors.values()) / took:.1f}× the parallel apply)")  # fmt: skip
        store.close()

    # 3. the oracle's worlds
    if args.worlds:
        env = {**os.environ, "AMIFORGE_RETIRE_WORLDS": str(args.worlds)}
        started = time.monotonic()
        done = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
                               "tests/unit/test_retire_oracle.py::test_retire_worlds"], cwd=REPO, env=env,
                              capture_output=True, text=True, check=False)  # fmt: skip
        last = (done.stdout.strip().splitlines() or ["?"])[-1]
        print(f"oracle: {args.worlds} random worlds in {time.monotonic() - started:.0f} s: {last}")
        if done.returncode != 0:
            print(done.stdout[-4000:])
            return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
