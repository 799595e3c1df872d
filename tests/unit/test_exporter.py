"""`/metrics` and `/healthz` (amiforge serve): the metric families of the public contract with the values the registry
holds, histogram buckets at every SLO threshold, bounded cardinality, vulnerability counts kept per scan, the
exposition accepted by the real `promtool check metrics`, and the server's refusals."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import threading
import urllib.error
import urllib.request
from collections.abc import Iterator, Sequence
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

from amiforge.errors import ConfigError
from amiforge.lifecycle.exporter import TelemetryCollector, bucket_label, histogram_buckets
from amiforge.lifecycle.promote import policy_of
from amiforge.lifecycle.tokens import create_token
from amiforge.model import BootObservation, BootTotals, Finding, FindingKind, ScanRecord, Severity, Status
from amiforge.policy.document import Policy, default_policy, parse_policy
from amiforge.scanners.sbom import sbom_digest
from amiforge.settings import Settings
from amiforge.store.sql import SqlStore, open_store
from amiforge.strategy import Strategy
from amiforge.web.metrics import Metrics, PolicySource
from amiforge.web.server import Listen, parse_listen, serve
from tests.conftest import required_or_skip


@pytest.fixture
def store(tmp_path: Path) -> Iterator[SqlStore]:
    with open_store(f"sqlite:///{tmp_path}/r.db") as s:
        yield s


@pytest.fixture
def policy(tmp_path: Path) -> Policy:
    return parse_policy(
        "channels: {dev: {require_signature: false}}\nslos:\n  images:\n    web: {time_to_ready: {under: 42s}}\n",
        tmp_path / "policy.yaml",
    )


def _version(store: SqlStore, name: str = "web") -> int:
    return store.create_version(
        name=name, recipe_digest="r" * 64, recipe_path="/r.yaml", provider="local", tags={}, parent=None
    ).id


def _scrape(store: SqlStore, policy: Policy) -> str:
    return _scrape_app(Metrics(store, policy))


def _scrape_app(app: Metrics) -> str:
    return app.render().decode()


def _samples(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def _get(samples: dict[tuple[str, tuple[tuple[str, str], ...]], float], name: str, **labels: str) -> float:
    return samples[(name, tuple(sorted(labels.items())))]


def test_the_families_hold_what_the_registry_holds(store: SqlStore, policy: Policy) -> None:
    now = datetime.now(UTC)  # heartbeats are judged against the scrape's clock: the test's own now, not import's
    v1, v2 = _version(store), _version(store)
    launched = now - timedelta(minutes=10)
    boots = [BootObservation(f"g-{i}", v2, launched, "ready", t, launched + timedelta(seconds=t),
                             last_heartbeat_at=now - timedelta(seconds=20 if i else 600),
                             timeline={"kernel": 2.1, "userspace": t - 3, "slow.service": t - 6} if i == 1 else None)
             for i, t in enumerate([12.0, 41.5, 42.0, 50.0])]  # fmt: skip
    boots += [
        BootObservation(
            "g-t",
            v2,
            launched,
            "timeout",
            ended_at=launched + timedelta(seconds=300),
            console_tail=('a "quoted" \\ line', "[  12.1] the last"),
        ),
        BootObservation("g-old", v1, launched, "ready", 9.0, launched, launched + timedelta(minutes=5), True),
    ]
    store.record_boots("local:web", boots)
    store.record_boots("boot-test", [BootObservation("run-1", v2, launched, "failed", 30.0, launched, launched)])
    store.add_scan(v2, ScanRecord(now, (), "{}", sbom_digest("{}"), (
        Finding(FindingKind.CVE, "TEST-0001", Severity.CRITICAL, "t", "osv", package="p"),
        Finding(FindingKind.CVE, "TEST-0002", Severity.LOW, "t", "osv", package="p"),
    ), "TEST"))  # fmt: skip
    store.transition(v2, Status.BUILT, expect=Status.BAKING, digest="d" * 64, size_bytes=1)
    store.move_channel("web", "dev", v2, expect_current=None, actor="t", reason="test")
    rollout = store.create_rollout("local:web", v2, strategy=Strategy().model_dump(mode="json"), waves=[1], actor="t")
    s = _samples(_scrape(store, policy))
    web2 = {"image": "web", "version": "web@2", "target": "local:web"}
    assert _get(s, "amiforge_boot_attempts_total", **web2, outcome="ready") == 4
    assert _get(s, "amiforge_boot_attempts_total", **web2, outcome="timeout") == 1
    assert _get(s, "amiforge_boot_attempts_total", **web2, outcome="failed") == 0
    assert _get(s, "amiforge_boot_attempts_total", image="web", version="web@2", target="boot-test",
                outcome="failed") == 1  # fmt: skip
    # The policy's threshold (42 s) is a bucket, exact: 41.5 and 42.0 are within it, 50 is not.
    assert _get(s, "amiforge_time_to_ready_seconds_bucket", **web2, le="42.0") == 3
    assert _get(s, "amiforge_time_to_ready_seconds_bucket", **web2, le="30.0") == 1
    assert _get(s, "amiforge_time_to_ready_seconds_bucket", **web2, le="+Inf") == 4
    assert _get(s, "amiforge_time_to_ready_seconds_count", **web2) == 4
    assert _get(s, "amiforge_time_to_ready_seconds_sum", **web2) == pytest.approx(145.5)
    assert _get(s, "amiforge_replacements_total", image="web", version="web@1", target="local:web") == 1
    assert _get(s, "amiforge_instances", **web2) == 5  # the timed-out member still runs, without a heartbeat
    assert _get(s, "amiforge_heartbeat_instances", **web2) == 3  # one heartbeat is 10 minutes old
    assert _get(s, "amiforge_vulnerabilities", image="web", version="web@2", severity="critical") == 1
    assert _get(s, "amiforge_vulnerabilities", image="web", version="web@2", severity="high") == 0
    assert _get(s, "amiforge_rollout_in_progress", image="web", target="local:web") == 1
    assert _get(s, "amiforge_rollouts_total", image="web", target="local:web", outcome="succeeded") == 0
    assert _get(s, "amiforge_version_info", image="web", version="web@2", digest="d" * 64, channel="dev") == 1
    assert _get(s, "amiforge_recent_boot_seconds", **web2, instance_id="g-t", outcome="timeout") == 300
    assert _get(s, "amiforge_recent_boot_seconds", **web2, instance_id="g-1", outcome="ready") == 41.5
    # The boot that failed: its console's last lines, each a series of its own (label values escaped and read back).
    logs = {dict(k[1])["line"]: dict(k[1])["message"] for k in s if k[0] == "amiforge_recent_boot_log_info"}
    assert logs == {"1": 'a "quoted" \\ line', "2": "[  12.1] the last"}
    # `serve --without-console-lines`: none of what guests printed leaves the registry.
    quiet = _samples(_scrape_app(Metrics(store, policy, console_lines=False)))
    assert not [k for k in quiet if k[0] == "amiforge_recent_boot_log_info"] and quiet.keys() == s.keys() - _log_series(
        s
    )
    # The boot whose guest timed itself: its phases, in seconds; the others have none.
    phases = {k[1]: v for k, v in s.items() if k[0] == "amiforge_recent_boot_phase_seconds"}
    g1 = tuple(sorted({**web2, "instance_id": "g-1"}.items()))
    assert phases == {
        tuple(sorted((*g1, ("phase", "kernel")))): 2.1,
        tuple(sorted((*g1, ("phase", "userspace")))): 38.5,
        tuple(sorted((*g1, ("phase", "slow.service")))): 35.5,
    }
    assert _get(s, "amiforge_versions", image="web", status="built") == 1
    assert _get(s, "amiforge_versions", image="web", status="baking") == 1
    store.update_rollout(rollout.id, expect="running", state="failed")
    s = _samples(_scrape(store, policy))
    assert _get(s, "amiforge_rollouts_total", image="web", target="local:web", outcome="rolled_back") == 1
    assert _get(s, "amiforge_rollout_in_progress", image="web", target="local:web") == 0


def test_only_versions_in_use_or_recent_are_exported(store: SqlStore, policy: Policy) -> None:
    now = datetime.now(UTC)
    ids = [_version(store) for _ in range(8)]
    for vid in ids:  # every version booted once, long ago, and stopped
        store.record_boots("boot-test", [BootObservation(f"run-{vid}", vid, now, "ready", 5.0, now, now)])
    store.record_boots("local:web", [BootObservation("g-1", ids[0], now, "ready", 5.0, now)])  # web@1 still runs
    versions = {dict(labels)["version"] for (name, labels) in _samples(_scrape(store, policy))
                if name == "amiforge_boot_attempts_total"}  # fmt: skip
    assert versions == {"web@1", "web@4", "web@5", "web@6", "web@7", "web@8"}  # running, and the newest five


def test_vulnerability_counts_are_read_once_per_scan(store: SqlStore, policy: Policy,
                                                     monkeypatch: pytest.MonkeyPatch) -> None:  # fmt: skip
    now = datetime.now(UTC)
    v = _version(store)
    store.record_boots("boot-test", [BootObservation("run-1", v, now, "ready", 5.0, now, now)])
    store.add_scan(v, ScanRecord(now, (), "{}", sbom_digest("{}"), (), "TEST"))
    collector = TelemetryCollector(store, policy)
    reads: list[int] = []
    real = store.scan_findings

    def counted(scan_id: int) -> tuple[Finding, ...]:
        reads.append(scan_id)
        return real(scan_id)

    monkeypatch.setattr(store, "scan_findings", counted)
    for _ in range(3):
        collector.render()
    assert len(reads) == 1
    store.add_scan(v, ScanRecord(now, (), "{}", sbom_digest("{}"), (), "TEST"))  # a rescan: a new scan id
    collector.render()
    assert len(reads) == 2 and len(collector._caches.vulns) == 1  # the old scan's counts are dropped


def test_buckets_are_whole_seconds_including_every_threshold(policy: Policy) -> None:
    buckets = histogram_buckets(policy)
    assert 42.0 in buckets and 120.0 in buckets and all(b == int(b) for b in buckets)
    assert histogram_buckets(default_policy()) == tuple(sorted(set(buckets) - {42.0}))
    assert bucket_label(120.0) == "120.0"


def test_promtool_accepts_the_exposition(store: SqlStore, policy: Policy) -> None:
    now = datetime.now(UTC)
    promtool = shutil.which("promtool")
    required_or_skip(
        promtool is not None, "promtool is missing", "scripts/bootstrap.sh --test (apt-get install prometheus)"
    )
    assert promtool is not None
    v = _version(store)
    store.record_boots("local:web", [BootObservation("g-1", v, now, "ready", 5.0, now, last_heartbeat_at=now)])
    text = _scrape(store, policy)
    done = subprocess.run([promtool, "check", "metrics"], input=text, capture_output=True, text=True, timeout=60)
    # promtool's lint wants HELP on every family and counters ending _total: any complaint is a finding.
    assert (done.returncode, done.stdout + done.stderr) == (0, "")


def test_the_server_answers_metrics_and_health_and_refuses_the_rest(store: SqlStore, policy: Policy,
                                                                     tmp_path: Path) -> None:  # fmt: skip
    """A real server on a socket: /healthz for anyone, /metrics for a token's holder (or anyone, --open-metrics)."""
    urls: list[str] = []
    started = threading.Event()

    def ready(url: str) -> None:
        urls.append(url)
        started.set()

    settings = Settings(data_dir=tmp_path / "data")
    secret = create_token("prometheus", "read", store=store, settings=settings).secret
    thread = threading.Thread(
        target=serve, args=(Listen("127.0.0.1", 0),),
        kwargs={"store": store, "settings": settings, "policy": policy, "collect_every": None, "ready": ready},
        daemon=True,
    )  # fmt: skip
    thread.start()
    assert started.wait(10)
    base = urls[0]
    bearer = {"Authorization": f"Bearer {secret}"}
    with urllib.request.urlopen(f"{base}/healthz", timeout=10) as reply:
        assert reply.status == 200 and json.loads(reply.read()) == {"status": "ok"}
    with urllib.request.urlopen(urllib.request.Request(f"{base}/metrics", headers=bearer), timeout=10) as reply:
        assert reply.headers["Content-Type"].startswith("text/plain; version=0.0.4")
        assert b"# TYPE amiforge_boot_attempts_total counter" in reply.read()
    for path in ("/healthz", "/metrics"):
        asked = urllib.request.Request(f"{base}{path}", method="HEAD", headers=bearer)
        with urllib.request.urlopen(asked, timeout=10) as reply:
            assert reply.status == 200 and reply.read() == b""
    forged = {"Authorization": "Bearer amf_" + "x" * 43}
    refused = [("/nope", "GET", bearer, 404), ("/metrics", "POST", bearer, 405), ("/metrics", "GET", {}, 401),
               ("/metrics", "GET", forged, 401)]  # fmt: skip
    for path, method, headers, code in refused:
        asked = urllib.request.Request(f"{base}{path}", method=method, headers=headers)
        with pytest.raises(urllib.error.HTTPError) as caught:
            urllib.request.urlopen(asked, timeout=10)
        assert caught.value.code == code, (path, method, headers)
        if code == 405:
            assert caught.value.headers["Allow"] == "GET, HEAD"
        if code == 401:
            assert caught.value.headers["WWW-Authenticate"].startswith("Bearer")


def test_a_changed_policy_file_changes_the_buckets_and_a_broken_one_keeps_the_last(
    store: SqlStore, tmp_path: Path
) -> None:
    now = datetime.now(UTC)
    v = _version(store)
    store.record_boots("local:web", [BootObservation("g-1", v, now, "ready", 33.0, now)])
    path = tmp_path / "policy.yaml"
    path.write_text("channels: {dev: {}}\nslos: {images: {web: {time_to_ready: {under: 42s}}}}\n")
    source = PolicySource(Settings(data_dir=tmp_path / "data", policy=path), policy_of)
    app = Metrics(store, source)
    labels = {"image": "web", "version": "web@1", "target": "local:web"}
    assert _get(_samples(_scrape_app(app)), "amiforge_time_to_ready_seconds_bucket", **labels, le="42.0") == 1
    path.write_text("channels: {dev: {}}\nslos: {images: {web: {time_to_ready: {under: 33s}}}}\n")
    os.utime(path, ns=(1, 1))  # a new modification time, whatever the file system's resolution
    samples = _samples(_scrape_app(app))
    assert _get(samples, "amiforge_time_to_ready_seconds_bucket", **labels, le="33.0") == 1
    assert ("amiforge_time_to_ready_seconds_bucket", (*sorted({**labels, "le": "42.0"}.items()),)) not in samples
    path.write_text("channels: {dev: {}}\nslos: {images: {web: {time_to_ready: {under: soon}}}}\n")
    os.utime(path, ns=(2, 2))
    assert _get(_samples(_scrape_app(app)), "amiforge_time_to_ready_seconds_bucket", **labels, le="33.0") == 1


def test_listen_addresses() -> None:
    assert parse_listen("127.0.0.1:9464", allow_remote=False) == Listen("127.0.0.1", 9464)
    assert parse_listen("[::1]:9464", allow_remote=False).url == "http://[::1]:9464"
    assert parse_listen("localhost:1", allow_remote=False).host == "localhost"
    for bad in ("9464", "127.0.0.1:port", "127.0.0.1:70000", ":9464"):
        with pytest.raises(ConfigError, match="HOST:PORT"):
            parse_listen(bad, allow_remote=False)
    with pytest.raises(ConfigError, match="not a loopback address"):
        parse_listen("0.0.0.0:9464", allow_remote=False)
    assert parse_listen("0.0.0.0:9464", allow_remote=True).host == "0.0.0.0"
    assert parse_listen("0.0.0.0:9464", allow_remote=False, tls=True).url == "https://0.0.0.0:9464"


def test_a_scrape_reuses_the_text_of_unchanged_totals_and_rewrites_changed_ones(
    store: SqlStore, policy: Policy, monkeypatch: pytest.MonkeyPatch
) -> None:
    now = datetime.now(UTC)
    web, api = _version(store), _version(store, "api")
    store.record_boots("local:a", [BootObservation("g-1", web, now, "ready", 4.0, now)])
    store.record_boots("local:b", [BootObservation("g-2", api, now, "ready", 6.0, now)])
    collector = TelemetryCollector(store, policy)
    written: list[tuple[int, str]] = []
    real = BootTotals.cumulative

    def counted(self: BootTotals, bounds: Sequence[float]) -> list[int]:
        written.append((self.version_id, self.target))
        return real(self, bounds)

    monkeypatch.setattr(BootTotals, "cumulative", counted)
    first = _samples(collector.render().decode())
    assert sorted(written) == [(web, "local:a"), (api, "local:b")]
    written.clear()
    store.record_boots("local:a", [BootObservation("g-3", web, now, "failed", None, now, detail="TEST")])
    second = _samples(collector.render().decode())
    assert written == [(web, "local:a")]  # only the row whose totals changed is written again
    attempts = {"image": "web", "version": "web@1", "target": "local:a"}
    assert _get(first, "amiforge_boot_attempts_total", **attempts, outcome="failed") == 0
    assert _get(second, "amiforge_boot_attempts_total", **attempts, outcome="failed") == 1
    reused = {"image": "api", "version": "api@1", "target": "local:b"}
    assert _get(second, "amiforge_time_to_ready_seconds_count", **reused) == 1
    assert _get(second, "amiforge_time_to_ready_seconds_sum", **reused) == 6.0


def test_counters_never_go_down_when_a_rollout_is_rolled_back_by_hand(store: SqlStore, policy: Policy) -> None:
    """`amiforge rollback` undoes a rollout that had succeeded: the succeeded count stays, the undone count grows
    (Prometheus reads any decrease of a counter as a reset)."""
    v1, v2 = _version(store), _version(store)
    strategy = Strategy().model_dump(mode="json")
    change = store.create_rollout("local:web", v2, strategy=strategy, waves=[1], actor="t")
    store.update_rollout(change.id, expect="running", state="succeeded")
    app = Metrics(store, policy)
    before = _samples(_scrape_app(app))
    back = store.create_rollout("local:web", v1, strategy=strategy, waves=[1], actor="t", undoes=change.id)
    during = _samples(_scrape_app(app))
    store.update_rollout(back.id, expect="running", state="succeeded")
    after = _samples(_scrape_app(app))
    labels = {"image": "web", "target": "local:web"}
    assert [_get(s, "amiforge_rollouts_total", **labels, outcome="succeeded") for s in (before, during, after)] == [
        1, 1, 1]  # the rollback itself is no change: never a succeeded rollout  # fmt: skip
    assert [_get(s, "amiforge_rollouts_undone_total", **labels) for s in (before, during, after)] == [0, 1, 1]
    assert [_get(s, "amiforge_rollout_in_progress", **labels) for s in (before, during, after)] == [0, 1, 0]
    for earlier, later in ((before, during), (during, after)):
        for key, value in earlier.items():
            if key[0].endswith(("_total", "_bucket", "_count", "_sum")) and key in later:
                assert later[key] >= value, key


def _log_series(
    samples: dict[tuple[str, tuple[tuple[str, str], ...]], float],
) -> set[tuple[str, tuple[tuple[str, str], ...]]]:
    return {k for k in samples if k[0] == "amiforge_recent_boot_log_info"}
