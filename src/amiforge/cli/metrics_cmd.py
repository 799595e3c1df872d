"""amiforge metrics [--version REF] [--target T] [--window 24h] [--json]."""

from __future__ import annotations

from datetime import timedelta

import typer
from rich.markup import escape

from amiforge.cli.common import JsonOption, open_registry
from amiforge.cli.output import console, emit_json
from amiforge.cli.tables import Col, fit_table
from amiforge.durations import format_duration, parse_duration
from amiforge.lifecycle.metrics import metrics
from amiforge.lifecycle.slis import Quantiles, SloStatus, TargetSlis


def metrics_command(
    version: str | None = typer.Option(None, "--version", help="Only this version (NAME@N or digest prefix)."),
    target: str | None = typer.Option(
        None, "--target", help="Only this target: boot-test, local:NAME or aws:REGION/GROUP."
    ),
    window: str = typer.Option("24h", "--window", help="The window the SLIs cover (e.g. 1h, 24h, 7d)."),
    no_collect: bool = typer.Option(
        False, "--no-collect", help="Do not read the fleets first: only what the registry holds already."
    ),
    as_json: bool = JsonOption,
) -> None:
    """M1–M6 per version and target (boot success, time to ready, replacements, agent coverage, open CVEs, rollback
    rate) with each SLO's error budget left.

    The SLIs cover --window (24 h by default); each SLO is judged over its own window (the policy's slos:)."""
    seconds = parse_duration(window, what="--window")
    settings, store = open_registry()
    report = metrics(
        store=store, settings=settings, ref=version, target=target, window=timedelta(seconds=seconds),
        read_fleets=not no_collect,
    )  # fmt: skip
    if as_json:
        emit_json(report)
        return
    for collected in report.collected:
        if collected.error:
            console.print(f"[yellow]warn[/]: {escape(collected.target)} was not read: {escape(collected.error)}")
    span = format_duration(report.window_seconds)
    if not report.targets:
        console.print(f"no boots in the last {span}" + (f" of {escape(version)}" if version else ""))
    else:
        console.print(f"[bold]M1–M4[/] over the last {span} (SLOs over their own windows)")
        fit_table(_columns(), [_row(t) for t in report.targets])
    if report.vulnerabilities:
        console.print("[bold]M5[/] open CVEs (latest scan) and × instances running")
        columns = [Col("version", whole=True), Col("critical", justify="right"), Col("high", justify="right"),
                   Col("medium", justify="right"), Col("low", justify="right"), Col("unknown", justify="right", drop=1),
                   Col("running", justify="right"), Col("fleet-weighted", justify="right", drop=2)]  # fmt: skip
        rows = []
        for v in report.vulnerabilities:
            counts = v.by_severity
            weighted = sum(v.fleet_weighted.values())
            rows.append([escape(v.version), *(str(counts.get(s, 0)) for s in ("critical", "high", "medium", "low",
                         "unknown")), str(v.running), str(weighted)] if v.scanned else
                        [escape(v.version), "-", "-", "-", "-", "-", str(v.running), "not scanned"])  # fmt: skip
        fit_table(columns, rows)
    if report.rollouts:
        console.print(f"[bold]M6[/] rollouts ended in the last {span}")
        columns = [
            Col("image", whole=True),
            Col("target", whole=True),
            Col("ended", justify="right"),
            Col("rolled back", justify="right"),
            Col("aborted", justify="right"),
            Col("rate", justify="right"),
        ]
        rows = [[escape(r.image), escape(r.target), str(r.ended), str(r.rolled_back), str(r.aborted),
                 _percent(r.rollback_rate)] for r in report.rollouts]  # fmt: skip
        fit_table(columns, rows)


def _columns() -> list[Col]:
    return [
        Col("version", whole=True),
        Col("target", whole=True),
        Col("M1 boots ok", justify="right"),
        Col("M2 p50/p95/p99", justify="right"),
        Col("M3 repl/1k days", justify="right", drop=2),
        Col("M4 coverage", justify="right", drop=1),
        Col("SLOs (budget left)", wrap=True),
    ]


def _row(t: TargetSlis) -> list[str]:
    m1 = f"{_percent(t.boot_success)} of {t.launches}" if t.launches else "-"
    m3 = "-" if t.replacements_per_1000_days is None else f"{t.replacements_per_1000_days:.1f} ({t.replacements})"
    m4 = "-" if not t.running else f"{t.heartbeating}/{t.running}" if t.heartbeating is not None else "not reported"
    return [escape(t.version), escape(t.target), m1, _quantiles(t.time_to_ready), m3, m4,
            "; ".join(_slo(s) for s in t.slos)]  # fmt: skip


def _percent(value: float | None) -> str:
    return "-" if value is None else f"{value * 100:.2f}%"


def _quantiles(q: Quantiles) -> str:
    if q.p50 is None:
        return "-"
    return "/".join(f"{v:.1f}s" if v is not None else "-" for v in (q.p50, q.p95, q.p99))


def _slo(s: SloStatus) -> str:
    what = "boot success" if s.slo == "boot_success" else f"ready ≤ {s.threshold_seconds:g}s"
    if s.budget_left is None:
        return f"{what} {s.objective:g}%: no launches"
    colour = "green" if s.budget_left >= 0.25 else "yellow" if s.budget_left >= 0 else "red"
    return f"{what} {s.objective:g}%: {_percent(s.sli)}, [{colour}]{s.budget_left * 100:.0f}% left[/]"
