"""vulndb: the vulnerability data scans are matched against, from three sources.

- `osv`: osv.dev's Debian advisories (affected ranges, fixed versions) — what matches packages to advisories;
- `debian`: the Debian Security Tracker (status, urgency, fixed version, no-DSA notes per CVE, package, release);
- `cve`: CVSS ratings from CVE records (NVD's API, or CVE JSON 5 records as cve.org publishes them).

`update` downloads a source from its public endpoint (or a mirror, or an offline bundle), verifies it
(feeds/download.py: sizes, checksums the server publishes, the format), and swaps it in whole: the registry replaces
the source's data in one transaction, so a failed update keeps the previous data and says so. Each source records
how old its data is (`VulnDbSource.as_of`); scans record the ages they matched against and the gate refuses data
older than the policy's `max_vulndb_age`.

The files each source came from are kept under DATA_DIR/vulndb/<source>/ so `export_bundle` can carry them to an
air-gapped registry (osv's advisories are exported from the registry itself, which keeps every record whole).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import tempfile
import zipfile
from collections.abc import Callable, Collection, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path, PurePosixPath

from amiforge.errors import AmiforgeError, ConfigError, Problem
from amiforge.feeds import SOURCES, check_url, fetch_source
from amiforge.inputs import MIB, file_sha256, open_input
from amiforge.model import VULN_SOURCES, VulnDbSource, VulnSourceName
from amiforge.scanners.cve_scores import load_cve_scores
from amiforge.scanners.debian_tracker import DEBIAN_RELEASES, load_tracker, verdict
from amiforge.scanners.vulns import load_osv_records, source_packages
from amiforge.settings import Settings
from amiforge.store.interface import Store

logger = logging.getLogger(__name__)

BUNDLE_FORMAT = "amiforge-vulndb-bundle"
BUNDLE_VERSION = 1
_BUNDLE_FIX = "export the bundle again with `amiforge vulndb export-bundle FILE` on a registry that has the data"
MAX_BUNDLE_MEMBER = 2 << 30


@dataclass(frozen=True)
class SourceOutcome:
    """One source of an update: its new state, or why the previous data was kept."""

    name: VulnSourceName
    state: VulnDbSource | None  # None: the update failed and the previous data (if any) stays
    error: str | None = None
    fix: str | None = None
    skipped: tuple[str, ...] = ()  # records left out, with why (e.g. a CVSS vector that does not parse)


def source_names(names: Collection[str]) -> list[VulnSourceName]:
    """The sources asked for (all of them when none), in the canonical order; ConfigError for an unknown one."""
    unknown = sorted(set(names) - set(VULN_SOURCES))
    if unknown:
        raise ConfigError(
            f"unknown vulnerability source(s): {', '.join(unknown)}",
            problems=[Problem(f"unknown source {n!r}", field="--source") for n in unknown],
            fix=f"use one or more of: {', '.join(VULN_SOURCES)}",
        )
    return [n for n in VULN_SOURCES if not names or n in names]


def _fingerprint(path: Path) -> tuple[str, int]:
    """(sha256, size) of a file, or of a folder's files (their relative paths and digests, in order)."""
    if path.is_file():
        return file_sha256(path), path.stat().st_size
    digest = hashlib.sha256()
    size = 0
    for file in sorted(p for p in path.rglob("*") if p.is_file()):
        digest.update(f"{file.relative_to(path).as_posix()}\0{file_sha256(file)}\n".encode())
        size += file.stat().st_size
    return digest.hexdigest(), size


def _mtime(path: Path) -> datetime:
    """The newest modification time under `path`: the best amiforge can say of a file's age."""
    files = [path] if path.is_file() else [p for p in path.rglob("*") if p.is_file()]
    return datetime.fromtimestamp(max((f.stat().st_mtime for f in files), default=path.stat().st_mtime), UTC)


def import_source(
    name: VulnSourceName,
    path: Path,
    *,
    store: Store,
    actor: str,
    origin: str | None = None,
    as_of: datetime | None = None,
    replace_all: bool = True,
) -> tuple[VulnDbSource, tuple[str, ...]]:
    """Validate `path` as source `name`'s data and load it (osv: merged unless `replace_all`; debian and cve are
    always whole datasets, replaced). Returns the source's new state and what was skipped. Nothing changes in the
    registry unless every record validated."""
    if not path.exists():
        raise ConfigError(
            f"no {name} data at {path}",
            problems=[Problem("file or folder not found", file=str(path))],
            fix="give the path of a downloaded file (or `amiforge vulndb update` to download it)",
        )
    sha256, size = _fingerprint(path)
    state = VulnDbSource(name, origin or str(path), as_of or _mtime(path), datetime.now(UTC), sha256, size, 0)
    skipped: tuple[str, ...] = ()
    if name == "osv":
        loaded = load_osv_records(path)
        records = [(a.id, a.modified.isoformat() if a.modified else "", dict(r), source_packages(a)) for a, r in loaded]
        store.import_advisories(state.origin, records, state=state, replace_all=replace_all)
        saved = next(s for s in store.vulndb_sources() if s.name == "osv")
    elif name == "debian":
        # Releases amiforge can name (os-release VERSION_ID -> codename); the tracker also lists sid and the past.
        entries = load_tracker(path, releases=DEBIAN_RELEASES.values())
        saved = store.replace_debian_tracker(((e.package, e.cve, e.release, verdict(e)) for e in entries), state)
    else:
        scores = load_cve_scores(path)
        skipped = tuple(scores.skipped)
        saved = store.replace_cve_scores(((r.cve, r.score) for r in scores.ratings), state)
    store.append_event(
        "vulndb.import",
        actor=actor,
        data={"source": name, "origin": saved.origin, "count": saved.count, "as_of": saved.as_of.isoformat(),
              "sha256": saved.sha256, "skipped": len(skipped)},
    )  # fmt: skip
    logger.info("vulndb %s: %d record(s) from %s (as of %s)", name, saved.count, saved.origin, saved.as_of)
    return saved, skipped


def _keep_files(settings: Settings, name: str, fetched: Sequence[Path]) -> None:
    """Keep the files the source's data came from, for export_bundle: the new set replaces the old one."""
    root = settings.data_dir / "vulndb"
    root.mkdir(parents=True, exist_ok=True)
    incoming = Path(tempfile.mkdtemp(prefix=f".{name}-", dir=root))
    try:
        for file in fetched:
            shutil.copy2(file, incoming / file.name)
        current = root / name
        old = root / f".{name}-old"
        shutil.rmtree(old, ignore_errors=True)
        if current.exists():
            current.rename(old)
        incoming.rename(current)
        shutil.rmtree(old, ignore_errors=True)
    finally:
        shutil.rmtree(incoming, ignore_errors=True)


def update(
    names: Collection[str],
    *,
    store: Store,
    settings: Settings,
    urls: Mapping[str, str] | None = None,
    api_key: str | None = None,
    progress: Callable[[str, int, int | None], None] | None = None,
) -> list[SourceOutcome]:
    """Download each source (all when `names` is empty) and swap it in; a source that fails keeps its previous
    data and the others go on. The caller turns failures into an exit code."""
    chosen = {name: (urls or {}).get(name) or SOURCES[name].default_url for name in source_names(names)}
    for name, url in chosen.items():
        check_url(url, what=SOURCES[name].what)  # a URL that can never work is the caller's mistake: refused first
    outcomes = []
    for name, url in chosen.items():
        root = settings.data_dir / "vulndb"
        root.mkdir(parents=True, exist_ok=True)
        workdir = Path(tempfile.mkdtemp(prefix=f".download-{name}-", dir=root))
        try:
            report = (lambda done, total, n=name: progress(n, done, total)) if progress else None
            fetched = fetch_source(name, url, workdir, api_key=api_key, progress=report)
            path = fetched.files[0] if name != "cve" else workdir
            state, skipped = import_source(name, path, store=store, actor=settings.actor, origin=url,
                                           as_of=fetched.fetched_at, replace_all=True)  # fmt: skip
            _keep_files(settings, name, fetched.files)
            outcomes.append(SourceOutcome(name, state, skipped=skipped))
        except AmiforgeError as e:
            logger.warning("vulndb update %s failed: %s", name, e.message)
            store.append_event("vulndb.update_failed", actor=settings.actor, data={"source": name, "url": url,
                                                                                    "error": e.message})  # fmt: skip
            outcomes.append(SourceOutcome(name, None, e.message, e.fix))
        finally:
            shutil.rmtree(workdir, ignore_errors=True)
    return outcomes


def import_files(
    name: VulnSourceName, path: Path, *, store: Store, settings: Settings
) -> tuple[VulnDbSource, tuple[str, ...]]:
    """`vulndb import --source NAME PATH`: osv merges (a re-imported id replaces the old); debian and cve data
    are whole datasets and replace the previous one. Their age is the files' modification time."""
    state, skipped = import_source(name, path, store=store, actor=settings.actor, replace_all=name != "osv")
    if name != "osv":
        _keep_files(settings, name, [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file()))
    return state, skipped


# --- offline bundles ----------------------------------------------------------------------------------------------


def export_bundle(dest: Path, *, store: Store, settings: Settings) -> dict[str, object]:
    """Write every source the registry holds into one zip an air-gapped registry imports with
    `vulndb update --offline-bundle`; returns the manifest. Each source keeps the age of its data."""
    states = {s.name: s for s in store.vulndb_sources()}
    if not states:
        raise ConfigError("the registry holds no vulnerability data to export", fix="amiforge vulndb update")
    sources: dict[str, object] = {}
    tmp = dest.with_name(f".{dest.name}.{os.getpid()}.tmp")
    try:
        with zipfile.ZipFile(tmp, "w", compression=zipfile.ZIP_DEFLATED) as bundle:
            for name, state in sorted(states.items()):
                files = _bundle_files(name, store, settings)
                if not files:
                    logger.warning("vulndb export: the files of %s are not kept here; it is left out", name)
                    continue
                listed = []
                for arcname, data in files:
                    bundle.writestr(arcname, data)
                    listed.append({"path": arcname, "sha256": hashlib.sha256(data).hexdigest(), "size": len(data)})
                sources[name] = {"origin": state.origin, "as_of": state.as_of.isoformat(), "files": listed}
            manifest = {"format": BUNDLE_FORMAT, "version": BUNDLE_VERSION,
                        "created": datetime.now(UTC).isoformat(), "sources": sources}  # fmt: skip
            bundle.writestr("manifest.json", json.dumps(manifest, indent=2, sort_keys=True))
        tmp.replace(dest)
    finally:
        tmp.unlink(missing_ok=True)
    store.append_event("vulndb.export", actor=settings.actor, data={"file": str(dest), "sources": sorted(sources)})
    return manifest


def _bundle_files(name: str, store: Store, settings: Settings) -> list[tuple[str, bytes]]:
    if name == "osv":
        # The registry keeps every advisory's record as imported: exported whole, as one JSON array.
        records = store.all_advisories()
        return [("osv/advisories.json", json.dumps(records, sort_keys=True).encode())]
    kept = settings.data_dir / "vulndb" / name
    if not kept.is_dir():
        return []
    return [(f"{name}/{f.name}", f.read_bytes()) for f in sorted(kept.iterdir()) if f.is_file()]


def import_bundle(path: Path, *, store: Store, settings: Settings) -> list[SourceOutcome]:
    """`vulndb update --offline-bundle FILE`: verify every file against the bundle's manifest, then swap each
    source in as `update` does, keeping the age the bundle records (when the data left its publisher)."""
    fix = _BUNDLE_FIX
    with tempfile.TemporaryDirectory(prefix="amiforge-bundle-") as tmp:
        try:
            with open_input(path, what="offline bundle", fix=fix) as raw, zipfile.ZipFile(raw) as bundle:
                manifest = _manifest(bundle, path)
                extracted = _extract(bundle, manifest, Path(tmp), path)
        except (zipfile.BadZipFile, zipfile.LargeZipFile, OSError, EOFError) as e:
            raise ConfigError(f"cannot read the offline bundle {path}: {e}", fix=fix) from e
        outcomes = []
        for name, (origin, as_of, files) in extracted.items():
            try:
                where = files[0] if name != "cve" else files[0].parent
                state, skipped = import_source(name, where, store=store, actor=settings.actor,
                                               origin=f"bundle {path.name} (from {origin})", as_of=as_of)  # fmt: skip
                if name != "osv":
                    _keep_files(settings, name, files)
                outcomes.append(SourceOutcome(name, state, skipped=skipped))
            except AmiforgeError as e:
                outcomes.append(SourceOutcome(name, None, e.message, e.fix))
        return outcomes


def _manifest(bundle: zipfile.ZipFile, path: Path) -> Mapping[str, object]:
    try:
        info = bundle.getinfo("manifest.json")
    except KeyError:
        raise ConfigError(
            f"{path} is not an amiforge vulnerability bundle (no manifest.json)", fix=_BUNDLE_FIX
        ) from None
    if info.file_size > MIB:
        raise ConfigError(f"the manifest of {path} is larger than 1 MiB", fix=_BUNDLE_FIX)
    try:
        manifest = json.loads(bundle.read(info))
    except ValueError as e:
        raise ConfigError(f"the manifest of {path} is not JSON: {e}", fix=_BUNDLE_FIX) from None
    if not isinstance(manifest, dict) or manifest.get("format") != BUNDLE_FORMAT:
        raise ConfigError(f"{path} is not an amiforge vulnerability bundle", fix=_BUNDLE_FIX)
    if manifest.get("version") != BUNDLE_VERSION:
        raise ConfigError(
            f"{path} is bundle format version {manifest.get('version')!r}; this amiforge reads {BUNDLE_VERSION}",
            fix="export it with the same amiforge version as this registry's",
        )
    return manifest


def _extract(
    bundle: zipfile.ZipFile, manifest: Mapping[str, object], into: Path, path: Path
) -> dict[VulnSourceName, tuple[str, datetime, list[Path]]]:
    """Every source's files, checked against the manifest (names, sizes, sha256) before any is used."""
    problems: list[Problem] = []
    out: dict[VulnSourceName, tuple[str, datetime, list[Path]]] = {}
    sources = manifest.get("sources")
    if not isinstance(sources, dict):
        raise ConfigError(f"the manifest of {path} lists no sources", fix=_BUNDLE_FIX)
    for name, entry in sources.items():
        where = f"sources.{name}"
        if name not in VULN_SOURCES or not isinstance(entry, dict):
            problems.append(Problem(f"unknown source {name!r}", file=str(path), field=where))
            continue
        try:
            as_of = datetime.fromisoformat(str(entry.get("as_of")))
        except ValueError:
            problems.append(Problem("as_of is not an ISO 8601 time", file=str(path), field=f"{where}.as_of"))
            continue
        files: list[Path] = []
        for i, item in enumerate(entry.get("files") or []):
            member = item.get("path") if isinstance(item, dict) else None
            pure = PurePosixPath(str(member))
            if not isinstance(member, str) or pure.is_absolute() or ".." in pure.parts or pure.parts[:1] != (name,):
                problems.append(Problem(f"bad file name {member!r}", file=str(path), field=f"{where}.files[{i}]"))
                continue
            try:
                info = bundle.getinfo(member)
            except KeyError:
                problems.append(
                    Problem(f"{member} is missing from the bundle", file=str(path), field=f"{where}.files[{i}]")
                )
                continue
            if info.file_size > MAX_BUNDLE_MEMBER or info.file_size != item.get("size"):
                problems.append(Problem(f"{member}: size {info.file_size} is not the manifest's {item.get('size')}",
                                        file=str(path), field=f"{where}.files[{i}].size"))  # fmt: skip
                continue
            target = into / pure
            target.parent.mkdir(parents=True, exist_ok=True)
            digest = hashlib.sha256()
            with bundle.open(info) as src, open(target, "wb") as dst:
                while chunk := src.read(MIB):
                    digest.update(chunk)
                    dst.write(chunk)
            if digest.hexdigest() != item.get("sha256"):
                problems.append(Problem(f"{member}: sha256 does not match the manifest (damaged or altered)",
                                        file=str(path), field=f"{where}.files[{i}].sha256"))  # fmt: skip
                continue
            files.append(target)
        if files:
            out[name] = (str(entry.get("origin") or "?"), as_of, files)
    if problems:
        raise ConfigError(f"the offline bundle {path} does not check out", problems=problems, fix=_BUNDLE_FIX)
    return out


# --- status -------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class SourceStatus:
    name: VulnSourceName
    state: VulnDbSource | None  # None: never imported
    age_seconds: float | None


def status(*, store: Store, now: datetime | None = None) -> list[SourceStatus]:
    states = {s.name: s for s in store.vulndb_sources()}
    now = now or datetime.now(UTC)
    return [
        SourceStatus(n, states.get(n), (now - states[n].as_of).total_seconds() if n in states else None)
        for n in VULN_SOURCES
    ]
