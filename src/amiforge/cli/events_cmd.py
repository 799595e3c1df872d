"""amiforge events [REF] [--verify]."""

from __future__ import annotations

import json

import typer
from rich.markup import escape

from amiforge.cli.common import JsonOption, open_registry
from amiforge.cli.output import console, emit_json
from amiforge.cli.paging import AllOption, LimitOption, note_more, page_size
from amiforge.cli.tables import Col, fit_table
from amiforge.errors import GateFailed, GateFailure


def events(
    ref: str | None = typer.Argument(None, help="Only events about this version (NAME@N or digest prefix)."),
    verify: bool = typer.Option(False, "--verify", help="Check the hash chain of the whole log (exit 4 if broken)."),
    limit: int | None = LimitOption,
    show_all: bool = AllOption,
    as_json: bool = JsonOption,
) -> None:
    """The audit log, the newest 50 events unless --limit or --all: append-only, each event carrying the hash of the
    one before."""
    size = page_size(limit, show_all)
    _, store = open_registry()
    if verify:
        problems = store.verify_events()
        if problems:
            raise GateFailed(
                "event chain",
                [GateFailure("event log", p) for p in problems],
                fix="the registry was changed outside amiforge; restore it from a backup",
            )
        count = store.count_events()
        if as_json:
            emit_json({"ok": True, "events": count})
        else:
            console.print(f"[green]ok[/]: the chain of {count} event(s) is intact")
        return
    resolved = store.get_version(ref).ref if ref else None
    items = store.events(resolved, limit=size)
    if size is not None and len(items) == size:
        command = "amiforge events" + (f" {resolved}" if resolved else "")
        note_more(len(items), store.count_events(resolved), f"events of {resolved}" if resolved else "events", command)
    if as_json:
        emit_json(items)
        return
    columns = [Col("seq", whole=True, justify="right"), Col("at", drop=1), Col("kind", whole=True),
               Col("ref", whole=True), Col("actor", drop=2), Col("data", wrap=True, drop=3)]  # fmt: skip
    rows = [
        [str(e.seq), f"{e.at:%Y-%m-%d %H:%M:%S}Z", escape(e.kind), escape(e.ref or "-"), escape(e.actor),
         escape(json.dumps(dict(e.data), sort_keys=True, default=str)[:200])]
        for e in items
    ]  # fmt: skip
    fit_table(columns, rows)
