"""The feed download layer against a real HTTP server on 127.0.0.1 (never the internet): what is kept, what is
refused, and that a refused download leaves nothing behind.

Every feed body here is synthetic: TEST-… ids, and CVE-2999-… where NVD's shape wants a CVE id (2999: no such year,
so no real CVE is presented as data).
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import http.server
import io
import json
import socket
import threading
import time
import urllib.parse
import zipfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import UTC
from pathlib import Path

import pytest

from amiforge.errors import ConfigError, InfraError
from amiforge.feeds import (
    MAX_REDIRECTS,
    SOURCES,
    HTTPStatusError,
    check_redirect,
    download,
    fetch_source,
    nvd_interval,
)

Route = Callable[["_Handler"], None]


@dataclass
class _Seen:
    path: str
    query: dict[str, str]
    headers: dict[str, str]  # names lower-cased


@dataclass
class _Site:
    """What the loopback server answers (path → route) and what it was asked."""

    port: int
    routes: dict[str, Route] = field(default_factory=dict)
    seen: list[_Seen] = field(default_factory=list)
    release: threading.Event = field(default_factory=threading.Event)  # set at teardown: hung routes return

    def url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.port}{path}"


class _Handler(http.server.BaseHTTPRequestHandler):
    site: _Site  # set on the per-server subclass

    def do_GET(self) -> None:
        parts = urllib.parse.urlsplit(self.path)
        headers = {name.lower(): value for name, value in self.headers.items()}
        self.site.seen.append(_Seen(parts.path, dict(urllib.parse.parse_qsl(parts.query)), headers))
        route = self.site.routes.get(parts.path)
        if route is None:
            self.send_error(404)
            return
        with contextlib.suppress(BrokenPipeError, ConnectionResetError):  # the client gave up first, as wanted
            route(self)

    def log_message(self, format: str, *args: object) -> None:
        pass


@pytest.fixture
def make_site() -> Iterator[Callable[[], _Site]]:
    started: list[tuple[http.server.ThreadingHTTPServer, threading.Thread, _Site]] = []

    def make() -> _Site:
        class Handler(_Handler):  # one class per server: its routes are its own
            pass

        server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        site = _Site(port=server.server_address[1])
        Handler.site = site
        thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.01}, daemon=True)
        thread.start()
        started.append((server, thread, site))
        return site

    yield make
    for server, thread, site in started:
        site.release.set()
        server.shutdown()
        server.server_close()
        thread.join(timeout=5)


@pytest.fixture
def site(make_site: Callable[[], _Site]) -> _Site:
    return make_site()


@pytest.fixture(autouse=True)
def no_proxy(monkeypatch: pytest.MonkeyPatch) -> None:
    """urllib honours *_proxy variables: a developer's proxy must not see (or answer for) the loopback server."""
    for name in ("http_proxy", "https_proxy", "all_proxy", "HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY"):
        monkeypatch.delenv(name, raising=False)


# --- routes -------------------------------------------------------------------------------------------------------


def _body(data: bytes, *, status: int = 200, headers: tuple[tuple[str, str], ...] = (), length: bool = True) -> Route:
    def route(h: _Handler) -> None:
        h.send_response(status)
        for name, value in headers:
            h.send_header(name, value)
        if length:
            h.send_header("Content-Length", str(len(data)))
        h.end_headers()
        h.wfile.write(data)

    return route


def _redirect(to: str, status: int = 302) -> Route:
    def route(h: _Handler) -> None:
        h.send_response(status)
        h.send_header("Location", to)
        h.send_header("Content-Length", "0")
        h.end_headers()

    return route


def _md5(data: bytes) -> str:
    return base64.b64encode(hashlib.md5(data).digest()).decode()


def _listing(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir())


FEED = b"TEST-2026-0001 synthetic feed line\n" * 300  # 10.5 KiB


# --- download: what is kept ------------------------------------------------------------------------------------


def test_good_download_is_kept_whole_with_its_digest_and_headers(site: _Site, tmp_path: Path) -> None:
    site.routes["/feed"] = _body(FEED, headers=(("ETag", '"v1"'), ("Last-Modified", "Mon, 02 Feb 2026 10:00:00 GMT")))
    seen: list[tuple[int, int | None]] = []
    got = download(
        site.url("/feed"),
        tmp_path / "feed.bin",
        what="a test feed",
        max_bytes=1 << 20,
        expected_sha256=hashlib.sha256(FEED).hexdigest().upper(),  # case does not matter
        progress=lambda done, total: seen.append((done, total)),
    )
    assert (tmp_path / "feed.bin").read_bytes() == FEED
    assert got.path == tmp_path / "feed.bin"
    assert got.url == site.url("/feed")
    assert (got.size, got.sha256) == (len(FEED), hashlib.sha256(FEED).hexdigest())
    assert (got.etag, got.last_modified) == ('"v1"', "Mon, 02 Feb 2026 10:00:00 GMT")
    assert seen[-1] == (len(FEED), len(FEED))
    assert _listing(tmp_path) == ["feed.bin"]  # no temporary file left beside it
    assert site.seen[0].headers["accept-encoding"] == "identity"
    assert site.seen[0].headers["user-agent"].startswith("amiforge")


def test_gcs_md5_is_checked_whether_sent_as_one_header_or_two(site: _Site, tmp_path: Path) -> None:
    site.routes["/two"] = _body(
        FEED, headers=(("x-goog-hash", "crc32c=AAAAAA=="), ("x-goog-hash", f"md5={_md5(FEED)}"))
    )
    site.routes["/one"] = _body(FEED, headers=(("x-goog-hash", f"crc32c=AAAAAA==, md5={_md5(FEED)}"),))
    for path in ("/two", "/one"):
        got = download(site.url(path), tmp_path / "all.zip", what="a test feed", max_bytes=1 << 20)
        assert got.sha256 == hashlib.sha256(FEED).hexdigest()


def test_wrong_gcs_md5_is_a_retryable_error_and_nothing_is_kept(site: _Site, tmp_path: Path) -> None:
    wrong = _md5(b"other bytes")
    site.routes["/feed"] = _body(FEED, headers=(("x-goog-hash", "crc32c=AAAAAA=="), ("x-goog-hash", f"md5={wrong}")))
    with pytest.raises(InfraError) as caught:
        download(site.url("/feed"), tmp_path / "all.zip", what="a test feed", max_bytes=1 << 20)
    assert caught.value.retryable
    assert f"its MD5 is {_md5(FEED)}, Google Cloud Storage's x-goog-hash says {wrong}" in caught.value.message
    assert _listing(tmp_path) == []


def test_gcs_stored_length_other_than_received_is_an_error(site: _Site, tmp_path: Path) -> None:
    site.routes["/feed"] = _body(FEED, headers=(("x-goog-stored-content-length", str(len(FEED) + 1)),))
    with pytest.raises(InfraError) as caught:
        download(site.url("/feed"), tmp_path / "all.zip", what="a test feed", max_bytes=1 << 20)
    assert f"stored object is {len(FEED) + 1}" in caught.value.message
    assert _listing(tmp_path) == []


def test_a_transcoded_gcs_object_is_not_held_to_its_stored_md5(site: _Site, tmp_path: Path) -> None:
    # Stored gzip-compressed, served decompressed: x-goog-hash describes the stored bytes, not these.
    headers = (
        ("x-goog-stored-content-encoding", "gzip"),
        ("x-goog-stored-content-length", "17"),
        ("x-goog-hash", f"md5={_md5(b'the gzip bytes')}"),
    )
    site.routes["/feed"] = _body(FEED, headers=headers)
    got = download(site.url("/feed"), tmp_path / "f", what="a test feed", max_bytes=1 << 20)
    assert got.size == len(FEED)


def test_file_url_is_copied_with_the_same_checks(tmp_path: Path) -> None:
    mirror = tmp_path / "mirror"
    mirror.mkdir()
    (mirror / "feed.bin").write_bytes(FEED)
    out = tmp_path / "out"
    out.mkdir()
    got = download((mirror / "feed.bin").as_uri(), out / "feed.bin", what="a test feed", max_bytes=1 << 20)
    assert (out / "feed.bin").read_bytes() == FEED
    assert (got.sha256, got.etag) == (hashlib.sha256(FEED).hexdigest(), None)
    assert got.last_modified is not None and got.last_modified.endswith("GMT")
    with pytest.raises(ConfigError) as caught:
        download((mirror / "feed.bin").as_uri(), out / "small", what="a test feed", max_bytes=100)
    assert "larger than the 100 bytes amiforge accepts" in caught.value.message
    with pytest.raises(ConfigError) as missing:
        download((mirror / "gone.bin").as_uri(), out / "gone", what="a test feed", max_bytes=100)
    assert missing.value.message == f"a test feed {mirror / 'gone.bin'} does not exist"
    assert _listing(out) == ["feed.bin"]


def test_file_url_copy_is_held_to_the_deadline(tmp_path: Path) -> None:
    mirror = tmp_path / "feed.bin"
    mirror.write_bytes(FEED)
    with pytest.raises(InfraError) as caught:
        download(mirror.as_uri(), tmp_path / "copy", what="a test feed", max_bytes=1 << 20, deadline=0.0)
    assert caught.value.retryable
    assert "took longer than 0 s (0 of 10500 bytes)" in caught.value.message
    assert _listing(tmp_path) == ["feed.bin"]


# --- download: what is refused, leaving nothing ---------------------------------------------------------------


def test_truncated_body_is_a_retryable_error_and_nothing_is_kept(site: _Site, tmp_path: Path) -> None:
    def route(h: _Handler) -> None:
        h.send_response(200)
        h.send_header("Content-Length", "100")
        h.end_headers()
        h.wfile.write(b"x" * 50)  # then the connection closes (HTTP/1.0)

    site.routes["/feed"] = route
    with pytest.raises(InfraError) as caught:
        download(site.url("/feed"), tmp_path / "feed.bin", what="a test feed", max_bytes=1 << 20)
    assert caught.value.retryable
    assert "cut short: 50 of the 100 bytes the server announced arrived" in caught.value.message
    assert _listing(tmp_path) == []


def test_wrong_expected_sha256_is_refused_and_nothing_is_kept(site: _Site, tmp_path: Path) -> None:
    site.routes["/feed"] = _body(FEED)
    with pytest.raises(ConfigError) as caught:
        download(site.url("/feed"), tmp_path / "f", what="a test feed", max_bytes=1 << 20, expected_sha256="0" * 64)
    assert f"its sha256 is {hashlib.sha256(FEED).hexdigest()}, expected {'0' * 64}" in caught.value.message
    assert caught.value.problems[0].field == "sha256"
    assert _listing(tmp_path) == []


def test_server_that_stops_after_the_headers_is_abandoned_at_the_stall_timeout(site: _Site, tmp_path: Path) -> None:
    def route(h: _Handler) -> None:
        h.send_response(200)
        h.send_header("Content-Length", "100")
        h.end_headers()
        h.wfile.write(b"x" * 10)
        h.wfile.flush()
        site.release.wait(10)

    site.routes["/feed"] = route
    started = time.monotonic()
    with pytest.raises(InfraError) as caught:
        download(site.url("/feed"), tmp_path / "f", what="a test feed", max_bytes=1 << 20, stall_timeout=0.5)
    assert time.monotonic() - started < 3
    assert caught.value.retryable
    assert "the server stopped sending a test feed" in caught.value.message
    assert "nothing for 0.5 s after 10 of 100 bytes" in caught.value.message
    assert _listing(tmp_path) == []


def test_server_that_never_answers_is_abandoned_at_the_stall_timeout(tmp_path: Path) -> None:
    # Listening, so the connection is made by the kernel, but never accepted: the request gets no answer.
    with socket.socket() as silent:
        silent.bind(("127.0.0.1", 0))
        silent.listen(1)
        url = f"http://127.0.0.1:{silent.getsockname()[1]}/feed"
        started = time.monotonic()
        with pytest.raises(InfraError) as caught:
            download(url, tmp_path / "f", what="a test feed", max_bytes=1 << 20, stall_timeout=0.5)
    assert time.monotonic() - started < 3
    assert caught.value.retryable
    assert caught.value.message == f"{url} did not answer within 0.5 s (asked for a test feed)"
    assert _listing(tmp_path) == []


def test_trickling_body_is_abandoned_at_the_deadline(site: _Site, tmp_path: Path) -> None:
    def route(h: _Handler) -> None:
        h.send_response(200)
        h.send_header("Content-Length", "1000")
        h.end_headers()
        while not site.release.wait(0.05):  # a byte now and then: never a stall
            h.wfile.write(b"x")
            h.wfile.flush()

    site.routes["/feed"] = route
    started = time.monotonic()
    with pytest.raises(InfraError) as caught:
        download(
            site.url("/feed"), tmp_path / "f", what="a test feed", max_bytes=1 << 20, stall_timeout=2, deadline=0.5
        )
    assert time.monotonic() - started < 2
    assert caught.value.retryable
    assert "took longer than 0.5 s" in caught.value.message
    assert _listing(tmp_path) == []


def test_trickling_headers_are_abandoned_at_the_deadline(site: _Site, tmp_path: Path) -> None:
    def route(h: _Handler) -> None:
        h.wfile.write(b"HTTP/1.1 200 OK\r\n")
        while not site.release.wait(0.05):  # headers that never end, a line now and then
            h.wfile.write(b"X-Slow: 1\r\n")
            h.wfile.flush()

    site.routes["/feed"] = route
    started = time.monotonic()
    with pytest.raises(InfraError) as caught:
        download(
            site.url("/feed"), tmp_path / "f", what="a test feed", max_bytes=1 << 20, stall_timeout=2, deadline=0.5
        )
    assert time.monotonic() - started < 2
    assert "took longer than 0.5 s" in caught.value.message


def test_404_is_a_config_error_naming_the_url(site: _Site, tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as caught:
        download(site.url("/nowhere"), tmp_path / "f", what="a test feed", max_bytes=1 << 20)
    assert caught.value.message == f"no such file at {site.url('/nowhere')} (HTTP 404): check the source URL"
    assert caught.value.problems[0].file == site.url("/nowhere")
    assert _listing(tmp_path) == []


@pytest.mark.parametrize(("status", "retryable"), [(500, True), (503, True), (429, True), (403, False)])
def test_other_statuses_are_infra_errors_naming_url_and_status(
    site: _Site, tmp_path: Path, status: int, retryable: bool
) -> None:
    site.routes["/feed"] = _body(b"no", status=status)
    with pytest.raises(HTTPStatusError) as caught:
        download(site.url("/feed"), tmp_path / "f", what="a test feed", max_bytes=1 << 20)
    assert (caught.value.status, caught.value.url, caught.value.retryable) == (status, site.url("/feed"), retryable)
    assert caught.value.message.startswith(f"{site.url('/feed')} answered HTTP {status} ")
    assert _listing(tmp_path) == []


def test_body_over_the_cap_is_refused_before_reading_when_announced(site: _Site, tmp_path: Path) -> None:
    site.routes["/feed"] = _body(FEED)
    seen: list[tuple[int, int | None]] = []
    with pytest.raises(ConfigError) as caught:
        download(
            site.url("/feed"),
            tmp_path / "f",
            what="a test feed",
            max_bytes=1000,
            progress=lambda done, total: seen.append((done, total)),
        )
    assert caught.value.message.endswith(f"larger than the 1000 bytes amiforge accepts for it: it is {len(FEED)} bytes")
    assert seen == []  # not a byte read
    assert _listing(tmp_path) == []


def test_body_over_the_cap_is_refused_while_reading_when_not_announced(site: _Site, tmp_path: Path) -> None:
    site.routes["/feed"] = _body(FEED, length=False)  # HTTP/1.0, read until the connection closes
    with pytest.raises(ConfigError) as caught:
        download(site.url("/feed"), tmp_path / "f", what="a test feed", max_bytes=1000)
    assert caught.value.message.endswith(
        "larger than the 1000 bytes amiforge accepts for it: more than 1000 bytes arrived"
    )
    assert _listing(tmp_path) == []


def test_compressed_answer_is_refused(site: _Site, tmp_path: Path) -> None:
    site.routes["/feed"] = _body(FEED, headers=(("Content-Encoding", "gzip"),))
    with pytest.raises(InfraError) as caught:
        download(site.url("/feed"), tmp_path / "f", what="a test feed", max_bytes=1 << 20)
    assert "compressed (Content-Encoding: gzip)" in caught.value.message
    assert _listing(tmp_path) == []


def test_interrupted_download_leaves_nothing(site: _Site, tmp_path: Path) -> None:
    site.routes["/feed"] = _body(FEED)

    def interrupt(done: int, total: int | None) -> None:
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        download(site.url("/feed"), tmp_path / "f", what="a test feed", max_bytes=1 << 20, progress=interrupt)
    assert _listing(tmp_path) == []


@pytest.mark.parametrize(
    ("url", "expected"),
    [
        ("ftp://127.0.0.1/feed", "cannot download a test feed from ftp://127.0.0.1/feed: its scheme is 'ftp'"),
        ("127.0.0.1/feed", "cannot download a test feed from 127.0.0.1/feed: its scheme is none"),
        ("http:///feed", "cannot download a test feed from http:///feed: the URL names no host"),
        ("http://127.0.0.1:99999/feed", "the URL for a test feed is not a valid URL: Port out of range 0-65535"),
    ],
)
def test_unusable_urls_are_refused_before_any_request(tmp_path: Path, url: str, expected: str) -> None:
    with pytest.raises(ConfigError) as caught:
        download(url, tmp_path / "f", what="a test feed", max_bytes=1 << 20)
    assert caught.value.message == expected
    assert _listing(tmp_path) == []


def test_credentials_in_the_url_are_refused_and_never_echoed(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as caught:
        download("https://user:s3cret-pw@mirror.test/feed", tmp_path / "f", what="a test feed", max_bytes=1 << 20)
    assert caught.value.message == "the URL for a test feed on mirror.test carries a user name or password"
    assert "s3cret-pw" not in caught.value.diagnostics()


# --- redirects ---------------------------------------------------------------------------------------------------


def test_redirects_are_followed_up_to_five(site: _Site, tmp_path: Path) -> None:
    site.routes["/feed"] = _body(FEED)
    for n in range(1, MAX_REDIRECTS + 1):
        site.routes[f"/r{n}"] = _redirect(f"/r{n - 1}" if n > 1 else "/feed")
    got = download(site.url(f"/r{MAX_REDIRECTS}"), tmp_path / "f", what="a test feed", max_bytes=1 << 20)
    assert got.url == site.url("/feed")
    assert (tmp_path / "f").read_bytes() == FEED
    assert [s.path for s in site.seen] == ["/r5", "/r4", "/r3", "/r2", "/r1", "/feed"]


def test_redirect_loop_is_refused_after_five(site: _Site, tmp_path: Path) -> None:
    site.routes["/loop"] = _redirect("/loop")
    with pytest.raises(ConfigError) as caught:
        download(site.url("/loop"), tmp_path / "f", what="a test feed", max_bytes=1 << 20)
    assert caught.value.message.startswith("refused to follow more than 5 redirects")
    assert len(site.seen) == 1 + MAX_REDIRECTS
    assert _listing(tmp_path) == []


def test_redirect_to_a_file_url_is_refused(site: _Site, tmp_path: Path) -> None:
    secret = tmp_path / "secret"
    secret.write_bytes(b"TEST local file a server must not make amiforge read")
    site.routes["/feed"] = _redirect(secret.as_uri())
    out = tmp_path / "out"
    out.mkdir()
    with pytest.raises(HTTPStatusError) as caught:
        download(site.url("/feed"), out / "f", what="a test feed", max_bytes=1 << 20)
    assert caught.value.status == 302
    assert "is not allowed" in caught.value.message
    assert _listing(out) == []


@pytest.mark.parametrize(
    ("source", "target", "followed", "refusal"),
    [
        ("https://mirror.test/a", "http://mirror.test/a", 0, "a redirect from https down to plain http"),
        ("https://mirror.test/a", "ftp://mirror.test/a", 0, "a redirect to a URL of scheme 'ftp'"),
        ("http://mirror.test/a", "http://mirror.test/b", MAX_REDIRECTS, "more than 5 redirects"),
        ("http://mirror.test/a", "https://u:p@mirror.test/b", 0, "a redirect to a URL carrying credentials"),
        ("http://mirror.test/a", "https://mirror.test/a", 0, None),  # up to https: fine
        ("https://mirror.test/a", "https://cdn.test/a", MAX_REDIRECTS - 1, None),
    ],
)
def test_redirect_policy(source: str, target: str, followed: int, refusal: str | None) -> None:
    if refusal is None:
        check_redirect(source, target, followed)
        return
    with pytest.raises(ConfigError) as caught:
        check_redirect(source, target, followed)
    assert caught.value.message.startswith(f"refused to follow {refusal}")
    assert caught.value.problems[0].file == source


def test_caller_headers_go_to_the_first_origin_only(make_site: Callable[[], _Site], tmp_path: Path) -> None:
    first, other = make_site(), make_site()
    first.routes["/feed"] = _redirect("/moved")  # same origin: the key goes along
    first.routes["/moved"] = _redirect(other.url("/feed"))  # another origin (port): it does not
    other.routes["/feed"] = _body(FEED)
    download(first.url("/feed"), tmp_path / "f", what="a test feed", max_bytes=1 << 20, headers={"apiKey": "TEST-KEY"})
    assert [s.headers.get("apikey") for s in first.seen] == ["TEST-KEY", "TEST-KEY"]
    assert [s.headers.get("apikey") for s in other.seen] == [None]
    assert (tmp_path / "f").read_bytes() == FEED


# --- sources: osv and debian ------------------------------------------------------------------------------------


def _zip(members: dict[str, bytes]) -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        for name, data in members.items():
            archive.writestr(name, data)
    return buffer.getvalue()


def _manifest_sha256(files: list[Path]) -> str:
    listing = "".join(f"{hashlib.sha256(p.read_bytes()).hexdigest()}  {p.name}\n" for p in files)
    return hashlib.sha256(listing.encode()).hexdigest()


def test_sources_are_the_official_endpoints_and_caps() -> None:
    assert {name: (s.default_url, s.max_bytes) for name, s in SOURCES.items()} == {
        "osv": ("https://osv-vulnerabilities.storage.googleapis.com/Debian/all.zip", 2 << 30),
        "debian": ("https://security-tracker.debian.org/tracker/data/json", 512 << 20),
        "cve": ("https://services.nvd.nist.gov/rest/json/cves/2.0", 64 << 20),
    }


def test_osv_zip_is_fetched_md5_checked_and_opened(site: _Site, tmp_path: Path) -> None:
    archive = _zip(
        {"TEST-2026-0001.json": b'{"id": "TEST-2026-0001"}', "TEST-2026-0002.json": b'{"id": "TEST-2026-0002"}'}
    )
    site.routes["/Debian/all.zip"] = _body(archive, headers=(("x-goog-hash", f"crc32c=AAAAAA==,md5={_md5(archive)}"),))
    got = fetch_source("osv", site.url("/Debian/all.zip"), tmp_path)
    assert (got.name, got.url, got.size) == ("osv", site.url("/Debian/all.zip"), len(archive))
    assert got.files == (tmp_path / "osv-debian-all.zip",)
    assert got.files[0].read_bytes() == archive
    assert got.sha256 == _manifest_sha256(list(got.files))
    assert got.fetched_at.tzinfo is UTC


@pytest.mark.parametrize(
    ("body", "found"),
    [
        (b"<html><body>TEST maintenance page</body></html>", "not a readable zip archive"),
        (_zip({}), "an empty zip archive"),
    ],
)
def test_osv_answer_that_is_no_usable_zip_is_a_config_error(
    site: _Site, tmp_path: Path, body: bytes, found: str
) -> None:
    site.routes["/all.zip"] = _body(body)
    with pytest.raises(ConfigError) as caught:
        fetch_source("osv", site.url("/all.zip"), tmp_path)
    assert found in caught.value.message
    assert caught.value.message.startswith(site.url("/all.zip"))
    assert _listing(tmp_path) == []


def test_debian_tracker_json_is_fetched_and_checked(site: _Site, tmp_path: Path) -> None:
    body = json.dumps({"test-package": {"TEST-2026-0001": {"releases": {"bookworm": {"status": "open"}}}}}).encode()
    site.routes["/tracker/data/json"] = _body(body)
    progress: list[tuple[int, int | None]] = []
    got = fetch_source(
        "debian", site.url("/tracker/data/json"), tmp_path, progress=lambda d, t: progress.append((d, t))
    )
    assert got.files == (tmp_path / "debian-security-tracker.json",)
    assert got.files[0].read_bytes() == body
    assert (got.size, got.sha256) == (len(body), _manifest_sha256(list(got.files)))
    assert progress[-1] == (len(body), len(body))


@pytest.mark.parametrize(
    ("body", "found"),
    [
        (b'[{"package": "test-package"}]', "a JSON array"),
        (b"<!DOCTYPE html><html><body>TEST error page</body></html>", "an HTML (or XML) page"),
        (b'{"test-package": ', "text that is not JSON (Expecting value at line 1 column 18)"),
        (b"", "an empty answer"),
    ],
)
def test_debian_schema_change_is_a_config_error_naming_url_and_what_was_found(
    site: _Site, tmp_path: Path, body: bytes, found: str
) -> None:
    site.routes["/json"] = _body(body)
    with pytest.raises(ConfigError) as caught:
        fetch_source("debian", site.url("/json"), tmp_path)
    assert caught.value.message == (
        f"{site.url('/json')} did not answer with the Debian Security Tracker's JSON: "
        f"expected a JSON object at the top, found {found}"
    )
    assert caught.value.problems[0].file == site.url("/json")
    assert _listing(tmp_path) == []


def test_debian_from_a_file_url(tmp_path: Path) -> None:
    mirror = tmp_path / "mirror.json"
    mirror.write_bytes(b'{"test-package": {}}')
    got = fetch_source("debian", mirror.as_uri(), tmp_path / "work")
    assert got.files[0].read_bytes() == b'{"test-package": {}}'


def test_unknown_source_is_a_config_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as caught:
        fetch_source("rhel", None, tmp_path)
    assert (caught.value.message, caught.value.fix) == (
        "unknown vulnerability source 'rhel'",
        "use one of: osv, debian, cve",
    )


# --- sources: NVD -----------------------------------------------------------------------------------------------


def _nvd_page(start: int, count: int, total: int, **override: object) -> dict[str, object]:
    # CVE-2999-…: synthetic ids in the shape NVD's records have.
    vulns = [{"cve": {"id": f"CVE-2999-{n:04d}"}} for n in range(start + 1, start + count + 1)]
    page: dict[str, object] = {
        "resultsPerPage": count,
        "startIndex": start,
        "totalResults": total,
        "format": "NVD_CVE",
        "version": "2.0",
        "timestamp": "2026-01-01T00:00:00.000",
        "vulnerabilities": vulns,
    }
    return {**page, **override}


def _nvd_route(site: _Site, pages: dict[int, dict[str, object]]) -> Route:
    """Answers the page for the startIndex asked, 2 records at most, as a server that caps resultsPerPage does."""

    def route(h: _Handler) -> None:
        start = int(site.seen[-1].query["startIndex"])
        _body(json.dumps(pages[start]).encode())(h)

    return route


THREE_PAGES = {0: _nvd_page(0, 2, 5), 2: _nvd_page(2, 2, 5), 4: _nvd_page(4, 1, 5)}


@pytest.mark.parametrize(("api_key", "interval"), [(None, 6.0), ("TEST-0000-nvd-key", 0.6)])
def test_nvd_pages_are_fetched_in_order_spaced_by_the_rate_limit(
    site: _Site, tmp_path: Path, api_key: str | None, interval: float
) -> None:
    site.routes["/rest/json/cves/2.0"] = _nvd_route(site, THREE_PAGES)
    slept: list[float] = []
    progress: list[tuple[int, int | None]] = []
    got = fetch_source(
        "cve",
        site.url("/rest/json/cves/2.0"),
        tmp_path,
        api_key=api_key,
        sleep=slept.append,
        progress=lambda d, t: progress.append((d, t)),
    )
    assert [s.query for s in site.seen] == [{"startIndex": str(i), "resultsPerPage": "2000"} for i in (0, 2, 4)]
    assert [s.headers.get("apikey") for s in site.seen] == [api_key] * 3
    assert slept == [interval, interval] == [nvd_interval(api_key)] * 2
    assert progress == [(2, 5), (4, 5), (5, 5)]
    assert got.files == tuple(tmp_path / f"page-0000{n}.json" for n in range(3))
    assert [json.loads(p.read_bytes()) for p in got.files] == [THREE_PAGES[0], THREE_PAGES[2], THREE_PAGES[4]]
    assert got.sha256 == _manifest_sha256(list(got.files))
    assert got.size == sum(p.stat().st_size for p in got.files)


def test_nvd_pages_from_a_folder_mirror_give_the_same_digest(site: _Site, tmp_path: Path) -> None:
    site.routes["/cves"] = _nvd_route(site, THREE_PAGES)
    fetched = fetch_source("cve", site.url("/cves"), tmp_path / "fetched", sleep=lambda s: None)
    slept: list[float] = []
    mirrored = fetch_source("cve", (tmp_path / "fetched").as_uri(), tmp_path / "copy", sleep=slept.append)
    assert mirrored.sha256 == fetched.sha256
    assert [p.name for p in mirrored.files] == ["page-00000.json", "page-00001.json", "page-00002.json"]
    assert slept == []  # no rate limit on a disk


def test_nvd_total_changing_midway_is_retryable_and_keeps_no_pages(site: _Site, tmp_path: Path) -> None:
    site.routes["/cves"] = _nvd_route(site, {0: _nvd_page(0, 2, 5), 2: _nvd_page(2, 2, 7)})
    with pytest.raises(InfraError) as caught:
        fetch_source("cve", site.url("/cves"), tmp_path, sleep=lambda s: None)
    assert caught.value.retryable
    assert caught.value.message.startswith("NVD's totalResults changed from 5 to 7 at startIndex 2")
    assert _listing(tmp_path) == []


def test_nvd_page_at_another_start_index_is_retryable_and_keeps_no_pages(site: _Site, tmp_path: Path) -> None:
    site.routes["/cves"] = _nvd_route(site, {0: _nvd_page(0, 2, 5), 2: _nvd_page(3, 2, 5)})
    with pytest.raises(InfraError) as caught:
        fetch_source("cve", site.url("/cves"), tmp_path, sleep=lambda s: None)
    assert caught.value.retryable
    assert caught.value.message.startswith("NVD answered startIndex 3 when asked for 2")
    assert _listing(tmp_path) == []


@pytest.mark.parametrize(
    ("body", "fields"),
    [
        (json.dumps(_nvd_page(0, 1, 1, format="NVD_CPE")).encode(), ["format"]),
        (
            json.dumps(_nvd_page(0, 1, 1, totalResults="1", vulnerabilities={})).encode(),
            ["totalResults", "vulnerabilities"],
        ),
        (json.dumps(_nvd_page(0, 1, 1, startIndex=True)).encode(), ["startIndex"]),
        (b"[]", [None]),
        (b"<html>TEST</html>", [None]),
    ],
)
def test_nvd_answer_in_an_unknown_format_is_a_config_error(
    site: _Site, tmp_path: Path, body: bytes, fields: list[str | None]
) -> None:
    site.routes["/cves"] = _body(body)
    with pytest.raises(ConfigError) as caught:
        fetch_source("cve", site.url("/cves"), tmp_path, sleep=lambda s: None)
    assert caught.value.message == "the NVD API answered in a format amiforge does not know"
    assert [p.field for p in caught.value.problems] == fields
    assert _listing(tmp_path) == []


def test_nvd_403_says_rate_limit_or_key_and_is_retryable(site: _Site, tmp_path: Path) -> None:
    site.routes["/cves"] = _body(b"forbidden", status=403)
    with pytest.raises(HTTPStatusError) as caught:
        fetch_source("cve", site.url("/cves"), tmp_path, api_key="TEST-0000-nvd-key")
    assert (caught.value.status, caught.value.retryable) == (403, True)
    assert "requests come too fast or the API key is not valid" in caught.value.message
    assert "TEST-0000-nvd-key" not in caught.value.diagnostics()


def test_nvd_key_that_could_inject_a_header_is_refused_unechoed(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as caught:
        fetch_source("cve", "http://127.0.0.1:9/cves", tmp_path, api_key="TEST\r\nX-Injected: 1")
    assert "AMIFORGE_NVD_API_KEY" in caught.value.message
    assert "Injected" not in caught.value.diagnostics()
