"""Declared IAM permissions: which AWS actions each amiforge operation needs, and the least-privilege policy for a set.

This module owns one declaration per operation, `PERMISSIONS`, a closed mapping in one place (cloud-custodian's habit
of declared permissions, without its registries). The sync test (tests/integration/aws/test_iam.py) reads the source
for every AWS call site it has, runs every operation under moto and fails when an operation calls an action it does
not declare, when a call site (file:line) is reached by no operation, when an operation declares an action it neither
calls nor needs authorised — and when a call would be refused on AWS by the policy generated here: its recorder
evaluates each call (and what IAM authorises on its behalf: tags given at creation, the role passed, EC2's and EBS's
use of a KMS key) against `policy_document([operation])`, with the resources' tags read from moto. `AUTHORISED_ONLY`
names the actions IAM checks on amiforge's behalf but amiforge never calls.

Only operations amiforge implements are declared: an operation gets its entry with its code (`retire`, issue 15, has
none yet), so the policy `amiforge doctor --aws` prints grants nothing that nothing uses.

`policy_document()` turns operations into an IAM policy: per service one statement with `Resource: "*"` for actions
that cannot be scoped (Describe*, Create* of new resources), plus statements where a resource or condition narrows an
action (one action may need several, each a separate statement):

- **Managed** (`aws:ResourceTag/amiforge:managed=true`, docs/architecture.md §8): what destroys, exposes or locks a
  resource (`DESTRUCTIVE`: deregister, delete, terminate, stop, share, deregistration protection) and tags added to
  a resource after its creation (distribute re-tags its copies).
- **Tags**: `ec2:CreateTags` is never granted on anything unconditioned — amiforge could then tag anything
  `amiforge:managed=true` and destroy it. Tags given at creation (RunInstances, CreateImage, CopyImage,
  ImportKeyPair's TagSpecifications) are authorised as CreateTags with `ec2:CreateAction` naming the creating action
  ("Grant permission to tag Amazon EC2 resources during creation", EC2 User Guide): **TagOnCreate**. A rollout tags
  the instances of someone else's group, never with `amiforge:managed`: **TagOthers** (instances only,
  `ForAllValues:StringNotEquals aws:TagKeys`, and only `amiforge:*` keys: `ForAllValues:StringLike`). `import`
  (adopting Packer's images) tags the images and their snapshots `amiforge:managed=true` and nothing else:
  **Adopt** — adopting is declaring that amiforge manages the image from now on, so a principal granted `import`
  can make any image of the account amiforge's (gc still never touches what a version holds).
- **OptedIn**: the Auto Scaling writes of a rollout only on groups tagged `amiforge:rollout=enabled` (below).
- **Run Command**: `ssm:SendCommand` is authorised for the document and for each instance separately, so it gets two
  statements: the `AWS-RunShellScript` document, and instances tagged `amiforge:managed=true` (`ssm:resourceTag/…`,
  the key Systems Manager documents for Run Command: "Restricting Run Command access based on tags") — never the
  instances of the account at large, on which a command runs as root.
- **iam:PassRole** only to EC2 (`iam:PassedToService`), and only for `pass_roles` (the instance profiles' roles;
  `doctor --aws --pass-role ARN`) when given: without them any role may be passed, which `policy_warnings` says.
- **KMS**: what EC2 does with a customer managed EBS key on amiforge's behalf (bake and boot-test launching encrypted
  volumes, distribute's encrypted copies) only through EC2 (`kms:ViaService` `ec2.*.amazonaws.com`), grants only for
  AWS resources (`kms:GrantIsForAWSResource`); scan's Decrypt of encrypted snapshot blocks only through the EBS
  direct APIs (`ebs.*.amazonaws.com`, and `ec2.*.amazonaws.com`: which one KMS sees is an unverified assumption,
  see _KEY_USERS); distribute's own DescribeKey (its preflight of each region's EBS key) on any
  key; and — when signing keys are given (`kms_keys`, `doctor --aws --kms-key ARN`) — the signing operations' KMS
  actions only on those keys (else on any key, which `policy_warnings` says).
- SSM parameter writes on the parameter prefix amiforge publishes under.

A scope belongs to an (operation, action) pair, not to the action alone: distribute's DescribeKey checks the regions'
EBS keys, which are not the signing keys, so it stays on "*" when sign-kms's DescribeKey is narrowed to them; an
action one operation needs on "*" makes another operation's narrower statement for it redundant (dropped).

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
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any, Final, Literal, cast, get_args

from amiforge.errors import ConfigError
from amiforge.providers.aws.asg_records import ROLLOUT_ENABLED, ROLLOUT_TAG
from amiforge.providers.aws.images import MANAGED_TAG

__all__ = [
    "AUTHORISED_ONLY",
    "DESTRUCTIVE",
    "MANAGED_POLICY_MAX_CHARS",
    "OPERATIONS",
    "PERMISSIONS",
    "ROLLOUT_GROUP_WRITES",
    "RUN_COMMAND_DOCUMENT",
    "TAG_ON_CREATE",
    "Operation",
    "actions_for",
    "policy_document",
    "policy_json",
    "policy_size",
    "policy_warnings",
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
    "retire",
    "drift",
    "report",
    "doctor",
]
OPERATIONS: Final[tuple[str, ...]] = get_args(Operation)
_ROLE_ARN_RE = re.compile(r"arn:aws[a-z-]*:iam::[0-9]{12}:role/[\w+=,.@/-]+")
_KEY_ARN_RE = re.compile(r"arn:aws[a-z-]*:kms:[a-z0-9-]+:[0-9]+:key/[\w-]+")

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
        "ssm:ListCommands",  # a SendCommand whose answer was lost is looked for before it is sent again (machine.py)
    }
)
# The SSH communicator's throw-away key pair (instances.py): imported tagged; its cleanup looks it up by name and tags
# (DeleteKeyPair of a missing name succeeds; of one the import never made, IAM refuses: it carries no tag).
_THROWAWAY_KEY = frozenset({"ec2:ImportKeyPair", "ec2:DescribeKeyPairs", "ec2:DeleteKeyPair"})
# What IAM checks when EC2 uses a customer managed KMS key on amiforge's behalf: RunInstances creating volumes
# encrypted by default (or from an encrypted image), CopyImage encrypting a copy. AWS documents these as the
# permissions users need for EBS encryption ("Requirements for Amazon EBS encryption", Permissions for users:
# https://docs.aws.amazon.com/ebs/latest/userguide/ebs-encryption-requirements.html); kms:ReEncrypt there is
# ReEncryptFrom and ReEncryptTo. Only through EC2 (kms:ViaService), and grants only for AWS resources (_scopes).
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
    | {"ec2:DescribeInstanceTypes", "ec2:ModifyImageAttribute"}
    | _THROWAWAY_KEY
    | {"ec2:GetConsoleOutput"},
    # The readiness line on the serial console; the image's architecture against the test instance type's;
    # communicator ssh (throw-away key pair).
    "boot-test": _INSTANCE
    | _EBS_KEY_USE
    | {"ec2:GetConsoleOutput", "ec2:DescribeImages", "ec2:DescribeInstanceTypes"}
    | _THROWAWAY_KEY,
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
        "ec2:GetEbsEncryptionByDefault",  # preflight: a region without kms_key that would encrypt the copy
        "kms:GetKeyPolicy",  # preflight: the source's and each region's key let the receivers use it
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
        # refresh.batch_time: what one batch may take on AWS's side (lifecycle hooks, load balancers' health checks
        # and draining), which the controller judges a refresh stuck by. Reads.
        "autoscaling:DescribeLifecycleHooks",
        "elasticloadbalancing:DescribeTargetGroups",
        "elasticloadbalancing:DescribeTargetGroupAttributes",
        "elasticloadbalancing:DescribeLoadBalancers",
        "elasticloadbalancing:DescribeLoadBalancerAttributes",
        "ec2:DescribeLaunchTemplates",
        "ec2:DescribeLaunchTemplateVersions",
        "ec2:CreateLaunchTemplateVersion",
        "ec2:DescribeInstances",
        "ec2:CreateTags",
        "ec2:GetConsoleOutput",
        "ec2:DescribeInstanceTypes",  # a group launching a Xen type is refused (its console shows no readiness)
        "cloudwatch:DescribeAlarms",  # the strategy's alarm gates
        "cloudwatch:GetMetricData",  # signals(): the members' heartbeats (agent coverage, M4)
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
    # providers/aws/retire.py: every source of references, read (the accounts an image is shared with through their
    # roles); the steps out fall under the Managed statement (DESTRUCTIVE): only images amiforge made or adopted.
    "retire": _READ_IMAGES
    | {
        "ec2:DescribeInstances",
        "ec2:DescribeLaunchTemplates",
        "ec2:DescribeLaunchTemplateVersions",
        "ec2:DescribeImageAttribute",
        "ec2:DescribeImageReferences",
        "autoscaling:DescribeAutoScalingGroups",
        "autoscaling:DescribeLaunchConfigurations",
        "autoscaling:DescribeWarmPool",
        "ssm:DescribeParameters",
        "ssm:GetParameters",
        "ssm:GetParameter",  # a launch template pinning a parameter's version (resolve:ssm:NAME:3)
        "rbin:ListRules",
        "sts:AssumeRole",
        "ec2:EnableImageDeprecation",
        "ec2:DisableImageDeregistrationProtection",
        "ec2:DeregisterImage",
        "ec2:DeleteSnapshot",
        # `retire restore`: an image of the registry back from the Recycle Bin.
        "ec2:ListImagesInRecycleBin",
        "ec2:RestoreImageFromRecycleBin",
    },
    # providers/aws/allowed.py: what runs in each region, and the Allowed AMIs setting's verdict on its images.
    "drift": _READ_IMAGES | {"ec2:DescribeInstances", "ec2:GetAllowedImagesSettings"},
    # providers/aws/retire.py stored(): what the images' snapshots store, and their tags (amiforge report).
    "report": _READ_IMAGES | {"ec2:DescribeSnapshots"},
    # providers/aws/snapshot.py: the root snapshot's bytes through the EBS direct APIs; kms:Decrypt for encrypted ones.
    "scan": _READ_IMAGES | {"ebs:ListSnapshotBlocks", "ebs:GetSnapshotBlock", "kms:Decrypt"},
    # lifecycle/adopt.py (import packer): the images must exist and be available; adopting tags each and its
    # snapshots amiforge:managed=true (the Adopt statement), so distribute may share them.
    "import": _READ_IMAGES | {"ec2:CreateTags", "sts:GetCallerIdentity"},  # whose image it is: only ours is tagged
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
            "ec2:DescribeSecurityGroups",  # communicator ssh: the recipe's groups let TCP 22 in
            "ec2:DescribeSnapshots",  # an encrypted source image of the account: the key its snapshots are under
            "ec2:DescribeInstanceTypes",  # the source resolves as a bake resolves it (the type's architecture)
            "ssm:GetParameter",  # ... from an SSM parameter
            "kms:DescribeKey",
            "kms:GetKeyPolicy",
            "servicequotas:GetServiceQuota",
            "servicequotas:ListServiceQuotas",
        }
    ),
}

# Actions that destroy, expose or lock a resource: allowed only on resources carrying amiforge:managed=true.
DESTRUCTIVE: Final[frozenset[str]] = frozenset(
    {
        "ec2:DeregisterImage",
        "ec2:DeleteSnapshot",
        "ec2:DeleteVolume",
        "ec2:TerminateInstances",
        "ec2:StopInstances",
        "ec2:ModifyImageAttribute",
        "ec2:ModifySnapshotAttribute",
        "ec2:EnableImageDeregistrationProtection",  # distribute: its copies, tagged at creation
        "ec2:DisableImageDeregistrationProtection",  # retire: lifts it before the deregistration
        "ec2:EnableImageDeprecation",  # retire
        "ec2:DeleteKeyPair",  # bake/boot-test: the throw-away key pair, tagged amiforge:managed at import
    }
)
# Declared, never called by amiforge: IAM checks them on behalf of a call amiforge makes. The sync test holds every
# other declared action to being called. Each set is part of the operation's PERMISSIONS.
AUTHORISED_ONLY: Final[Mapping[Operation, frozenset[str]]] = {
    # RunInstances: passing the instance profile's role; EC2 using the account's EBS encryption-by-default key (or an
    # encrypted source image's key) for the new volumes, which IAM checks against the caller (_EBS_KEY_USE's doc).
    # Tags given at creation (RunInstances', CreateImage's, ImportKeyPair's TagSpecifications) are authorised as
    # ec2:CreateTags ("Grant permission to tag Amazon EC2 resources during creation", EC2 User Guide).
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
# Auto Scaling writes a rollout makes: allowed only on groups whose owner tagged them for amiforge rollouts.
ROLLOUT_GROUP_WRITES: Final[frozenset[str]] = frozenset(
    {
        "autoscaling:UpdateAutoScalingGroup",
        "autoscaling:TerminateInstanceInAutoScalingGroup",
        "autoscaling:StartInstanceRefresh",
        "autoscaling:RollbackInstanceRefresh",
    }
)
# The EC2 actions that create a resource with tags amiforge gives (TagSpecifications): the tag-on-create CreateTags
# is authorised with ec2:CreateAction naming one of them.
TAG_ON_CREATE: Final[tuple[str, ...]] = ("CopyImage", "CreateImage", "ImportKeyPair", "RunInstances")
# IAM's quota for a managed policy document, in characters, white space not counted ("IAM and AWS STS quotas", IAM
# User Guide: https://docs.aws.amazon.com/IAM/latest/UserGuide/reference_iam-quotas.html). The policy for all
# operations is about 4,450; each --pass-role or --kms-key ARN adds its length and 3 (about 50-80).
MANAGED_POLICY_MAX_CHARS: Final = 6144
# The one SSM document amiforge runs commands with (machine.py).
RUN_COMMAND_DOCUMENT = "AWS-RunShellScript"

# SSM writes that support scoping to parameter ARNs; reads stay on "*" (a recipe's source parameter is anyone's).
_SSM_PARAMETER_WRITES: Final[frozenset[str]] = frozenset({"ssm:PutParameter", "ssm:AddTagsToResource"})
# The signing operations' KMS actions, scoped to the signing keys when they are given. Only theirs: distribute's
# DescribeKey and bake's EBS key use are about the regions' EBS keys (test_iam.py has the case of both).
_SIGNING_OPERATIONS: Final[frozenset[str]] = frozenset({"sign-kms", "verify-kms"})
_SIGNING_KEY_ACTIONS: Final[frozenset[str]] = frozenset({"kms:DescribeKey", "kms:Sign", "kms:GetPublicKey"})
# Who uses an EBS key on amiforge's behalf, by operation: EC2 (launching encrypted volumes, encrypting a copy), or the
# EBS direct APIs (scan reads an encrypted snapshot's blocks). kms:ViaService is <service>.<region>.amazonaws.com
# (AWS KMS condition keys, kms:ViaService); the region is left open: a copy's key is in the destination region.
# ASSUMPTION, not verified against AWS's documentation: which service name KMS sees for the EBS direct APIs' Decrypt
# (the EBS direct APIs answer at ebs.<region>.amazonaws.com, but EBS's own KMS requests come through EC2). Both are
# allowed for scan until a documented statement says which; both are EBS, never a principal's own KMS call.
_EC2_KEY_USER = "ec2.*.amazonaws.com"
_KEY_USERS: Final[Mapping[str, tuple[str, ...]]] = {"scan": ("ebs.*.amazonaws.com", _EC2_KEY_USER)}
# Resource ARNs name the partition `*`: the same policy then matches in aws, aws-cn and aws-us-gov.
_MANAGED_CONDITION: Final[Mapping[str, Any]] = {"StringEquals": {f"aws:ResourceTag/{MANAGED_TAG}": "true"}}
_ROLLOUT_CONDITION: Final[Mapping[str, Any]] = {"StringEquals": {f"aws:ResourceTag/{ROLLOUT_TAG}": ROLLOUT_ENABLED}}


@dataclass(frozen=True)
class _Scope:
    """Where an action is allowed: resources and an optional condition, and the statement's Sid suffix. Actions with
    equal scopes (of one service) share a statement; scopes of one service have distinct labels."""

    label: str = "Any"
    resources: tuple[str, ...] = ("*",)
    condition: str | None = None  # JSON text, so the scope is hashable; decoded into the document

    @classmethod
    def when(cls, label: str, condition: Mapping[str, Any], resources: tuple[str, ...] = ("*",)) -> _Scope:
        return cls(label, resources, json.dumps(condition, sort_keys=True))


_ANY = _Scope()
_MANAGED = _Scope.when("Managed", _MANAGED_CONDITION)
_TAG_ON_CREATE = _Scope.when("TagOnCreate", {"StringEquals": {"ec2:CreateAction": list(TAG_ON_CREATE)}})
# A rollout's tags on the group's instances (fleet.py, asg_records: amiforge:* keys only): never amiforge:managed,
# which would make them gc's, and no key outside amiforge's own (a Name, an owner's cost or access-control tag).
_TAG_OTHERS = _Scope.when(
    "TagOthers",
    {
        "ForAllValues:StringNotEquals": {"aws:TagKeys": [MANAGED_TAG]},
        "ForAllValues:StringLike": {"aws:TagKeys": ["amiforge:*"]},
    },
    ("arn:*:ec2:*:*:instance/*",),
)
# Adopting an image: amiforge:managed=true on it and its snapshots, and no other tag.
_ADOPT = _Scope.when(
    "Adopt",
    {
        "StringEquals": {f"aws:RequestTag/{MANAGED_TAG}": "true"},
        "ForAllValues:StringEquals": {"aws:TagKeys": [MANAGED_TAG]},
    },
    ("arn:*:ec2:*::image/*", "arn:*:ec2:*::snapshot/*"),
)
# Which tags each operation that declares ec2:CreateTags sets, and so which statements it needs.
_TAGGING: Final[Mapping[str, tuple[_Scope, ...]]] = {
    "bake": (_TAG_ON_CREATE,),
    "boot-test": (_TAG_ON_CREATE,),
    "distribute": (_TAG_ON_CREATE, _MANAGED),  # CopyImage's tags, then the copy and its snapshots re-tagged
    "rollout": (_TAG_OTHERS,),
    "import": (_ADOPT,),
}
_RUN_COMMAND = (
    _Scope("RunShellScript", resources=(f"arn:*:ssm:*::document/{RUN_COMMAND_DOCUMENT}",)),
    _Scope.when(
        "ManagedInstances",
        {"StringEquals": {f"ssm:resourceTag/{MANAGED_TAG}": "true"}},
        ("arn:*:ec2:*:*:instance/*",),
    ),
)
_ROLLOUT_OPTED_IN = _Scope.when("OptedIn", _ROLLOUT_CONDITION)


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


def _key_use(operation: str, action: str) -> tuple[_Scope, ...]:
    """An EBS key used on the operation's behalf: only through the service that uses it."""
    via = _KEY_USERS.get(operation, (_EC2_KEY_USER,))
    condition: dict[str, Any] = {"StringLike": {"kms:ViaService": via[0] if len(via) == 1 else list(via)}}
    label = "ViaEc2" if via == (_EC2_KEY_USER,) else "ViaEbs"
    if action == "kms:CreateGrant":
        # Grants only for the AWS resources EC2 encrypts: no one can grant themselves the key (the least-privilege
        # advice of the EBS encryption requirements page cited at _EBS_KEY_USE). The key is a Boolean.
        condition["Bool"] = {"kms:GrantIsForAWSResource": True}
        label = "AwsResourceGrants"
    return (_Scope.when(label, condition),)


def _scopes(
    operation: str, action: str, parameter_prefix: str, kms_keys: tuple[str, ...], pass_roles: tuple[str, ...]
) -> tuple[_Scope, ...]:
    """Where `operation` needs `action`: one statement's scope each (IAM allows the call if any allows it)."""
    if action == "ec2:CreateTags":
        tagging = _TAGGING.get(operation)
        if tagging is None:  # pragma: no cover - test_iam checks every operation declaring CreateTags has its entry
            raise ConfigError(f"{operation} declares ec2:CreateTags but iam._TAGGING does not say which tags it sets")
        return tagging
    if action in DESTRUCTIVE:
        return (_MANAGED,)
    if action in ROLLOUT_GROUP_WRITES:
        return (_ROLLOUT_OPTED_IN,)
    if action == "iam:PassRole":
        passed_to_ec2 = {"StringEquals": {"iam:PassedToService": "ec2.amazonaws.com"}}
        return (_Scope.when("PassToEc2", passed_to_ec2, pass_roles or ("*",)),)
    if action == "ssm:SendCommand":
        return _RUN_COMMAND
    if action in _SSM_PARAMETER_WRITES:
        return (_Scope("Scoped", resources=(f"arn:*:ssm:*:*:parameter{parameter_prefix.rstrip('/')}/*",)),)
    if operation in _SIGNING_OPERATIONS and action in _SIGNING_KEY_ACTIONS and kms_keys:
        return (_Scope("Scoped", resources=kms_keys),)
    if action.startswith("kms:") and action in AUTHORISED_ONLY.get(cast(Operation, operation), frozenset()):
        return _key_use(operation, action)
    return (_ANY,)


def policy_document(
    operations: Iterable[str],
    *,
    parameter_prefix: str = "/amiforge",
    kms_keys: Iterable[str] = (),
    pass_roles: Iterable[str] = (),
) -> dict[str, Any]:
    """The least-privilege IAM policy for `operations`: Version 2012-10-17, per service and scope one statement with
    its actions sorted and unique. `kms_keys`: the signing keys (else the signing actions are on any key);
    `pass_roles`: the roles the recipes' instance profiles hold (else any role may be passed to EC2).
    Deterministic: the same input gives the same JSON, statement order included."""
    if not parameter_prefix.startswith("/"):
        raise ConfigError(f"parameter prefix {parameter_prefix!r} must start with /", fix="use e.g. /amiforge")
    keys = tuple(sorted(set(kms_keys)))
    roles = tuple(sorted(set(pass_roles)))
    for role in roles:
        if _ROLE_ARN_RE.fullmatch(role) is None:
            raise ConfigError(f"{role!r} is not an IAM role ARN", fix="pass arn:aws:iam::<account>:role/<name>")
    for key in keys:
        if _KEY_ARN_RE.fullmatch(key) is None:  # IAM matches the key's ARN: an alias or id would allow nothing
            raise ConfigError(
                f"{key!r} is not a KMS key ARN",
                fix="pass arn:aws:kms:<region>:<account>:key/<id> (aws kms describe-key --key-id <alias or id>)",
            )
    wanted = set(operations)
    actions_for(wanted)  # unknown operations are refused
    groups: dict[tuple[str, _Scope], set[str]] = {}
    for operation in sorted(wanted):
        for action in PERMISSIONS[cast(Operation, operation)]:
            service = action.split(":", 1)[0]
            for scope in _scopes(operation, action, parameter_prefix, keys, roles):
                groups.setdefault((service, scope), set()).add(action)
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
    sids = [s["Sid"] for s in statements]
    if len(sids) != len(set(sids)):  # pragma: no cover - two scopes of one service share a label: rename one
        raise ConfigError(f"the generated policy repeats a statement id: {sorted(sids)}")
    return {"Version": "2012-10-17", "Statement": statements}


def policy_json(operations: Iterable[str], **kwargs: Any) -> str:
    """`policy_document()` as indented JSON, ready for `aws iam create-policy --policy-document`."""
    return json.dumps(policy_document(operations, **kwargs), indent=2)


def policy_size(document: Mapping[str, Any]) -> int:
    """The characters IAM counts against its policy size quota: the document's JSON without white space."""
    return sum(not c.isspace() for c in json.dumps(document, separators=(",", ":")))


def policy_warnings(
    operations: Iterable[str],
    *,
    kms_keys: Iterable[str] = (),
    pass_roles: Iterable[str] = (),
    parameter_prefix: str = "/amiforge",
) -> list[tuple[str, str]]:
    """(what the policy for `operations` allows more widely than it could, or why it cannot be used as it is; the fix)
    for each scope left open because what would narrow it was not given (the roles EC2 may be passed, the signing
    keys), and when the policy is over IAM's size quota for a managed policy."""
    wanted = set(operations)
    actions = actions_for(wanted)
    warnings: list[tuple[str, str]] = []
    keys, roles = list(kms_keys), list(pass_roles)
    size = policy_size(policy_document(wanted, parameter_prefix=parameter_prefix, kms_keys=keys, pass_roles=roles))
    if size > MANAGED_POLICY_MAX_CHARS:
        warnings.append(
            (
                f"the policy is {size} characters (white space not counted), over IAM's quota of "
                f"{MANAGED_POLICY_MAX_CHARS} for a managed policy: aws iam create-policy refuses it",
                "split it by operation into several managed policies, each attached where that operation runs "
                "(doctor --aws prints the policy for all operations; amiforge.providers.aws.iam.policy_json([...]) "
                "gives the policy of the operations named), or pass fewer --pass-role/--kms-key ARNs",
            )
        )
    if "iam:PassRole" in actions and not roles:
        warnings.append(
            (
                "iam:PassRole is allowed for any role passed to EC2: a bake or boot test could launch an instance "
                "with any instance profile of the account",
                "name the roles of the recipes' instance profiles (and of the launch templates rollouts use): amiforge "
                "doctor --aws --pass-role arn:aws:iam::ACCOUNT:role/NAME (repeatable)",
            )
        )
    if wanted & _SIGNING_OPERATIONS and not keys:
        warnings.append(
            (
                "kms:Sign, kms:GetPublicKey and kms:DescribeKey are allowed on any KMS key of the account",
                "name the signing keys: amiforge doctor --aws --kms-key arn:aws:kms:REGION:ACCOUNT:key/ID (repeatable)",
            )
        )
    return warnings
