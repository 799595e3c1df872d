"""amiforge fleet create · list · show · destroy: local fleets of long-running QEMU guests."""

from __future__ import annotations

from collections import Counter
from typing import Any

import typer
from rich.markup import escape

from amiforge.cli.common import JsonOption, open_registry
from amiforge.cli.output import PhaseProgress, console, emit_json, plain
from amiforge.cli.tables import Col, fit_table
from amiforge.errors import ConfigError, GateFailed, GateFailure, NotFound
from amiforge.lifecycle.boottest import checks_of
from amiforge.model import ImageVersion, Status, require_status
from amiforge.providers.local.fleet import (
    LocalFleet,
    MemberStatus,
    create_fleet,
    destroy_fleet,
    list_fleets,
    open_fleet,
)
from amiforge.settings import load_settings
from amiforge.store.interface import Store

app = typer.Typer(
    help="Local fleets: sets of long-running QEMU guests booted from one version (they outlive the command).",
    no_args_is_help=True,
)

# A fleet runs only versions that passed their boot test; the later states only add gates on top of it.
USABLE = (Status.TESTED, Status.SCANNED, Status.SIGNED)
STATE_STYLE = {"ready": "green", "launching": "yellow", "failed": "red", "stopped": "dim"}


def _unusable_fix(v: ImageVersion) -> str:
    if v.status in (Status.BUILT, Status.FAILED):
        return f"boot-test it first: `amiforge test {v.ref}`"
    if v.status is Status.BAKING:
        return "wait for its bake to finish"
    return f"run another version: `amiforge images list --name {v.name}`"


def _version(store: Store, channel: str | None, ref: str | None) -> ImageVersion:
    """The version to run: `--version NAME@N`, or the current version of `--channel IMAGE:CHANNEL`."""
    if (channel is None) == (ref is None):
        raise ConfigError(
            "pass exactly one of --channel IMAGE:CHANNEL or --version NAME@N", fix="e.g. --channel web:dev"
        )
    if channel is not None:
        image, sep, name = channel.partition(":")
        if not (sep and image and name):
            raise ConfigError(f"--channel {channel!r} is not IMAGE:CHANNEL", fix="e.g. --channel web:dev")
        pointers = store.channels(image, name)
        if not pointers:
            raise NotFound(
                f"image {image!r} has no channel {name!r}",
                fix=f"`amiforge channels` lists them; `amiforge promote {image}@N --channel {name}` makes it",
            )
        ref = pointers[0].current
    assert ref is not None
    version = store.get_version(ref)
    require_status(version, USABLE, doing="run by a fleet", fix=_unusable_fix(version))
    return version


def _ports(s: MemberStatus) -> str:
    return " ".join(f"{g}→127.0.0.1:{h}" for g, h in sorted(s.forwards.items()))


def _member_json(fleet: LocalFleet, s: MemberStatus) -> dict[str, Any]:
    return {
        **plain(s.member),
        "pid": s.pid,
        "ports": {str(g): h for g, h in sorted(s.forwards.items())},
        "console": str(fleet.dir / s.member.id / "console.log"),
        "replaces": s.record.replaces,
    }


def _show(fleet: LocalFleet, statuses: list[MemberStatus], *, show_all: bool, as_json: bool) -> None:
    shown = [s for s in statuses if show_all or s.member.state != "stopped"]
    info = fleet.info()
    if as_json:
        emit_json({"name": info.name, "created": info.created, "members": [_member_json(fleet, s) for s in shown]})
        return
    console.print(f"[bold]fleet {escape(info.name)}[/] created {info.created:%Y-%m-%d %H:%M:%S}Z")
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
    version = _version(store, channel, ref)
    artifacts = [a for a in store.artifacts(version.id) if a.provider == "local"]
    if not artifacts:
        raise NotFound(f"{version.ref} has no local artifact", fix="a local fleet runs versions baked locally")
    with PhaseProgress(f"fleet {name}", size, enabled=not as_json) as progress:
        fleet = create_fleet(
            settings, name, size, artifacts[0], version.ref, checks_of(version), progress=progress.callback()
        )
    statuses = fleet.status()
    failed = [s.member for s in statuses if s.member.state != "ready"]
    store.append_event(
        "fleet.created",
        actor=settings.actor,
        ref=version.ref,
        data={"fleet": name, "members": [s.member.id for s in statuses], "not_ready": [m.id for m in failed]},
    )
    if not (as_json and failed):  # with --json a failure is the one document printed
        _show(fleet, statuses, show_all=True, as_json=as_json)
    if failed:
        raise GateFailed(
            "fleet readiness",
            [GateFailure(m.id, f"{m.state}: {m.detail}") for m in failed],
            fix=f"see each guest's console.log under {fleet.dir}; `amiforge fleet destroy {name}` stops them all",
        )


@app.command("list")
def list_command(as_json: bool = JsonOption) -> None:
    """Every fleet, with its members' states (reconciled with the running guests)."""
    settings = load_settings()
    rows: list[dict[str, Any]] = []
    for name in list_fleets(settings):
        fleet = open_fleet(settings, name)
        members = [s.member for s in fleet.status()]
        live = [m for m in members if m.state != "stopped"]
        rows.append(
            {
                "name": name,
                "created": fleet.info().created,
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
    fleet = open_fleet(load_settings(), name)
    _show(fleet, fleet.status(), show_all=show_all, as_json=as_json)


@app.command("destroy")
def destroy(name: str = typer.Argument(..., help="Fleet name."), as_json: bool = JsonOption) -> None:
    """Stop every guest of the fleet and remove its files. Safe to repeat."""
    settings, store = open_registry()
    existed = name in list_fleets(settings)
    stopped = destroy_fleet(settings, name)
    if existed:
        store.append_event("fleet.destroyed", actor=settings.actor, data={"fleet": name, "stopped": stopped})
    if as_json:
        emit_json({"fleet": name, "existed": existed, "stopped": stopped})
        return
    if not existed:
        console.print(f"no fleet {escape(name)}: nothing to do")
        return
    console.print(f"destroyed fleet {escape(name)}: stopped {', '.join(stopped) or 'no running guest'}")
