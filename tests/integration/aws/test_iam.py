"""Declared IAM permissions: the policy document's shape, and the declaration kept in sync with the code.

The sync check compares three things. The source, read without running it (aws_call_sites.py): every AWS call site,
`path:line` with its action. Each declared operation, run by its runner under moto (iam_runners.py): the actions it
really calls, attributed to the call site that made them, each evaluated against the operation's generated policy as
IAM would on AWS (moto enforces no IAM). And `iam.PERMISSIONS`. It fails when an operation has no runner, calls an
action it does not declare, declares one it neither calls nor needs authorised (`iam.AUTHORISED_ONLY`), or makes a
call its policy would refuse (a resource without the tag a condition wants, a tag-on-create the policy does not
allow); when a call site of the source is reached by no runner (file:line); and when a runner makes a call at a site
the source reading missed (a new way of calling AWS). Each failure names the operation, the action and the site.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from pathlib import Path
from typing import Any, cast

import botocore.session
import pytest
from aws_call_sites import CallSite, CallSites, find_call_sites
from botocore.awsrequest import AWSResponse
from conftest import ACCOUNT, REGION, Aws
from distribute_fixtures import DeregistrationProtection
from iam_evaluation import Request, refusal
from iam_runners import (
    RUNNERS,
    SRC,
    CallRecorder,
    ObservedCall,
    context,
    distribution,
    harness,
    image,
    images,
    observe,
)

from amiforge.errors import AmiforgeError, ConfigError, NotFound
from amiforge.providers.aws.distribute import protect
from amiforge.providers.aws.iam import (
    AUTHORISED_ONLY,
    DESTRUCTIVE,
    MANAGED_POLICY_MAX_CHARS,
    OPERATIONS,
    PERMISSIONS,
    ROLLOUT_GROUP_WRITES,
    TAG_ON_CREATE,
    Operation,
    actions_for,
    policy_document,
    policy_json,
    policy_size,
    policy_warnings,
)
from amiforge.providers.aws.images import inventory, resolve_source
from amiforge.providers.aws.instances import throwaway_key
from amiforge.providers.interface import Cleanups
from amiforge.recipe import SsmSource

# IAM actions that are not API operations of their own (ReEncrypt needs both; PassRole guards RunInstances).
_IAM_ONLY = {"kms:ReEncryptFrom", "kms:ReEncryptTo", "iam:PassRole"}
# IAM service prefixes that are not botocore's service name (Elastic Load Balancing's two APIs share one prefix).
_BOTOCORE = {"servicequotas": ("service-quotas",), "elasticloadbalancing": ("elb", "elbv2")}


def test_every_declared_action_is_a_real_operation() -> None:
    assert set(PERMISSIONS) == set(OPERATIONS)
    loader = botocore.session.get_session()
    operations: dict[str, set[str]] = {}
    for op, actions in PERMISSIONS.items():
        assert actions, op
        for action in actions - _IAM_ONLY:
            service, name = action.split(":", 1)
            if service not in operations:
                models = [loader.get_service_model(name) for name in _BOTOCORE.get(service, (service,))]
                operations[service] = {name for model in models for name in model.operation_names}
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
    assert set(managed["Action"]) == DESTRUCTIVE | {"ec2:CreateTags"}  # tags after creation: distribute's copies
    assert managed["Condition"] == {"StringEquals": {"aws:ResourceTag/amiforge:managed": "true"}}
    assert managed["Resource"] == "*"
    assert by_sid["Ec2Any"]["Resource"] == "*" and "Condition" not in by_sid["Ec2Any"]
    assert not DESTRUCTIVE & set(by_sid["Ec2Any"]["Action"])
    assert by_sid["SsmScoped"] == {
        "Sid": "SsmScoped",
        "Effect": "Allow",
        "Action": ["ssm:AddTagsToResource", "ssm:PutParameter"],
        "Resource": ["arn:*:ssm:*:*:parameter/amiforge/*"],
    }
    assert by_sid["KmsScoped"]["Resource"] == ["arn:aws:kms:eu-west-1:1:key/k"]
    assert by_sid["IamPassToEc2"]["Condition"] == {"StringEquals": {"iam:PassedToService": "ec2.amazonaws.com"}}
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
    assert writes["Resource"] == ["arn:*:ssm:*:*:parameter/golden/*"]


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
    # Every KMS action is granted once: the narrower statement drops what "*" already allows.
    granted = [a for s in cast(list[dict[str, list[str]]], both["Statement"]) for a in s["Action"]]
    kms = [a for a in granted if a.startswith("kms:")]
    assert sorted(kms) == sorted(set(kms)) and set(granted) == actions_for(["sign-kms", "distribute"])


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
        "Condition": {
            "Bool": {"kms:GrantIsForAWSResource": True},
            "StringLike": {"kms:ViaService": "ec2.*.amazonaws.com"},
        },
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


# --- what the policy allows: nothing escapes its own scoping ----------------------------------------------------------

ROLE = "arn:aws:iam::111111111111:role/amiforge-builder"


def _statements(doc: dict[str, Any]) -> list[dict[str, Any]]:
    return cast(list[dict[str, Any]], doc["Statement"])


def test_create_tags_is_never_granted_unconditioned() -> None:
    """With CreateTags on anything, amiforge could tag anything amiforge:managed=true and then destroy it. Tags come
    only at creation (ec2:CreateAction), on what is amiforge's already, on instances without amiforge:managed (a
    rollout's), or — adopting — amiforge:managed alone on images and snapshots."""
    tagging = _statements_granting(policy_document(OPERATIONS), "ec2:CreateTags")
    by_sid = {cast(str, s["Sid"]): s for s in tagging}
    assert set(by_sid) == {"Ec2TagOnCreate", "Ec2Managed", "Ec2TagOthers", "Ec2Adopt"}
    assert all("Condition" in s for s in tagging)
    assert by_sid["Ec2TagOnCreate"]["Condition"] == {"StringEquals": {"ec2:CreateAction": list(TAG_ON_CREATE)}}
    assert set(TAG_ON_CREATE) == {"RunInstances", "CreateImage", "CopyImage", "ImportKeyPair"}
    assert by_sid["Ec2TagOthers"]["Resource"] == ["arn:*:ec2:*:*:instance/*"]
    assert by_sid["Ec2TagOthers"]["Condition"] == {
        "ForAllValues:StringNotEquals": {"aws:TagKeys": ["amiforge:managed"]},
        "ForAllValues:StringLike": {"aws:TagKeys": ["amiforge:*"]},
    }
    # A rollout writes amiforge's own keys on the group's instances, never amiforge:managed nor anyone else's keys.
    rollout = policy_document(["rollout"])
    instance = f"arn:aws:ec2:{REGION}:{ACCOUNT}:instance/i-0000000000test01"

    def tagging_instance(*keys: str) -> str | None:
        context = {"aws:TagKeys": list(keys), **{f"aws:RequestTag/{k}": "x" for k in keys}}
        return refusal(rollout, Request("ec2:CreateTags", instance, context))

    assert tagging_instance("amiforge:ready", "amiforge:version") is None
    assert tagging_instance("amiforge:ready", "amiforge:managed") is not None
    assert tagging_instance("amiforge:ready", "Name") is not None
    assert tagging_instance("team") is not None
    assert by_sid["Ec2Adopt"]["Resource"] == ["arn:*:ec2:*::image/*", "arn:*:ec2:*::snapshot/*"]
    # A bake tags only what it creates.
    (bake,) = _statements_granting(policy_document(["bake"]), "ec2:CreateTags")
    assert bake["Sid"] == "Ec2TagOnCreate"


def test_run_command_only_with_the_shell_document_on_managed_instances() -> None:
    """SendCommand is authorised for the document and for each instance: never the account's instances at large."""
    statements = _statements_granting(policy_document(["bake"]), "ssm:SendCommand")
    assert [(s["Sid"], s["Resource"], s.get("Condition")) for s in statements] == [
        ("SsmManagedInstances", ["arn:*:ec2:*:*:instance/*"],
         {"StringEquals": {"ssm:resourceTag/amiforge:managed": "true"}}),
        ("SsmRunShellScript", ["arn:*:ssm:*::document/AWS-RunShellScript"], None),
    ]  # fmt: skip


def test_pass_role_names_the_roles_given_and_warns_without_them() -> None:
    (passing,) = _statements_granting(policy_document(["bake"], pass_roles=[ROLE]), "iam:PassRole")
    assert passing["Resource"] == [ROLE]
    assert passing["Condition"] == {"StringEquals": {"iam:PassedToService": "ec2.amazonaws.com"}}
    (open_,) = _statements_granting(policy_document(["bake"]), "iam:PassRole")
    assert open_["Resource"] == "*"
    (warning,) = policy_warnings(["bake"])
    assert "any role" in warning[0] and "--pass-role" in warning[1]
    assert policy_warnings(["bake"], pass_roles=[ROLE]) == []
    with pytest.raises(ConfigError, match="not an IAM role ARN"):
        policy_document(["bake"], pass_roles=["amiforge-builder"])


def test_signing_keys_warn_when_not_given() -> None:
    (warning,) = policy_warnings(["sign-kms"])
    assert "any KMS key" in warning[0] and "--kms-key" in warning[1]
    assert policy_warnings(["sign-kms"], kms_keys=[SIGNING_KEY]) == []
    assert policy_warnings(["inventory"]) == []
    assert len(policy_warnings(OPERATIONS)) == 2


def test_ebs_key_use_only_through_the_service_that_uses_it() -> None:
    """EC2 uses the key for bake, boot-test and distribute's copies; the EBS direct APIs decrypt scan's blocks;
    distribute's own DescribeKey (its preflight) stays on any key."""
    doc = policy_document(["bake", "scan", "distribute"])
    by_sid = {cast(str, s["Sid"]): s for s in _statements(doc) if cast(str, s["Sid"]).startswith("Kms")}
    assert by_sid["KmsViaEc2"]["Condition"] == {"StringLike": {"kms:ViaService": "ec2.*.amazonaws.com"}}
    assert set(by_sid["KmsViaEc2"]["Action"]) == {
        "kms:Decrypt", "kms:GenerateDataKeyWithoutPlaintext", "kms:ReEncryptFrom", "kms:ReEncryptTo"
    }  # fmt: skip
    assert by_sid["KmsViaEbs"] == {
        "Sid": "KmsViaEbs",
        "Effect": "Allow",
        "Action": ["kms:Decrypt"],
        "Resource": "*",
        "Condition": {"StringLike": {"kms:ViaService": ["ebs.*.amazonaws.com", "ec2.*.amazonaws.com"]}},
    }
    # Which service name KMS sees for the EBS direct APIs is not documented where we looked (iam._KEY_USERS): scan's
    # Decrypt is allowed through either, never directly.
    scan = policy_document(["scan"])
    key = f"arn:aws:kms:{REGION}:{ACCOUNT}:key/0000test-0000-0000-0000-000000000001"
    for service in ("ebs", "ec2"):
        through = Request("kms:Decrypt", key, {"kms:ViaService": f"{service}.{REGION}.amazonaws.com"})
        assert refusal(scan, through) is None, service
    assert refusal(scan, Request("kms:Decrypt", key, {})) is not None
    assert "kms:DescribeKey" in by_sid["KmsAny"]["Action"] and "Condition" not in by_sid["KmsAny"]
    unconditioned = {a for s in _statements(doc) if "Condition" not in s and s["Resource"] == "*" for a in s["Action"]}
    assert not unconditioned & {"kms:Decrypt", "kms:CreateGrant", "kms:GenerateDataKeyWithoutPlaintext"}


def test_protection_and_deprecation_are_managed_only() -> None:
    """Only images amiforge made or adopted (amiforge:managed=true) are protected, unprotected, deprecated or
    deregistered: an image of someone else's in the account is never retire's."""
    for action in ("ec2:EnableImageDeregistrationProtection", "ec2:DisableImageDeregistrationProtection",
                   "ec2:EnableImageDeprecation", "ec2:DeregisterImage", "ec2:DeleteSnapshot"):  # fmt: skip
        assert action in DESTRUCTIVE
    (protect,) = _statements_granting(policy_document(["distribute"]), "ec2:EnableImageDeregistrationProtection")
    assert protect["Sid"] == "Ec2Managed"
    for action in ("ec2:EnableImageDeprecation", "ec2:DisableImageDeregistrationProtection"):
        (statement,) = _statements_granting(policy_document(["retire"]), action)
        assert statement["Sid"] == "Ec2Managed"


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


def refused(calls: list[ObservedCall]) -> list[str]:
    """Each call IAM would refuse under the operation's policy, with its site and why."""
    return sorted({f"{c.site}: {why}" for c in calls for why in c.refused})


# Call sites no runner reaches on purpose: (path, function, action) → why. A new entry needs as good a reason.
UNREACHED: dict[tuple[str, str, str], str] = {
    ("amiforge/providers/aws/bake.py", "bake_on_ec2", "ec2:CreateTags"): "tag_snapshots_at_creation=False tags the "
    "new image's snapshots after CreateImage: a knob for moto without create_image_emulation (AwsProvider's "
    "constructor; no recipe or setting reaches it). On AWS the snapshots are tagged by CreateImage, and tagging them "
    "afterwards would be refused: they are not amiforge:managed yet",
}


def _pairs(calls: list[ObservedCall]) -> set[tuple[str, str]]:
    return {(c.site, c.action) for c in calls}


def unreached(sites: Iterable[CallSite], reached: set[tuple[str, str]]) -> list[CallSite]:
    """The call sites no call was made from (with their action), but those UNREACHED excuses."""
    return sorted(
        s for s in sites if (s.site, s.action) not in reached and (s.path, s.function, s.action) not in UNREACHED
    )


@pytest.mark.parametrize("operation", OPERATIONS)
def test_what_each_operation_calls_is_declared(operation: Operation, tmp_path: Path, call_sites: CallSites) -> None:
    calls = observed(operation, tmp_path)
    assert calls, f"the {operation} runner made no AWS call: the check would be vacuous"
    problems = undeclared(operation, calls)
    assert not problems, f"{operation} makes calls iam.PERMISSIONS[{operation!r}] does not declare:\n  " + "\n  ".join(
        problems
    )
    called = {c.action for c in calls}
    # The static pass must know every call site the code really called from: else it misses a way of calling AWS.
    unseen = sorted(_pairs(calls) - {(s.site, s.action) for s in call_sites.sites})
    assert not unseen, f"aws_call_sites found no call site for these calls {operation} made:\n  " + "\n  ".join(
        f"{action} at {site}" for site, action in unseen
    )
    # Exactly: nothing declared that is neither called nor checked by IAM on behalf of a call.
    unused = sorted(PERMISSIONS[operation] - called - AUTHORISED_ONLY.get(operation, frozenset()))
    assert not unused, (
        f"{operation} declares {unused} but its runner never calls them: drop them from iam.PERMISSIONS if the code no "
        "longer does, extend the runner if it does not reach them, or list them in AUTHORISED_ONLY if IAM checks them "
        "on behalf of another call"
    )


@pytest.mark.parametrize("operation", OPERATIONS)
def test_iam_would_allow_every_call_of_each_operation(operation: Operation, tmp_path: Path) -> None:
    """moto enforces no IAM: each call, and what IAM authorises on its behalf, is evaluated against the operation's
    generated policy with the resources' tags as they were when it was made."""
    problems = refused(observed(operation, tmp_path))
    assert not problems, f"on AWS, IAM would refuse these calls of {operation} under its policy:\n  " + "\n  ".join(
        problems
    )


def test_every_call_site_is_reached_by_some_operation(tmp_path: Path, call_sites: CallSites) -> None:
    """A call site of the source that no runner calls from is a call no declaration is checked against: a new call
    site (or a runner that stopped reaching one) fails here, naming its file:line — also when another site of the
    same action is reached."""
    reached: set[tuple[str, str]] = set()
    for operation in OPERATIONS:
        reached |= _pairs(observed(operation, tmp_path / operation))
    missing = unreached(call_sites.sites, reached)
    assert not missing, (
        "no operation's runner (iam_runners.RUNNERS) makes the calls of these call sites:\n"
        + "\n".join(f"  {s.site} ({s.function}): {s.action}" for s in sorted(missing))
    )
    for path, function, action in UNREACHED:  # an exemption that no longer matches a call site is stale
        assert any((s.path, s.function, s.action) == (path, function, action) for s in call_sites.sites), (
            f"UNREACHED lists {action} in {path} {function}, which the source no longer calls: drop the entry"
        )


def test_the_sync_check_catches_an_undeclared_call(aws: Aws) -> None:
    """A call is attributed to the amiforge line that made it, and one the operation does not declare is named: here
    an SSM source resolved where only `inventory` (ec2:DescribeImages) is declared."""
    recorder = CallRecorder()
    recorder.install(aws.session.boto_session.events)
    with pytest.raises(NotFound):
        resolve_source(SsmSource(ssm_parameter="/src/none"), aws.session, REGION)
    (problem,) = undeclared("inventory", recorder.calls)
    assert problem.startswith("ssm:GetParameter at amiforge/providers/aws/images.py:")
    assert undeclared("resolve-source", recorder.calls) == []


def test_a_call_site_is_reached_only_by_a_call_from_it(call_sites: CallSites) -> None:
    """Sites are matched as path:line with their action, never by action alone: a new DeregisterImage in publish is
    not reached because gc's runner deregisters an image elsewhere."""
    gc_site = next(s for s in call_sites.sites if s.action == "ec2:DeregisterImage" and s.path.endswith("/gc.py"))
    new = CallSite("amiforge/providers/aws/publish.py", 999, "ec2", "DeregisterImage", "publish")
    assert unreached([gc_site, new], {(gc_site.site, gc_site.action)}) == [new]
    assert gc_site.site.startswith("amiforge/providers/aws/gc.py:")  # the static form is the recorder's


def test_pages_are_attributed_to_where_paginate_was_called(tmp_path: Path, call_sites: CallSites) -> None:
    """inventory() calls paginate on one line and consumes its pages on the next: the requests belong to the first,
    as the static reader says."""
    with harness(tmp_path) as h:
        images(h)
        h.begin()
        inventory(h.aws.session, REGION)
        (call,) = h.recorder.calls
    static = {s.site for s in call_sites.sites if s.function == "inventory" and s.action == "ec2:DescribeImages"}
    assert {call.site} == static


def test_the_recorder_refuses_what_iam_would(tmp_path: Path) -> None:
    """Armed with an operation's policy, a call on a resource without the tag its statement's condition wants is
    refused, with the resource and the reason; the same call on a tagged resource is not."""
    with harness(tmp_path, "distribute") as h:
        DeregistrationProtection().install(h.boto.events)
        untagged, tagged = image(h, "someone-elses", managed=False), image(h, "amiforge-s")
        h.begin()
        protect(h.ec2(), untagged)
        protect(h.ec2(), tagged)
        first, second = h.recorder.calls
    assert second.refused == ()
    (why,) = first.refused
    assert f"ec2:EnableImageDeregistrationProtection on arn:aws:ec2:{REGION}::image/{untagged}" in why
    assert "Ec2Managed" in why
    assert first.site.startswith("amiforge/providers/aws/distribute.py:")


def test_a_throwaway_key_whose_import_failed_is_not_deleted_blindly(tmp_path: Path) -> None:
    """An import that never happened leaves no key pair: the cleanup looks it up by name and tags and deletes nothing
    (DeleteKeyPair of a key pair without amiforge:managed is refused by IAM, and the cleanup would fail)."""

    def refuse_import(model: Any, **_: Any) -> tuple[AWSResponse, dict[str, Any]] | None:
        if model.name != "ImportKeyPair":
            return None
        error = {"Error": {"Code": "InvalidKeyPair.Format", "Message": "refused"}, "ResponseMetadata": {}}
        return AWSResponse("https://ec2.invalid/", 400, {}, None), error

    with harness(tmp_path, "bake") as h:
        h.boto.events.register("before-call.ec2.ImportKeyPair", refuse_import)
        h.begin()
        with pytest.raises(AmiforgeError), Cleanups() as stack:
            throwaway_key(h.aws.session, REGION, context(stack, "import-fails"), "builder")
        assert stack.leftovers == []
        calls = list(h.recorder.calls)
    assert "ec2:DeleteKeyPair" not in {c.action for c in calls}
    assert refused(calls) == []


def test_an_adopted_image_can_be_distributed(tmp_path: Path) -> None:
    """`amiforge import packer` adopts images amiforge did not make; distribute shares them (ModifyImageAttribute,
    ModifySnapshotAttribute), which IAM allows only on what carries amiforge:managed=true: adopting tags them."""
    with harness(tmp_path, "import") as h:
        spec = distribution(h)
        packer = image(h, "packer-web-7", managed=False)
        h.begin()
        adopted = h.provider().adopt(REGION, packer)
        assert refused(list(h.recorder.calls)) == []
        h.operation = "distribute"
        h.begin()
        h.provider().distribute(
            adopted, spec, run_id="dist-adopted", public=False, on_copy=lambda _c: None, progress=lambda _p: None
        )
        shared = {c.action for c in h.recorder.calls}
        problems = refused(list(h.recorder.calls))
    assert {"ec2:ModifyImageAttribute", "ec2:ModifySnapshotAttribute"} <= shared
    assert problems == []


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
        "autoscaling:DescribeLifecycleHooks",
    ]
    assert not ROLLOUT_GROUP_WRITES & DESTRUCTIVE
    assert "Ec2Managed" not in statements  # a rollout destroys nothing of amiforge's own
    assert "ec2:RunInstances" in statements["Ec2Any"]["Action"]


def test_a_rollout_passes_only_the_roles_its_policy_names(tmp_path: Path) -> None:
    """Pointing a group at a launch template version (UpdateAutoScalingGroup, StartInstanceRefresh) makes Auto
    Scaling check iam:PassRole for the template's instance profile's role against the caller: a rollout policy
    narrowed (--pass-role) to another role is refused there."""
    other = f"arn:aws:iam::{ACCOUNT}:role/some-other-role"
    with harness(tmp_path, "rollout") as h:
        h.policy_args["pass_roles"] = [other]
        RUNNERS["rollout"](h)
        calls = list(h.recorder.calls)
    refusing = {c.action for c in calls if any(r.startswith("iam:PassRole on ") for r in c.refused)}
    assert refusing == {"autoscaling:UpdateAutoScalingGroup", "autoscaling:StartInstanceRefresh"}


@pytest.mark.parametrize("partition", ["aws", "aws-cn", "aws-us-gov"])
def test_scoped_statements_match_in_every_partition(partition: str) -> None:
    """The resource ARNs name no partition: a scoped statement allows the same request in China and GovCloud."""
    doc = policy_document(OPERATIONS)
    managed = {"aws:ResourceTag/amiforge:managed": "true"}
    allowed = [
        Request("ssm:SendCommand", f"arn:{partition}:ssm:r-1::document/AWS-RunShellScript"),
        Request("ssm:SendCommand", f"arn:{partition}:ec2:r-1:{ACCOUNT}:instance/i-0test", {
            "ssm:resourceTag/amiforge:managed": "true"}),
        Request("ssm:PutParameter", f"arn:{partition}:ssm:r-1:{ACCOUNT}:parameter/amiforge/web"),
        Request("ec2:CreateTags", f"arn:{partition}:ec2:r-1:{ACCOUNT}:instance/i-0test", {
            "aws:TagKeys": ["amiforge:ready"], "aws:RequestTag/amiforge:ready": "1"}),
        Request("ec2:CreateTags", f"arn:{partition}:ec2:r-1::image/ami-0000000000test01", {
            "aws:TagKeys": ["amiforge:managed"], "aws:RequestTag/amiforge:managed": "true", **managed}),
    ]  # fmt: skip
    assert [str(r) for r in allowed if refusal(doc, r) is not None] == []


def test_a_policy_over_the_managed_policy_quota_is_warned_about() -> None:
    """IAM refuses a managed policy over 6,144 characters, white space not counted: the policy for all operations
    fits; named with enough roles it does not, and the warning says so with how to split it."""
    doc = policy_document(OPERATIONS)
    assert policy_size(doc) == len(json.dumps(doc, separators=(",", ":"))) < len(json.dumps(doc, indent=2))
    assert policy_size(doc) < MANAGED_POLICY_MAX_CHARS
    assert not [d for d, _ in policy_warnings(OPERATIONS) if "quota" in d]
    roles = [f"arn:aws:iam::{ACCOUNT}:role/amiforge-builder-{i:02d}" for i in range(40)]
    assert policy_size(policy_document(OPERATIONS, pass_roles=roles)) > MANAGED_POLICY_MAX_CHARS
    (over,) = [(d, fix) for d, fix in policy_warnings(OPERATIONS, pass_roles=roles) if "quota" in d]
    assert "6144" in over[0] and "split it by operation" in over[1]
