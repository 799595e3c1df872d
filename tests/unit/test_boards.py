"""The console's dashboards: every panel of the Grafana boards has a computation, and the numbers are the registry's
(the same M1–M6 `amiforge metrics` reports), over the chosen window, version and target."""

from __future__ import annotations

from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from amiforge.errors import ConfigError
from amiforge.lifecycle.boards import BUCKETS, PANELS, board
from amiforge.lifecycle.dashboards import boards
from amiforge.lifecycle.metrics import metrics
from amiforge.model import BootObservation, Status
from amiforge.settings import Settings
from amiforge.store.sql import SqlStore, open_store
from amiforge.strategy import Strategy

NOW = datetime(2026, 12, 7, 12, 0, tzinfo=UTC)


@pytest.fixture
def store(tmp_path: Path) -> Iterator[SqlStore]:
    with open_store(f"sqlite:///{tmp_path}/r.db") as s:
        yield s


@pytest.fixture
def settings(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Settings:
    monkeypatch.delenv("AMIFORGE_POLICY", raising=False)
    monkeypatch.chdir(tmp_path)
    return Settings(data_dir=tmp_path / "data", actor="test")


def _version(store: SqlStore) -> int:
    return store.create_version(name="web", recipe_digest="r" * 64, recipe_path="/r.yaml", provider="local", tags={},
                                parent=None).id  # fmt: skip


def _seed(store: SqlStore) -> None:
    """web@1: 4 boots on local:web, 3 ready (10, 20, 30 s), 1 failed with console lines, 2 replaced; web@2: one
    ready boot test and one ready fleet boot; a rollout of web@2 that succeeded."""
    v1, v2 = _version(store), _version(store)
    t = NOW - timedelta(hours=2)
    boots = [
        BootObservation("g-1", v1, t, "ready", 10.0, t + timedelta(seconds=10), NOW - timedelta(minutes=30), True),
        BootObservation("g-2", v1, t, "ready", 20.0, t + timedelta(seconds=20), NOW - timedelta(minutes=30), True),
        BootObservation("g-3", v1, t, "ready", 30.0, t + timedelta(seconds=30), timeline={"kernel": 2.5}),
        BootObservation("g-4", v1, t, "failed", None, t + timedelta(seconds=90), t + timedelta(seconds=91),
                        detail="not ready within 90s", console_tail=("TEST-0001 oops", "kernel panic")),
        BootObservation("g-5", v2, NOW - timedelta(minutes=20), "ready", 12.0, NOW - timedelta(minutes=19)),
    ]  # fmt: skip
    store.record_boots("local:web", boots)
    store.record_boots("boot-test", [BootObservation("bt-1", v2, t, "ready", 8.0, t + timedelta(seconds=8), t)])
    rollout = store.create_rollout("local:web", v2, strategy=Strategy().model_dump(mode="json"), waves=[1],
                                   actor="token:t-operate")  # fmt: skip
    store.update_rollout(rollout.id, expect="running", state="succeeded")


def _rows(view_panels: object, title: str) -> list[tuple[str, ...]]:
    [panel] = [p for p in view_panels if p.title == title]  # type: ignore[attr-defined]
    return list(panel.table.rows)


def test_every_grafana_panel_has_a_computation() -> None:
    titles = {title for b in boards() for title, _panel, _queries, _instant in b.panels}
    assert titles == set(PANELS)


def test_the_boards_hold_the_registrys_numbers(store: SqlStore, settings: Settings) -> None:
    _seed(store)
    report = metrics(store=store, settings=settings, now=NOW, read_fleets=False)
    executive = board("executive", store=store, settings=settings, now=NOW).panels
    [web1] = [r for r in report.targets if (r.version, r.target) == ("web@1", "local:web")]
    assert web1.boot_success == 0.75
    assert ("web@1", "local:web", "75.0 %", "4") in _rows(executive, "Boot success (24 h)")
    assert ("web@1", "local:web", "30.0 s", "3") in _rows(executive, "p95 time to ready (24 h)")
    assert _rows(executive, "How rollouts ended (canary status)") == [("web", "local:web", "1", "0", "0", "0.0 %")]
    assert _rows(executive, "Rollouts in progress") == []

    oncall = board("oncall", store=store, settings=settings, now=NOW).panels
    [failed] = _rows(oncall, "Recent failed boots (instance ids)")
    assert failed[1:5] == ("g-4", "web@1", "local:web", "failed") and failed[5] == "not ready within 90s"
    assert _rows(oncall, "Boot logs: the last console lines of recent failed boots")[0][3] == (
        "TEST-0001 oops\nkernel panic"
    )
    [replaced] = [p for p in oncall if p.title == "Replacements per minute"]
    assert len(replaced.series[0].points) == BUCKETS
    assert ("web@1 on local:web", "2") in replaced.table.rows
    assert [r[1:5] for r in _rows(oncall, "Recent deploys and rollbacks")] == [
        ("#1", "web@2", "local:web", "succeeded")]  # fmt: skip

    debug = board("debug", store=store, settings=settings, now=NOW).panels
    assert _rows(debug, "Pipeline runs: versions by state") == [("web", "baking", "2")]
    assert _rows(debug, "Boot tests by outcome") == [("web@2", "1", "0", "0")]
    assert ("g-3", "web@1", "local:web", "kernel 2.5 s") in _rows(
        debug, "Boot phases by instance (the guest's systemd: kernel, userspace, slowest units)"
    )
    assert _rows(debug, "Time to ready (p50, p95, p99)") == [("p50", "12.0 s"), ("p95", "30.0 s"), ("p99", "30.0 s")]


def test_filters_narrow_every_panel(store: SqlStore, settings: Settings) -> None:
    _seed(store)
    only = board("oncall", store=store, settings=settings, version="web@2", now=NOW).panels
    assert _rows(only, "Recent failed boots (instance ids)") == []
    short = board("executive", store=store, settings=settings, window=timedelta(minutes=30), now=NOW).panels
    # web@1 still runs (g-3) but launched nothing in the last 30 minutes: no success rate, not a false 0 %.
    assert _rows(short, "Boot success (24 h)") == [("web@1", "local:web", "–", "0"),
                                                   ("web@2", "local:web", "100.0 %", "1")]  # fmt: skip
    with pytest.raises(ConfigError, match="no dashboard"):
        board("ceo", store=store, settings=settings)


def test_members_that_became_ready_long_ago_are_not_boots_of_the_window(store: SqlStore, settings: Settings) -> None:
    v = _version(store)
    old = NOW - timedelta(days=20)
    store.record_boots("local:web", [BootObservation(f"g-old-{i}", v, old, "ready", 100.0,
                                                     old + timedelta(seconds=100)) for i in range(20)])  # fmt: skip
    recent = NOW - timedelta(minutes=30)
    fresh = [BootObservation(f"g-new-{i}", v, recent, "failed", None, recent + timedelta(seconds=90)) for i in range(2)]
    fresh.append(BootObservation("g-new-ok", v, recent, "ready", 10.0, recent + timedelta(seconds=10)))
    store.record_boots("local:web", fresh)
    oncall = board("oncall", store=store, settings=settings, now=NOW).panels
    assert _rows(oncall, "Boot failures (share of launches, 5 m)") == [("web@1 on local:web", "66.7 %")]
    assert sorted(r[1] for r in _rows(oncall, "Recent failed boots (instance ids)")) == ["g-new-0", "g-new-1"]
    debug = board("debug", store=store, settings=settings, target="web", now=NOW).panels  # bare name: local:web
    assert _rows(debug, "Time to ready (p50, p95, p99)") == [("p50", "10.0 s"), ("p95", "10.0 s"), ("p99", "10.0 s")]
    assert {r[0] for r in _rows(debug, "Boot timeline: seconds to outcome, by instance")} == {
        "g-new-0", "g-new-1", "g-new-ok"}  # fmt: skip
    digest_view = board("oncall", store=store, settings=settings, version="web@1", now=NOW)
    assert digest_view.version == "web@1"


def test_a_version_named_by_its_digest_is_that_version_on_every_panel(store: SqlStore, settings: Settings) -> None:
    _seed(store)
    store.transition(store.get_version("web@2").id, Status.BUILT, expect=Status.BAKING, digest="ab" * 32, size_bytes=1)
    for name in ("abababab", "web@2"):
        executive = board("executive", store=store, settings=settings, version=name, now=NOW).panels
        assert [r[0] for r in _rows(executive, "Open vulnerabilities by version")] == ["web@2"], name
        assert _rows(executive, "How rollouts ended (canary status)") == [("web", "local:web", "1", "0", "0", "0.0 %")]
