"""amiforge drift: the machines that run what they should not; exit 10 when there are any (a CI job can tell)."""

from __future__ import annotations

import typer
from rich.markup import escape

from amiforge.cli.common import CHANGES_EXIT, JsonOption, open_registry
from amiforge.cli.output import console, emit_json, err_console
from amiforge.cli.tables import Col, fit_table
from amiforge.errors import InfraError


def drift_command(
    regions: list[str] = typer.Option([], "--region", help="Only this region (repeat); default: every region."),
    max_behind: int = typer.Option(
        0, "--max-behind", min=0, help="How many versions a machine may lag its channel before it counts as drift."
    ),
    show_all: bool = typer.Option(False, "--all", help="Also list the machines that are in line."),
    as_json: bool = JsonOption,
) -> None:
    """Machines (local guests, EC2 instances, Auto Scaling group members) running a version in no channel, revoked,
    behind its channel, or unknown to the registry (unmanaged), or an image the Allowed AMIs setting would refuse.
    Exit 10 when any machine drifted."""
    from amiforge.lifecycle.drift import drift, lister_for

    settings, store = open_registry()
    report = drift(store, lister_for(settings), local_region=settings.region, regions=regions, max_behind=max_behind)
    if as_json:
        emit_json(report)
    else:
        rows = [
            [escape(r.provider), escape(r.region), escape(r.target or "-"), escape(r.machine),
             escape(r.version or "-"), escape(", ".join(r.channels) or "-"),
             escape("; ".join(r.findings) or "in line")]
            for r in report.rows
            if r.findings or show_all
        ]  # fmt: skip
        if rows:
            fit_table(
                [Col("provider", drop=3), Col("region", whole=True), Col("fleet", whole=True),
                 Col("machine", whole=True), Col("version", whole=True), Col("channels", drop=1),
                 Col("drift", wrap=True)],
                rows,
                title=f"drift at {report.at:%Y-%m-%d %H:%M} UTC",
            )  # fmt: skip
        console.print(f"{report.drifted} of {len(report.rows)} machine(s) drifted")
        for note in report.notes:
            err_console.print(f"note: {escape(note)}")
        for failure in report.failures:
            err_console.print(f"[bold red]{escape(failure.region)}: {escape(failure.source)} could not be read[/] "
                              f"({escape(failure.why)})")  # fmt: skip
    if report.failures:
        raise InfraError(
            f"{len(report.failures)} source(s) could not be read: the report is incomplete",
            retryable=True,
            fix="see the sources above; rerun once they answer",
        )
    if report.drifted:
        raise typer.Exit(CHANGES_EXIT)
