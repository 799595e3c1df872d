"""amiforge images list|show."""

from __future__ import annotations

from collections import Counter

import typer
from rich.markup import escape

from amiforge.cli.common import JsonOption, open_registry
from amiforge.cli.output import console, emit_json, human_size
from amiforge.cli.paging import AllOption, LimitOption, note_more, page_size
from amiforge.cli.render import generalised_lines, layers_table, report_table, status, version_line
from amiforge.cli.tables import Col, fit_table
from amiforge.model import check_image_name

# The lifecycle modules (providers, scanners) are imported by `show` and `diff`: `list` only reads the registry.

app = typer.Typer(help="Versions in the registry.", no_args_is_help=True)


@app.command("list")
def list_images(
    name: str | None = typer.Option(None, "--name", help="Only versions of this image name."),
    limit: int | None = LimitOption,
    show_all: bool = AllOption,
    as_json: bool = JsonOption,
) -> None:
    """Versions, newest first (the newest 50 unless --limit or --all): state, digest, size, parent."""
    if name is not None:
        check_image_name(name, what="--name")
    size = page_size(limit, show_all)
    _, store = open_registry()
    versions = store.list_versions(name, limit=size, summary=True)
    if size is not None and len(versions) == size:
        command = "amiforge images list" + (f" --name {name}" if name else "")
        note_more(len(versions), store.count_versions(name), f"versions of {name}" if name else "versions", command)
    if as_json:
        emit_json(
            [
                {
                    "ref": v.ref,
                    "name": v.name,
                    "number": v.number,
                    "status": v.status,
                    "digest": v.digest,
                    "size_bytes": v.size_bytes,
                    "parent": v.parent,
                    "recipe_digest": v.recipe_digest,
                    "created_at": v.created_at,
                }
                for v in versions
            ]
        )
        return
    if not versions:
        console.print("no versions yet: `amiforge bake RECIPE` makes one")
        return
    columns = [
        Col("version", whole=True),
        Col("state", whole=True),
        Col("digest", drop=3),
        Col("size", drop=2, justify="right"),
        Col("parent", whole=True, drop=1),
        Col("created", drop=4),
    ]
    rows = [
        [
            escape(v.ref),
            status(v.status),
            escape((v.digest or "-")[:16]),
            human_size(v.size_bytes),
            escape(v.parent or "-"),
            f"{v.created_at:%Y-%m-%d %H:%M:%S}",
        ]
        for v in versions
    ]
    fit_table(columns, rows)


@app.command("show")
def show(
    ref: str = typer.Argument(..., help="NAME@N or a digest prefix."),
    show_console: bool = typer.Option(False, "--console", help="Also print the last boot's console log."),
    show_log: bool = typer.Option(False, "--log", help="Also print the build log."),
    as_json: bool = JsonOption,
) -> None:
    """One version: state, digests, artifacts, layers (hit/miss), boot reports and its events."""
    from amiforge.lifecycle.documents import version_document
    from amiforge.lifecycle.views import findings_summary, generalised_of, leftovers_of

    _, store = open_registry()
    if as_json:  # the document `GET /api/v1/versions/{ref}` returns
        emit_json(version_document(store, ref, console=show_console, log=show_log, events=None))
        return
    v = store.get_version(ref)
    artifacts = store.artifacts(v.id)
    layers = store.layers(v.id)
    reports = store.boot_reports(v.id)
    events = store.events(v.ref)
    scan = store.latest_scan(v.id)
    signatures = store.signatures(v.id)
    held = [p for p in store.channels(v.name) if v.ref in (p.current, p.previous)]
    generalised = generalised_of(events)
    orphaned = leftovers_of(store, events)
    version_line(v)
    console.print(f"  recipe   {v.recipe_path}  (sha256:{v.recipe_digest[:16]})", markup=False)
    console.print(f"  parent   {v.parent or '-'}", markup=False)
    console.print(f"  created  {v.created_at:%Y-%m-%d %H:%M:%S}Z, updated {v.updated_at:%Y-%m-%d %H:%M:%S}Z")
    if v.tags:
        tags = ", ".join(f"{k}={val}" for k, val in sorted(v.tags.items()))
        console.print(f"  tags     {tags}", markup=False)
    for a in artifacts:
        console.print(f"  artifact {a.provider}/{a.region}: {a.location} ({human_size(a.size_bytes)})", markup=False)
    if scan is not None:
        summary = ", ".join(f"{k} {n}" for k, n in findings_summary(scan.findings).items()) or "no findings"
        console.print(
            f"  scan     {scan.scanned_at:%Y-%m-%d %H:%M}Z: {len(scan.packages)} packages, {summary}", markup=False
        )
        rated = Counter(f.severity_source or "unrated" for f in scan.findings if f.kind.value == "cve")
        if rated:
            origins = ", ".join(f"{origin} {n}" for origin, n in sorted(rated.items()))
            console.print(f"           CVE severities from: {origins}; data: {scan.vulndb}", markup=False)
    for s in signatures:
        console.print(f"  signed   {s.signed_at:%Y-%m-%d %H:%M}Z by {s.key_id}", markup=False)
    for p in held:
        role = "current" if p.current == v.ref else "rollback image"
        console.print(f"  channel  {p.channel} ({role})", markup=False)
    if layers:
        layers_table(layers)
    generalised_lines(generalised)
    for leftover, removed in orphaned:
        if removed:
            console.print(f"  [dim]{escape(leftover.describe())} (since removed by gc)[/]")
        else:
            console.print(f"  [yellow]{escape(leftover.describe())}[/]")
    for r in reports:
        report_table(r)
    if show_console and reports:
        console.print("[bold]console of the last boot[/]")
        console.print(reports[-1].console, markup=False, highlight=False)
    if show_log:
        console.print("[bold]build log[/]")
        console.print(v.log, markup=False, highlight=False)
    console.print("[bold]events[/]")
    for e in events:
        console.print(f"  {e.at:%Y-%m-%d %H:%M:%S}Z {e.kind:<14} {e.actor}", markup=False)


@app.command("diff")
def diff_command(
    old: str = typer.Argument(..., help="The older version (NAME@N or digest prefix)."),
    new: str = typer.Argument(..., help="The newer version."),
    as_json: bool = JsonOption,
) -> None:
    """Packages added/removed/up/downgraded, what each upgrade's changelog says it fixed, CVEs fixed and introduced,
    secrets, and size, between two scans."""
    from amiforge.lifecycle.diff import ChangelogState, diff
    from amiforge.lifecycle.views import finding_json

    _, store = open_registry()
    d = diff(old, new, store=store)
    if as_json:
        emit_json(
            {
                "old": d.old.ref,
                "new": d.new.ref,
                "packages": [{**vars(p), "change": p.change} for p in d.packages],
                "upgrades": [
                    {
                        "name": u.name,
                        "arch": u.arch,
                        "source": u.source,
                        "old": u.old,
                        "new": u.new,
                        "changelog": u.changelog.value,
                        "cves": [{"id": c.id, "db": c.db.value} for c in u.cves],
                    }
                    for u in d.upgrades
                ],
                "changelogs_recorded": d.changelogs_recorded,
                "cves_fixed": [finding_json(f) for f in d.cves_fixed],
                "cves_introduced": [finding_json(f) for f in d.cves_introduced],
                "secrets_removed": [finding_json(f) for f in d.secrets_removed],
                "secrets_added": [finding_json(f) for f in d.secrets_added],
                "size_delta": d.size_delta,
            }
        )
        return
    console.print(f"[bold]{escape(d.old.ref)} → {escape(d.new.ref)}[/]")
    for p in d.packages:
        if p.change != "upgraded":  # upgrades are the table below
            console.print(f"  {p.change:<10} {p.name}:{p.arch} {p.old or ''} → {p.new or ''}", markup=False)
    if d.upgrades:
        if not d.changelogs_recorded:
            console.print(
                f"[yellow]the scan of {escape(d.new.ref)} recorded no changelogs[/] (scanned before amiforge read "
                "them, or the image ships no /usr/share/doc): what the upgrades fixed is unknown; "
                f"`amiforge scan {escape(d.new.ref)}` reads them again"
            )
        unread = {
            ChangelogState.MISSING: "[dim]no changelog in the image[/]",
            ChangelogState.NOT_RECORDED: "[dim]not recorded[/]",
        }
        rows = []
        for u in d.upgrades:
            if u.changelog is ChangelogState.READ:
                named = "\n".join(c.id for c in u.cves) or "[dim]none named[/]"
            else:
                named = unread[u.changelog]
            rows.append(
                [
                    escape(f"{u.name}:{u.arch}"),
                    escape(f"{u.old} → {u.new}"),
                    named,
                    "\n".join(c.db.label for c in u.cves),
                ]
            )
        fit_table(
            [Col("upgraded", whole=True), Col("version", whole=True), Col("changelog names", whole=True), Col("db")],
            rows,
            title="what the upgrades fixed, by their changelogs",
        )
    for title, items in (
        ("CVEs fixed", d.cves_fixed),
        ("CVEs introduced", d.cves_introduced),
        ("secrets/residue removed", d.secrets_removed),
        ("secrets/residue added", d.secrets_added),
    ):
        if items:
            console.print(f"{title}:", markup=False)
            for f in items:
                console.print(f"  {f.id} {f.package or f.path or ''} ({f.severity.value})", markup=False)
    if not (d.packages or d.cves_fixed or d.cves_introduced or d.secrets_added or d.secrets_removed):
        console.print("  same packages and findings")
    if d.size_delta is not None:
        console.print(f"size: {'+' if d.size_delta >= 0 else '-'}{human_size(abs(d.size_delta))}")
