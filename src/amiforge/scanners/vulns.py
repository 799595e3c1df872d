"""Known vulnerabilities in installed Debian packages: OSV advisories, dpkg version order, and imported reports.

Owns reading OSV records (a folder of `*.json`, one file, or the `Debian/all.zip` osv.dev publishes) into frozen
`Advisory` values, deciding which installed packages an advisory affects, and reading Trivy or Grype JSON reports made
elsewhere. Everything here is pure: no database, no network. Storing advisories is the store's job.

Debian's OSV records name the *source* package (`openssl`, not `libssl3`) and give *source* versions, so matching uses
`Package.source_name` and the source version dpkg records, and reports the binary package a user sees.
"""

from __future__ import annotations

import functools
import re
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import ClassVar

from cvss import CVSS2, CVSS3, CVSS4, CVSSError
from debian.debian_support import BaseVersion, Version

from amiforge.errors import ConfigError, Problem
from amiforge.inputs import MIB, json_type, parse_json, read_input, zip_json_members
from amiforge.model import (
    AdvisoryHead,
    AdvisoryRange,
    Finding,
    FindingKind,
    Package,
    Severity,
    StoredAdvisory,
)
from amiforge.scanners.interface import malformed

DEBIAN = "Debian"
_OSV_FIX = "re-download the advisories (osv.dev publishes Debian/all.zip), or remove the broken records"


# --- dpkg version order ---------------------------------------------------------------------------------------


@functools.lru_cache(maxsize=1 << 16)
def _parsed(text: str) -> Version:
    return Version(text)


_RUNS = re.compile(r"(\D*)(\d*)")
_PAIRS = 32  # (non-digits, number) pairs a key holds; a longer version (none seen in Debian) is compared slowly
_PAD = ((0,), 0)  # what dpkg compares against once a version part has run out: the end, and the number 0


def _char_order(c: str) -> int:
    # dpkg's order: `~` before the end of the part (0), letters before every other character.
    return -1 if c == "~" else ord(c) if c.isalpha() else ord(c) + 256


def _part_key(part: str) -> tuple[tuple[tuple[int, ...], int], ...] | None:
    """dpkg's verrevcmp as a key: each (non-digits, digits) pair as (char orders + end, number), padded to a fixed
    length with what dpkg compares a finished part against, so tuple order is dpkg order."""
    pairs = [((*(_char_order(c) for c in text), 0), int(digits or 0))
             for text, digits in _RUNS.findall(part) if text or digits]  # fmt: skip
    if len(pairs) > _PAIRS:
        return None
    return tuple(pairs) + (_PAD,) * (_PAIRS - len(pairs))


@functools.lru_cache(maxsize=1 << 17)
def dpkg_key(text: str) -> tuple[object, ...] | None:
    """A key whose tuple order is dpkg's order of versions, so comparing two is one C-level comparison (parsing
    and comparing in Python dominated matching: a rescan compares each installed version with thousands of
    advisories' versions). Two versions dpkg calls equal ("1:1.01-0", "1:1.1") have equal keys. None for a version
    with more than 32 digit runs in a part, which `dpkg_compare` compares the slow way."""
    v = _parsed(text)
    upstream, revision = _part_key(v.upstream_version or ""), _part_key(v.debian_revision or "")
    if upstream is None or revision is None:
        return None
    return (int(v.epoch or 0), upstream, revision)


def dpkg_compare(a: str, b: str) -> int:
    """-1, 0 or 1 as `a` sorts before, equal to or after `b` in dpkg order (epochs, `~` before anything, …)."""
    ka, kb = dpkg_key(a), dpkg_key(b)
    if ka is None or kb is None:
        va, vb = _parsed(a), _parsed(b)
        return -1 if va < vb else 1 if va > vb else 0
    return -1 if ka < kb else 1 if ka > kb else 0


@functools.lru_cache(maxsize=1 << 17)
def dpkg_identity(text: str) -> tuple[object, ...]:
    """A key two versions share exactly when dpkg calls them equal: set membership instead of one comparison per
    listed version. dpkg_key without its padding (what a finished part is compared against), so it hashes fast."""
    key = dpkg_key(text)
    if key is None:
        return (text,)
    epoch, upstream, revision = key
    return (epoch, _unpadded(upstream), _unpadded(revision))


def _unpadded(part: object) -> tuple[object, ...]:
    pairs = tuple(part) if isinstance(part, tuple) else ()
    end = len(pairs)
    while end and pairs[end - 1] == _PAD:
        end -= 1
    return pairs[:end]


@functools.lru_cache(maxsize=1 << 14)
def _identities(versions: tuple[str, ...]) -> frozenset[tuple[object, ...]]:
    # Debian's records for one source package list the same versions again and again (every CVE of a package
    # lists the versions before its fix): each list is made a set once.
    return frozenset(dpkg_identity(v) for v in versions)


def is_dpkg_version(text: str) -> bool:
    """Whether dpkg (and so `dpkg_compare`) accepts `text` as a version (Debian Policy 5.6.12)."""
    # python-debian's own validation rule, without building a Version: a full feed holds ~10^6 version strings.
    m = BaseVersion.re_valid_version.match(text)
    return m is not None and (m["epoch"] is not None or ":" not in m["upstream_version"])


# --- advisories -----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class AffectedPackage:
    """One affected interval of one package in one ecosystem (an OSV `affected` entry has one or more of these).

    `introduced` "0" means every version before `fixed`; None means the entry only lists `versions`.
    `fixed` None with `last_affected` None means no fix is published.
    """

    ecosystem: str  # e.g. "Debian:12"
    name: str  # for Debian, the source package
    introduced: str | None
    fixed: str | None = None
    last_affected: str | None = None
    versions: tuple[str, ...] = ()
    severity: Severity = Severity.UNKNOWN  # this ecosystem's own rating (Debian's urgency), if it gives one

    def affects(self, version: str) -> bool:
        """Whether `version` (dpkg order) is listed, or lies in [introduced, fixed) / [introduced, last_affected]."""
        return affects(self, version)


def affects(entry: AffectedPackage | AdvisoryRange, version: str) -> bool:
    """Whether `version` (dpkg order) is listed by `entry`, or lies in [introduced, fixed) / [introduced,
    last_affected]. For an advisory's entry as parsed, or its range as the registry keeps it."""
    if entry.versions and dpkg_identity(version) in _identities(entry.versions):
        return True
    if entry.introduced is None:
        return False
    if entry.introduced != "0" and dpkg_compare(version, entry.introduced) < 0:
        return False
    if entry.fixed is not None and dpkg_compare(version, entry.fixed) >= 0:
        return False
    return entry.last_affected is None or dpkg_compare(version, entry.last_affected) <= 0


@dataclass(frozen=True)
class Advisory:
    """One OSV record (DSA, DLA, DTSA, DEBIAN-CVE, CVE …)."""

    id: str
    aliases: tuple[str, ...]
    summary: str
    published: datetime | None
    modified: datetime | None
    severity: Severity  # the record's own rating, else the highest rating of its affected entries
    affected: tuple[AffectedPackage, ...]
    details: str = ""
    upstream: tuple[str, ...] = ()  # ids this record derives from (DLA-… → CVE-…, DEBIAN-CVE-…)
    related: tuple[str, ...] = ()
    withdrawn: datetime | None = None

    @property
    def title(self) -> str:
        if self.summary:
            return self.summary
        first = self.details.strip().split("\n\n", 1)[0].replace("\n", " ")
        return (first[:157] + "...") if len(first) > 160 else (first or self.id)

    @property
    def identifiers(self) -> tuple[str, ...]:
        """Other ids a waiver may name for this advisory: aliases, upstream ids, and related CVE ids.

        Older Debian records put the CVEs a DSA/DLA fixes in `related`, not `upstream`; other related ids (another
        distribution's advisory) are different vulnerabilities' records and are left out.
        """
        cves = (r for r in self.related if r.startswith("CVE-"))
        return tuple(dict.fromkeys(i for i in (*self.aliases, *self.upstream, *cves) if i != self.id))

    @property
    def head(self) -> AdvisoryHead:
        return AdvisoryHead(self.id, self.title, self.identifiers, self.severity, self.withdrawn is not None)

    @property
    def ranges(self) -> tuple[AdvisoryRange, ...]:
        """Its affected entries for Debian (any release), which matching reads."""
        return tuple(
            AdvisoryRange(self.id, a.ecosystem, a.name, a.introduced, a.fixed, a.last_affected, a.versions, a.severity)
            for a in self.affected
            if _is_debian(a.ecosystem)
        )

    def stored(self, record: Mapping[str, object], modified: str) -> StoredAdvisory:
        """What the registry keeps of this advisory: its raw record, and its head and Debian ranges, parsed."""
        return StoredAdvisory(self.id, modified, record, self.head, self.ranges)


# --- reading JSON with every problem collected ----------------------------------------------------------------


@dataclass(frozen=True)
class _Ctx:
    file: str
    problems: list[Problem]

    def bad(self, field: str | None, message: str, fix: str | None = None) -> None:
        self.problems.append(Problem(message, file=self.file, field=field or None, fix=fix))


def _join(path: str, key: str) -> str:
    return f"{path}.{key}" if path else key


def _str(ctx: _Ctx, obj: Mapping[str, object], key: str, path: str, *, required: bool = False) -> str | None:
    value = obj.get(key)
    if value is None or value == "":
        if required:
            ctx.bad(_join(path, key), "is required and missing")
        return None
    if not isinstance(value, str):
        ctx.bad(_join(path, key), f"must be a string, got {json_type(value)}")
        return None
    return value


def _obj(ctx: _Ctx, obj: Mapping[str, object], key: str, path: str) -> Mapping[str, object] | None:
    value = obj.get(key)
    if value is None:
        return None
    if not isinstance(value, dict):
        ctx.bad(_join(path, key), f"must be an object, got {json_type(value)}")
        return None
    return value


def _list(ctx: _Ctx, obj: Mapping[str, object], key: str, path: str) -> list[object]:
    value = obj.get(key)
    if value is None:
        return []
    if not isinstance(value, list):
        ctx.bad(_join(path, key), f"must be an array, got {json_type(value)}")
        return []
    return value


def _objects(ctx: _Ctx, obj: Mapping[str, object], key: str, path: str) -> Iterator[tuple[str, Mapping[str, object]]]:
    for i, item in enumerate(_list(ctx, obj, key, path)):
        where = f"{_join(path, key)}[{i}]"
        if isinstance(item, dict):
            yield where, item
        else:
            ctx.bad(where, f"must be an object, got {json_type(item)}")


def _strs(ctx: _Ctx, obj: Mapping[str, object], key: str, path: str) -> tuple[str, ...]:
    out: list[str] = []
    for i, item in enumerate(_list(ctx, obj, key, path)):
        if isinstance(item, str):
            out.append(item)
        else:
            ctx.bad(f"{_join(path, key)}[{i}]", f"must be a string, got {json_type(item)}")
    return tuple(out)


def _time(ctx: _Ctx, obj: Mapping[str, object], key: str, path: str) -> datetime | None:
    text = _str(ctx, obj, key, path)
    if text is None:
        return None
    try:
        value = datetime.fromisoformat(text)
    except ValueError:
        ctx.bad(_join(path, key), f"not an RFC 3339 timestamp: {text!r}")
        return None
    return value.replace(tzinfo=UTC) if value.tzinfo is None else value


def _load_json(ctx: _Ctx, data: bytes) -> object:
    try:
        return parse_json(data, file=ctx.file, what="the file", fix=_OSV_FIX)
    except ConfigError as e:  # collected with the other files' problems
        ctx.problems.extend(e.problems)
    return None


# --- severity -------------------------------------------------------------------------------------------------

_WORDS: Mapping[str, Severity] = {
    "critical": Severity.CRITICAL,
    "high": Severity.HIGH,
    "important": Severity.HIGH,
    "medium": Severity.MEDIUM,
    "moderate": Severity.MEDIUM,
    "low": Severity.LOW,
    "negligible": Severity.NEGLIGIBLE,
    "unimportant": Severity.NEGLIGIBLE,  # Debian's urgency for issues that do not affect Debian's builds
}


def severity_from_word(word: str) -> Severity:
    """A rating word (Debian urgency, GHSA, Trivy, Grype) as a Severity; "not yet assigned" and the like are unknown."""
    # Debian marks some urgencies with trailing asterisks ("low**"); they qualify the rating, not change it.
    return _WORDS.get(word.strip().rstrip("*").strip().lower(), Severity.UNKNOWN)


def severity_from_score(score: float) -> Severity:
    """The qualitative rating of a CVSS v3 or v4 base score (the two versions share the bands)."""
    if score >= 9.0:
        return Severity.CRITICAL
    if score >= 7.0:
        return Severity.HIGH
    if score >= 4.0:
        return Severity.MEDIUM
    if score > 0.0:
        return Severity.LOW
    return Severity.NEGLIGIBLE


# OSV `severity[].type` -> the library class that scores its vectors. CVSS v2 has no "critical" band (7.0–10.0 is
# high), so its rating comes from the library's own v2 bands, not from severity_from_score.
_CVSS: Mapping[str, type[CVSS2] | type[CVSS3] | type[CVSS4]] = {"CVSS_V2": CVSS2, "CVSS_V3": CVSS3, "CVSS_V4": CVSS4}


def cvss_severity(kind: str, vector: str) -> Severity | None:
    """The rating of a CVSS vector of OSV type `kind` (CVSS_V2, CVSS_V3, CVSS_V4), scored by Red Hat's `cvss`
    library; None if `kind` is not a CVSS type or the vector is malformed."""
    scorer = _CVSS.get(kind)
    if scorer is None:
        return None
    text = vector.strip().strip("()").removeprefix("CVSS:2.0/") if kind == "CVSS_V2" else vector.strip()
    try:
        scored = scorer(text)
    except CVSSError:
        return None
    if isinstance(scored, CVSS2):
        # v2 bands (0–3.9 low): a score of 0 is no impact, negligible as for the other versions.
        if float(scored.base_score) == 0.0:
            return Severity.NEGLIGIBLE
        return _WORDS.get(str(scored.severities()[0]).lower(), Severity.NEGLIGIBLE)
    return severity_from_score(float(scored.base_score))


def _severity_of_score(kind: str, score: str) -> Severity:
    """An OSV severity entry: a CVSS vector, else a bare number (0–10) or a rating word ("Ubuntu" type)."""
    rated = cvss_severity(kind, score)
    if rated is not None:
        return rated
    try:
        value = float(score)
    except ValueError:
        return severity_from_word(score)
    # "nan", "inf" and numbers off the 0–10 scale rate nothing.
    return severity_from_score(value) if 0.0 <= value <= 10.0 else Severity.UNKNOWN


def _severity(ctx: _Ctx, obj: Mapping[str, object], path: str) -> Severity:
    """The highest rating an OSV object carries: `severity[]` scores, and `urgency`/`severity` words in its blocks."""
    found: list[Severity] = []
    for where, item in _objects(ctx, obj, "severity", path):
        kind = _str(ctx, item, "type", where, required=True)
        score = _str(ctx, item, "score", where, required=True)
        if kind and score:
            found.append(_severity_of_score(kind, score))
    for block in ("database_specific", "ecosystem_specific"):
        specific = _obj(ctx, obj, block, path)
        for key in ("urgency", "severity"):
            word = specific.get(key) if specific else None
            if isinstance(word, str):
                found.append(severity_from_word(word))
    return _highest(found)


# --- OSV records ----------------------------------------------------------------------------------------------

_EVENT_KINDS = ("introduced", "fixed", "last_affected", "limit")


def _is_debian(ecosystem: str) -> bool:
    return ecosystem == DEBIAN or ecosystem.startswith(DEBIAN + ":")


def _event_key(a: tuple[str, str], b: tuple[str, str]) -> int:
    # "introduced: 0" sorts before every version (OSV's meaning); otherwise dpkg order, stable for ties.
    if a[1] == "0" and a[0] == "introduced":
        return 0 if (b[1] == "0" and b[0] == "introduced") else -1
    if b[1] == "0" and b[0] == "introduced":
        return 1
    return dpkg_compare(a[1], b[1])


def _intervals(events: Sequence[tuple[str, str]], debian: bool) -> list[tuple[str, str | None, str | None]]:
    """OSV range events as (introduced, fixed, last_affected) intervals, evaluated in version order as OSV says."""
    ordered = sorted(events, key=functools.cmp_to_key(_event_key)) if debian else list(events)
    out: list[tuple[str, str | None, str | None]] = []
    start: str | None = None
    for kind, version in ordered:
        if kind == "introduced" and start is None:
            start = version
        elif kind == "fixed" and start is not None:
            out.append((start, version, None))
            start = None
        elif kind == "last_affected" and start is not None:
            out.append((start, None, version))
            start = None
        # `limit` only bounds walks over git history; it does not end an ECOSYSTEM interval.
    if start is not None:
        out.append((start, None, None))
    return out


def _affected(ctx: _Ctx, where: str, entry: Mapping[str, object]) -> list[AffectedPackage]:
    package = _obj(ctx, entry, "package", where)
    if package is None:
        # Entries without a package describe git ranges of a project, never an installed Debian package.
        return []
    ecosystem = _str(ctx, package, "ecosystem", f"{where}.package", required=True)
    name = _str(ctx, package, "name", f"{where}.package", required=True)
    debian = ecosystem is not None and _is_debian(ecosystem)
    versions = _strs(ctx, entry, "versions", where)
    if debian:
        for i, v in enumerate(versions):
            if not is_dpkg_version(v):
                ctx.bad(f"{where}.versions[{i}]", f"not a Debian version: {v!r}")
    severity = _severity(ctx, entry, where)
    intervals: list[tuple[str, str | None, str | None]] = []
    for rwhere, rng in _objects(ctx, entry, "ranges", where):
        rtype = _str(ctx, rng, "type", rwhere, required=True)
        events: list[tuple[str, str]] = []
        for ewhere, event in _objects(ctx, rng, "events", rwhere):
            kinds = [k for k in _EVENT_KINDS if k in event]
            if len(kinds) != 1:
                ctx.bad(ewhere, f"an event needs exactly one of {', '.join(_EVENT_KINDS)}")
                continue
            version = _str(ctx, event, kinds[0], ewhere, required=True)
            if version is None:
                continue
            if debian and rtype == "ECOSYSTEM" and version != "0" and not is_dpkg_version(version):
                ctx.bad(f"{ewhere}.{kinds[0]}", f"not a Debian version: {version!r}")
                continue
            events.append((kinds[0], version))
        if not rng.get("events"):
            ctx.bad(f"{rwhere}.events", "a range needs at least one event")
        # GIT ranges name commits, not package versions: they can never match an installed package.
        if rtype in ("ECOSYSTEM", "SEMVER"):
            intervals += _intervals(events, debian)
    if ecosystem is None or name is None:
        return []
    if not intervals:
        return [AffectedPackage(ecosystem, name, None, versions=versions, severity=severity)] if versions else []
    return [AffectedPackage(ecosystem, name, i, f, la, versions, severity) for i, f, la in intervals]


def _advisory(ctx: _Ctx, record: object, path: str) -> Advisory | None:
    if not isinstance(record, dict):
        ctx.bad(path or None, f"an OSV record must be a JSON object, got {json_type(record)}")
        return None
    before = len(ctx.problems)
    adv_id = _str(ctx, record, "id", path, required=True)
    affected: list[AffectedPackage] = []
    for where, entry in _objects(ctx, record, "affected", path):
        affected += _affected(ctx, where, entry)
    own = _severity(ctx, record, path)
    advisory = Advisory(
        id=adv_id or "",
        aliases=_strs(ctx, record, "aliases", path),
        summary=_str(ctx, record, "summary", path) or "",
        published=_time(ctx, record, "published", path),
        modified=_time(ctx, record, "modified", path),
        severity=own if own is not Severity.UNKNOWN else _highest(a.severity for a in affected),
        affected=tuple(affected),
        details=_str(ctx, record, "details", path) or "",
        upstream=_strs(ctx, record, "upstream", path),
        related=_strs(ctx, record, "related", path),
        withdrawn=_time(ctx, record, "withdrawn", path),
    )
    return advisory if len(ctx.problems) == before else None


def _highest(ratings: Iterable[Severity]) -> Severity:
    return max(ratings, key=lambda s: s.rank, default=Severity.UNKNOWN)


# Caps on what an advisory import reads: one record is a few KiB (the largest real ones, tens of KiB); a file of
# records, or osv.dev's whole Debian all.zip unpacked, is some hundreds of MiB.
MAX_OSV_FILE = 256 * MIB
MAX_OSV_RECORD = 16 * MIB
MAX_OSV_ARCHIVE = 2 << 30


def _read(file: Path, max_bytes: int = MAX_OSV_FILE) -> bytes:
    return read_input(file, what="advisory file", max_bytes=max_bytes, fix=_OSV_FIX)


def _sources(path: Path) -> Iterator[tuple[str, bytes]]:
    """(name for errors, bytes) of every record file: a folder's *.json, one .json, or a .zip's *.json members."""
    if path.is_dir():
        total = 0
        for file in sorted(path.glob("*.json")):
            data = _read(file)
            total += len(data)
            if total > MAX_OSV_ARCHIVE:  # what is read is kept in memory until the import ends
                raise ConfigError(f"the advisories in {path} come to more than 2 GiB", fix=_OSV_FIX)
            yield str(file), data
    elif path.suffix == ".zip":
        yield from zip_json_members(
            path, what="advisory archive", fix=_OSV_FIX, max_member=MAX_OSV_RECORD, max_total=MAX_OSV_ARCHIVE,
            refusal="the advisory archive {path} is not an OSV export",
        )  # fmt: skip
    else:
        yield str(path), _read(path)


def load_osv(path: Path) -> list[Advisory]:
    """Every OSV record under `path` (folder of *.json, a .json file holding one record or an array, or a .zip).

    Raises ConfigError listing every malformed record, by file and JSON field. When two records share an id, the one
    modified last wins (a folder and a newer download may overlap).
    """
    return [advisory for advisory, _ in load_osv_records(path)]


def load_osv_records(path: Path) -> list[tuple[Advisory, Mapping[str, object]]]:
    """As load_osv, keeping each record's raw JSON beside it (the registry stores the raw record)."""
    if not path.exists():
        raise ConfigError(
            f"no advisories at {path}",
            problems=[Problem("file or folder not found", file=str(path))],
            fix="give a folder of OSV *.json files, one .json file, or osv.dev's Debian/all.zip",
        )
    if not path.is_dir() and path.suffix not in (".json", ".zip"):
        raise ConfigError(
            f"cannot read advisories from {path}",
            problems=[Problem("expected a folder, a .json file or a .zip archive", file=str(path))],
            fix="give a folder of OSV *.json files, one .json file, or osv.dev's Debian/all.zip",
        )
    problems: list[Problem] = []
    by_id: dict[str, tuple[Advisory, Mapping[str, object]]] = {}
    seen_files = 0
    for name, data in _sources(path):
        seen_files += 1
        ctx = _Ctx(name, problems)
        before = len(problems)
        document = _load_json(ctx, data)
        if len(problems) > before:
            continue
        records = enumerate(document) if isinstance(document, list) else [(None, document)]
        for index, record in records:
            advisory = _advisory(ctx, record, "" if index is None else f"[{index}]")
            if advisory is None:
                continue
            kept = by_id.get(advisory.id)
            if (kept is None or _newer(advisory, kept[0])) and isinstance(record, dict):
                by_id[advisory.id] = (advisory, record)
    if seen_files == 0:
        raise ConfigError(
            f"no OSV records found in {path}",
            problems=[Problem("no *.json files", file=str(path))],
            fix="give a folder of OSV *.json files, one .json file, or osv.dev's Debian/all.zip",
        )
    if problems:
        raise malformed(f"OSV advisories at {path}", problems, fix=_OSV_FIX)
    return [by_id[k] for k in sorted(by_id)]


def parse_osv_records(records: Iterable[Mapping[str, object]], *, origin: str = "the registry") -> list[Advisory]:
    """Advisories from raw OSV records already validated at import (read back from the registry)."""
    problems: list[Problem] = []
    ctx = _Ctx(origin, problems)
    parsed = [a for a in (_advisory(ctx, dict(r), "") for r in records) if a is not None]
    if problems:
        raise malformed(f"OSV advisories in {origin}", problems, fix=_OSV_FIX)
    return parsed


def _newer(a: Advisory, b: Advisory) -> bool:
    if a.modified is None:
        return False
    return b.modified is None or a.modified > b.modified


# --- matching -------------------------------------------------------------------------------------------------


AdvisoryIndex = Mapping[str, list[tuple[AdvisoryHead, list[AdvisoryRange]]]]


def index_advisories(advisories: Iterable[Advisory], *, release: str = "12") -> AdvisoryIndex:
    """Source package -> the advisories naming it for Debian `release`, with the entries that apply (see
    index_ranges)."""
    listed = list(advisories)
    return index_ranges({a.id: a.head for a in listed}, [r for a in listed for r in a.ranges], release=release)


def index_ranges(heads: Mapping[str, AdvisoryHead], ranges: Iterable[AdvisoryRange], *, release: str) -> AdvisoryIndex:
    """Source package -> the advisories naming it for Debian `release`, with the entries that apply: built once
    for all the versions a rescan matches, from the parsed ranges the registry keeps.

    An advisory's `Debian:<release>` entries for a source package apply; its bare `Debian` entries apply only when it
    has no entry for that package on this release (a release-specific entry is the more precise statement). Withdrawn
    advisories never match.
    """
    ecosystem = f"{DEBIAN}:{release}"
    specific: dict[tuple[str, str], list[AdvisoryRange]] = {}
    bare: dict[tuple[str, str], list[AdvisoryRange]] = {}
    for r in ranges:
        kept = specific if r.ecosystem == ecosystem else bare if r.ecosystem == DEBIAN else None
        if kept is None or heads[r.advisory_id].withdrawn:
            continue
        kept.setdefault((r.advisory_id, r.package), []).append(r)
    index: dict[str, list[tuple[AdvisoryHead, list[AdvisoryRange]]]] = {}
    for advisory_id, package in sorted(specific.keys() | bare.keys()):
        entries = specific.get((advisory_id, package)) or bare[(advisory_id, package)]
        index.setdefault(package, []).append((heads[advisory_id], entries))
    return index


def release_ecosystems(release: str) -> tuple[str, str]:
    """The OSV ecosystems whose entries can apply to Debian `release`."""
    return (f"{DEBIAN}:{release}", DEBIAN)


@dataclass(frozen=True)
class _Hit:
    """An advisory affecting one version of a source package: what every binary built from it is reported with."""

    advisory: AdvisoryHead
    fixed: str | None  # the nearest fix above the installed version, if one is published
    severity: Severity


class Matcher:
    """Matches package lists against one index, remembering what each (source package, version) matched: the
    versions a rescan matches share most of their source packages, and matching is the same for each."""

    def __init__(self, index: AdvisoryIndex) -> None:
        self._index = index
        self._hits: dict[tuple[str, str], list[_Hit]] = {}
        # One finding object per (hit, binary, version): built once, and the ratings memo compares it by identity.
        self._made: dict[tuple[_Hit, str, str], Finding] = {}

    def _source_hits(self, source: str, version: str) -> list[_Hit]:
        hits = self._hits.get((source, version))
        if hits is None:
            hits = []
            for advisory, entries in self._index.get(source, ()):
                affecting = [e for e in entries if affects(e, version)]
                if not affecting:
                    continue
                fixes = sorted(
                    (e.fixed for e in affecting if e.fixed is not None and dpkg_compare(e.fixed, version) > 0),
                    key=functools.cmp_to_key(dpkg_compare),
                )
                rated = _highest(e.severity for e in affecting)
                hits.append(_Hit(advisory, fixes[0] if fixes else None,
                                 rated if rated is not Severity.UNKNOWN else advisory.severity))  # fmt: skip
            self._hits[(source, version)] = hits
        return hits

    def match(self, packages: Sequence[Package]) -> list[Finding]:
        """One finding per (advisory, binary package) the advisory affects (see index_ranges for which apply)."""
        findings: dict[tuple[str, str], Finding] = {}
        for pkg in packages:
            # Debian's records give source versions; dpkg records one only where it differs from the binary's
            # (binNMUs).
            for hit in self._source_hits(pkg.source_name, pkg.source_version or pkg.version):
                key = (hit.advisory.id, pkg.name)
                if key in findings:
                    continue  # the same binary for another architecture (multiarch): one finding
                made = (hit, pkg.name, pkg.version)
                finding = self._made.get(made)
                if finding is None:
                    finding = self._made[made] = Finding(
                        kind=FindingKind.CVE,
                        id=hit.advisory.id,
                        severity=hit.severity,
                        title=hit.advisory.title,
                        source="osv",
                        package=pkg.name,
                        installed=pkg.version,
                        fixed=hit.fixed,
                        aliases=hit.advisory.identifiers,
                    )
                findings[key] = finding
        return sorted(findings.values(), key=lambda f: (f.package or "", f.id))


def match(
    packages: Sequence[Package],
    advisories: Iterable[Advisory] = (),
    *,
    release: str = "12",
    index: AdvisoryIndex | None = None,
) -> list[Finding]:
    """One finding per (advisory, binary package) the advisory affects on Debian `release` (see index_ranges;
    `index`, when given, is the advisories' index for that release, and `advisories` is not read)."""
    return Matcher(index if index is not None else index_advisories(advisories, release=release)).match(packages)


@dataclass(frozen=True)
class OsvScanner:
    """The Scanner over a loaded set of OSV advisories."""

    name: ClassVar[str] = "osv"
    advisories: tuple[Advisory, ...]
    release: str = "12"

    def scan(self, rootfs: Path, packages: Sequence[Package]) -> list[Finding]:
        return match(packages, self.advisories, release=self.release)


# --- reports from other scanners ------------------------------------------------------------------------------

_REPORT_FIX = "give the JSON report of `trivy image --format json` or `grype -o json`"
# A report of a big image with every vulnerability and its description runs to tens of MiB.
MAX_REPORT = 64 * MIB


def import_report(path: Path) -> list[Finding]:
    """Findings from a Trivy or a Grype JSON report, recognised by shape (`Results` or `matches`)."""
    ctx = _Ctx(str(path), [])
    data = read_input(path, what="scanner report", max_bytes=MAX_REPORT, fix=_REPORT_FIX)
    document = parse_json(data, file=str(path), what="scanner report", fix=_REPORT_FIX)
    if ctx.problems:
        raise malformed(f"scanner report {path}", ctx.problems, fix=_REPORT_FIX)
    if isinstance(document, dict) and "matches" in document:
        findings = _grype(ctx, document)
    elif isinstance(document, dict) and ("Results" in document or "SchemaVersion" in document):
        findings = _trivy(ctx, document)
    else:
        raise ConfigError(
            f"{path} is neither a Trivy nor a Grype JSON report",
            problems=[Problem("expected a top-level 'Results' (Trivy) or 'matches' (Grype)", file=str(path))],
            fix=_REPORT_FIX,
        )
    if ctx.problems:
        raise malformed(f"scanner report {path}", ctx.problems, fix=_REPORT_FIX)
    unique: dict[tuple[str, str], Finding] = {}
    for f in findings:
        # Trivy repeats a vulnerability per target; one finding per (id, package) is what a waiver names.
        unique.setdefault((f.id, f.package or ""), f)
    return sorted(unique.values(), key=lambda f: (f.package or "", f.id))


def _trivy(ctx: _Ctx, document: Mapping[str, object]) -> list[Finding]:
    out: list[Finding] = []
    for rwhere, result in _objects(ctx, document, "Results", ""):
        for where, vuln in _objects(ctx, result, "Vulnerabilities", rwhere):
            vid = _str(ctx, vuln, "VulnerabilityID", where, required=True)
            pkg = _str(ctx, vuln, "PkgName", where, required=True)
            installed = _str(ctx, vuln, "InstalledVersion", where, required=True)
            fixed = _str(ctx, vuln, "FixedVersion", where)
            severity = _str(ctx, vuln, "Severity", where)
            title = _str(ctx, vuln, "Title", where)
            aliases = _strs(ctx, vuln, "VendorIDs", where)
            if vid is None or pkg is None or installed is None:
                continue
            out.append(
                Finding(
                    kind=FindingKind.CVE,
                    id=vid,
                    severity=severity_from_word(severity or ""),
                    title=title or vid,
                    source="trivy",
                    package=pkg,
                    installed=installed,
                    fixed=fixed,
                    aliases=aliases,
                )
            )
    return out


def _grype(ctx: _Ctx, document: Mapping[str, object]) -> list[Finding]:
    out: list[Finding] = []
    for where, item in _objects(ctx, document, "matches", ""):
        vuln = _obj(ctx, item, "vulnerability", where)
        artifact = _obj(ctx, item, "artifact", where)
        if vuln is None:
            ctx.bad(f"{where}.vulnerability", "is required and missing")
        if artifact is None:
            ctx.bad(f"{where}.artifact", "is required and missing")
        if vuln is None or artifact is None:
            continue
        vid = _str(ctx, vuln, "id", f"{where}.vulnerability", required=True)
        severity = _str(ctx, vuln, "severity", f"{where}.vulnerability")
        description = _str(ctx, vuln, "description", f"{where}.vulnerability")
        fix = _obj(ctx, vuln, "fix", f"{where}.vulnerability")
        # Grype lists the fixing versions; for a Debian package there is one (the first is the nearest otherwise).
        fixes = _strs(ctx, fix, "versions", f"{where}.vulnerability.fix") if fix else ()
        name = _str(ctx, artifact, "name", f"{where}.artifact", required=True)
        version = _str(ctx, artifact, "version", f"{where}.artifact", required=True)
        related = [
            rid
            for rwhere, rel in _objects(ctx, item, "relatedVulnerabilities", where)
            if (rid := _str(ctx, rel, "id", rwhere)) is not None
        ]
        if vid is None or name is None or version is None:
            continue
        title = (description or "").strip().split("\n", 1)[0]
        out.append(
            Finding(
                kind=FindingKind.CVE,
                id=vid,
                severity=severity_from_word(severity or ""),
                title=(title[:157] + "...") if len(title) > 160 else (title or vid),
                source="grype",
                package=name,
                installed=version,
                fixed=fixes[0] if fixes else None,
                aliases=tuple(dict.fromkeys(r for r in related if r != vid)),
            )
        )
    return out
