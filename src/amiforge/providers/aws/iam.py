"""Declared IAM permissions: which AWS actions each amiforge operation needs, and the least-privilege policy for a set.

This module owns one declaration per operation, `PERMISSIONS`, a closed mapping in one place (cloud-custodian's habit
of declared permissions, without its registries). A test runs each implemented operation under moto, collects the IAM
actions it really calls, and fails when one is missing here, so the declaration cannot drift from the code.

`policy_document()` turns operations into an IAM policy: per service one statement with `Resource: "*"` for actions
that cannot be scoped (Describe*, Create* of new resources), plus separate statements where a resource or condition
narrows the action: SSM parameter writes to the parameter prefix amiforge publishes under, KMS signing to the keys
given, destructive EC2 actions only on resources tagged `amiforge:managed=true` (docs/architecture.md §8), and the
Auto Scaling writes of a rollout only on groups tagged `amiforge:rollout=enabled`.

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
    "rollback",
    "rollout",
    "retire",
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
        "sts:AssumeRole",  # publish.accounts: the role in each consumer account (which needs the actions above)
    }
)
_INSTANCE = frozenset(
    {
        "ec2:RunInstances",
        "ec2:DescribeInstances",
        "ec2:TerminateInstances",
        "ec2:CreateTags",
        "ec2:GetConsoleOutput",
        "iam:PassRole",  # the instance profile that lets SSM reach the instance
        "ssm:SendCommand",
        "ssm:GetCommandInvocation",
        "ssm:DescribeInstanceInformation",
    }
)

# THE declaration: one entry per operation, every IAM action it may call. Keep each set exact: a test checks that what
# the code calls is declared; a review checks nothing is declared that is not called.
PERMISSIONS: Final[Mapping[Operation, frozenset[str]]] = {
    "resolve-source": _READ_IMAGES | {"ssm:GetParameter"},
    "inventory": _READ_IMAGES,
    "bake": _INSTANCE
    | _READ_IMAGES
    | {"ec2:CreateImage", "ec2:DescribeSnapshots", "ec2:StopInstances", "ssm:GetParameter"},
    "boot-test": _INSTANCE | _READ_IMAGES,
    "sign-kms": frozenset({"kms:DescribeKey", "kms:Sign", "kms:GetPublicKey"}),  # signing/kms.py KmsSigner
    "verify-kms": frozenset({"kms:GetPublicKey"}),  # signing/kms.py KmsVerifier; the check itself is offline
    "distribute": _READ_IMAGES
    | {
        "ec2:CopyImage",
        "ec2:CreateTags",
        "ec2:DescribeSnapshots",
        "ec2:ModifyImageAttribute",
        "ec2:ModifySnapshotAttribute",
        "kms:DescribeKey",
        "kms:CreateGrant",
        "kms:Decrypt",
        "kms:ReEncryptFrom",
        "kms:ReEncryptTo",
        "kms:GenerateDataKeyWithoutPlaintext",
        "sts:AssumeRole",
    },
    "publish": _PUBLISH,
    "rollback": _PUBLISH,
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
        "cloudwatch:DescribeAlarms",  # the strategy's alarm gates
        # Not called, but authorised: Auto Scaling checks that whoever points a group at a launch template version
        # may launch it (ec2:RunInstances) and pass its instance profile's role (iam:PassRole).
        "ec2:RunInstances",
        "iam:PassRole",
    },
    "retire": _READ_IMAGES
    | {
        "ec2:DescribeSnapshots",
        "ec2:DescribeInstances",
        "ec2:DescribeLaunchTemplates",
        "ec2:DescribeLaunchTemplateVersions",
        "ec2:DescribeImageAttribute",
        "autoscaling:DescribeAutoScalingGroups",
        "ssm:GetParametersByPath",
        "ssm:DescribeParameters",
        "ec2:EnableImageDeprecation",
        "ec2:DeregisterImage",
        "ec2:DeleteSnapshot",
    },
    # providers/aws/gc.py: tag-filtered Describe* to plan; the removals fall under the Managed statement (DESTRUCTIVE).
    "gc": _READ_IMAGES
    | {
        "ec2:DescribeInstances",
        "ec2:DescribeSnapshots",
        "ec2:DescribeVolumes",
        "ec2:TerminateInstances",
        "ec2:DeregisterImage",
        "ec2:DeleteSnapshot",
        "ec2:DeleteVolume",
    },
    # providers/aws/snapshot.py: the root snapshot's bytes through the EBS direct APIs; kms:Decrypt for encrypted ones.
    "scan": _READ_IMAGES | {"ebs:ListSnapshotBlocks", "ebs:GetSnapshotBlock", "kms:Decrypt"},
    # lifecycle/adopt.py (import packer): the images must exist and be available.
    "import": _READ_IMAGES,
    "doctor": frozenset({"sts:GetCallerIdentity", "ec2:DescribeRegions"}),
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
    }
)
# SSM writes that support scoping to parameter ARNs; reads stay on "*" (a recipe's source parameter is anyone's).
_SSM_PARAMETER_WRITES: Final[frozenset[str]] = frozenset({"ssm:PutParameter", "ssm:AddTagsToResource"})
# KMS actions scoped to the signing keys when they are given.
_KMS_KEY_ACTIONS: Final[frozenset[str]] = frozenset({"kms:DescribeKey", "kms:Sign", "kms:GetPublicKey"})
_PASS_ROLE_CONDITION: Final[Mapping[str, Any]] = {"StringEquals": {"iam:PassedToService": "ec2.amazonaws.com"}}
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
    """Where an action is allowed: resources and an optional condition. Actions with equal scopes share a statement."""

    resources: tuple[str, ...] = ("*",)
    condition: str | None = None  # JSON text, so the scope is hashable; decoded into the document

    def label(self) -> str:
        if self.condition is not None:
            if f"ResourceTag/{MANAGED_TAG}" in self.condition:
                return "Managed"
            return "OptedIn" if f"ResourceTag/{ROLLOUT_TAG}" in self.condition else "Conditional"
        return "Any" if self.resources == ("*",) else "Scoped"


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


def _scope(action: str, parameter_prefix: str, kms_keys: tuple[str, ...]) -> _Scope:
    if action in DESTRUCTIVE:
        return _Scope(condition=json.dumps(_MANAGED_CONDITION, sort_keys=True))
    if action in ROLLOUT_GROUP_WRITES:
        return _Scope(condition=json.dumps(_ROLLOUT_CONDITION, sort_keys=True))
    if action == "iam:PassRole":
        return _Scope(condition=json.dumps(_PASS_ROLE_CONDITION, sort_keys=True))
    if action in _SSM_PARAMETER_WRITES:
        return _Scope(resources=(f"arn:aws:ssm:*:*:parameter{parameter_prefix.rstrip('/')}/*",))
    if action in _KMS_KEY_ACTIONS and kms_keys:
        return _Scope(resources=kms_keys)
    return _Scope()


def policy_document(
    operations: Iterable[str], *, parameter_prefix: str = "/amiforge", kms_keys: Iterable[str] = ()
) -> dict[str, Any]:
    """The least-privilege IAM policy for `operations`: Version 2012-10-17, per service and scope one statement with
    its actions sorted and unique. Deterministic: the same input gives the same JSON, statement order included."""
    if not parameter_prefix.startswith("/"):
        raise ConfigError(f"parameter prefix {parameter_prefix!r} must start with /", fix="use e.g. /amiforge")
    keys = tuple(sorted(set(kms_keys)))
    groups: dict[tuple[str, _Scope], set[str]] = {}
    for action in actions_for(operations):
        service = action.split(":", 1)[0]
        groups.setdefault((service, _scope(action, parameter_prefix, keys)), set()).add(action)
    statements: list[dict[str, Any]] = []
    for (service, scope), actions in sorted(groups.items(), key=lambda g: (g[0][0], g[0][1].label())):
        statement: dict[str, Any] = {
            "Sid": f"{service.capitalize()}{scope.label()}",
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
