"""retire, drift and cache gc on the local provider, with real files in a real image store, real (fake-QEMU) fleets,
the real registry and the CLI: what is kept and why, the way out step by step, resuming after a kill, failing
closed; which machines drifted and why."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from test_local_fleet import CHECKS, FakeLauncher, release

from amiforge.errors import StateError
from amiforge.lifecycle import retire
from amiforge.lifecycle.cache import cache_gc
from amiforge.lifecycle.drift import DriftRow, drift, lister_for
from amiforge.lifecycle.retire_plan import RetirePlan, Step
from amiforge.model import Artifact, LayerRecord, Status
from amiforge.policy.retention import Retention
from amiforge.providers.local import fleet as fleet_mod
from amiforge.providers.local.fleet import create_fleet
from amiforge.providers.local.retire import recycle_bin
from amiforge.settings import Settings
from amiforge.store.sql import SqlStore, open_store
from tests.cli_harness import Cli, make_cli
from tests.retire_rules import EAGER


@pytest.fixture
def data_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    for key in list(os.environ):
        if key.startswith("AMIFORGE_"):
            monkeypatch.delenv(key)
    data = tmp_path / "data"
    monkeypatch.setenv("AMIFORGE_DATA_DIR", str(data))
    monkeypatch.setenv("AMIFORGE_ACTOR", "tester@unit")
    monkeypatch.chdir(tmp_path)
    yield data


@pytest.fixture
def settings(data_dir: Path) -> Settings:
    return Settings(data_dir=data_dir, actor="tester@unit", accel="tcg")


@pytest.fixture
def store(settings: Settings) -> Iterator[SqlStore]:
    with open_store(settings.registry_url) as s:
        yield s


@pytest.fixture
def launcher(settings: Settings, monkeypatch: pytest.MonkeyPatch) -> Iterator[FakeLauncher]:
    fake = FakeLauncher(settings)
    monkeypatch.setattr(fleet_mod, "spawn_guest", fake)
    monkeypatch.setattr(fleet_mod, "POLL_SECONDS", 0.05)
    yield fake
    for proc in fake.procs:
        if proc.poll() is None:
            proc.kill()
        proc.wait()


def _image(settings: Settings, n: int) -> Artifact:
    """An image in the local store: three files named by a (synthetic) digest."""
    folder = settings.regions_dir / settings.region / "web"
    folder.mkdir(parents=True, exist_ok=True)
    digest = f"{n:064x}"
    files = [folder / f"{digest}.{ext}" for ext in ("qcow2", "vmlinuz", "initrd")]
    for f in files:
        f.write_bytes(b"synthetic image file")
    return Artifact("local", settings.region, str(files[0]), digest, 20, str(files[1]), str(files[2]))


def _signed(store: SqlStore, settings: Settings, n: int, *, status: Status = Status.SIGNED) -> tuple[str, Artifact]:
    v = store.create_version(name="web", recipe_digest="r" * 64, recipe_path="/r.yaml", provider="local", tags={},
                             parent=None)  # fmt: skip
    artifact = store.add_artifact(v.id, _image(settings, n))
    store.transition(v.id, Status.BUILT, expect=Status.BAKING, digest=artifact.digest, size_bytes=20)
    current = Status.BUILT
    for step in {Status.SIGNED: [Status.TESTED, Status.SCANNED, Status.SIGNED], Status.BUILT: []}[status]:
        store.transition(v.id, step, expect=current)
        current = step
    return v.ref, artifact


def _promote(store: SqlStore, ref: str) -> None:
    v = store.get_version(ref)
    now = store.channels("web", "dev")
    expect = store.get_version(now[0].current).id if now else None
    store.move_channel("web", "dev", v.id, expect_current=expect, actor="t", reason="test")


def _finder(settings: Settings) -> retire.RetirerFor:
    return retire.retirer_for(settings)


def _by_version(plan: RetirePlan) -> dict[str, Step]:
    return {s.version: s for s in plan.steps()}


@pytest.fixture
def world(store: SqlStore, settings: Settings, launcher: FakeLauncher) -> dict[str, Artifact]:
    """web@1 (nothing uses it), web@2 (dev's previous), web@3 (dev's current), web@4 (a fleet runs it)."""
    made = dict(_signed(store, settings, n) for n in range(1, 5))
    _promote(store, "web@2")
    _promote(store, "web@3")
    create_fleet(settings, "edge", 1, made["web@4"], release("web@4"), CHECKS)
    return made


def test_what_is_used_stays_and_the_rest_goes_step_by_step(
    store: SqlStore, settings: Settings, world: dict[str, Artifact]
) -> None:
    plan = retire.plan(store, EAGER, _finder(settings))
    steps = _by_version(plan)
    assert steps["web@1"].action == "deprecate"
    assert (steps["web@2"].action, steps["web@2"].why) == (
        "keep",
        "in use: channel web:dev (previous: the rollback image)",
    )
    assert (steps["web@3"].action, steps["web@3"].why) == ("keep", "in use: channel web:dev (current)")
    assert steps["web@4"].action == "keep" and steps["web@4"].why.startswith("in use: fleet edge, member g-")
    assert plan.changes and not plan.failures

    first = retire.apply(store, EAGER, _finder(settings), actor="tester@unit")
    assert [(o.step.version, o.step.action, o.outcome) for o in first.outcomes] == [("web@1", "deprecate", "done")]
    assert store.get_version("web@1").status is Status.DEPRECATED
    assert Path(world["web@1"].location).is_file()  # deprecation removes nothing

    second = retire.apply(store, EAGER, _finder(settings), actor="tester@unit")
    assert [(o.step.version, o.step.action, o.outcome) for o in second.outcomes] == [("web@1", "deregister", "done")]
    binned = recycle_bin(settings, settings.region)
    files = [Path(p) for p in (world["web@1"].location, world["web@1"].kernel, world["web@1"].initrd) if p]
    assert len(files) == 3 and not any(f.exists() for f in files)
    assert all((binned / f.name).is_file() for f in files)  # the local Recycle Bin holds them

    third = retire.apply(store, EAGER, _finder(settings), actor="tester@unit")
    assert [(o.step.version, o.step.action, o.outcome) for o in third.outcomes] == [
        ("web@1", "delete-snapshots", "done")
    ]
    assert third.retired == ("web@1",) and store.get_version("web@1").status is Status.RETIRED
    assert not any((binned / f.name).exists() for f in files)
    for ref in ("web@2", "web@3", "web@4"):
        assert Path(world[ref].location).is_file() and store.get_version(ref).status is Status.SIGNED
    kinds = [e.kind for e in store.events("web@1")]
    assert kinds[-4:] == ["retire.deprecated", "retire.deregistered", "retire.purged", "retire.retired"]
    assert not store.verify_events()

    after = retire.plan(store, EAGER, _finder(settings))
    assert not after.changes and "web@1" not in _by_version(after)


def test_a_qemu_booted_from_an_image_keeps_it(store: SqlStore, settings: Settings, world: dict[str, Artifact]) -> None:
    """Any QEMU on this machine whose kernel is the image's (a boot test, a guest started by hand) holds it."""
    kernel = world["web@1"].kernel
    assert kernel is not None
    proc = subprocess.Popen(
        ["qemu-system-x86_64", "-c", "import time; time.sleep(60)", "-kernel", kernel],
        executable=sys.executable,
        env={"PYTHONHOME": sys.base_prefix},
    )
    try:
        step = _by_version(retire.plan(store, EAGER, _finder(settings)))["web@1"]
        assert (step.action, step.why) == ("keep", f"in use: qemu pid {proc.pid}")
    finally:
        proc.kill()
        proc.wait()
    assert _by_version(retire.plan(store, EAGER, _finder(settings)))["web@1"].action == "deprecate"


def test_a_fleet_that_cannot_be_read_stops_every_change(
    store: SqlStore, settings: Settings, world: dict[str, Artifact]
) -> None:
    (member,) = (settings.data_dir / "fleets" / "edge").glob("g-*/member.json")
    member.write_text("{not json")
    plan = retire.plan(store, EAGER, _finder(settings))
    assert [(f.source, f.region) for f in plan.failures] == [("fleets", settings.region)]
    step = _by_version(plan)["web@1"]
    assert step.action == "blocked" and "fleets could not be read" in step.why
    outcome = retire.apply(store, EAGER, _finder(settings), actor="tester@unit")
    assert outcome.outcomes == () and store.get_version("web@1").status is Status.SIGNED


def test_a_fleet_launched_after_the_plan_keeps_its_image(
    store: SqlStore, settings: Settings, world: dict[str, Artifact], monkeypatch: pytest.MonkeyPatch
) -> None:
    """apply reads every reference again right before it removes anything."""
    retire.apply(store, EAGER, _finder(settings), actor="tester@unit")  # web@1 deprecated
    real_plan = retire.plan

    def plan_then_launch(*args: object, **kwargs: object) -> RetirePlan:
        planned = real_plan(*args, **kwargs)  # type: ignore[arg-type]
        create_fleet(settings, "late", 1, world["web@1"], release("web@1"), CHECKS)
        return planned

    monkeypatch.setattr(retire, "plan", plan_then_launch)
    outcome = retire.apply(store, EAGER, _finder(settings), actor="tester@unit")
    ((step, result, why),) = [(o.step.action, o.outcome, o.detail) for o in outcome.outcomes]
    assert (step, result) == ("deregister", "kept") and "fleet late" in why
    assert Path(world["web@1"].location).is_file()


class Killed(BaseException):
    pass


def test_killed_after_the_files_went_the_next_run_records_it_once(
    store: SqlStore, settings: Settings, world: dict[str, Artifact], monkeypatch: pytest.MonkeyPatch
) -> None:
    retire.apply(store, EAGER, _finder(settings), actor="tester@unit")
    real = store.advance_retirement

    def dies(*args: object, **kwargs: object) -> object:
        raise Killed

    monkeypatch.setattr(store, "advance_retirement", dies)
    with pytest.raises(Killed):
        retire.apply(store, EAGER, _finder(settings), actor="tester@unit")
    assert not Path(world["web@1"].location).exists()
    monkeypatch.setattr(store, "advance_retirement", real)
    outcome = retire.apply(store, EAGER, _finder(settings), actor="tester@unit")
    assert [(o.step.action, o.outcome) for o in outcome.outcomes] == [("deregister", "gone")]
    assert [e.kind for e in store.events("web@1")].count("retire.deregistered") == 1
    retire.apply(store, EAGER, _finder(settings), actor="tester@unit")  # the files the bin holds go
    assert store.get_version("web@1").status is Status.RETIRED
    assert not list(recycle_bin(settings, settings.region).iterdir())  # none orphaned


def test_the_cap_defers_the_rest_oldest_first(store: SqlStore, settings: Settings) -> None:
    for n in range(1, 6):
        _signed(store, settings, n)
    capped = Retention.model_validate({**EAGER.model_dump(mode="json"), "max_deletions": 2})
    retire.apply(store, capped, _finder(settings), actor="t")  # all five deprecated: deprecation deletes nothing
    plan = retire.plan(store, capped, _finder(settings))
    assert [(s.version, s.action) for s in plan.steps()] == [
        ("web@1", "deregister"), ("web@2", "deregister"), ("web@3", "deferred"), ("web@4", "deferred"),
        ("web@5", "deferred"),
    ]  # fmt: skip


def test_a_deregistered_image_comes_back_until_its_snapshot_grace_is_over(
    store: SqlStore, settings: Settings, world: dict[str, Artifact]
) -> None:
    week = Retention.model_validate({"default": {**EAGER.default.model_dump(mode="json"), "snapshot_grace": "7d"}})
    retire.apply(store, week, _finder(settings), actor="t")
    retire.apply(store, week, _finder(settings), actor="t")
    now = datetime.now(UTC)
    waiting = _by_version(retire.plan(store, week, _finder(settings), now=now))["web@1"]
    assert waiting.action == "wait" and "retire restore" in waiting.why
    assert not Path(world["web@1"].location).exists()

    restored = retire.restore(store, "web@1", _finder(settings), actor="t")
    assert restored.status is Status.DEPRECATED and Path(world["web@1"].location).is_file()
    assert store.events("web@1")[-1].kind == "retire.restored"
    with pytest.raises(StateError, match="no deregistered image to restore"):
        retire.restore(store, "web@1", _finder(settings), actor="t")
    # Deprecated again from now: a fresh grace period before it goes again.
    step = _by_version(retire.plan(store, week.model_copy(update={"default": week.default.model_copy(
        update={"grace": timedelta(days=1)})}), _finder(settings), now=datetime.now(UTC)))["web@1"]  # fmt: skip
    assert step.action == "wait" and "deregistered from" in step.why

    later = now + timedelta(days=8)
    retire.apply(store, week, _finder(settings), actor="t", now=later)  # deregistered again
    assert retire.apply(store, week, _finder(settings), actor="t", now=later + timedelta(days=8)).retired == ("web@1",)
    with pytest.raises(StateError):
        retire.restore(store, "web@1", _finder(settings), actor="t")  # its files are gone for good


# --- the CLI -------------------------------------------------------------------------------------------------


@pytest.fixture
def cli(data_dir: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> Cli:
    return make_cli(monkeypatch, capsys)


def test_the_cli_exits_10_for_a_plan_with_changes_and_0_once_applied(
    cli: Cli, store: SqlStore, settings: Settings, world: dict[str, Artifact], tmp_path: Path
) -> None:
    policy = tmp_path / "policy.yaml"
    policy.write_text(
        "channels: {dev: {}}\nretention:\n  default: {keep_last: 0, keep_younger_than: 0s, deprecate_after: 0s,"
        " grace: 0s, snapshot_grace: 0s}\n"
    )
    planned = cli("retire", "--policy", str(policy))
    assert planned.code == 10, planned
    assert "web@1" in planned.out and "deprecate" in planned.out and "rerun with --apply" in planned.out
    assert "web@2" not in planned.out  # kept rows only with --all
    assert "in use: channel web:dev (current)" in cli("retire", "--policy", str(policy), "--all").out
    document = cli("retire", "--policy", str(policy), "--json")
    assert document.code == 10 and document.json()["plan"]["changes"] is True
    for _ in range(3):  # deprecate; deregister; delete what the Recycle Bin holds
        assert cli("retire", "--policy", str(policy), "--apply").code == 0
    done = cli("retire", "--policy", str(policy), "--json")
    assert done.code == 0 and done.json()["plan"]["changes"] is False
    assert store.get_version("web@1").status is Status.RETIRED


def test_a_bad_retention_policy_names_file_line_and_field(cli: Cli, tmp_path: Path) -> None:
    policy = tmp_path / "policy.yaml"
    policy.write_text("channels: {dev: {}}\nretention:\n  default:\n    grace: soon\n")
    result = cli("retire", "--policy", str(policy))
    assert result.code == 2
    assert f"{policy}:4: retention.default.grace: 'soon' is not a duration" in result.err


# --- cache gc ------------------------------------------------------------------------------------------------


def _entry(cache: Path, folder: str, key: str, *, age: timedelta) -> Path:
    path = cache / folder / key
    (path / ("rootfs" if folder == "base" else "upper")).mkdir(parents=True)
    (path / "size").write_text("1000")
    stamp = (datetime.now(UTC) - age).timestamp()
    os.utime(path, (stamp, stamp))
    return path


def test_cache_gc_removes_only_what_no_kept_version_uses(store: SqlStore, settings: Settings) -> None:
    cache = settings.cache_dir
    old = timedelta(days=2)
    base = _entry(cache, "base", "b" * 64, age=old)
    kept = _entry(cache, "layers", "k" * 64, age=old)
    unused = _entry(cache, "layers", "u" * 64, age=old)
    retired_only = _entry(cache, "layers", "r" * 64, age=old)
    fresh = _entry(cache, "layers", "f" * 64, age=timedelta(minutes=5))
    live, _ = _signed(store, settings, 1)
    gone, _ = _signed(store, settings, 2, status=Status.BUILT)
    store.record_layers(store.get_version(live).id, [LayerRecord(0, "b" * 64, "base", True, 0, 1),
                                                     LayerRecord(1, "k" * 64, "step", True, 0, 1)])  # fmt: skip
    gone_id = store.get_version(gone).id
    store.record_layers(gone_id, [LayerRecord(0, "r" * 64, "base", True, 0, 1)])
    store.transition(gone_id, Status.DEPRECATED, expect=Status.BUILT)
    store.transition(gone_id, Status.RETIRED, expect=Status.DEPRECATED)

    plan = cache_gc(store, settings, apply=False, min_age=timedelta(hours=1), actor="t").plan
    assert {Path(e.path) for e in plan.entries} == {unused, retired_only}
    assert plan.kept == 3 and plan.size_bytes == 2000
    done = cache_gc(store, settings, apply=True, min_age=timedelta(hours=1), actor="t")
    assert len(done.removed) == 2 and not unused.exists() and not retired_only.exists()
    assert base.is_dir() and kept.is_dir() and fresh.is_dir()
    assert not list((cache / "layers").glob(".gc-*"))
    (event,) = store.events(kinds={"cache.gc"})
    assert event.data["bytes"] == 2000


def test_cache_gc_waits_for_a_running_bake(store: SqlStore, settings: Settings) -> None:
    store.create_version(name="web", recipe_digest="r" * 64, recipe_path="/r.yaml", provider="local", tags={},
                         parent=None)  # fmt: skip
    with pytest.raises(StateError, match=r"a bake is running \(web@1\)"):
        cache_gc(store, settings, apply=True, min_age=timedelta(0), actor="t")


# --- drift ---------------------------------------------------------------------------------------------------


@pytest.fixture
def fleets(store: SqlStore, settings: Settings, launcher: FakeLauncher) -> Iterator[dict[str, Artifact]]:
    """web@1..4; dev: web@3 (previous web@2). Fleets: edge on web@3, old on web@2, stray on web@4, bad on web@1
    (revoked)."""
    made = dict(_signed(store, settings, n) for n in range(1, 5))
    _promote(store, "web@2")
    _promote(store, "web@3")
    for name, ref in (("edge", "web@3"), ("old", "web@2"), ("stray", "web@4"), ("bad", "web@1")):
        create_fleet(settings, name, 1, made[ref], release(ref), CHECKS)
    v1 = store.get_version("web@1")
    store.transition(v1.id, Status.REVOKED, expect=Status.SIGNED)
    yield made


def _by_fleet(rows: tuple[DriftRow, ...]) -> dict[str, DriftRow]:
    return {r.target: r for r in rows}


def test_each_kind_of_drift_is_named(store: SqlStore, settings: Settings, fleets: dict[str, Artifact]) -> None:
    report = drift(store, lister_for(settings), local_region=settings.region)
    rows = _by_fleet(report.rows)
    assert rows["edge"].findings == () and rows["edge"].channels == ("dev (current)",)
    assert rows["old"].findings == ("1 version(s) behind web:dev",) and rows["old"].channels == ("dev (previous)",)
    assert rows["old"].behind == 1
    assert rows["stray"].findings == ("in no channel",) and rows["stray"].behind == 0  # newer than dev: not behind
    assert rows["bad"].findings == ("revoked", "in no channel", "2 version(s) behind web:dev")
    assert report.drifted == 3 and not report.failures
    lenient = drift(store, lister_for(settings), local_region=settings.region, max_behind=1)
    assert _by_fleet(lenient.rows)["old"].findings == ()


def test_a_member_of_a_version_the_registry_does_not_know_is_unmanaged(
    store: SqlStore, settings: Settings, launcher: FakeLauncher, tmp_path: Path
) -> None:
    image = tmp_path / "elsewhere.qcow2"
    image.write_bytes(b"")
    unknown = Artifact("local", settings.region, str(image), "e" * 64, 0, str(image), str(image))
    create_fleet(settings, "hand", 1, unknown, release("other@7"), CHECKS)
    (row,) = drift(store, lister_for(settings), local_region=settings.region).rows
    assert row.version is None and row.findings == (f"unmanaged: the registry knows no version of {image}",)


def test_the_cli_exits_10_when_a_machine_drifted(cli: Cli, fleets: dict[str, Artifact]) -> None:
    text = cli("drift")
    assert text.code == 10 and "3 of 4 machine(s) drifted" in text.out and "1 version(s) behind web:dev" in text.out
    assert "edge" not in text.out  # in line: only with --all
    assert "edge" in cli("drift", "--all").out
    document = cli("drift", "--json")
    assert document.code == 10 and document.json()["drifted"] == 3
    assert cli("drift", "--max-behind", "-1").code == 2


# --- reports -------------------------------------------------------------------------------------------------


def test_cost_prices_each_image_stored_and_tags_names_what_lacks_one(
    store: SqlStore, settings: Settings, cli: Cli, tmp_path: Path
) -> None:
    from amiforge.lifecycle.reports import cost_report, reader_for, tag_report
    from amiforge.policy.reporting import Prices, TagRules

    for n in (1, 2):
        _signed(store, settings, n)
    gb = 3 * len(b"synthetic image file") / 1024**3  # three files of each image
    prices = Prices(currency="EUR", default=2.0, regions={settings.region: 1000.0})
    report = cost_report(store, reader_for(settings), prices, TagRules())
    assert [(r.version, r.owner, r.regional_price) for r in report.rows] == [("web@1", "(none)", True),
                                                                              ("web@2", "(none)", True)]  # fmt: skip
    for r in report.rows:
        assert r.gb == pytest.approx(gb) and r.monthly == pytest.approx(gb * 1000)
    assert (
        report.total > 0
        and report.total == pytest.approx(gb * 2000)
        and report.by_image == {"web": pytest.approx(gb * 2000)}
    )
    assert cost_report(store, reader_for(settings), Prices(default=0.5), TagRules()).rows[0].regional_price is False
    tagged = tag_report(store, reader_for(settings), TagRules(required=("owner",)))
    assert [(r.kind, r.id, r.missing) for r in tagged.rows] == [("version", "web@2", ("owner",)),
                                                                ("version", "web@1", ("owner",))]  # fmt: skip
    policy = tmp_path / "policy.yaml"
    policy.write_text("channels: {dev: {}}\ntags: {required: [owner]}\n")
    assert cli("report", "tags", "--policy", str(policy)).code == 10
    assert cli("report", "tags").code == 0  # the built-in policy requires none
    table = tmp_path / "prices.yaml"
    table.write_text("currency: EUR\ndefault: -1\n")
    bad = cli("report", "cost", "--prices", str(table))
    assert bad.code == 2 and f"{table}:2: default" in bad.err
    table.write_text("currency: EUR\ndefault: 0.5\n")
    assert cli("report", "cost", "--prices", str(table), "--json").json()["currency"] == "EUR"


# --- what the review found -------------------------------------------------------------------------------------


def test_a_row_naming_a_file_outside_the_image_store_is_never_moved(
    store: SqlStore, settings: Settings, tmp_path: Path
) -> None:
    secret = tmp_path / "keep-me.txt"
    secret.write_text("not an image")
    v = store.create_version(name="web", recipe_digest="r" * 64, recipe_path="/r.yaml", provider="local", tags={},
                             parent=None)  # fmt: skip
    store.add_artifact(v.id, Artifact("local", settings.region, str(secret), "e" * 64, 1))
    store.transition(v.id, Status.BUILT, expect=Status.BAKING, digest="e" * 64, size_bytes=1)
    outcome = retire.apply(store, EAGER, _finder(settings), actor="t")
    ((step, result, why),) = [(o.step.action, o.outcome, o.detail) for o in outcome.outcomes]
    assert (step, result) == (
        "deprecate",
        "failed",
    ) and "is not a file of eeeeeeeeeeee… in the local image store" in why
    assert secret.read_text() == "not an image" and not store.retirements()


def test_the_version_is_deprecated_with_its_first_artifact_in_one_transaction(
    store: SqlStore, settings: Settings
) -> None:
    ref, artifact = _signed(store, settings, 1)
    store.advance_retirement(artifact.id or 0, "deprecated", expect=None, run_id="r", actor="t", ref=ref, data={})
    assert store.get_version(ref).status is Status.DEPRECATED  # nothing else ran: a kill here leaves it right


def test_a_revoked_version_restored_is_revoked_again(store: SqlStore, settings: Settings) -> None:
    ref, _ = _signed(store, settings, 1)
    v = store.get_version(ref)
    store.transition(v.id, Status.REVOKED, expect=Status.SIGNED)
    kept = {**EAGER.default.model_dump(mode="json"), "delete_snapshots": False, "snapshot_grace": "7d"}
    no_snapshots = Retention.model_validate({"default": kept})
    for _ in range(2):
        retire.apply(store, no_snapshots, _finder(settings), actor="t")
    assert store.get_version(ref).status is Status.RETIRED  # deregistered, its files kept in the Recycle Bin
    assert retire.restore(store, ref, _finder(settings), actor="t").status is Status.REVOKED


def test_a_running_bake_holds_every_version_of_its_image(store: SqlStore, settings: Settings) -> None:
    """A local bake reuses the disk an earlier version made from the same layers, and records it only once done."""
    old, _ = _signed(store, settings, 1)
    store.create_version(name="web", recipe_digest="r" * 64, recipe_path="/r.yaml", provider="local", tags={},
                         parent=None)  # fmt: skip
    store.append_event("bake.started", actor="t", ref="web@2", data={"run": "run-1"})
    step = _by_version(retire.plan(store, EAGER, _finder(settings)))[old]
    assert step.action == "keep" and "bake run run-1" in step.why and ", of web" in step.why
    store.append_event("bake.failed", actor="t", ref="web@2", data={"run": "run-1"})
    assert _by_version(retire.plan(store, EAGER, _finder(settings)))[old].action == "deprecate"


def test_a_live_rollout_and_each_targets_last_rollback_image_are_in_use(store: SqlStore, settings: Settings) -> None:
    made = dict(_signed(store, settings, n) for n in range(1, 5))
    done = store.create_rollout("local:edge", store.get_version("web@2").id, strategy={}, waves=[1], actor="t")
    store.plan_replacements(done.id, 0, "forward", [("g-00000001", "web@1", "tok-1")])
    store.update_rollout(done.id, expect="running", state="succeeded")
    live = store.create_rollout("local:other", store.get_version("web@3").id, strategy={}, waves=[1], actor="t")
    del made, live
    steps = _by_version(retire.plan(store, EAGER, _finder(settings)))
    assert steps["web@1"].why == f"in use: rollout #{done.id} on local:edge (succeeded): the rollback image"
    assert steps["web@3"].why.startswith("in use: rollout #") and "(running)" in steps["web@3"].why
    assert steps["web@2"].action == "deprecate" and steps["web@4"].action == "deprecate"


def test_the_cli_says_what_it_does_not_know_and_fails_when_a_source_failed(
    cli: Cli, store: SqlStore, settings: Settings, world: dict[str, Artifact]
) -> None:
    assert cli("retire", "--image", "nope").code == 3
    assert cli("retire", "--region", "elsewhere").code == 3
    (member,) = (settings.data_dir / "fleets" / "edge").glob("g-*/member.json")
    member.write_text("{not json")
    blocked = cli("retire")
    assert blocked.code == 5 and "fleets in local" in blocked.err and "nothing changed" in blocked.err
