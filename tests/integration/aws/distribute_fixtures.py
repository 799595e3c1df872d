"""What distribute.py needs from EC2 that moto 5.2.5 lacks, emulated in-process, plus a crash injector.

- `CopyImageEmulation`: CopyImage as the EC2 API reference documents it. moto's own CopyImage takes SourceImageId,
  SourceRegion, Name and Description and ignores everything else: ClientToken (two calls make two images),
  TagSpecifications, CopyImageTags, Encrypted and KmsKeyId; its copy is `available` at once and a duplicate Name is
  accepted. The emulation wraps moto's response method:
  * refuses what EC2 refuses, before anything is made: KmsKeyId without Encrypted=true
    (InvalidParameterDependency); a TagSpecifications entry without ResourceType, or with one other than `image` or
    `snapshot` ("If you specify other values for ResourceType, the request fails"), or a tag key starting with `aws:`
    (InvalidParameterValue); more than one of DestinationOutpostArn / DestinationAvailabilityZone(Id)
    (InvalidParameterCombination); a SnapshotCopyCompletionDurationMinutes that is not a multiple of 15, or given
    with an Outpost or Local Zone destination; a ClientToken over 64 characters; a Name an image of the account in
    the destination region already has (InvalidAMIName.Duplicate);
  * ClientToken: idempotent per (account, destination region, token), comparing *every* request parameter: the same
    token with the same parameters answers the first call's ImageId (even after a crash lost that answer); the same
    token with any parameter different is IdempotentParameterMismatch. The idempotency check comes first, so a retry
    is not refused as a duplicate name;
  * the copy is `pending` for `pending_looks` DescribeImages calls in its region (each call is a tick of time), its
    snapshot `pending` too, then both are `available`/`completed`. A KmsKeyId that does not name an enabled key in
    the destination region is authenticated asynchronously, as documented: the copy goes `pending`, then `failed`;
  * tags: CopyImageTags=true copies the source's user-defined tags (not `aws:*`) to the new AMI; TagSpecifications
    `image` tags the AMI and `snapshot` tags every new snapshot, at creation (`honour_tags=False` makes the endpoint
    ignore TagSpecifications, to prove the ClientToken alone prevents duplicates);
  * encryption: the copy's snapshots are encrypted when Encrypted=true, when the destination is an Outpost, when
    the source's are (no unencrypted copy of an encrypted snapshot), or when the destination region encrypts by
    default ("has the same effect as setting the Encrypted parameter to true", EC2 User Guide); under KmsKeyId (its
    ARN), else the key the API reference names for a request without one: the region's default key for EBS, here
    always its AWS-managed key (`aws_managed_ebs_key`; this emulation has no ModifyEbsDefaultKmsKeyId).
  Not modelled: Local Zones and Outposts as places (such a copy lands in the region), time-based copies' timing,
  DryRun beyond moto's own.
- `aws_managed_ebs_key`: the AWS-managed key alias/aws/ebs of a region, which moto lacks (KeyManager AWS, made on
  first use).
- `SharingEmulation`: moto shares anything. EC2 refuses to share an image or snapshot encrypted under an AWS-managed
  key (the EBS User Guide: a snapshot under the default AWS managed key cannot be shared; the answers, as reported from
  AWS: ModifyImageAttribute `InvalidParameter` "Snapshots encrypted with the AWS Managed CMK can't be shared. Specify
  another snapshot." — hashicorp/packer#7410 — and ModifySnapshotAttribute `OperationNotPermitted` "Encrypted
  snapshots with EBS default key cannot be shared" — hashicorp/packer#7499). Adding a launch permission (any form)
  or a create-volume permission is refused so; removing is not. Not modelled: making an encrypted image public.
- `DeregistrationProtection`: EnableImageDeregistrationProtection raises NotImplementedError in moto. A `before-call`
  handler answers it instead (after checking the image exists in moto) and records the protected images. It sits on
  the generic `before-call` event after ApiCalls and Crash, so the call is still counted and can still be crashed.
- `Crash`: raises `Crashed` at the K-th API call, either before it is made (`when="before"`: the call never happens)
  or after AWS did it but before the caller sees the answer (`when="after"`: the side effect happened, the answer is
  lost) — a process killed between two lines.
"""

from __future__ import annotations

import json
import threading
from dataclasses import dataclass
from typing import Any, cast

import pytest
from botocore.awsrequest import AWSResponse
from moto.core.responses import ActionResult
from moto.ec2.exceptions import EC2ClientError
from moto.ec2.models import ec2_backends
from moto.ec2.responses.amis import AmisResponse
from moto.ec2.responses.elastic_block_store import ElasticBlockStore
from moto.kms.models import kms_backends
from moto_emulation import _Raw

ACCOUNT = "123456789012"
# "The same tag is applied to all the new snapshots"; any other ResourceType fails the request.
COPY_TAGGABLE = ("image", "snapshot")
_DESTINATIONS = ("DestinationOutpostArn", "DestinationAvailabilityZone", "DestinationAvailabilityZoneId")
# Request parameters that are not part of "the same request" for ClientToken idempotency.
_NOT_COMPARED = {"ClientToken", "DryRun", "Action", "Version"}


@dataclass
class _Copy:
    """A copy in progress: `looks` DescribeImages in its region until it ends `outcome` (available or failed)."""

    image_id: str
    looks: int
    outcome: str


class CopyImageEmulation:
    def __init__(self, *, pending_looks: int = 1) -> None:
        self.honour_tags = True
        self.pending_looks = pending_looks
        self._tokens: dict[tuple[str, str, str], tuple[str, str]] = {}  # (account, region, token) → (request, image)
        self._copying: dict[tuple[str, str], list[_Copy]] = {}  # (account, region) → copies in progress
        self.looked_pending: set[str] = set()  # copies some DescribeImages answered as pending
        self._lock = threading.RLock()

    def install(self, monkeypatch: pytest.MonkeyPatch) -> None:
        emulation = self
        copy_image = AmisResponse.copy_image
        describe_images = AmisResponse.describe_images  # may already be the paging emulation's

        def copy(resp: Any) -> ActionResult:
            with emulation._lock:
                return emulation._copy(resp, copy_image)

        def describe(resp: Any) -> ActionResult:
            with emulation._lock:
                emulation._tick(resp.current_account, resp.region)
            return describe_images(resp)

        monkeypatch.setattr(AmisResponse, "copy_image", copy)
        monkeypatch.setattr(AmisResponse, "describe_images", describe)

    # --- CopyImage ------------------------------------------------------------------------------------------------

    def _copy(self, resp: Any, moto_copy: Any) -> ActionResult:
        params: dict[str, Any] = dict(resp.params)
        if params.get("DryRun"):
            return cast(ActionResult, moto_copy(resp))  # moto answers DryRunOperation
        self._check(params)
        account, region = str(resp.current_account), str(resp.region)
        token = params.get("ClientToken")
        request = json.dumps({k: v for k, v in params.items() if k not in _NOT_COMPARED}, sort_keys=True, default=str)
        key = (account, region, str(token))
        if token:
            earlier = self._tokens.get(key)
            if earlier is not None:
                if earlier[0] != request:
                    raise EC2ClientError(
                        "IdempotentParameterMismatch",
                        f"The client token {token} was used for a request with different parameters",
                    )
                return ActionResult({"ImageId": earlier[1]})
        backend = ec2_backends[account][region]
        name = str(params["Name"])
        if any(ami.name == name for ami in backend.amis.values()):
            raise EC2ClientError(
                "InvalidAMIName.Duplicate", f"AMI name {name} is already in use by an AMI owned by you"
            )
        image_id = str(cast(dict[str, Any], moto_copy(resp).result)["ImageId"])
        if token:
            self._tokens[key] = (request, image_id)
        ami = backend.amis[image_id]
        # moto's copy found the source (or raised InvalidAMIID.NotFound); the same lookup gives its record.
        source = ec2_backends[account][str(params["SourceRegion"])].describe_images(ami_ids=[params["SourceImageId"]])[
            0
        ]
        self._encrypt(ami, source, params, account, region)
        self._tag(backend, ami, source, params)
        ami.state = "pending"
        ami.ebs_snapshot.status = "pending"
        outcome = "available" if self._key_usable(params.get("KmsKeyId"), account, region) else "failed"
        self._copying.setdefault((account, region), []).append(_Copy(image_id, self.pending_looks, outcome))
        return ActionResult({"ImageId": image_id})

    @staticmethod
    def _check(params: dict[str, Any]) -> None:
        """What EC2 refuses synchronously, before anything exists."""
        if params.get("KmsKeyId") and params.get("Encrypted") is not True:
            raise EC2ClientError(
                "InvalidParameterDependency", "The parameter KmsKeyId requires the parameter Encrypted to be set."
            )
        for spec in params.get("TagSpecifications") or []:
            kind = spec.get("ResourceType")
            if not kind:
                raise EC2ClientError("InvalidParameterValue", "Tag specification resource type must have a value")
            if kind not in COPY_TAGGABLE:
                raise EC2ClientError("InvalidParameterValue", f"'{kind}' is not a valid taggable resource type")
            for tag in spec.get("Tags") or []:
                if str(tag.get("Key", "")).lower().startswith("aws:"):
                    raise EC2ClientError("InvalidParameterValue", "Tag keys starting with 'aws:' are reserved")
        destinations = [d for d in _DESTINATIONS if params.get(d)]
        if len(destinations) > 1:
            raise EC2ClientError(
                "InvalidParameterCombination", f"Only one of {', '.join(_DESTINATIONS)} can be specified"
            )
        duration = params.get("SnapshotCopyCompletionDurationMinutes")
        if duration is not None:
            if destinations:
                raise EC2ClientError(
                    "InvalidParameterCombination",
                    "SnapshotCopyCompletionDurationMinutes is not supported for an Outpost or Local Zone",
                )
            if int(duration) <= 0 or int(duration) % 15:
                raise EC2ClientError(
                    "InvalidParameterValue", "SnapshotCopyCompletionDurationMinutes must be in 15 minutes"
                )
        token = params.get("ClientToken")
        if token is not None and len(str(token)) > 64:
            raise EC2ClientError("InvalidParameterValue", "The client token must be at most 64 characters")

    @staticmethod
    def _encrypt(ami: Any, source: Any, params: dict[str, Any], account: str, region: str) -> None:
        snapshot = ami.ebs_snapshot
        snapshot.encrypted = (
            bool(params.get("Encrypted"))
            or bool(params.get("DestinationOutpostArn"))
            or bool(source.ebs_snapshot.encrypted)
            or bool(ec2_backends[account][region].ebs_encryption_by_default)
        )
        key = params.get("KmsKeyId")
        found = _find_key(str(key), account, region) if key else None
        # EBS records the key's ARN whatever form the request named it in; an unusable key fails the copy later.
        if key:
            snapshot.kms_key_id = found.arn if found is not None else str(key)
        else:
            snapshot.kms_key_id = aws_managed_ebs_key(account, region) if snapshot.encrypted else None

    def _tag(self, backend: Any, ami: Any, source: Any, params: dict[str, Any]) -> None:
        if params.get("CopyImageTags"):
            user_tags = {k: v for k, v in backend_tags(source).items() if not k.startswith("aws:")}
            if user_tags:
                backend.create_tags([ami.id], user_tags)
        if not self.honour_tags:
            return
        for spec in params.get("TagSpecifications") or []:
            tags = {str(t["Key"]): str(t.get("Value", "")) for t in spec.get("Tags") or []}
            target = ami.id if spec["ResourceType"] == "image" else ami.ebs_snapshot.id
            if tags:
                backend.create_tags([target], tags)

    @staticmethod
    def _key_usable(key: Any, account: str, region: str) -> bool:
        if not key:
            return True
        found = _find_key(str(key), account, region)
        return found is not None and found.enabled and found.key_state == "Enabled"

    # --- time -----------------------------------------------------------------------------------------------------

    def _tick(self, account: str, region: str) -> None:
        """One DescribeImages in (account, region): copies with looks left stay pending; the others end."""
        backend = ec2_backends[account][region]
        still: list[_Copy] = []
        for copy in self._copying.get((account, region), []):
            ami = backend.amis.get(copy.image_id)
            if ami is None:
                continue  # deregistered while copying
            if copy.looks > 0:
                copy.looks -= 1
                self.looked_pending.add(copy.image_id)
                still.append(copy)
                continue
            ami.state = copy.outcome
            ami.ebs_snapshot.status = "completed" if copy.outcome == "available" else "error"
        self._copying[(account, region)] = still


AWS_EBS_ALIAS = "alias/aws/ebs"


def aws_managed_ebs_key(account: str, region: str) -> str:
    """The ARN of the region's AWS-managed EBS key (alias/aws/ebs, KeyManager AWS), made on first use."""
    backend = kms_backends[account][region]
    for key in backend.keys.values():
        if AWS_EBS_ALIAS in key.aliases:
            return str(key.arn)
    key = backend.create_key(None, "ENCRYPT_DECRYPT", "SYMMETRIC_DEFAULT", "Default key for EBS", None)
    key.key_manager = "AWS"
    backend.create_alias(key.id, AWS_EBS_ALIAS)
    return str(key.arn)


class SharingEmulation:
    def install(self, monkeypatch: pytest.MonkeyPatch) -> None:
        modify_image = AmisResponse.modify_image_attribute
        modify_snapshot = ElasticBlockStore.modify_snapshot_attribute

        def image_attribute(resp: Any) -> Any:
            ami = ec2_backends[resp.current_account][resp.region].amis.get(resp._get_param("ImageId"))
            if ami is not None and _adds_launch_permission(resp) and _aws_managed(ami.ebs_snapshot, resp):
                raise EC2ClientError(
                    "InvalidParameter",
                    "Snapshots encrypted with the AWS Managed CMK can't be shared. Specify another snapshot.",
                )
            return modify_image(resp)

        def snapshot_attribute(resp: Any) -> Any:
            snapshot = ec2_backends[resp.current_account][resp.region].snapshots.get(resp._get_param("SnapshotId"))
            adds = resp._get_param("OperationType") == "add" or resp._get_param("CreateVolumePermission", {}).get("Add")
            if snapshot is not None and adds and _aws_managed(snapshot, resp):
                raise EC2ClientError(
                    "OperationNotPermitted", "Encrypted snapshots with EBS default key cannot be shared"
                )
            return modify_snapshot(resp)

        monkeypatch.setattr(AmisResponse, "modify_image_attribute", image_attribute)
        monkeypatch.setattr(ElasticBlockStore, "modify_snapshot_attribute", snapshot_attribute)


def _adds_launch_permission(resp: Any) -> bool:
    """Either request form: LaunchPermission.Add, or OperationType=add with UserIds, UserGroups or (OU) ARNs."""
    if resp._get_param("LaunchPermission", {}).get("Add"):
        return True
    return bool(resp._get_param("OperationType") == "add")


def _aws_managed(snapshot: Any, resp: Any) -> bool:
    if not snapshot.encrypted:
        return False
    if not snapshot.kms_key_id:
        return True  # encrypted under no named key: EBS's default, AWS-managed key
    key = _find_key(str(snapshot.kms_key_id), str(resp.current_account), str(resp.region))
    return key is not None and key.key_manager == "AWS"


def backend_tags(resource: Any) -> dict[str, str]:
    """A moto EC2 resource's tags as a dict."""
    return {str(t["key"]): str(t["value"]) for t in resource.get_tags()}


def _find_key(key: str, account: str, region: str) -> Any:
    """The moto KMS key `key` names (id, ARN, alias, alias ARN) in the destination region, or None."""
    if key.startswith("arn:"):
        parts = key.split(":")
        if len(parts) < 6 or parts[3] != region:
            return None
        account = parts[4]
    backend = kms_backends[account][region]
    try:
        return backend.keys.get(backend.any_id_to_key_id(key))
    except (KeyError, TypeError, AttributeError):
        return None


class DeregistrationProtection:
    def __init__(self) -> None:
        self.protected: set[tuple[str, str]] = set()  # (region, image id)
        self.calls = 0

    def install(self, events: Any) -> None:
        # On the generic event, registered after ApiCalls and Crash: botocore runs handlers of a more specific event
        # name first, so `before-call.ec2.EnableImageDeregistrationProtection` would answer before they count it.
        events.register("before-call", self._answer)

    def _answer(
        self, model: Any, params: dict[str, Any], request_signer: Any, **_: Any
    ) -> tuple[AWSResponse, dict[str, Any]] | None:
        if model.name != "EnableImageDeregistrationProtection":
            return None
        self.calls += 1
        region = str(request_signer.region_name)
        image_id = str(params["body"]["ImageId"])
        url = str(params.get("url", ""))
        if image_id not in ec2_backends[ACCOUNT][region].amis:
            error = {"Code": "InvalidAMIID.NotFound", "Message": f"The image id '[{image_id}]' does not exist"}
            return AWSResponse(url, 400, {}, _Raw(b"")), {"Error": error, "ResponseMetadata": {}}
        self.protected.add((region, image_id))
        return AWSResponse(url, 200, {}, _Raw(b"")), {"Return": "enabled-without-cooldown", "ResponseMetadata": {}}


class Crashed(Exception):
    """The process "died" here."""


class Crash:
    def __init__(self) -> None:
        self.at: int | None = None
        self.when = "before"
        self.count = 0
        self.crashed: str | None = None
        self._lock = threading.Lock()

    def install(self, events: Any) -> None:
        # First: the protection emulation answers in before-call and stops later handlers.
        events.register_first("before-call", self._before)
        events.register("after-call", self._after)

    def arm(self, at: int, when: str) -> None:
        self.at, self.when, self.count, self.crashed = at, when, 0, None

    def disarm(self) -> None:
        self.at = None

    def _before(self, model: Any, context: dict[str, Any], **_: Any) -> None:
        with self._lock:
            self.count += 1
            index = self.count
        context["crash_index"] = index
        if self.at == index and self.when == "before":
            self.crashed = model.name
            raise Crashed(f"killed before call {index} ({model.name})")

    def _after(self, model: Any, context: dict[str, Any], **_: Any) -> None:
        index = context.get("crash_index")
        if self.at is not None and self.at == index and self.when == "after":
            self.crashed = model.name
            raise Crashed(f"killed after call {index} ({model.name})")
