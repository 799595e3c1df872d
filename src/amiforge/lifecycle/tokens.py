"""Tokens of the web console and API (`amiforge tokens create|list|revoke`, and `amiforge serve`'s log-in).

A token is `amf_` and 43 URL-safe characters (256 random bits). The registry keeps only its SHA-256: a secret this
long needs no slow hash, and a lookup by hash compares no secret byte by byte. Creating and revoking a token are
audited events; the events a token's requests cause name it as their actor (`token:NAME`).
"""

from __future__ import annotations

import hashlib
import hmac
import re
import secrets
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

from amiforge.errors import ConfigError, StateError
from amiforge.model import TOKEN_ROLES, ApiToken
from amiforge.settings import Settings
from amiforge.store.interface import Store

PREFIX = "amf_"
SESSION_PREFIX = "ams_"
SESSION_HOURS = 12  # a browser session ends after this, or at log-out, or when its token is revoked
NAME_PATTERN = r"[a-z0-9][a-z0-9._-]{0,63}"
_NAME = re.compile(NAME_PATTERN)
_SECRET = re.compile(PREFIX + r"[A-Za-z0-9_-]{43}")
_SESSION = re.compile(SESSION_PREFIX + r"[A-Za-z0-9_-]{43}")


@dataclass(frozen=True)
class CreatedToken:
    """A new token and its secret: the one time the secret is shown."""

    token: ApiToken
    secret: str


@dataclass(frozen=True)
class RevokedToken:
    token: ApiToken
    changed: bool  # False: it was revoked already


def secret_digest(secret: str) -> str:
    return hashlib.sha256(secret.encode()).hexdigest()


def actor_of(token: ApiToken) -> str:
    """The actor events name for what a token's requests do."""
    return f"token:{token.name}"


def create_token(name: str, role: str, *, store: Store, settings: Settings) -> CreatedToken:
    if _NAME.fullmatch(name) is None:
        raise ConfigError(
            f"token name {name!r} is not allowed",
            fix="lower-case letters, digits, '.', '_' and '-', at most 64 characters (e.g. ci-deploy)",
        )
    if role not in TOKEN_ROLES:
        raise ConfigError(f"--role {role!r} is not a role", fix="use one of " + ", ".join(TOKEN_ROLES))
    secret = PREFIX + secrets.token_urlsafe(32)
    token = store.add_token(name, role, secret_digest(secret), actor=settings.actor)
    store.append_event("token.created", actor=settings.actor, data={"token": name, "role": role})
    return CreatedToken(token, secret)


def list_tokens(store: Store) -> list[ApiToken]:
    """Every token, revoked ones too, oldest first (never a secret: the registry has none)."""
    return store.tokens()


def revoke_token(name: str, *, store: Store, settings: Settings) -> RevokedToken:
    token, changed = store.revoke_token(name)
    if changed:
        store.append_event("token.revoked", actor=settings.actor, data={"token": name, "role": token.role})
    return RevokedToken(token, changed)


def authenticate(store: Store, secret: str) -> ApiToken | None:
    """The live token this secret is, or None (malformed, unknown or revoked)."""
    if _SECRET.fullmatch(secret) is None:
        return None
    token = store.token_by_secret(secret_digest(secret))
    return token if token is not None and token.revoked_at is None else None


def open_session(token: ApiToken, *, store: Store) -> str:
    """A browser session of the token: its own random secret (the cookie), never the token's."""
    secret = SESSION_PREFIX + secrets.token_urlsafe(32)
    store.add_session(token.id, secret_digest(secret), datetime.now(UTC) + timedelta(hours=SESSION_HOURS))
    return secret


def session_token(store: Store, secret: str) -> ApiToken | None:
    """The live token of a live session, or None."""
    if _SESSION.fullmatch(secret) is None:
        return None
    token = store.session_token(secret_digest(secret))
    return token if token is not None and token.revoked_at is None else None


def close_session(store: Store, secret: str) -> None:
    if _SESSION.fullmatch(secret) is not None:
        store.end_session(secret_digest(secret))


def form_key(secret: str) -> str:
    """The anti-CSRF value a browser session's forms carry: derived from the session's secret, so a page of another
    site can neither read nor compute it, and it dies with the session."""
    return hmac.new(secret.encode(), b"amiforge form key", hashlib.sha256).hexdigest()


def first_token(*, store: Store, settings: Settings) -> CreatedToken | None:
    """An admin token for a registry that has never had a token (what `amiforge serve` prints at its first start,
    so a new user can log in); None once any token exists, revoked ones included: a registry whose tokens were all
    revoked gets no new one behind anybody's back."""
    if store.tokens():
        return None
    try:
        return create_token("admin", "admin", store=store, settings=settings)
    except StateError:  # another `serve` made it meanwhile
        return None
