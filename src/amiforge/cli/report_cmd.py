"""amiforge report cost | tags: storage per version priced per GB-month, and what lacks the tags the policy requires."""

from __future__ import annotations

from pathlib import Path

import typer
from rich.markup import escape

from amiforge.cli.common import CHANGES_EXIT, JsonOption, PolicyOption, location_text, open_registry
from amiforge.cli.output import console, emit_json, err_console
from amiforge.cli.tables import Col, fit_table
from amiforge.errors import InfraError
from amiforge.providers.interface import SourceFailure

app = typer.Typer(help="Reports on the registry's images: storage cost, missing tags.", no_args_is_help=True)


def _failed(failures: tuple[SourceFailure, ...]) -> None:
    for f in failures:
        err_console.print(f"[bold red]{escape(f.region)}: {escape(f.source)} could not be read[/] ({escape(f.why)})")
    if failures:
        raise InfraError(f"{len(failures)} region(s) could not be read: the report is incomplete", retryable=True)


@app.command("cost")
def cost(
    policy: Path | None = PolicyOption,
    prices: Path | None = typer.Option(None, "--prices", help="A price table (YAML: currency, default, regions)."),
    as_json: bool = JsonOption,
) -> None:
    """What each version's images store (snapshots on AWS, files locally), priced per GB-month, by image, owner,
    cost center and region."""
    from amiforge.lifecycle.promote import policy_of
    from amiforge.lifecycle.reports import cost_report, reader_for
    from amiforge.policy.reporting import DEFAULT_PRICES, load_prices

    settings, store = open_registry()
    rules = policy_of(settings, policy).tags
    table = load_prices(prices) if prices is not None else DEFAULT_PRICES
    report = cost_report(store, reader_for(settings), table, rules)
    if as_json:
        emit_json(report)
        _failed(report.failures)
        return
    cur = report.currency
    if report.rows:
        fit_table(
            [Col("version", whole=True), Col("region", whole=True), Col("image", whole=True, drop=2),
             Col("GB", justify="right"), Col("owner", drop=1), Col("cost center", drop=1),
             Col(f"{cur}/month", justify="right")],
            [[escape(r.version), escape(r.region), escape(location_text(r.location)),
              f"{r.gb:.2f}" + ("" if r.exact else " ≤"), escape(r.owner), escape(r.cost_center),
              f"{r.monthly:.2f}" + ("" if r.regional_price else " *")] for r in report.rows],
            title="storage cost",
        )  # fmt: skip
    for title, sums in (("by image", report.by_image), ("by owner", report.by_owner),
                        ("by cost center", report.by_cost_center), ("by region", report.by_region)):  # fmt: skip
        if sums:
            console.print(f"{title}: " + ", ".join(f"{escape(k)} {v:.2f}" for k, v in sums.items()))
    console.print(f"total: {report.total:.2f} {cur} per month")
    console.print(f"prices: {escape(table.source or 'the price table given')}; * the table's default price; "
                  "≤ a volume size (EC2 gave no stored size)")  # fmt: skip
    _failed(report.failures)


@app.command("tags")
def tags(policy: Path | None = PolicyOption, as_json: bool = JsonOption) -> None:
    """Versions and image resources (images, snapshots) missing a tag the policy's `tags.required` lists; exit 10
    when there are any."""
    from amiforge.lifecycle.promote import policy_of
    from amiforge.lifecycle.reports import reader_for, tag_report

    settings, store = open_registry()
    rules = policy_of(settings, policy).tags
    report = tag_report(store, reader_for(settings), rules)
    if as_json:
        emit_json(report)
    elif not report.required:
        console.print("the policy requires no tags (tags.required)")
    else:
        if report.rows:
            fit_table(
                [Col("kind"), Col("resource", whole=True), Col("region", whole=True), Col("version", whole=True),
                 Col("missing", wrap=True)],
                [[r.kind, escape(location_text(r.id)), escape(r.region or "-"), escape(r.version),
                  escape(", ".join(r.missing))] for r in report.rows],
                title=f"missing tags (required: {', '.join(report.required)})",
            )  # fmt: skip
        console.print(f"{report.untagged} resource(s) lack a required tag")
    _failed(report.failures)
    if report.rows:
        raise typer.Exit(CHANGES_EXIT)
