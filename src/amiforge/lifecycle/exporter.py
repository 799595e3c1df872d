"""What `/metrics` exposes (docs/architecture.md §13): the registry's telemetry as Prometheus metric families.

The metric names and labels are a public contract (dashboards and alert rules are generated against them):

| family | type | labels |
|---|---|---|
| amiforge_boot_attempts_total | counter | image, version, target, outcome (ready, failed, timeout) |
| amiforge_time_to_ready_seconds | histogram (ready boots) | image, version, target |
| amiforge_replacements_total | counter | image, version, target |
| amiforge_instances | gauge | image, version, target |
| amiforge_heartbeat_instances | gauge | image, version, target |
| amiforge_vulnerabilities | gauge | image, version, severity |
| amiforge_rollouts_total | counter | image, target, outcome (succeeded, rolled_back, aborted) |
| amiforge_rollout_in_progress | gauge | image, target |
| amiforge_version_info | gauge (1) | image, version, digest, channel |
| amiforge_versions | gauge | image, status (how many versions are in each state: the pipeline's runs) |
| amiforge_recent_boot_seconds | gauge | image, version, target, instance_id, outcome (launch to outcome, s) |

Counters are the registry's totals since it began (store `boot_totals`, kept in the same transaction as the boots),
so they never go down, and a scrape reads a few thousand rows whatever the number of boots. The histogram's
buckets are whole seconds and include every SLO threshold of the policy, so `le` at a threshold is exact.

Cardinality is bounded by what is exported, not by history: a version's series are exposed while it is in a
channel (current or rollback), runs somewhere, or is one of the newest `RECENT_VERSIONS` of its image that booted;
targets are the fleets it ran on. Older versions' series end (Prometheus keeps what it scraped for its retention).
Per-instance series (`amiforge_recent_boot_seconds`, for the on-call and debug dashboards) are the newest
`RECENT_BOOTS` boots decided in the last `RECENT_BOOT_WINDOW`: at most that many at once, but each boot is a series
of its own, so what Prometheus keeps of them over its retention grows with the number of boots (churn).
"""

from __future__ import annotations

import threading
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.registry import Collector
from prometheus_client.utils import floatToGoString

from amiforge.lifecycle.slis import ROLLOUT_OUTCOMES, heartbeats, open_vulnerabilities
from amiforge.model import BOOT_OUTCOMES, BOOT_TEST_TARGET, BootRecord, BootTotals, ChannelPointer
from amiforge.policy.document import Policy
from amiforge.store.interface import Store

# Whole seconds; every SLO threshold of the policy is added (a threshold must fall on a bucket to be exact).
DEFAULT_BUCKETS = (5.0, 10.0, 15.0, 20.0, 30.0, 45.0, 60.0, 90.0, 120.0, 180.0, 300.0, 600.0)
RECENT_VERSIONS = 5
# A rollout whose controller is judging the target (a paused one judges nothing: alerts stay on).
ROLLOUT_WATCHING = frozenset({"running", "rolling-back"})
RECENT_BOOTS = 200
RECENT_BOOT_WINDOW = timedelta(hours=24)

VERSION_LABELS = ["image", "version", "target"]


def bucket_label(seconds: float) -> str:
    """The `le` label of a bucket, exactly as the exposition writes it (120 -> "120.0"): rules use this."""
    return str(floatToGoString(seconds))  # type: ignore[no-untyped-call]


def histogram_buckets(policy: Policy) -> tuple[float, ...]:
    return tuple(sorted({*DEFAULT_BUCKETS, *policy.slos.thresholds()}))


@dataclass
class _VulnCache:
    """Counts by severity per scan id: a scan never changes, and reading a thousand findings per version per scrape
    would cost more than everything else together. Only the scans of exported versions are kept."""

    counts: dict[int, dict[str, int]] = field(default_factory=dict)
    lock: threading.Lock = field(default_factory=threading.Lock)


class TelemetryCollector(Collector):
    """A prometheus_client collector over the registry: each scrape reads the store afresh (no state but the
    vulnerability counts of immutable scans)."""

    def __init__(self, store: Store, policy: Policy, *, recent: int = RECENT_VERSIONS) -> None:
        self.store = store
        self.policy = policy
        self.recent = recent
        self.buckets = histogram_buckets(policy)
        self._labels = [bucket_label(b) for b in self.buckets]
        self._vulns = _VulnCache()

    def describe(self) -> list[Metric]:
        return []  # families are known by name only once collected; describe() stays cheap (no store read)

    def collect(self) -> Iterator[Metric]:
        now = datetime.now(UTC)
        store = self.store
        channels = store.channels()
        running = store.running_boots()
        booted = store.versions_with_boots()
        held = store.version_states({p.current for p in channels} | {p.previous for p in channels if p.previous})
        exported = self._exported(channels_ids={vid for vid, _ in held.values()},
                                  running_ids={b.version_id for b in running}, booted=booted)  # fmt: skip
        heads = store.version_heads(exported)
        refs = {vid: (name, f"{name}@{number}") for vid, (name, number, _) in heads.items()}
        yield from self._boots(store.boot_totals(sorted(exported)), refs)
        yield from self._running(running, refs, now)
        yield from self._vulnerabilities(exported, refs)
        yield from self._rollouts()
        yield from self._versions(heads, channels)
        yield from self._recent_boots(now)

    # --- what is exported ------------------------------------------------------------------------------------

    def _exported(
        self, *, channels_ids: set[int], running_ids: set[int], booted: Iterable[tuple[int, str, int]]
    ) -> set[int]:
        newest: dict[str, list[tuple[int, int]]] = {}
        for vid, name, number in booted:
            newest.setdefault(name, []).append((number, vid))
        recent = {vid for versions in newest.values() for _, vid in sorted(versions)[-self.recent :]}
        return channels_ids | running_ids | recent

    # --- families --------------------------------------------------------------------------------------------

    def _boots(self, totals: Iterable[BootTotals], refs: Mapping[int, tuple[str, str]]) -> Iterator[Metric]:
        attempts = CounterMetricFamily(
            "amiforge_boot_attempts", "Boots of a version on a target by outcome (a timeout is not ready in time).",
            labels=[*VERSION_LABELS, "outcome"],
        )  # fmt: skip
        ready = HistogramMetricFamily(
            "amiforge_time_to_ready_seconds", "Seconds from launch to the readiness marker, of ready boots.",
            labels=VERSION_LABELS,
        )  # fmt: skip
        replaced = CounterMetricFamily(
            "amiforge_replacements", "Members of a version replaced on a target (rollouts, self-healing).",
            labels=VERSION_LABELS,
        )  # fmt: skip
        for t in totals:
            image, ref = refs[t.version_id]
            labels = [image, ref, t.target]
            for outcome in BOOT_OUTCOMES:
                attempts.add_metric([*labels, outcome], getattr(t, outcome))
            counts = t.cumulative(self.buckets)
            buckets = [(label, float(n)) for label, n in zip(self._labels, counts, strict=True)]
            buckets.append(("+Inf", float(t.ready)))
            ready.add_metric(labels, buckets, t.ttr_sum)
            if t.target != BOOT_TEST_TARGET:
                replaced.add_metric(labels, t.replaced)
        yield from (attempts, ready, replaced)

    def _running(
        self, running: Iterable[BootRecord], refs: Mapping[int, tuple[str, str]], now: datetime
    ) -> Iterator[Metric]:
        instances = GaugeMetricFamily(
            "amiforge_instances",
            "Instances of a version running on a target (booting, ready or failed).",
            labels=VERSION_LABELS,
        )
        beating = GaugeMetricFamily(
            "amiforge_heartbeat_instances",
            "Running instances whose heartbeat was heard within the image's heartbeat_within (agent coverage).",
            labels=VERSION_LABELS,
        )
        counts: dict[tuple[int, str], list[int]] = {}
        for b in running:
            if b.target == BOOT_TEST_TARGET or b.version_id not in refs:
                continue
            fresh = now - self.policy.slos.of(refs[b.version_id][0]).heartbeat_within
            pair = counts.setdefault((b.version_id, b.target), [0, 0])
            pair[0] += 1
            pair[1] += b.last_heartbeat_at is not None and b.last_heartbeat_at >= fresh
        for (vid, target), (n, heard) in sorted(counts.items()):
            image, ref = refs[vid]
            instances.add_metric([image, ref, target], n)
            if heartbeats(target):  # no series where heartbeats are not reported: unmeasured is not 0 %
                beating.add_metric([image, ref, target], heard)
        yield from (instances, beating)

    def _vulnerabilities(self, exported: set[int], refs: Mapping[int, tuple[str, str]]) -> Iterator[Metric]:
        family = GaugeMetricFamily(
            "amiforge_vulnerabilities", "Open CVE findings of a version's latest scan, by severity under the policy.",
            labels=["image", "version", "severity"],
        )  # fmt: skip
        scans = self.store.latest_scan_ids(exported)
        cache = self._vulns
        with cache.lock:
            for scan_id in set(scans.values()) - set(cache.counts):
                findings = self.store.scan_findings(scan_id)
                cache.counts[scan_id] = open_vulnerabilities(findings, self.policy.severity_source)
            for stale in set(cache.counts) - set(scans.values()):
                del cache.counts[stale]  # memory stays flat: only the scans exported now are kept
            for vid, scan_id in sorted(scans.items()):
                image, ref = refs[vid]
                for severity, count in cache.counts[scan_id].items():
                    family.add_metric([image, ref, severity], count)
        yield family

    def _rollouts(self) -> Iterator[Metric]:
        total = CounterMetricFamily(
            "amiforge_rollouts", "Rollouts that ended, by outcome (rolled_back: a gate failed and it was undone).",
            labels=["image", "target", "outcome"],
        )  # fmt: skip
        live = GaugeMetricFamily(
            "amiforge_rollout_in_progress", "1 while a rollout on the target is running or rolling back.",
            labels=["image", "target"],
        )  # fmt: skip
        ended: dict[tuple[str, str], dict[str, int]] = {}
        busy: dict[tuple[str, str], int] = {}
        for image, target, state, count in self.store.rollout_tally():
            outcome = ROLLOUT_OUTCOMES.get(state)
            key = (image, target)
            per = ended.setdefault(key, dict.fromkeys(ROLLOUT_OUTCOMES.values(), 0))
            if outcome is not None:
                per[outcome] += count
            busy[key] = busy.get(key, 0) or int(state in ROLLOUT_WATCHING)
        for (image, target), per in sorted(ended.items()):
            for outcome, count in per.items():
                total.add_metric([image, target, outcome], count)
            live.add_metric([image, target], busy[(image, target)])
        yield from (total, live)

    def _versions(
        self, heads: Mapping[int, tuple[str, int, str | None]], channels: Iterable[ChannelPointer]
    ) -> Iterator[Metric]:
        family = GaugeMetricFamily(
            "amiforge_version_info", "1 for each exported version, per channel holding it ('' if none).",
            labels=["image", "version", "digest", "channel"],
        )  # fmt: skip
        holding: dict[str, list[str]] = {}
        for pointer in channels:
            holding.setdefault(pointer.current, []).append(pointer.channel)
        for _, (image, number, digest) in sorted(heads.items()):
            ref = f"{image}@{number}"
            for channel in sorted(holding.get(ref, [])) or [""]:
                family.add_metric([image, ref, digest or "", channel], 1)
        yield family

    def _recent_boots(self, now: datetime) -> Iterator[Metric]:
        tally = GaugeMetricFamily(
            "amiforge_versions", "Versions of an image by state (built, tested, failed …): the pipeline's runs.",
            labels=["image", "status"],
        )  # fmt: skip
        for image, status, count in self.store.version_tally():
            tally.add_metric([image, status], count)
        yield tally
        recent = GaugeMetricFamily(
            "amiforge_recent_boot_seconds",
            "Seconds from launch to the outcome of each of the latest boots (the time to ready, when ready).",
            # instance_id, not instance: Prometheus gives `instance` to the scrape target (and would rename ours)
            labels=[*VERSION_LABELS, "instance_id", "outcome"],
        )
        for b in self.store.recent_boots(now - RECENT_BOOT_WINDOW, RECENT_BOOTS):
            if b.ended_at is None or b.outcome is None:
                continue
            seconds = b.time_to_ready if b.outcome == "ready" and b.time_to_ready is not None else None
            elapsed = seconds if seconds is not None else (b.ended_at - b.launched_at).total_seconds()
            recent.add_metric(
                [b.version_ref.partition("@")[0], b.version_ref, b.target, b.instance, b.outcome], elapsed
            )
        yield recent
