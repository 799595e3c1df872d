"""The JSON API under /api/v1: what the pages show, and the operations, each calling the same lifecycle function as
the CLI command of the same name (same gates, same errors, same events, with the token as the actor).

Responses are the documents of `lifecycle/documents.py` (and the lifecycle's outcomes), rendered by `model.to_json`
as the CLI's `--json` renders them; `response_model` gives OpenAPI their schema. Errors are the error tree's: a
JSON body `{error, message, fix}` with the error's HTTP status (app.py).
"""

from __future__ import annotations

from datetime import timedelta
from typing import Annotated, Any, Literal

from fastapi import APIRouter, Depends, Path, Query, Request, Response
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field

from amiforge.lifecycle import documents as docs
from amiforge.lifecycle import tokens
from amiforge.lifecycle.boards import BoardView
from amiforge.lifecycle.controller import TARGET_PATTERN
from amiforge.lifecycle.diff import VersionDiff
from amiforge.lifecycle.retire_plan import RetirePlan
from amiforge.lifecycle.sign import VerifyOutcome
from amiforge.model import IMAGE_NAME_PATTERN, Rollout, Status, TrustedKey, to_json
from amiforge.policy.fields import CHANNEL_PATTERN
from amiforge.strategy import Strategy
from amiforge.web.auth import Caller, require
from amiforge.web.context import Context, context


class ErrorDoc(BaseModel):
    """Every refusal: the error tree's kind (docs/architecture.md §6), what is wrong and how to fix it."""

    error: str
    message: str
    fix: str | None = None


# What any route may answer besides its own success: the error tree's statuses.
ERRORS: dict[int | str, dict[str, Any]] = {
    status: {"model": ErrorDoc, "description": what}
    for status, what in (
        (400, "bad input (config)"),
        (401, "no valid token"),
        (403, "the token's role is too weak, or a session's form key is missing"),
        (404, "not found"),
        (409, "the state does not allow it (state)"),
        (422, "invalid request, or a gate failed (gate: with its failures)"),
        (502, "the infrastructure failed (infra)"),
    )
}

router = APIRouter(prefix="/api/v1", responses=ERRORS)

REF = rf"^{IMAGE_NAME_PATTERN}@[1-9][0-9]{{0,8}}$|^[0-9a-f]{{8,64}}$"  # NAME@N or a digest prefix
Ref = Annotated[str, Field(pattern=REF, max_length=80)]
RefPath = Annotated[str, Path(pattern=REF, max_length=80)]
RolloutId = Annotated[int, Path(ge=1, le=2**62)]
# A target as lifecycle.controller.parse_target reads it: a local fleet (bare or local:NAME) or aws:REGION/GROUP.
TARGET = f"^(?:{TARGET_PATTERN})$"
RolloutState = Literal["running", "paused", "rolling-back", "succeeded", "failed", "aborted"]
TOKEN_NAME = f"^{tokens.NAME_PATTERN}$"
Limit = Annotated[int, Query(ge=1, le=docs.MAX_PAGE)]
Cursor = Annotated[int | None, Query(ge=1, le=2**62, description="the `next_before` of the previous page")]


def _reader(request: Request) -> Caller:
    return require(request, context(request).store, "read")


def _operator(request: Request) -> Caller:
    return require(request, context(request).store, "operate")


def _admin(request: Request) -> Caller:
    return require(request, context(request).store, "admin")


Reader = Annotated[Caller, Depends(_reader)]
Operator = Annotated[Caller, Depends(_operator)]
Admin = Annotated[Caller, Depends(_admin)]
Ctx = Annotated[Context, Depends(context)]


def document(value: object, status: int = 200) -> JSONResponse:
    return JSONResponse(to_json(value), status_code=status)


class Body(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


# --- reading ---------------------------------------------------------------------------------------------------------


@router.get("/catalog", response_model=docs.Catalog, summary="Images, their versions by state, and their channels")
def get_catalog(_: Reader, ctx: Ctx) -> Response:
    return document(docs.catalog(ctx.store))


@router.get("/versions", response_model=docs.VersionPage, summary="Versions, newest first, a page at a time")
def list_versions(
    _: Reader,
    ctx: Ctx,
    name: Annotated[str | None, Query(pattern=f"^{IMAGE_NAME_PATTERN}$")] = None,
    status: Annotated[list[Status] | None, Query()] = None,
    search: Annotated[str | None, Query(max_length=63, pattern=r"^[^\x00]*$")] = None,
    limit: Limit = 50,
    before: Cursor = None,
) -> Response:
    page = docs.version_page(ctx.store, name=name, statuses=status, search=search, limit=limit, before=before)
    return document(page)


@router.get("/versions/{ref}", response_model=docs.VersionDocument, summary="Everything about one version")
def get_version(
    _: Reader,
    ctx: Ctx,
    ref: RefPath,
    console: bool = False,
    log: bool = False,
    recipe: bool = False,
) -> Response:
    return document(docs.version_document(ctx.store, ref, console=console, log=log, recipe=recipe))


@router.get("/versions/{ref}/sbom", summary="The SBOM of the version's latest scan (CycloneDX 1.6 or SPDX 2.3)")
def get_sbom(_: Reader, ctx: Ctx, ref: RefPath, format: Literal["cyclonedx", "spdx"] = "cyclonedx") -> Response:
    version, text, _count = docs.sbom_text(ctx.store, ref, format)
    name = f"{version.name}-{version.number}.{format}.json"
    return Response(
        text, media_type="application/json", headers={"Content-Disposition": f'attachment; filename="{name}"'}
    )


@router.get("/versions/{ref}/findings", response_model=list[docs.FindingRow],
            summary="The latest scan's findings, most severe first, with the policy's waivers naming each")  # fmt: skip
def get_findings(_: Reader, ctx: Ctx, ref: RefPath) -> Response:
    from amiforge.lifecycle.promote import policy_of

    return document(docs.findings_of(ctx.store, policy_of(ctx.settings), ref))


@router.get("/versions/{ref}/diff", response_model=VersionDiff,
            summary="What changed from another version (default: the parent): packages, CVEs, secrets")  # fmt: skip
def get_diff(
    _: Reader, ctx: Ctx, ref: RefPath, against: Annotated[str | None, Query(pattern=REF, max_length=80)] = None
) -> Response:
    from amiforge.lifecycle.diff import diff_from

    with ctx.heavy():
        return document(diff_from(ref, store=ctx.store, against=against))


@router.get("/versions/{ref}/verify", response_model=VerifyOutcome,
            summary="Verify the latest signature against the artifacts as they are now (amiforge verify)")  # fmt: skip
def verify_version(_: Reader, ctx: Ctx, ref: RefPath) -> Response:
    from amiforge.lifecycle.sign import verify

    with ctx.heavy():  # it reads every artifact's bytes
        return document(verify(ref, store=ctx.store, settings=ctx.settings))


@router.get("/versions/{ref}/incident", response_model=docs.IncidentDocument,
            summary="What ran a version lately and how to undo it (amiforge incident)")  # fmt: skip
def get_incident(
    _: Reader, ctx: Ctx, ref: RefPath, hours: Annotated[float, Query(ge=1 / 60, le=24 * 90)] = 24.0
) -> Response:
    return document(docs.incident_document(ctx.store, ref, hours=hours))


@router.get("/versions/{ref}/events", response_model=docs.EventPage, summary="A version's events, a page at a time")
def get_version_events(_: Reader, ctx: Ctx, ref: RefPath, limit: Limit = 100, before: Cursor = None) -> Response:
    version = ctx.store.get_version(ref)
    return document(docs.event_page(ctx.store, ref=version.ref, limit=limit, before=before))


@router.get("/channels", response_model=list[docs.ChannelRow], summary="Every channel: current and rollback versions")
def list_channels(_: Reader, ctx: Ctx) -> Response:
    return document(docs.channel_rows(ctx.store))


@router.get("/rollouts", response_model=docs.RolloutPage, summary="Rollouts, newest first, a page at a time")
def list_rollouts(
    _: Reader,
    ctx: Ctx,
    state: Annotated[list[RolloutState] | None, Query()] = None,
    limit: Limit = 50,
    before: Cursor = None,
) -> Response:
    return document(docs.rollout_page(ctx.store, states=state, limit=limit, before=before))


@router.get("/rollouts/{rollout_id}", response_model=docs.RolloutReport, summary="A rollout, its decisions, members")
def get_rollout(_: Reader, ctx: Ctx, rollout_id: RolloutId) -> Response:
    return document(docs.rollout_report(ctx.store, rollout_id))


@router.get("/dashboards/{name}", response_model=BoardView,
            summary="A dashboard (executive, oncall, debug): the Grafana boards' panels from the registry")  # fmt: skip
def get_dashboard(
    _: Reader,
    ctx: Ctx,
    name: Literal["executive", "oncall", "debug"],
    version: Annotated[str | None, Query(pattern=REF, max_length=80)] = None,
    target: Annotated[str | None, Query(pattern=TARGET, max_length=300)] = None,
    hours: Annotated[float, Query(ge=1 / 60, le=24 * 30)] = 24.0,
) -> Response:
    from amiforge.lifecycle.boards import board

    view = board(name, store=ctx.store, settings=ctx.settings, version=version, target=target,
                 window=timedelta(hours=hours))  # fmt: skip
    return document(view)


@router.get("/retirement", response_model=RetirePlan,
            summary="What `amiforge retire` would do now, under the server's policy, and why")  # fmt: skip
def get_retirement(_: Operator, ctx: Ctx) -> Response:
    """Operators only: it reads every region's references (API calls of the account's quota) and shows what uses
    each image, other accounts' resources included."""
    from amiforge.lifecycle.retire import current_plan

    with ctx.heavy():  # every reference source of every region
        return document(current_plan(ctx.store, ctx.settings))


@router.get("/events", response_model=docs.EventPage, summary="The audit log, newest page first")
def list_events(_: Reader, ctx: Ctx, limit: Limit = 100, before: Cursor = None) -> Response:
    return document(docs.event_page(ctx.store, limit=limit, before=before))


@router.get("/events/verify", response_model=docs.ChainCheck, summary="Recompute the audit log's hash chain")
def verify_events(_: Reader, ctx: Ctx) -> Response:
    with ctx.heavy():  # every event of the log
        return document(docs.verify_chain(ctx.store))


# --- operations ------------------------------------------------------------------------------------------------------


class PromoteBody(Body):
    channel: str = Field(pattern=f"^{CHANNEL_PATTERN}$", examples=["dev"])
    reason: str = Field(default="", max_length=500)


@router.post("/versions/{ref}/promote", summary="Promote through the channel's gates (amiforge promote)")
def promote(caller: Operator, ctx: Ctx, ref: RefPath, body: PromoteBody) -> Response:
    from amiforge.lifecycle.promote import promote as promote_version

    outcome = promote_version(ref, body.channel, store=ctx.store, settings=ctx.settings_for(caller), reason=body.reason)
    return document(outcome)


class RevokeBody(Body):
    reason: str = Field(min_length=1, max_length=500)


@router.post("/versions/{ref}/revoke", summary="Revoke a version, flagging its descendants (amiforge revoke)")
def revoke(caller: Operator, ctx: Ctx, ref: RefPath, body: RevokeBody) -> Response:
    from amiforge.lifecycle.promote import revoke as revoke_version

    return document(revoke_version(ref, store=ctx.store, settings=ctx.settings_for(caller), reason=body.reason))


class RolloutBody(Body):
    target: str = Field(pattern=TARGET, max_length=300, examples=["local:web"])
    version: Ref
    strategy: Strategy = Field(default_factory=Strategy)


@router.post("/rollouts", status_code=202, response_model=docs.RolloutReport,
             summary="Start a rollout; this server drives it (amiforge rollout start)")  # fmt: skip
def start_rollout(caller: Operator, ctx: Ctx, body: RolloutBody) -> Response:
    from amiforge.lifecycle import rollout as controller

    settings = ctx.settings_for(caller)
    rollout = controller.begin(body.target, body.version, store=ctx.store, settings=settings, strategy=body.strategy)
    ctx.controllers.drive(rollout.id, settings)
    return document(docs.rollout_report_of(ctx.store, rollout), 202)


class RollbackBody(Body):
    target: str = Field(pattern=TARGET, max_length=300, examples=["local:web"])
    to: Ref | None = None


@router.post("/rollback", status_code=202, response_model=docs.RolloutReport,
             summary="Put a target back on its previous version (amiforge rollback)")  # fmt: skip
def rollback(caller: Operator, ctx: Ctx, body: RollbackBody) -> Response:
    return document(docs.rollout_report_of(ctx.store, roll_back(ctx, caller, body.target, body.to)), 202)


def roll_back(ctx: Context, caller: Caller, target: str, to: str | None) -> Rollout:
    """Record the rollback of `target` and drive it here: what the API and the rollout page's button do."""
    from amiforge.lifecycle import rollout as controller

    settings = ctx.settings_for(caller)
    rollout = controller.begin_rollback(target, store=ctx.store, settings=settings, to=to)
    ctx.controllers.drive(rollout.id, settings)
    return rollout


@router.post("/rollouts/{rollout_id}/{action}", response_model=docs.RolloutReport,
             summary="Pause, resume or abort a rollout (amiforge rollout pause|resume|abort)")  # fmt: skip
def control_rollout(
    caller: Operator,
    ctx: Ctx,
    rollout_id: RolloutId,
    action: Literal["pause", "resume", "abort"],
) -> Response:
    return document(control(ctx, caller, rollout_id, action))


def control(ctx: Context, caller: Caller, rollout_id: int, action: str) -> docs.RolloutReport:
    """Pause or abort (the controller acts between steps), or resume here: what the rollout page's buttons do."""
    from amiforge.lifecycle import rollout as controller

    settings = ctx.settings_for(caller)
    if action == "resume":
        rollout = controller.reopen(rollout_id, store=ctx.store, settings=settings)
        ctx.controllers.drive(rollout.id, settings)
    else:
        rollout = controller.request(rollout_id, action, store=ctx.store, settings=settings)
    return docs.rollout_report_of(ctx.store, rollout)


# --- signing keys -------------------------------------------------------------------------------------------------


@router.get("/keys", response_model=list[TrustedKey], summary="The signing keys the registry trusts, revoked ones too")
def list_keys(_: Reader, ctx: Ctx) -> Response:
    return document(ctx.store.signing_keys())


class KeyRevokeBody(Body):
    reason: str = Field(min_length=1, max_length=500)


@router.post("/keys/{key_id}/revoke", response_model=TrustedKey,
             summary="Stop trusting a key: every signature it made stops verifying (amiforge keys revoke)")  # fmt: skip
def revoke_key(
    caller: Admin, ctx: Ctx, key_id: Annotated[str, Path(min_length=1, max_length=200)], body: KeyRevokeBody
) -> Response:
    from amiforge.lifecycle.sign import revoke_trusted_key

    return document(revoke_trusted_key(ctx.store, key_id, reason=body.reason, actor=caller.actor))


# --- tokens (admin) --------------------------------------------------------------------------------------------------


class TokenBody(Body):
    name: str = Field(pattern=TOKEN_NAME)
    role: Literal["read", "operate", "admin"]


class CreatedTokenDoc(BaseModel):
    token: docs.TokenRow
    secret: str


@router.get("/tokens", response_model=list[docs.TokenRow], summary="Every token (never a secret)")
def list_tokens(_: Admin, ctx: Ctx) -> Response:
    return document([docs.TokenRow.of(t) for t in tokens.list_tokens(ctx.store)])


@router.post("/tokens", status_code=201, response_model=CreatedTokenDoc,
             summary="Create a token; its secret is in this answer only")  # fmt: skip
def create_token(caller: Admin, ctx: Ctx, body: TokenBody) -> Response:
    created = tokens.create_token(body.name, body.role, store=ctx.store, settings=ctx.settings_for(caller))
    return document({"token": docs.TokenRow.of(created.token), "secret": created.secret}, 201)


@router.post("/tokens/{name}/revoke", response_model=docs.TokenRow, summary="Revoke a token")
def revoke_token(caller: Admin, ctx: Ctx, name: Annotated[str, Path(pattern=TOKEN_NAME)]) -> Response:
    revoked = tokens.revoke_token(name, store=ctx.store, settings=ctx.settings_for(caller))
    return document(docs.TokenRow.of(revoked.token))
