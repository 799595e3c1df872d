"""What retire asks of EC2 that moto 5.2.5 does not implement, emulated in-process (tested in test_retire_aws.py).

Each models what the EC2 API reference and User Guide document:

- **Deprecation** (EnableImageDeprecation, DisableImageDeprecation): DescribeImages then shows `DeprecationTime`,
  rounded to the minute ("If you specify a value for seconds, Amazon EC2 rounds the seconds to the nearest minute");
  a time in the past is refused ("You can't specify a date in the past"), as is an unknown image.
- **Deregistration protection** (Enable/DisableImageDeregistrationProtection): DescribeImages shows
  `DeregistrationProtection` as `enabled-without-cooldown` / `enabled-with-cooldown`, and, once protection with a
  cool-down is lifted, `disabled after <time>` for the 24 hours EC2 still refuses the deregistration (the value's
  form is the one aws-nuke, a public AMI cleaner, parses: AWS's reference gives none). DeregisterImage is refused
  while protection holds. ASSUMPTION: the error code of that refusal, which the reference does not list
  (`OperationNotPermitted` here; amiforge never relies on it: it lifts protection first and waits out a cool-down).
- **Recycle Bin**: the rbin service's CreateRule/ListRules for EC2_IMAGE (answered in botocore's `before-call` of the
  given session: moto has no rbin at all: ListRules lists region-level rules, or with ResourceTags the tag-level ones
  for those tags), a region-level rule (no resource tags) or a tag-level one; a DeregisterImage
  an available rule covers moves the image into the bin for the rule's retention instead of deleting it;
  ListImagesInRecycleBin and RestoreImageFromRecycleBin (an image past its retention is gone for good).
- **Allowed AMIs** (GetAllowedImagesSettings, EnableAllowedImagesSettings): per account and region, `disabled` until
  enabled (`enabled` or `audit-mode`, the two states Enable accepts), with the criteria a test sets.
- **DescribeImageReferences** answers `InvalidAction`, as a region that does not offer it (retire then notes that
  and relies on its own sources).
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from botocore.awsrequest import AWSResponse
from moto.core.responses import ActionResult
from moto.ec2.exceptions import EC2ClientError
from moto.ec2.models import ec2_backends
from moto.ec2.responses import EC2Response
from moto.ec2.responses.amis import AmisResponse

COOLDOWN = timedelta(hours=24)


def _stamp(moment: datetime) -> str:
    return moment.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


@dataclass
class Binned:
    ami: Any
    entered: datetime
    until: datetime


@dataclass
class ImageLifecycle:
    now: Callable[[], datetime] = lambda: datetime.now(UTC)
    rules: dict[tuple[str, str], list[dict[str, Any]]] = field(default_factory=dict)  # (account, region) → rules
    bin: dict[tuple[str, str, str], Binned] = field(default_factory=dict)  # (account, region, image) → entry
    cooldowns: dict[tuple[str, str, str], datetime] = field(default_factory=dict)  # … → protection holds until
    allowed: dict[tuple[str, str], tuple[str, list[dict[str, Any]]]] = field(default_factory=dict)  # state, criteria

    def install(self, monkeypatch: pytest.MonkeyPatch, events: Any) -> None:
        emulation = self
        deregister = AmisResponse.deregister_image

        def ami_of(resp: Any) -> Any:
            image = str(resp._get_param("ImageId"))
            ami = resp.ec2_backend.amis.get(image)
            if ami is None:
                raise EC2ClientError("InvalidAMIID.NotFound", f"The image id '[{image}]' does not exist")
            return ami

        def enable_image_deprecation(resp: Any) -> ActionResult:
            ami = ami_of(resp)
            when = datetime.fromisoformat(str(resp._get_param("DeprecateAt")).replace("Z", "+00:00"))
            when = when.replace(tzinfo=UTC) if when.tzinfo is None else when  # EC2 times are UTC
            if when < emulation.now() - timedelta(minutes=1):
                raise EC2ClientError("InvalidParameterValue", "DeprecateAt can't be a date in the past")
            rounded = (when + timedelta(seconds=30)).replace(second=0, microsecond=0)
            ami.deprecation_time = _stamp(rounded)
            return ActionResult({"Return": True})

        def disable_image_deprecation(resp: Any) -> ActionResult:
            ami_of(resp).deprecation_time = None
            return ActionResult({"Return": True})

        def enable_image_deregistration_protection(resp: Any) -> ActionResult:
            ami = ami_of(resp)
            cooldown = str(resp._get_param("WithCooldown")).lower() == "true"
            ami.deregistration_protection = "enabled-with-cooldown" if cooldown else "enabled-without-cooldown"
            return ActionResult({"Return": ami.deregistration_protection})

        def disable_image_deregistration_protection(resp: Any) -> ActionResult:
            ami = ami_of(resp)
            if getattr(ami, "deregistration_protection", None) == "enabled-with-cooldown":
                until = emulation.now() + COOLDOWN
                emulation.cooldowns[(resp.current_account, resp.region, ami.id)] = until
                ami.deregistration_protection = f"disabled after {_stamp(until)}"
            else:
                ami.deregistration_protection = "disabled"
            return ActionResult({"Return": "disabled"})

        def deregister_image(resp: Any) -> ActionResult:
            ami = resp.ec2_backend.amis.get(str(resp._get_param("ImageId")))
            if ami is not None:
                key = (resp.current_account, resp.region, ami.id)
                protection = str(getattr(ami, "deregistration_protection", None) or "disabled")
                cooling = emulation.cooldowns.get(key)
                if protection.startswith("enabled") or (cooling is not None and emulation.now() < cooling):
                    raise EC2ClientError(
                        "OperationNotPermitted", f"Image {ami.id} has deregistration protection: {protection}"
                    )
                rule = emulation._covering(resp.current_account, resp.region, ami)
                if rule is not None:
                    days = int(rule["RetentionPeriod"]["RetentionPeriodValue"])
                    entered = emulation.now()
                    emulation.bin[key] = Binned(ami, entered, entered + timedelta(days=days))
            return deregister(resp)

        def list_images_in_recycle_bin(resp: Any) -> ActionResult:
            wanted = set(resp._get_param("ImageIds", []))
            images = [
                {"ImageId": image, "Name": b.ami.name, "Description": b.ami.description or "",
                 "RecycleBinEnterTime": _stamp(b.entered), "RecycleBinExitTime": _stamp(b.until)}
                for (account, region, image), b in sorted(emulation.bin.items())
                if account == resp.current_account and region == resp.region and (not wanted or image in wanted)
                and b.until > emulation.now()
            ]  # fmt: skip
            return ActionResult({"Images": images})

        def restore_image_from_recycle_bin(resp: Any) -> ActionResult:
            key = (resp.current_account, resp.region, str(resp._get_param("ImageId")))
            binned = emulation.bin.get(key)
            if binned is None or binned.until <= emulation.now():
                raise EC2ClientError("InvalidAMIID.NotFound", f"The image id '[{key[2]}]' is not in the Recycle Bin")
            del emulation.bin[key]
            backend = ec2_backends[key[0]][key[1]]
            backend.amis[binned.ami.id] = binned.ami
            if binned.ami.id in backend.deleted_amis:
                backend.deleted_amis.remove(binned.ami.id)
            return ActionResult({"Return": True})

        def get_allowed_images_settings(resp: Any) -> ActionResult:
            state, criteria = emulation.allowed.get((resp.current_account, resp.region), ("disabled", []))
            return ActionResult({"State": state, "ImageCriteria": criteria, "ManagedBy": "account"})

        def enable_allowed_images_settings(resp: Any) -> ActionResult:
            state = str(resp._get_param("AllowedImagesSettingsState"))
            if state not in ("enabled", "audit-mode"):
                raise EC2ClientError("InvalidParameterValue", f"Value ({state}) for AllowedImagesSettingsState")
            key = (resp.current_account, resp.region)
            emulation.allowed[key] = (state, emulation.allowed.get(key, ("", []))[1])
            return ActionResult({"AllowedImagesSettingsState": state})

        def describe_image_references(resp: Any) -> ActionResult:
            raise EC2ClientError(
                "InvalidAction", "The action DescribeImageReferences is not valid for this web service."
            )

        for method in (enable_image_deprecation, disable_image_deprecation, enable_image_deregistration_protection,
                       disable_image_deregistration_protection, list_images_in_recycle_bin,
                       restore_image_from_recycle_bin, describe_image_references, get_allowed_images_settings,
                       enable_allowed_images_settings):  # fmt: skip
            monkeypatch.setattr(EC2Response, method.__name__, method, raising=False)
        monkeypatch.setattr(AmisResponse, "deregister_image", deregister_image)
        monkeypatch.setattr(EC2Response, "deregister_image", deregister_image)
        # On the generic event, after the call recorders: a handler of `before-call.rbin` would answer before them.
        events.register("before-call", self._rbin)

    def _covering(self, account: str, region: str, ami: Any) -> dict[str, Any] | None:
        tags = {str(t["key"]): str(t["value"]) for t in ami.get_tags()}
        for rule in self.rules.get((account, region), []):
            wanted = rule.get("ResourceTags") or []
            if not wanted or any(tags.get(t["ResourceTagKey"]) == t.get("ResourceTagValue") for t in wanted):
                return rule
        return None

    def _rbin(
        self, model: Any, params: dict[str, Any], request_signer: Any, **_: Any
    ) -> tuple[AWSResponse, Any] | None:
        if model.service_model.service_name != "rbin":
            return None
        region = str(request_signer.region_name)
        body = params["body"] if isinstance(params.get("body"), dict) else json.loads(params.get("body") or b"{}")
        key = ("123456789012", region)
        url = str(params.get("url", ""))
        if model.name == "CreateRule":
            if body.get("ResourceType") not in ("EBS_SNAPSHOT", "EC2_IMAGE"):
                return _error(url, "ValidationException", "ResourceType must be EBS_SNAPSHOT or EC2_IMAGE")
            rule = {
                "Identifier": uuid.uuid4().hex[:11], "ResourceType": body["ResourceType"],
                "RetentionPeriod": body["RetentionPeriod"], "ResourceTags": body.get("ResourceTags", []),
                "Status": "available", "LockState": "unlocked",
            }  # fmt: skip
            self.rules.setdefault(key, []).append(rule)
            return AWSResponse(url, 201, {}, None), {**rule, "ResponseMetadata": {}}
        if model.name == "ListRules":
            # ASSUMPTION (the reference says ResourceTags is "[Tag-level retention rules only]"): without it, the
            # region-level rules; with it, the tag-level rules for those tags.
            wanted = body.get("ResourceTags") or []
            rules = [
                r
                for r in self.rules.get(key, [])
                if r["ResourceType"] == body.get("ResourceType")
                and (all(t in r["ResourceTags"] for t in wanted) if wanted else not r["ResourceTags"])
            ]
            listed = [{k: r[k] for k in ("Identifier", "RetentionPeriod", "LockState")} for r in rules]
            return AWSResponse(url, 200, {}, None), {"Rules": listed, "ResponseMetadata": {}}
        return _error(url, "ValidationException", f"{model.name} is not emulated")


def _error(url: str, code: str, message: str) -> tuple[AWSResponse, Any]:
    return AWSResponse(url, 400, {}, None), {"Error": {"Code": code, "Message": message}, "ResponseMetadata": {}}
