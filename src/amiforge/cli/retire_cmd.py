"""amiforge retire [--apply]: the way out of versions no rule keeps and nothing uses; amiforge cache gc.

`retire` prints the plan, like `terraform plan -detailed-exitcode`: exit 0 when there is nothing to do, exit 10
when the plan has changes (so a nightly CI job can tell), 2/3/5 for errors as everywhere. With `--apply` it takes
the steps and exits 0 (5 when a step failed: the next run takes it again).
"""

from __future__ import annotations

from collections import Counter
from pathlib import Path
from typing import TYPE_CHECKING

import typer
from rich.markup import escape

from amiforge.cli.common import CHANGES_EXIT, JsonOption, PolicyOption, location_text, open_registry
from amiforge.cli.output import console, emit_json, err_console
from amiforge.cli.tables import Col, fit_table
from amiforge.errors import InfraError

if TYPE_CHECKING:
    from amiforge.lifecycle.retire import RetireOutcome

retire_app = typer.Typer(invoke_without_command=True)


@retire_app.callback()
def retire_command(
    ctx: typer.Context,
    policy: Path | None = PolicyOption,
    apply: bool = typer.Option(False, "--apply", help="Take the steps (default: only show the plan)."),
    regions: list[str] = typer.Option([], "--region", help="Only this region (repeat); default: every region."),
    images: list[str] = typer.Option([], "--image", help="Only this image's versions (repeat); default: every image."),
    show_all: bool = typer.Option(False, "--all", help="Also list what is kept, and why."),
    as_json: bool = JsonOption,
) -> None:
    """Plan the way out of versions no retention rule keeps and nothing uses — deprecate, then after the grace
    period deregister and delete their snapshots — and take it with --apply. Exit 10 when the plan has changes."""
    if ctx.invoked_subcommand is not None:
        return
    from amiforge.lifecycle import retire
    from amiforge.lifecycle.promote import policy_of

    settings, store = open_registry()
    retention = policy_of(settings, policy).retention
    finder = retire.retirer_for(settings)
    if apply:
        outcome = retire.apply(store, retention, finder, actor=settings.actor, regions=regions, images=images)
    else:
        planned = retire.plan(store, retention, finder, regions=regions, images=images)
        outcome = retire.RetireOutcome(planned, applied=False)
    if as_json:
        emit_json(outcome)
    else:
        _print(outcome, show_all=show_all)
    if outcome.plan.failures:
        sources = ", ".join(f"{f.source} in {f.region}" for f in outcome.plan.failures)
        raise InfraError(
            f"{len(outcome.plan.failures)} reference source(s) could not be read ({sources}): nothing changed in "
            "their region(s)",
            retryable=True,
            fix="see the reasons above; the other regions were planned (and applied, with --apply)",
        )
    if outcome.failed:
        raise InfraError(
            f"{len(outcome.failed)} step(s) failed: "
            + ", ".join(f"{o.step.version} ({o.detail})" for o in outcome.failed),
            retryable=True,
            fix="the other steps were taken; rerun `amiforge retire --apply` once the cause is fixed",
        )
    if not apply and outcome.plan.changes:
        raise typer.Exit(CHANGES_EXIT)


def _print(outcome: RetireOutcome, *, show_all: bool) -> None:
    plan = outcome.plan
    done = {(o.step.artifact_id, o.step.action): o for o in outcome.outcomes}
    rows = []
    for v in plan.versions:
        for s in v.steps:
            if s.action in ("keep", "done") and not show_all:
                continue
            result = done.get((s.artifact_id, s.action))
            rows.append([
                escape(s.version), escape(s.region), escape(location_text(s.location)), s.action,
                escape(s.why), escape(f"{result.outcome}{': ' + result.detail if result.detail else ''}")
                if result else ("planned" if not outcome.applied else "-"),
            ])  # fmt: skip
    title = f"retire: {'applied' if outcome.applied else 'plan'} at {plan.at:%Y-%m-%d %H:%M} UTC"
    columns = [Col("version", whole=True), Col("region", whole=True), Col("image", whole=True), Col("action"),
               Col("why", wrap=True), Col("outcome", drop=1)]  # fmt: skip
    if rows:
        fit_table(columns, rows, title=title)
    counts = Counter(s.action for s in plan.steps())
    console.print(
        f"Plan: {counts['deprecate']} to deprecate, {counts['deregister']} to deregister, "
        f"{counts['delete-snapshots']} to delete snapshots of; {counts['keep']} kept, {counts['wait']} in their "
        f"grace period, {counts['deferred']} deferred (over the cap of {plan.max_deletions}), "
        f"{counts['blocked']} blocked."
    )
    for failure in plan.failures:
        err_console.print(
            f"[bold red]{escape(failure.region)}: {escape(failure.source)} could not be read[/] "
            f"({escape(failure.why)}): nothing changes there"
        )
    for note in plan.notes:
        err_console.print(f"note: {escape(note)}")
    if outcome.applied:
        if outcome.retired:
            console.print("retired: " + ", ".join(escape(r) for r in outcome.retired))
    elif plan.changes:
        console.print("nothing was changed: rerun with --apply to take these steps")
    else:
        console.print("nothing to do")


@retire_app.command("restore")
def restore_command(
    ref: str = typer.Argument(..., help="The version (NAME@N) whose deregistered images come back."),
    as_json: bool = JsonOption,
) -> None:
    """Bring a version's deregistered images back from the Recycle Bin while their snapshots are kept (the policy's
    snapshot_grace): each is deprecated again from now, with a fresh grace period."""
    from amiforge.lifecycle import retire

    settings, store = open_registry()
    restored = retire.restore(store, ref, retire.retirer_for(settings), actor=settings.actor)
    if as_json:
        emit_json(restored)
        return
    for artifact in restored.artifacts:
        console.print(f"restored {escape(location_text(artifact.location))} in {escape(artifact.region)}")
    console.print(f"{escape(restored.version)} is {restored.status} again; `amiforge retire` plans it anew")


@retire_app.command("allowed-criteria")
def allowed_criteria_command(
    regions: list[str] = typer.Option([], "--region", help="Only this region (repeat); default: every region."),
) -> None:
    """Allowed AMIs criteria (JSON, per region) that allow exactly the channels' current and previous versions: for
    `aws ec2 replace-image-criteria-in-allowed-images-settings --image-criteria` in the accounts that run them."""
    from amiforge.lifecycle import retire

    settings, store = open_registry()
    emit_json(retire.allowed_criteria(store, settings, regions=regions))


cache_app = typer.Typer(help="The bake cache on this machine (base file systems, step layers).", no_args_is_help=True)


@cache_app.command("gc")
def cache_gc_command(
    apply: bool = typer.Option(False, "--apply", help="Remove the entries (default: only show the plan)."),
    min_age: str = typer.Option("1h", "--min-age", help="Leave entries younger than this (e.g. 30m, 2h)."),
    as_json: bool = JsonOption,
) -> None:
    """The cache's entries that no kept version (every one but the retired) uses, removed with --apply."""
    from datetime import timedelta

    from amiforge import durations
    from amiforge.cli.output import human_size
    from amiforge.lifecycle.cache import cache_gc

    age = timedelta(seconds=durations.parse_duration(min_age, what="--min-age"))
    settings, store = open_registry()
    outcome = cache_gc(store, settings, apply=apply, min_age=age, actor=settings.actor)
    if as_json:
        emit_json(outcome)
        return
    plan = outcome.plan
    if plan.entries:
        fit_table(
            [Col("folder"), Col("key", whole=True), Col("size", justify="right"), Col("why", wrap=True)],
            [[e.folder, e.key, human_size(e.size_bytes) if e.size_bytes else "-", escape(e.why)] for e in plan.entries],
            title="cache gc: removed" if outcome.applied else "cache gc: plan",
        )
    console.print(
        f"{len(plan.entries)} entr{'y' if len(plan.entries) == 1 else 'ies'} ({human_size(plan.size_bytes)}) "
        f"{'removed' if outcome.applied else 'to remove'}; {plan.kept} kept ({human_size(plan.kept_bytes)})"
    )
    if plan.entries and not outcome.applied:
        console.print("nothing was changed: rerun with --apply to remove them")
