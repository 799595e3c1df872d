"""Running `amiforge ARGV…` in-process for CLI tests: exit code plus everything printed (sys.std* and the rich
consoles, which every CLI module imported by name and so are swapped in each of them)."""

from __future__ import annotations

import importlib
import io
import json
import os
import pkgutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import pytest
from rich.console import Console

import amiforge.cli
from amiforge.cli import app


@dataclass(frozen=True)
class Result:
    code: int
    out: str
    err: str

    def json(self) -> Any:
        return json.loads(self.out)


class Cli(Protocol):
    """`cli("images", "list")` runs `amiforge images list`."""

    width: int  # the terminal's columns, as rich sees them

    def __call__(self, *argv: str) -> Result: ...


@dataclass
class _InProcessCli:
    capsys: pytest.CaptureFixture[str]
    out_buf: io.StringIO
    err_buf: io.StringIO
    width: int

    def __call__(self, *argv: str) -> Result:
        self.capsys.readouterr()
        for buf in (self.out_buf, self.err_buf):
            buf.seek(0)
            buf.truncate()
        code = app.main(list(argv))
        captured = self.capsys.readouterr()
        return Result(code, captured.out + self.out_buf.getvalue(), captured.err + self.err_buf.getvalue())


def make_cli(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], *, width: int = 200) -> Cli:
    """`width`: the terminal's columns, as rich sees them."""
    out_buf, err_buf = io.StringIO(), io.StringIO()
    out_console = Console(file=out_buf, width=width, color_system=None, highlight=False)
    err_console = Console(file=err_buf, width=width, color_system=None, highlight=False)
    for info in pkgutil.iter_modules(amiforge.cli.__path__, "amiforge.cli."):
        module = importlib.import_module(info.name)
        for name, replacement in (("console", out_console), ("err_console", err_console)):
            if hasattr(module, name):
                monkeypatch.setattr(module, name, replacement)
    return _InProcessCli(capsys, out_buf, err_buf, width)


def isolate(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A private data dir and working directory, no AMIFORGE_* or AWS_* from the caller's environment, and any AWS
    call failing at once on loopback (nothing a test runs may reach a network). Returns the data dir."""
    for key in list(os.environ):
        if key.startswith(("AMIFORGE_", "AWS_")):
            monkeypatch.delenv(key)
    data = tmp_path / "data"
    monkeypatch.setenv("AMIFORGE_DATA_DIR", str(data))
    monkeypatch.setenv("AMIFORGE_AWS_MAX_ATTEMPTS", "1")
    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://127.0.0.1:9")
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "TEST-0001")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "TEST-0001")
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
    # A private temporary folder too: gc looks there for what killed runs left, and must never see the machine's.
    (tmp_path / "tmp").mkdir(exist_ok=True)
    monkeypatch.setenv("TMPDIR", str(tmp_path / "tmp"))
    monkeypatch.setattr("tempfile.tempdir", None)  # read TMPDIR again
    monkeypatch.chdir(tmp_path)
    return data
