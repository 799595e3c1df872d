"""Text renderings of versions, layers and boot reports, shared by bake, test, demo and images show."""

from __future__ import annotations

from collections.abc import Sequence

from rich.markup import escape

from amiforge.cli.output import console, err_console, human_size
from amiforge.cli.tables import Col, fit_table
from amiforge.model import BootReport, ImageVersion, LayerRecord, Leftover, RemovedFile

STATUS_STYLE = {"tested": "green", "built": "cyan", "failed": "red", "baking": "yellow"}


def status(s: str) -> str:
    style = STATUS_STYLE.get(s, "white")
    return f"[{style}]{escape(s)}[/]"


def version_line(v: ImageVersion) -> None:
    digest = f"sha256:{v.digest[:16]}" if v.digest else "-"
    console.print(f"[bold]{escape(v.ref)}[/] {status(v.status)}  {escape(digest)}  {human_size(v.size_bytes)}")


def layers_table(layers: Sequence[LayerRecord]) -> None:
    columns = [
        Col("#", justify="right"),
        Col("layer", wrap=True),
        Col("cache"),
        Col("time", justify="right", drop=2),
        Col("size", justify="right", drop=1),
        Col("key", drop=3),
    ]
    rows = [
        [
            str(layer.index),
            escape(layer.description),
            "[green]hit[/]" if layer.hit else "[yellow]miss[/]",
            f"{layer.seconds:.1f}s",
            human_size(layer.size_bytes),
            escape(layer.key[:12]),
        ]
        for layer in layers
    ]
    fit_table(columns, rows, title="layers")


def report_table(report: BootReport) -> None:
    ready = f"{report.time_to_ready:.1f}s" if report.time_to_ready is not None else "never"
    verdict = "[green]passed[/]" if report.passed else "[red]FAILED[/]"
    console.print(
        f"boot test {verdict}: time-to-ready {ready} ({escape(report.accel)}), {report.started_at:%Y-%m-%d %H:%M:%S}Z"
    )
    rows = [
        [escape(c.name), "[green]pass[/]" if c.passed else "[red]FAIL[/]", escape(c.detail[:240])]
        for c in report.checks
    ]
    fit_table([Col("check", wrap=True), Col("result"), Col("detail", wrap=True)], rows)


def generalised_lines(removed: Sequence[RemovedFile]) -> None:
    """What generalisation deleted that a step had written: the author learns their recipe handled a credential."""
    if not removed:
        return
    console.print(f"[yellow]generalisation removed {len(removed)} file(s) a step left in the image[/] (not shipped):")
    for r in removed:
        console.print(f"  {escape(r.kind)}: {escape(r.path)}")


def leftover_warnings(leftovers: Sequence[Leftover]) -> None:
    """Failed cleanups, never silent: each with where it is and the command that removes it (on stderr)."""
    for leftover in leftovers:
        err_console.print(f"[bold yellow]warning:[/] {escape(leftover.describe())}", soft_wrap=True)
