"""A registry on a read-only file system is read by every read command, and a write says why it cannot.

The file system is made read-only for real (a read-only bind mount in a private mount namespace), so root's
permission to ignore file modes cannot hide a write the command should not need.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from amiforge.model import Status
from amiforge.store.sql import open_store
from tests.conftest import require_root, required_or_skip


@pytest.fixture
def _read_only_mount() -> None:
    # Skipped locally without them; in CI (CI=true) a failure.
    require_root("a read-only bind mount in a private mount namespace")
    required_or_skip(shutil.which("unshare") is not None, "unshare is missing", "apt-get install util-linux")


needs_mount = pytest.mark.usefixtures("_read_only_mount")
# Root ignores file modes unless it gives up that capability (setpriv); any other user is bound by them anyway.
DROP = (
    ["setpriv", "--bounding-set", "-dac_override,-dac_read_search", "--inh-caps", "-dac_override,-dac_read_search"]
    if os.geteuid() == 0
    else []
)


@pytest.fixture
def _file_modes_bind() -> None:
    required_or_skip(
        os.geteuid() != 0 or shutil.which("setpriv") is not None,
        "setpriv is missing, so root cannot give up its permission override",
        "apt-get install util-linux",
    )


needs_modes = pytest.mark.usefixtures("_file_modes_bind")


def _in_read_only(data: Path, *argv: str) -> subprocess.CompletedProcess[str]:
    mount = f"mount --bind {data} {data} && mount -o remount,ro,bind {data}"
    command = " ".join([sys.executable, "-m", "amiforge", *argv])
    env = {k: v for k, v in os.environ.items() if not k.startswith("AMIFORGE_")} | {"AMIFORGE_DATA_DIR": str(data)}
    return subprocess.run(
        ["unshare", "--mount", "--propagation", "private", "sh", "-c", f"{mount} && exec {command}"],
        env=env, capture_output=True, text=True, timeout=120, check=False,
    )  # fmt: skip


@needs_mount
def test_read_commands_work_on_a_read_only_registry_and_writes_fail_clearly(tmp_path: Path) -> None:
    data = tmp_path / "data"
    with open_store(f"sqlite:///{data / 'registry.db'}") as store:
        v = store.create_version(name="web", recipe_digest="a" * 64, recipe_path="/r.yaml", provider="local",
                                 tags={}, parent=None)  # fmt: skip
        store.transition(v.id, Status.BUILT, expect=Status.BAKING, digest="d" * 64, size_bytes=1)
        store.append_event("bake.built", actor="TEST", ref="web@1", data={})
    assert not (data / "registry.db-shm").exists()  # a cleanly closed WAL registry: no shared-memory file

    listed = _in_read_only(data, "images", "list", "--json")
    assert listed.returncode == 0, listed.stderr
    assert [v["ref"] for v in json.loads(listed.stdout)] == ["web@1"]
    for argv in (("images", "show", "web@1", "--json"), ("events", "--verify", "--json"), ("channels", "--json")):
        assert _in_read_only(data, *argv).returncode == 0, argv

    refused = _in_read_only(data, "revoke", "web@1", "--reason", "TEST", "--json")
    assert refused.returncode == 5, refused.stdout + refused.stderr
    error = json.loads(refused.stdout)
    assert "readonly" in error["message"].replace("-", "").replace(" ", "")
    assert "can only be read here" in error["fix"]


def _registry_in_a_folder_nobody_here_can_write(tmp_path: Path) -> Path:
    data = tmp_path / "data"
    with open_store(f"sqlite:///{data / 'registry.db'}") as store:
        store.create_version(name="web", recipe_digest="a" * 64, recipe_path="/r.yaml", provider="local", tags={},
                             parent=None)  # fmt: skip
    (data / "registry.db").chmod(0o444)
    return data


def _as_reader(data: Path, *argv: str) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("AMIFORGE_")} | {"AMIFORGE_DATA_DIR": str(data)}
    return subprocess.run([*DROP, sys.executable, "-m", "amiforge", *argv], env=env, capture_output=True, text=True,
                          timeout=120, check=False)  # fmt: skip


@needs_modes
def test_a_registry_in_a_folder_this_user_cannot_write_is_read_from_a_consistent_copy(tmp_path: Path) -> None:
    """A read-only file in a read-only folder (a registry another user writes, say): no locks can be taken there,
    so the registry is read from a private copy taken while nobody wrote it — never the live file without locks."""
    data = _registry_in_a_folder_nobody_here_can_write(tmp_path)
    data.chmod(0o555)
    try:
        listed = _as_reader(data, "images", "list", "--json")
        assert listed.returncode == 0, listed.stderr
        assert [v["ref"] for v in json.loads(listed.stdout)] == ["web@1"]
        assert sorted(p.name for p in data.iterdir()) == ["registry.db"]  # nothing written beside it
    finally:
        data.chmod(0o755)


@needs_modes
def test_a_registry_being_written_by_someone_else_is_not_read_without_locks(tmp_path: Path) -> None:
    data = _registry_in_a_folder_nobody_here_can_write(tmp_path)
    (data / "registry.db-wal").write_bytes(b"")  # a writer is at work: its log holds what the file does not yet
    data.chmod(0o555)
    try:
        refused = _as_reader(data, "images", "list", "--json")
        assert refused.returncode == 5, refused.stdout + refused.stderr
        assert "is being written by someone else" in json.loads(refused.stdout)["message"]
    finally:
        data.chmod(0o755)
