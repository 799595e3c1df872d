"""Running `amiforge ARGV…` in-process for CLI tests: exit code plus everything printed (sys.std* and the rich
consoles, which every CLI module imported by name and so are swapped in each of them)."""

from __future__ import annotations

import importlib
import io
import json
import pkgutil
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

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


Cli = Callable[..., Result]


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

    def run(*argv: str) -> Result:
        capsys.readouterr()
        for buf in (out_buf, err_buf):
            buf.seek(0)
            buf.truncate()
        code = app.main(list(argv))
        captured = capsys.readouterr()
        return Result(code, captured.out + out_buf.getvalue(), captured.err + err_buf.getvalue())

    return run
