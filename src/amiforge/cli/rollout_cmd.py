"""amiforge rollout start|status|pause|resume|abort · rollback · incident."""

from __future__ import annotations

import re
import time
from pathlib import Path
from typing import TYPE_CHECKING

import typer
from rich.markup import escape

from amiforge import durations
from amiforge.cli.common import JsonOption, open_registry
from amiforge.cli.output import PhaseProgress, console, emit_json
from amiforge.cli.tables import Col, fit_table
from amiforge.errors import ConfigError
from amiforge.model import ROLLOUT_LIVE, Rollout

if TYPE_CHECKING:
    from amiforge.store.interface import Store
    from amiforge.strategy import Strategy

# The controller (lifecycle.rollout, and with it the providers) and strategies (pydantic, YAML) are imported by the
# commands that drive or start a rollout: `rollout status` only reads the registry.

app = typer.Typer(help="Canary waves with SLO gates and automatic rollback.", no_args_is_help=True)

TargetOption = typer.Option(..., "--target", "-t", help="local:NAME (a local fleet) or aws:REGION/GROUP (an ASG).")


# A bare number of hours for --hours ("24", "0.5").
_NUMBER = re.compile(r"\d+(?:\.\d+)?")


def _strategy(path: Path | None, waves: str | None, bake_time: str | None) -> Strategy:
    from pydantic import ValidationError

    from amiforge.strategy import Strategy, load_strategy

    base = load_strategy(path) if path is not None else Strategy()
    data = base.model_dump(mode="json")
    if waves is not None:
        data["waves"] = [w.strip() for w in waves.split(",") if w.strip()]
    if bake_time is not None:
        data["bake_time"] = bake_time
    try:
        return Strategy.model_validate(data)
    except ValidationError as e:
        problems = "; ".join(f"{'.'.join(map(str, err['loc']))}: {err['msg']}" for err in e.errors())
        raise ConfigError(f"--waves/--bake-time: {problems}", fix="e.g. --waves 1,25%,100% --bake-time 60s") from e


def _report(rollout: Rollout, store: Store, as_json: bool) -> None:
    from amiforge.lifecycle.documents import rollout_report_of

    report = rollout_report_of(store, rollout)
    decisions, replacements = report.decisions, report.replacements
    if as_json:  # the document `GET /api/v1/rollouts/{id}` returns
        emit_json(report)
        return
    done = min(rollout.wave, len(rollout.waves))
    console.print(
        f"rollout #{rollout.id} of {escape(rollout.version_ref)} on {escape(rollout.target)}: "
        f"[bold]{escape(rollout.state)}[/] "
        f"(wave {done}/{len(rollout.waves)}: {', '.join(map(str, rollout.waves))} member(s))"
        + (f", asked to {escape(rollout.requested)}" if rollout.requested else "")
    )
    rows = []
    for d in decisions:
        n = d.numbers
        p95 = n.get("time_to_ready_p95")
        reasons = n.get("reasons")
        why = "; ".join(map(str, reasons)) if isinstance(reasons, list) else ""
        rows.append([
            str(d.wave + 1), escape(d.action), escape(str(n.get("members"))), escape(str(n.get("ready"))),
            escape(str(n.get("failed"))), f"{p95:.1f}s" if isinstance(p95, float) else "-",
            escape(f"{n.get('burn_rate')}×"),
            escape(why) or "gates passed",
        ])  # fmt: skip
    if decisions:
        columns = [Col("wave", justify="right"), Col("action"), Col("members", justify="right", drop=3),
                   Col("ready", justify="right"), Col("failed", justify="right"), Col("ttr p95", drop=2),
                   Col("burn", drop=1), Col("why", wrap=True)]  # fmt: skip
        fit_table(columns, rows, title="decisions")
    for r in replacements:
        console.print(
            f"  {r.kind} w{r.wave + 1}: {r.old_member} ({r.old_version or '?'}) → {r.new_member or '…'} {r.state}",
            markup=False,
        )


@app.command("start")
def start_command(
    target: str = TargetOption,
    version: str | None = typer.Option(None, "--version", help="NAME@N to roll out (signed, verifying)."),
    channel: str | None = typer.Option(None, "--channel", help="IMAGE:CHANNEL: roll out its current version."),
    strategy: Path | None = typer.Option(None, "--strategy", help="Strategy YAML (waves, bake_time, gates, …)."),
    waves: str | None = typer.Option(None, "--waves", help="Override the waves, e.g. 1,25%,100%."),
    bake_time: str | None = typer.Option(None, "--bake-time", help="Override the bake time, e.g. 60s."),
    as_json: bool = JsonOption,
) -> None:
    """Replace the target's members wave by wave; a failed gate rolls back automatically (exit 4)."""
    from amiforge.lifecycle import rollout as controller
    from amiforge.lifecycle.controller import Controls, canonical_target

    target = canonical_target(target)  # a bad target is a usage error, before anything is looked up
    chosen = _strategy(strategy, waves, bake_time)
    settings, store = open_registry()
    from amiforge.lifecycle.views import version_named

    ref = version_named(store, ref=version, channel=channel).ref
    with PhaseProgress(f"rollout {ref} → {target}", 2 * len(chosen.waves), enabled=not as_json) as progress:
        outcome = controller.start(
            target, ref, store=store, settings=settings, strategy=chosen,
            controls=Controls(progress=progress.callback()),
        )  # fmt: skip
    _report(outcome.rollout, store, as_json)


@app.command("status")
def status_command(
    rollout_id: int | None = typer.Argument(None, help="A rollout id; default: every rollout."),
    watch: bool = typer.Option(False, "--watch", help="Follow the rollout (another process drives it) to its end."),
    as_json: bool = JsonOption,
) -> None:
    """One rollout with its decisions and replacements, or the list of rollouts."""
    _, store = open_registry()
    if rollout_id is not None:
        if watch:
            _watch(rollout_id, store, as_json)
        else:
            _report(store.get_rollout(rollout_id), store, as_json)
        return
    rollouts = store.rollouts()
    if as_json:
        emit_json(rollouts)
        return
    columns = [Col("id", whole=True, justify="right"), Col("version", whole=True), Col("target", whole=True),
               Col("state", whole=True), Col("wave", drop=1), Col("started", drop=2)]  # fmt: skip
    fit_table(columns, [
        [str(r.id), escape(r.version_ref), escape(r.target), escape(r.state),
         f"{min(r.wave, len(r.waves))}/{len(r.waves)}", f"{r.started_at:%Y-%m-%d %H:%M}"]
        for r in rollouts
    ], title="rollouts")  # fmt: skip


def _watch(rollout_id: int, store: Store, as_json: bool, *, every: float = 2.0) -> None:
    """Print the rollout each time it changes (a step recorded by its controller), until it is over."""
    seen: tuple[object, ...] = ()
    while True:
        rollout = store.get_rollout(rollout_id)
        now = (rollout.state, rollout.wave, rollout.requested, len(store.decisions(rollout_id)),
               tuple((r.token, r.state) for r in store.replacements(rollout_id)))  # fmt: skip
        over = rollout.state not in ROLLOUT_LIVE
        if now != seen and (not as_json or over):
            _report(rollout, store, as_json)
            seen = now
        if over:
            return
        time.sleep(every)


def _ask(rollout_id: int, what: str, as_json: bool) -> None:
    from amiforge.lifecycle import rollout as controller

    settings, store = open_registry()
    rollout = controller.request(rollout_id, what, store=store, settings=settings)
    _report(rollout, store, as_json)


@app.command("pause")
def pause_command(rollout_id: int = typer.Argument(...), as_json: bool = JsonOption) -> None:
    """Ask a running rollout to stop after its current step; `rollout resume` continues it."""
    _ask(rollout_id, "pause", as_json)


@app.command("abort")
def abort_command(rollout_id: int = typer.Argument(...), as_json: bool = JsonOption) -> None:
    """Stop a rollout where it is (no rollback: `amiforge rollback --target T` undoes it)."""
    _ask(rollout_id, "abort", as_json)


@app.command("resume")
def resume_command(rollout_id: int = typer.Argument(...), as_json: bool = JsonOption) -> None:
    """Continue a paused rollout, or one whose controller died (even kill -9), from the registry."""
    from amiforge.lifecycle import rollout as controller
    from amiforge.lifecycle.controller import Controls

    settings, store = open_registry()
    rollout = store.get_rollout(rollout_id)
    with PhaseProgress(f"rollout #{rollout_id}", 2 * len(rollout.waves), enabled=not as_json) as progress:
        outcome = controller.resume(
            rollout_id, store=store, settings=settings, controls=Controls(progress=progress.callback())
        )
    _report(outcome.rollout, store, as_json)


def rollback_command(
    target: str = TargetOption,
    to: str | None = typer.Option(None, "--to", help="NAME@N; default: what the target ran before its last rollout."),
    as_json: bool = JsonOption,
) -> None:
    """Put the whole target back on the previous version (one wave, through the same gates)."""
    from amiforge.lifecycle import rollout as controller
    from amiforge.lifecycle.controller import Controls

    settings, store = open_registry()
    with PhaseProgress(f"rollback {target}", 2, enabled=not as_json) as progress:
        outcome = controller.rollback(
            target, store=store, settings=settings, to=to, controls=Controls(progress=progress.callback())
        )
    _report(outcome.rollout, store, as_json)


def incident_command(
    ref: str = typer.Argument(..., help="NAME@N or a digest prefix."),
    hours: str = typer.Option("24", "--hours", help="How far back to look, in hours (at most a year)."),
    as_json: bool = JsonOption,
) -> None:
    """Where a version ran lately: its rollouts and members, the timeline, and the commands to undo it."""
    from amiforge.lifecycle import rollout as controller

    _, store = open_registry()
    if not _NUMBER.fullmatch(hours.strip()):
        raise ConfigError(f"--hours {hours!r} is not a number of hours", fix="e.g. --hours 24 or --hours 0.5")
    window = durations.parse_duration(f"{hours.strip()}h", what="--hours")
    found = controller.incident(ref, store=store, hours=window / 3600)
    if as_json:
        emit_json(
            {
                "version": found.version,
                "rollouts": found.rollouts,
                "members": found.members,
                "timeline": [{"at": at, "kind": kind, "detail": detail} for at, kind, detail in found.timeline],
                "rollback": found.rollback_commands,
            }
        )
        return
    console.print(f"{found.version.ref} ({found.version.status}), last {window / 3600:g} h", markup=False)
    for r in found.rollouts:
        console.print(f"  rollout #{r.id} on {r.target}: {r.state}", markup=False)
    members = sorted({m.new_member for m in found.members if m.new_member})
    console.print(f"  members launched: {', '.join(members) or 'none'}", markup=False)
    for at, kind, detail in found.timeline:
        console.print(f"  {at:%Y-%m-%d %H:%M:%S} {kind} {escape(detail)}")
    for command in found.rollback_commands:
        console.print(f"  undo: {command}", markup=False)
