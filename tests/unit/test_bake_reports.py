"""What a bake reports beyond its image, through the CLI: the credentials generalisation removed, and what failed
cleanups left behind — shown in text and `--json`, kept in `images show`, and found (then removed) by `gc`.

The provider is a fake whose bake makes real temporary directories with the local provider's helper, so the cleanup,
the `orphaned` event and gc's view of the cache are the real ones.
"""

from __future__ import annotations

import hashlib
import os
import subprocess
import time
from collections.abc import Callable, Collection, Iterator, Sequence
from contextlib import AbstractContextManager, contextmanager
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import ClassVar, Protocol

import pytest

import amiforge.providers
from amiforge.errors import InfraError
from amiforge.model import Artifact, BootReport, CheckResult, LayerRecord, Leftover, RemovedFile
from amiforge.providers.interface import (
    BakeResult,
    Collector,
    GcPlan,
    GcResult,
    ImageView,
    Provider,
    RunContext,
    RunState,
)
from amiforge.providers.local import tools
from amiforge.providers.local.leftovers import apply_local_gc, mount_points, plan_local_gc
from amiforge.recipe import Checks, Recipe
from amiforge.settings import Settings, load_settings
from amiforge.store.sql import open_store
from tests.cli_harness import Cli, make_cli

RECIPE = """\
name: web
provider: {type: local}
steps:
  - shell: echo hi > /etc/motd
"""
REMOVED = (RemovedFile("/root/.aws/credentials", "aws credentials"), RemovedFile("/root/.ssh/id_ed25519", "ssh key"))
PASSING = BootReport(
    time_to_ready=3.0,
    checks=(CheckResult("ready", "ready", True, "ready after 3.0s"),),
    console="AMIFORGE-READY 3.0\n",
    accel="tcg",
    started_at=datetime(2026, 1, 2, tzinfo=UTC),
    duration=5.0,
)


class CollectingProvider(Provider, Collector, Protocol):
    """What `gc` needs of a provider: provider_for's Provider, and a Collector (gc checks with isinstance)."""


class FakeProvider:
    """Bakes a small file; its bake and boot test each make a temporary directory in the places the local provider
    does, whose removal the test can make fail."""

    name: ClassVar[str] = "local"

    def __init__(self, settings: Settings) -> None:
        self.settings = settings

    def preflight(self, recipe: Recipe) -> None:
        pass

    def bake(self, recipe: Recipe, ctx: RunContext) -> BakeResult:
        (self.settings.cache_dir / "layers").mkdir(parents=True, exist_ok=True)
        scratch = tools.temporary_dir(ctx.cleanup, ".tmp-TEST-", self.settings.cache_dir / "layers")
        (scratch / "upper").mkdir()
        disk = self.settings.data_dir / "disk.qcow2"
        disk.write_bytes(b"a disk" * 100)
        artifact = Artifact("local", "local", str(disk), self.current_digest_of(disk), disk.stat().st_size)
        return BakeResult(artifact, (LayerRecord(0, "b" * 64, "base", True, 0.1, 1),), REMOVED)

    def boot_test(self, artifact: Artifact, checks: Checks, ctx: RunContext, spec: object) -> BootReport:
        tools.temporary_dir(ctx.cleanup, "amiforge-boot-")
        return PASSING

    @contextmanager
    def inspect(self, artifact: Artifact) -> Iterator[ImageView]:
        """An empty root filesystem beside the disk file (nothing here scans what is in it)."""
        root = Path(artifact.location).with_suffix(".root")
        root.mkdir(exist_ok=True)
        yield ImageView(root, Path(artifact.location))

    def current_digest(self, artifact: Artifact) -> str:
        return self.current_digest_of(Path(artifact.location))

    @staticmethod
    def current_digest_of(disk: Path) -> str:
        return hashlib.sha256(disk.read_bytes()).hexdigest()

    def plan_gc(
        self,
        region: str,
        *,
        registered: Collection[str],
        run_state: Callable[[str], RunState],
        recorded: Sequence[tuple[str | None, Leftover]],
        min_age: timedelta,
        now: datetime,
    ) -> GcPlan:
        return plan_local_gc(self.settings, recorded=recorded, run_state=run_state, min_age=min_age, now=now)

    def apply_gc(self, plan: GcPlan, *, max_deletions: int) -> GcResult:
        return apply_local_gc(self.settings, plan, max_deletions=max_deletions)


@pytest.fixture
def env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> Iterator[Cli]:
    for key in list(os.environ):
        if key.startswith("AMIFORGE_"):
            monkeypatch.delenv(key)
    monkeypatch.setenv("AMIFORGE_DATA_DIR", str(tmp_path / "data"))
    monkeypatch.setenv("TMPDIR", str(tmp_path / "tmp"))
    (tmp_path / "tmp").mkdir()
    monkeypatch.setattr("tempfile.tempdir", None)  # read TMPDIR again
    monkeypatch.chdir(tmp_path)

    def factory(settings: Settings) -> CollectingProvider:
        return FakeProvider(settings)

    monkeypatch.setattr(amiforge.providers, "PROVIDERS", {"local": factory})
    (tmp_path / "recipe.yaml").write_text(RECIPE)
    yield make_cli(monkeypatch, capsys)


def _busy(monkeypatch: pytest.MonkeyPatch, fails: int) -> None:
    """The next `fails` removals of a temporary directory fail as a busy mount would."""
    real = tools.remove_tree
    left = [fails]

    def remove(path: Path) -> None:
        if left[0] > 0:
            left[0] -= 1
            raise OSError(16, "Device or resource busy", str(path))
        real(path)

    monkeypatch.setattr(tools, "remove_tree", remove)


def test_generalised_files_are_reported_in_text_json_and_images_show(env: Cli) -> None:
    text = env("bake", "recipe.yaml")
    assert text.code == 0, text.err
    assert "generalisation removed 2 file(s) a step left in the image" in text.out
    assert "aws credentials: /root/.aws/credentials" in text.out and "ssh key: /root/.ssh/id_ed25519" in text.out
    doc = env("bake", "recipe.yaml", "--json").json()
    assert doc["generalised"] == [{"path": r.path, "kind": r.kind} for r in REMOVED]
    assert doc["orphaned"] == []
    shown = env("images", "show", "web@2", "--json").json()
    assert shown["generalised"] == doc["generalised"]
    built = next(e for e in shown["events"] if e["kind"] == "bake.built")
    assert built["data"]["generalised"] == doc["generalised"]  # path and kind, never content
    assert "ssh key: /root/.ssh/id_ed25519" in env("images", "show", "web@2").out


def test_a_failed_cleanup_after_a_good_bake_is_shown_recorded_and_collected(
    env: Cli, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    _busy(monkeypatch, 1)
    r = env("bake", "recipe.yaml", "--json")
    assert r.code == 0, r.err  # the image is good: the bake stands
    (left,) = r.json()["orphaned"]
    assert left["what"] == "temporary directory" and "Device or resource busy" in left["error"]
    where = Path(left["where"])
    assert where.parent == tmp_path / "data" / "cache" / "layers" and where.is_dir()
    assert left["remove"].startswith("amiforge gc --region local --apply")

    _busy(monkeypatch, 1)
    text = env("bake", "recipe.yaml")
    assert text.code == 0
    assert "warning: left behind: temporary directory" in text.err
    assert "remove it: amiforge gc --region local --apply" in text.err

    shown = env("images", "show", "web@1", "--json").json()
    assert [(o["where"], o["removed"]) for o in shown["orphaned"]] == [(str(where), False)]
    assert "left behind: temporary directory" in env("images", "show", "web@1").out
    (second,) = [Path(o["where"]) for o in env("images", "show", "web@2", "--json").json()["orphaned"]]

    young = env("gc", "--json").json()["plans"][0]
    assert young["orphans"] == []  # a run may still be starting with a directory this young: never collected
    assert {reason for _, reason in young["kept"]} == {"younger than 1h: a run may still use it"}
    for leftover in (where, second):
        os.utime(leftover, (time.time() - 7200, time.time() - 7200))
    plan = env("gc", "--region", "local", "--json")
    assert plan.code == 0, plan.err
    (local,) = plan.json()["plans"]
    assert sorted(o["id"] for o in local["orphans"]) == sorted([str(where), str(second)])
    assert where.is_dir() and second.is_dir()  # planned, not removed
    applied = env("gc", "--apply", "--json")
    assert applied.code == 0, applied.err
    assert [o["outcome"] for o in applied.json()["results"][0]["outcomes"]] == ["deleted", "deleted"]
    assert not where.exists() and not second.exists()
    assert env("gc", "--json").json()["plans"][0]["orphans"] == []
    # The version's history keeps the leftover, marked as removed since.
    assert env("images", "show", "web@1", "--json").json()["orphaned"][0]["removed"] is True
    assert "(since removed by gc)" in env("images", "show", "web@1").out


def test_a_failed_cleanup_during_a_failed_run_is_a_note_on_the_error(env: Cli, monkeypatch: pytest.MonkeyPatch) -> None:
    _busy(monkeypatch, 1)

    def broken(self: FakeProvider, recipe: Recipe, ctx: RunContext) -> BakeResult:
        (self.settings.cache_dir / "layers").mkdir(parents=True, exist_ok=True)
        tools.temporary_dir(ctx.cleanup, ".tmp-TEST-", self.settings.cache_dir / "layers")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(FakeProvider, "bake", broken)
    r = env("bake", "recipe.yaml", "--json")
    assert r.code == 5
    (note,) = r.json()["notes"]
    assert note.startswith("left behind: temporary directory") and "amiforge gc --region local --apply" in note
    _busy(monkeypatch, 1)
    text = env("bake", "recipe.yaml")
    assert text.code == 5 and "left behind: temporary directory" in text.err


def _old(*dirs: Path) -> None:
    for d in dirs:
        os.utime(d, (time.time() - 7200, time.time() - 7200))


def test_gc_collects_what_a_killed_run_left_and_keeps_what_is_young_active_or_elsewhere(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr("tempfile.tempdir", str(tmp_path / "tmp"))
    settings = Settings(data_dir=tmp_path / "data")
    layers = settings.cache_dir / "layers"
    killed, young, active, foreign = (layers / ".tmp-aaaa-1", layers / ".tmp-bbbb-2", layers / ".tmp-cccc-3",
                                      tmp_path / "x")  # fmt: skip
    for d in (killed, young, active, foreign):
        d.mkdir(parents=True)
    _old(killed, active, foreign)
    (layers / ("0" * 64)).mkdir()  # a finished cache entry: never a candidate
    recorded = [
        ("run1", Leftover("temporary directory", str(foreign), "rm -rf")),  # a damaged event's path
        ("run2", Leftover("temporary directory", str(active), "rm -rf")),  # a run the registry says is running
    ]
    states: dict[str, RunState] = {"run1": "finished", "run2": "active"}
    plan = plan_local_gc(settings, recorded=recorded, run_state=lambda r: states[r], min_age=timedelta(hours=1),
                         now=datetime.now(UTC), used=[])  # fmt: skip
    assert [o.id for o in plan.orphans] == [str(killed)]
    kept = dict(plan.kept)
    assert kept[str(young)].startswith("younger than 1h")
    assert kept[str(active)] == "its run run2 is still active"
    assert kept[str(foreign)] == "an orphaned event names it, but amiforge never makes directories there"
    result = apply_local_gc(settings, plan, max_deletions=10)
    assert [o.outcome for o in result.outcomes] == ["deleted"]
    assert not killed.exists() and young.exists() and active.exists() and foreign.exists()


def test_gc_keeps_a_directory_a_real_process_works_in(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """No `used=` here: what is in use is read from /proc, as `amiforge gc` does."""
    monkeypatch.setattr("tempfile.tempdir", str(tmp_path / "tmp"))
    settings = Settings(data_dir=tmp_path / "data")
    busy, idle = settings.cache_dir / "amiforge-disk-busy", settings.cache_dir / "amiforge-disk-idle"
    for d in (busy, idle):
        d.mkdir(parents=True)
    (busy / "open.raw").write_bytes(b"x")
    worker = subprocess.Popen(["sleep", "60"], cwd=busy)  # a process whose working directory is inside it
    try:
        _old(busy, idle)
        plan = plan_local_gc(settings, recorded=[], run_state=lambda _r: "unknown", min_age=timedelta(hours=1),
                             now=datetime.now(UTC))  # fmt: skip
        assert [o.id for o in plan.orphans] == [str(idle)]
        assert dict(plan.kept)[str(busy)] == "in use by a running process"
    finally:
        worker.kill()
        worker.wait()


def test_gc_never_follows_a_symlink_or_touches_another_users_directory(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr("tempfile.tempdir", str(tmp_path / "tmp"))
    settings = Settings(data_dir=tmp_path / "data")
    layers = settings.cache_dir / "layers"
    layers.mkdir(parents=True)
    precious = tmp_path / "precious"
    precious.mkdir()
    (precious / "keep").write_text("must survive")
    (layers / ".tmp-link-1").symlink_to(precious)  # planted where gc looks, pointing elsewhere
    theirs = layers / ".tmp-theirs-2"
    theirs.mkdir()
    _old(theirs)
    if os.geteuid() == 0:
        os.chown(theirs, 65534, 65534)  # nobody's
    plan = plan_local_gc(settings, recorded=[], run_state=lambda _r: "unknown", min_age=timedelta(hours=1),
                         now=datetime.now(UTC), used=[])  # fmt: skip
    assert plan.orphans == ()
    if os.geteuid() == 0:
        assert dict(plan.kept)[str(theirs)] == "owned by uid 65534, not by this user"
    assert (precious / "keep").read_text() == "must survive"


class DownAws:
    """An AWS provider whose region does not answer: every call that would reach AWS fails as an unreachable
    endpoint does."""

    name: ClassVar[str] = "aws"

    def __init__(self, settings: Settings) -> None:
        self.settings = settings

    @staticmethod
    def _down(region: str, operation: str = "ec2:DescribeInstances") -> InfraError:
        return InfraError(f"{operation} on {region}: cannot reach AWS (TEST)", retryable=True)

    def preflight(self, recipe: Recipe) -> None:
        raise self._down(self.settings.region, "ec2:DescribeImages")

    def bake(self, recipe: Recipe, ctx: RunContext) -> BakeResult:
        raise self._down(self.settings.region, "ec2:RunInstances")

    def boot_test(self, artifact: Artifact, checks: Checks, ctx: RunContext, spec: object) -> BootReport:
        raise self._down(artifact.region, "ec2:RunInstances")

    def inspect(self, artifact: Artifact) -> AbstractContextManager[ImageView]:
        raise self._down(artifact.region, "ebs:ListSnapshotBlocks")

    def current_digest(self, artifact: Artifact) -> str:
        raise self._down(artifact.region, "ec2:DescribeImages")

    def plan_gc(
        self,
        region: str,
        *,
        registered: Collection[str],
        run_state: Callable[[str], RunState],
        recorded: Sequence[tuple[str | None, Leftover]],
        min_age: timedelta,
        now: datetime,
    ) -> GcPlan:
        raise self._down(region)

    def apply_gc(self, plan: GcPlan, *, max_deletions: int) -> GcResult:
        raise AssertionError("never planned, never applied")


def down_aws(settings: Settings) -> CollectingProvider:
    return DownAws(settings)


def test_gc_collects_this_machine_when_an_aws_region_does_not_answer(
    env: Cli, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    _busy(monkeypatch, 1)
    where = Path(env("bake", "recipe.yaml", "--no-test", "--json").json()["orphaned"][0]["where"])
    _old(where)
    with open_store(load_settings().registry_url) as store:  # the registry knows an AWS region
        store.add_artifact(1, Artifact("aws", "eu-west-1", "ami-00000000000000001", "e" * 64, 1))
    monkeypatch.setitem(amiforge.providers.PROVIDERS, "aws", down_aws)
    applied = env("gc", "--apply", "--json")
    assert applied.code == 5
    doc = applied.json()
    assert [f["region"] for f in doc["failures"]] == ["eu-west-1"]
    assert [o["outcome"] for r in doc["results"] for o in r["outcomes"]] == ["deleted"]  # this machine: collected
    assert not where.exists()


def test_a_failed_boot_test_still_says_what_the_bake_left(env: Cli, monkeypatch: pytest.MonkeyPatch) -> None:
    _busy(monkeypatch, 1)

    def broken(self: FakeProvider, artifact: Artifact, checks: Checks, ctx: RunContext, spec: object) -> BootReport:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(FakeProvider, "boot_test", broken)
    r = env("bake", "recipe.yaml", "--json")
    assert r.code == 5
    assert any(n.startswith("left behind: temporary directory") for n in r.json()["notes"])


def test_a_view_that_cannot_remove_its_scratch_copy_says_so(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """What inspect (a scan's view of the disk) could not remove is kept for the caller, and noted on an error."""
    leftovers: list[Leftover] = []
    scratch = tmp_path / "amiforge-inspect-1"
    scratch.mkdir()
    _busy(monkeypatch, 2)
    tools.remove_or_report(scratch, leftovers)
    assert [(x.what, x.where) for x in leftovers] == [("temporary directory", str(scratch))]
    with pytest.raises(ValueError) as caught:
        try:
            raise ValueError("the scan failed")
        except ValueError as e:
            tools.remove_or_report(scratch, leftovers, in_flight=e)
            raise
    assert caught.value.__notes__[0].startswith(f"left behind: temporary directory {scratch}")


def test_mount_points_are_unescaped_and_never_need_to_be_utf8() -> None:
    mountinfo = (
        b"36 35 98:0 / /srv/data\\040dir rw,relatime - ext4 /dev/vda rw\n"
        b"37 35 0:40 / /tmp/bad\xffname rw - tmpfs tmpfs rw\n"
        b"garbage\n"
    )
    assert mount_points(mountinfo) == ["/srv/data dir", os.fsdecode(b"/tmp/bad\xffname")]


def test_a_damaged_aws_version_stops_only_the_aws_part_of_gc(env: Cli) -> None:
    with open_store(load_settings().registry_url) as store:
        store.create_version(name="web", recipe_digest="a" * 64, recipe_path="/r.yaml", provider="aws", tags={},
                             parent=None, recipe="[not an object]")  # fmt: skip
    r = env("gc", "--json")
    assert r.code == 5
    doc = r.json()
    assert [f["region"] for f in doc["failures"]] == ["aws"]
    assert "versions row id=1" in doc["failures"][0]["error"]["message"]
    assert [p["region"] for p in doc["plans"]] == ["local"]  # this machine is still looked at
