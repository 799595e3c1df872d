"""amiforge promote · channels · revoke · pipeline run."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING

import typer
from rich.markup import escape

from amiforge.cli.common import JsonOption, open_registry
from amiforge.cli.output import PhaseProgress, console, emit_json
from amiforge.cli.render import generalised_lines, layers_table, leftover_warnings, report_table, version_line
from amiforge.cli.tables import Col, fit_table
from amiforge.errors import ConfigError
from amiforge.lifecycle.views import finding_json, findings_summary
from amiforge.model import check_image_name

if TYPE_CHECKING:
    from amiforge.lifecycle.pipeline import PipelineOutcome

pipeline_app = typer.Typer(help="The whole pipeline in one command.", no_args_is_help=True)


def promote_command(
    ref: str = typer.Argument(..., help="NAME@N or a digest prefix."),
    channel: str = typer.Option(..., "--channel", "-c", help="The channel to move (dev, staging, prod, …)."),
    reason: str = typer.Option("", "--reason", help="Why (kept in the audit log)."),
    as_json: bool = JsonOption,
) -> None:
    """Move a channel to the version if every gate of the policy passes; else exit 4 listing every unmet gate."""
    settings, store = open_registry()
    from amiforge.lifecycle.promote import promote  # the gates and providers load for the commands that move things

    outcome = promote(ref, channel, store=store, settings=settings, reason=reason)
    if as_json:
        emit_json(
            {
                "pointer": outcome.pointer,
                "moved": outcome.moved,
                "waivers_used": [w.describe() for w in outcome.decision.waivers_used],
                "published": list(outcome.published),
            }
        )
        return
    p = outcome.pointer
    if not outcome.moved:
        console.print(f"{p.name}:{p.channel} already points at {p.current}", markup=False)
    else:
        console.print(
            f"[green]promoted[/] {escape(p.current)} to {escape(p.channel)} (previous: {escape(p.previous or '-')})"
        )
    for w in outcome.decision.waivers_used:
        console.print(f"  waiver used: {escape(w.describe())}")
    for record in outcome.published:
        console.print(f"  {_publication(record)}", markup=False)


def _publication(record: Mapping[str, object]) -> str:
    """One line per region: the parameter's new value and what it replaced (the rollback target)."""
    where = f"{record['region']}" + (f" in {record['account']}" if record.get("account") else "")
    line = f"{where}: {record['parameter']} = {record['image_id']} (was {record['previous_image_id'] or '-'}"
    if record.get("launch_template"):
        line += f"; {record['launch_template']} default v{record['launch_template_version']}"
        line += f", was v{record['previous_lt_version'] or '-'}"
    return line + ("" if record.get("changed", True) else "; unchanged") + ")"


def channels_command(
    name: str | None = typer.Option(None, "--name", help="Only this image name."),
    as_json: bool = JsonOption,
) -> None:
    """Each channel's current version and the previous one (the rollback image), with any flags."""
    if name is not None:
        check_image_name(name, what="--name")
    from amiforge.lifecycle.documents import channel_rows

    _, store = open_registry()
    rows = channel_rows(store, name)
    if as_json:  # the document `GET /api/v1/channels` returns
        emit_json(rows)
        return
    if not rows:
        console.print("no channels yet: `amiforge promote REF --channel dev`")
        return
    columns = [
        Col("image", whole=True),
        Col("channel", whole=True),
        Col("current", whole=True),
        Col("previous (rollback)", whole=True, drop=1),
        Col("moved", drop=3),
        Col("by", drop=4),
        Col("flags", wrap=True),
    ]
    fit_table(columns, [
        [escape(p.name), escape(p.channel), escape(p.current), escape(p.previous or "-"),
         f"{p.moved_at:%Y-%m-%d %H:%M}", escape(p.moved_by),
         "[red]" + escape("; ".join(p.flags)) + "[/]" if p.flags else ""]
        for p in rows
    ])  # fmt: skip


def revoke_command(
    ref: str = typer.Argument(..., help="NAME@N or a digest prefix."),
    reason: str = typer.Option(..., "--reason", help="Why (kept in the audit log)."),
    as_json: bool = JsonOption,
) -> None:
    """Revoke a version: never promoted or verified again; channels holding it, and its descendants, are flagged."""
    settings, store = open_registry()
    from amiforge.lifecycle.promote import revoke

    outcome = revoke(ref, store=store, settings=settings, reason=reason)
    if as_json:
        emit_json(
            {
                "version": outcome.version.ref,
                "flagged_channels": outcome.flagged_channels,
                "flagged_versions": outcome.flagged_versions,
            }
        )
        return
    console.print(f"[red]revoked[/] {escape(outcome.version.ref)}: {escape(reason)}")
    for p in outcome.flagged_channels:
        console.print(
            f"  flagged channel {p.name}:{p.channel} (points at {p.current}; previous {p.previous or '-'})",
            markup=False,
        )
    for ref_ in outcome.flagged_versions:
        console.print(f"  flagged descendant {ref_}", markup=False)


def _pipeline(recipe: Path, promote_to: str | None, as_json: bool) -> PipelineOutcome:
    from amiforge.lifecycle.pipeline import run_pipeline
    from amiforge.recipe import load_recipe

    loaded = load_recipe(recipe)
    settings, store = open_registry()
    total = len(loaded.steps) + 7 + (1 if promote_to else 0)
    with PhaseProgress(f"pipeline {loaded.name}", total, enabled=not as_json) as progress:
        outcome = run_pipeline(
            loaded, store=store, settings=settings, promote_to=promote_to, progress=progress.callback()
        )
    scan = outcome.scanned.scan
    if as_json:
        emit_json({
            "version": outcome.scanned.version.ref,
            "digest": outcome.baked.version.digest,
            "layers": outcome.baked.layers,
            "boot_report": outcome.baked.report,
            "generalised": outcome.baked.generalised,
            "orphaned": outcome.baked.orphaned,
            "packages": len(scan.packages),
            "findings": [finding_json(f) for f in scan.findings],
            "signature": {"key_id": outcome.signature.key_id, "statement": outcome.signature.statement_digest},
            "promoted": outcome.promoted.pointer if outcome.promoted else None,
        })  # fmt: skip
        return outcome
    version_line(store.get_version(outcome.scanned.version.ref))
    layers_table(outcome.baked.layers)
    generalised_lines(outcome.baked.generalised)
    if outcome.baked.report:
        report_table(outcome.baked.report)
    leftover_warnings(outcome.baked.orphaned)
    console.print(
        f"scan: {len(scan.packages)} packages, {len(scan.findings)} finding(s) "
        f"({', '.join(f'{k} {v}' for k, v in findings_summary(scan.findings).items()) or 'none'}); "
        f"advisories: {escape(scan.vulndb)}"
    )
    console.print(
        f"signed by {outcome.signature.key_id}; signature verified against the artifact's bytes", markup=False
    )
    if outcome.promoted:
        p = outcome.promoted.pointer
        console.print(
            f"gates for {escape(p.channel)}: [green]all passed[/]; {escape(p.current)} promoted "
            f"(previous: {escape(p.previous or '-')})"
        )
    return outcome


@pipeline_app.command("run")
def pipeline_run(
    recipe: Path = typer.Argument(..., help="Recipe YAML file."),
    promote_to: str | None = typer.Option(None, "--promote", help="Also promote to this channel if its gates pass."),
    as_json: bool = JsonOption,
) -> None:
    """bake → boot-test → scan → sign → promote, stopping (exit 4) at the first gate that fails."""
    _pipeline(recipe, promote_to, as_json)


def _demo_recipe() -> Path:
    here = Path(__file__).resolve()
    for candidate in (Path.cwd() / "examples/web/recipe.yaml", here.parents[3] / "examples/web/recipe.yaml"):
        if candidate.is_file():
            return candidate
    raise ConfigError(
        "cannot find examples/web/recipe.yaml",
        fix="run `amiforge demo` from the amiforge checkout, or pass --recipe PATH",
    )


def demo(
    recipe: Path | None = typer.Option(None, "--recipe", help="Recipe to bake (default: examples/web)."),
    vulndb: Path | None = typer.Option(None, "--vulndb", help="OSV advisories to import first (folder, .json, .zip)."),
    as_json: bool = JsonOption,
) -> None:
    """The main job on the local provider: pipeline run examples/web --promote dev, then a summary."""
    path = recipe or _demo_recipe()
    settings, store = open_registry()
    if vulndb is not None:
        from amiforge.lifecycle.vulndb import import_files

        import_files("osv", vulndb, store=store, settings=settings)
    else:
        from amiforge.lifecycle.vulndb import ensure_data

        for fetched in ensure_data(store=store, settings=settings):
            if fetched.state is None:
                console.print(f"[yellow]{fetched.name}: {escape(fetched.error or '')}[/]")
            else:
                console.print(f"{fetched.name}: {fetched.state.count} record(s) from {escape(fetched.state.origin)}")
    outcome = _pipeline(path, "dev", as_json)
    if as_json:
        return
    version = outcome.scanned.version
    hits = sum(1 for layer in outcome.baked.layers if layer.hit)
    report = outcome.baked.report
    ttr = report.time_to_ready if report and report.time_to_ready is not None else float("nan")
    console.print(
        f"\n[bold]{escape(version.ref)}[/] is in dev: {hits}/{len(outcome.baked.layers)} layers from cache, "
        f"ready in {ttr:.1f}s.\n"
        f"Next: `amiforge images show {escape(version.ref)}`, `amiforge channels`, `amiforge events --verify`, "
        "`amiforge serve` (the web console: open the URL it prints and paste the token it prints); "
        f"edit {escape(str(path.parent / 'files/index.html'))} and run `make demo` again: "
        "only the last layers rebuild."
    )
