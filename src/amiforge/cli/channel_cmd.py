"""amiforge promote · channels · revoke · pipeline run."""

from __future__ import annotations

from pathlib import Path

import typer
from rich.markup import escape
from rich.table import Table

from amiforge.cli.common import JsonOption, open_registry
from amiforge.cli.output import PhaseProgress, console, emit_json
from amiforge.cli.render import layers_table, report_table, version_line
from amiforge.lifecycle.pipeline import run_pipeline
from amiforge.lifecycle.promote import channel_flags, promote, revoke
from amiforge.recipe import load_recipe

pipeline_app = typer.Typer(help="The whole pipeline in one command.", no_args_is_help=True)


def promote_command(
    ref: str = typer.Argument(..., help="NAME@N or a digest prefix."),
    channel: str = typer.Option(..., "--channel", "-c", help="The channel to move (dev, staging, prod, …)."),
    reason: str = typer.Option("", "--reason", help="Why (kept in the audit log)."),
    as_json: bool = JsonOption,
) -> None:
    """Move a channel to the version if every gate of the policy passes; else exit 4 listing every unmet gate."""
    settings, store = open_registry()
    outcome = promote(ref, channel, store=store, settings=settings, reason=reason)
    if as_json:
        emit_json(
            {
                "pointer": outcome.pointer,
                "moved": outcome.moved,
                "waivers_used": [w.describe() for w in outcome.decision.waivers_used],
            }
        )
        return
    p = outcome.pointer
    if not outcome.moved:
        console.print(f"{p.name}:{p.channel} already points at {p.current}")
        return
    console.print(f"[green]promoted[/] {p.current} to {p.channel} (previous: {p.previous or '-'})")
    for w in outcome.decision.waivers_used:
        console.print(f"  waiver used: {escape(w.describe())}")


def channels_command(
    name: str | None = typer.Option(None, "--name", help="Only this image name."),
    as_json: bool = JsonOption,
) -> None:
    """Each channel's current version and the previous one (the rollback image), with any flags."""
    _, store = open_registry()
    pointers = store.channels(name)
    rows = [(p, channel_flags(p, store)) for p in pointers]
    if as_json:
        emit_json([{**vars(p), "flags": flags} for p, flags in rows])
        return
    if not rows:
        console.print("no channels yet: `amiforge promote REF --channel dev`")
        return
    table = Table(show_edge=False)
    for col in ("image", "channel", "current", "previous (rollback)", "moved", "by", "flags"):
        table.add_column(col)
    for p, flags in rows:
        table.add_row(p.name, p.channel, p.current, p.previous or "-", f"{p.moved_at:%Y-%m-%d %H:%M}", p.moved_by,
                      "[red]" + escape("; ".join(flags)) + "[/]" if flags else "")  # fmt: skip
    console.print(table)


def revoke_command(
    ref: str = typer.Argument(..., help="NAME@N or a digest prefix."),
    reason: str = typer.Option(..., "--reason", help="Why (kept in the audit log)."),
    as_json: bool = JsonOption,
) -> None:
    """Revoke a version: never promoted or verified again; channels holding it, and its descendants, are flagged."""
    settings, store = open_registry()
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
    console.print(f"[red]revoked[/] {outcome.version.ref}: {escape(reason)}")
    for p in outcome.flagged_channels:
        console.print(f"  flagged channel {p.name}:{p.channel} (points at {p.current}; previous {p.previous or '-'})")
    for ref_ in outcome.flagged_versions:
        console.print(f"  flagged descendant {ref_}")


@pipeline_app.command("run")
def pipeline_run(
    recipe: Path = typer.Argument(..., help="Recipe YAML file."),
    promote_to: str | None = typer.Option(None, "--promote", help="Also promote to this channel if its gates pass."),
    as_json: bool = JsonOption,
) -> None:
    """bake → boot-test → scan → sign → promote, stopping (exit 4) at the first gate that fails."""
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
            "packages": len(scan.packages),
            "findings": len(scan.findings),
            "signature": {"key_id": outcome.signature.key_id, "statement": outcome.signature.statement_digest},
            "promoted": outcome.promoted.pointer if outcome.promoted else None,
        })  # fmt: skip
        return
    version_line(store.get_version(outcome.scanned.version.ref))
    layers_table(outcome.baked.layers)
    if outcome.baked.report:
        report_table(outcome.baked.report)
    console.print(f"scan: {len(scan.packages)} packages, {len(scan.findings)} finding(s); {escape(scan.vulndb)}")
    console.print(f"signed by {outcome.signature.key_id}")
    if outcome.promoted:
        p = outcome.promoted.pointer
        console.print(f"[green]promoted[/] {p.current} to {p.channel} (previous: {p.previous or '-'})")
