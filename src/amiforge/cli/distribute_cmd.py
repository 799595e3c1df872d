"""amiforge distribute · import packer · gc: the AWS side of the lifecycle."""

from __future__ import annotations

from datetime import timedelta
from pathlib import Path

import typer
from rich.markup import escape

from amiforge import durations
from amiforge.cli.common import JsonOption, open_registry
from amiforge.cli.output import PhaseProgress, console, emit_json, err_console
from amiforge.cli.render import version_line
from amiforge.cli.tables import Col, fit_table
from amiforge.errors import InfraError
from amiforge.lifecycle.adopt import import_packer
from amiforge.lifecycle.boottest import provider_spec_of
from amiforge.lifecycle.distribute import distribute
from amiforge.lifecycle.gc import gc
from amiforge.recipe import AwsProvider as AwsSpec
from amiforge.recipe import load_recipe

import_app = typer.Typer(help="Adopt images baked by other tools.", no_args_is_help=True)


def distribute_command(
    ref: str = typer.Argument(..., help="NAME@N or a digest prefix (a signed aws version)."),
    public: bool = typer.Option(False, "--public", help="Confirm a public share the recipe asks for."),
    as_json: bool = JsonOption,
) -> None:
    """Copy a signed version to the recipe's regions (each under its KMS key) and share it; rerun to resume."""
    settings, store = open_registry()
    spec = provider_spec_of(store.get_version(ref))
    regions = len(spec.distribution.regions) if isinstance(spec, AwsSpec) else 0
    with PhaseProgress(f"distribute {ref}", max(regions, 1), enabled=not as_json) as progress:
        outcome = distribute(ref, store=store, settings=settings, public=public, progress=progress.callback())
    if as_json:
        emit_json(
            {
                "version": outcome.version,
                "source": outcome.source,
                "run": outcome.operation.run_id,
                "copies": [
                    {"artifact": c.artifact, "adopted": c.adopted, "shared_with": list(c.shared_with)}
                    for c in outcome.copies
                ],
            }
        )
        return
    version_line(outcome.version)
    title = f"copies of {outcome.source.location} ({outcome.source.region}), run {outcome.operation.run_id}"
    columns = [Col("region", whole=True), Col("image", whole=True), Col(""), Col("shared with", wrap=True)]
    rows = [
        [
            escape(c.artifact.region),
            escape(c.artifact.location),
            "adopted" if c.adopted else "copied",
            escape(", ".join(c.shared_with)),
        ]
        for c in outcome.copies
    ]
    fit_table(columns, rows, title=title)


@import_app.command("packer")
def import_packer_command(
    manifest: Path = typer.Argument(..., help="The JSON file Packer's manifest post-processor wrote."),
    recipe: Path = typer.Option(..., "--recipe", help="The aws recipe the images belong to (name, checks, …)."),
    build: str | None = typer.Option(None, "--build", help="The build's name in the manifest (default: newest)."),
    as_json: bool = JsonOption,
) -> None:
    """Register AMIs baked by Packer as a `built` version; then test, scan, sign and promote it as usual."""
    loaded = load_recipe(recipe)
    settings, store = open_registry()
    version, created = import_packer(manifest, loaded, store=store, settings=settings, build=build)
    if as_json:
        emit_json({"version": version, "created": created, "artifacts": store.artifacts(version.id)})
        return
    if not created:
        console.print(f"already imported as {version.ref}", markup=False)
    version_line(version)
    for artifact in store.artifacts(version.id):
        console.print(f"  {artifact.region}: {artifact.location}", markup=False)
    console.print(
        f"next: amiforge test {version.ref} && amiforge scan {version.ref} && amiforge sign {version.ref}", markup=False
    )


def gc_command(
    regions: list[str] = typer.Option(
        [],
        "--region",
        help="Region to collect in (repeat): the local region, or an AWS region; default: this machine and every AWS "
        "region the registry knows of.",
    ),
    apply: bool = typer.Option(False, "--apply", help="Remove the orphans (default: only show the plan)."),
    min_age: str = typer.Option("1h", "--min-age", help="Leave resources younger than this (e.g. 30m, 2h)."),
    max_deletions: int = typer.Option(10, "--max", min=0, help="Blast-radius cap: refuse to remove more than this."),
    as_json: bool = JsonOption,
) -> None:
    """Find what finished runs left behind — temporary directories on this machine; on AWS, resources tagged
    amiforge:managed whose run the registry knows is over (never a registered image) — and remove them with --apply.
    Exit 4 when the plan exceeds --max."""
    age = timedelta(seconds=durations.parse_duration(min_age, what="--min-age"))
    settings, store = open_registry()
    outcome = gc(store=store, settings=settings, regions=regions, apply=apply, min_age=age, max_deletions=max_deletions)
    failures = [{"region": region, "error": e.as_dict()} for region, e in outcome.failures]
    if as_json:
        emit_json(
            {"applied": outcome.applied, "plans": outcome.plans, "results": outcome.results, "failures": failures}
        )
        if outcome.failures or any(o.outcome == "failed" for r in outcome.results for o in r.outcomes):
            raise typer.Exit(5)  # as in text: something was not collected
        return
    done = {(r.region, o.orphan.id): o.outcome for r in outcome.results for o in r.outcomes}
    rows = [
        [
            escape(plan.region),
            o.kind,
            escape(o.id),
            escape(o.run_id or "-"),
            escape(o.reason),
            done.get((plan.region, o.id), "planned"),
        ]
        for plan in outcome.plans
        for o in plan.orphans
    ]
    columns = [Col("region", whole=True), Col("kind"), Col("id", whole=True), Col("run", whole=True, drop=2),
               Col("why", wrap=True, drop=1), Col("outcome")]  # fmt: skip
    if rows:
        fit_table(columns, rows, title="gc: plan" if not outcome.applied else "gc: applied")
    else:
        console.print("gc: nothing left behind to collect")
    kept = sum(len(p.kept) for p in outcome.plans)
    console.print(f"{kept} resource(s) kept (registered, in use, too young, or their run is active or unknown)")
    if not outcome.applied and any(p.orphans for p in outcome.plans):
        console.print("nothing was changed: rerun with --apply to remove the orphans above")
    for region, e in outcome.failures:
        err_console.print(f"[bold red]{escape(region)}: not collected:[/] {escape(e.diagnostics())}")
    if outcome.failures:
        raise InfraError(
            f"{len(outcome.failures)} region(s) could not be collected: "
            + ", ".join(region for region, _ in outcome.failures),
            retryable=all(isinstance(e, InfraError) and e.retryable for _, e in outcome.failures),
            fix="the others were; rerun gc once the cause above is fixed",
        )
    failed = [o for r in outcome.results for o in r.outcomes if o.outcome == "failed"]
    if failed:
        raise InfraError(
            f"{len(failed)} orphan(s) could not be removed: " + ", ".join(o.orphan.id for o in failed),
            retryable=True,
            fix="see the outcome column; rerun gc --apply once the cause is fixed",
        )
