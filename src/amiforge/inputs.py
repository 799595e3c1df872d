"""Files a user names, read as a hostile user might have chosen them.

Every file amiforge reads because someone passed its path (keys, `.pub` files, advisories, scanner reports, Packer
manifests, recipes, policies, strategies) comes through `read_input`: it must be a regular file — a FIFO would block
forever, `/dev/zero` never ends, a directory is not a file — and no larger than a cap chosen for what it holds. JSON
from such files goes through `parse_json`, which turns nesting too deep for the parser into a clear error instead of
a RecursionError. `file_sha256` hashes a file of any size in chunks, never whole in memory.
"""

from __future__ import annotations

import hashlib
import json
import os
import stat
import zipfile
from collections.abc import Iterator
from pathlib import Path
from typing import BinaryIO

from amiforge.errors import ConfigError, Problem

KIB = 1 << 10
MIB = 1 << 20


_KINDS = (
    (stat.S_ISDIR, "a directory"),
    (stat.S_ISFIFO, "a named pipe (FIFO)"),
    (stat.S_ISCHR, "a character device"),
    (stat.S_ISBLK, "a block device"),
    (stat.S_ISSOCK, "a socket"),
)


def _kind(mode: int) -> str:
    return next((name for test, name in _KINDS if test(mode)), "not a regular file")


def open_input(path: Path, *, what: str, fix: str) -> BinaryIO:
    """The file at `path`, opened for reading once (what is checked is what is read: no swap in between); ConfigError
    if it is missing, unreadable or not a regular file. Never blocks (a FIFO is refused, not waited on)."""
    try:
        # O_NONBLOCK: opening a FIFO must not wait for a writer; fstat below then refuses it.
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    except FileNotFoundError:
        raise ConfigError(
            f"{what} {path} does not exist", problems=[Problem("no such file", file=str(path))], fix=fix
        ) from None
    except OSError as e:
        raise ConfigError(
            f"cannot read {what} {path}: {e.strerror or e}",
            problems=[Problem(f"cannot read: {e.strerror or e}", file=str(path))],
            fix="check the path and its permissions",
        ) from None
    mode = os.fstat(fd).st_mode
    if not stat.S_ISREG(mode):
        os.close(fd)
        kind = _kind(mode)
        raise ConfigError(
            f"{what} {path} is {kind}, not a file", problems=[Problem(f"is {kind}", file=str(path))], fix=fix
        )
    return os.fdopen(fd, "rb")


def read_input(path: Path, *, what: str, max_bytes: int, fix: str) -> bytes:
    """The bytes of the file at `path` (`what` names it in errors, e.g. "public key file"): ConfigError if it is
    missing, unreadable, not a regular file or larger than `max_bytes`. Never blocks and never reads more than
    `max_bytes` + 1 bytes."""
    with open_input(path, what=what, fix=fix) as f:
        size = os.fstat(f.fileno()).st_size
        try:
            # Refused before reading when the file says it is too big; the capped read catches one that grows.
            data = b"" if size > max_bytes else f.read(max_bytes + 1)
        except OSError as e:  # e.g. EIO
            raise ConfigError(f"cannot read {what} {path}: {e.strerror or e}", fix=fix) from None
    if size > max_bytes or len(data) > max_bytes:
        raise ConfigError(
            f"{what} {path} is larger than {_size(max_bytes)}",
            problems=[Problem(f"larger than {_size(max_bytes)}", file=str(path))],
            fix=f"check you passed the right file; {fix}",
        )
    return data


def _size(n: int) -> str:
    return f"{n // MIB} MiB" if n >= MIB else f"{n // KIB} KiB" if n >= KIB else f"{n} bytes"


def json_type(value: object) -> str:
    """The JSON name of a parsed value's type, for messages ("got an array")."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "boolean"
    if isinstance(value, int | float):
        return "number"
    if isinstance(value, str):
        return "string"
    if isinstance(value, list):
        return "array"
    if isinstance(value, dict):
        return "object"
    return type(value).__name__


def refuse_json_constant(name: str) -> object:
    """json.loads' parse_constant: NaN and Infinity, which Python's parser takes, are not JSON."""
    raise ValueError(f"{name} is not a JSON value")


def parse_json(data: bytes | str, *, file: str, what: str, fix: str) -> object:
    """JSON from a file a user named; ConfigError with the line and column of a syntax error, or if it nests too
    deeply. NaN and Infinity (not JSON) are refused too."""
    try:
        return json.loads(data, parse_constant=refuse_json_constant)
    except json.JSONDecodeError as e:
        problem = Problem(f"not valid JSON: {e.msg} (column {e.colno})", file=file, line=e.lineno)
        raise ConfigError(f"{what} {file} is not valid JSON", problems=[problem], fix=fix) from None
    except (ValueError, UnicodeDecodeError) as e:  # NaN/Infinity, integers too long to convert, bad encodings
        raise ConfigError(f"{what} {file} is not valid JSON", problems=[Problem(str(e), file=file)], fix=fix) from None
    except RecursionError:  # the C decoder stops at the interpreter's recursion limit: nesting no real file has
        problem = Problem("nested too deeply to be a real document", file=file)
        raise ConfigError(f"{what} {file} is not usable JSON", problems=[problem], fix=fix) from None


def zip_json_members(
    path: Path, *, what: str, fix: str, max_member: int, max_total: int, refusal: str
) -> Iterator[tuple[str, bytes]]:
    """(`path!member`, bytes) of every *.json member of the zip archive at `path`, in name order, one at a time.
    The sizes the headers claim are checked against the caps before anything is unpacked (ConfigError `refusal`
    naming the member or the total), and no member is read past what its header promised (a zip bomb that lies
    stops there). An unreadable archive is a ConfigError "cannot read the {what}"."""
    try:
        with open_input(path, what=what, fix=fix) as raw, zipfile.ZipFile(raw) as archive:
            members = [i for i in archive.infolist() if not i.is_dir() and i.filename.endswith(".json")]
            too_big = [i.filename for i in members if i.file_size > max_member]
            if too_big or sum(i.file_size for i in members) > max_total:
                why = (f"{too_big[0]} unpacks to more than {_size(max_member)}" if too_big
                       else f"its files unpack to more than {_size(max_total)}")  # fmt: skip
                raise ConfigError(refusal.format(path=path), problems=[Problem(why, file=str(path))], fix=fix)
            for info in sorted(members, key=lambda i: i.filename):
                with archive.open(info) as member:
                    data = member.read(info.file_size + 1)
                if len(data) > info.file_size:
                    raise zipfile.BadZipFile(f"{info.filename} is larger than its header says")
                yield f"{path}!{info.filename}", data
    # RuntimeError: an encrypted member; NotImplementedError: a compression method zipfile lacks.
    except (zipfile.BadZipFile, zipfile.LargeZipFile, RuntimeError, NotImplementedError, EOFError, OSError) as e:
        raise ConfigError(
            f"cannot read the {what} {path}",
            problems=[Problem(f"not a readable zip file: {e}", file=str(path))],
            fix=fix,
        ) from e


def file_sha256(path: Path) -> str:
    """sha256 hex of a file's bytes, read in chunks (a file step's source may be gigabytes)."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(MIB):
            digest.update(chunk)
    return digest.hexdigest()
