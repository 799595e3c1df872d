"""What `doctor --aws` asks of AWS that moto 5.2.5 does not answer (or answers unlike AWS), emulated in-process at
moto's response layer, so that every boto3 client in the process — the CLI's included — sees it. Each emulation models
what AWS documents; test_doctor.py checks that each refuses what AWS refuses.

- `DisabledRegions`: moto answers every call in every region, while AWS refuses calls into an opt-in region the account
  has not enabled, with the codes bad credentials get: EC2 `AuthFailure` (HTTP 401), STS `InvalidClientTokenId`
  (403), JSON services such as KMS and Service Quotas `UnrecognizedClientException` (400). Which regions are disabled
  follows moto's own DescribeRegions answer (OptInStatus `not-opted-in`), so the two never disagree; `enable(region)`
  opts the account in (moto then answers `opted-in`).
- `ImageBlockPublicAccess`: GetImageBlockPublicAccessState, EnableImageBlockPublicAccess and
  DisableImageBlockPublicAccess are not implemented by moto. State per account and region; the default is
  `block-new-sharing`, which the EC2 User Guide documents for new accounts ("Block public access for AMIs", default
  settings). Enable accepts only `block-new-sharing` (the API reference's one valid value). `managed_by` can be set
  to `declarative-policy` (an organization's policy; AWS then forbids changing it in the account — not emulated).
  Not emulated either: the up to ten minutes Enable takes to show.
- `EbsDefaultKey`: GetEbsDefaultKmsKeyId / ModifyEbsDefaultKmsKeyId / ResetEbsDefaultKmsKeyId (moto: not
  implemented). Until a key is made the default the answer is `alias/aws/ebs`, the AWS-managed key; Modify answers and
  stores the key's ARN when KMS knows the key (AWS documents that an unknown key "can appear to complete").
- `Ec2Quotas`: moto's Service Quotas knows only the `vpc` service. GetServiceQuota and ListServiceQuotas for `ec2`
  answer from a table of EC2's AMI quotas with their documented defaults (the EC2 User Guide's "AMI quotas"); an
  unknown service or quota code is `NoSuchResourceException`. ListServiceQuotas pages with MaxResults (1–100,
  default 100) and NextToken. `applied` sets an account's value for a code in a region; `extra` lists a further quota
  (for a test of a name look-up; EC2 lists no concurrent-AMI-copies quota that could be found).
- `internet_for_default_vpc`: not an API. AWS's default VPC has an internet gateway and a main route table with
  0.0.0.0/0 to it (VPC User Guide, "Default VPCs"); moto's has neither. A test that wants the AWS default calls it.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

import pytest
from moto.core.responses import ActionResult, BaseResponse
from moto.ec2.exceptions import EC2ClientError
from moto.ec2.models import ec2_backends
from moto.ec2.models.availability_zones_and_regions import RegionsAndZonesBackend
from moto.ec2.responses import EC2Response
from moto.kms.models import kms_backends
from moto.servicequotas.exceptions import NoSuchResource
from moto.servicequotas.models import ServiceQuotasBackend
from moto.servicequotas.responses import ServiceQuotasResponse

ACCOUNT = "123456789012"

# (code, name, default value): EC2's AMI quotas as the EC2 User Guide lists them (per region).
EC2_AMI_QUOTAS: tuple[tuple[str, str, float], ...] = (
    ("L-B665C33B", "AMIs", 50000.0),
    ("L-0E3CBAB9", "Public AMIs", 5.0),
    ("L-70015FFA", "AMI sharing", 1000.0),
)
_QUERY_ERROR = (
    '<?xml version="1.0" encoding="UTF-8"?><Response><Errors><Error><Code>{code}</Code><Message>{message}</Message>'
    "</Error></Errors><RequestID>emulated</RequestID></Response>"
)
_STS_ERROR = (
    "<ErrorResponse><Error><Type>Sender</Type><Code>{code}</Code><Message>{message}</Message></Error>"
    "<RequestId>emulated</RequestId></ErrorResponse>"
)


class DisabledRegions:
    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self._patch = monkeypatch

    def install(self) -> None:
        original = BaseResponse.call_action

        def call_action(resp: Any) -> Any:
            if self.disabled(str(resp.region)):
                return self._refusal(str(resp.service_name))
            return original(resp)

        self._patch.setattr(BaseResponse, "call_action", call_action)

    @staticmethod
    def disabled(region: str) -> bool:
        return any(r.name == region and r.opt_in_status == "not-opted-in" for r in RegionsAndZonesBackend.regions)

    def enable(self, region: str) -> None:
        for known in RegionsAndZonesBackend.regions:
            if known.name == region:
                self._patch.setattr(known, "opt_in_status", "opted-in")  # undone after the test

    @staticmethod
    def _refusal(service: str) -> tuple[int, dict[str, str], str]:
        if service == "ec2":
            message = "AWS was not able to validate the provided access credentials"
            body = _QUERY_ERROR.format(code="AuthFailure", message=message)
            return 401, {"Content-Type": "text/xml"}, body
        if service == "sts":
            message = "The security token included in the request is invalid."
            return 403, {"Content-Type": "text/xml"}, _STS_ERROR.format(code="InvalidClientTokenId", message=message)
        body = json.dumps(
            {
                "__type": "UnrecognizedClientException",
                "message": "The security token included in the request is invalid.",
            }
        )
        return 400, {"Content-Type": "application/x-amz-json-1.1"}, body


class ImageBlockPublicAccess:
    def __init__(self) -> None:
        self.state: dict[tuple[str, str], str] = {}  # (account, region) → state; absent: the new-account default
        self.managed_by: dict[tuple[str, str], str] = {}

    def install(self, monkeypatch: pytest.MonkeyPatch) -> None:
        emulation = self

        def get_image_block_public_access_state(resp: Any) -> ActionResult:
            key = (resp.current_account, resp.region)
            return ActionResult(
                {
                    "ImageBlockPublicAccessState": emulation.state.get(key, "block-new-sharing"),
                    "ManagedBy": emulation.managed_by.get(key, "account"),
                }
            )

        def enable_image_block_public_access(resp: Any) -> ActionResult:
            wanted = resp._get_param("ImageBlockPublicAccessState")
            if wanted != "block-new-sharing":
                raise EC2ClientError(
                    "InvalidParameterValue", f"Value ({wanted}) for parameter ImageBlockPublicAccessState is invalid"
                )
            emulation.state[(resp.current_account, resp.region)] = "block-new-sharing"
            return ActionResult({"ImageBlockPublicAccessState": "block-new-sharing"})

        def disable_image_block_public_access(resp: Any) -> ActionResult:
            emulation.state[(resp.current_account, resp.region)] = "unblocked"
            return ActionResult({"ImageBlockPublicAccessState": "unblocked"})

        for method in (
            get_image_block_public_access_state,
            enable_image_block_public_access,
            disable_image_block_public_access,
        ):
            monkeypatch.setattr(EC2Response, method.__name__, method, raising=False)


class EbsDefaultKey:
    def __init__(self) -> None:
        self.keys: dict[tuple[str, str], str] = {}  # (account, region) → the default key's ARN

    def install(self, monkeypatch: pytest.MonkeyPatch) -> None:
        emulation = self

        def get_ebs_default_kms_key_id(resp: Any) -> ActionResult:
            return ActionResult({"KmsKeyId": emulation.keys.get((resp.current_account, resp.region), "alias/aws/ebs")})

        def modify_ebs_default_kms_key_id(resp: Any) -> ActionResult:
            wanted = str(resp._get_param("KmsKeyId"))
            kms = kms_backends[resp.current_account][resp.region]
            try:
                arn = str(kms.describe_key(wanted).arn)
            except Exception:  # moto's NotFoundException: AWS may accept it now and fail later
                arn = wanted
            emulation.keys[(resp.current_account, resp.region)] = arn
            return ActionResult({"KmsKeyId": arn})

        def reset_ebs_default_kms_key_id(resp: Any) -> ActionResult:
            emulation.keys.pop((resp.current_account, resp.region), None)
            return ActionResult({"KmsKeyId": "alias/aws/ebs"})

        for method in (get_ebs_default_kms_key_id, modify_ebs_default_kms_key_id, reset_ebs_default_kms_key_id):
            monkeypatch.setattr(EC2Response, method.__name__, method, raising=False)


class Ec2Quotas:
    def __init__(self) -> None:
        self.applied: dict[tuple[str, str, str], float] = {}  # (account, region, code) → value
        self.extra: list[tuple[str, str, float]] = []

    def table(self) -> tuple[tuple[str, str, float], ...]:
        return (*EC2_AMI_QUOTAS, *self.extra)

    def quota(self, account: str, region: str, code: str) -> dict[str, Any]:
        for known, name, default in self.table():
            if known == code:
                return {
                    "ServiceCode": "ec2",
                    "ServiceName": "Amazon Elastic Compute Cloud (Amazon EC2)",
                    "QuotaArn": f"arn:aws:servicequotas:{region}:{account}:ec2/{code}",
                    "QuotaCode": code,
                    "QuotaName": name,
                    "Value": self.applied.get((account, region, code), default),
                    "Unit": "None",
                    "Adjustable": True,
                    "GlobalQuota": False,
                }
        raise NoSuchResource

    def install(self, monkeypatch: pytest.MonkeyPatch) -> None:
        emulation = self
        original: Callable[..., dict[str, Any]] = ServiceQuotasBackend.get_service_quota

        def get_service_quota(backend: Any, service_code: str, quota_code: str) -> dict[str, Any]:
            if service_code != "ec2":
                return original(backend, service_code, quota_code)
            return emulation.quota(backend.account_id, backend.region_name, quota_code)

        def list_service_quotas(resp: Any) -> str:
            params = json.loads(resp.body)
            if params.get("ServiceCode") != "ec2":
                raise NoSuchResource
            size = int(params.get("MaxResults", 100))
            if not 1 <= size <= 100:
                raise NoSuchResource  # AWS: a validation error; the model refuses it before a request is made
            start = int(params.get("NextToken") or 0)
            codes = [code for code, _name, _default in emulation.table()]
            page = [emulation.quota(resp.current_account, resp.region, c) for c in codes[start : start + size]]
            answer: dict[str, Any] = {"Quotas": page}
            if start + size < len(codes):
                answer["NextToken"] = str(start + size)
            return json.dumps(answer)

        monkeypatch.setattr(ServiceQuotasBackend, "get_service_quota", get_service_quota)
        monkeypatch.setattr(ServiceQuotasResponse, "list_service_quotas", list_service_quotas, raising=False)


def internet_for_default_vpc(ec2: Any) -> str:
    """Give moto's default VPC what AWS's has: an internet gateway and a main route table with 0.0.0.0/0 to it."""
    vpc = ec2.describe_vpcs(Filters=[{"Name": "isDefault", "Values": ["true"]}])["Vpcs"][0]["VpcId"]
    gateway = ec2.create_internet_gateway()["InternetGateway"]["InternetGatewayId"]
    ec2.attach_internet_gateway(InternetGatewayId=gateway, VpcId=vpc)
    main = ec2.describe_route_tables(
        Filters=[{"Name": "vpc-id", "Values": [vpc]}, {"Name": "association.main", "Values": ["true"]}]
    )["RouteTables"][0]["RouteTableId"]
    ec2.create_route(RouteTableId=main, DestinationCidrBlock="0.0.0.0/0", GatewayId=gateway)
    return str(vpc)


def pending(region: str, image_id: str, account: str = ACCOUNT) -> None:
    """Put an image of moto's back to `pending` (moto makes every image available at once): a copy in flight."""
    ec2_backends[account][region].amis[image_id].state = "pending"


class DoctorEmulation:
    """All of the above, installed together."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.regions = DisabledRegions(monkeypatch)
        self.public_access = ImageBlockPublicAccess()
        self.ebs_key = EbsDefaultKey()
        self.quotas = Ec2Quotas()
        self.regions.install()
        self.public_access.install(monkeypatch)
        self.ebs_key.install(monkeypatch)
        self.quotas.install(monkeypatch)
