"""amiforge bake · test · demo."""

from __future__ import annotations

from pathlib import Path

import typer

from amiforge.cli.common import JsonOption, open_registry
from amiforge.cli.output import PhaseProgress, emit_json
from amiforge.cli.render import generalised_lines, layers_table, leftover_warnings, report_table, version_line
from amiforge.lifecycle.bake import BakeOutcome
from amiforge.lifecycle.bake import bake as bake_version
from amiforge.lifecycle.boottest import boot_test
from amiforge.recipe import load_recipe

# Phases after the layers: initrd, mkfs, convert (and boot unless --no-test).
DISK_PHASES = 3


def _bake(recipe_file: Path, *, test: bool, as_json: bool) -> BakeOutcome:
    recipe = load_recipe(recipe_file)
    settings, store = open_registry()
    total = 1 + len(recipe.steps) + 1 + DISK_PHASES + (1 if test else 0)
    with PhaseProgress(f"bake {recipe.name}", total, enabled=not as_json) as progress:
        return bake_version(recipe, store=store, settings=settings, test=test, progress=progress.callback())


def _show_outcome(outcome: BakeOutcome, as_json: bool) -> None:
    if as_json:
        emit_json(
            {
                "version": outcome.version,
                "layers": outcome.layers,
                "phases": outcome.phases,
                "boot_report": outcome.report,
                "generalised": outcome.generalised,
                "orphaned": outcome.orphaned,
            }
        )
        return
    version_line(outcome.version)
    layers_table(outcome.layers)
    generalised_lines(outcome.generalised)
    if outcome.report is not None:
        report_table(outcome.report)
    leftover_warnings(outcome.orphaned)


def bake(
    recipe: Path = typer.Argument(..., help="Recipe YAML file."),
    no_test: bool = typer.Option(False, "--no-test", help="Skip the boot test (the version stays `built`)."),
    as_json: bool = JsonOption,
) -> None:
    """Bake NAME@N from a recipe, then boot-test it (exit 4 if a check fails)."""
    _show_outcome(_bake(recipe, test=not no_test, as_json=as_json), as_json)


def test(
    ref: str = typer.Argument(..., help="NAME@N or a digest prefix."),
    as_json: bool = JsonOption,
) -> None:
    """Boot a version again on a fresh overlay and record a new boot report."""
    settings, store = open_registry()
    with PhaseProgress(f"test {ref}", 1, enabled=not as_json) as progress:
        outcome = boot_test(ref, store=store, settings=settings, progress=progress.callback())
    if as_json:
        emit_json({"version": outcome.version, "boot_report": outcome.report, "orphaned": outcome.orphaned})
        return
    version_line(outcome.version)
    report_table(outcome.report)
    leftover_warnings(outcome.orphaned)
