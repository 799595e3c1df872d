"""End-to-end fixtures: the real CLI in a subprocess, a private data dir shared by the session (so the
mmdebstrap base is built once), and checks that nothing was left behind."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.parse
import urllib.request
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


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class Monitoring:
    """`amiforge serve` and a real Prometheus scraping it every second (with a read token), with the exported rules
    loaded; `operate` is the secret of an operate token for the web console."""

    serve_url: str
    prometheus_url: str
    operate: str
    serve_command: list[str]
    serve_env: dict[str, str]
    serve_log: Path
    serve: subprocess.Popen[bytes] | None = None

    def start_serve(self) -> None:
        """Start `amiforge serve` again (after `kill_serve`), and wait until it answers."""
        with self.serve_log.open("ab") as log:
            self.serve = subprocess.Popen(self.serve_command, env=self.serve_env, stdout=subprocess.DEVNULL,
                                          stderr=log, start_new_session=True)  # fmt: skip
        _wait_for(f"{self.serve_url}/healthz", self.serve, "amiforge serve")

    def kill_serve(self) -> None:
        """kill -9 `amiforge serve` and every controller thread in it."""
        assert self.serve is not None
        os.killpg(self.serve.pid, signal.SIGKILL)
        self.serve.wait()

    def query(self, expr: str, *, at: float | None = None) -> list[dict[str, Any]]:
        params = {"query": expr, **({"time": str(at)} if at is not None else {})}
        return self._api("query", params)

    def query_range(self, expr: str, start: float, end: float, step: int = 5) -> list[dict[str, Any]]:
        # Steps counted back from `end`, so the newest samples (what changed a moment ago) are evaluated too.
        first = end - step * ((end - start) // step)
        return self._api("query_range", {"query": expr, "start": str(first), "end": str(end), "step": str(step)})

    def _api(self, what: str, params: dict[str, str]) -> list[dict[str, Any]]:
        url = f"{self.prometheus_url}/api/v1/{what}?{urllib.parse.urlencode(params)}"
        with urllib.request.urlopen(url, timeout=30) as reply:
            body = json.loads(reply.read())
        assert body["status"] == "success", body
        result: list[dict[str, Any]] = body["data"]["result"]
        return result


def _wait_for(url: str, proc: subprocess.Popen[bytes], what: str) -> None:
    deadline = time.monotonic() + 60
    while True:
        try:
            with urllib.request.urlopen(url, timeout=2):
                return
        except OSError:
            assert proc.poll() is None, f"{what} exited with {proc.returncode}"
            assert time.monotonic() < deadline, f"{what} did not answer {url} within 60 s"
            time.sleep(0.2)


def _stop(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


@pytest.fixture
def monitoring(cli: Cli, tmp_path: Path) -> Iterator[Monitoring]:
    prometheus = shutil.which("prometheus")
    if prometheus is None:
        pytest.fail("prometheus is missing: run scripts/bootstrap.sh --test (make test does)")
    serve_port, prom_port = free_port(), free_port()
    rules = tmp_path / "amiforge-rules.yml"
    cli.run("export", "prometheus-rules", "--output", str(rules))
    # Prometheus scrapes with a read token, as a real one would (`authorization` in its scrape config).
    credentials = tmp_path / "prometheus.token"
    credentials.write_text(cli.run("tokens", "create", "prometheus", "--role", "read").stdout.strip())
    credentials.chmod(0o600)
    operate = cli.run("tokens", "create", "browser", "--role", "operate").stdout.strip()
    config = tmp_path / "prometheus.yml"
    config.write_text(
        "global: {scrape_interval: 1s, evaluation_interval: 1s}\n"
        f"rule_files: [{rules}]\n"
        "scrape_configs:\n"
        f"  - job_name: amiforge\n    static_configs: [{{targets: ['127.0.0.1:{serve_port}']}}]\n"
        f"    authorization: {{type: Bearer, credentials_file: {credentials}}}\n"
    )
    command = [
        sys.executable,
        "-m",
        "amiforge",
        "serve",
        "--listen",
        f"127.0.0.1:{serve_port}",
        "--collect-every",
        "2s",
    ]
    watched = Monitoring(f"http://127.0.0.1:{serve_port}", f"http://127.0.0.1:{prom_port}", operate, command,
                         cli.env, tmp_path / "serve.log")  # fmt: skip
    prom = subprocess.Popen(
        [prometheus, f"--config.file={config}", f"--storage.tsdb.path={tmp_path / 'tsdb'}",
         f"--web.listen-address=127.0.0.1:{prom_port}"],
        stdout=subprocess.DEVNULL, stderr=(tmp_path / "prometheus.log").open("wb"), start_new_session=True,
    )  # fmt: skip
    try:
        watched.start_serve()
        _wait_for(f"http://127.0.0.1:{prom_port}/-/ready", prom, "prometheus")
        yield watched
    finally:
        if watched.serve is not None:
            _stop(watched.serve)
        _stop(prom)
