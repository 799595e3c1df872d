"""What distribute.py needs from EC2 that moto 5.2.5 lacks, emulated in-process, plus a crash injector.

- `CopyImageEmulation`: moto's CopyImage ignores ClientToken (two calls make two images), TagSpecifications,
  Encrypted and KmsKeyId. The emulation wraps moto's response method: the same token in the same account and region
  answers the same image id (as EC2 does; a different request under a reused token is IdempotentParameterMismatch),
  TagSpecifications for `image` are applied at creation (`honour_tags=False` turns that off, to prove the ClientToken
  alone prevents duplicates), and the requested encryption is recorded in `encryption` (image id → KmsKeyId), since
  moto's copy is never encrypted.
- `DeregistrationProtection`: EnableImageDeregistrationProtection raises NotImplementedError in moto. A `before-call`
  handler answers it instead (after checking the image exists in moto) and records the protected images. It sits on
  the generic `before-call` event after ApiCalls and Crash, so the call is still counted and can still be crashed.
- `Crash`: raises `Crashed` at the K-th API call, either before it is made (`when="before"`: the call never happens)
  or after AWS did it but before the caller sees the answer (`when="after"`: the side effect happened, the answer is
  lost) — a process killed between two lines.
"""

from __future__ import annotations

import threading
from typing import Any, cast

import pytest
from botocore.awsrequest import AWSResponse
from moto.core.responses import ActionResult
from moto.ec2.exceptions import EC2ClientError
from moto.ec2.models import ec2_backends
from moto.ec2.responses.amis import AmisResponse
from moto_emulation import _Raw

ACCOUNT = "123456789012"


class CopyImageEmulation:
    def __init__(self) -> None:
        self.honour_tags = True
        self.encryption: dict[str, str | None] = {}
        self._tokens: dict[tuple[str, str, str], tuple[str, str]] = {}
        self._lock = threading.Lock()

    def install(self, monkeypatch: pytest.MonkeyPatch) -> None:
        emulation = self
        original = AmisResponse.copy_image

        def copy_image(resp: Any) -> ActionResult:
            token = resp._get_param("ClientToken")
            request = repr(
                (resp._get_param("SourceImageId"), resp._get_param("SourceRegion"), resp._get_param("KmsKeyId"))
            )
            key = (resp.current_account, resp.region, str(token))
            with emulation._lock:
                if token and key in emulation._tokens:
                    earlier_request, image_id = emulation._tokens[key]
                    if earlier_request != request:
                        raise EC2ClientError("IdempotentParameterMismatch", "token reused for another request")
                    return ActionResult({"ImageId": image_id})
                result = original(resp)
                image_id = str(cast(dict[str, Any], result.result)["ImageId"])
                if token:
                    emulation._tokens[key] = (request, image_id)
                emulation.encryption[image_id] = resp._get_param("KmsKeyId") if resp._get_param("Encrypted") else None
                if emulation.honour_tags:
                    for resource_type, tags in resp._parse_tag_specification().items():
                        assert resource_type == "image", resource_type
                        resp.ec2_backend.create_tags([image_id], tags)
                return result

        monkeypatch.setattr(AmisResponse, "copy_image", copy_image)


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
