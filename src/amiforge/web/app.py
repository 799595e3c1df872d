"""The ASGI application of `amiforge serve`: `/metrics` and `/healthz`, the JSON API (`/api/v1`, api.py), the web
console's pages (pages.py) and their static files, behind one set of security headers (docs/architecture.md §14)."""

from __future__ import annotations

import ipaddress
import logging
from collections.abc import Iterator, Sequence
from importlib import resources
from typing import Any
from urllib.parse import urlsplit

from fastapi import FastAPI, Request, Response
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse, RedirectResponse
from fastapi.staticfiles import StaticFiles
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.routing import BaseRoute, Match

from amiforge import __version__
from amiforge.errors import AmiforgeError, GateFailed
from amiforge.lifecycle.exposition import CONTENT_TYPE
from amiforge.web import api, pages
from amiforge.web.auth import Refused, require
from amiforge.web.context import Context, context
from amiforge.web.middleware import BodyLimit, HeadAsGet

logger = logging.getLogger(__name__)

# Scripts and styles only from this server (no inline script, no CDN), no frames, forms only to this server.
CSP = (
    "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; connect-src 'self'; "
    "form-action 'self'; frame-ancestors 'none'; base-uri 'none'"
)
SECURITY_HEADERS = {
    "Content-Security-Policy": CSP,
    "X-Content-Type-Options": "nosniff",
    "X-Frame-Options": "DENY",
    # Not no-referrer: under it a browser sends `Origin: null` with this site's own form posts, which
    # auth.check_same_origin cannot tell from another site's. Other sites still learn nothing.
    "Referrer-Policy": "same-origin",
    "Cross-Origin-Opener-Policy": "same-origin",
    "Cross-Origin-Resource-Policy": "same-origin",
    "Permissions-Policy": "camera=(), microphone=(), geolocation=()",
}


def create_app(ctx: Context) -> FastAPI:
    app = FastAPI(
        title="amiforge",
        version=__version__,
        description="The registry of golden machine images: versions, channels, rollouts, the audit log. "
        "Every route needs a token (`amiforge tokens create NAME --role read|operate|admin`), sent as "
        "`Authorization: Bearer amf_…`.",
        openapi_url=None,  # served below, behind a token like everything else
        docs_url=None,  # Swagger UI would load from a CDN
        redoc_url=None,
    )
    app.state.amiforge = ctx
    app.state.public_origin = ctx.public_origin  # what web/auth.check_same_origin compares a form's Origin with
    app.state.secure_cookies = ctx.secure_cookies  # which session cookie web/auth reads
    app.include_router(api.router)
    app.include_router(pages.router)
    static = resources.files("amiforge.web") / "static"
    app.mount("/static", StaticFiles(directory=str(static)), name="static")

    @app.get("/api/v1/openapi.json", include_in_schema=False)
    def openapi(request: Request) -> JSONResponse:
        require(request, context(request).store, "read")
        return JSONResponse(app.openapi())

    @app.get("/metrics", include_in_schema=False)
    def metrics(request: Request) -> Response:
        ctx = context(request)
        # --open-metrics opens /metrics to a loopback name only: a web page that rebinds its own name to 127.0.0.1
        # (DNS rebinding) sends its own Host, and needs a token like everyone else.
        if not (ctx.open_metrics and _loopback_host(request) and _loopback_client(request)):
            require(request, ctx.store, "read")
        try:
            body = ctx.metrics.render()
        except Exception as e:  # a broken registry: Prometheus records the failed scrape; the log says why
            logger.error("/metrics failed: %s: %s", type(e).__name__, e)
            return PlainTextResponse("the registry could not be read\n", status_code=500)
        # The text format every Prometheus reads (2.x included); the names need none of 1.0.0's UTF-8 escaping.
        return Response(body, media_type=CONTENT_TYPE)

    @app.get("/healthz", include_in_schema=False)
    def healthz(request: Request) -> JSONResponse:
        try:
            context(request).store.count_versions()
        except Exception as e:  # what failed goes to the log, not to whoever asks
            logger.warning("/healthz: the registry could not be read: %s: %s", type(e).__name__, e)
            return JSONResponse({"status": "unavailable"}, status_code=503)
        return JSONResponse({"status": "ok"})

    @app.middleware("http")
    async def security_headers(request: Request, call_next: Any) -> Response:
        response: Response = await call_next(request)
        for name, value in SECURITY_HEADERS.items():
            response.headers.setdefault(name, value)
        if not request.url.path.startswith("/static/"):
            response.headers.setdefault("Cache-Control", "no-store")
        return response

    @app.exception_handler(Refused)
    async def refused(request: Request, exc: Refused) -> Response:
        if _wants_page(request):
            if exc.status == 401 and request.headers.get("HX-Request") == "true":
                # htmx would follow a redirect and swap the log-in page into the part it refreshes
                page = urlsplit(request.headers.get("HX-Current-URL", "")).path or "/"
                return Response(status_code=401, headers={"HX-Redirect": pages.login_url(request, back=page)})
            if exc.status == 401:
                return RedirectResponse(pages.login_url(request), status_code=303)
            return pages.error_page(request, exc.status, exc.message, exc.fix)
        headers = {"WWW-Authenticate": 'Bearer realm="amiforge"'} if exc.status == 401 else None
        if exc.status == 503:
            headers = {"Retry-After": "30"}
        kind = {401: "unauthenticated", 403: "forbidden", 503: "busy"}.get(exc.status, "refused")
        body = {"error": kind, "message": exc.message, "fix": exc.fix}
        return JSONResponse(body, status_code=exc.status, headers=headers)

    @app.exception_handler(AmiforgeError)
    async def amiforge_error(request: Request, exc: AmiforgeError) -> Response:
        if _wants_page(request):
            items = [f"{f.name}: {f.detail}" for f in exc.failures] if isinstance(exc, GateFailed) else []
            return pages.error_page(request, exc.http_status, exc.message, exc.fix or "", items)
        body = {k: v for k, v in exc.as_dict().items() if k != "exit_code"}
        return JSONResponse(body, status_code=exc.http_status)

    @app.exception_handler(RequestValidationError)
    async def invalid(request: Request, exc: RequestValidationError) -> Response:
        problems = [
            {"where": ".".join(str(p) for p in e.get("loc", ())), "problem": str(e.get("msg", ""))}
            for e in exc.errors()
        ]
        if _wants_page(request):
            text = "; ".join(f"{p['where']}: {p['problem']}" for p in problems)
            return pages.error_page(request, 400, f"the request is not valid: {text}", "")
        message = "; ".join(f"{p['where']}: {p['problem']}" for p in problems)
        return JSONResponse(
            {"error": "invalid", "message": message, "fix": "see /api/v1/openapi.json", "detail": problems},
            status_code=422,
        )

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException) -> Response:
        if exc.status_code == 405:  # Starlette's Allow names only the first route of the path: name them all
            exc.headers = {**(exc.headers or {}), "Allow": ", ".join(_allowed(app, request))}
        if _wants_page(request):
            page = pages.error_page(request, exc.status_code, str(exc.detail), "")
            page.headers.update(exc.headers or {})
            return page
        body = {"error": "http", "message": str(exc.detail), "fix": ""}
        return JSONResponse(body, status_code=exc.status_code, headers=exc.headers)

    app.add_middleware(HeadAsGet)
    app.add_middleware(BodyLimit)  # the outermost of the two: no body is read past the cap
    return app


def _allowed(app: FastAPI, request: Request) -> list[str]:
    """Every method some route serves at the request's path (HEAD wherever GET: middleware.HeadAsGet)."""
    methods: set[str] = set()
    for route in _routes(app.routes):
        match, _ = route.matches({**request.scope, "method": "GET"})
        if match is not Match.NONE:
            methods |= getattr(route, "methods", None) or set()
    if "GET" in methods:
        methods.add("HEAD")
    return sorted(methods)


def _routes(routes: Sequence[BaseRoute]) -> Iterator[BaseRoute]:
    """The routes, those of included routers too (FastAPI keeps an included router's routes behind it)."""
    for route in routes:
        inner = getattr(route, "original_router", None)
        if inner is not None:
            yield from _routes(inner.routes)
        else:
            yield route


def _loopback_host(request: Request) -> bool:
    """Whether the Host header names this machine's loopback (127.0.0.1, localhost, [::1]; any port)."""
    host = request.headers.get("host", "")
    name = host[1 : host.find("]")] if host.startswith("[") else host.partition(":")[0]
    return name in ("127.0.0.1", "localhost", "::1")


def _loopback_client(request: Request) -> bool:
    """Whether the connection comes from this machine (a proxy here forwards others' requests: see serve_cmd)."""
    client = request.client.host if request.client is not None else ""
    try:
        return ipaddress.ip_address(client).is_loopback
    except ValueError:
        return False


def _wants_page(request: Request) -> bool:
    """A page (or one of its fragments), not the API, /metrics or /healthz."""
    path = request.url.path
    return not (path.startswith("/api/") or path in ("/metrics", "/healthz"))
