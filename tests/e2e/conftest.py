"""End-to-end fixtures: the real CLI in a subprocess, a private data dir shared by the session (so the
mmdebstrap base is built once), and checks that nothing was left behind."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import require_root, synthetic_osv

REPO = Path(__file__).resolve().parents[2]


@dataclass
class Cli:
    data_dir: Path
    env: dict[str, str]

    def run(self, *args: str, timeout: float = 900, check: int | None = 0) -> subprocess.CompletedProcess[str]:
        proc = subprocess.run(
            [sys.executable, "-m", "amiforge", *args],
            env=self.env,
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
        )
        if check is not None:
            assert proc.returncode == check, f"exit {proc.returncode}\nstdout:\n{proc.stdout}\nstderr:\n{proc.stderr}"
        return proc

    def json(self, *args: str, check: int | None = 0) -> Any:
        return json.loads(self.run(*args, "--json", check=check).stdout)


def _leftovers(data_dir: Path) -> list[str]:
    found = []
    for pid in os.listdir("/proc"):
        if not pid.isdigit():
            continue
        try:
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
        except OSError:
            continue
        if "qemu-system" in cmdline and str(data_dir) in cmdline:
            found.append(f"qemu process {pid}: {cmdline[:120]}")
    mounts = Path("/proc/self/mountinfo").read_text()
    found += [f"mount: {line}" for line in mounts.splitlines() if str(data_dir) in line]
    cache = data_dir / "cache"
    found += [f"temp dir: {p}" for p in cache.glob("**/.tmp-*")]
    found += [f"temp dir: {p}" for p in cache.glob("amiforge-disk-*")]
    return found


@pytest.fixture(scope="session")
def cli(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cli]:
    # Without root: skipped locally, a failure in CI (CI=true). A missing tool fails everywhere.
    require_root("the local provider runs mmdebstrap, chroot and overlay mounts")
    for tool in ("mmdebstrap", "qemu-system-x86_64"):
        if shutil.which(tool) is None:
            pytest.fail(f"{tool} is missing: run scripts/bootstrap.sh --test (make test does)")
    data = tmp_path_factory.mktemp("amiforge-data")
    env = {k: v for k, v in os.environ.items() if not k.startswith("AMIFORGE_")}
    env |= {"AMIFORGE_DATA_DIR": str(data), "TMPDIR": str(tmp_path_factory.mktemp("tmp")), "COLUMNS": "200"}
    cli = Cli(data, env)
    # Gates judge scans only against vulnerability data (without any they fail closed): one synthetic advisory
    # that matches nothing; tests that want real advisories import ../shared/data on top.
    cli.run("vulndb", "import", str(synthetic_osv(tmp_path_factory.mktemp("osv"))))
    yield cli


@pytest.fixture
def no_leftovers(cli: Cli) -> Iterator[None]:
    yield
    assert _leftovers(cli.data_dir) == []
    tmp = Path(cli.env["TMPDIR"])
    assert sorted(p.name for p in tmp.iterdir()) == [], "temporary files left in TMPDIR"


@pytest.fixture
def web_recipe(tmp_path: Path) -> Path:
    """A private copy of examples/web, so a test may edit it."""
    shutil.copytree(REPO / "examples" / "web", tmp_path / "web")
    return tmp_path / "web" / "recipe.yaml"
