"""What a bake reports beyond its image, through the CLI: the credentials generalisation removed, and what failed
cleanups left behind — shown in text and `--json`, kept in `images show`, and found (then removed) by `gc`.

The provider is a fake whose bake makes real temporary directories with the local provider's helper, so the cleanup,
the `orphaned` event and gc's view of the cache are the real ones.
"""

from __future__ import annotations

import os
import time
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, ClassVar

import pytest

import amiforge.providers
from amiforge.model import Artifact, BootReport, CheckResult, LayerRecord, Leftover, RemovedFile
from amiforge.providers.interface import BakeResult, GcPlan, GcResult, Provider, RunContext
from amiforge.providers.local import tools
from amiforge.providers.local.leftovers import apply_local_gc, plan_local_gc
from amiforge.recipe import Checks, Recipe
from amiforge.settings import Settings
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
        artifact = Artifact("local", "local", str(disk), "d" * 64, disk.stat().st_size)
        return BakeResult(artifact, (LayerRecord(0, "b" * 64, "base", True, 0.1, 1),), REMOVED)

    def boot_test(self, artifact: Artifact, checks: Checks, ctx: RunContext, spec: object) -> BootReport:
        tools.temporary_dir(ctx.cleanup, "amiforge-boot-")
        return PASSING

    def plan_gc(self, region: str, **kw: Any) -> GcPlan:
        return plan_local_gc(self.settings, recorded=kw["recorded"], min_age=kw["min_age"], now=kw["now"])

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

    def factory(settings: Settings) -> Provider:
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
    assert left["remove"].startswith("amiforge gc --apply")

    _busy(monkeypatch, 1)
    text = env("bake", "recipe.yaml")
    assert text.code == 0
    assert "warning: left behind: temporary directory" in text.err and "remove it: amiforge gc --apply" in text.err

    shown = env("images", "show", "web@1", "--json").json()
    assert [o["where"] for o in shown["orphaned"]] == [str(where)]
    assert "left behind: temporary directory" in env("images", "show", "web@1").out
    (second,) = [Path(o["where"]) for o in env("images", "show", "web@2", "--json").json()["orphaned"]]

    plan = env("gc", "--json")
    assert plan.code == 0, plan.err
    (local,) = plan.json()["plans"]
    assert sorted(o["id"] for o in local["orphans"]) == sorted([str(where), str(second)])
    assert where.is_dir() and second.is_dir()  # planned, not removed
    applied = env("gc", "--apply", "--json")
    assert applied.code == 0, applied.err
    assert [o["outcome"] for o in applied.json()["results"][0]["outcomes"]] == ["deleted", "deleted"]
    assert not where.exists() and not second.exists()
    assert env("gc", "--json").json()["plans"][0]["orphans"] == []


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
    assert note.startswith("left behind: temporary directory") and "amiforge gc --apply" in note
    _busy(monkeypatch, 1)
    text = env("bake", "recipe.yaml")
    assert text.code == 5 and "left behind: temporary directory" in text.err


def test_gc_collects_what_a_killed_run_left_and_keeps_what_is_young_in_use_or_elsewhere(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr("tempfile.tempdir", str(tmp_path / "tmp"))
    settings = Settings(data_dir=tmp_path / "data")
    layers = settings.cache_dir / "layers"
    killed, young, busy, foreign = (
        layers / ".tmp-aaaa-1",
        layers / ".tmp-bbbb-2",
        layers / ".tmp-cccc-3",
        tmp_path / "x",
    )
    for d in (killed, young, busy, foreign):
        d.mkdir(parents=True)
    hour_ago = time.time() - 7200
    for d in (killed, busy):
        os.utime(d, (hour_ago, hour_ago))
    (layers / ("0" * 64)).mkdir()  # a finished cache entry: never a candidate
    recorded = [("run1", Leftover("temporary directory", str(foreign), "rm -rf"))]  # a damaged event's path
    now = datetime.now(UTC)
    plan = plan_local_gc(settings, recorded=recorded, min_age=timedelta(hours=1), now=now, used=[str(busy / "merged")])
    assert [o.id for o in plan.orphans] == [str(killed)]
    kept = dict(plan.kept)
    assert kept[str(young)].startswith("younger than")
    assert kept[str(busy)] == "in use by a running process"
    assert kept[str(foreign)] == "an orphaned event names it, but amiforge never makes directories there"
    result = apply_local_gc(settings, plan, max_deletions=10)
    assert [o.outcome for o in result.outcomes] == ["deleted"]
    assert not killed.exists() and young.exists() and busy.exists() and foreign.exists()
