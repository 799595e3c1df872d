"""Declared IAM permissions: the policy document's shape, and the declaration kept in sync with the code.

The sync check compares three things. The source, read without running it (aws_call_sites.py): every AWS operation
amiforge can call, with its call site. Each declared operation, run by its runner under moto (iam_runners.py): the
actions it really calls, attributed to the line that called. And `iam.PERMISSIONS`. It fails when an operation has
no runner, calls an action it does not declare, or declares one it neither calls nor needs authorised
(`iam.AUTHORISED_ONLY`); when the source can make a call no runner makes (a new call site nothing exercises); and
when a runner makes a call the source reading missed (a new way of calling AWS). Each failure names the operation,
the action and the call site.
"""

from __future__ import annotations

from pathlib import Path
from typing import cast

import botocore.session
import pytest
from aws_call_sites import CallSites, find_call_sites
from conftest import REGION, Aws
from iam_runners import RUNNERS, SRC, CallRecorder, ObservedCall, observe

from amiforge.errors import ConfigError, NotFound
from amiforge.providers.aws.iam import (
    AUTHORISED_ONLY,
    DESTRUCTIVE,
    OPERATIONS,
    PERMISSIONS,
    ROLLOUT_GROUP_WRITES,
    Operation,
    actions_for,
    policy_document,
    policy_json,
)
from amiforge.providers.aws.images import resolve_source
from amiforge.recipe import SsmSource

# IAM actions that are not API operations of their own (ReEncrypt needs both; PassRole guards RunInstances).
_IAM_ONLY = {"kms:ReEncryptFrom", "kms:ReEncryptTo", "iam:PassRole"}
# IAM service prefixes that are not botocore's service name.
_BOTOCORE = {"servicequotas": "service-quotas"}


def test_every_declared_action_is_a_real_operation() -> None:
    assert set(PERMISSIONS) == set(OPERATIONS)
    loader = botocore.session.get_session()
    operations: dict[str, set[str]] = {}
    for op, actions in PERMISSIONS.items():
        assert actions, op
        for action in actions - _IAM_ONLY:
            service, name = action.split(":", 1)
            if service not in operations:
                model = loader.get_service_model(_BOTOCORE.get(service, service))
                operations[service] = set(model.operation_names)
            assert name in operations[service], f"{op}: {action} is not an AWS operation"


def test_policy_document_shape() -> None:
    doc = policy_document(OPERATIONS, parameter_prefix="/amiforge", kms_keys=["arn:aws:kms:eu-west-1:1:key/k"])
    assert doc["Version"] == "2012-10-17"
    statements = doc["Statement"]
    sids = [s["Sid"] for s in statements]
    assert len(sids) == len(set(sids))
    granted: set[str] = set()
    for s in statements:
        assert s["Effect"] == "Allow"
        assert s["Action"] == sorted(set(s["Action"])), "sorted and unique"
        assert len({a.split(":")[0] for a in s["Action"]}) == 1, "one service per statement"
        assert not any("*" in a for a in s["Action"])
        granted |= set(s["Action"])
    assert granted == actions_for(OPERATIONS)
    by_sid = {s["Sid"]: s for s in statements}
    managed = by_sid["Ec2Managed"]
    assert set(managed["Action"]) == DESTRUCTIVE & granted
    assert managed["Condition"] == {"StringEquals": {"aws:ResourceTag/amiforge:managed": "true"}}
    assert managed["Resource"] == "*"
    assert by_sid["Ec2Any"]["Resource"] == "*" and "Condition" not in by_sid["Ec2Any"]
    assert not DESTRUCTIVE & set(by_sid["Ec2Any"]["Action"])
    assert by_sid["SsmScoped"] == {
        "Sid": "SsmScoped",
        "Effect": "Allow",
        "Action": ["ssm:AddTagsToResource", "ssm:PutParameter"],
        "Resource": ["arn:aws:ssm:*:*:parameter/amiforge/*"],
    }
    assert by_sid["KmsScoped"]["Resource"] == ["arn:aws:kms:eu-west-1:1:key/k"]
    assert by_sid["IamConditional"]["Condition"] == {"StringEquals": {"iam:PassedToService": "ec2.amazonaws.com"}}
    # Deterministic, so a generated policy diffs cleanly.
    assert policy_json(list(reversed(OPERATIONS)), kms_keys=["arn:aws:kms:eu-west-1:1:key/k"]) == policy_json(
        OPERATIONS, kms_keys=["arn:aws:kms:eu-west-1:1:key/k"]
    )


def test_least_privilege_for_a_narrow_set() -> None:
    doc = policy_document(["inventory"])
    assert doc["Statement"] == [{"Sid": "Ec2Any", "Effect": "Allow", "Action": ["ec2:DescribeImages"], "Resource": "*"}]
    signing = policy_document(["sign-kms"])["Statement"]
    # The artifacts' digests (ec2:DescribeImages), then the key.
    assert [s["Action"] for s in signing] == [
        ["ec2:DescribeImages"],
        ["kms:DescribeKey", "kms:GetPublicKey", "kms:Sign"],
    ]
    assert signing[1]["Resource"] == "*"  # no keys given: the key is only known at run time
    publishing = policy_document(["publish"], parameter_prefix="/golden/")["Statement"]
    (writes,) = [s for s in publishing if "ssm:PutParameter" in s["Action"]]
    assert writes["Resource"] == ["arn:aws:ssm:*:*:parameter/golden/*"]


def test_unknown_operation_is_a_config_error() -> None:
    with pytest.raises(ConfigError) as error:
        policy_document(["inventory", "launch-missiles"])
    assert "launch-missiles" in error.value.message and error.value.fix is not None and "publish" in error.value.fix


SIGNING_KEY = "arn:aws:kms:eu-west-1:111111111111:key/00000000-0000-0000-0000-00000000test"


def _statements_granting(doc: dict[str, object], action: str) -> list[dict[str, object]]:
    return [s for s in cast(list[dict[str, object]], doc["Statement"]) if action in cast(list[str], s["Action"])]


def test_signing_keys_scope_only_the_signing_operations() -> None:
    """Signing keys narrow sign-kms's KMS actions to them; distribute's DescribeKey (its preflight reads each region's
    EBS key, which is not a signing key) stays allowed on any key."""
    signing_only = policy_document(["sign-kms"], kms_keys=[SIGNING_KEY])
    (describe,) = _statements_granting(signing_only, "kms:DescribeKey")
    assert describe["Resource"] == [SIGNING_KEY] and "Condition" not in describe

    both = policy_document(["sign-kms", "distribute"], kms_keys=[SIGNING_KEY])
    (describe,) = _statements_granting(both, "kms:DescribeKey")
    assert describe["Resource"] == "*" and "Condition" not in describe
    (sign,) = _statements_granting(both, "kms:Sign")
    assert sign["Resource"] == [SIGNING_KEY]
    assert _statements_granting(both, "kms:GetPublicKey") == [sign]
    # Every action is granted exactly once: the narrower statement drops what "*" already allows.
    granted = [a for s in cast(list[dict[str, list[str]]], both["Statement"]) for a in s["Action"]]
    assert sorted(granted) == sorted(set(granted)) and set(granted) == actions_for(["sign-kms", "distribute"])


@pytest.mark.parametrize("operation", ["distribute", "bake", "boot-test"])
def test_kms_grants_are_only_for_aws_resources(operation: str) -> None:
    """EC2 creates a grant on the EBS key for the volumes it encrypts; amiforge may not grant the key to anyone."""
    doc = policy_document([operation], kms_keys=[SIGNING_KEY])
    (grant,) = _statements_granting(doc, "kms:CreateGrant")
    assert grant == {
        "Sid": "KmsAwsResourceGrants",
        "Effect": "Allow",
        "Action": ["kms:CreateGrant"],
        "Resource": "*",
        "Condition": {"Bool": {"kms:GrantIsForAWSResource": True}},
    }


@pytest.mark.parametrize("operation", ["bake", "boot-test"])
def test_launching_on_a_customer_managed_ebs_key_is_authorised(operation: Operation) -> None:
    """RunInstances creating volumes under the account's default EBS key (a customer managed one) is authorised
    against the caller's KMS permissions: those AWS lists for EBS encryption are declared (authorised only)."""
    ebs_key_use = {
        "kms:CreateGrant",
        "kms:Decrypt",
        "kms:DescribeKey",
        "kms:GenerateDataKeyWithoutPlaintext",
        "kms:ReEncryptFrom",
        "kms:ReEncryptTo",
    }
    assert ebs_key_use <= AUTHORISED_ONLY[operation] <= PERMISSIONS[operation]
    granted = {a for s in policy_document([operation])["Statement"] for a in s["Action"]}
    assert ebs_key_use <= granted


def test_retire_is_not_declared_until_it_is_implemented() -> None:
    assert "retire" not in OPERATIONS and "retire" not in PERMISSIONS
    with pytest.raises(ConfigError):
        policy_document(["retire"])


# --- the declaration kept in sync with the code --------------------------------------------------------------------
#
# Three sources that must agree: what the source can call (aws_call_sites.find_call_sites, read from the code), what
# each operation calls when it runs (iam_runners.observe, under moto) and what iam.PERMISSIONS declares.


@pytest.fixture(scope="module")
def call_sites() -> CallSites:
    return find_call_sites(SRC)


_observed: dict[str, list[ObservedCall]] = {}


def observed(operation: str, work: Path) -> list[ObservedCall]:
    """What the operation's runner calls, run once per test session (the per-operation checks and the check of the
    union share the runs)."""
    if operation not in _observed:
        _observed[operation] = observe(operation, work)
    return _observed[operation]


def test_every_declared_operation_has_a_runner() -> None:
    assert set(RUNNERS) == set(OPERATIONS), (
        f"operations without a runner: {sorted(set(OPERATIONS) - set(RUNNERS))}; "
        f"runners of undeclared operations: {sorted(set(RUNNERS) - set(OPERATIONS))} (iam_runners.RUNNERS)"
    )
    assert set(AUTHORISED_ONLY) <= set(OPERATIONS)
    for operation, actions in AUTHORISED_ONLY.items():
        assert actions <= PERMISSIONS[operation], f"{operation}: authorised-only actions must be declared too"


def test_the_source_is_read_whole(call_sites: CallSites) -> None:
    """Every AWS call site of the source is understood: its operation and service are known."""
    assert not call_sites.problems, "\n".join(call_sites.problems)
    assert len(call_sites.by_action()) > 30  # the pass found the code (a broken pass finds nothing)


def undeclared(operation: str, calls: list[ObservedCall]) -> list[str]:
    """`action at site, site` for each call of `operation` that iam.PERMISSIONS does not declare for it."""
    missing = sorted({c.action for c in calls} - PERMISSIONS[cast(Operation, operation)])
    return [f"{a} at {', '.join(sorted({c.site for c in calls if c.action == a}))}" for a in missing]


@pytest.mark.parametrize("operation", OPERATIONS)
def test_what_each_operation_calls_is_declared(operation: Operation, tmp_path: Path, call_sites: CallSites) -> None:
    calls = observed(operation, tmp_path)
    assert calls, f"the {operation} runner made no AWS call: the check would be vacuous"
    problems = undeclared(operation, calls)
    assert not problems, f"{operation} makes calls iam.PERMISSIONS[{operation!r}] does not declare:\n  " + "\n  ".join(
        problems
    )
    called = {c.action for c in calls}
    # The static pass must know every call the code really made: else it misses a way of calling AWS.
    unseen = sorted(called - set(call_sites.by_action()))
    assert not unseen, f"aws_call_sites found no call site for {unseen}, which {operation} called: " + ", ".join(
        sorted({c.site for c in calls if c.action in unseen})
    )
    # Exactly: nothing declared that is neither called nor checked by IAM on behalf of a call.
    unused = sorted(PERMISSIONS[operation] - called - AUTHORISED_ONLY.get(operation, frozenset()))
    assert not unused, (
        f"{operation} declares {unused} but its runner never calls them: drop them from iam.PERMISSIONS if the code no "
        "longer does, extend the runner if it does not reach them, or list them in AUTHORISED_ONLY if IAM checks them "
        "on behalf of another call"
    )


def test_every_call_site_is_reached_by_some_operation(tmp_path: Path, call_sites: CallSites) -> None:
    """A call the source can make that no runner makes is a call no declaration is checked against: a new call site
    (or a runner that stopped reaching one) fails here, naming the call site."""
    reached: set[str] = set()
    for operation in OPERATIONS:
        reached |= {c.action for c in observed(operation, tmp_path / operation)}
    missing = {a: sites for a, sites in call_sites.by_action().items() if a not in reached}
    assert not missing, "no operation's runner (iam_runners.RUNNERS) makes these calls of the source:\n" + "\n".join(
        f"  {action} at {', '.join(str(s) for s in sites)}" for action, sites in sorted(missing.items())
    )


def test_the_sync_check_catches_an_undeclared_call(aws: Aws) -> None:
    """A call is attributed to the amiforge line that made it, and one the operation does not declare is named: here
    an SSM source resolved where only `inventory` (ec2:DescribeImages) is declared."""
    recorder = CallRecorder()
    recorder.install(aws.session.boto_session.events)
    with pytest.raises(NotFound):
        resolve_source(SsmSource(ssm_parameter="/src/none"), aws.session, REGION)
    (problem,) = undeclared("inventory", recorder.calls)
    assert problem.startswith("ssm:GetParameter at src/amiforge/providers/aws/images.py:")
    assert undeclared("resolve-source", recorder.calls) == []


def test_rollout_group_writes_need_the_groups_opt_in_tag() -> None:
    """Auto Scaling authorises against the group's tags, not the instance's: the group writes get their own statement
    on the owner's opt-in tag, never the Managed one (which would require amiforge:managed=true on the group)."""
    statements = {s["Sid"]: s for s in policy_document(["rollout"])["Statement"]}
    opted_in = statements["AutoscalingOptedIn"]
    assert set(opted_in["Action"]) == ROLLOUT_GROUP_WRITES
    assert opted_in["Condition"] == {"StringEquals": {"aws:ResourceTag/amiforge:rollout": "enabled"}}
    assert statements["AutoscalingAny"]["Action"] == [
        "autoscaling:DescribeAutoScalingGroups",
        "autoscaling:DescribeInstanceRefreshes",
    ]
    assert not ROLLOUT_GROUP_WRITES & DESTRUCTIVE
    assert "Ec2Managed" not in statements  # a rollout destroys nothing of amiforge's own
    assert "ec2:RunInstances" in statements["Ec2Any"]["Action"]
