"""Retirement on real local images: four versions baked, a channel on the newest two and a real QEMU fleet on
another; `retire` keeps the channel's current and previous version and the fleet's, and takes the oldest out step by
step (deprecated, into the Recycle Bin, deleted); `drift` names the fleet that lags; once the fleet is gone its
version is planned out too; `cache gc` removes the layers only retired versions used."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from amiforge.settings import Settings
from amiforge.store.sql import open_store
from tests.e2e.conftest import Cli

pytestmark = pytest.mark.slow

RECIPE = """\
name: retiree
provider: {{type: local}}
steps:
  - shell: echo "{n}" > /etc/retiree-build
checks:
  ready_within: 120s
  commands:
    - {{run: "cat /etc/retiree-build", expect_output: "{n}"}}
"""
POLICY = """\
channels: {dev: {}}
retention:
  default: {keep_last: 10000, keep_younger_than: 366d}   # every other image of the session is left alone
  images:
    retiree: {keep_last: 0, keep_younger_than: 0s, deprecate_after: 0s, grace: 0s, snapshot_grace: 0s}
"""


def _steps(plan: dict[str, Any]) -> dict[str, tuple[str, str]]:
    return {s["version"]: (s["action"], s["why"]) for v in plan["versions"] for s in v["steps"]}


def _retire(cli: Cli, policy: Path, *more: str, check: int = 0) -> Any:
    return cli.json("retire", "--policy", str(policy), "--image", "retiree", *more, check=check)


def test_a_channels_versions_and_a_fleets_survive_while_older_ones_go(
    cli: Cli, tmp_path: Path, no_leftovers: None
) -> None:
    recipe = tmp_path / "retiree" / "recipe.yaml"
    recipe.parent.mkdir()
    refs = []
    for n in range(1, 5):
        recipe.write_text(RECIPE.format(n=n))
        boot = [] if n == 2 else ["--no-test"]  # the second is boot-tested: a fleet runs only tested versions
        baked = cli.json("bake", str(recipe), *boot)["version"]
        refs.append(f"retiree@{baked['number']}")
    gone, on_fleet, previous, current = refs
    settings = Settings(data_dir=cli.data_dir)
    with open_store(settings.registry_url) as store:
        locations = {ref: store.artifacts(store.get_version(ref).id)[0].location for ref in refs}
        # The channel, set straight in the registry: what this test is about is what retire does with it.
        before = store.get_version(previous).id
        store.move_channel("retiree", "dev", before, expect_current=None, actor="t", reason="t")
        store.move_channel(
            "retiree", "dev", store.get_version(current).id, expect_current=before, actor="t", reason="t"
        )
    policy = tmp_path / "policy.yaml"
    policy.write_text(POLICY)
    argv = [sys.executable, "-m", "amiforge", "fleet", "create", "retirefleet", "--size", "1", "--version", on_fleet]
    fleet = subprocess.run(argv, env=cli.env, capture_output=True, text=True, timeout=600)
    assert fleet.returncode == 0, fleet.stderr
    try:
        planned = _retire(cli, policy, check=10)["plan"]
        steps = _steps(planned)
        assert steps[gone][0] == "deprecate"
        assert steps[on_fleet][0] == "keep" and "fleet retirefleet, member g-" in steps[on_fleet][1]
        assert "qemu pid" in steps[on_fleet][1]  # its QEMU, found in /proc, holds the image too
        assert steps[previous] == ("keep", "in use: channel retiree:dev (previous: the rollback image)")
        assert steps[current] == ("keep", "in use: channel retiree:dev (current)")

        for _ in range(3):  # deprecate; deregister (into the Recycle Bin); delete what the bin holds
            _retire(cli, policy, "--apply")
        assert cli.json("images", "show", gone)["version"]["status"] == "retired"
        assert not Path(locations[gone]).exists()
        assert not list((cli.data_dir / "recycle-bin").rglob("*.qcow2"))
        for ref in (on_fleet, previous, current):
            assert Path(locations[ref]).is_file(), ref
        assert not _retire(cli, policy)["plan"]["changes"]  # exit 0: nothing more to do
        kinds = [e["kind"] for e in cli.json("events", gone, "--all")]
        assert kinds[-4:] == ["retire.deprecated", "retire.deregistered", "retire.purged", "retire.retired"]

        drifted = cli.json("drift", check=10)
        (row,) = [r for r in drifted["rows"] if r["target"] == "retirefleet"]
        assert row["version"] == on_fleet and row["findings"] == ["in no channel", "2 version(s) behind retiree:dev"]
    finally:
        cli.run("fleet", "destroy", "retirefleet")
    assert _steps(_retire(cli, policy, check=10)["plan"])[on_fleet][0] == "deprecate"  # nothing holds it now

    layers = cli.json("cache", "gc", "--min-age", "1s")["plan"]["entries"]
    assert layers and {e["folder"] for e in layers} <= {"layers", "images", "base"}
    removed = cli.json("cache", "gc", "--min-age", "1s", "--apply")["removed"]
    assert {e["key"] for e in removed} == {e["key"] for e in layers}
    # What kept versions use stayed: baking the newest recipe again (retiree@4's) hits every layer.
    again = cli.json("bake", str(recipe), "--no-test")
    assert all(layer["hit"] for layer in again["layers"]), again["layers"]
    assert again["version"]["digest"] == cli.json("images", "show", current)["version"]["digest"]
