"""A real local fleet: web baked, two QEMU guests started by the CLI and left running after it exits, one
killed behind amiforge's back, one replaced through the Python API (twice with one token: one guest), all gone
after destroy."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from amiforge.lifecycle.boottest import checks_of, machine_release
from amiforge.providers import guest as in_guest
from amiforge.providers.interface import Replacement
from amiforge.providers.local.fleet import open_fleet
from amiforge.providers.local.guest_processes import find_guests
from amiforge.recipe import CommandCheck
from amiforge.settings import Settings
from amiforge.store.sql import open_store
from tests.e2e.conftest import Cli

pytestmark = pytest.mark.slow


def fleet(cli: Cli, *args: str, check: int = 0) -> Any:
    proc = subprocess.run(
        [sys.executable, "-m", "amiforge", "fleet", *args, "--json"],
        env=cli.env,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert proc.returncode == check, f"exit {proc.returncode}\nstdout:\n{proc.stdout}\nstderr:\n{proc.stderr}"
    return json.loads(proc.stdout)


def _gone(pid: int, timeout: float = 10) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if not Path(f"/proc/{pid}/cmdline").read_bytes():
                return True  # a zombie: dead, waiting for its parent (init) to reap it
        except OSError:
            return True
        time.sleep(0.1)
    return False


def test_fleet_create_fail_replace_destroy(cli: Cli, web_recipe: Path, no_leftovers: None) -> None:
    baking = time.monotonic()
    ref = "web@{number}".format(**cli.json("bake", str(web_recipe))["version"])
    started = time.monotonic()

    created = fleet(cli, "create", "webfleet", "--size", "2", "--version", ref)
    assert [m["state"] for m in created["members"]] == ["ready", "ready"]
    created_in = time.monotonic() - started
    # The guests outlived the CLI that started them; `show` reconciles with the running QEMUs.
    shown = fleet(cli, "show", "webfleet")
    victim, keep = shown["members"]
    for m in (victim, keep):
        assert (m["state"], m["version_ref"]) == ("ready", ref)
        assert 0 < m["time_to_ready"] < 90
        assert list(m["ports"]) == ["80"]  # the recipe's HTTP check port, forwarded on 127.0.0.1
    assert [f["name"] for f in fleet(cli, "list")] == ["webfleet"]

    os.kill(victim["pid"], signal.SIGKILL)
    assert _gone(victim["pid"])
    after = {m["id"]: m for m in fleet(cli, "show", "webfleet")["members"]}
    assert (after[victim["id"]]["state"], after[victim["id"]]["detail"]) == ("failed", "QEMU exited")
    assert after[keep["id"]]["state"] == "ready"

    settings = Settings(data_dir=cli.data_dir)
    with open_store(settings.registry_url) as store:
        version = store.get_version(ref)
        artifact = next(a for a in store.artifacts(version.id) if a.provider == "local")
    webfleet = open_fleet(settings, "webfleet")
    # The new guest must say what it was booted as (the image is shared between versions): the release file
    # amiforge gave it, byte for byte (but the last newline, which `$(…)` drops), with the artifact's digest.
    release = machine_release(version, artifact)
    assert release.digest == artifact.digest
    says = CommandCheck(run="cat /etc/amiforge/release", expect_output=in_guest.release_file(release).decode().rstrip())
    checks = checks_of(version).model_copy(update={"commands": [*checks_of(version).commands, says]})
    replaced_at = time.monotonic()
    (new,) = webfleet.replace([Replacement(keep["id"], "e2e-wave-1")], artifact, release, checks)
    replace_in = time.monotonic() - replaced_at
    assert (new.state, new.version_ref) == ("ready", ref), new.detail
    assert _gone(keep["pid"])
    states = {m.id: m.state for m in webfleet.current()}
    assert states == {victim["id"]: "failed", keep["id"]: "stopped", new.id: "ready"}
    replaced = [s for s in webfleet.signals(webfleet.info().created) if s.kind == "replaced"]
    assert [(s.member, s.detail) for s in replaced] == [(keep["id"], f"replaced by {new.id}")]

    # Asked again with the same token (a resumed rollout): the same member, no second guest.
    (again,) = webfleet.replace([Replacement(keep["id"], "e2e-wave-1")], artifact, release, checks)
    assert (again.id, again.state) == (new.id, "ready")
    assert len(find_guests(webfleet.dir)) == 1

    destroyed = fleet(cli, "destroy", "webfleet")
    assert destroyed["stopped"] == [new.id]
    assert fleet(cli, "list") == []
    print(
        f"\nbake {started - baking:.1f}s; fleet of 2 ready in {created_in:.1f}s; one replacement ready in "
        f"{replace_in:.1f}s; fleet part {time.monotonic() - started:.1f}s"
    )
