"""amiforge scan · sbom · vulndb import|status."""

from __future__ import annotations

from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Literal

import typer
from rich.markup import escape

if TYPE_CHECKING:
    from rich.progress import TaskID

from amiforge.cli.common import JsonOption, open_registry
from amiforge.cli.output import console, emit_json
from amiforge.cli.render import leftover_warnings
from amiforge.cli.tables import Col, fit_table
from amiforge.errors import ConfigError

if TYPE_CHECKING:
    from amiforge.model import Finding

# The lifecycle and the scanners (cyclonedx, detect-secrets, the OSV matcher) are imported by the commands that use
# them, not by every command of this module.

app = typer.Typer(
    help="The vulnerability data: osv.dev's Debian advisories, the Debian Security Tracker, CVSS from CVE records.",
    no_args_is_help=True,
)

SEVERITY_STYLE = {"critical": "bold red", "high": "red", "medium": "yellow", "low": "cyan"}


def severity_label(f: Finding) -> str:
    """`high (debian)`: a CVE's severity and where it came from."""
    return f"{f.severity.value} ({f.severity_source})" if f.severity_source else f.severity.value


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
    decision = scan_gate(outcome.scan, policy=policy_of(settings), now=datetime.now(UTC), ref=outcome.version.ref)
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
                minor = " (Debian: minor)" if f.debian is not None and f.debian.minor else ""
                where = f.package or (f"{f.path}:{f.line}" if f.line else f.path) or "-"
                detail = f"{f.installed} → fix {f.fixed or 'none'}" if f.package else (f.redacted or f.title)
                rows.append(
                    [
                        escape(f.kind.value),
                        escape(f.id),
                        f"[{style}]{escape(severity_label(f))}[/]{minor}",
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
    from amiforge.lifecycle.documents import sbom_text  # what GET /api/v1/versions/{ref}/sbom sends

    _, store = open_registry()
    version, text, packages = sbom_text(store, ref, fmt)
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
        console.print(f"wrote {fmt} SBOM of {version.ref} ({packages} packages) to {escape(str(output))}")
    else:
        typer.echo(text)


SourceOption = typer.Option(
    [], "--source", help="osv, debian or cve; repeat for several (default: all three).", show_default=False
)


@app.command("import")
def vulndb_import(
    path: Path = typer.Argument(..., help="Files of the source, as its publisher ships them."),
    source: str = typer.Option(
        "osv",
        "--source",
        help="osv: a folder of OSV *.json, one .json or osv.dev's Debian all.zip (merged: a re-imported id replaces "
        "the old); debian: the Security Tracker's JSON; cve: CVE JSON 5 records (file, folder or .zip) or NVD API "
        "2.0 pages. debian and cve replace their previous data whole.",
    ),
    as_json: bool = JsonOption,
) -> None:
    """Load a source's data from files (every record validated first; its age is the files' modification time)."""
    from amiforge.lifecycle.vulndb import import_files, source_names

    (name,) = source_names([source])
    settings, store = open_registry()
    state, skipped = import_files(name, path, store=store, settings=settings)
    if as_json:
        emit_json({"source": state, "skipped": list(skipped)})
        return
    console.print(f"{name}: {state.count} record(s) from {escape(str(path))} (as of {state.as_of:%Y-%m-%d %H:%M} UTC)")
    _skipped_lines(skipped)


def _skipped_lines(skipped: tuple[str, ...]) -> None:
    if skipped:
        console.print(f"[yellow]{len(skipped)} record(s) skipped[/] (shown with -v):")
        for line in skipped[:5]:
            console.print(f"  - {escape(line)}")


@app.command("update")
def vulndb_update(
    sources: list[str] = SourceOption,
    urls: list[str] = typer.Option(
        [], "--url", metavar="SOURCE=URL", help="Download SOURCE from URL instead (a mirror; file:// too)."
    ),
    offline_bundle: Path | None = typer.Option(
        None, "--offline-bundle", help="Import a bundle made by `vulndb export-bundle` instead of downloading."
    ),
    as_json: bool = JsonOption,
) -> None:
    """Download each source from its publisher (or a mirror), verify it and swap it in whole: a source that fails
    keeps its previous data (exit 3). NVD's API key, if any, comes from AMIFORGE_NVD_API_KEY."""
    from amiforge.lifecycle.vulndb import import_bundle, source_names, update

    chosen = source_names(sources)
    mirrors: dict[str, str] = {}
    for item in urls:
        name, sep, url = item.partition("=")
        if not sep or not url:
            raise ConfigError(f"--url {item!r} is not SOURCE=URL", fix="e.g. --url osv=https://mirror.example/all.zip")
        source_names([name])
        mirrors[name] = url
    settings, store = open_registry()
    if offline_bundle is not None:
        if sources or urls:
            raise ConfigError("--offline-bundle imports every source it carries", fix="drop --source and --url")
        outcomes = import_bundle(offline_bundle, store=store, settings=settings)
    else:
        with _DownloadBars(enabled=not as_json) as bars:
            outcomes = update(chosen, store=store, settings=settings, urls=mirrors, progress=bars.update)
    failed = [o for o in outcomes if o.state is None]
    if as_json:
        emit_json({"sources": outcomes, "failed": [o.name for o in failed]})
    else:
        for o in outcomes:
            if o.state is not None:
                console.print(
                    f"[green]{o.name}[/]: {o.state.count} record(s), as of {o.state.as_of:%Y-%m-%d %H:%M} UTC, "
                    f"from {escape(o.state.origin)}"
                )
                _skipped_lines(o.skipped)
            else:
                console.print(f"[red]{o.name}: update failed[/], the previous data stays: {escape(o.error or '')}")
                if o.fix:
                    console.print(f"  fix: {escape(o.fix)}")
    if failed:
        raise typer.Exit(3)


class _DownloadBars:
    """One rich bar per source on stderr (bytes, or NVD records), off for --json."""

    def __init__(self, *, enabled: bool) -> None:
        from rich.progress import BarColumn, DownloadColumn, Progress, TextColumn, TimeElapsedColumn

        from amiforge.cli.output import err_console

        self.progress = Progress(
            TextColumn("{task.description}"), BarColumn(), DownloadColumn(), TimeElapsedColumn(),
            console=err_console, disable=not enabled,
        )  # fmt: skip
        self.rows: dict[str, TaskID] = {}

    def __enter__(self) -> _DownloadBars:
        self.progress.__enter__()
        return self

    def __exit__(self, *exc: object) -> None:
        self.progress.__exit__(None, None, None)

    def update(self, name: str, done: int, total: int | None) -> None:
        if name not in self.rows:
            self.rows[name] = self.progress.add_task(name, total=total)
        self.progress.update(self.rows[name], completed=done, total=total)


@app.command("export-bundle")
def vulndb_export(
    file: Path = typer.Argument(..., help="The zip to write (replaced if it exists)."),
    as_json: bool = JsonOption,
) -> None:
    """Write every source's data, with its age, into one file for an air-gapped registry
    (`vulndb update --offline-bundle FILE` there)."""
    from amiforge.lifecycle.vulndb import export_bundle

    settings, store = open_registry()
    manifest = export_bundle(file, store=store, settings=settings)
    if as_json:
        emit_json(manifest)
        return
    sources = manifest["sources"]
    assert isinstance(sources, dict)
    console.print(f"wrote {escape(str(file))}: {', '.join(sources) or 'nothing'}")


@app.command("status")
def vulndb_status(as_json: bool = JsonOption) -> None:
    """Each source's data: how many records, where from, and how old (the age the gates judge)."""
    from amiforge.lifecycle.vulndb import status

    _, store = open_registry()
    rows = status(store=store)
    if as_json:
        emit_json(
            {
                "sources": [
                    {"name": r.name, "state": r.state,
                     "age_days": None if r.age_seconds is None else r.age_seconds / 86400}
                    for r in rows
                ],
                "advisories": store.advisory_count(),
            }
        )  # fmt: skip
        return
    table = []
    for r in rows:
        if r.state is None:
            table.append([r.name, "-", "never imported", "amiforge vulndb update --source " + r.name])
            continue
        age = (r.age_seconds or 0) / 86400
        table.append([r.name, str(r.state.count), f"{age:.1f} day(s)", escape(r.state.origin)])
    fit_table([Col("source"), Col("records"), Col("age"), Col("from", wrap=True)], table)


def rescan_command(
    refs: list[str] = typer.Argument(None, help="Versions to rescan too (NAME@N); default: every channel's."),
    channels: list[str] = typer.Option([], "--channel", help="Only the versions current in this channel; repeat."),
    as_json: bool = JsonOption,
) -> None:
    """Re-match channels' versions against today's vulnerability data (no image is read); exit 4 when a channel now
    holds a version its gate refuses.

    Each version's stored packages (its SBOM) are matched again, the new findings recorded, and each channel whose
    gate result changed is reported."""
    from amiforge.lifecycle.rescan import rescan
    from amiforge.lifecycle.views import finding_json

    settings, store = open_registry()
    results = rescan(refs or (), channels, store=store, settings=settings)
    flagged = [(r.version.ref, c) for r in results for c in r.flagged]
    if as_json:
        emit_json(
            {
                "versions": [
                    {
                        "version": r.version.ref,
                        "vulndb": r.scan.vulndb,
                        "new": [finding_json(f) for f in r.new],
                        "gone": [finding_json(f) for f in r.gone],
                        "channels": [
                            {"channel": v.channel, "passed_before": v.before.passed, "passed": v.after.passed,
                             "changed": v.changed, "reasons": [f"{u.name}: {u.detail}" for u in v.after.unmet]}
                            for v in r.channels
                        ],
                    }
                    for r in results
                ],
                "flagged": [{"version": ref, "channel": c} for ref, c in flagged],
            }
        )  # fmt: skip
    else:
        if not results:
            console.print("nothing to rescan: no channel holds a version yet, and none was named")
        for r in results:
            held = ", ".join(v.channel for v in r.channels) or "no channel"
            changes = f"{len(r.new)} new, {len(r.gone)} gone CVE finding(s)"
            console.print(f"[bold]{escape(r.version.ref)}[/] ({escape(held)}): {changes}")
            for f in r.new:
                console.print(f"  + {escape(f.id)} in {escape(f.package or '-')}: {escape(severity_label(f))}")
            for f in r.gone:
                console.print(f"  - {escape(f.id)} in {escape(f.package or '-')}")
            for v in r.channels:
                if v.changed or not v.after.passed:
                    verdict = "[green]passes[/]" if v.after.passed else "[red]FAILS[/]"
                    was = "passed" if v.before.passed else "failed"
                    console.print(f"  gate {escape(v.channel)}: {verdict} now (it {was} before)")
                    for u in v.after.unmet:
                        console.print(f"    - {escape(u.name)}: {escape(u.detail)}")
    if flagged:
        raise typer.Exit(4)
