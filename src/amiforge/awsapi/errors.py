"""The one table from AWS error codes to amiforge errors, for EC2, Auto Scaling, SSM, STS and KMS
(docs/architecture.md §6).

Every botocore error that leaves an AWS call goes through `translate()`, which decides by the error *code* alone: the
message text AWS sends is shown to the user, never inspected. Codes are looked up exactly first, then against the
wildcard families of the same table (`*.NotFound`, `AccessDenied*`, …) in the order they are written. A code the table
does not know becomes a non-retryable InfraError that names it: unexpected, so reported, never swallowed.

By the time an error reaches `translate()`, botocore's standard retry mode has already retried throttling and
transient server errors with jittered backoff; `retryable=True` says a later retry of the whole command may still help.
"""

from __future__ import annotations

import fnmatch
from collections.abc import Mapping
from dataclasses import dataclass

from botocore.exceptions import (
    BotoCoreError,
    ClientError,
    ConnectionClosedError,
    ConnectTimeoutError,
    EndpointConnectionError,
    NoCredentialsError,
    NoRegionError,
    PartialCredentialsError,
    ProfileNotFound,
    ReadTimeoutError,
)

from amiforge.errors import AmiforgeError, ConfigError, InfraError, NotFound, StateError

__all__ = ["AWS_ERRORS", "CAUGHT", "Rule", "error_for_code", "is_permission_error", "rule_for", "translate"]


@dataclass(frozen=True)
class Rule:
    """What one AWS error code means to amiforge. `fix` may name `{action}`, the IAM action (ec2:DescribeImages)."""

    family: type[AmiforgeError]
    fix: str | None = None
    retryable: bool = False


_PERMISSION = "grant {action} to the identity amiforge runs as (`amiforge doctor` lists every permission it needs)"
_CREDENTIALS = "check the AWS credentials amiforge runs with (profile, environment, instance role)"
# AWS answers a call into a region the account has not enabled (an opt-in region, launched after March 2019) with
# the same codes as bad credentials (EC2 AuthFailure, STS InvalidClientTokenId, JSON services
# UnrecognizedClientException), and nothing in the answer tells the two apart: the fix names both, region first.
_CREDENTIALS_OR_REGION = (
    "if the region is an opt-in region, enable it for the account (Account settings → AWS Regions; "
    "`amiforge doctor --aws --recipe FILE` shows each region's status); otherwise " + _CREDENTIALS
)
_RETRY_LATER = "retry later; botocore already retried with backoff"
_THROTTLED = "lower the request rate (fewer parallel runs) or ask AWS for a higher API rate quota"
_KMS_STATE = "the key is pending deletion or import, or unavailable: cancel that or use another key"

# The one table. Exact codes first (dict order does not matter for them); wildcard keys are tried in written order,
# most specific first. Add a code here, never an `if code == …` at a call site.
AWS_ERRORS: Mapping[str, Rule] = {
    # --- not found (EC2 answers Unavailable for an image that was deregistered) -----------------------------------
    "InvalidAMIID.Unavailable": Rule(NotFound, "the image was deregistered; resolve the source again"),
    "InvalidAMIID.Malformed": Rule(ConfigError, "an image id looks like ami-0123456789abcdef0"),
    "ParameterNotFound": Rule(NotFound, "check the SSM parameter name and the region it is read in"),
    "ParameterVersionNotFound": Rule(NotFound, "check the SSM parameter version or label"),
    "NotFoundException": Rule(NotFound, "check the KMS key id or ARN, and that it lives in this region"),
    "InvalidLaunchTemplateName.NotFoundException": Rule(NotFound, "check the launch template name and region"),
    "InvalidLaunchTemplateId.VersionNotFound": Rule(NotFound, "check the launch template version number"),
    # SSM: right after SendCommand, or before the agent on a new instance has registered; callers poll on NotFound.
    "InvocationDoesNotExist": Rule(NotFound, "the command invocation is not visible yet; it is polled again"),
    "InvalidInstanceId": Rule(NotFound, "the instance is not registered with SSM (yet); check the SSM agent and role"),
    # SSM tagging a parameter that does not exist: an aws:ec2:image parameter exists only once SSM has validated it.
    "InvalidResourceId": Rule(
        NotFound,
        "check the SSM parameter name and region; an aws:ec2:image parameter exists only once SSM accepted its image, "
        "which must exist in that region, be available and be visible to the account",
    ),
    # EBS direct APIs (snapshot reads for scans).
    "ResourceNotFoundException": Rule(
        NotFound, "check the snapshot id; it must be a completed snapshot in this region"
    ),
    # Service Quotas: no such quota (code) for the service in this region.
    "NoSuchResourceException": Rule(NotFound, "check the service and quota code, and the region asked"),
    # --- permissions and credentials --------------------------------------------------------------------------------
    "UnauthorizedOperation": Rule(ConfigError, _PERMISSION),
    "AuthFailure": Rule(ConfigError, _CREDENTIALS_OR_REGION),
    "UnrecognizedClientException": Rule(ConfigError, _CREDENTIALS_OR_REGION),
    "InvalidClientTokenId": Rule(ConfigError, _CREDENTIALS_OR_REGION),
    "SignatureDoesNotMatch": Rule(ConfigError, _CREDENTIALS),
    "ExpiredToken": Rule(ConfigError, _CREDENTIALS),
    "ExpiredTokenException": Rule(ConfigError, _CREDENTIALS),
    "RegionDisabledException": Rule(ConfigError, "enable the region for the account (STS), or use another region"),
    "OptInRequired": Rule(ConfigError, "subscribe the account to this service or region"),
    # --- bad requests: our inputs (recipe, settings, flags) are wrong ----------------------------------------------
    "InvalidParameterValue": Rule(ConfigError, "check the values in the recipe and settings"),
    "InvalidParameterCombination": Rule(ConfigError, "check the values in the recipe and settings"),
    "InvalidParameter": Rule(ConfigError, "check the values in the recipe and settings"),
    "ValidationError": Rule(ConfigError, "check the values in the recipe and settings"),
    "ValidationException": Rule(ConfigError, "check the values in the recipe and settings"),
    "MissingParameter": Rule(ConfigError, "check the values in the recipe and settings"),
    # EC2: a parameter given without the one it needs (CopyImage KmsKeyId without Encrypted=true).
    "InvalidParameterDependency": Rule(ConfigError, "check the values in the recipe and settings"),
    "InvalidKeyId": Rule(ConfigError, "check the KMS key id or ARN"),
    "InvalidKeyUsageException": Rule(ConfigError, "use an ECC_NIST_P256 key with key usage SIGN_VERIFY"),
    "DisabledException": Rule(ConfigError, "enable the key (aws kms enable-key) or configure another"),
    "KMSInvalidStateException": Rule(ConfigError, _KMS_STATE),
    "InvalidAMIName.Duplicate": Rule(StateError, "an image with this name exists already in this region"),
    # EC2 key pairs (the SSH communicator's throw-away key, named after its run): ImportKeyPair of a name that exists;
    # DescribeKeyPairs of a name that does not.
    "InvalidKeyPair.Duplicate": Rule(
        StateError,
        "a key pair with this name exists already in this region: an earlier attempt of the same run imported it "
        "(gc removes it once the run has finished), or delete it: aws ec2 delete-key-pair --key-name NAME",
    ),
    "InvalidKeyPair.NotFound": Rule(NotFound, "check the key pair name and the region; it may have been deleted"),
    "IdempotentParameterMismatch": Rule(
        StateError, "this run's request was first made with other parameters; use a new run id"
    ),
    "ParameterAlreadyExists": Rule(StateError, "the SSM parameter exists already; it is overwritten only on purpose"),
    "IncorrectState": Rule(StateError, "the resource is not in a state that allows this; wait and re-run"),
    "InvalidSnapshot.InUse": Rule(
        StateError, "an image still uses the snapshot (EC2 may lag a deregistration); re-run"
    ),
    "VolumeInUse": Rule(StateError, "the volume is attached; detach it or wait for its instance to go, then re-run"),
    "IncorrectInstanceState": Rule(StateError, "the instance is not in a state that allows this; wait and re-run"),
    # Auto Scaling: the group is busy (a scaling activity, another update). Transient: the fleet retries them itself.
    "ScalingActivityInProgress": Rule(
        InfraError, "a scaling activity of the group is in progress; re-run once it has ended", True
    ),
    "ResourceContention": Rule(InfraError, "the group has another update pending; re-run in a moment", True),
    # Auto Scaling instance refresh (providers/aws/refresh.py): one active refresh per group.
    "InstanceRefreshInProgress": Rule(
        StateError,
        "the group has an instance refresh in progress; wait for it to end (aws autoscaling "
        "describe-instance-refreshes) or cancel it",
    ),
    "ActiveInstanceRefreshNotFound": Rule(NotFound, "the group has no active instance refresh (it has ended)"),
    "IrreversibleInstanceRefresh": Rule(
        StateError,
        "AWS cannot roll this refresh back (the group's previous version is $Latest/$Default or takes its image "
        "from SSM, or the refresh has no desired configuration): roll forward to the previous version instead",
    ),
    "LimitExceeded": Rule(InfraError, "an Auto Scaling quota is reached; raise it or remove unused resources"),
    # --- quotas -----------------------------------------------------------------------------------------------------
    "ResourceLimitExceeded": Rule(InfraError, "raise the EC2 quota, or delete unused resources"),
    "InstanceLimitExceeded": Rule(InfraError, "raise the EC2 instance quota, or use another instance type"),
    "InsufficientInstanceCapacity": Rule(InfraError, "use another instance type or availability zone", True),
    # --- throttling and transient server errors ---------------------------------------------------------------------
    "RequestLimitExceeded": Rule(InfraError, _THROTTLED, True),
    "ThrottlingException": Rule(InfraError, _THROTTLED, True),
    "TooManyRequestsException": Rule(InfraError, _THROTTLED, True),
    "ServiceUnavailable": Rule(InfraError, _RETRY_LATER, True),
    "Unavailable": Rule(InfraError, _RETRY_LATER, True),
    "InternalError": Rule(InfraError, _RETRY_LATER, True),
    "InternalFailure": Rule(InfraError, _RETRY_LATER, True),
    "InternalServerError": Rule(InfraError, _RETRY_LATER, True),
    "KMSInternalException": Rule(InfraError, _RETRY_LATER, True),
    "DependencyTimeoutException": Rule(InfraError, _RETRY_LATER, True),
    "KeyUnavailableException": Rule(InfraError, _RETRY_LATER, True),
    "InternalServerException": Rule(InfraError, _RETRY_LATER, True),
    "RequestThrottledException": Rule(InfraError, _THROTTLED, True),
    "ConcurrentLimitExceededException": Rule(
        InfraError, "fewer parallel snapshot reads (scan one image at a time)", True
    ),
    "ServiceQuotaExceededException": Rule(InfraError, "raise the EBS direct API quota, or retry later", True),
    # --- wildcard families, tried in this order ---------------------------------------------------------------------
    "*.NotFound": Rule(NotFound, "check the id and the region it is looked up in"),
    "*.Malformed": Rule(ConfigError, "check the id's format"),
    "AccessDenied*": Rule(ConfigError, _PERMISSION),
    "Throttling*": Rule(InfraError, _THROTTLED, True),
}

_EXACT = {code: rule for code, rule in AWS_ERRORS.items() if "*" not in code}
_PATTERNS = [(pattern, rule) for pattern, rule in AWS_ERRORS.items() if "*" in pattern]


def rule_for(code: str) -> Rule | None:
    """The table's rule for an AWS error code, or None if the table does not know it."""
    exact = _EXACT.get(code)
    if exact is not None:
        return exact
    for pattern, rule in _PATTERNS:
        # fnmatchcase: AWS codes are case-sensitive, and fnmatch would fold case on some platforms.
        if fnmatch.fnmatchcase(code, pattern):
            return rule
    return None


def aws_code(error: BaseException) -> str | None:
    """The AWS error code behind `error`: its own if it is a ClientError, else that of the ClientError it was
    translated from (`clients.call` raises `translate(e) from e`); None when AWS answered no code."""
    cause: BaseException | None = error
    while cause is not None and not isinstance(cause, ClientError):
        cause = cause.__cause__
    if cause is None:
        return None
    return str(cause.response.get("Error", {}).get("Code") or "") or None


def is_permission_error(code: str) -> bool:
    """Whether AWS answered `code` because the caller lacks an IAM permission (the table's permission rows)."""
    rule = rule_for(code)
    return rule is not None and rule.fix == _PERMISSION


def error_for_code(code: str, action: str, resource: str, detail: str = "") -> AmiforgeError:
    """The amiforge error for an AWS error code met while doing `action` (`service:Operation`) on `resource`.

    Also for codes that arrive without an exception (e.g. a KMS key state that means "this key cannot sign")."""
    message = f"{action} on {resource} failed: {code}" + (f" ({detail})" if detail else "")
    rule = rule_for(code)
    if rule is None:
        # Unexpected, so not swallowed: reported with its code, and not promised to get better with a retry.
        return InfraError(message, retryable=False, fix=f"AWS answered {code}, which amiforge does not know; report it")
    fix = rule.fix.format(action=action) if rule.fix else None
    if rule.family is InfraError:
        return InfraError(message, retryable=rule.retryable, fix=fix)
    if rule.family is ConfigError:
        return ConfigError(message, fix=fix)
    return rule.family(message, fix=fix)


# Transport and credential failures worth translating. Anything else from botocore (ParamValidationError, …) is a
# bug in amiforge: `clients.call()` lets it propagate untouched.
CAUGHT: tuple[type[Exception], ...] = (
    ClientError,
    NoCredentialsError,
    PartialCredentialsError,
    NoRegionError,
    ProfileNotFound,
    EndpointConnectionError,
    ConnectTimeoutError,
    ReadTimeoutError,
    ConnectionClosedError,
)

_TRANSPORT = (EndpointConnectionError, ConnectTimeoutError, ReadTimeoutError, ConnectionClosedError)
_SETUP = (NoCredentialsError, PartialCredentialsError, NoRegionError, ProfileNotFound)


def translate(error: ClientError | BotoCoreError, action: str, resource: str) -> AmiforgeError:
    """The amiforge error for a botocore error. Call sites `raise translate(e, …) from e` so the cause stays chained.

    `action` is the IAM action (`ec2:DescribeImages`) so a permission error can say which one to grant."""
    if isinstance(error, ClientError):
        err = error.response.get("Error", {})
        return error_for_code(str(err.get("Code") or "Unknown"), action, resource, str(err.get("Message") or ""))
    if isinstance(error, _SETUP):
        return ConfigError(f"{action} on {resource}: {error}", fix=_CREDENTIALS)
    if isinstance(error, _TRANSPORT):
        return InfraError(
            f"{action} on {resource}: cannot reach AWS ({error})",
            retryable=True,
            fix="check this machine's network path to AWS (proxy, firewall, DNS) and that the region is enabled "
            "for the account (`amiforge doctor --aws` shows both)",
        )
    return InfraError(
        f"{action} on {resource} failed: {type(error).__name__} ({error})",
        retryable=False,
        fix="rerun with --debug for the details; if it persists, report it",
    )
