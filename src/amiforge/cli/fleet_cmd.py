"""amiforge fleet create · list · show · destroy: local fleets of long-running QEMU guests."""

from __future__ import annotations

from collections import Counter
from typing import Any

import typer
from rich.markup import escape

from amiforge.cli.common import JsonOption, open_registry
from amiforge.cli.output import PhaseProgress, console, emit_json, plain
from amiforge.cli.tables import Col, fit_table
from amiforge.lifecycle.fleets import create_fleet, destroy_fleet, fleet_detail, fleets
from amiforge.providers.interface import FleetDetail, MemberDetail
from amiforge.settings import load_settings

app = typer.Typer(
    help="Local fleets: sets of long-running QEMU guests booted from one version (they outlive the command).",
    no_args_is_help=True,
)

STATE_STYLE = {"ready": "green", "launching": "yellow", "failed": "red", "stopped": "dim"}


def _ports(s: MemberDetail) -> str:
    return " ".join(f"{g}→127.0.0.1:{h}" for g, h in sorted(s.ports.items()))


def _member_json(s: MemberDetail) -> dict[str, Any]:
    return {
        **plain(s.member),
        "pid": s.pid,
        "ports": {str(g): h for g, h in sorted(s.ports.items())},
        "console": s.console,
        "replaces": s.replaces,
    }


def _show(fleet: FleetDetail, *, show_all: bool, as_json: bool) -> None:
    statuses = fleet.members
    shown = [s for s in statuses if show_all or s.member.state != "stopped"]
    if as_json:
        emit_json({"name": fleet.name, "created": fleet.created, "members": [_member_json(s) for s in shown]})
        return
    console.print(f"[bold]fleet {escape(fleet.name)}[/] created {fleet.created:%Y-%m-%d %H:%M:%S}Z")
    rows = []
    for s in shown:
        m = s.member
        ttr = f"{m.time_to_ready:.1f}s" if m.time_to_ready is not None else "-"
        style = STATE_STYLE[m.state]
        rows.append([escape(m.id), escape(m.version_ref or "-"), f"[{style}]{m.state}[/]", ttr, _ports(s),
                     escape(m.detail[:240])])  # fmt: skip
    columns = [Col("member", whole=True), Col("version", whole=True), Col("state", whole=True),
               Col("ready in", drop=2), Col("ports", wrap=True, drop=3), Col("detail", wrap=True, drop=1)]  # fmt: skip
    fit_table(columns, rows)
    hidden = len(statuses) - len(shown)
    if hidden:
        console.print(f"{hidden} stopped member(s) not shown: --all shows them")


@app.command("create")
def create(
    name: str = typer.Argument(..., help="Fleet name: lower-case letters, digits and '-'."),
    size: int = typer.Option(..., "--size", "-n", min=1, help="How many guests."),
    channel: str | None = typer.Option(
        None, "--channel", help="Run the current version of a channel, as IMAGE:CHANNEL (e.g. web:dev)."
    ),
    ref: str | None = typer.Option(None, "--version", help="Run this version (NAME@N)."),
    as_json: bool = JsonOption,
) -> None:
    """Boot SIZE guests of a tested/signed version (2 at a time) and wait for each; exit 4 if any is not ready.

    The guests keep running after the command returns; `fleet destroy` stops them."""
    settings, store = open_registry()
    with PhaseProgress(f"fleet {name}", size, enabled=not as_json) as progress:
        outcome = create_fleet(
            name, size, channel=channel, ref=ref, store=store, settings=settings, progress=progress.callback()
        )
    failure = outcome.failure
    if not (as_json and failure):  # with --json a failure is the one document printed
        _show(outcome.fleet, show_all=True, as_json=as_json)
    if failure:
        raise failure


@app.command("list")
def list_command(as_json: bool = JsonOption) -> None:
    """Every fleet, with its members' states (reconciled with the running guests)."""
    rows: list[dict[str, Any]] = []
    for fleet in fleets(settings=load_settings()):
        live = [d.member for d in fleet.members if d.member.state != "stopped"]
        rows.append(
            {
                "name": fleet.name,
                "created": fleet.created,
                "members": len(live),
                "states": dict(Counter(m.state for m in live)),
                "versions": sorted({m.version_ref or "-" for m in live}),
            }
        )
    if as_json:
        emit_json(rows)
        return
    if not rows:
        console.print("no fleets yet: `amiforge fleet create NAME --size N --channel IMAGE:CHANNEL`")
        return
    columns = [Col("fleet", whole=True), Col("members", justify="right"), Col("states", wrap=True),
               Col("versions", wrap=True), Col("created", drop=1)]  # fmt: skip
    fit_table(columns, [
        [escape(r["name"]), str(r["members"]), ", ".join(f"{n} {state}" for state, n in sorted(r["states"].items())),
         escape(", ".join(r["versions"])), f"{r['created']:%Y-%m-%d %H:%M}"]
        for r in rows
    ])  # fmt: skip


@app.command("show")
def show(
    name: str = typer.Argument(..., help="Fleet name."),
    show_all: bool = typer.Option(False, "--all", help="Also the stopped members (replaced, failed replacements)."),
    as_json: bool = JsonOption,
) -> None:
    """The members as they are now: version, state, time-to-ready, forwarded ports, and why one failed."""
    _show(fleet_detail(name, settings=load_settings()), show_all=show_all, as_json=as_json)


@app.command("destroy")
def destroy(name: str = typer.Argument(..., help="Fleet name."), as_json: bool = JsonOption) -> None:
    """Stop every guest of the fleet and remove its files. Safe to repeat."""
    settings, store = open_registry()
    outcome = destroy_fleet(name, store=store, settings=settings)
    existed, stopped = outcome.existed, outcome.stopped
    if as_json:
        emit_json({"fleet": name, "existed": existed, "stopped": stopped})
        return
    if not existed:
        console.print(f"no fleet {escape(name)}: nothing to do")
        return
    console.print(f"destroyed fleet {escape(name)}: stopped {', '.join(stopped) or 'no running guest'}")
