"""The web console's pages: server-rendered HTML (Jinja2, every value escaped), readable without JavaScript; htmx
(vendored, static/) refreshes a live rollout in place. Forms post to routes here that call the same service-layer
functions as the API (api.py) and then redirect back (post/redirect/get)."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import timedelta
from importlib import resources
from typing import Any
from urllib.parse import quote, urlencode

import jinja2
from fastapi import APIRouter, Request, Response
from fastapi.responses import HTMLResponse, RedirectResponse
from starlette.templating import Jinja2Templates

from amiforge import __version__
from amiforge.errors import ConfigError, GateFailed, NotFound
from amiforge.lifecycle import documents as docs
from amiforge.lifecycle.tokens import SESSION_HOURS, authenticate, close_session, open_session
from amiforge.model import ROLLOUT_LIVE, ApiToken, Status
from amiforge.web.auth import (
    FORM_KEY_FIELD,
    SECURE_SESSION_COOKIE,
    SESSION_COOKIE,
    Caller,
    Refused,
    authorize,
    check_form_key,
    check_same_origin,
    identify,
    require,
)
from amiforge.web.context import context

router = APIRouter(include_in_schema=False)

HTMX = "htmx-2.0.11.min.js"  # static/VENDORED.md says where it came from

_env = jinja2.Environment(
    loader=jinja2.FileSystemLoader(str(resources.files("amiforge.web") / "templates")),
    autoescape=True,  # every value, whatever the template's name
    undefined=jinja2.StrictUndefined,
    trim_blocks=True,
    lstrip_blocks=True,
)
templates = Jinja2Templates(env=_env)


@dataclass(frozen=True)
class Viewer:
    """What a page knows of who looks at it: the token (name, role) and the session's form key, never a secret."""

    token: ApiToken
    form_key: str


def _render(request: Request, name: str, caller: Caller | None, code: int = 200, **values: Any) -> HTMLResponse:
    me = None if caller is None else Viewer(caller.token, caller.form_key)
    values |= {"me": me, "version": __version__, "htmx": HTMX, "form_key_field": FORM_KEY_FIELD}
    return templates.TemplateResponse(request, name, values, status_code=code)


def login_url(request: Request, *, back: str | None = None) -> str:
    """The log-in page, coming back here afterwards (to the catalog after a form: a form is never replayed), or to
    `back`."""
    here = request.url.path + (f"?{request.url.query}" if request.url.query else "")
    if request.method != "GET":
        here = "/"
    if back is not None:
        here = _safe_next(back)
    return "/login?" + urlencode({"next": here})


def error_page(request: Request, status: int, message: str, fix: str, items: list[str] | None = None) -> HTMLResponse:
    ctx = context(request)
    try:
        caller = identify(request, ctx.store)
    except Exception:  # the registry itself may be what failed
        caller = None
    return _render(request, "error.html", caller, status, status=status, message=message, fix=fix, items=items or [])


def _reader(request: Request) -> Caller:
    return require(request, context(request).store, "read")


async def _form(request: Request, role: str) -> tuple[Caller, dict[str, str]]:
    """The form's fields and its caller, who must have `role` and whose form carries the session's form key."""
    caller = authorize(request, context(request).store, role)  # before the body is parsed
    form = await request.form()
    fields = {k: v for k, v in form.items() if isinstance(v, str)}
    check_form_key(request, caller, fields.get(FORM_KEY_FIELD, ""))
    return caller, fields


def _safe_next(value: str | None) -> str:
    """Only a path of this server: never another site (`//host`, `/\\host`, a scheme)."""
    if not value or not value.startswith("/") or value.startswith(("//", "/\\")) or any(c in value for c in "\r\n"):
        return "/"
    return value


# --- logging in and out -----------------------------------------------------------------------------------------------


@router.get("/login")
def login_form(request: Request, next: str = "/") -> HTMLResponse:
    return _render(request, "login.html", None, next=_safe_next(next), problem=None)


@router.post("/login")
async def login(request: Request) -> Response:
    check_same_origin(request)
    form = await request.form()
    secret = str(form.get("token", "")).strip()
    target = _safe_next(str(form.get("next", "/")))
    ctx = context(request)
    token = authenticate(ctx.store, secret)
    if token is None:
        problem = "That token is not valid (mistyped, revoked, or from another registry)."
        return _render(request, "login.html", None, 401, next=target, problem=problem)
    session = open_session(token, store=ctx.store)
    response = RedirectResponse(target, status_code=303)
    name = SECURE_SESSION_COOKIE if ctx.secure_cookies else SESSION_COOKIE
    response.set_cookie(name, session, max_age=SESSION_HOURS * 3600, httponly=True, samesite="strict",
                        secure=ctx.secure_cookies, path="/")  # fmt: skip
    return response


@router.post("/logout")
async def logout(request: Request) -> Response:
    caller = identify(request, context(request).store)
    if caller is not None:  # a live session: its form must carry its key; a dead one only loses its cookie
        caller, _ = await _form(request, "read")
        if caller.by_cookie:
            close_session(context(request).store, caller.secret)
    response = RedirectResponse("/login", status_code=303)
    for name in (SESSION_COOKIE, SECURE_SESSION_COOKIE):
        response.delete_cookie(name, path="/", httponly=True, samesite="strict", secure=name.startswith("__Host-"))
    return response


# --- catalog and versions ---------------------------------------------------------------------------------------------


@router.get("/")
def catalog(
    request: Request,
    name: str | None = None,
    status: str | None = None,
    search: str | None = None,
    before: int | None = None,
) -> HTMLResponse:
    caller = _reader(request)
    ctx = context(request)
    statuses = None
    if status:
        try:
            statuses = [Status(status)]
        except ValueError as e:
            raise ConfigError(f"status {status!r} is not a version state", fix="pick one from the list") from e
    page = docs.version_page(ctx.store, name=name or None, statuses=statuses, search=search or None, before=before)
    filters = {k: v for k, v in {"name": name, "status": status, "search": search}.items() if v}
    more = "/?" + urlencode({**filters, "before": page.next_before}) if page.next_before else None
    return _render(request, "catalog.html", caller, catalog=docs.catalog(ctx.store), page=page, filters=filters,
                   statuses=[s.value for s in Status], more=more)  # fmt: skip


@router.get("/versions/{ref}")
def version(request: Request, ref: str) -> HTMLResponse:
    from amiforge.lifecycle.diff import diff_from
    from amiforge.lifecycle.promote import policy_of

    caller = _reader(request)
    ctx = context(request)
    document = docs.version_document(ctx.store, ref, console=True, recipe=True)
    v = document.version
    findings = docs.findings_of(ctx.store, policy_of(ctx.settings), v.ref) if document.scan else []
    changes, no_diff = None, ""
    try:
        with ctx.heavy():
            changes = diff_from(v.ref, store=ctx.store)
    except NotFound as e:  # a first version, or the parent or this one was never scanned
        no_diff = e.message
    except Refused:  # the expensive reads are all taken: the page without its diff
        no_diff = "the changes are not shown now: the server is busy with other expensive reads (reload later)"
    return _render(request, "version.html", caller, doc=document, findings=findings, diff=changes, no_diff=no_diff)


@router.get("/versions/{ref}/verify")
def verify(request: Request, ref: str) -> HTMLResponse:
    """The latest signature verified now against the artifacts' current bytes, or why it does not verify."""
    from amiforge.lifecycle.sign import verify as verify_version

    caller = _reader(request)
    ctx = context(request)
    version = ctx.store.get_version(ref)
    try:
        with ctx.heavy():  # it reads every artifact's bytes
            outcome, failure = verify_version(version.ref, store=ctx.store, settings=ctx.settings), None
    except GateFailed as e:
        outcome, failure = None, e
    return _render(request, "verify.html", caller, ref=version.ref, outcome=outcome, failure=failure)


@router.get("/versions/{ref}/incident")
def incident(request: Request, ref: str, hours: float = 24.0) -> HTMLResponse:
    caller = _reader(request)
    if not 0 < hours <= 24 * 90:
        raise ConfigError(f"hours {hours} is out of range", fix="between 0 and 2160")
    found = docs.incident_document(context(request).store, ref, hours=hours)
    return _render(request, "incident.html", caller, incident=found)


@router.post("/versions/{ref}/promote")
async def promote(request: Request, ref: str) -> Response:
    from amiforge.lifecycle.promote import promote as promote_version

    caller, fields = await _form(request, "operate")
    ctx = context(request)
    promote_version(ref, fields.get("channel", ""), store=ctx.store, settings=ctx.settings_for(caller),
                    reason=fields.get("reason", ""))  # fmt: skip
    return RedirectResponse(f"/versions/{quote(ref, safe='@')}", status_code=303)


@router.post("/versions/{ref}/revoke")
async def revoke(request: Request, ref: str) -> Response:
    from amiforge.lifecycle.promote import revoke as revoke_version

    caller, fields = await _form(request, "operate")
    ctx = context(request)
    revoke_version(ref, store=ctx.store, settings=ctx.settings_for(caller), reason=fields.get("reason", ""))
    return RedirectResponse(f"/versions/{quote(ref, safe='@')}", status_code=303)


# --- rollouts -------------------------------------------------------------------------------------------------------


@router.get("/rollouts")
def rollouts(request: Request, before: int | None = None) -> HTMLResponse:
    caller = _reader(request)
    page = docs.rollout_page(context(request).store, before=before)
    more = f"/rollouts?before={page.next_before}" if page.next_before else None
    return _render(request, "rollouts.html", caller, page=page, more=more)


@router.get("/rollouts/{rollout_id}")
def rollout(request: Request, rollout_id: int) -> HTMLResponse:
    return _rollout(request, rollout_id, "rollout.html")


@router.get("/rollouts/{rollout_id}/live")
def rollout_live(request: Request, rollout_id: int) -> HTMLResponse:
    """The rollout's changing part, which the page's htmx swaps in every second while the rollout is live."""
    return _rollout(request, rollout_id, "rollout_live.html")


def _rollout(request: Request, rollout_id: int, template: str) -> HTMLResponse:
    caller = _reader(request)
    report = docs.rollout_report(context(request).store, rollout_id)
    # A rollout nobody drives (a server restarted, a CLI killed) is offered Resume and Abort.
    return _render(request, template, caller, report=report, live=report.rollout.state in ROLLOUT_LIVE,
                   orphaned=report.orphaned)  # fmt: skip


@router.post("/rollouts/{rollout_id}/{action}")
async def control_rollout(request: Request, rollout_id: int, action: str) -> Response:
    from amiforge.web.api import control

    if action not in ("pause", "resume", "abort"):
        raise Refused(404, f"no action {action!r} on a rollout")
    caller, _ = await _form(request, "operate")
    control(context(request), caller, rollout_id, action)
    return RedirectResponse(f"/rollouts/{rollout_id}", status_code=303)


@router.post("/rollback")
async def rollback(request: Request) -> Response:
    from amiforge.web.api import roll_back

    caller, fields = await _form(request, "operate")
    rollout = roll_back(context(request), caller, fields.get("target", ""), fields.get("to") or None)
    return RedirectResponse(f"/rollouts/{rollout.id}", status_code=303)


# --- dashboards ---------------------------------------------------------------------------------------------------

WINDOWS = ("1h", "6h", "24h", "7d", "30d")


@router.get("/dashboards")
def dashboards_index() -> Response:
    return RedirectResponse("/dashboards/executive", status_code=303)


@router.get("/dashboards/{name}")
def dashboard(
    request: Request, name: str, version: str | None = None, target: str | None = None, window: str = "24h"
) -> HTMLResponse:
    from amiforge.durations import parse_duration
    from amiforge.lifecycle.boards import board
    from amiforge.web.charts import chart

    caller = _reader(request)
    if window not in WINDOWS:
        raise ConfigError(f"time range {window!r} is not offered", fix="pick one of " + ", ".join(WINDOWS))
    ctx = context(request)
    view = board(name, store=ctx.store, settings=ctx.settings, version=version or None, target=target or None,
                 window=timedelta(seconds=parse_duration(window, what="window")))  # fmt: skip
    charts = [chart(p.series, percent=p.unit == "percentunit") if p.series else None for p in view.panels]
    query = urlencode({k: v for k, v in {"version": version, "target": target, "window": window}.items() if v})
    boards = [("executive", "Executive"), ("oncall", "On-call"), ("debug", "Debug")]
    return _render(request, "dashboard.html", caller, board=view, charts=charts, boards=boards, current=name,
                   query=query, windows=WINDOWS, window=window)  # fmt: skip


# --- the audit log ------------------------------------------------------------------------------------------------


@router.get("/retirement")
def retirement(request: Request, all: bool = False) -> HTMLResponse:
    """The retirement plan under the server's policy: what would go, what waits, what is kept and why. Operators
    only: it reads every region's references, and shows what uses each image."""
    from amiforge.lifecycle.retire import current_plan

    caller = require(request, context(request).store, "operate")
    ctx = context(request)
    with ctx.heavy():  # every reference source of every region
        plan = current_plan(ctx.store, ctx.settings)
    shown = [s for s in plan.steps() if all or s.action not in ("keep", "done")]
    counts = {a: len(plan.steps(a)) for a in ("deprecate", "deregister", "delete-snapshots", "wait", "deferred",
                                                "blocked", "keep")}  # fmt: skip
    return _render(request, "retirement.html", caller, plan=plan, steps=shown, counts=counts, show_all=all)


@router.get("/audit")
def audit(request: Request, before: int | None = None, verify: bool = False) -> HTMLResponse:
    caller = _reader(request)
    ctx = context(request)
    page = docs.event_page(ctx.store, before=before, limit=100)
    more = f"/audit?before={page.next_before}" if page.next_before else None
    check = None
    if verify:
        with ctx.heavy():  # every event of the log
            check = docs.verify_chain(ctx.store)
    return _render(request, "audit.html", caller, page=page, more=more, check=check)
