"""A rollout on a real local fleet (QEMU guests), through the CLI: a good version rolls through a 3-guest fleet; a bad
one — it boots, passes its boot test, but takes far longer to get ready than the strategy allows — stops at wave 1,
rolls back automatically, and the fleet ends entirely on the previous version. Which version each guest runs is read
from the guests themselves (the page each one serves on its forwarded port), not from the registry."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from typing import Any

import pytest

from tests.e2e.conftest import Cli

pytestmark = pytest.mark.slow

# The bad version: a unit that holds multi-user.target for 45 s, so READY comes ~45 s late (the boot test allows it:
# ready_within is 150 s; the rollout's gate is a p95 time-to-ready of 40 s).
SLOW_STEP = """\
  - shell: |
      cat > /etc/systemd/system/slow-start.service <<'EOF'
      [Unit]
      Before=multi-user.target
      [Service]
      Type=oneshot
      ExecStart=/bin/sleep 45
      [Install]
      WantedBy=multi-user.target
      EOF
      systemctl enable slow-start.service
"""
STRATEGY = "waves: [1, 100%]\nbake_time: 0s\ngates: {boot_success_rate: 1.0, time_to_ready_p95: 40s}\n"


def run(cli: Cli, *args: str, check: int | None = 0) -> Any:
    proc = subprocess.run(
        [sys.executable, "-m", "amiforge", *args, "--json"],
        env=cli.env,
        capture_output=True,
        text=True,
        timeout=900,
        check=False,
    )
    if check is not None:
        assert proc.returncode == check, f"exit {proc.returncode}\nstdout:\n{proc.stdout}\nstderr:\n{proc.stderr}"
    return json.loads(proc.stdout)


def release(cli: Cli, recipe: Path, page: str) -> str:
    """Bake → test → scan → sign a version of `recipe` serving `page`; returns NAME@N."""
    (recipe.parent / "files" / "index.html").write_text(f"web tier {page}\n")
    outcome = run(cli, "pipeline", "run", str(recipe))  # exit 0: every gate passed and the version is signed
    assert outcome["signature"]["key_id"], outcome
    return str(outcome["version"])


def pages(cli: Cli, fleet: str) -> list[str]:
    """What each running guest serves, asked of the guest itself over its forwarded port."""
    served = []
    for member in run(cli, "fleet", "show", fleet)["members"]:
        if member["state"] == "stopped":
            continue
        with urllib.request.urlopen(f"http://127.0.0.1:{member['ports']['80']}/", timeout=10) as answer:
            served.append(answer.read().decode().strip())
    return sorted(served)


def test_good_version_rolls_through_and_a_slow_one_is_rolled_back(
    cli: Cli, web_recipe: Path, tmp_path: Path, no_leftovers: None
) -> None:
    recipe_text = web_recipe.read_text().replace("ready_within: 90s", "ready_within: 150s")
    web_recipe.write_text(recipe_text)
    v1 = release(cli, web_recipe, "v1")
    v2 = release(cli, web_recipe, "v2")
    strategy = tmp_path / "strategy.yaml"
    strategy.write_text(STRATEGY)

    created = run(cli, "fleet", "create", "rollfleet", "--size", "3", "--version", v1)
    assert [m["state"] for m in created["members"]] == ["ready"] * 3
    try:
        assert pages(cli, "rollfleet") == ["web tier v1"] * 3

        good = run(cli, "rollout", "start", "--target", "local:rollfleet", "--version", v2, "--strategy", str(strategy))
        assert good["rollout"]["state"] == "succeeded"
        assert [d["numbers"]["members"] for d in good["decisions"]] == [1, 2]
        assert pages(cli, "rollfleet") == ["web tier v2"] * 3

        # kill -9 the controller of a rollback to v1 once its first guest is launching; `rollout resume` converges.
        controller = subprocess.Popen(
            [sys.executable, "-m", "amiforge", "rollback", "--target", "local:rollfleet", "--json"],
            env=cli.env,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            start_new_session=True,
        )
        deadline = time.monotonic() + 300
        while not any(m["version_ref"] == v1 for m in run(cli, "fleet", "show", "rollfleet")["members"]):
            assert time.monotonic() < deadline and controller.poll() is None, "no guest of v1 was launched"
            time.sleep(0.5)
        os.killpg(controller.pid, signal.SIGKILL)
        controller.wait()
        resumed = run(cli, "rollout", "resume", "2")
        assert resumed["rollout"]["state"] == "succeeded"
        assert pages(cli, "rollfleet") == ["web tier v1"] * 3
        history = run(cli, "fleet", "show", "rollfleet", "--all")["members"]
        assert len(history) == 9  # 3 created + 3 for v2 + 3 for v1: no guest launched twice, none lost
        assert len({r["new_member"] for r in resumed["replacements"]}) == 3  # one new guest per replaced member

        web_recipe.write_text(
            web_recipe.read_text().replace(
                "  - service: {enable: [nginx]}\n", SLOW_STEP + "  - service: {enable: [nginx]}\n"
            )
        )
        v3 = release(cli, web_recipe, "v3")
        bad = run(
            cli,
            "rollout",
            "start",
            "--target",
            "local:rollfleet",
            "--version",
            v3,
            "--strategy",
            str(strategy),
            check=4,
        )
        assert bad["error"] == "gate" and "time-to-ready p95" in json.dumps(bad)
        status = run(cli, "rollout", "status", "3")
        assert status["rollout"]["state"] == "failed"
        (decision,) = status["decisions"]
        assert decision["action"] == "rollback" and decision["numbers"]["time_to_ready_p95"] > 40
        assert [r["kind"] for r in status["replacements"]] == ["forward", "rollback"]
        assert pages(cli, "rollfleet") == ["web tier v1"] * 3  # the guests say so themselves
    finally:
        run(cli, "fleet", "destroy", "rollfleet")
