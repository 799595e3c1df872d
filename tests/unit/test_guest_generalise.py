"""What generalisation removes of a communicator's traces (providers/guest.py FORGET_COMMUNICATOR): the shell function
GENERALISE calls, run for real by /bin/sh against a copy of the folders it touches, under a temporary root."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

from amiforge.providers.guest import FORGET_COMMUNICATOR, GENERALISE, step_script

OURS = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIOurThrowAwayKeyForTheRun0000000000000000 amiforge-run42"
THEIRS = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAITheImageOwnersOwnKey111111111111111111111 ops@example"
ORCHESTRATION = "var/lib/amazon/ssm/i-0000000000test01/document/orchestration"
STATE = "var/lib/amazon/ssm/i-0000000000test01/document/state"
RUNNING = "00000000-0000-0000-0000-00000000run0"
EARLIER = "00000000-0000-0000-0000-00000000put1"


def _write(root: Path, path: str, text: str) -> Path:
    target = root / path
    target.parent.mkdir(parents=True, exist_ok=True)
    target.write_text(text)
    return target


def _forget(root: Path, *, command_id: str | None, keys: str = "") -> None:
    """The variables step_script and the SSM agent would set, then the function on `root`."""
    env = {"PATH": "/usr/bin:/bin", "AMIFORGE_COMMUNICATOR_KEYS": keys}
    if command_id is not None:
        env["SSM_COMMAND_ID"] = command_id
    script = "set -e\n" + FORGET_COMMUNICATOR + 'forget_communicator "$1"\n'
    subprocess.run(["/bin/sh", "-c", script, "sh", str(root)], env=env, check=True)


@pytest.fixture
def builder(tmp_path: Path) -> Path:
    """What a bake leaves on a builder: SSM commands with an upload's base64 in them, the run's key in two
    authorized_keys files (cloud-init puts it in root's with a forced command), staged uploads."""
    root = tmp_path / "root"
    _write(root, f"{ORCHESTRATION}/{EARLIER}/awsrunShellScript/0.awsrunShellScript/_script.sh", "printf c2VjcmV0 >x")
    _write(root, f"{ORCHESTRATION}/{EARLIER}/awsrunShellScript/0.awsrunShellScript/stdout", "")
    _write(root, f"{ORCHESTRATION}/{RUNNING}/awsrunShellScript/0.awsrunShellScript/_script.sh", "generalise")
    _write(root, f"{STATE}/completed/{EARLIER}.i-0000000000test01", '{"commands": ["printf c2VjcmV0"]}')
    _write(root, f"{STATE}/current/{RUNNING}.i-0000000000test01", '{"commands": ["generalise"]}')
    _write(root, "home/admin/.ssh/authorized_keys", f"{THEIRS}\n{OURS}\n")
    _write(root, "root/.ssh/authorized_keys", f'no-pty,command="echo login as admin" {OURS}\n')
    _write(root, "run/amiforge/put-0123456789ab.b64", "c2VjcmV0")
    _write(root, "run/amiforge/.hidden", "x")
    return root


def _left(root: Path) -> set[str]:
    return {str(p.relative_to(root)) for p in root.rglob("*") if p.is_file()}


def test_generalisation_removes_ssm_commands_the_throwaway_key_and_staged_uploads(builder: Path) -> None:
    blob = OURS.split()[1]
    _forget(builder, command_id=RUNNING, keys=blob)
    assert _left(builder) == {
        f"{ORCHESTRATION}/{RUNNING}/awsrunShellScript/0.awsrunShellScript/_script.sh",  # the running command: itself
        f"{STATE}/current/{RUNNING}.i-0000000000test01",
        "home/admin/.ssh/authorized_keys",
        "root/.ssh/authorized_keys",
    }
    assert (builder / "home/admin/.ssh/authorized_keys").read_text() == f"{THEIRS}\n"  # by line: the owner's key stays
    assert (builder / "root/.ssh/authorized_keys").read_text() == ""
    assert (builder / "run/amiforge").is_dir()  # the contents go, not the folder (a bind mount on the local provider)


def test_an_agent_without_ssm_command_id_keeps_the_newest_entry_only(builder: Path) -> None:
    running = builder / ORCHESTRATION / RUNNING
    os.utime(builder / ORCHESTRATION / EARLIER, (1_000_000, 1_000_000))
    os.utime(running, (2_000_000, 2_000_000))
    _forget(builder, command_id=None)
    assert sorted(p.name for p in (builder / ORCHESTRATION).iterdir()) == [RUNNING]
    # Without keys to forget, every authorized key stays.
    assert OURS in (builder / "home/admin/.ssh/authorized_keys").read_text()


def test_nothing_to_forget_is_no_error(tmp_path: Path) -> None:
    (tmp_path / "empty").mkdir()
    _forget(tmp_path / "empty", command_id=None)


def test_generalise_forgets_the_communicator_and_step_script_passes_the_keys(tmp_path: Path) -> None:
    assert FORGET_COMMUNICATOR in GENERALISE and 'forget_communicator ""\n' in GENERALISE
    script = step_script(None, tmp_path, tmp_path, "web", forget_keys=[OURS])
    assert script.startswith(f"AMIFORGE_HOSTNAME=web\nAMIFORGE_COMMUNICATOR_KEYS={OURS.split()[1]}\n")
    assert step_script(None, tmp_path, tmp_path, "web") == "AMIFORGE_HOSTNAME=web\n" + GENERALISE
    with pytest.raises(ValueError, match="not an OpenSSH public key line"):
        step_script(None, tmp_path, tmp_path, "web", forget_keys=["ssh-ed25519 $(reboot)"])
