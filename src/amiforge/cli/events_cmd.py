"""amiforge events [REF] [--verify]."""

from __future__ import annotations

import json

import typer

from amiforge.cli.common import JsonOption, open_registry
from amiforge.cli.output import console, emit_json
from amiforge.errors import GateFailed, GateFailure


def events(
    ref: str | None = typer.Argument(None, help="Only events about this version (NAME@N or digest prefix)."),
    verify: bool = typer.Option(False, "--verify", help="Check the hash chain of the whole log (exit 4 if broken)."),
    limit: int | None = typer.Option(None, "--limit", min=1, help="Only the newest N events."),
    as_json: bool = JsonOption,
) -> None:
    """The audit log: append-only, each event carrying the hash of the one before."""
    _, store = open_registry()
    if verify:
        problems = store.verify_events()
        count = len(store.events())
        if problems:
            raise GateFailed(
                "event chain",
                [GateFailure("event log", p) for p in problems],
                fix="the registry was changed outside amiforge; restore it from a backup",
            )
        if as_json:
            emit_json({"ok": True, "events": count})
        else:
            console.print(f"[green]ok[/]: the chain of {count} event(s) is intact")
        return
    resolved = store.get_version(ref).ref if ref else None
    items = store.events(resolved, limit=limit)
    if as_json:
        emit_json(items)
        return
    for e in items:
        data = json.dumps(dict(e.data), sort_keys=True, default=str)
        console.print(
            f"{e.seq:>5} {e.at:%Y-%m-%d %H:%M:%S}Z {e.kind:<14} {e.ref or '-':<10} {e.actor}  {data[:100]}",
            markup=False,
            highlight=False,
        )
