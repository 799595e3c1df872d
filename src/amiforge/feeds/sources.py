"""The three vulnerability feeds `amiforge vulndb update` downloads, and how each is fetched and verified.

- `osv`: osv.dev's export of its Debian records, one zip (`Debian/all.zip`), a Google Cloud Storage object — so the
  download is checked against the MD5 GCS sends in `x-goog-hash`. Verified here as a zip that opens and lists its
  members (testzip would read every byte of a file of hundreds of MiB).
- `debian`: the Debian Security Tracker's whole state as one JSON object (source package → CVE → releases). It
  publishes no checksum; verified here as JSON whose top level is an object.
- `cve`: NVD's CVE API 2.0, paged with `startIndex`/`resultsPerPage` (at most 2000 a page), one file per page
  (`page-00000.json`, …). An API key, if any, goes in the `apiKey` header. NVD limits requests per rolling 30 s
  window (5 without a key, 50 with one), so pages are spaced by 30/5 = 6 s or 30/50 = 0.6 s. A page whose
  `totalResults` differs from the first page's, or whose `startIndex` is not the one asked, means NVD's data moved
  while amiforge paged through it: the whole fetch fails (retryable), since its pages would not be one snapshot.

Every source's URL can be overridden, to an internal mirror or a `file://` folder on an air-gapped machine (for
`cve`, a folder of `page-NNNNN.json` files as `fetch_source` writes them). Nothing here parses the feeds beyond
what the checks need; reading them into advisories is the scanners' job.
"""

from __future__ import annotations

import hashlib
import json
import time
import zipfile
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from email.utils import parsedate_to_datetime
from pathlib import Path
from types import MappingProxyType
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

from amiforge.errors import ConfigError, InfraError, Problem
from amiforge.feeds.download import Downloaded, HTTPStatusError, Progress, check_url, download
from amiforge.inputs import MIB, json_type, open_input, parse_json, read_input, refuse_json_constant

GIB = 1 << 30

# NVD's documented rate limits (https://nvd.nist.gov/developers/start-here, "Rate Limits"): requests per rolling
# window of NVD_WINDOW seconds. Spacing requests by window/limit keeps any window within the limit.
NVD_WINDOW = 30.0
NVD_LIMIT_WITHOUT_KEY = 5
NVD_LIMIT_WITH_KEY = 50
NVD_MAX_RESULTS_PER_PAGE = 2000
NVD_FORMAT = "NVD_CVE"
NVD_PAGE_NAME = "page-{:05d}.json"

_NVD_FORMAT_FIX = (
    "check the URL is NVD's CVE API 2.0 (https://services.nvd.nist.gov/rest/json/cves/2.0) or a mirror of it; "
    "if it is, NVD changed its answers and amiforge needs an update"
)


@dataclass(frozen=True)
class Source:
    """One feed: its name on the command line, where it lives by default, how errors name it, the largest file
    amiforge accepts from it (for `cve`, one page), the file it is saved as, and the time limits of one download."""

    name: str
    default_url: str
    what: str
    max_bytes: int
    filename: str
    stall_timeout: float
    deadline: float


SOURCES: Mapping[str, Source] = MappingProxyType(
    {
        "osv": Source(
            name="osv",
            default_url="https://osv-vulnerabilities.storage.googleapis.com/Debian/all.zip",
            what="osv.dev's Debian advisories (all.zip)",
            max_bytes=2 * GIB,
            filename="osv-debian-all.zip",
            stall_timeout=60.0,
            deadline=3600.0,
        ),
        "debian": Source(
            name="debian",
            default_url="https://security-tracker.debian.org/tracker/data/json",
            what="the Debian Security Tracker's JSON",
            max_bytes=512 * MIB,
            filename="debian-security-tracker.json",
            stall_timeout=60.0,
            deadline=1800.0,
        ),
        "cve": Source(
            name="cve",
            default_url="https://services.nvd.nist.gov/rest/json/cves/2.0",
            what="a page of NVD's CVE API",
            max_bytes=64 * MIB,
            filename=NVD_PAGE_NAME,
            # NVD often takes many seconds before the first byte of a full page.
            stall_timeout=120.0,
            deadline=600.0,
        ),
    }
)


@dataclass(frozen=True)
class FetchedSource:
    """What `fetch_source` downloaded and verified. `fetched_at` is when the fetch began (UTC): the data is no older.
    `sha256` is the sha256 of the `sha256sum`-style listing of `files` in order ("<sha256>  <file name>\\n" each, as
    `cd workdir && sha256sum page-*.json | sha256sum` prints it); `size` is their bytes in all."""

    name: str
    url: str
    files: tuple[Path, ...]
    fetched_at: datetime
    sha256: str
    size: int
    # The oldest Last-Modified among the files (a file:// URL's: its modification time), if the server says: a
    # mirror may serve data much older than the fetch.
    last_modified: datetime | None = None

    @property
    def as_of(self) -> datetime:
        """How old the data is, at best: the fetch, or what the server says of its files if that is older."""
        return min(self.fetched_at, self.last_modified) if self.last_modified else self.fetched_at


def nvd_interval(api_key: str | None) -> float:
    """Seconds between two NVD requests that keep within NVD's rate limit, without or with an API key."""
    return NVD_WINDOW / (NVD_LIMIT_WITH_KEY if api_key else NVD_LIMIT_WITHOUT_KEY)


def fetch_source(
    name: str,
    url: str | None,
    workdir: Path,
    *,
    api_key: str | None = None,
    progress: Progress | None = None,
    sleep: Callable[[float], None] = time.sleep,
) -> FetchedSource:
    """Download and verify source `name` (a key of SOURCES) from `url` (None: its default URL) into `workdir`, a
    fresh folder the caller owns. `api_key` is NVD's (only `cve` uses it; the caller reads AMIFORGE_NVD_API_KEY).
    `progress` gets (bytes so far, total bytes or None) for `osv` and `debian`, and (records so far, totalResults)
    after each page for `cve`. `sleep` spaces NVD requests (tests pass a fake).

    On any failure the files this call wrote are removed, and the error says whether a retry can help: ConfigError
    for a wrong URL or an answer in a shape amiforge does not know; InfraError for the network, the server, and NVD
    data that moved while it was paged through (retryable)."""
    source = SOURCES.get(name)
    if source is None:
        raise ConfigError(
            f"unknown vulnerability source {name!r}",
            fix=f"use one of: {', '.join(SOURCES)}",
        )
    url = url or source.default_url
    check_url(url, what=source.what)
    api_key = api_key or None  # an empty AMIFORGE_NVD_API_KEY is no key
    if api_key is not None:
        _check_api_key(api_key)
    fetched_at = datetime.now(UTC)
    workdir.mkdir(parents=True, exist_ok=True)
    written: list[Downloaded] = []
    try:
        if source.name == "cve":
            _fetch_nvd(source, url, workdir, written, api_key=api_key, progress=progress, sleep=sleep)
        else:
            got = _download(source, url, workdir / source.filename, written, headers={}, progress=progress)
            if source.name == "osv":
                _check_zip(got, source)
            else:
                _check_tracker_json(got, source)
    except BaseException:
        for item in written:
            item.path.unlink(missing_ok=True)
        raise
    listing = "".join(f"{item.sha256}  {item.path.name}\n" for item in written)
    return FetchedSource(
        name=source.name,
        url=url,
        files=tuple(item.path for item in written),
        fetched_at=fetched_at,
        sha256=hashlib.sha256(listing.encode()).hexdigest(),
        size=sum(item.size for item in written),
        last_modified=_oldest_last_modified(written),
    )


def _oldest_last_modified(written: Sequence[Downloaded]) -> datetime | None:
    """The oldest Last-Modified header among the downloads; None unless every one carries a readable one."""
    times = []
    for item in written:
        try:
            when = parsedate_to_datetime(item.last_modified) if item.last_modified else None
        except (TypeError, ValueError):
            when = None
        if when is None:
            return None
        times.append(when if when.tzinfo else when.replace(tzinfo=UTC))
    return min(times, default=None)


def _download(
    source: Source,
    url: str,
    dest: Path,
    written: list[Downloaded],
    *,
    headers: Mapping[str, str],
    progress: Progress | None,
) -> Downloaded:
    got = download(
        url,
        dest,
        what=source.what,
        max_bytes=source.max_bytes,
        stall_timeout=source.stall_timeout,
        deadline=source.deadline,
        headers=headers,
        progress=progress,
    )
    written.append(got)
    return got


# --- osv: a zip that opens -----------------------------------------------------------------------------------------


def _check_zip(got: Downloaded, source: Source) -> None:
    fix = f"check the URL points at {source.what} (osv.dev publishes it as Debian/all.zip)"
    try:
        with open_input(got.path, what=source.what, fix=fix) as raw, zipfile.ZipFile(raw) as archive:
            members = len(archive.namelist())
    except (zipfile.BadZipFile, zipfile.LargeZipFile, EOFError, OSError, ValueError) as e:
        raise ConfigError(
            f"{got.url} did not answer with {source.what}: it is not a readable zip archive ({e})",
            problems=[Problem(f"not a readable zip archive: {e}", file=got.url)],
            fix=fix,
        ) from None
    if members == 0:
        raise ConfigError(
            f"{got.url} answered with an empty zip archive, not {source.what}",
            problems=[Problem("a zip archive without members", file=got.url)],
            fix=fix,
        )


# --- debian: JSON with an object at the top ------------------------------------------------------------------------


class _Object:
    """Stands for every JSON object while the tracker's JSON is checked, so checking it does not build it."""


_OBJECT = _Object()


def _check_tracker_json(got: Downloaded, source: Source) -> None:
    fix = (
        f"check the URL points at {source.what} (https://security-tracker.debian.org/tracker/data/json, or a mirror "
        "of it); if it does, the tracker changed its format and amiforge needs an update"
    )
    data = read_input(got.path, what=source.what, max_bytes=source.max_bytes, fix=fix)
    found: str | None = None
    if not data.strip():
        found = "an empty answer"
    elif data.lstrip()[:1] == b"<":
        found = "an HTML (or XML) page"
    else:
        try:
            # Every object becomes _OBJECT as soon as it is parsed: a full check of the syntax, without holding
            # the tracker's hundreds of MiB of objects in memory at once.
            top = json.loads(data, object_pairs_hook=lambda _pairs: _OBJECT, parse_constant=refuse_json_constant)
        except json.JSONDecodeError as e:
            found = f"text that is not JSON ({e.msg} at line {e.lineno} column {e.colno})"
        except (ValueError, UnicodeDecodeError) as e:  # NaN/Infinity, a bad encoding
            found = f"text that is not JSON ({e})"
        except RecursionError:
            found = "JSON nested too deeply to be the tracker's"
        else:
            if top is not _OBJECT:
                found = f"a JSON {json_type(top)}"
    if found is not None:
        raise ConfigError(
            f"{got.url} did not answer with {source.what}: expected a JSON object at the top, found {found}",
            problems=[Problem(f"expected a JSON object at the top, found {found}", file=got.url)],
            fix=fix,
        )


# --- cve: NVD's API, page by page -------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Page:
    total: int
    start: int
    count: int


def _fetch_nvd(
    source: Source,
    url: str,
    workdir: Path,
    written: list[Downloaded],
    *,
    api_key: str | None,
    progress: Progress | None,
    sleep: Callable[[float], None],
) -> None:
    on_disk = urlsplit(url).scheme.lower() == "file"
    headers = {"apiKey": api_key} if api_key else {}
    first: _Page | None = None
    start = 0
    number = 0
    while True:
        if number > 0 and not on_disk:
            sleep(nvd_interval(api_key))
        if on_disk:  # a folder of pages as fetch_source writes them
            page_url = url.rstrip("/") + "/" + NVD_PAGE_NAME.format(number)
        else:
            page_url = _with_query(url, startIndex=start, resultsPerPage=NVD_MAX_RESULTS_PER_PAGE)
        dest = workdir / NVD_PAGE_NAME.format(number)
        try:
            got = _download(source, page_url, dest, written, headers=headers, progress=None)
        except HTTPStatusError as e:
            if e.status == 403:  # how NVD answers a client over its rate limit, or an unknown API key
                raise HTTPStatusError(
                    f"NVD refused the page at startIndex {start} (HTTP 403): NVD answers so when requests come too "
                    "fast or the API key is not valid",
                    url=e.url,
                    status=e.status,
                    retryable=True,
                    fix="retry in a minute; if it persists, check the key in AMIFORGE_NVD_API_KEY (or unset it)",
                ) from None
            raise
        page = _check_nvd_page(got, source)
        if page.start != start:
            raise InfraError(
                f"NVD answered startIndex {page.start} when asked for {start} ({got.url}): its data moved while "
                "amiforge paged through it",
                retryable=True,
                fix="retry later, once NVD has finished updating",
            )
        if first is None:
            first = page
        elif page.total != first.total:
            raise InfraError(
                f"NVD's totalResults changed from {first.total} to {page.total} at startIndex {start}: its data "
                "moved while amiforge paged through it",
                retryable=True,
                fix="retry later, once NVD has finished updating",
            )
        start += page.count
        number += 1
        if progress is not None:
            progress(start, first.total)
        if start >= first.total:
            return
        if page.count == 0:
            raise InfraError(
                f"NVD answered an empty page at startIndex {start} of {first.total} ({got.url})",
                retryable=True,
                fix="retry later, once NVD has finished updating",
            )


def _check_nvd_page(got: Downloaded, source: Source) -> _Page:
    data = read_input(got.path, what=source.what, max_bytes=source.max_bytes, fix=_NVD_FORMAT_FIX)
    try:
        page = parse_json(data, file=got.url, what=source.what, fix=_NVD_FORMAT_FIX)
    except ConfigError as e:
        raise _unknown_format(e.problems) from None
    if not isinstance(page, dict):
        raise _unknown_format([Problem(f"the answer is a JSON {json_type(page)}, not an object", file=got.url)])
    problems: list[Problem] = []
    if page.get("format") != NVD_FORMAT:
        problems.append(Problem(f"is {page.get('format')!r}, expected {NVD_FORMAT!r}", file=got.url, field="format"))
    numbers: dict[str, int] = {}
    for key in ("totalResults", "startIndex", "resultsPerPage"):
        value = page.get(key)
        if isinstance(value, int) and not isinstance(value, bool) and value >= 0:
            numbers[key] = value
        else:
            problems.append(Problem(f"is {value!r}, expected a whole number", file=got.url, field=key))
    vulnerabilities = page.get("vulnerabilities")
    if not isinstance(vulnerabilities, list):
        problems.append(
            Problem(f"is a {json_type(vulnerabilities)}, expected an array", file=got.url, field="vulnerabilities")
        )
    if problems or not isinstance(vulnerabilities, list):
        raise _unknown_format(problems)
    return _Page(total=numbers["totalResults"], start=numbers["startIndex"], count=len(vulnerabilities))


def _unknown_format(problems: list[Problem]) -> ConfigError:
    return ConfigError(
        "the NVD API answered in a format amiforge does not know", problems=problems, fix=_NVD_FORMAT_FIX
    )


def _with_query(url: str, **params: int) -> str:
    """`url` with `params` set in its query (replacing any already there; a mirror's own parameters are kept)."""
    parts = urlsplit(url)
    query = [(k, v) for k, v in parse_qsl(parts.query, keep_blank_values=True) if k not in params]
    query += [(k, str(v)) for k, v in params.items()]
    return urlunsplit(parts._replace(query=urlencode(query)))


def _check_api_key(key: str) -> None:
    # Never echoed: it is a credential. A header value with a line break would be a header injection.
    if not all(33 <= ord(c) <= 126 for c in key):
        raise ConfigError(
            "the NVD API key (AMIFORGE_NVD_API_KEY) holds spaces or characters an API key cannot have",
            fix="set AMIFORGE_NVD_API_KEY to the key NVD sent you (a UUID), or unset it",
        )
