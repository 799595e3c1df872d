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
| amiforge_rollouts_undone_total | counter | image, target (rollouts `amiforge rollback` undid later) |
| amiforge_rollout_in_progress | gauge | image, target |
| amiforge_version_info | gauge (1) | image, version, digest, channel |
| amiforge_versions | gauge | image, status (how many versions are in each state: the pipeline's runs) |
| amiforge_recent_boot_seconds | gauge | image, version, target, instance_id, outcome (launch to outcome, s) |
| amiforge_recent_boot_phase_seconds | gauge | image, version, target, instance_id, phase (kernel, userspace, a unit) |
| amiforge_recent_boot_log_info | gauge (1) | image, version, target, instance_id, line (1…5), message |

Counters are the registry's totals since it began (store `boot_totals`, kept in the same transaction as the boots),
so they never go down, and a scrape reads a few thousand rows whatever the number of boots. The histogram's
buckets are whole seconds and include every SLO threshold of the policy, so `le` at a threshold is exact.

Cardinality is bounded by what is exported, not by history: a version's series are exposed while it is in a
channel (current or rollback), runs somewhere, or is one of the newest `RECENT_VERSIONS` of its image that booted;
targets are the fleets it ran on. Older versions' series end (Prometheus keeps what it scraped for its retention).
Per-instance series (`amiforge_recent_boot_seconds` and, where the guest's systemd timed its boot, its phases: the
kernel with the initrd, userspace until multi-user.target, the three slowest units — for the on-call and debug
dashboards; and for a boot that failed, the last lines its console printed, for the on-call dashboard's boot logs)
are the newest `RECENT_BOOTS` boots decided in the last `RECENT_BOOT_WINDOW`: at most 6 series per boot that did
not fail and 6 + 5 per boot that did, at once, but each boot is a series of its own, so what Prometheus keeps of
them over its retention grows with the number of boots (churn).

The text is written by `lifecycle.exposition` (the same bytes prometheus_client would write, at a fraction of the
cost), and the lines of a (version, target) whose totals did not change since the last scrape are reused.
"""

from __future__ import annotations

import threading
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta

from amiforge.lifecycle.exposition import Family, go_float, render
from amiforge.lifecycle.slis import ROLLOUT_OUTCOMES, coverage_measured, open_vulnerabilities
from amiforge.model import BOOT_OUTCOMES, BOOT_TEST_TARGET, BootTotals, ChannelPointer
from amiforge.policy.document import Policy
from amiforge.providers.guest import TAIL_LINES
from amiforge.store.interface import Store

# Whole seconds; every SLO threshold of the policy is added (a threshold must fall on a bucket to be exact).
DEFAULT_BUCKETS = (5.0, 10.0, 15.0, 20.0, 30.0, 45.0, 60.0, 90.0, 120.0, 180.0, 300.0, 600.0)
RECENT_VERSIONS = 5
# A rollout whose controller is judging the target (a paused one judges nothing: alerts stay on).
ROLLOUT_WATCHING = frozenset({"running", "rolling-back"})
RECENT_BOOTS = 200
RECENT_BOOT_WINDOW = timedelta(hours=24)

VERSION_LABELS = ("image", "version", "target")


def bucket_label(seconds: float) -> str:
    """The `le` label of a bucket, exactly as the exposition writes it (120 -> "120.0"): rules use this."""
    return go_float(seconds)


def histogram_buckets(policy: Policy) -> tuple[float, ...]:
    return tuple(sorted({*DEFAULT_BUCKETS, *policy.slos.thresholds()}))


@dataclass
class _Caches:
    """What one scrape can hand the next. Severity counts per scan id: a scan never changes, and reading a thousand
    findings per version per scrape would cost more than everything else together; so do their lines per (version,
    scan). And the text of each (version, target)'s boot families with the totals it was written from: totals only
    grow, so equal totals mean equal text. Only what is exported now is kept, so memory stays flat."""

    vulns: dict[int, dict[str, int]] = field(default_factory=dict)
    vuln_lines: dict[tuple[int, int], str] = field(default_factory=dict)  # (version id, scan id) -> its lines
    boots: dict[tuple[int, str], tuple[tuple[int, int, int, int, float], str, str, str]] = field(default_factory=dict)
    lock: threading.Lock = field(default_factory=threading.Lock)


class TelemetryCollector:
    """Renders the registry's telemetry as the text Prometheus scrapes; each scrape reads the store afresh (what it
    keeps between scrapes is in `_Caches`). Safe to call from several threads."""

    def __init__(
        self, store: Store, policy: Policy, *, recent: int = RECENT_VERSIONS, console_lines: bool = True
    ) -> None:
        self.store = store
        self.policy = policy
        self.recent = recent
        # Failed boots' last console lines (amiforge_recent_boot_log_info): whatever a guest printed reaches everyone
        # who reads /metrics and Prometheus, for its retention; `serve --without-console-lines` leaves them out.
        self.console_lines = console_lines
        self.buckets = histogram_buckets(policy)
        self._labels = [bucket_label(b) for b in self.buckets]
        self._caches = _Caches()

    def render(self) -> bytes:
        """The exposition (text format 0.0.4)."""
        with self._caches.lock:
            return render(self._families())

    def _families(self) -> Iterator[Family]:
        now = datetime.now(UTC)
        store = self.store
        channels = store.channels()
        running = store.running_members()
        booted = store.versions_with_boots()
        held = store.version_states({p.current for p in channels} | {p.previous for p in channels if p.previous})
        exported = self._exported(channels_ids={vid for vid, _ in held.values()},
                                  running_ids={vid for vid, _, _ in running}, booted=booted)  # fmt: skip
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

    def _boots(self, totals: Iterable[BootTotals], refs: Mapping[int, tuple[str, str]]) -> Iterator[Family]:
        attempts = Family(
            "amiforge_boot_attempts", "counter",
            "Boots of a version on a target by outcome (a timeout is not ready in time).",
            [*VERSION_LABELS, "outcome"],
        )  # fmt: skip
        ready = Family(
            "amiforge_time_to_ready_seconds", "histogram",
            "Seconds from launch to the readiness marker, of ready boots.", VERSION_LABELS,
        )  # fmt: skip
        replaced = Family(
            "amiforge_replacements", "counter",
            "Members of a version replaced on a target (rollouts, self-healing).", VERSION_LABELS,
        )  # fmt: skip
        previous, kept = self._caches.boots, {}
        for t in totals:
            # Equal counts mean equal text: totals only grow (more ready boots, more seconds), a version's labels
            # never change (versions are never deleted, ids never reused), and new buckets make a new collector.
            key = (t.version_id, t.target)
            numbers = (t.ready, t.failed, t.timeout, t.replaced, t.ttr_sum)
            cached = previous.get(key)
            if cached is None or cached[0] != numbers:
                image, ref = refs[t.version_id]
                pairs = ready.labels([image, ref, t.target])
                counts = t.cumulative(self.buckets)
                buckets = [*zip(self._labels, counts, strict=True), ("+Inf", t.ready)]
                cached = (
                    numbers,
                    "".join(attempts.sample(attempts.labels([image, ref, t.target, o]), getattr(t, o))
                            for o in BOOT_OUTCOMES),
                    ready.histogram(pairs, buckets, t.ttr_sum),
                    replaced.sample(pairs, t.replaced) if t.target != BOOT_TEST_TARGET else "",
                )  # fmt: skip
            kept[key] = cached
            attempts.lines.append(cached[1])
            ready.lines.append(cached[2])
            replaced.lines.append(cached[3])
        self._caches.boots = kept
        yield from (attempts, ready, replaced)

    def _running(
        self, running: Iterable[tuple[int, str, datetime | None]], refs: Mapping[int, tuple[str, str]], now: datetime
    ) -> Iterator[Family]:
        instances = Family(
            "amiforge_instances", "gauge",
            "Instances of a version running on a target (booting, ready or failed).", VERSION_LABELS,
        )  # fmt: skip
        beating = Family(
            "amiforge_heartbeat_instances", "gauge",
            "Running instances whose heartbeat was heard within the image's heartbeat_within (agent coverage).",
            VERSION_LABELS,
        )  # fmt: skip
        counts: dict[tuple[int, str], list[int]] = {}  # [running, heard lately, heard ever]
        fresh: dict[int, datetime] = {}
        for vid, target, heard_at in running:
            if target == BOOT_TEST_TARGET or vid not in refs:
                continue
            if vid not in fresh:
                fresh[vid] = now - self.policy.slos.of(refs[vid][0]).heartbeat_within
            row = counts.setdefault((vid, target), [0, 0, 0])
            row[0] += 1
            row[1] += heard_at is not None and heard_at >= fresh[vid]
            row[2] += heard_at is not None
        for (vid, target), (n, heard, ever) in sorted(counts.items()):
            image, ref = refs[vid]
            instances.add([image, ref, target], n)
            # No series where coverage is not measured (slis.coverage_measured): unmeasured is not 0 %.
            if coverage_measured(target, any_heard=ever > 0):
                beating.add([image, ref, target], heard)
        yield from (instances, beating)

    def _vulnerabilities(self, exported: set[int], refs: Mapping[int, tuple[str, str]]) -> Iterator[Family]:
        family = Family(
            "amiforge_vulnerabilities", "gauge",
            "Open CVE findings of a version's latest scan, by severity under the policy.",
            ["image", "version", "severity"],
        )  # fmt: skip
        scans = self.store.latest_scan_ids(exported)
        cache, previous = self._caches.vulns, self._caches.vuln_lines
        for scan_id in set(scans.values()) - set(cache):
            cache[scan_id] = open_vulnerabilities(self.store.scan_findings(scan_id), self.policy.severity_source)
        for stale in set(cache) - set(scans.values()):
            del cache[stale]
        kept: dict[tuple[int, int], str] = {}
        for key in sorted(scans.items()):
            text = previous.get(key)
            if text is None:
                image, ref = refs[key[0]]
                text = "".join(family.sample(family.labels([image, ref, severity]), count)
                               for severity, count in cache[key[1]].items())  # fmt: skip
            kept[key] = text
            family.lines.append(text)
        self._caches.vuln_lines = kept
        yield family

    def _rollouts(self) -> Iterator[Family]:
        total = Family(
            "amiforge_rollouts", "counter",
            "Rollouts that ended, by outcome (rolled_back: a gate failed and it was undone).",
            ["image", "target", "outcome"],
        )  # fmt: skip
        live = Family(
            "amiforge_rollout_in_progress", "gauge",
            "1 while a rollout on the target is running or rolling back.", ["image", "target"],
        )  # fmt: skip
        undone = Family(
            "amiforge_rollouts_undone", "counter",
            "Rollouts that `amiforge rollback` undid later, counted when the rollback starts (M6 counts them as rolled "
            "back; the rollbacks themselves are in no outcome of amiforge_rollouts_total).",
            ["image", "target"],
        )  # fmt: skip
        # Counters only grow: a rollout's end state is set once, whether it is a rollback is known when it starts,
        # and being undone is counted apart, never by moving the rollout to another outcome.
        ended: dict[tuple[str, str], dict[str, int]] = {}
        undid: dict[tuple[str, str], int] = {}
        busy: dict[tuple[str, str], int] = {}
        for image, target, state, rollback, was_undone, count in self.store.rollout_tally():
            key = (image, target)
            per = ended.setdefault(key, dict.fromkeys(ROLLOUT_OUTCOMES.values(), 0))
            outcome = None if rollback else ROLLOUT_OUTCOMES.get(state)
            if outcome is not None:
                per[outcome] += count
            undid[key] = undid.get(key, 0) + (count if was_undone else 0)
            busy[key] = busy.get(key, 0) or int(state in ROLLOUT_WATCHING)
        for (image, target), per in sorted(ended.items()):
            for outcome, count in per.items():
                total.add([image, target, outcome], count)
            undone.add([image, target], undid[(image, target)])
            live.add([image, target], busy[(image, target)])
        yield from (total, undone, live)

    def _versions(
        self, heads: Mapping[int, tuple[str, int, str | None]], channels: Iterable[ChannelPointer]
    ) -> Iterator[Family]:
        family = Family(
            "amiforge_version_info", "gauge",
            "1 for each exported version, per channel holding it ('' if none).",
            ["image", "version", "digest", "channel"],
        )  # fmt: skip
        holding: dict[str, list[str]] = {}
        for pointer in channels:
            holding.setdefault(pointer.current, []).append(pointer.channel)
        for _, (image, number, digest) in sorted(heads.items()):
            ref = f"{image}@{number}"
            for channel in sorted(holding.get(ref, [])) or [""]:
                family.add([image, ref, digest or "", channel], 1)
        yield family

    def _recent_boots(self, now: datetime) -> Iterator[Family]:
        tally = Family(
            "amiforge_versions", "gauge",
            "Versions of an image by state (built, tested, failed …): the pipeline's runs.", ["image", "status"],
        )  # fmt: skip
        for image, status, count in self.store.version_tally():
            tally.add([image, status], count)
        yield tally
        recent = Family(
            "amiforge_recent_boot_seconds", "gauge",
            "Seconds from launch to the outcome of each of the latest boots (the time to ready, when ready).",
            # instance_id, not instance: Prometheus gives `instance` to the scrape target (and would rename ours)
            [*VERSION_LABELS, "instance_id", "outcome"],
        )  # fmt: skip
        phases = Family(
            "amiforge_recent_boot_phase_seconds", "gauge",
            "Seconds each phase of the latest boots took, as the guest's systemd measured them: the kernel (with the "
            "initrd) until systemd started, userspace until multi-user.target, and the three units slowest to start.",
            [*VERSION_LABELS, "instance_id", "phase"],
        )  # fmt: skip
        logs = Family(
            "amiforge_recent_boot_log_info", "gauge",
            "1 for each of the last lines the console printed of the latest boots that failed (line 1 the oldest).",
            [*VERSION_LABELS, "instance_id", "line", "message"],
        )  # fmt: skip
        for b in self.store.recent_boots(now - RECENT_BOOT_WINDOW, RECENT_BOOTS):
            if b.ended_at is None or b.outcome is None:
                continue
            seconds = b.time_to_ready if b.outcome == "ready" and b.time_to_ready is not None else None
            elapsed = seconds if seconds is not None else (b.ended_at - b.launched_at).total_seconds()
            labels = [b.version_ref.partition("@")[0], b.version_ref, b.target, b.instance]
            recent.add([*labels, b.outcome], elapsed)
            for phase, took in (b.timeline or {}).items():
                phases.add([*labels, phase], took)
            for number, message in enumerate(b.console_tail[:TAIL_LINES] if self.console_lines else (), 1):
                logs.add([*labels, str(number), message], 1)
        yield from (recent, phases, logs)
