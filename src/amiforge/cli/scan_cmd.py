"""amiforge scan · sbom · vulndb import|status."""

from __future__ import annotations

from datetime import UTC, datetime
from pathlib import Path
from typing import Literal

import typer
from rich.markup import escape

from amiforge.cli.common import JsonOption, open_registry
from amiforge.cli.output import console, emit_json
from amiforge.cli.render import leftover_warnings
from amiforge.cli.tables import Col, fit_table
from amiforge.errors import ConfigError, NotFound

# The lifecycle and the scanners (cyclonedx, detect-secrets, the OSV matcher) are imported by the commands that use
# them, not by every command of this module.

app = typer.Typer(help="The vulnerability database (OSV advisories for Debian).", no_args_is_help=True)

SEVERITY_STYLE = {"critical": "bold red", "high": "red", "medium": "yellow", "low": "cyan"}


def scan_command(
    ref: str = typer.Argument(..., help="NAME@N or a digest prefix."),
    reports: list[Path] = typer.Option([], "--import", help="Also take findings from a Trivy or Grype JSON report."),
    as_json: bool = JsonOption,
) -> None:
    """SBOM, CVEs, secrets and residue of a version, read from its artifact without booting it (exit 4 if the
    findings fail the entry channel's gate)."""
    from amiforge.lifecycle.promote import policy_of
    from amiforge.lifecycle.scan import scan, scan_gate
    from amiforge.lifecycle.views import finding_json

    settings, store = open_registry()
    outcome = scan(ref, store=store, settings=settings, reports=reports)
    findings = outcome.scan.findings
    decision = scan_gate(findings, policy=policy_of(settings), now=datetime.now(UTC))
    reasons = [f"{u.name}: {u.detail}" for u in decision.unmet]
    gate = {"channel": decision.channel, "passed": decision.passed, "reasons": reasons}
    if as_json:
        emit_json(
            {
                "version": outcome.version.ref,
                "digest": outcome.version.digest,
                "packages": len(outcome.scan.packages),
                "sbom_digest": outcome.scan.sbom_digest,
                "vulndb": outcome.scan.vulndb,
                "findings": [finding_json(f) for f in findings],
                "gate": gate,
                "orphaned": outcome.orphaned,
            }
        )
    else:
        console.print(
            f"[bold]{escape(outcome.version.ref)}[/] scanned: {len(outcome.scan.packages)} packages, "
            f"{len(findings)} finding(s); advisories: {escape(outcome.scan.vulndb)}"
        )
        if findings:
            rows = []
            for f in findings:
                style = SEVERITY_STYLE.get(f.severity.value, "white")
                where = f.package or (f"{f.path}:{f.line}" if f.line else f.path) or "-"
                detail = f"{f.installed} → fix {f.fixed or 'none'}" if f.package else (f.redacted or f.title)
                rows.append(
                    [
                        escape(f.kind.value),
                        escape(f.id),
                        f"[{style}]{escape(f.severity.value)}[/]",
                        escape(where),
                        escape(detail[:160]),
                    ]
                )
            columns = [Col("kind"), Col("id", whole=True), Col("severity"), Col("where", whole=True),
                       Col("detail", wrap=True, drop=1)]  # fmt: skip
            fit_table(columns, rows)
        verdict = "[green]passed[/]" if decision.passed else "[red]FAILED[/]"
        console.print(f"scan gate ({escape(decision.channel)}): {verdict}")
        for reason in reasons:
            console.print(f"  - {escape(reason)}")
        leftover_warnings(outcome.orphaned)
    if not decision.passed:
        raise typer.Exit(4)


def sbom_command(
    ref: str = typer.Argument(..., help="NAME@N or a digest prefix."),
    fmt: Literal["cyclonedx", "spdx"] = typer.Option("cyclonedx", "--format", help="cyclonedx (1.6) or spdx (2.3)."),
    output: Path | None = typer.Option(None, "--output", "-o", help="Write to this file instead of stdout."),
    as_json: bool = JsonOption,
) -> None:
    """Write out the SBOM recorded by the version's latest scan (JSON either way)."""
    del as_json
    _, store = open_registry()
    version = store.get_version(ref)
    record = store.latest_scan(version.id)
    if record is None:
        raise NotFound(f"{version.ref} has no SBOM yet", fix=f"amiforge scan {version.ref}")
    text = record.sbom
    if fmt == "spdx":
        from amiforge.scanners.sbom import spdx_sbom

        assert version.digest is not None
        text = spdx_sbom(
            record.packages,
            image_name=version.name,
            image_version=str(version.number),  # the documents name the image NAME@N themselves
            digest=version.digest,
            timestamp=record.scanned_at,
        )
    if output:
        if output.exists() and not output.is_file():
            # A FIFO would block the write until something reads it; a directory cannot be written.
            raise ConfigError(
                f"--output {output} exists and is not a regular file",
                fix="name a new file, or an existing regular file to replace",
            )
        try:
            output.write_text(text)
        except OSError as e:
            raise ConfigError(
                f"cannot write --output {output}: {e.strerror or e}", fix="name a file in a folder you can write to"
            ) from e
        console.print(f"wrote {fmt} SBOM of {version.ref} ({len(record.packages)} packages) to {escape(str(output))}")
    else:
        typer.echo(text)


@app.command("import")
def vulndb_import(
    path: Path = typer.Argument(..., help="A folder of OSV *.json files, one .json, or osv.dev's Debian all.zip."),
    as_json: bool = JsonOption,
) -> None:
    """Load OSV advisories into the registry (every record validated; a re-imported id replaces the old one)."""
    from amiforge.lifecycle.scan import import_vulndb

    settings, store = open_registry()
    result = import_vulndb(path, store=store, actor=settings.actor)
    if as_json:
        emit_json({"import": result, "advisories": store.advisory_count()})
        return
    console.print(
        f"imported {result.count} advisories from {escape(str(path))}; {store.advisory_count()} in the registry"
    )


@app.command("status")
def vulndb_status(as_json: bool = JsonOption) -> None:
    """How many advisories the registry holds and how old the last import is."""
    _, store = open_registry()
    imports = store.vulndb_imports()
    age = (datetime.now(UTC) - imports[-1].imported_at).total_seconds() / 86400 if imports else None
    if as_json:
        emit_json({"advisories": store.advisory_count(), "imports": imports, "age_days": age})
        return
    from amiforge.lifecycle.views import vulndb_label

    console.print(escape(vulndb_label(store)))
    if age is not None:
        console.print(f"last import is {age:.1f} day(s) old")
