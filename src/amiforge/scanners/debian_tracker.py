"""What the Debian Security Tracker says of each CVE in each source package, per release: its JSON export.

https://security-tracker.debian.org/tracker/data/json is one object, written by the tracker's `bin/tracker_service.py`
(`_get_json`), of this shape (keys whose value would be null are left out):

    { "<source package>": { "<CVE-… or TEMP-…>": {
        "description": str, "scope": "local" | "remote", "debianbug": int,
        "releases": { "<codename>": {
            "status": "resolved" | "open" | "undetermined",
            "repositories": { "<codename>[-security|-lts]": "<source version>" },
            "fixed_version": "<version>",   # resolved only; "0": the release was never affected
            "urgency": "unimportant" | "low" | "medium" | "high" | "not yet assigned" | "end-of-life" | "low**" …,
            "nodsa": "<note>", "nodsa_reason": "" | "postponed" | "ignored",   # only when a no-dsa note exists
            "next_point_update": true } } } } }

Urgencies with `**` are NVD's rating, copied while Debian has assigned none. Everything here is pure: no database, no
network. The file is some 60–80 MB with about a million release entries, so it is read one source package at a time
and each entry is a small slotted value whose repeated words share one string.
"""

from __future__ import annotations

import json
import re
from collections.abc import Collection, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from types import MappingProxyType

from amiforge.errors import ConfigError, Problem
from amiforge.inputs import MIB, json_type, parse_json, read_input, refuse_json_constant
from amiforge.model import DebianVerdict
from amiforge.scanners.interface import malformed
from amiforge.scanners.vulns import _Ctx, _str, is_dpkg_version

TRACKER_URL = "https://security-tracker.debian.org/tracker/data/json"
_FIX = f"re-download the Debian Security Tracker's JSON export ({TRACKER_URL})"
# The export is 60–80 MB today; the cap leaves room for years of growth and refuses anything else a user may pass.
MAX_TRACKER = 512 * MIB

# Debian's numeric version (os-release VERSION_ID) -> the codename the tracker files releases under.
DEBIAN_RELEASES: Mapping[str, str] = MappingProxyType(
    {"10": "buster", "11": "bullseye", "12": "bookworm", "13": "trixie", "14": "forky"}
)

STATUSES = frozenset({"resolved", "open", "undetermined"})


def codename_of(version_id: str) -> str | None:
    """The codename of Debian `version_id` ("12", or a point release such as "12.5"); None for one we do not know."""
    return DEBIAN_RELEASES.get(version_id.strip().split(".", 1)[0])


@dataclass(frozen=True, slots=True)
class TrackerEntry:
    """One (source package, CVE, release) of the tracker. `cve` may also be a tracker-made TEMP-… id."""

    package: str
    cve: str
    release: str  # codename, e.g. bookworm
    status: str  # resolved | open | undetermined
    urgency: str  # as Debian publishes it; words Debian adds later are kept as they are
    fixed_version: str | None  # resolved entries only; "0": this release was never affected
    no_dsa: str | None  # "postponed", "ignored", "no-dsa: <note>", or None: Debian plans a security update
    description: str


def verdict(entry: TrackerEntry) -> DebianVerdict:
    """The tracker's verdict for the image's release, as a Finding carries it."""
    return DebianVerdict(
        status=entry.status, urgency=entry.urgency, fixed_version=entry.fixed_version, no_dsa=entry.no_dsa
    )


def load_tracker(path: Path, *, releases: Collection[str] | None = None) -> list[TrackerEntry]:
    """The entries of the tracker's JSON export saved at `path`; see parse_tracker."""
    data = read_input(path, what="Debian Security Tracker file", max_bytes=MAX_TRACKER, fix=_FIX)
    return parse_tracker(data, origin=str(path), releases=releases)


def parse_tracker(data: bytes, *, origin: str, releases: Collection[str] | None = None) -> list[TrackerEntry]:
    """Every (package, CVE, release) entry of the tracker's JSON export, in the file's order.

    `releases`: keep only these codenames (only their entries are checked, too). Raises ConfigError listing every
    malformed value by its JSON field path (`openssl.CVE-….releases.bookworm.status`); keys it does not know are
    ignored, so a newer export still loads.
    """
    reader = _Reader(origin, None if releases is None else frozenset(releases))
    try:
        reader.stream(data)
    except _NotStreamable:
        # Not a plain UTF-8 JSON object, or not JSON at all: parse_json says why, with the line and column, or
        # gives the document (another encoding, a BOM) to read the ordinary way.
        document = parse_json(data, file=origin, what="Debian Security Tracker file", fix=_FIX)
        reader = _Reader(origin, reader.keep)
        reader.document(document)
    if reader.ctx.problems:
        raise malformed(f"the Debian Security Tracker file {origin}", reader.ctx.problems, fix=_FIX)
    return reader.entries


# --- reading --------------------------------------------------------------------------------------------------


class _NotStreamable(Exception):
    """The fast path cannot read this input; parse it whole instead."""


_SPACE = re.compile(r"[ \t\n\r]*")


def _skip(text: str, pos: int) -> int:
    """The position after any JSON whitespace at `pos`."""
    found = _SPACE.match(text, pos)
    return found.end() if found else pos


def _stream_packages(text: str, decoder: json.JSONDecoder) -> Iterator[tuple[str, object]]:
    """(package, value) of a top-level JSON object, one member decoded at a time.

    json.loads of the whole export holds about a gigabyte of small dicts at once; decoding one package's member at a
    time keeps only that member's. Anything unexpected raises _NotStreamable (never a wrong reading).
    """
    try:
        pos = _skip(text, 0)
        if text[pos : pos + 1] != "{":
            raise _NotStreamable
        pos = _skip(text, pos + 1)
        if text[pos : pos + 1] == "}":
            pos += 1
        else:
            while True:
                if text[pos : pos + 1] != '"':
                    raise _NotStreamable
                key, pos = decoder.raw_decode(text, pos)
                pos = _skip(text, pos)
                if text[pos : pos + 1] != ":":
                    raise _NotStreamable
                value, pos = decoder.raw_decode(text, _skip(text, pos + 1))
                yield key, value
                pos = _skip(text, pos)
                separator = text[pos : pos + 1]
                pos = _skip(text, pos + 1)
                if separator == "}":
                    break
                if separator != ",":
                    raise _NotStreamable
        if _skip(text, pos) != len(text):
            raise _NotStreamable  # data after the object
    except (ValueError, RecursionError) as e:  # JSONDecodeError, NaN/Infinity, nesting too deep
        raise _NotStreamable from e


class _Reader:
    def __init__(self, origin: str, keep: frozenset[str] | None) -> None:
        self.ctx = _Ctx(origin, [])
        self.keep = keep
        self.entries: list[TrackerEntry] = []
        # One string object per distinct word (status, urgency, codename, note): json makes a new one per occurrence.
        self._words: dict[str, str] = {}

    def stream(self, data: bytes) -> None:
        try:
            text = data.decode("utf-8")
        except UnicodeDecodeError as e:
            raise _NotStreamable from e
        decoder = json.JSONDecoder(parse_constant=refuse_json_constant)
        for package, issues in _stream_packages(text, decoder):
            self._package(package, issues)

    def document(self, document: object) -> None:
        if not isinstance(document, dict):
            raise ConfigError(
                f"{self.ctx.file} is not the Debian Security Tracker's JSON",
                problems=[
                    Problem(
                        f"expected an object of source packages at the top level, got {json_type(document)}",
                        file=self.ctx.file,
                    )
                ],
                fix=f"give the file {TRACKER_URL} serves",
            )
        for package, issues in document.items():
            self._package(package, issues)

    def _word(self, text: str) -> str:
        return self._words.setdefault(text, text)

    def _package(self, package: str, issues: object) -> None:
        if not isinstance(issues, dict):
            self.ctx.bad(package, f"must be an object of CVEs, got {json_type(issues)}")
            return
        for cve, issue in issues.items():
            self._issue(package, cve, issue)

    def _issue(self, package: str, cve: str, issue: object) -> None:
        ctx = self.ctx
        where = f"{package}.{cve}"
        if not isinstance(issue, dict):
            ctx.bad(where, f"must be an object, got {json_type(issue)}")
            return
        description = self._word(_str(ctx, issue, "description", where) or "")  # repeated per package
        _str(ctx, issue, "scope", where)
        bug = issue.get("debianbug")
        if bug is not None and (isinstance(bug, bool) or not isinstance(bug, int)):
            ctx.bad(f"{where}.debianbug", f"must be a Debian bug number, got {json_type(bug)}")
        releases = issue.get("releases")
        if releases is None or releases == []:  # an issue no supported release has (once written as [])
            return
        if not isinstance(releases, dict):
            ctx.bad(f"{where}.releases", f"must be an object of releases, got {json_type(releases)}")
            return
        cve = self._word(cve)  # the same CVE under several packages
        for codename, release in releases.items():
            if self.keep is None or codename in self.keep:
                self._release(package, cve, self._word(codename), release, description, f"{where}.releases.{codename}")

    def _release(self, package: str, cve: str, codename: str, release: object, description: str, where: str) -> None:
        ctx = self.ctx
        if not isinstance(release, dict):
            ctx.bad(where, f"must be an object, got {json_type(release)}")
            return
        before = len(ctx.problems)
        status = _str(ctx, release, "status", where, required=True)
        if status is not None and status not in STATUSES:
            ctx.bad(f"{where}.status", f"unknown status {status!r}: expected resolved, open or undetermined")
        urgency = _str(ctx, release, "urgency", where, required=True)
        fixed = _str(ctx, release, "fixed_version", where)
        if fixed is not None and fixed != "0" and not is_dpkg_version(fixed):
            ctx.bad(f"{where}.fixed_version", f"not a Debian version: {fixed!r}")
        repositories = release.get("repositories")
        if isinstance(repositories, dict):
            for suite, version in repositories.items():
                if not isinstance(version, str):
                    ctx.bad(f"{where}.repositories.{suite}", f"must be a version string, got {json_type(version)}")
                elif not is_dpkg_version(version):
                    ctx.bad(f"{where}.repositories.{suite}", f"not a Debian version: {version!r}")
        elif repositories is not None:
            ctx.bad(f"{where}.repositories", f"must be an object of suites, got {json_type(repositories)}")
        no_dsa = self._no_dsa(release, where)
        if len(ctx.problems) > before or status is None or urgency is None:
            return
        self.entries.append(
            TrackerEntry(
                package=package,
                cve=cve,
                release=codename,
                status=self._word(status),
                urgency=self._word(urgency),
                # The tracker gives a fixed version only for resolved entries; never read one elsewhere as a fix.
                fixed_version=fixed if status == "resolved" else None,
                no_dsa=no_dsa,
                description=description,
            )
        )

    def _no_dsa(self, release: Mapping[str, object], where: str) -> str | None:
        """Why no DSA is planned: the tracker writes a `nodsa` note, with `nodsa_reason` "postponed" or "ignored",
        or "" for a plain no-dsa. Either key present means such a note exists."""
        note, reason = release.get("nodsa"), release.get("nodsa_reason")
        if note is None and reason is None:
            return None
        for key, value in (("nodsa", note), ("nodsa_reason", reason)):
            if value is not None and not isinstance(value, str):
                self.ctx.bad(f"{where}.{key}", f"must be a string, got {json_type(value)}")
                return None
        if isinstance(reason, str) and reason.strip():
            return self._word(reason.strip())
        text = " ".join(note.split()) if isinstance(note, str) else ""  # one line, however the note was wrapped
        if len(text) > 120:
            text = text[:117] + "..."
        return self._word(f"no-dsa: {text}" if text else "no-dsa")
