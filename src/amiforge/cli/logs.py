"""Where log records go: stderr for people, and a file for the record. Decided once per command, here only.

Every module logs through its own `logging.getLogger(__name__)` (the `amiforge.*` tree) and never configures
logging itself. This module attaches two handlers to the root logger:

- stderr: warnings and worse by default, INFO with `-v`, DEBUG with `-vv`, one plain line per record
  (`warning: …`). Never stdout, so `--json` stays one document; looked up at each record, so a progress display
  that redirects stderr keeps its lines above the bars.
- `--log-file FILE`: DEBUG and worse, timestamped (UTC), whatever `-v` says; the file is created mode 0600 and
  appended to. A path that cannot be written is a ConfigError naming the option (exit 2).

Records of other libraries (botocore, urllib3, sqlalchemy, alembic) reach either handler only at WARNING and worse:
their DEBUG output carries whole request bodies, signed headers and SQL parameters. And every line, tracebacks
included, passes `redact()` on its way out, in case a message quotes a URL password or an AWS secret.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import functools
import logging
import os
import re
import stat
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TextIO

from amiforge.errors import ConfigError

__all__ = ["FILE_ONLY", "begin", "configure", "end", "redact", "set_log_file", "state", "verbose"]

ROOT = "amiforge"
# extra={FILE_ONLY: True}: a record for the log file only (a traceback the terminal shows only with --debug).
FILE_ONLY = "amiforge_file_only"
_OPTION = "--log-file"
_FIX = "name a file in an existing folder you can write to, e.g. --log-file ./amiforge.log (it is created 0600)"

REDACTED = "[redacted]"


# A key whose value is a credential: password, passwd, pass, secret (client_secret, secret_access_key…), any
# token (session_token, api_token…), api keys, private keys and credentials.
_SECRET_KEY = (
    r"[\w.-]*(?:passw(?:or)?d|\bpass\b|_pass\b|secret|token|api[_-]?key|apikey|private[_-]?key|credential)[\w.-]*"
)


@functools.cache
def _patterns() -> tuple[tuple[re.Pattern[str], bool], ...]:
    """What redact() replaces, as (pattern, keep its `head` group); compiled on first use, not at start-up."""
    return (
        # A PEM private key, whole.
        (
            re.compile(r"-----BEGIN [A-Z0-9 ]*PRIVATE KEY-----.*?(?:-----END [A-Z0-9 ]*PRIVATE KEY-----|\Z)", re.S),
            False,
        ),
        # An HTTP Authorization value, scheme and credential alike (Basic, Bearer, AWS4-HMAC-SHA256 …).
        (re.compile(r"(?P<head>\bauthorization[\"']?\s*[:=]\s*)(?P<secret>[^\r\n\"']+)", re.IGNORECASE), True),
        # `scheme://user:password@host`: the password goes, even one holding '/', ':' or '@' (the last '@' before
        # the host ends it).
        (
            re.compile(
                r"(?P<head>[a-z][a-z0-9+.-]*://[^\s:/@]*:)(?P<secret>\S+)(?=@[A-Za-z0-9.\[\]-]+(?:[:/?#\s\"']|$))",
                re.IGNORECASE,
            ),
            True,
        ),
        # A bearer token anywhere else (a header quoted in a message, or in a recipe's shell step).
        (re.compile(r"(?P<head>\bbearer\s+)(?P<secret>[A-Za-z0-9._~+/=-]{8,})", re.IGNORECASE), True),
        # Named credentials in key=value, key: value or "key": "value" form (a dumped dict, an env line).
        (
            re.compile(rf"(?P<head>\b{_SECRET_KEY}[\"']?\s*[:=]\s*[\"']?)(?P<secret>[^\s\"',;}}]+)", re.IGNORECASE),
            True,
        ),
        # Session tokens (STS, SSO): long base64 runs. No digest, id or ARN amiforge logs comes near this length.
        (re.compile(r"[A-Za-z0-9/+=]{100,}"), False),
        # The shape of an AWS secret access key: 40 base64 characters with both cases (a hex digest has one case
        # only), not starting with / (a path); after '=' or ':' too (an env line, a dumped config).
        (
            re.compile(
                r"(?<![A-Za-z0-9/+])(?!/)(?=[A-Za-z0-9/+]*[a-z])(?=[A-Za-z0-9/+]*[A-Z])[A-Za-z0-9/+]{40}"
                r"(?![A-Za-z0-9/+=])"
            ),
            False,
        ),
    )


def redact(text: str) -> str:
    """`text` without the credentials it may quote: private keys, Authorization values, URL passwords, bearer tokens,
    named secrets, session tokens and AWS-secret-shaped strings."""
    for pattern, keep_head in _patterns():
        text = pattern.sub((lambda m: m["head"] + REDACTED) if keep_head else (lambda _m: REDACTED), text)
    return text


@dataclass
class LogState:
    """What this command asked for: -v count (root and command options add up) and the log file, if any."""

    verbosity: int = 0
    log_file: Path | None = None


_state = LogState()
_handlers: list[logging.Handler] = []


def state() -> LogState:
    return _state


class _Ours(logging.Filter):
    """amiforge's own records at the handler's level; anyone else's only at WARNING and worse."""

    def __init__(self, *, file: bool) -> None:
        super().__init__()
        self.file = file

    def filter(self, record: logging.LogRecord) -> bool:
        if not self.file and getattr(record, FILE_ONLY, False):
            return False
        ours = record.name == ROOT or record.name.startswith(ROOT + ".")
        return ours or record.levelno >= logging.WARNING


class _Redacting(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        return redact(super().format(record))


class _TerseFormatter(_Redacting):
    """`warning: message` for people; at DEBUG the logger's name too, to know where a line came from."""

    def __init__(self, *, names: bool) -> None:
        super().__init__("%(levelname)s [%(name)s]: %(message)s" if names else "%(levelname)s: %(message)s")

    def format(self, record: logging.LogRecord) -> str:
        saved = record.levelname
        record.levelname = saved.lower()
        try:
            return super().format(record)
        finally:
            record.levelname = saved


class _FileFormatter(_Redacting):
    """`2026-12-06T10:00:00.123Z INFO    amiforge.lifecycle.rollout [4242]: message` (UTC)."""

    def __init__(self) -> None:
        super().__init__("%(asctime)s %(levelname)-7s %(name)s [%(process)d]: %(message)s")

    def formatTime(self, record: logging.LogRecord, datefmt: str | None = None) -> str:
        return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created)) + f".{int(record.msecs):03d}Z"


class _Stderr(logging.Handler):
    """Writes to whatever sys.stderr is when a record comes (a progress display's proxy, a test's capture)."""

    def emit(self, record: logging.LogRecord) -> None:
        try:
            stream = sys.stderr
            stream.write(self.format(record) + "\n")
            stream.flush()
        except Exception:
            self.handleError(record)


def _stderr_level(verbosity: int) -> int:
    return logging.WARNING if verbosity <= 0 else logging.INFO if verbosity == 1 else logging.DEBUG


def open_log_file(path: Path) -> TextIO:
    """`path` opened for appending, created 0600; a regular file or a character device (/dev/stderr). Anything
    else, or a path that cannot be opened, is a ConfigError naming --log-file and the fix."""

    def refuse(why: str) -> ConfigError:
        return ConfigError(f"{_OPTION} {path}: {why}", fix=_FIX)

    if not str(path).strip():
        raise refuse("is empty")
    # O_NONBLOCK: a FIFO without a reader fails at once (ENXIO) instead of hanging the command. O_NOFOLLOW: a
    # symlink planted where the log goes must not redirect what amiforge (often root) writes; only a link to a
    # terminal or device (/dev/stderr) is followed.
    flags = os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_NONBLOCK | os.O_CLOEXEC
    try:
        try:
            fd = os.open(path, flags | os.O_NOFOLLOW, 0o600)
        except OSError as e:
            if e.errno != errno.ELOOP or not stat.S_ISCHR(os.stat(path).st_mode):
                raise
            fd = os.open(path, flags)
    except OSError as e:
        if e.errno == errno.ENXIO:
            raise refuse("is a FIFO with no reader; a log file must be a regular file") from e
        if e.errno == errno.ELOOP:
            raise refuse("is a symbolic link; name the file itself") from e
        raise refuse(f"cannot be opened for writing ({e.strerror or e})") from e
    try:
        info = os.fstat(fd)
        mode = info.st_mode
        if not (stat.S_ISREG(mode) or stat.S_ISCHR(mode)):
            raise refuse("is not a regular file")
        if stat.S_ISREG(mode) and mode & 0o077:
            if info.st_uid != os.geteuid():
                raise refuse(f"belongs to another user and others can read it (mode {stat.S_IMODE(mode):o})")
            os.fchmod(fd, 0o600)  # an existing file of ours: the log holds what only its owner should read
        flags = fcntl.fcntl(fd, fcntl.F_GETFL)
        fcntl.fcntl(fd, fcntl.F_SETFL, flags & ~os.O_NONBLOCK)
        return os.fdopen(fd, "a", encoding="utf-8", errors="backslashreplace", buffering=1)
    except BaseException:
        os.close(fd)
        raise


def configure(verbosity: int = 0, log_file: Path | None = None) -> None:
    """(Re)attach amiforge's handlers to the root logger for `verbosity` and `log_file`; idempotent. Handlers
    others attached (pytest's, an embedding program's) are left alone."""
    stream = open_log_file(log_file) if log_file is not None else None
    _detach()
    stderr = _Stderr()
    level = _stderr_level(verbosity)
    stderr.setLevel(level)
    stderr.setFormatter(_TerseFormatter(names=level <= logging.DEBUG))
    stderr.addFilter(_Ours(file=False))
    _handlers.append(stderr)
    if stream is not None:
        to_file = logging.StreamHandler(stream)
        to_file.setLevel(logging.DEBUG)
        to_file.setFormatter(_FileFormatter())
        to_file.addFilter(_Ours(file=True))
        _handlers.append(to_file)
    root = logging.getLogger()
    for handler in _handlers:
        root.addHandler(handler)
    # amiforge's loggers pass what either handler wants; other libraries keep the root's level (WARNING).
    logging.getLogger(ROOT).setLevel(logging.DEBUG if stream is not None else level)
    _state.verbosity, _state.log_file = verbosity, log_file


def _detach() -> None:
    root = logging.getLogger()
    while _handlers:
        handler = _handlers.pop()
        root.removeHandler(handler)
        if isinstance(handler, _Stderr):
            continue
        with contextlib.suppress(OSError):
            handler.close()


def begin() -> None:
    """Start of a command: warnings to stderr, no file, until the options say otherwise."""
    configure(0, None)


def end() -> None:
    """End of a command: flush and close the log file; warnings still reach stderr."""
    logging.getLogger(ROOT).setLevel(logging.NOTSET)
    _detach()
    _state.verbosity, _state.log_file = 0, None


def verbose(count: int) -> None:
    """`-v` given `count` more times (on the root or on a command: they add up)."""
    if count:
        configure(_state.verbosity + count, _state.log_file)


def set_log_file(path: Path | None) -> None:
    if path is not None:
        configure(_state.verbosity, path)
