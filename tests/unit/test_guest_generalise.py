"""Generalisation and what a communicator leaves (providers/guest.py): the communicator's removal script runs last,
after GENERALISE, and GENERALISE empties the upload stage. (What the SSM and SSH communicators name as their
leftovers, and the shell that removes them, are providers/aws/machine.py's `Leftovers`; the bake wires them in:
tests/integration/aws/test_bake.py.)"""

from __future__ import annotations

from pathlib import Path

from amiforge.providers.guest import GENERALISE, step_script

LEFTOVERS = "rm -rf -- /var/lib/amazon/ssm/i-0000000000test01\n"


def test_the_communicators_leftovers_run_last(tmp_path: Path) -> None:
    script = step_script(None, tmp_path, tmp_path, "web", leftovers=LEFTOVERS)
    assert script == "AMIFORGE_HOSTNAME=web\n" + GENERALISE + LEFTOVERS
    assert step_script(None, tmp_path, tmp_path, "web") == "AMIFORGE_HOSTNAME=web\n" + GENERALISE  # local: none


def test_generalise_empties_the_upload_stage_but_keeps_the_folder() -> None:
    """The contents only: on the local provider the stage is a bind mount, and removing it would fail the bake."""
    lines = GENERALISE.splitlines()
    assert "rm -rf /run/amiforge/* /run/amiforge/.[!.]*" in lines
    assert not any(line.rstrip().endswith(("/run/amiforge", "/run/amiforge/")) for line in lines)
