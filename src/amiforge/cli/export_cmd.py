"""amiforge export prometheus-rules | alertmanager | grafana."""

from __future__ import annotations

import os
from pathlib import Path

import typer
from rich.markup import escape

from amiforge.cli.common import JsonOption, open_registry
from amiforge.cli.output import console, emit_json, err_console
from amiforge.errors import ConfigError
from amiforge.lifecycle.export import Exported

app = typer.Typer(
    help="Monitoring configuration from the policy's SLOs: Prometheus rules, Alertmanager routing, Grafana dashboards.",
    no_args_is_help=True,
    add_completion=False,
)

OutputOption = typer.Option(None, "--output", "-o", help="Write to this file (default: standard output).")


def _deliver(exported: Exported, output: Path | None, as_json: bool) -> None:
    for note in exported.notes:
        err_console.print(f"[yellow]note[/]: {escape(note)}")
    if as_json and output is None:
        emit_json(exported.document)
        return
    text = exported.yaml()
    if output is None:
        console.out(text, end="", highlight=False)
        return
    _write(output, text)
    if as_json:
        emit_json({"kind": exported.kind, "path": str(output), "notes": list(exported.notes)})
    else:
        err_console.print(f"wrote {escape(str(output))}")


def _write(path: Path, text: str) -> None:
    """Whole or not at all: a reader (Prometheus reloading its rules) never sees half a file."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        partial = path.with_name(f".{path.name}.partial")
        partial.write_text(text)
        os.replace(partial, path)
    except OSError as e:
        raise ConfigError(f"cannot write {path}: {e.strerror or e}", fix="choose a writable --output") from e


@app.command("prometheus-rules")
def prometheus_rules_command(output: Path | None = OutputOption, as_json: bool = JsonOption) -> None:
    """Recording rules and multi-window burn-rate alerts (AmiforgeBootFailureBurnRate, AmiforgeSlowBootBurnRate)
    from the policy's SLOs, for Prometheus's rule_files."""
    from amiforge.lifecycle.export import export_prometheus_rules
    from amiforge.settings import load_settings

    _deliver(export_prometheus_rules(settings=load_settings()), output, as_json)


@app.command("alertmanager")
def alertmanager_command(
    webhook: str | None = typer.Option(None, "--webhook-url", help="Where every receiver sends (a webhook URL)."),
    output: Path | None = OutputOption,
    as_json: bool = JsonOption,
) -> None:
    """Alertmanager routing by image owner (the recipe's owner or team tag), grouped by target and version, pages
    silencing tickets of the same version."""
    from amiforge.lifecycle.export import export_alertmanager

    _, store = open_registry()
    _deliver(export_alertmanager(store=store, webhook=webhook), output, as_json)


@app.command("grafana")
def grafana_command(
    output: Path = typer.Option(..., "--output", "-o", help="The folder to write the dashboards' JSON files into."),
    as_json: bool = JsonOption,
) -> None:
    """Three Grafana dashboards (executive, on-call, debug) with image, version and target variables, reading the
    Prometheus that scrapes `amiforge serve`."""
    from amiforge.lifecycle.export import export_grafana

    written = []
    for name, text in export_grafana().files.items():
        _write(output / name, text + "\n")
        written.append(str(output / name))
    if as_json:
        emit_json({"kind": "grafana", "paths": written})
    else:
        for path in written:
            err_console.print(f"wrote {escape(path)}")
