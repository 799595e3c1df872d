"""One file fetched over HTTP(S), or copied from a file:// URL, and kept only when every check passed.

`download` writes into a temporary file next to its destination and renames it into place at the end; on any failure
(and on Ctrl-C) the temporary file is removed, so a destination is either the whole, checked file or absent. What is
checked: the HTTP status; the length the server announced against the bytes received (a cut connection is a
truncated file, not a smaller one); a size cap, before reading when the server says the size and while reading when it
does not; a server that stops sending (`stall_timeout`); the whole transfer's `deadline`; the MD5 Google Cloud Storage
sends in `x-goog-hash` (osv.dev's exports are GCS objects); and a sha256 the caller expects.

Only the standard library: urllib.request brings what a mirror behind a corporate proxy needs (the *_proxy variables,
as every other tool honours them) and redirects; http.client's per-read socket timeout is the stall check. What it
lacks is added here: a watchdog that ends the transfer at its deadline even inside a read that keeps getting a byte
now and then (it shuts the socket down, which wakes any blocked read), a redirect policy (at most 5, never from https
to http, headers such as an API key never sent to another origin), and `Accept-Encoding: identity`, so the bytes
hashed are the bytes the server stores.
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import hashlib
import http.client
import logging
import os
import socket
import ssl
import tempfile
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from email.utils import formatdate
from importlib import metadata
from pathlib import Path
from types import MappingProxyType
from typing import Any, BinaryIO
from urllib.parse import SplitResult, urlsplit
from urllib.request import url2pathname

from amiforge.errors import AmiforgeError, ConfigError, InfraError, Problem
from amiforge.inputs import KIB, MIB, open_input

log = logging.getLogger(__name__)

SCHEMES = ("http", "https", "file")
MAX_REDIRECTS = 5
CHUNK = MIB
_NO_HEADERS: Mapping[str, str] = MappingProxyType({})
# 408 Request Timeout, 425 Too Early, 429 Too Many Requests and every 5xx: the same request may succeed later.
_RETRYABLE_STATUS = frozenset({408, 425, 429})
_RETRY_FIX = "retry later; if it keeps failing, point the source at a mirror (its URL can be overridden)"

Progress = Callable[[int, int | None], None]


@dataclass(frozen=True)
class Downloaded:
    """A file `download` kept: `url` is where its bytes came from (after redirects), `path` where they are now.
    `etag` and `last_modified` are the server's headers (for a file:// URL, no ETag and the file's mtime)."""

    url: str
    path: Path
    size: int
    sha256: str
    etag: str | None
    last_modified: str | None


class HTTPStatusError(InfraError):
    """A server answered with a status other than 2xx (404 is a ConfigError instead: the URL is wrong)."""

    def __init__(self, message: str, *, url: str, status: int, retryable: bool, fix: str | None = None) -> None:
        super().__init__(message, retryable=retryable, fix=fix)
        self.url = url
        self.status = status


def check_url(url: str, *, what: str) -> SplitResult:
    """`url` split, if amiforge can download `what` from it: http, https or file, a host for http(s), no
    credentials in it; a ConfigError otherwise."""
    fix = "give an http://, https:// or file:// URL (file:///path for a mirror on this machine's disk)"
    try:
        parts = urlsplit(url)
        _ = parts.port  # raises ValueError for a port that is not a number in 0..65535
    except ValueError as e:
        raise ConfigError(
            f"the URL for {what} is not a valid URL: {e}", problems=[Problem(str(e), file=url)], fix=fix
        ) from None
    scheme = parts.scheme.lower()
    if scheme not in SCHEMES:
        shown = f"'{scheme}'" if scheme else "none"
        raise ConfigError(
            f"cannot download {what} from {url}: its scheme is {shown}",
            problems=[Problem(f"scheme {shown}: amiforge downloads only over http, https or from file://", file=url)],
            fix=fix,
        )
    if parts.username is not None or parts.password is not None:
        # Never echoed: the message names the host only, as the URL holds a password.
        raise ConfigError(
            f"the URL for {what} on {parts.hostname} carries a user name or password",
            fix="amiforge sends no credentials from URLs (they would end up in logs): use a mirror that needs none",
        )
    if scheme == "file":
        if parts.netloc not in ("", "localhost") or parts.query:
            raise ConfigError(
                f"cannot read {what} from {url}: a file:// URL names a path on this machine, without host or query",
                problems=[Problem("expected file:///absolute/path", file=url)],
                fix="write it as file:///absolute/path",
            )
    elif not parts.hostname:
        raise ConfigError(
            f"cannot download {what} from {url}: the URL names no host",
            problems=[Problem("no host name", file=url)],
            fix=fix,
        )
    return parts


def check_redirect(from_url: str, to_url: str, followed: int) -> None:
    """Whether a server's redirect from `from_url` to `to_url` may be followed, when `followed` redirects already
    were: at most MAX_REDIRECTS in all, only to http(s) without credentials, and never from https down to http (a
    redirect must not take away the protection the URL asked for). A ConfigError naming both URLs otherwise."""
    source, target = urlsplit(from_url), urlsplit(to_url)
    problem: str | None = None
    if followed >= MAX_REDIRECTS:
        problem = f"more than {MAX_REDIRECTS} redirects (a redirect loop, or a chain too long to be a mirror)"
    elif target.scheme.lower() not in ("http", "https"):
        problem = f"a redirect to a URL of scheme '{target.scheme}'; amiforge follows only http(s) redirects"
    elif source.scheme.lower() == "https" and target.scheme.lower() == "http":
        problem = "a redirect from https down to plain http"
    elif target.username is not None or target.password is not None:
        problem = "a redirect to a URL carrying credentials"
    if problem is not None:
        shown = f"{target.scheme}://{target.hostname}/…" if target.username or target.password else to_url
        raise ConfigError(
            f"refused to follow {problem}: {from_url} → {shown}",
            problems=[Problem(problem, file=from_url)],
            fix="give the final URL (https, if the server offers it) directly instead of one that redirects",
        )


def download(
    url: str,
    dest: Path,
    *,
    what: str,
    max_bytes: int,
    stall_timeout: float = 60.0,
    deadline: float = 3600.0,
    expected_sha256: str | None = None,
    headers: Mapping[str, str] = _NO_HEADERS,
    progress: Progress | None = None,
) -> Downloaded:
    """Fetch `url` (`what` names it in errors, e.g. "the Debian Security Tracker's JSON") into `dest`, replacing
    it, once every check passed; nothing at `dest`, nor beside it, otherwise. `progress(bytes so far, total or
    None)` is called after each chunk. `headers` (e.g. an API key) are sent to `url`'s origin only.

    ConfigError: an unusable URL, HTTP 404/410, a refused redirect, a body over `max_bytes`, a sha256 other than
    `expected_sha256`, a missing file:// path. InfraError (`retryable` where a later try may succeed): every other
    status (an HTTPStatusError), a server that cannot be reached, does not answer or stops sending for
    `stall_timeout` seconds, a transfer over `deadline` seconds, a truncated body, an MD5 other than GCS's."""
    parts = check_url(url, what=what)
    expected = _check_sha256(expected_sha256, what=what)
    deadline_at = time.monotonic() + deadline
    fd, tmp_name = _temp_next_to(dest, what=what)
    tmp = Path(tmp_name)
    try:
        with os.fdopen(fd, "wb") as out:
            sink = _Sink(out, dest=dest, url=url, what=what, max_bytes=max_bytes, progress=progress)
            if parts.scheme.lower() == "file":
                final_url, etag, last_modified = _copy_file(parts, sink, deadline_at=deadline_at, deadline=deadline)
            else:
                final_url, etag, last_modified = _fetch_http(
                    url, sink, headers=headers, stall_timeout=stall_timeout, deadline_at=deadline_at, deadline=deadline
                )
            sink.sync()
        sha256 = sink.sha256.hexdigest()
        if expected is not None and sha256 != expected:
            raise ConfigError(
                f"{what} from {final_url} is not the expected file: its sha256 is {sha256}, expected {expected}",
                problems=[Problem(f"sha256 {sha256}, expected {expected}", file=final_url, field="sha256")],
                fix="check the URL and the expected checksum (a mirror may hold another version of the file)",
            )
        os.replace(tmp, dest)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    log.info("downloaded %s from %s: %d bytes, sha256 %s", what, final_url, sink.size, sha256)
    return Downloaded(final_url, dest, sink.size, sha256, etag, last_modified)


# --- the bytes: size cap, hashes, progress, disk ---------------------------------------------------------------


class _Sink:
    """Where the bytes go: the temporary file, the hashes, the size cap and the caller's progress."""

    def __init__(
        self, out: BinaryIO, *, dest: Path, url: str, what: str, max_bytes: int, progress: Progress | None
    ) -> None:
        self.out, self.dest, self.url, self.what, self.max_bytes = out, dest, url, what, max_bytes
        self.progress = progress
        self.total: int | None = None
        self.size = 0
        self.sha256 = hashlib.sha256()
        self.md5: Any = None  # a hashlib md5, only while GCS announced one to compare with

    def expect(self, total: int | None) -> None:
        """The size the source announced: refused at once when it is over the cap."""
        self.total = total
        if total is not None and total > self.max_bytes:
            raise self.too_big(f"it is {_size(total)}")

    def write(self, chunk: bytes) -> None:
        self.size += len(chunk)
        if self.size > self.max_bytes:
            raise self.too_big(f"more than {_size(self.max_bytes)} arrived")
        try:
            self.out.write(chunk)
        except OSError as e:
            raise self.disk_error(e) from None
        self.sha256.update(chunk)
        if self.md5 is not None:
            self.md5.update(chunk)
        if self.progress is not None:
            self.progress(self.size, self.total)

    def sync(self) -> None:
        # On disk before the rename: a crash right after must not leave a renamed but empty or partial file.
        try:
            self.out.flush()
            os.fsync(self.out.fileno())
        except OSError as e:
            raise self.disk_error(e) from None

    def too_big(self, detail: str) -> ConfigError:
        cap = _size(self.max_bytes)
        return ConfigError(
            f"{self.what} at {self.url} is larger than the {cap} amiforge accepts for it: {detail}",
            problems=[Problem(f"larger than {cap}", file=self.url)],
            fix=f"check the URL points at {self.what} (a mirror may serve another file there)",
        )

    def disk_error(self, e: OSError) -> InfraError:
        return InfraError(
            f"cannot write {self.what} to {self.dest}: {e.strerror or e}",
            fix=f"check the free space and permissions of {self.dest.parent}",
        )


def _temp_next_to(dest: Path, *, what: str) -> tuple[int, str]:
    # Next to `dest`: the final rename stays on one file system, so it is atomic.
    try:
        return tempfile.mkstemp(dir=dest.parent, prefix=f".{dest.name}.", suffix=".part")
    except OSError as e:
        raise ConfigError(
            f"cannot write {what} to {dest}: {e.strerror or e}",
            problems=[Problem(f"cannot create a file: {e.strerror or e}", file=str(dest.parent))],
            fix="check the folder exists and is writable",
        ) from None


def _check_sha256(value: str | None, *, what: str) -> str | None:
    if value is None:
        return None
    digest = value.strip().lower()
    if len(digest) != 64 or any(c not in "0123456789abcdef" for c in digest):
        raise ConfigError(
            f"the expected sha256 of {what} is not a sha256 ({value!r})",
            fix="give the 64 hexadecimal digits `sha256sum` prints",
        )
    return digest


def _size(n: int) -> str:
    """Exact: a cap in whole MiB or KiB as such, anything else in bytes (with MiB alongside when large)."""
    for unit, name in ((MIB, "MiB"), (KIB, "KiB")):
        if n >= unit and n % unit == 0:
            return f"{n // unit} {name}"
    return f"{n} bytes ({n / MIB:.1f} MiB)" if n >= MIB else f"{n} bytes"


# --- file:// -----------------------------------------------------------------------------------------------------


def _copy_file(
    parts: SplitResult, sink: _Sink, *, deadline_at: float, deadline: float
) -> tuple[str, str | None, str | None]:
    path = Path(url2pathname(parts.path))
    fix = f"check the path in the URL; the mirror must hold {sink.what} there"
    # open_input: a regular file only (a FIFO would block forever, /dev/zero never ends).
    with open_input(path, what=sink.what, fix=fix) as f:
        info = os.fstat(f.fileno())
        sink.expect(info.st_size)
        while True:
            if time.monotonic() > deadline_at:
                raise _deadline_error(sink, deadline)
            try:
                chunk = f.read(CHUNK)
            except OSError as e:  # e.g. EIO on a failing disk
                raise InfraError(f"cannot read {sink.what} from {path}: {e.strerror or e}") from None
            if not chunk:
                break
            sink.write(chunk)
    if sink.size != info.st_size:
        raise InfraError(
            f"{sink.what} at {path} changed while amiforge copied it ({info.st_size} bytes, then {sink.size})",
            retryable=True,
            fix="retry once the mirror has finished writing it",
        )
    return parts.geturl(), None, formatdate(info.st_mtime, usegmt=True)


# --- http(s) -----------------------------------------------------------------------------------------------------


def _fetch_http(
    url: str,
    sink: _Sink,
    *,
    headers: Mapping[str, str],
    stall_timeout: float,
    deadline_at: float,
    deadline: float,
) -> tuple[str, str | None, str | None]:
    watchdog = _Watchdog(max(deadline_at - time.monotonic(), 0.0))
    try:
        response = _open(url, sink, headers=headers, stall_timeout=stall_timeout, watchdog=watchdog, deadline=deadline)
        with contextlib.closing(response):
            final_url = response.url
            sink.url = final_url
            total = _announced_length(response, sink)
            sink.expect(total)
            expected_md5, stored_length = _gcs_checks(response, sink)
            if expected_md5 is not None:
                sink.md5 = hashlib.md5(usedforsecurity=False)
            _read_body(response, sink, stall_timeout=stall_timeout, watchdog=watchdog, deadline=deadline)
            if total is not None and sink.size != total:
                raise InfraError(
                    f"the download of {sink.what} from {final_url} was cut short: "
                    f"{sink.size} of the {total} bytes the server announced arrived",
                    retryable=True,
                    fix=_RETRY_FIX,
                )
            if stored_length is not None and sink.size != stored_length:
                raise InfraError(
                    f"{sink.what} from {final_url} is {sink.size} bytes, but Google Cloud Storage says the stored "
                    f"object is {stored_length} (x-goog-stored-content-length)",
                    retryable=True,
                    fix=_RETRY_FIX,
                )
            if expected_md5 is not None and sink.md5 is not None and sink.md5.digest() != expected_md5:
                got = base64.b64encode(sink.md5.digest()).decode()
                want = base64.b64encode(expected_md5).decode()
                raise InfraError(
                    f"{sink.what} from {final_url} arrived damaged: its MD5 is {got}, Google Cloud Storage's "
                    f"x-goog-hash says {want}",
                    retryable=True,
                    fix="download it again (Cloud Storage's advice for a download whose hash does not match)",
                )
            return final_url, response.headers.get("ETag"), response.headers.get("Last-Modified")
    finally:
        watchdog.cancel()


def _open(
    url: str,
    sink: _Sink,
    *,
    headers: Mapping[str, str],
    stall_timeout: float,
    watchdog: _Watchdog,
    deadline: float,
) -> http.client.HTTPResponse:
    opener = urllib.request.build_opener(
        _HTTPHandler(watchdog), _HTTPSHandler(watchdog), _RedirectHandler(private=tuple(headers))
    )
    # identity: a server (or GCS transcoding) that compresses on the fly would make the bytes differ from the
    # bytes its length and hashes describe.
    request = urllib.request.Request(url, headers={"User-Agent": _USER_AGENT, **headers, "Accept-Encoding": "identity"})
    try:
        response: http.client.HTTPResponse = opener.open(request, timeout=stall_timeout)
    except AmiforgeError:
        raise  # a refused redirect
    except urllib.error.HTTPError as e:
        with contextlib.closing(e):
            raise _status_error(e.filename or url, e.code, e.reason, what=sink.what) from None
    except urllib.error.URLError as e:
        if watchdog.fired:
            raise _deadline_error(sink, deadline) from None
        raise _unreachable(url, e.reason, what=sink.what, stall_timeout=stall_timeout) from None
    except (OSError, http.client.HTTPException) as e:  # while waiting for the status line and headers
        if watchdog.fired:
            raise _deadline_error(sink, deadline) from None
        raise _unreachable(url, e, what=sink.what, stall_timeout=stall_timeout) from None
    return response


def _read_body(
    response: http.client.HTTPResponse, sink: _Sink, *, stall_timeout: float, watchdog: _Watchdog, deadline: float
) -> None:
    while True:
        try:
            # read1: returns what one read of the socket gave, so the deadline is checked however slowly bytes come.
            chunk = response.read1(CHUNK)
        except TimeoutError:
            if watchdog.fired:
                raise _deadline_error(sink, deadline) from None
            raise InfraError(
                f"the server stopped sending {sink.what} from {sink.url}: nothing for {stall_timeout:g} s after "
                f"{_progress_text(sink)}",
                retryable=True,
                fix=_RETRY_FIX,
            ) from None
        except (OSError, http.client.HTTPException) as e:  # a reset connection, a broken chunked encoding
            if watchdog.fired:
                raise _deadline_error(sink, deadline) from None
            raise InfraError(
                f"the download of {sink.what} from {sink.url} broke off after {_progress_text(sink)}: {_describe(e)}",
                retryable=True,
                fix=_RETRY_FIX,
            ) from None
        if watchdog.fired:  # a shut-down socket reads as the end of the body
            raise _deadline_error(sink, deadline)
        if not chunk:
            return
        sink.write(chunk)


def _announced_length(response: http.client.HTTPResponse, sink: _Sink) -> int | None:
    """The body length the server announced, or None (chunked, or read until the connection closes)."""
    encoding = (response.headers.get("Content-Encoding") or "identity").strip().lower()
    if encoding != "identity":
        raise InfraError(
            f"{sink.url} sent {sink.what} compressed (Content-Encoding: {encoding}) although amiforge asked for it "
            f"as stored",
            fix="check the mirror's configuration: it must serve the file as it is stored",
        )
    values = response.headers.get_all("Content-Length") or []
    if response.chunked or not values:
        return None
    if len({v.strip() for v in values}) != 1 or not values[0].strip().isdigit():
        raise InfraError(
            f"{sink.url} announced an invalid Content-Length ({', '.join(values)}) for {sink.what}",
            fix="check the mirror or proxy between this machine and the source",
        )
    return int(values[0])


def _gcs_checks(response: http.client.HTTPResponse, sink: _Sink) -> tuple[bytes | None, int | None]:
    """(the MD5 to expect, the length to expect) from Google Cloud Storage's headers, when it sent them and they
    describe the bytes served. A gzip-stored object served decompressed (decompressive transcoding) is not those
    bytes, so neither is checked then."""
    stored_encoding = (response.headers.get("x-goog-stored-content-encoding") or "identity").strip().lower()
    if stored_encoding != "identity":
        log.debug("%s is stored as %s and served decoded: no x-goog-hash check", sink.url, stored_encoding)
        return None, None
    md5s: set[bytes] = set()
    # One header holding "crc32c=…,md5=…", or one header per hash (GCS sends the latter).
    for header in response.headers.get_all("x-goog-hash") or []:
        for item in header.split(","):
            name, _, value = item.strip().partition("=")
            if name.strip().lower() != "md5":
                continue
            try:
                digest = base64.b64decode(value.strip(), validate=True)
            except (binascii.Error, ValueError):
                digest = b""
            if len(digest) != 16:
                raise InfraError(
                    f"{sink.url} sent an x-goog-hash md5 that is not an MD5 ({value.strip()!r})",
                    fix="check the mirror or proxy between this machine and the source",
                )
            md5s.add(digest)
    if len(md5s) > 1:
        raise InfraError(f"{sink.url} sent two different MD5s in x-goog-hash", retryable=True, fix=_RETRY_FIX)
    stored = (response.headers.get("x-goog-stored-content-length") or "").strip()
    stored_length = int(stored) if stored.isdigit() else None
    if stored_length is not None and sink.total is None:  # chunked: refuse an object over the cap before reading
        sink.expect(stored_length)
    return (md5s.pop() if md5s else None), stored_length


def _status_error(url: str, status: int, reason: str, *, what: str) -> AmiforgeError:
    if status in (404, 410):
        return ConfigError(
            f"no such file at {url} (HTTP {status}): check the source URL",
            problems=[Problem(f"HTTP {status} {reason}".rstrip(), file=url)],
            fix=f"check the source URL (a mirror may not hold {what} yet, or under another path)",
        )
    retryable = status in _RETRYABLE_STATUS or status >= 500
    if status in (401, 403):
        fix = "the server refused access: check the URL, and the API key if the source takes one"
    elif retryable:
        fix = _RETRY_FIX
    else:
        fix = "check the source URL"
    return HTTPStatusError(
        f"{url} answered HTTP {status} {reason}".rstrip() + f" instead of {what}",
        url=url,
        status=status,
        retryable=retryable,
        fix=fix,
    )


def _unreachable(url: str, reason: object, *, what: str, stall_timeout: float) -> InfraError:
    host = urlsplit(url).hostname or url
    if isinstance(reason, TimeoutError):
        return InfraError(
            f"{url} did not answer within {stall_timeout:g} s (asked for {what})", retryable=True, fix=_RETRY_FIX
        )
    if isinstance(reason, ssl.SSLCertVerificationError):
        return InfraError(
            f"cannot trust the TLS certificate of {host}: {reason.verify_message or reason}",
            fix="check the URL's host; for a mirror with an internal CA, point SSL_CERT_FILE at that CA's bundle",
        )
    if isinstance(reason, socket.gaierror):
        temporary = reason.errno == socket.EAI_AGAIN
        return InfraError(
            f"cannot resolve the host name {host} (asked for {what}): {reason.strerror or reason}",
            retryable=temporary,
            fix="check the host name in the URL, and this machine's DNS and proxy settings",
        )
    if isinstance(reason, OSError | http.client.HTTPException):
        return InfraError(
            f"cannot download {what} from {url}: {_describe(reason)}",
            retryable=True,
            fix="check this machine's network and proxy settings; " + _RETRY_FIX,
        )
    return InfraError(f"cannot download {what} from {url}: {reason}", fix="check the URL")


def _deadline_error(sink: _Sink, deadline: float) -> InfraError:
    return InfraError(
        f"the download of {sink.what} from {sink.url} took longer than {deadline:g} s ({_progress_text(sink)})",
        retryable=True,
        fix="retry on a faster link, or point the source at a nearer mirror (its URL can be overridden)",
    )


def _progress_text(sink: _Sink) -> str:
    return f"{sink.size} of {sink.total} bytes" if sink.total is not None else f"{sink.size} bytes"


def _describe(e: BaseException) -> str:
    if isinstance(e, http.client.RemoteDisconnected):
        return "the server closed the connection without answering"
    if isinstance(e, http.client.IncompleteRead):
        return "the body ended early"
    if isinstance(e, OSError) and e.strerror:
        return e.strerror
    return str(e) or type(e).__name__


# --- urllib plumbing: deadline watchdog, redirect policy -----------------------------------------------------------


class _Watchdog:
    """Ends a transfer at its deadline whatever it is waiting for: shuts its sockets down, which wakes a read blocked
    on a server that trickles a byte now and then (the per-read timeout never fires for those)."""

    def __init__(self, seconds: float) -> None:
        self.fired = False
        self._lock = threading.Lock()
        self._sockets: list[socket.socket] = []
        self._timer = threading.Timer(seconds, self._fire)
        self._timer.daemon = True
        self._timer.start()

    def track(self, sock: socket.socket) -> None:
        with self._lock:
            self._sockets.append(sock)
            if self.fired:
                _shut(sock)

    def cancel(self) -> None:
        self._timer.cancel()

    def _fire(self) -> None:
        with self._lock:
            self.fired = True
            for sock in self._sockets:
                _shut(sock)


def _shut(sock: socket.socket) -> None:
    with contextlib.suppress(OSError):
        sock.shutdown(socket.SHUT_RDWR)


class _WatchedHTTPConnection(http.client.HTTPConnection):
    watchdog: _Watchdog

    def connect(self) -> None:
        super().connect()
        self.watchdog.track(self.sock)


class _WatchedHTTPSConnection(http.client.HTTPSConnection):
    watchdog: _Watchdog

    def connect(self) -> None:
        super().connect()  # the TLS socket, after any proxy tunnel
        self.watchdog.track(self.sock)


class _HTTPHandler(urllib.request.HTTPHandler):
    def __init__(self, watchdog: _Watchdog) -> None:
        super().__init__()
        self._watchdog = watchdog

    def http_open(self, req: urllib.request.Request) -> http.client.HTTPResponse:
        def connection(host: str, **kwargs: Any) -> http.client.HTTPConnection:
            conn = _WatchedHTTPConnection(host, **kwargs)
            conn.watchdog = self._watchdog
            return conn

        return self.do_open(connection, req)


class _HTTPSHandler(urllib.request.HTTPSHandler):
    def __init__(self, watchdog: _Watchdog) -> None:
        super().__init__(context=ssl.create_default_context())
        self._watchdog = watchdog

    def https_open(self, req: urllib.request.Request) -> http.client.HTTPResponse:
        def connection(host: str, **kwargs: Any) -> http.client.HTTPSConnection:
            conn = _WatchedHTTPSConnection(host, **kwargs)
            conn.watchdog = self._watchdog
            return conn

        return self.do_open(connection, req, context=self._context)  # type: ignore[attr-defined]


class _RedirectHandler(urllib.request.HTTPRedirectHandler):
    """urllib's redirects under `check_redirect`'s policy; the caller's headers (an API key) go to the first URL's
    origin only."""

    # Above MAX_REDIRECTS, so check_redirect refuses first and says why (urllib's own check says "infinite loop").
    max_repeats = max_redirections = MAX_REDIRECTS + 1

    def __init__(self, *, private: tuple[str, ...]) -> None:
        super().__init__()
        # As urllib.request.Request stores header names.
        self._private = tuple(name.capitalize() for name in private)

    def redirect_request(
        self,
        req: urllib.request.Request,
        fp: Any,
        code: int,
        msg: str,
        headers: Any,
        newurl: str,
    ) -> urllib.request.Request | None:
        followed = sum(getattr(req, "redirect_dict", {}).values())
        try:
            check_redirect(req.full_url, newurl, followed)
        except ConfigError:
            fp.close()
            raise
        new = super().redirect_request(req, fp, code, msg, headers, newurl)
        if new is not None and _origin(newurl) != _origin(req.full_url):
            for name in self._private:
                new.remove_header(name)
        return new


def _origin(url: str) -> tuple[str, str | None, int | None]:
    parts = urlsplit(url)
    scheme = parts.scheme.lower()
    return scheme, parts.hostname, parts.port or {"http": 80, "https": 443}.get(scheme)


def _user_agent() -> str:
    try:
        return f"amiforge/{metadata.version('amiforge')}"
    except metadata.PackageNotFoundError:
        return "amiforge"


_USER_AGENT = _user_agent()
