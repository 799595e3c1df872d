"""Sessions, clients and the three ways amiforge calls AWS: once (`call`), over pages (`paginate`), and until a
just-created resource becomes visible (`eventually`).

This module owns how every AWS client is made: botocore's *standard* retry mode (exponential backoff with full jitter;
retries RequestLimitExceeded, Throttling*, 5xx and transient network errors, with a client-side retry quota), a user
agent suffix `amiforge/<version>` so AWS-side logs show who called, and — for other accounts — credentials from
STS AssumeRole with the session name `amiforge-<run>`, which CloudTrail records beside every call made with them.
Every error leaves through `errors.translate()`.
"""

from __future__ import annotations

import copy
import logging
import re
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any, TypeVar

import boto3
from botocore import xform_name
from botocore.config import Config

from amiforge import __version__
from amiforge.awsapi.errors import CAUGHT, translate
from amiforge.errors import AmiforgeError, ConfigError, NotFound
from amiforge.model import check_aws_region
from amiforge.settings import Settings
from amiforge.waiting import Wait, retry

__all__ = ["DEFAULT_MAX_ATTEMPTS", "MAX_PAGE_SIZE", "AwsSession", "call", "eventually", "iam_action", "paginate"]

logger = logging.getLogger(__name__)

T = TypeVar("T")

# Attempts per call, the first included. Standard mode's own default is 3; image builds run long and a throttled
# describe late in a bake is worth a few more tries before the whole command fails.
DEFAULT_MAX_ATTEMPTS = 8
# The largest page EC2's Describe* calls return; a smaller one multiplies API calls (and throttling) for nothing.
MAX_PAGE_SIZE = 1000
# Re-assume a role this long before its credentials expire, so no call starts with credentials about to lapse.
_REFRESH_MARGIN = timedelta(minutes=5)
# Page caps the API reference documents and the service model leaves out ("The maximum value is 100").
_PAGE_CAPS = {"DescribeAutoScalingGroups": 100, "DescribeLaunchConfigurations": 100}
_ACCOUNT_RE = re.compile(r"[0-9]{12}")
_ROLE_ARN_RE = re.compile(r"arn:aws[a-z-]*:iam::([0-9]{12}):role/[\w+=,.@/-]{1,512}")


@dataclass(frozen=True)
class _Credentials:
    access_key: str
    secret_key: str
    token: str
    expires: datetime


class AwsSession:
    """One identity's view of AWS: a boto3 session (profile or default chain), its home region, and optionally one
    role per other account to assume. Clients are made once per (service, region, account) and reused.

    `boto_session` lets tests pass a session with event handlers registered (fault injection, call counting): every
    client, including those with assumed-role credentials, is made from it, so the handlers see every call."""

    def __init__(
        self,
        region: str,
        *,
        profile: str | None = None,
        role_arns: Mapping[str, str] | None = None,
        run_id: str = "adhoc",
        max_attempts: int = DEFAULT_MAX_ATTEMPTS,
        boto_session: boto3.Session | None = None,
        now: Callable[[], datetime] = lambda: datetime.now(UTC),
    ) -> None:
        if max_attempts < 1:
            raise ConfigError(f"max_attempts is {max_attempts}; it must be at least 1")
        # Checked before boto3 sees it: botocore would turn a bad name into an endpoint host name.
        self.region = check_aws_region(region, what="AWS region")
        self.run_id = run_id
        self._roles = dict(role_arns or {})
        for account, arn in self._roles.items():
            match = _ROLE_ARN_RE.fullmatch(arn)
            if _ACCOUNT_RE.fullmatch(account) is None or match is None or match.group(1) != account:
                raise ConfigError(
                    f"role for account {account!r} is {arn!r}, which is not an IAM role ARN in that account",
                    fix="use arn:aws:iam::<12-digit account>:role/<name>, keyed by the same account id",
                )
        self._boto = boto_session or boto3.Session(profile_name=profile, region_name=region)
        self._config = Config(
            # total_max_attempts counts the first attempt; botocore's `max_attempts` key counts only retries.
            retries={"mode": "standard", "total_max_attempts": max_attempts},
            user_agent_extra=f"amiforge/{__version__}",
        )
        self._config_attempts = max_attempts
        # For calls that must not be repeated blindly (see client(single_attempt=True)).
        self._single_config = self._config.merge(Config(retries={"mode": "standard", "total_max_attempts": 1}))
        self._now = now
        self._clients: dict[tuple[str, str, str | None, bool], tuple[Any, datetime | None]] = {}
        self._credentials: dict[str, _Credentials] = {}
        self._lock = threading.Lock()
        self._account: str | None = None  # set on as_account() views

    @classmethod
    def from_settings(cls, settings: Settings, region: str, *, boto_session: boto3.Session | None = None) -> AwsSession:
        """The session amiforge's settings describe, in `region`: their profile, one role per other account, and
        their attempts per call. The AWS provider's sessions and KMS signing's are made here, so they cannot differ."""
        return cls(
            region,
            profile=settings.aws_profile,
            role_arns=settings.aws_roles,
            max_attempts=settings.aws_max_attempts,
            boto_session=boto_session,
        )

    @property
    def boto_session(self) -> boto3.Session:
        return self._boto

    @property
    def role_session_name(self) -> str:
        # STS allows [\w+=,.@-]{2,64}; a run id is ours, but a stray character must not turn into an STS error.
        return ("amiforge-" + re.sub(r"[^\w+=,.@-]", "-", self.run_id))[:64]

    def as_account(self, account: str) -> AwsSession:
        """This session acting in `account` through its configured role: every client it makes is the role's.
        Shares the clients, credentials and lock of this session (a view, not a second session)."""
        if account not in self._roles:
            raise _no_role(account)
        view = copy.copy(self)
        view._account = account
        return view

    def client(
        self, service: str, region: str | None = None, *, account: str | None = None, single_attempt: bool = False
    ) -> Any:
        """A client for `service` in `region` (the session's by default), as the caller or as `account`'s role
        (by default the account of an `as_account` view).

        `single_attempt`: botocore sends each request once and never retries it, for a call that runs something
        each time AWS receives it (SSM SendCommand): after a failure the caller finds out whether it was taken."""
        region = check_aws_region(region, what="AWS region") if region else self.region
        account = account if account is not None else self._account
        key = (service, region, account, single_attempt)
        config = self._single_config if single_attempt else self._config
        with self._lock:
            creds = self._assumed(account) if account is not None else None
            expires = creds.expires if creds is not None else None
            cached = self._clients.get(key)
            # A client made with assumed credentials is reused only while those credentials are the current ones.
            if cached is not None and cached[1] == expires:
                return cached[0]
            if creds is None:
                client = self._boto.client(service, region_name=region, config=config)
            else:
                client = self._boto.client(
                    service,
                    region_name=region,
                    config=config,
                    aws_access_key_id=creds.access_key,
                    aws_secret_access_key=creds.secret_key,
                    aws_session_token=creds.token,
                )
            _log_calls(client, account, 1 if single_attempt else self._config_attempts)
            self._clients[key] = (client, expires)
            return client

    def _assumed(self, account: str) -> _Credentials:
        arn = self._roles.get(account)
        if arn is None:
            raise _no_role(account)
        cached = self._credentials.get(account)
        if cached is not None and cached.expires - self._now() > _REFRESH_MARGIN:
            return cached
        # The caller's own STS client (the lock is held, so not through client()).
        cached_sts = self._clients.get(("sts", self.region, None, False))
        if cached_sts is None:
            sts_client = self._boto.client("sts", region_name=self.region, config=self._config)
            _log_calls(sts_client, None, self._config_attempts)
            cached_sts = (sts_client, None)
            self._clients[("sts", self.region, None, False)] = cached_sts
        sts = cached_sts[0]
        answer = call(sts, "AssumeRole", arn, RoleArn=arn, RoleSessionName=self.role_session_name)["Credentials"]
        expires = answer["Expiration"]
        creds = _Credentials(
            access_key=answer["AccessKeyId"],
            secret_key=answer["SecretAccessKey"],
            token=answer["SessionToken"],
            expires=expires if isinstance(expires, datetime) else datetime.fromisoformat(str(expires)),
        )
        self._credentials[account] = creds
        return creds


# --- logging every call: what was called, where, its answer and its attempts; never what was sent --------------

# Keys amiforge keeps in botocore's per-call context (a dict that lives for one API call, retries included).
_STARTED = "amiforge.started"
_LAST_ATTEMPT = "amiforge.last_attempt"


def _log_calls(client: Any, account: str | None, max_attempts: int) -> None:
    """Log each call `client` makes (logger `amiforge.awsapi.clients`): DEBUG for an answered call, INFO for an
    error answer, a failed attempt that is retried, and a call that needed retries. Each line names the service,
    operation, region (and the account of an assumed role), HTTP status and error code, request id, attempts and
    seconds. Parameters and bodies are never logged: they hold KMS messages, SSM command text, user data, tags.

    botocore's own loggers stay at WARNING (cli/logs.py): at DEBUG they log whole requests and responses."""
    service = client.meta.service_model.service_name
    region = client.meta.region_name
    where = f"{region} as {account}" if account else str(region)
    events = client.meta.events

    def started(context: dict[str, Any], **_: Any) -> None:
        context[_STARTED] = time.monotonic()

    def attempted(
        request_dict: dict[str, Any], response: Any = None, caught_exception: BaseException | None = None, **_: Any
    ) -> None:
        # needs-retry: after each attempt, before botocore decides whether to retry. Remember how it went; a retry
        # that follows is logged when its request is made (resent).
        request_dict["context"][_LAST_ATTEMPT] = _outcome(response, caught_exception)

    def resent(request: Any, operation_name: str, **_: Any) -> None:
        context = getattr(request, "context", None) or {}
        attempt = int((context.get("retries") or {}).get("attempt", 1))
        if attempt > 1:
            logger.info(
                "aws %s %s %s: retrying (attempt %d of %d) after %s",
                service,
                operation_name,
                where,
                attempt,
                max_attempts,
                context.get(_LAST_ATTEMPT, "a failed attempt"),
            )

    def answered(http_response: Any, parsed: Mapping[str, Any], model: Any, context: dict[str, Any], **_: Any) -> None:
        meta = parsed.get("ResponseMetadata") or {}
        status = getattr(http_response, "status_code", None) or meta.get("HTTPStatusCode")
        code = (parsed.get("Error") or {}).get("Code")
        attempts = int(meta.get("RetryAttempts", 0)) + 1
        level = logging.INFO if code or attempts > 1 else logging.DEBUG
        logger.log(
            level,
            "aws %s %s %s: HTTP %s%s, request id %s, %d attempt%s, %.2fs",
            service,
            model.name,
            where,
            status,
            f" {code}" if code else "",
            meta.get("RequestId") or _request_id(http_response) or "-",
            attempts,
            "" if attempts == 1 else "s",
            _seconds(context),
        )

    def failed(exception: BaseException, context: dict[str, Any], event_name: str = "", **_: Any) -> None:
        attempts = int((context.get("retries") or {}).get("attempt", 1))
        logger.info(
            "aws %s %s %s: no answer (%s), %d attempt%s, %.2fs",
            service,
            event_name.rsplit(".", 1)[-1],
            where,
            type(exception).__name__,
            attempts,
            "" if attempts == 1 else "s",
            _seconds(context),
        )

    events.register("before-call", started, unique_id="amiforge-log-started")
    events.register("needs-retry", attempted, unique_id="amiforge-log-attempted")
    events.register("request-created", resent, unique_id="amiforge-log-resent")
    events.register("after-call", answered, unique_id="amiforge-log-answered")
    events.register("after-call-error", failed, unique_id="amiforge-log-failed")


def _outcome(response: Any, caught: BaseException | None) -> str:
    """One attempt's result in a few words: `HTTP 503 RequestLimitExceeded`, `ConnectTimeoutError`."""
    if caught is not None:
        return type(caught).__name__
    if not response:
        return "no response"
    http, parsed = response
    code = (parsed.get("Error") or {}).get("Code") if isinstance(parsed, Mapping) else None
    return f"HTTP {getattr(http, 'status_code', '?')}" + (f" {code}" if code else "")


def _request_id(http_response: Any) -> str | None:
    headers = getattr(http_response, "headers", None) or {}
    for name in ("x-amzn-requestid", "x-amz-request-id", "x-amzn-RequestId"):
        value = headers.get(name)
        if value:
            return str(value)
    return None


def _seconds(context: Mapping[str, Any]) -> float:
    start = context.get(_STARTED)
    return time.monotonic() - start if isinstance(start, float) else 0.0


def _no_role(account: str) -> ConfigError:
    return ConfigError(
        f"no role to assume is configured for account {account}",
        fix='set AMIFORGE_AWS_ROLES=\'{"<account>": "arn:aws:iam::<account>:role/<name>"}\' (or aws_roles in '
        "amiforge.toml)",
    )


def iam_action(client: Any, operation: str) -> str:
    """`ec2:DescribeImages` for an EC2 client and DescribeImages: the IAM action a permission error should name.

    For most services the signing name is the IAM service prefix; CloudWatch signs as `monitoring`."""
    prefix = client.meta.service_model.signing_name
    return f"{_IAM_PREFIX.get(prefix, prefix)}:{operation}"


# Signing names that differ from the IAM service prefix.
_IAM_PREFIX = {"monitoring": "cloudwatch"}


def call(client: Any, operation: str, resource: str, **kwargs: Any) -> Any:
    """One API call by its operation name (`DescribeImages`); any AWS error leaves as an amiforge error.

    The IAM action in error messages is derived from the client and operation, so it cannot disagree with the call."""
    method = getattr(client, xform_name(operation))
    try:
        return method(**kwargs)
    except CAUGHT as e:
        raise translate(e, iam_action(client, operation), resource) from e


def paginate(
    client: Any,
    operation: str,
    key: str,
    resource: str,
    *,
    page_size: int | None = MAX_PAGE_SIZE,
    pages: Counter[str] | None = None,
    **kwargs: Any,
) -> Iterator[Any]:
    """Every item under `key` of every page of `operation`, through botocore's paginator.

    Pages are as large as the operation allows (at most `page_size`), so listing N items costs ⌈N/page⌉ calls.
    Pass `page_size=None` for requests that must not carry MaxResults (EC2 refuses it together with explicit ids).
    `pages` counts the pages read, by operation."""
    paginator = client.get_paginator(xform_name(operation))
    config: dict[str, int] = {}
    if page_size is not None:
        members = client.meta.service_model.operation_model(operation).input_shape.members
        limit = members.get("MaxResults") or members.get("MaxRecords")  # Auto Scaling says MaxRecords
        if limit is not None:
            # Some operations cap pages far lower (SSM GetParametersByPath: 10); asking for more is an error. Where
            # the service model leaves the cap out, the API reference's is used.
            most = int(limit.metadata.get("max", _PAGE_CAPS.get(operation, page_size)))
            config["PageSize"] = max(int(limit.metadata.get("min", 1)), min(page_size, most))
    try:
        for page in paginator.paginate(PaginationConfig=config, **kwargs):
            if pages is not None:
                pages[operation] += 1
            yield from page.get(key, [])
    except CAUGHT as e:
        raise translate(e, iam_action(client, operation), resource) from e


def eventually(
    fn: Callable[[], T],
    *,
    retry_on: tuple[type[AmiforgeError], ...] = (NotFound,),
    timeout: float = 120.0,
    first_delay: float = 1.0,
    max_delay: float = 15.0,
    sleep: Callable[[float], None] = time.sleep,
    clock: Callable[[], float] = time.monotonic,
) -> T:
    """`fn()`, retried while it raises one of `retry_on`, with doubling delays, until `timeout` seconds have passed.

    For EC2's eventual consistency: an image id that CreateImage or CopyImage just returned can be unknown to
    DescribeImages for a few seconds. Use it only right after such a create — elsewhere a NotFound is the answer.
    botocore does not retry *.NotFound (it is not a transient error to it), hence this loop. `sleep` and `clock`
    are injectable so tests do not wait."""
    wait = Wait(first_delay=first_delay, max_delay=max_delay, deadline=timeout, sleep=sleep, clock=clock)
    return retry(fn, again=lambda e: isinstance(e, retry_on), wait=wait)
