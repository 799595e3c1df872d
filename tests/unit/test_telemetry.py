"""Telemetry: boots recorded only forward with their totals (SQLite and PostgreSQL), the SLIs M1–M6 and SLO budgets
computed from them (pure), observations read from fleet signals, and the policy's `slos:` section."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from dataclasses import replace
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from amiforge.errors import ConfigError
from amiforge.lifecycle.slis import (
    SloStatus,
    open_vulnerabilities,
    quantile,
    rollout_rates,
    slo_statuses,
    target_slis,
)
from amiforge.lifecycle.telemetry import boot_test_outcome, observations_of, record_boot_test
from amiforge.model import (
    BootObservation,
    BootRecord,
    BootReport,
    BootSignal,
    CheckResult,
    Finding,
    FindingKind,
    Member,
    Rollout,
    Severity,
)
from amiforge.policy.document import parse_policy
from amiforge.policy.slos import ImageSlos, Slos
from amiforge.store.sql import SqlStore, open_store

T0 = datetime(2026, 3, 1, 12, 0, tzinfo=UTC)


def _at(seconds: float) -> datetime:
    return T0 + timedelta(seconds=seconds)


@pytest.fixture
def store(store_url: str) -> Iterator[SqlStore]:
    with open_store(store_url) as s:
        yield s


def _version(store: SqlStore, name: str = "web") -> int:
    return store.create_version(
        name=name, recipe_digest="r" * 64, recipe_path="/r.yaml", provider="local", tags={}, parent=None
    ).id


# --- the store: only forward, totals in step ----------------------------------------------------------------------


def test_a_boot_observed_again_only_moves_forward_and_is_counted_once(store: SqlStore) -> None:
    v = _version(store)
    booting = BootObservation("g-1", v, _at(0))
    assert store.record_boots("local:web", [booting]) == 1
    # Nothing decided yet: the counters exist, at zero (a series Prometheus scrapes before the first outcome).
    [zero] = store.boot_totals()
    assert (zero.ready, zero.failed, zero.timeout, zero.replaced, dict(zero.ttr_seconds)) == (0, 0, 0, 0, {})
    ready = replace(booting, outcome="ready", time_to_ready=12.2, ended_at=_at(12.2), last_heartbeat_at=_at(20))
    assert store.record_boots("local:web", [ready]) == 1
    assert store.record_boots("local:web", [ready]) == 0  # the same news again changes nothing
    # A later reading that says something else about a decided boot (it crashed later) does not rewrite it.
    assert store.record_boots("local:web", [replace(ready, outcome="failed", last_heartbeat_at=_at(10))]) == 0
    replaced = replace(ready, stopped_at=_at(300), replaced=True, last_heartbeat_at=_at(290))
    assert store.record_boots("local:web", [replaced]) == 1
    [boot] = store.boots_in_window(_at(0), _at(400))
    assert (boot.outcome, boot.time_to_ready, boot.ended_at, boot.stopped_at) == ("ready", 12.2, _at(12.2), _at(300))
    assert boot.replaced and boot.last_heartbeat_at == _at(290) and boot.version_ref == "web@1"
    [totals] = store.boot_totals()
    assert (totals.ready, totals.failed, totals.timeout, totals.replaced) == (1, 0, 0, 1)
    assert totals.ttr_sum == pytest.approx(12.2) and dict(totals.ttr_seconds) == {13: 1}
    # The boot's timeline arrives once (the guest prints it once); another reading does not rewrite it.
    timed = replace(replaced, timeline={"kernel": 2.1, "userspace": 9.9, "nginx.service": 0.5})
    assert store.record_boots("local:web", [timed]) == 1
    assert store.record_boots("local:web", [replace(timed, timeline={"kernel": 9.9, "userspace": 1.0})]) == 0
    [boot] = store.boots_in_window(_at(0), _at(400))
    assert boot.timeline == {"kernel": 2.1, "userspace": 9.9, "nginx.service": 0.5} and boot.console_tail == ()
    assert list(boot.timeline) == ["kernel", "userspace", "nginx.service"]  # in the order the guest gave them


def test_totals_add_up_per_version_and_target_and_buckets_are_exact_at_whole_seconds(store: SqlStore) -> None:
    v1, v2 = _version(store), _version(store)
    times = [4.0, 4.2, 10.0, 120.0, 120.001]
    boots = [BootObservation(f"g-{i}", v1, _at(i), "ready", t, _at(i + t)) for i, t in enumerate(times)]
    boots += [BootObservation("g-f", v1, _at(9), "failed", 3.0, _at(12)), BootObservation("g-t", v1, _at(9), "timeout")]
    store.record_boots("local:web", boots)
    store.record_boots("boot-test", [BootObservation("run-1", v2, _at(0), "ready", 30.0, _at(30), _at(40))])
    by_key = {(t.version_id, t.target): t for t in store.boot_totals()}
    web = by_key[(v1, "local:web")]
    assert (web.ready, web.failed, web.timeout) == (5, 1, 1)  # a failed boot's time is not a ready time
    assert web.within(4) == 1 and web.within(5) == 2 and web.within(120) == 4 and web.within(121) == 5
    assert web.ttr_sum == pytest.approx(sum(times))
    assert by_key[(v2, "boot-test")].ready == 1
    assert [t.version_id for t in store.boot_totals([v2])] == [v2]


def test_stopped_boots_leave_the_running_set_and_windows_find_what_lived_in_them(store: SqlStore) -> None:
    v = _version(store)
    store.record_boots("local:web", [BootObservation(f"g-{i}", v, _at(i * 100), "ready", 5.0, _at(i * 100 + 5))
                                     for i in range(3)])  # fmt: skip
    assert store.running_targets() == ["local:web"]
    assert store.stop_boots("local:web", keep={"g-2"}, at=_at(1000)) == ["g-0", "g-1"]
    assert store.stop_boots("local:web", keep={"g-2"}, at=_at(2000)) == []  # already stopped: the first time stands
    # A window after the stop sees only g-2; one before it sees all three; one before any launch, none.
    assert [b.instance for b in store.boots_in_window(_at(1500), _at(1600))] == ["g-2"]
    assert [b.instance for b in store.boots_in_window(_at(250), _at(900))] == ["g-0", "g-1", "g-2"]
    assert store.boots_in_window(_at(-100), _at(0)) == []
    assert store.stop_boots("local:web", keep=(), at=_at(3000)) == ["g-2"]
    assert store.running_targets() == []


# --- the SLIs (pure) -------------------------------------------------------------------------------------------


def _boot(instance: str, outcome: str | None, ttr: float | None = None, *, launched: float = 0.0,
          target: str = "local:web", ref: str = "web@2", stopped: float | None = None, replaced: bool = False,
          beat: float | None = None) -> BootRecord:  # fmt: skip
    ended = None if outcome is None else _at(launched + (ttr or 60.0))
    return BootRecord(
        id=hash(instance) & 0xFFFF, version_id=2, version_ref=ref, target=target, instance=instance,
        launched_at=_at(launched), outcome=outcome, time_to_ready=ttr, ended_at=ended,  # type: ignore[arg-type]
        stopped_at=None if stopped is None else _at(stopped), replaced=replaced,
        last_heartbeat_at=None if beat is None else _at(beat), detail="",
    )  # fmt: skip


def test_quantiles_are_nearest_rank() -> None:
    values = [float(i) for i in range(1, 101)]
    assert (quantile(values, 50), quantile(values, 95), quantile(values, 99)) == (50.0, 95.0, 99.0)
    assert quantile([7.0], 99) == 7.0 and quantile([], 50) is None


def test_m1_to_m4_of_a_version_on_a_fleet() -> None:
    day = 86400.0
    now = _at(2 * day)
    boots = [
        _boot("a", "ready", 10.0, launched=day, beat=2 * day - 30),  # running, heartbeat fresh
        _boot("b", "ready", 20.0, launched=day, beat=2 * day - 600),  # running, heartbeat stale
        _boot("c", "ready", 30.0, launched=day, stopped=1.5 * day, replaced=True),  # replaced half-way
        _boot("d", "timeout", None, launched=day, stopped=day + 100),
        _boot("e", "failed", 12.0, launched=day),  # ready but a check failed: a failed launch, never running
        _boot("old", "ready", 10.0, launched=0, stopped=day / 2),  # before the window: no launch counted
    ]
    [row] = target_slis(boots, start=now - timedelta(days=1), now=now, slos_of=lambda _image: Slos())
    assert (row.ready, row.failed, row.timeout, row.launches) == (3, 1, 1, 5)
    assert row.boot_success == pytest.approx(0.6)
    assert (row.time_to_ready.p50, row.time_to_ready.p95) == (20.0, 30.0)
    # Instance-days in the window, ready or not: a, b and e a whole day each (launched at its start), c half a
    # day, d 100 s.
    days = 3.5 + 100 / 86400
    assert row.instance_days == pytest.approx(days) and row.replacements == 1
    assert row.replacements_per_1000_days == pytest.approx(1000 / days)
    # Running: a, b and e (a failed member still there, without a heartbeat); c and d stopped.
    assert (row.running, row.heartbeating) == (3, 1) and row.coverage == pytest.approx(1 / 3)


def test_coverage_of_a_group_counts_its_cloudwatch_heartbeats_and_is_unmeasured_where_none_are_reported() -> None:
    now = _at(1000)
    heard = replace(_boot("i-0000000000test01", "ready", 25.0, target="aws:eu-west-1/web-asg"),
                    last_heartbeat_at=_at(990))  # fmt: skip
    silent = _boot("i-0000000000test02", "ready", 25.0, target="aws:eu-west-1/web-asg")
    [row] = target_slis([heard, silent], start=_at(-10), now=now, slos_of=lambda _image: Slos())
    assert (row.running, row.heartbeating, row.coverage) == (2, 1, 0.5)
    # An AMI whose instances never reported (baked without the reporter, or a role that may not put metrics):
    # unmeasured, not 0 %; likewise a kind of target whose machines report no heartbeat to amiforge.
    for never in (silent, replace(silent, target="other:somewhere")):
        [row] = target_slis([never], start=_at(-10), now=now, slos_of=lambda _image: Slos())
        assert (row.running, row.heartbeating, row.coverage) == (1, None, None), never.target
    # A local fleet's consoles always say: a guest not heard is 0 %.
    [row] = target_slis([replace(silent, target="local:web")], start=_at(-10), now=now, slos_of=lambda _i: Slos())
    assert (row.running, row.heartbeating, row.coverage) == (1, 0, 0.0)


def test_concurrent_collectors_record_each_boot_once(store: SqlStore) -> None:
    """Two collectors reading the same fleet at once (serve's timer and a rollout's wave) insert the same new boots:
    the second finds the first's rows and moves them forward; nothing fails and nothing counts twice."""
    v = _version(store)
    boots = [BootObservation(f"g-{i}", v, _at(i), "ready", 10.0, _at(i + 10)) for i in range(300)]
    errors: list[BaseException] = []
    start = threading.Barrier(2)

    def collector() -> None:
        try:
            start.wait()
            for chunk in range(0, 300, 50):
                store.record_boots("local:web", boots[chunk : chunk + 50])
        except BaseException as e:
            errors.append(e)

    threads = [threading.Thread(target=collector) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert errors == []
    [totals] = store.boot_totals()
    assert totals.ready == 300 and len(store.boots_in_window(_at(0), _at(1000))) == 300


def test_a_boot_recorded_after_a_fleet_was_read_is_not_stopped_by_that_reading(store: SqlStore) -> None:
    v = _version(store)
    store.record_boots("local:web", [BootObservation("g-old", v, _at(0), "ready", 5.0, _at(5))])
    read_at = _at(50)  # a collector read the fleet then: it listed g-old only
    store.record_boots("local:web", [BootObservation("g-new", v, _at(60))])  # another collector, meanwhile
    assert store.stop_boots("local:web", keep={"g-old"}, at=_at(70), launched_before=read_at) == []
    assert store.stop_boots("local:web", keep=set(), at=_at(80), launched_before=read_at) == ["g-old"]
    running = [b for b in store.boots_in_window(_at(0), _at(1000)) if b.stopped_at is None]
    assert [b.instance for b in running] == ["g-new"]
    assert store.running_members() == [(v, "local:web", None)]


def test_boot_tests_count_for_m1_and_m2_but_never_as_running_instances() -> None:
    now = _at(1000)
    boots = [_boot("run-1", "ready", 25.0, target="boot-test"), _boot("run-2", "timeout", None, target="boot-test")]
    [row] = target_slis(boots, start=_at(-10), now=now, slos_of=lambda _image: Slos())
    assert (row.target, row.launches, row.boot_success) == ("boot-test", 2, 0.5)
    assert (row.running, row.coverage, row.instance_days, row.replacements_per_1000_days) == (0, None, 0, None)


def test_slo_budget_is_spent_by_bad_launches_against_the_objective() -> None:
    slos = Slos(boot_success=99.0)
    now = _at(70 * 86400)  # the 30-day window holds every boot below
    good = [_boot(f"g{i}", "ready", 30.0, launched=50 * 86400 + i) for i in range(198)]
    boots = [*good, _boot("bad1", "failed", launched=60 * 86400), _boot("slow", "ready", 200.0, launched=61 * 86400)]
    success, ready = slo_statuses(boots, slos, now)
    # 1 of 200 failed: half of the 1 % budget is spent.
    assert (success.good, success.total, success.met) == (199, 200, True)
    assert success.budget_left == pytest.approx(0.5)
    # 2 of 200 not ready within 120 s against a 5 % budget: 80 % of it left.
    assert (ready.good, ready.total, ready.threshold_seconds) == (198, 200, 120.0)
    assert ready.budget_left == pytest.approx(0.8)
    # Outside the 30-day window, nothing counts.
    assert slo_statuses(boots, slos, now + timedelta(days=100))[0].total == 0
    overspent = SloStatus("boot_success", 99.9, 1.0, good=98, total=100)
    assert overspent.budget_left == pytest.approx(-19.0) and overspent.met is False
    assert SloStatus("boot_success", 99.9, 1.0, 0, 0).budget_left is None


def test_open_vulnerabilities_by_severity_and_weighted_by_instances() -> None:
    findings = [
        Finding(FindingKind.CVE, "TEST-0001", Severity.HIGH, "t", "osv", package="p"),
        Finding(FindingKind.CVE, "TEST-0002", Severity.HIGH, "t", "osv", package="q"),
        Finding(FindingKind.CVE, "TEST-0003", Severity.UNKNOWN, "t", "osv", package="q"),
        Finding(FindingKind.SECRET, "private-key", Severity.CRITICAL, "t", "secrets", path="/k"),  # not a CVE
    ]
    counts = open_vulnerabilities(findings, "debian")
    assert counts["high"] == 2 and counts["unknown"] == 1 and counts["critical"] == 0 and sum(counts.values()) == 3


def test_rollback_rate_counts_rollouts_that_ended_in_the_window() -> None:
    def rollout(i: int, state: str, finished: float | None, target: str = "local:web") -> Rollout:
        at = None if finished is None else _at(finished)
        return Rollout(i, target, 2, "web@2", {}, (1,), 1, state, None, "t", _at(0), _at(0), at, {})

    rates = rollout_rates(
        [rollout(1, "succeeded", 10), rollout(2, "failed", 20), rollout(3, "aborted", 30), rollout(4, "failed", 40),
         rollout(5, "running", None), rollout(6, "failed", -100), rollout(7, "succeeded", 15, "local:db")],
        start=_at(0), now=_at(100),
    )  # fmt: skip
    web = next(r for r in rates if r.target == "local:web")
    assert (web.succeeded, web.rolled_back, web.aborted, web.ended) == (1, 2, 1, 4)
    assert web.rollback_rate == pytest.approx(0.5)
    assert [(r.target, r.rollback_rate) for r in rates if r.target == "local:db"] == [("local:db", 0.0)]


# --- observations from fleet signals ---------------------------------------------------------------------------


def test_fleet_signals_become_observations(store: SqlStore) -> None:
    _version(store)
    v2 = _version(store)
    members = [
        Member("g-a", "web@2", "x", "ready", _at(0), 11.0),
        Member("g-b", "web@2", "x", "failed", _at(0)),
        Member("g-c", "web@2", "x", "stopped", _at(0), 9.0),
        Member("g-d", "other@1", "x", "ready", _at(0), 5.0),  # no such version: not amiforge's to count
        Member("g-e", "web@2", "x", "launching", _at(0)),
    ]
    signals = [
        BootSignal("g-a", "launch", _at(0), "web@2"),
        BootSignal("g-a", "ready", _at(11), "web@2", 11.0),
        BootSignal("g-a", "heartbeat", _at(71), "web@2", 11.0),
        BootSignal("g-a", "timing", _at(11), "web@2", 11.0, timeline={"kernel": 2.0, "userspace": 8.5}),
        BootSignal("g-b", "failed", _at(35), "web@2", None, "not ready within 30s", timed_out=True),
        BootSignal("g-c", "ready", _at(9), "web@2", 9.0),
        BootSignal("g-c", "failed", _at(50), "web@2", 9.0, "QEMU exited"),  # crashed after it was ready
        BootSignal("g-c", "replaced", _at(60), "web@2", 9.0, "replaced by g-f"),
        # A machine the fleet no longer lists (terminated): only its signals tell of it.
        BootSignal("i-0000000000test01", "launch", _at(1), "web@2"),
        BootSignal("i-0000000000test01", "ready", _at(20), "web@2", 19.0),
        BootSignal("i-0000000000test01", "replaced", _at(90), "web@2", None, "replaced by i-0000000000test02"),
        BootSignal("i-0000000000test03", "ready", _at(20), "web@2", 19.0),  # no launch: nothing to count from
    ]
    found = {o.instance: o for o in observations_of(members, signals, store, _at(100))}
    assert set(found) == {"g-a", "g-b", "g-c", "g-e", "i-0000000000test01"}
    gone = found["i-0000000000test01"]
    assert (gone.launched_at, gone.outcome, gone.replaced, gone.stopped_at) == (_at(1), "ready", True, _at(90))
    assert (found["g-a"].outcome, found["g-a"].time_to_ready, found["g-a"].last_heartbeat_at) == ("ready", 11, _at(71))
    assert found["g-a"].version_id == v2 and found["g-a"].stopped_at is None
    assert found["g-a"].timeline == {"kernel": 2.0, "userspace": 8.5} and found["g-b"].timeline is None
    assert (found["g-b"].outcome, found["g-b"].ended_at) == ("timeout", _at(35))
    assert (found["g-c"].outcome, found["g-c"].replaced, found["g-c"].stopped_at) == ("ready", True, _at(60))
    assert found["g-e"].outcome is None


def test_a_failed_boot_keeps_its_console_tail_with_its_outcome_once(store: SqlStore) -> None:
    v = _version(store)
    booting = BootObservation("g-1", v, _at(0), console_tail=("early line",))  # no outcome yet: nothing kept
    store.record_boots("local:web", [booting])
    failed = replace(booting, outcome="failed", ended_at=_at(30), detail="QEMU exited", console_tail=("a", "b"))
    store.record_boots("local:web", [failed])
    store.record_boots("local:web", [replace(failed, console_tail=("later", "lines"))])
    [boot] = store.boots_in_window(_at(0), _at(100))
    assert (boot.outcome, boot.detail, boot.console_tail) == ("failed", "QEMU exited", ("a", "b"))


def test_a_boot_test_records_the_timing_its_console_holds(store: SqlStore) -> None:
    v = _version(store)
    console = ("[   11.9] nginx[311]: bind() to 0.0.0.0:80 failed (98: Address already in use)\n"
               "AMIFORGE-READY 12.0\nAMIFORGE-TIMING kernel=2.000 userspace=9.500 nginx.service/0.400\n")  # fmt: skip
    report = BootReport(12.0, (CheckResult("unit nginx", "unit", True, "ok"),), console, "tcg", T0, 20.0, id=7)
    record_boot_test(store, v, report, "run-1")
    [boot] = store.boots_in_window(T0, T0 + timedelta(minutes=1))
    assert (boot.instance, boot.timeline) == ("report-7", {"kernel": 2.0, "userspace": 9.5, "nginx.service": 0.4})
    assert boot.console_tail == ()  # ready: nothing to explain
    failing = replace(report, id=8, checks=(CheckResult("unit nginx", "unit", False, "inactive"),))
    record_boot_test(store, v, failing, "run-2")
    [failed] = [b for b in store.boots_in_window(T0, T0 + timedelta(minutes=1)) if b.instance == "report-8"]
    # What the guest said, not amiforge's markers (the verdict says what failed).
    assert failed.console_tail == ("[   11.9] nginx[311]: bind() to 0.0.0.0:80 failed (98: Address already in use)",)


def test_a_boot_test_is_ready_timed_out_or_failed() -> None:
    passed = BootReport(12.0, (CheckResult("unit nginx", "unit", True, "ok"),), "", "tcg", T0, 20.0)
    assert boot_test_outcome(passed) == "ready"
    assert boot_test_outcome(replace(passed, checks=(CheckResult("unit nginx", "unit", False, "x"),))) == "failed"
    assert boot_test_outcome(replace(passed, time_to_ready=None)) == "timeout"


# --- the policy's slos: ----------------------------------------------------------------------------------------


def test_slos_default_and_per_image(tmp_path: Path) -> None:
    policy = parse_policy(
        "channels: {dev: {}}\nslos:\n  default: {boot_success: 99.5%, window: 7d}\n"
        "  images:\n    web: {time_to_ready: {percentile: 99, under: 90s}}\n",
        tmp_path / "policy.yaml",
    )
    web, db = policy.slos.of("web"), policy.slos.of("db")
    assert (web.boot_success, web.window, web.time_to_ready.under, web.time_to_ready.percentile) == (
        99.5, timedelta(days=7), 90.0, 99.0)  # fmt: skip
    assert db.time_to_ready.under == 120.0 and db.boot_budget == pytest.approx(0.005)
    assert policy.slos.thresholds() == [90.0, 120.0]
    assert ImageSlos().of("any") == Slos()  # no slos: the seed's targets, 99.9 % and p95 under 120 s


def test_slo_problems_name_file_line_field_and_fix(tmp_path: Path) -> None:
    text = (
        "channels: {dev: {}}\nslos:\n  default:\n    boot_success: 100\n    window: 10m\n"
        "  images:\n    Web: {}\n    db: {time_to_ready: {under: 90.5s}, colour: red}\n"
    )
    with pytest.raises(ConfigError) as caught:
        parse_policy(text, tmp_path / "policy.yaml")
    found = {(p.field, p.line) for p in caught.value.problems}
    assert found >= {("slos.default.boot_success", 4), ("slos.default.window", 5), ("slos.images.Web", 7),
                     ("slos.images.db.time_to_ready.under", 8), ("slos.images.db.colour", 8)}  # fmt: skip
    assert all(p.fix and p.file and p.file.endswith("policy.yaml") for p in caught.value.problems)
