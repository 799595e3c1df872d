"""Declared IAM permissions: which AWS actions each amiforge operation needs, and the least-privilege policy for a set.

This module owns one declaration per operation, `PERMISSIONS`, a closed mapping in one place (cloud-custodian's habit
of declared permissions, without its registries). The sync test (tests/integration/aws/test_iam.py) reads the source
for every AWS call it can make, runs every operation under moto and fails when an operation calls an action it does
not declare, when a call site is reached by no operation, or when an operation declares an action it neither calls nor
needs authorised, so the declaration cannot drift from the code. `AUTHORISED_ONLY` names the actions of the second
kind: IAM checks them when a call amiforge makes acts on its behalf (RunInstances passing a role, EC2 using a KMS key
for an encrypted volume), but amiforge never calls them.

Only operations amiforge implements are declared: an operation gets its entry with its code (`retire`, issue 15, has
none yet), so the policy `amiforge doctor --aws` prints grants nothing that nothing uses.

`policy_document()` turns operations into an IAM policy: per service one statement with `Resource: "*"` for actions
that cannot be scoped (Describe*, Create* of new resources), plus separate statements where a resource or condition
narrows the action: SSM parameter writes to the parameter prefix amiforge publishes under, destructive EC2 actions only
on resources tagged `amiforge:managed=true` (docs/architecture.md §8), the Auto Scaling writes of a rollout only on
groups tagged `amiforge:rollout=enabled`, KMS grants only for AWS resources (`kms:GrantIsForAWSResource`), and — when
signing keys are given — the signing operations' KMS actions only on those keys. A scope belongs to an (operation,
action) pair, not to the action alone: distribute's DescribeKey checks the regions' EBS keys, which are not the
signing keys, so it stays on "*" when sign-kms's DescribeKey is narrowed to the signing keys.

Why the rollout's TerminateInstanceInAutoScalingGroup is not in DESTRUCTIVE: Auto Scaling actions are authorised
against the *group* (resource type autoScalingGroup, condition keys aws:ResourceTag/… and autoscaling:ResourceTag/…
read the group's tags), never against the instance being terminated. The Managed statement would therefore demand
`amiforge:managed=true` on the group — a claim that amiforge created it, which it did not (the group is its owner's),
and which, propagated at launch, would mark every instance the group launches as amiforge's own. So the group writes
(UpdateAutoScalingGroup, TerminateInstanceInAutoScalingGroup) get a statement of their own, conditioned on the
owner's opt-in tag `amiforge:rollout=enabled` on the group, which fleet.py also checks before it writes anything.
The instance-refresh writes of refresh.py (StartInstanceRefresh, RollbackInstanceRefresh) are group writes too and
share that statement; DescribeInstanceRefreshes is a read.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any, Final, Literal, cast, get_args

from amiforge.errors import ConfigError
from amiforge.providers.aws.asg_records import ROLLOUT_ENABLED, ROLLOUT_TAG
from amiforge.providers.aws.images import MANAGED_TAG

__all__ = [
    "AUTHORISED_ONLY",
    "DESTRUCTIVE",
    "OPERATIONS",
    "PERMISSIONS",
    "ROLLOUT_GROUP_WRITES",
    "Operation",
    "actions_for",
    "policy_document",
    "policy_json",
]

Operation = Literal[
    "resolve-source",
    "inventory",
    "bake",
    "boot-test",
    "scan",
    "import",
    "sign-kms",
    "verify-kms",
    "distribute",
    "publish",
    "rollout",
    "gc",
    "doctor",
]
OPERATIONS: Final[tuple[str, ...]] = get_args(Operation)

_READ_IMAGES = frozenset({"ec2:DescribeImages"})
_PUBLISH = frozenset(
    {
        "ec2:DescribeImages",  # the image must exist and be available; SSM also checks it for DataType aws:ec2:image
        "ec2:DescribeLaunchTemplates",
        "ec2:DescribeLaunchTemplateVersions",
        "ec2:CreateLaunchTemplateVersion",
        "ec2:ModifyLaunchTemplate",
        "ssm:GetParameter",
        "ssm:GetParameterHistory",
        "ssm:PutParameter",
        "ssm:AddTagsToResource",
        "ssm:ListTagsForResource",  # a parameter a killed run created (SSM validated it later) gets its tags
    }
)
_INSTANCE = frozenset(
    {
        "ec2:RunInstances",
        "ec2:DescribeInstances",
        "ec2:TerminateInstances",
        "ec2:CreateTags",
        "iam:PassRole",  # the instance profile that lets SSM reach the instance
        "ssm:SendCommand",
        "ssm:GetCommandInvocation",
    }
)
# What IAM checks when EC2 uses a customer managed KMS key on amiforge's behalf: RunInstances creating volumes
# encrypted by default (or from an encrypted image), CopyImage encrypting a copy. AWS documents these as the
# permissions users need for EBS encryption ("Requirements for Amazon EBS encryption", Permissions for users:
# https://docs.aws.amazon.com/ebs/latest/userguide/ebs-encryption-requirements.html); kms:ReEncrypt there is
# ReEncryptFrom and ReEncryptTo. CreateGrant is limited to grants for AWS resources (see _scope).
_EBS_KEY_USE = frozenset(
    {
        "kms:CreateGrant",
        "kms:Decrypt",
        "kms:DescribeKey",
        "kms:GenerateDataKeyWithoutPlaintext",
        "kms:ReEncryptFrom",
        "kms:ReEncryptTo",
    }
)

# THE declaration: one entry per operation, every IAM action it may call or needs authorised. Keep each set exact: the
# sync test (test_iam.py) checks both ways, with the runner of each operation (iam_runners.py).
PERMISSIONS: Final[Mapping[Operation, frozenset[str]]] = {
    # With the recipe's instance type: only images of an architecture it runs (ec2:DescribeInstanceTypes).
    "resolve-source": _READ_IMAGES | {"ssm:GetParameter", "ec2:DescribeInstanceTypes"},
    "inventory": _READ_IMAGES,
    "bake": _INSTANCE
    | _READ_IMAGES
    | _EBS_KEY_USE
    | {"ec2:CreateImage", "ec2:DeregisterImage", "ec2:DeleteSnapshot", "ec2:StopInstances", "ssm:GetParameter"}
    # bake.py: the builder type's architecture; imds_support on the image; communicator ssh (throw-away key pair,
    # host keys read on the console).
    | {"ec2:DescribeInstanceTypes", "ec2:ModifyImageAttribute", "ec2:ImportKeyPair", "ec2:DeleteKeyPair"}
    | {"ec2:GetConsoleOutput"},
    # The readiness line on the serial console; the image's architecture against the test instance type's;
    # communicator ssh (throw-away key pair).
    "boot-test": _INSTANCE
    | _EBS_KEY_USE
    | {"ec2:GetConsoleOutput", "ec2:DescribeImages", "ec2:DescribeInstanceTypes"}
    | {"ec2:ImportKeyPair", "ec2:DeleteKeyPair"},
    # signing/kms.py KmsSigner; and sign and verify read each AWS artifact's digest now (lifecycle/sign.py
    # check_artifact_bytes → provider.current_digest: ec2:DescribeImages).
    "sign-kms": _READ_IMAGES | {"kms:DescribeKey", "kms:Sign", "kms:GetPublicKey"},
    "verify-kms": _READ_IMAGES | {"kms:GetPublicKey"},  # signing/kms.py KmsVerifier; the check itself is offline
    "distribute": _READ_IMAGES
    | {
        "ec2:CopyImage",
        "ec2:CreateTags",
        "ec2:DescribeSnapshots",
        "ec2:EnableImageDeregistrationProtection",
        "ec2:ModifyImageAttribute",
        "ec2:ModifySnapshotAttribute",
    }
    | _EBS_KEY_USE,  # DescribeKey: the preflight's check of each region's key; the rest: CopyImage encrypting
    # publish.accounts: the role in each consumer account (which needs the actions above).
    "publish": _PUBLISH | {"sts:AssumeRole"},
    # providers/aws/fleet.py AsgFleet: replace(), current(), signals(); refresh.py. The group writes fall under the
    # OptedIn statement (groups tagged amiforge:rollout=enabled).
    "rollout": _READ_IMAGES
    | {
        "autoscaling:DescribeAutoScalingGroups",
        "autoscaling:UpdateAutoScalingGroup",
        "autoscaling:TerminateInstanceInAutoScalingGroup",
        # providers/aws/refresh.py: the instance-refresh mode (the writes fall under OptedIn too).
        "autoscaling:StartInstanceRefresh",
        "autoscaling:DescribeInstanceRefreshes",
        "autoscaling:RollbackInstanceRefresh",
        "ec2:DescribeLaunchTemplates",
        "ec2:DescribeLaunchTemplateVersions",
        "ec2:CreateLaunchTemplateVersion",
        "ec2:DescribeInstances",
        "ec2:CreateTags",
        "ec2:GetConsoleOutput",
        "ec2:DescribeInstanceTypes",  # a group launching a Xen type is refused (its console shows no readiness)
        "cloudwatch:DescribeAlarms",  # the strategy's alarm gates
        "ec2:RunInstances",  # authorised only: see AUTHORISED_ONLY
        "iam:PassRole",
    },
    # providers/aws/gc.py: tag-filtered Describe* to plan; the removals fall under the Managed statement (DESTRUCTIVE).
    "gc": _READ_IMAGES
    | {
        "ec2:DescribeInstances",
        "ec2:DescribeSnapshots",
        "ec2:DescribeVolumes",
        "ec2:DescribeKeyPairs",  # the SSH communicator's throw-away key pairs a killed bake or boot test left
        "ec2:TerminateInstances",
        "ec2:DeregisterImage",
        "ec2:DeleteSnapshot",
        "ec2:DeleteVolume",
        "ec2:DeleteKeyPair",
    },
    # providers/aws/snapshot.py: the root snapshot's bytes through the EBS direct APIs; kms:Decrypt for encrypted ones.
    "scan": _READ_IMAGES | {"ebs:ListSnapshotBlocks", "ebs:GetSnapshotBlock", "kms:Decrypt"},
    # lifecycle/adopt.py (import packer): the images must exist and be available.
    "import": _READ_IMAGES,
    # providers/aws/doctor.py: identity, regions, and the day-one checks (network, encryption, key policies, quotas).
    "doctor": frozenset(
        {
            "sts:GetCallerIdentity",
            "ec2:DescribeRegions",
            "ec2:DescribeVpcs",
            "ec2:DescribeSubnets",
            "ec2:DescribeRouteTables",
            "ec2:DescribeVpcEndpoints",
            "ec2:DescribeImages",
            "ec2:GetEbsEncryptionByDefault",
            "ec2:GetEbsDefaultKmsKeyId",
            "ec2:GetImageBlockPublicAccessState",
            "kms:DescribeKey",
            "kms:GetKeyPolicy",
            "servicequotas:GetServiceQuota",
            "servicequotas:ListServiceQuotas",
        }
    ),
}

# Actions that destroy or expose a resource: allowed only on resources carrying amiforge:managed=true.
DESTRUCTIVE: Final[frozenset[str]] = frozenset(
    {
        "ec2:DeregisterImage",
        "ec2:DeleteSnapshot",
        "ec2:DeleteVolume",
        "ec2:TerminateInstances",
        "ec2:StopInstances",
        "ec2:EnableImageDeprecation",
        "ec2:ModifyImageAttribute",
        "ec2:ModifySnapshotAttribute",
        "ec2:DeleteKeyPair",  # bake/boot-test: the throw-away key pair, tagged amiforge:managed at import
    }
)
# Declared, never called by amiforge: IAM checks them on behalf of a call amiforge makes. The sync test holds every
# other declared action to being called. Each set is part of the operation's PERMISSIONS.
AUTHORISED_ONLY: Final[Mapping[Operation, frozenset[str]]] = {
    # RunInstances: passing the instance profile's role; EC2 using the account's EBS encryption-by-default key (or an
    # encrypted source image's key) for the new volumes, which IAM checks against the caller (_EBS_KEY_USE's doc).
    # Tags given at creation (RunInstances', CreateImage's TagSpecifications) are authorised as ec2:CreateTags ("Grant
    # permission to tag Amazon EC2 resources during creation", EC2 User Guide).
    "bake": _EBS_KEY_USE | {"iam:PassRole", "ec2:CreateTags"},
    "boot-test": _EBS_KEY_USE | {"iam:PassRole", "ec2:CreateTags"},
    # CopyImage with KmsKeyId: EC2 re-encrypts the copy's snapshots under the region's key (DescribeKey is called).
    "distribute": _EBS_KEY_USE - {"kms:DescribeKey"},
    # The EBS direct APIs decrypt an encrypted snapshot's blocks with the caller's kms:Decrypt.
    "scan": frozenset({"kms:Decrypt"}),
    # Auto Scaling checks that whoever points a group at a launch template version may launch it (ec2:RunInstances)
    # and pass its instance profile's role (iam:PassRole).
    "rollout": frozenset({"ec2:RunInstances", "iam:PassRole"}),
}

# SSM writes that support scoping to parameter ARNs; reads stay on "*" (a recipe's source parameter is anyone's).
_SSM_PARAMETER_WRITES: Final[frozenset[str]] = frozenset({"ssm:PutParameter", "ssm:AddTagsToResource"})
# The signing operations' KMS actions, scoped to the signing keys when they are given. Only theirs: distribute's
# DescribeKey and bake's EBS key use are about the regions' EBS keys (test_iam.py has the case of both).
_SIGNING_OPERATIONS: Final[frozenset[str]] = frozenset({"sign-kms", "verify-kms"})
_SIGNING_KEY_ACTIONS: Final[frozenset[str]] = frozenset({"kms:DescribeKey", "kms:Sign", "kms:GetPublicKey"})
_PASS_ROLE_CONDITION: Final[Mapping[str, Any]] = {"StringEquals": {"iam:PassedToService": "ec2.amazonaws.com"}}
# Grants only for AWS resources: EC2 creates them for the volumes it encrypts; no one can grant themselves the key
# (the least-privilege advice of the EBS encryption requirements page cited at _EBS_KEY_USE). The key is a Boolean.
_AWS_RESOURCE_GRANT_CONDITION: Final[Mapping[str, Any]] = {"Bool": {"kms:GrantIsForAWSResource": True}}
_MANAGED_CONDITION: Final[Mapping[str, Any]] = {"StringEquals": {f"aws:ResourceTag/{MANAGED_TAG}": "true"}}
# Auto Scaling writes a rollout makes: allowed only on groups whose owner tagged them for amiforge rollouts.
ROLLOUT_GROUP_WRITES: Final[frozenset[str]] = frozenset(
    {
        "autoscaling:UpdateAutoScalingGroup",
        "autoscaling:TerminateInstanceInAutoScalingGroup",
        "autoscaling:StartInstanceRefresh",
        "autoscaling:RollbackInstanceRefresh",
    }
)
_ROLLOUT_CONDITION: Final[Mapping[str, Any]] = {"StringEquals": {f"aws:ResourceTag/{ROLLOUT_TAG}": ROLLOUT_ENABLED}}


@dataclass(frozen=True)
class _Scope:
    """Where an action is allowed: resources and an optional condition, and the statement's Sid suffix. Actions with
    equal scopes (of one service) share a statement."""

    label: str = "Any"
    resources: tuple[str, ...] = ("*",)
    condition: str | None = None  # JSON text, so the scope is hashable; decoded into the document

    @classmethod
    def when(cls, label: str, condition: Mapping[str, Any]) -> _Scope:
        return cls(label, condition=json.dumps(condition, sort_keys=True))


_ANY = _Scope()


def actions_for(operations: Iterable[str]) -> frozenset[str]:
    """Every IAM action the operations declare. An unknown operation is a ConfigError that lists the known ones."""
    wanted = list(operations)
    unknown = sorted({op for op in wanted if op not in PERMISSIONS})
    if unknown:
        raise ConfigError(
            f"unknown amiforge operation(s): {', '.join(unknown)}",
            fix=f"use some of: {', '.join(OPERATIONS)}",
        )
    actions: set[str] = set()
    for op in wanted:
        actions |= PERMISSIONS[cast(Operation, op)]  # known: checked above
    return frozenset(actions)


def _scope(operation: str, action: str, parameter_prefix: str, kms_keys: tuple[str, ...]) -> _Scope:
    """Where `operation` needs `action`."""
    if action in DESTRUCTIVE:
        return _Scope.when("Managed", _MANAGED_CONDITION)
    if action in ROLLOUT_GROUP_WRITES:
        return _Scope.when("OptedIn", _ROLLOUT_CONDITION)
    if action == "iam:PassRole":
        return _Scope.when("Conditional", _PASS_ROLE_CONDITION)
    if action == "kms:CreateGrant":
        return _Scope.when("AwsResourceGrants", _AWS_RESOURCE_GRANT_CONDITION)
    if action in _SSM_PARAMETER_WRITES:
        return _Scope("Scoped", resources=(f"arn:aws:ssm:*:*:parameter{parameter_prefix.rstrip('/')}/*",))
    if operation in _SIGNING_OPERATIONS and action in _SIGNING_KEY_ACTIONS and kms_keys:
        return _Scope("Scoped", resources=kms_keys)
    return _ANY


def policy_document(
    operations: Iterable[str], *, parameter_prefix: str = "/amiforge", kms_keys: Iterable[str] = ()
) -> dict[str, Any]:
    """The least-privilege IAM policy for `operations`: Version 2012-10-17, per service and scope one statement with
    its actions sorted and unique. Deterministic: the same input gives the same JSON, statement order included."""
    if not parameter_prefix.startswith("/"):
        raise ConfigError(f"parameter prefix {parameter_prefix!r} must start with /", fix="use e.g. /amiforge")
    keys = tuple(sorted(set(kms_keys)))
    wanted = set(operations)
    actions_for(wanted)  # unknown operations are refused
    groups: dict[tuple[str, _Scope], set[str]] = {}
    for operation in sorted(wanted):
        for action in PERMISSIONS[cast(Operation, operation)]:
            service = action.split(":", 1)[0]
            groups.setdefault((service, _scope(operation, action, parameter_prefix, keys)), set()).add(action)
    # An action one operation needs anywhere makes a narrower statement of another operation for it redundant.
    for (service, scope), actions in groups.items():
        if scope != _ANY:
            actions -= groups.get((service, _ANY), set())
    statements: list[dict[str, Any]] = []
    for (service, scope), actions in sorted(groups.items(), key=lambda g: (g[0][0], g[0][1].label)):
        if not actions:
            continue
        statement: dict[str, Any] = {
            "Sid": f"{service.capitalize()}{scope.label}",
            "Effect": "Allow",
            "Action": sorted(actions),
            "Resource": scope.resources[0] if scope.resources == ("*",) else list(scope.resources),
        }
        if scope.condition is not None:
            statement["Condition"] = json.loads(scope.condition)
        statements.append(statement)
    return {"Version": "2012-10-17", "Statement": statements}


def policy_json(operations: Iterable[str], **kwargs: Any) -> str:
    """`policy_document()` as indented JSON, ready for `aws iam create-policy --policy-document`."""
    return json.dumps(policy_document(operations, **kwargs), indent=2)
