"""Tables fit an 80-column terminal, and never cut what a user types next (refs, channel names, versions, ids):
the less useful columns are dropped first, and the output says which."""

from __future__ import annotations

import os
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path

import pytest

from amiforge.cli import tables
from amiforge.cli.tables import Col, fit_table
from amiforge.model import Artifact, BootReport, CheckResult, LayerRecord, Status
from amiforge.settings import load_settings
from amiforge.store.sql import open_store
from tests.cli_harness import Cli, make_cli

# As long as real names get: the ref the issue saw cut to "accept-secr…".
NAME = "accept-secrets-scanner"
OTHER = "payments-gateway-frontend-canary"
DIGEST = "0123456789abcdef" * 4


def _lines(text: str) -> list[str]:
    return [line for line in text.splitlines() if line.strip()]


def _render(monkeypatch: pytest.MonkeyPatch, width: int, columns: list[Col], rows: list[list[str]]) -> str:
    from rich.console import Console

    out = Console(width=width, color_system=None, record=True)
    monkeypatch.setattr(tables, "console", out)
    fit_table(columns, rows)
    text = out.export_text()
    assert all(len(line) <= width for line in text.splitlines())
    return text


def test_fit_table_leaves_columns_out_by_rank_before_cutting_any(monkeypatch: pytest.MonkeyPatch) -> None:
    columns = [Col("ref", whole=True), Col("a", drop=1), Col("b", drop=2), Col("note", wrap=True)]
    ref = "a-rather-long-image-name@123"
    row = [ref, "x" * 20, "y" * 20, "z " * 5]
    text = _render(monkeypatch, 70, columns, [row])
    assert ref in text and "x" * 20 in text and "y" * 20 not in text  # b (rank 2) went first, a stayed whole
    assert "not shown at this width: b" in text
    text = _render(monkeypatch, 50, columns, [row])
    assert ref in text and "x" * 20 not in text and "not shown at this width: a, b" in text
    # A long note with nothing left to drop wraps; the ref stays whole.
    text = _render(monkeypatch, 50, columns, [[ref, "x", "y", "z " * 40]])
    assert ref in text and text.count("z") == 40


@pytest.fixture(params=[60, 80, 90, 92, 100, 120, 160], ids=lambda w: f"{w}cols")
def narrow(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], request: pytest.FixtureRequest
) -> Iterator[Cli]:
    for key in list(os.environ):
        if key.startswith("AMIFORGE_"):
            monkeypatch.delenv(key)
    monkeypatch.setenv("AMIFORGE_DATA_DIR", str(tmp_path / "data"))
    monkeypatch.setenv("AMIFORGE_ACTOR", "release-engineering-bot@build-host-0042.example.internal")
    monkeypatch.chdir(tmp_path)
    (tmp_path / "tmp").mkdir()
    monkeypatch.setenv("TMPDIR", str(tmp_path / "tmp"))  # `gc` plans against this, never the machine's /tmp
    monkeypatch.setattr("tempfile.tempdir", None)
    with open_store(load_settings().registry_url) as store:
        for name in (NAME, NAME, OTHER):
            parent = store.latest(name, [Status.BUILT, Status.TESTED])
            v = store.create_version(
                name=name, recipe_digest="a" * 64, recipe_path=f"/srv/recipes/{name}/recipe.yaml",
                provider="local", tags={}, parent=parent.ref if parent else None, recipe="{}",
            )  # fmt: skip
            store.transition(v.id, Status.BUILT, expect=Status.BAKING, digest=DIGEST, size_bytes=700 << 20)
            store.add_artifact(v.id, Artifact("local", "local", f"/d/{v.number}.qcow2", DIGEST, 700 << 20))
            store.record_layers(v.id, [LayerRecord(0, "b" * 64, "base: debian bookworm minbase", True, 0.5, 9)])
            check = CheckResult("command systemctl is-system-running --wait", "command", True, "exit 0: running " * 8)
            store.add_boot_report(v.id, BootReport(9.0, (check,), "", "tcg", datetime(2026, 1, 1, tzinfo=UTC), 9.0))
            store.append_event("bake.built", actor="release-engineering-bot@build-host-0042.example.internal",
                               ref=v.ref, data={"digest": DIGEST, "layers": 1, "phases": {"base": 0.5}})  # fmt: skip
        store.transition(1, Status.TESTED, expect=Status.BUILT)
        store.move_channel(NAME, "production-eu", 1, expect_current=None, actor="someone", reason="TEST")
        store.move_channel(NAME, "production-eu", 2, expect_current=1, actor="someone", reason="TEST")
        store.create_rollout(f"local:{OTHER}-fleet", 3, strategy={}, waves=[1, 3], actor="someone")
    yield make_cli(monkeypatch, capsys, width=request.param)


@pytest.mark.parametrize(
    "argv",
    [
        ("images", "list"),
        ("images", "show", f"{NAME}@2"),
        ("channels",),
        ("events",),
        ("rollout", "status"),
        ("gc",),
    ],
)
def test_every_table_fits_the_terminal_with_refs_whole(narrow: Cli, argv: tuple[str, ...]) -> None:
    width = narrow.width
    r = narrow(*argv)
    if os.environ.get("SHOW_TABLES"):
        print(f"\n$ amiforge {' '.join(argv)}\n{r.out}")
    assert r.code == 0, r.err
    too_wide = [line for line in r.out.splitlines() if len(line) > width]
    assert too_wide == []
    refs = {
        ("images", "list"): [f"{NAME}@1", f"{NAME}@2", f"{OTHER}@1"],
        ("images", "show", f"{NAME}@2"): [f"{NAME}@2", f"{NAME}@1"],
        ("channels",): [NAME, "production-eu", f"{NAME}@2"],
        ("events",): [f"{NAME}@1", f"{NAME}@2", f"{OTHER}@1"],
        ("rollout", "status"): [f"{OTHER}@1", f"local:{OTHER}-fleet"],
        ("gc",): [],
    }[argv]
    for ref in refs:
        assert ref in r.out, f"{ref} is not shown whole:\n{r.out}"


def test_a_narrow_images_list_says_what_it_left_out(narrow: Cli) -> None:
    out = narrow("images", "list").out
    if narrow.width >= 160:
        assert "not shown" not in out
        return
    assert "not shown at this width:" in out and "(--json has every column)" in out
    first = _lines(out)[0]
    assert "version" in first and "state" in first
