"""Who is asking: a bearer token (`Authorization: Bearer amf_…`, for scripts and Prometheus) or a browser session's
cookie (HttpOnly, SameSite=Strict), which holds a secret of the session's own, never the token's: a session ends
at log-out, after SESSION_HOURS, or when its token is revoked. docs/architecture.md §14.

- No valid token: 401 (pages redirect to /login instead).
- A role too weak: 403.
- A request that changes something on the strength of the cookie must also carry the session's form key (a hidden
  field, or the `X-Amiforge-Form-Key` header htmx sends) and, if the browser says where it comes from, come from this
  server's own origin. A bearer token is never sent by a browser on its own, so it needs neither.
"""

from __future__ import annotations

import hmac
from dataclasses import dataclass, field
from urllib.parse import urlsplit

from fastapi import Request

from amiforge.lifecycle.tokens import actor_of, authenticate, form_key, session_token
from amiforge.model import ApiToken
from amiforge.store.interface import Store

SESSION_COOKIE = "amiforge_session"
SECURE_SESSION_COOKIE = "__Host-amiforge_session"  # under TLS: the prefix makes browsers insist on Secure, Path=/
FORM_KEY_FIELD = "form_key"
FORM_KEY_HEADER = "X-Amiforge-Form-Key"
SAFE_METHODS = frozenset({"GET", "HEAD", "OPTIONS"})


@dataclass(frozen=True)
class Caller:
    token: ApiToken
    secret: str = field(repr=False)  # the token's (bearer) or the session's (cookie); no template is given it
    by_cookie: bool

    @property
    def actor(self) -> str:
        return actor_of(self.token)

    @property
    def form_key(self) -> str:
        return form_key(self.secret)


class Refused(Exception):
    """A request refused before it reached the service layer: 401 (who are you?) or 403 (not you)."""

    def __init__(self, status: int, message: str, *, fix: str = "") -> None:
        super().__init__(message)
        self.status, self.message, self.fix = status, message, fix


def presented_secret(request: Request) -> tuple[str, bool] | None:
    """(secret, whether it is a session's cookie) of what the request presents, if anything. An Authorization
    header that is not a bearer token (a proxy's Basic credentials) is not ours: the cookie decides then."""
    header = request.headers.get("authorization")
    if header is not None:
        scheme, _, value = header.partition(" ")
        if scheme.lower() == "bearer":
            return value.strip(), False
    # Under TLS only the __Host- cookie counts: a plain one could have been set by a sibling site or plain HTTP.
    secure = getattr(request.app.state, "secure_cookies", False)
    cookie = request.cookies.get(SECURE_SESSION_COOKIE) if secure else request.cookies.get(SESSION_COOKIE)
    return (cookie, True) if cookie else None


def identify(request: Request, store: Store) -> Caller | None:
    presented = presented_secret(request)
    if presented is None:
        return None
    secret, by_cookie = presented
    token = session_token(store, secret) if by_cookie else authenticate(store, secret)
    return None if token is None else Caller(token, secret, by_cookie)


def require(request: Request, store: Store, role: str) -> Caller:
    """The caller, if its token is live and has `role`; for a request that changes something on the strength of
    the cookie, also its form key from the `X-Amiforge-Form-Key` header (a form's field: `authorize`, then
    `check_form_key` once the form is parsed)."""
    caller = authorize(request, store, role)
    if caller.by_cookie and request.method not in SAFE_METHODS:
        check_form_key(request, caller, request.headers.get(FORM_KEY_HEADER, ""))
    return caller


def authorize(request: Request, store: Store, role: str) -> Caller:
    """The caller, if its token is live and has `role`: 401 without one, 403 with a weaker one."""
    caller = identify(request, store)
    if caller is None:
        raise Refused(401, "a valid token is needed", fix="log in, or send Authorization: Bearer amf_…")
    if not caller.token.allows(role):
        raise Refused(
            403, f"token {caller.token.name!r} is {caller.token.role}; this needs {role}",
            fix=f"use a token with role {role} (amiforge tokens create NAME --role {role})",
        )  # fmt: skip
    return caller


def check_form_key(request: Request, caller: Caller, given: str) -> None:
    """A cookie's unsafe request: from this server's own origin, with the session's form key."""
    if not caller.by_cookie or request.method in SAFE_METHODS:
        return
    check_same_origin(request)
    if not hmac.compare_digest(given.encode(), caller.form_key.encode()):
        raise Refused(403, "the form key is missing or wrong", fix="reload the page and submit the form again")


def check_same_origin(request: Request) -> None:
    """Refuse a request a browser says came from another origin (Origin header) or another site."""
    origin = request.headers.get("origin")
    if origin is not None and origin != "null":
        # Behind a TLS proxy the browser's origin is the proxy's (serve --public-url), not what reaches the server.
        public = getattr(request.app.state, "public_origin", None)
        parts = urlsplit(origin)
        ours = public if public is not None else f"{request.url.scheme}://{request.headers.get('host', '')}"
        if f"{parts.scheme}://{parts.netloc}" != ours:
            behind = "behind a proxy, start serve with --public-url set to the URL the browser opens"
            raise Refused(403, f"a request from another origin ({origin}) is refused", fix=behind)
        return
    # No origin, or `null` (a browser told not to send referrers sends that with a site's own form posts): the
    # browser's own Sec-Fetch-Site, which no page can set, must then say same-origin (or a typed URL: none).
    site = request.headers.get("sec-fetch-site", "same-origin" if origin is None else "")
    if site not in ("same-origin", "none"):
        raise Refused(403, "a request from another site is refused")
