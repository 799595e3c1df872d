"""The constrained scalars of a recipe's fields: names, packages, units, tags, modes and paths.

Each type is checked by a small function that says what is allowed and how to fix it, and keeps its pattern in
the JSON Schema so editors can flag mistakes too (`yamlfile.matching()`). They live apart from the models so that
steps, checks and provider specs share one definition of, say, a systemd unit name.
"""

from __future__ import annotations

import re
from datetime import date, datetime
from typing import Annotated

from pydantic import AfterValidator, BeforeValidator, ConfigDict, WithJsonSchema

from amiforge.model import EXPIRES_TAG, IMAGE_NAME_PATTERN
from amiforge.yamlfile import fail, matching, short

__all__ = [
    "SCHEMA_HINT",
    "STRICT",
    "AbsPath",
    "FileMode",
    "PackageName",
    "PosixName",
    "RecipeName",
    "TagKey",
    "TagValue",
    "UnitName",
    "shorten",
]

# Every recipe model: unknown keys are mistakes, and a validated recipe never changes.
STRICT = ConfigDict(extra="forbid", frozen=True)
SCHEMA_HINT = "`amiforge recipe schema` prints every key and the values it allows"

_PACKAGE_RE = r"[a-z0-9][a-z0-9+.-]+"
_POSIX_NAME_RE = r"[a-z_][a-z0-9_-]{0,31}"
_UNIT_RE = r"[A-Za-z0-9][A-Za-z0-9:_.@\\-]{0,254}"  # never a leading "-": it would read as an option
_TAG_KEY_RE = r"[A-Za-z0-9_.:/=+@-]{1,128}"
_MODE_RE = r"[0-7]{3,4}"

RecipeName = Annotated[
    str,
    *matching(
        IMAGE_NAME_PATTERN,
        "recipe name",
        "lowercase letters, digits and '-', starting with a letter or digit, at most 63 characters",
        "'web' or 'web-tier'",
    ),
]
PackageName = Annotated[
    str,
    *matching(
        _PACKAGE_RE,
        "Debian package name",
        "lowercase letters, digits and '+', '.', '-', at least 2 characters, no version or '=' pin",
        "'nginx' or 'ca-certificates'",
    ),
]
PosixName = Annotated[
    str,
    *matching(
        _POSIX_NAME_RE,
        "user or group name",
        "lowercase letters, digits, '_' and '-', starting with a letter or '_', at most 32 characters",
        "'deploy' or 'www-data'",
    ),
]
UnitName = Annotated[
    str,
    *matching(
        _UNIT_RE, "systemd unit name", "letters, digits and ':', '_', '.', '@', '-', '\\'", "'nginx' or 'nginx.service'"
    ),
]

_TAG_KEY = matching(
    _TAG_KEY_RE,
    "tag key",
    "1-128 of letters, digits and '_', '.', ':', '/', '=', '+', '@', '-'",
    "'team' or 'cost-center'",
)


def _unreserved_tag_key(value: str) -> str:
    # Our own bookkeeping tags (docs/architecture.md §8) and AWS's namespace must not be forged from a recipe.
    if value.lower().startswith(("amiforge:", "aws:")) and value != EXPIRES_TAG:
        raise fail(
            f"tag key {value!r} uses a reserved prefix ('amiforge:' and 'aws:' are set by amiforge and AWS)",
            f"rename the tag ({EXPIRES_TAG} is the one a recipe may set: when the image may be retired)",
        )
    return value


def _check_tag_value(value: str) -> str:
    if len(value) > 256:
        raise fail(f"tag value is {len(value)} characters long; at most 256 are allowed", "shorten it")
    return value


TagKey = Annotated[str, *_TAG_KEY, AfterValidator(_unreserved_tag_key)]


def _dated(value: object) -> object:
    # An unquoted 2027-01-31 (amiforge:expires) is a date to YAML: the tag holds it as written.
    return value.isoformat() if isinstance(value, date | datetime) else value


TagValue = Annotated[
    str,
    BeforeValidator(_dated),
    AfterValidator(_check_tag_value),
    WithJsonSchema({"type": "string", "maxLength": 256}),
]


def _check_mode(value: object) -> object:
    # YAML 1.1 reads an unquoted 0644 as the octal number 420 and 644 as decimal 644: both silently wrong.
    if isinstance(value, int) and not isinstance(value, bool):
        raise fail(
            f"mode {value} was read as a number; YAML turns an unquoted 0644 into 420",
            'quote it: mode: "0644"',
        )
    if isinstance(value, str) and re.fullmatch(_MODE_RE, value) is None:
        raise fail(f"mode {short(value)} is not an octal mode of 3 or 4 digits 0-7", 'e.g. mode: "0644" or "0755"')
    return value


FileMode = Annotated[str, BeforeValidator(_check_mode), WithJsonSchema({"type": "string", "pattern": f"^{_MODE_RE}$"})]


def _check_abs_path(value: str) -> str:
    if not value.startswith("/") or "\x00" in value:
        raise fail(f"{short(value)} is not an absolute path", "e.g. /bin/bash")
    return value


AbsPath = Annotated[str, AfterValidator(_check_abs_path)]


def shorten(text: str, limit: int = 60) -> str:
    """`text` on one line, cut to `limit` characters: how a step or check describes itself in a listing."""
    text = " ".join(text.split())
    return text if len(text) <= limit else text[: limit - 1] + "…"
