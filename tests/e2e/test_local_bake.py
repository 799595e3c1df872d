"""Real bakes and boots on the local provider: mmdebstrap, chroot steps, mkfs.ext4 -d, QEMU, the CLI."""

from __future__ import annotations

import hashlib
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.e2e.conftest import Cli, _leftovers

pytestmark = pytest.mark.slow


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        while chunk := fh.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


def _checks(report: dict[str, object]) -> dict[str, bool]:
    checks = report["checks"]
    assert isinstance(checks, list)
    return {c["name"]: c["passed"] for c in checks}


def test_web_bakes_boots_serves_and_rebuilds_only_changed_layers(
    cli: Cli, web_recipe: Path, no_leftovers: None
) -> None:
    first = cli.json("bake", str(web_recipe))
    v1 = first["version"]
    assert v1["status"] == "tested"
    report = first["boot_report"]
    assert report["passed"] is True
    assert 0 < report["time_to_ready"] < 90
    assert _checks(report) == {
        "ready": True,
        "unit nginx": True,
        "command nginx -t": True,
        "command id deploy": True,
        "http :80/": True,
    }
    # The version digest is the sha256 of the disk image in the local image store.
    shown = cli.json("images", "show", f"web@{v1['number']}")
    (artifact,) = shown["artifacts"]
    assert Path(artifact["location"]).parent == cli.data_dir / "regions" / "local" / "web"
    assert _sha256(Path(artifact["location"])) == v1["digest"]
    assert [e["kind"] for e in shown["events"]] == ["bake.started", "bake.built", "test.passed"]

    # Unchanged recipe: every layer is a cache hit and the image is the same bytes.
    again = cli.json("bake", str(web_recipe), "--no-test")
    assert all(layer["hit"] for layer in again["layers"])
    assert again["version"]["digest"] == v1["digest"]
    assert again["version"]["status"] == "built"

    # One file changed: the layers before it hit, it and every later layer miss, and the new page is served.
    page = web_recipe.parent / "files" / "index.html"
    page.write_text(page.read_text().replace("Baked by amiforge.", "Baked again, web tier v2."))
    third = cli.json("bake", str(web_recipe))
    hits = {layer["description"]: layer["hit"] for layer in third["layers"]}
    assert hits["base: debian bookworm minbase"] and hits["packages: nginx"]
    assert not hits["file files/index.html -> /var/www/html/index.html"]
    assert not hits["generalise"]
    assert third["version"]["digest"] != v1["digest"]
    assert third["version"]["parent"] == again["version"]["name"] + "@" + str(again["version"]["number"])
    assert third["boot_report"]["passed"] is True

    # test REF boots again on a fresh overlay and records a second report.
    ref = f"web@{third['version']['number']}"
    retest = cli.json("test", ref)
    assert retest["boot_report"]["passed"] is True
    assert len(cli.json("images", "show", ref)["boot_reports"]) == 2
    assert cli.json("events", "--verify")["ok"] is True


FAILING = """\
name: broken
provider: {type: local}
steps:
  - shell: echo hello > /etc/amiforge-test
checks:
  ready_within: 120s
  units: [amiforge-no-such.service]
  commands:
    - {run: "cat /etc/amiforge-test", expect_output: "hello"}
    - {run: "cat /etc/amiforge/release", expect_output: "AMIFORGE_VERSION=broken@1"}
    - {run: "test -e /nonexistent", expect_exit: 0}
  tcp:
    - {port: 2222}
"""


def test_failing_check_exits_4_marks_failed_and_leaves_nothing(cli: Cli, tmp_path: Path, no_leftovers: None) -> None:
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(FAILING)
    out = cli.json("bake", str(recipe), check=4)
    assert out["error"] == "gate"
    failed = {f["name"] for f in out["failures"]}
    assert failed == {"unit amiforge-no-such.service", "command test -e /nonexistent", "tcp :2222"}
    shown = cli.json("images", "show", "broken@1")
    assert shown["version"]["status"] == "failed"
    (report,) = shown["boot_reports"]
    assert _checks(report)["command cat /etc/amiforge-test"] is True
    # The image is content-addressed and carries no version: the guest was told which one it boots as.
    assert _checks(report)["command cat /etc/amiforge/release"] is True
    assert _checks(report)["ready"] is True


def test_failed_step_records_failed_version_with_log(cli: Cli, tmp_path: Path, no_leftovers: None) -> None:
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text("name: badstep\nsteps:\n  - shell: |\n      echo about-to-fail\n      exit 3\n")
    out = cli.json("bake", str(recipe), check=5)
    assert out["error"] == "infra"
    assert "about-to-fail" in out["message"]
    shown = cli.json("images", "show", "badstep@1", "--log")
    assert shown["version"]["status"] == "failed"
    assert "about-to-fail" in shown["log"]
    assert [e["kind"] for e in shown["events"]] == ["bake.started", "bake.failed"]


def _ctrl_c_reaches_it() -> None:
    # A suite started in the background (`make test &` from a script) runs with SIGINT ignored, and its children
    # inherit that; a user's Ctrl-C reaches an amiforge started from a terminal, as it must reach this one.
    signal.signal(signal.SIGINT, signal.SIG_DFL)


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM], ids=["ctrl-c", "sigterm"])
def test_interrupt_midway_cleans_up_and_marks_failed(
    cli: Cli, tmp_path: Path, no_leftovers: None, sig: signal.Signals
) -> None:
    name = f"interrupted-{sig.name.lower()}"
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(f"name: {name}\nsteps:\n  - shell: sleep 60\n")
    proc = subprocess.Popen(
        [sys.executable, "-m", "amiforge", "bake", str(recipe), "--json"],
        env=cli.env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
        preexec_fn=_ctrl_c_reaches_it,
    )
    # Wait until the step is running inside its chroot, then interrupt the whole process group.
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        if list((cli.data_dir / "cache" / "layers").glob(".tmp-*/upper")):
            break
        time.sleep(0.2)
    else:
        proc.kill()
        pytest.fail("the shell step never started")
    time.sleep(1)
    os.killpg(proc.pid, sig)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err
    assert cli.json("images", "show", f"{name}@1")["version"]["status"] == "failed"
    assert _leftovers(cli.data_dir) == []


def test_not_ready_in_time_fails_the_gate_cleanly(cli: Cli, tmp_path: Path, no_leftovers: None) -> None:
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text("name: slow\nchecks:\n  ready_within: 2s\n  units: [systemd-journald]\n")
    out = cli.json("bake", str(recipe), check=4)
    assert [f["name"] for f in out["failures"]] == ["ready"]
    assert "not ready within 2s" in out["failures"][0]["detail"]
    shown = cli.json("images", "show", "slow@1", "--console")
    assert shown["version"]["status"] == "failed"
    (report,) = shown["boot_reports"]
    assert report["time_to_ready"] is None
    assert [c["name"] for c in report["checks"]] == ["ready"]  # nothing else ran on a guest that never got ready
