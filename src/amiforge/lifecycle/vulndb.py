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

import contextlib
import fcntl
import hashlib
import json
import logging
import os
import shutil
import tempfile
import zipfile
from collections.abc import Callable, Collection, Iterator, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path, PurePosixPath
from urllib.parse import urlsplit, urlunsplit

from amiforge.errors import AmiforgeError, ConfigError, InfraError, Problem
from amiforge.feeds import SOURCES, check_url, fetch_source
from amiforge.inputs import MIB, file_sha256, open_input
from amiforge.model import VULN_SOURCES, CvssScore, DebianVerdict, VulnDbSource, VulnSourceName
from amiforge.scanners.cve_scores import load_cve_scores
from amiforge.scanners.debian_tracker import load_tracker, verdict
from amiforge.scanners.ratings import RatingMemo
from amiforge.scanners.vulns import (
    Matcher,
    index_ranges,
    load_osv_records,
    parse_osv_records,
    release_ecosystems,
)
from amiforge.settings import Settings
from amiforge.store.interface import Store

logger = logging.getLogger(__name__)

BUNDLE_FORMAT = "amiforge-vulndb-bundle"
BUNDLE_VERSION = 1
_BUNDLE_FIX = "export the bundle again with `amiforge vulndb export-bundle FILE` on a registry that has the data"
MAX_BUNDLE_MEMBER = 2 << 30
# How far ahead of this machine's clock another machine's may be, for the times a bundle states.
CLOCK_SKEW = timedelta(minutes=5)
# Beside the files kept for export: the sha256 the registry recorded for them (a copy of other data is not shipped).
KEPT_STATE = ".imported.json"


# Advisories parsed a transaction at a time when a registry from before 0008 is first scanned.
_PARSE_BATCH = 5_000


class MatchingData:
    """The vulnerability data a scan or a rescan reads from the registry, each part once: the advisories for the
    packages matched (indexed per release), Debian's verdicts per (release, source package) and CVSS ratings per
    CVE, read as versions ask for them and kept for the next, with what was matched and rated already (a rescan's
    versions share most of their packages)."""

    def __init__(self, store: Store) -> None:
        self._store = store
        # Read once: every version a rescan matches is matched against, and labelled with, the same sources.
        self.sources = store.vulndb_sources()
        self._matchers: dict[str, tuple[set[str], Matcher]] = {}  # release -> (the source packages read, …)
        self._verdicts: dict[str, dict[tuple[str, str], DebianVerdict]] = {}  # codename -> (package, CVE) -> …
        self._asked: dict[str, set[str]] = {}  # codename -> the packages read for it
        self._scores: dict[str, list[CvssScore]] = {}
        self._scored: set[str] = set()
        self._ratings: dict[str | None, RatingMemo] = {}  # codename -> ratings made with its verdicts

    def matcher(self, packages: Collection[str], release: str) -> Matcher:
        """A matcher over the advisories naming (at least) these source packages on Debian `release`."""
        kept = self._matchers.get(release)
        if kept is None or not kept[0].issuperset(packages):
            covered = set(packages) | (kept[0] if kept else set())
            parse_stored_advisories(self._store)
            heads, ranges = self._store.advisory_ranges(covered, release_ecosystems(release))
            kept = self._matchers[release] = (covered, Matcher(index_ranges(heads, ranges, release=release)))
        return kept[1]

    def verdicts(self, packages: Collection[str], codename: str) -> Mapping[tuple[str, str], DebianVerdict]:
        """Debian's verdicts on `codename` for (at least) these source packages."""
        asked = self._asked.setdefault(codename, set())
        known = self._verdicts.setdefault(codename, {})
        missing = set(packages) - asked
        if missing:
            known.update(self._store.debian_verdicts(missing, codename))
            asked |= missing
        return known

    def scores(self, cves: Collection[str]) -> Mapping[str, list[CvssScore]]:
        """CVSS ratings of (at least) these CVEs."""
        missing = set(cves) - self._scored
        if missing:
            self._scores.update(self._store.cve_scores(missing))
            self._scored |= missing
        return self._scores

    def ratings(self, codename: str | None) -> RatingMemo:
        """The ratings made so far with `codename`'s verdicts (and the ratings read for them)."""
        return self._ratings.setdefault(codename, RatingMemo())


def parse_stored_advisories(store: Store) -> int:
    """Parse the advisories a registry from before 0008 holds only as raw records, once: what matching reads is
    kept beside them from then on. The number this call stored (0 on every later call: one indexed query)."""
    done = 0
    while batch := store.unparsed_advisories(_PARSE_BATCH):
        if not done:
            logger.info("vulndb: parsing the advisories stored before this version of amiforge (once)")
        # Every record parses or the whole batch is refused (ConfigError naming them: re-import the data).
        parsed = parse_osv_records(record for _, record in batch)
        done += store.store_parsed([a.stored(record, "") for a, (_, record) in zip(parsed, batch, strict=True)])
    return done


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
    """The oldest modification time under `path`: the best amiforge can say of the files' age (data is no fresher
    than its oldest file)."""
    files = [path] if path.is_file() else [p for p in path.rglob("*") if p.is_file()]
    return datetime.fromtimestamp(min((f.stat().st_mtime for f in files), default=path.stat().st_mtime), UTC)


def _public(url: str) -> str:
    """A URL as the registry may keep and show it: no user, password, query or fragment (tokens live there)."""
    parts = urlsplit(url)
    host = parts.hostname or ""
    netloc = f"{host}:{parts.port}" if parts.port else host
    return urlunsplit((parts.scheme, netloc, parts.path, "", ""))


@contextlib.contextmanager
def _locked(settings: Settings) -> Iterator[Path]:
    """DATA_DIR/vulndb, held by this process: one update or import at a time on this machine (two would race on
    the files kept for export and on the registry's replace)."""
    root = settings.data_dir / "vulndb"
    root.mkdir(parents=True, exist_ok=True)
    fd = os.open(root / ".lock", os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        for stale in root.glob(".download-*"):  # what a killed update left: nobody else can be using it now
            shutil.rmtree(stale, ignore_errors=True)
        yield root
    finally:
        os.close(fd)


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
    when = as_of or _mtime(path)
    if name == "osv" and not replace_all:
        # Merged into what is there: the source is as old as the older of the two.
        before = next((s.as_of for s in store.vulndb_sources() if s.name == "osv"), when)
        when = min(before, when)
    state = VulnDbSource(name, origin or str(path), when, datetime.now(UTC), sha256, size, 0)
    skipped: tuple[str, ...] = ()
    if name == "osv":
        loaded = load_osv_records(path)
        records = [a.stored(dict(r), a.modified.isoformat() if a.modified else "") for a, r in loaded]
        store.import_advisories(state.origin, records, state=state, replace_all=replace_all)
        saved = next(s for s in store.vulndb_sources() if s.name == "osv")
    elif name == "debian":
        entries = load_tracker(path)
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


def _keep_files(root: Path, name: str, path: Path, sha256: str) -> None:
    """Keep what source `name` was imported from (one file, or a folder packed into one zip) under root/name, for
    export_bundle, with the sha256 the registry recorded for it; the new copy replaces the old one."""
    incoming = Path(tempfile.mkdtemp(prefix=f".{name}-", dir=root))
    try:
        if path.is_file():
            shutil.copy2(path, incoming / path.name)
        else:
            with zipfile.ZipFile(incoming / f"{name}.zip", "w", compression=zipfile.ZIP_DEFLATED) as packed:
                for file in sorted(p for p in path.rglob("*") if p.is_file()):
                    packed.write(file, file.relative_to(path).as_posix())
        (incoming / KEPT_STATE).write_text(json.dumps({"sha256": sha256}))
        current, old = root / name, root / f".{name}-old"
        shutil.rmtree(old, ignore_errors=True)
        if current.exists():
            current.rename(old)
        incoming.rename(current)
        shutil.rmtree(old, ignore_errors=True)
    except OSError as e:
        # The registry has the new data already; only the copy for export-bundle is missing, and says so there.
        raise InfraError(
            f"{name}: imported, but keeping its files for export-bundle under {root} failed: {e}",
            fix="free space under the data directory, then run the update again",
        ) from e
    finally:
        shutil.rmtree(incoming, ignore_errors=True)


def update(
    names: Collection[str],
    *,
    store: Store,
    settings: Settings,
    urls: Mapping[str, str] | None = None,
    progress: Callable[[str, int, int | None], None] | None = None,
) -> list[SourceOutcome]:
    """Download each source (all when `names` is empty) and swap it in; a source that fails keeps its previous
    data and the others go on. The caller turns failures into an exit code."""
    names = source_names(names)
    extra = sorted(set(urls or {}) - set(names))
    if extra:
        raise ConfigError(
            f"--url names {', '.join(extra)}, which this update does not fetch",
            problems=[Problem(f"{n} is not among the sources updated", field="--url") for n in extra],
            fix="add --source for each, or drop those --url",
        )
    chosen = {name: (urls or {}).get(name) or SOURCES[name].default_url for name in names}
    for name, url in chosen.items():
        check_url(url, what=SOURCES[name].what)  # a URL that can never work is the caller's mistake: refused first
    api_key = settings.nvd_api_key.get_secret_value() if settings.nvd_api_key else None
    outcomes = []
    with _locked(settings) as root:
        for name, url in chosen.items():
            workdir = Path(tempfile.mkdtemp(prefix=f".download-{name}-", dir=root))
            try:
                report = (lambda done, total, n=name: progress(n, done, total)) if progress else None
                fetched = fetch_source(name, url, workdir, api_key=api_key, progress=report)
                path = fetched.files[0] if name != "cve" else workdir
                state, skipped = import_source(name, path, store=store, actor=settings.actor, origin=_public(url),
                                               as_of=fetched.as_of, replace_all=True)  # fmt: skip
                if name != "osv":  # osv is exported from the registry, which keeps every record whole
                    _keep_files(root, name, path, state.sha256)
                outcomes.append(SourceOutcome(name, state, skipped=skipped))
            except AmiforgeError as e:
                logger.warning("vulndb update %s failed: %s", name, e.message)
                store.append_event("vulndb.update_failed", actor=settings.actor,
                                   data={"source": name, "url": _public(url), "error": e.message})  # fmt: skip
                outcomes.append(SourceOutcome(name, None, e.message, e.fix))
            finally:
                shutil.rmtree(workdir, ignore_errors=True)
    return outcomes


def ensure_data(*, store: Store, settings: Settings) -> list[SourceOutcome]:
    """Download osv.dev's advisories and Debian's tracker if the registry has no advisories at all (the demo's
    first run): gates judge scans only against vulnerability data. Returns what was fetched (nothing if any was
    there); a failure is reported, not raised, and the gates then say what is missing."""
    if any(s.name == "osv" for s in store.vulndb_sources()):
        return []
    return update(["osv", "debian"], store=store, settings=settings)


def import_files(
    name: VulnSourceName, path: Path, *, store: Store, settings: Settings
) -> tuple[VulnDbSource, tuple[str, ...]]:
    """`vulndb import --source NAME PATH`: osv merges (a re-imported id replaces the old); debian and cve data
    are whole datasets and replace the previous one. Their age is the files' modification time."""
    with _locked(settings) as root:
        state, skipped = import_source(name, path, store=store, actor=settings.actor, replace_all=name != "osv")
        if name != "osv":
            _keep_files(root, name, path, state.sha256)
    return state, skipped


# --- offline bundles ----------------------------------------------------------------------------------------------


def export_bundle(dest: Path, *, store: Store, settings: Settings) -> dict[str, object]:
    """Write every source the registry holds into one zip an air-gapped registry imports with
    `vulndb update --offline-bundle`; returns the manifest. Each source keeps the age of its data."""
    states = {s.name: s for s in store.vulndb_sources()}
    if not states:
        raise ConfigError("the registry holds no vulnerability data to export", fix="amiforge vulndb update")
    if dest.is_dir():
        raise ConfigError(f"{dest} is a folder", fix="name the bundle file to write, e.g. vulndb-bundle.zip")
    sources: dict[str, object] = {}
    tmp = dest.with_name(f".{dest.name}.{os.getpid()}.tmp")
    try:
        with _locked(settings) as root, zipfile.ZipFile(tmp, "w", compression=zipfile.ZIP_DEFLATED) as bundle:
            for name, state in sorted(states.items()):
                if name == "osv":
                    # The registry keeps every advisory's record as imported: exported whole, as one JSON array.
                    data = json.dumps(store.all_advisories(), sort_keys=True).encode()
                    arcname = "osv/advisories.json"
                    bundle.writestr(arcname, data)
                    entry = {"path": arcname, "sha256": hashlib.sha256(data).hexdigest(), "size": len(data)}
                else:
                    kept = _kept_file(root, name, state)
                    if kept is None:
                        continue
                    arcname = f"{name}/{kept.name}"
                    bundle.write(kept, arcname)
                    entry = {"path": arcname, "sha256": file_sha256(kept), "size": kept.stat().st_size}
                sources[name] = {"origin": state.origin, "as_of": state.as_of.isoformat(), "file": entry}
            manifest = {"format": BUNDLE_FORMAT, "version": BUNDLE_VERSION,
                        "created": datetime.now(UTC).isoformat(), "sources": sources}  # fmt: skip
            bundle.writestr("manifest.json", json.dumps(manifest, indent=2, sort_keys=True))
        tmp.replace(dest)
    except OSError as e:
        raise ConfigError(f"cannot write the bundle {dest}: {e.strerror or e}", fix="name a file in a folder you can "
                          "write to, on a file system with room for it") from e  # fmt: skip
    finally:
        tmp.unlink(missing_ok=True)
    store.append_event("vulndb.export", actor=settings.actor, data={"file": str(dest), "sources": sorted(sources)})
    return manifest


def _kept_file(root: Path, name: str, state: VulnDbSource) -> Path | None:
    """The file source `name` was imported from, if the copy kept here is of the data the registry holds now."""
    kept = root / name
    try:
        recorded = json.loads((kept / KEPT_STATE).read_text()).get("sha256")
        (file,) = [f for f in kept.iterdir() if f.is_file() and f.name != KEPT_STATE]
    except (OSError, ValueError, AttributeError):
        recorded, file = None, None
    if file is None or recorded != state.sha256:
        logger.warning("vulndb export: %s's files are not kept here (imported on another machine?): left out", name)
        return None
    return file


def import_bundle(path: Path, *, store: Store, settings: Settings) -> list[SourceOutcome]:
    """`vulndb update --offline-bundle FILE`: check the bundle against its manifest (names, sizes, sha256, ages
    that are not in the future), then swap each source in as `update` does, keeping the age the bundle records
    (when the data left its publisher). Nothing is imported unless the whole bundle checks out."""
    fix = _BUNDLE_FIX
    with tempfile.TemporaryDirectory(prefix="amiforge-bundle-") as tmp:
        try:
            with open_input(path, what="offline bundle", fix=fix) as raw, zipfile.ZipFile(raw) as bundle:
                extracted = _extract(bundle, _manifest(bundle, path), Path(tmp), path)
        # RuntimeError: an encrypted member; NotImplementedError: a compression method zipfile lacks.
        except (zipfile.BadZipFile, zipfile.LargeZipFile, OSError, EOFError, RuntimeError, NotImplementedError) as e:
            raise ConfigError(f"cannot read the offline bundle {path}: {e}", fix=fix) from e
        outcomes = []
        with _locked(settings) as root:
            for name, (origin, as_of, file) in extracted.items():
                try:
                    state, skipped = import_source(name, file, store=store, actor=settings.actor, as_of=as_of,
                                                   origin=f"bundle {path.name} (from {origin})")  # fmt: skip
                    if name != "osv":
                        _keep_files(root, name, file, state.sha256)
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


def _when(value: object) -> datetime | None:
    """An ISO 8601 time with its zone, else None (a time without one is ambiguous by hours)."""
    try:
        when = datetime.fromisoformat(str(value))
    except ValueError:
        return None
    return when if when.tzinfo is not None else None


def _extract(
    bundle: zipfile.ZipFile, manifest: Mapping[str, object], into: Path, path: Path
) -> dict[VulnSourceName, tuple[str, datetime, Path]]:
    """Every source's file, checked against the manifest (name, size, sha256, an age not in the future) before any
    is used; ConfigError listing every problem."""
    problems: list[Problem] = []

    def bad(field: str, message: str) -> None:
        problems.append(Problem(message, file=str(path), field=field))

    out: dict[VulnSourceName, tuple[str, datetime, Path]] = {}
    sources = manifest.get("sources")
    created = _when(manifest.get("created"))
    latest = datetime.now(UTC) + CLOCK_SKEW
    if created is None or created > latest:
        bad("created", "not an ISO 8601 time with a zone, no later than now")
    if not isinstance(sources, dict) or not sources:
        raise ConfigError(f"the manifest of {path} lists no sources", problems=problems, fix=_BUNDLE_FIX)
    for name, entry in sources.items():
        where = f"sources.{name}"
        if name not in VULN_SOURCES or not isinstance(entry, dict):
            bad(where, f"unknown source {name!r}, or not an object")
            continue
        as_of = _when(entry.get("as_of"))
        if as_of is None or as_of > min(latest, (created or latest) + CLOCK_SKEW):
            bad(f"{where}.as_of", "not an ISO 8601 time with a zone, no later than the bundle was made")
            continue
        item = entry.get("file")
        member = item.get("path") if isinstance(item, dict) else None
        pure = PurePosixPath(str(member))
        if not isinstance(member, str) or pure.is_absolute() or ".." in pure.parts or pure.parts[:1] != (name,):
            bad(f"{where}.file.path", f"not a file of {name}/ in the bundle: {member!r}")
            continue
        assert isinstance(item, dict)
        try:
            info = bundle.getinfo(member)
        except KeyError:
            bad(f"{where}.file.path", f"{member} is missing from the bundle")
            continue
        if info.file_size > MAX_BUNDLE_MEMBER or info.file_size != item.get("size"):
            bad(f"{where}.file.size", f"{member}: {info.file_size} bytes, the manifest says {item.get('size')!r} "
                f"(at most {MAX_BUNDLE_MEMBER >> 20} MiB)")  # fmt: skip
            continue
        target = into / pure
        target.parent.mkdir(parents=True, exist_ok=True)
        digest = hashlib.sha256()
        with bundle.open(info) as src, open(target, "wb") as dst:
            # No more than the header (checked against the manifest) promised: a member that lies stops here.
            while chunk := src.read(min(MIB, info.file_size + 1 - dst.tell())):
                digest.update(chunk)
                dst.write(chunk)
        if target.stat().st_size != info.file_size or digest.hexdigest() != item.get("sha256"):
            bad(f"{where}.file.sha256", f"{member}: sha256 does not match the manifest (damaged or altered)")
            continue
        out[name] = (str(entry.get("origin") or "?"), as_of, target)
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
