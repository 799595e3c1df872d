"""doctor --aws under moto: identity, regions, a policy that covers what the report itself calls, and the day-one
checks — regions enabled (the home region's too), placement, the source image, SSM reachability and instance profile
or SSH reachability and ingress, EBS encryption by default (and what a copy region without a kms_key inherits), KMS key
policies, image block public access, quotas — each a line with its fix. doctor_emulation.py stands in for what moto
lacks (tested below to refuse what AWS refuses)."""

from __future__ import annotations

import json
from collections import Counter
from typing import Any

import pytest
from botocore.awsrequest import AWSResponse
from botocore.exceptions import ClientError
from conftest import ACCOUNT, REGION, Aws
from doctor_emulation import DoctorEmulation, internet_for_default_vpc, pending
from moto.ec2.models import ec2_backends
from moto.kms.models import kms_backends
from moto_emulation import _Raw

from amiforge.awsapi.clients import AwsSession, call, iam_action
from amiforge.awsapi.errors import aws_code
from amiforge.errors import ConfigError, NotFound
from amiforge.providers.aws.doctor import DEFAULT_HOME_REGION, PUBLIC_AMIS_QUOTA, aws_report, home_region
from amiforge.providers.aws.iam import PERMISSIONS, actions_for
from amiforge.providers.interface import AccountCheck, AccountReport
from amiforge.recipe import AwsProvider as AwsSpec

DISABLED = "ap-east-1"  # an opt-in region moto lists as not-opted-in
COPY = "eu-central-1"
RECEIVER = "111122223333"
ORG = "arn:aws:organizations::999988887777:organization/o-abcdefghij"
SOURCE = {"owners": [ACCOUNT], "name": "debian-12-*"}  # an image `online` makes in the bake region
ENCRYPTED_SOURCE = {"owners": [ACCOUNT], "name": "debian-13-*"}  # tests make it with source_image(encrypted_under=)


@pytest.fixture
def emulation(monkeypatch: pytest.MonkeyPatch, aws: Aws) -> DoctorEmulation:
    return DoctorEmulation(monkeypatch)


@pytest.fixture
def calls(aws: Aws) -> RegionCalls:
    """Registered before any client exists (a client copies the session's handlers when it is made)."""
    return RegionCalls(aws)


@pytest.fixture
def online(aws: Aws, emulation: DoctorEmulation, calls: RegionCalls) -> Aws:
    """Default VPCs as AWS makes them (an internet gateway and a route to it) in the bake and copy regions, and the
    recipes' source image (unencrypted) in the bake region."""
    for region in (REGION, COPY):
        internet_for_default_vpc(aws.ec2(region))
    source_image(aws, "debian-12-20240501")
    return aws


def source_image(aws: Aws, name: str, *, encrypted_under: str | None = None) -> str:
    """An image of this account in the bake region; `encrypted_under`: its snapshot is encrypted under that key (moto
    reports no Encrypted on an image's mappings, so doctor reads the snapshot, as it does where EC2 leaves it out)."""
    ec2 = aws.ec2()
    instance = ec2.run_instances(ImageId="ami-12345678", MinCount=1, MaxCount=1)["Instances"][0]["InstanceId"]
    image_id = str(ec2.create_image(InstanceId=instance, Name=name)["ImageId"])
    if encrypted_under is not None:
        snapshot = ec2_backends[ACCOUNT][REGION].amis[image_id].ebs_snapshot
        snapshot.encrypted, snapshot.kms_key_id = True, encrypted_under
    return image_id


class RegionCalls:
    """Every API call by (region, service, operation): `before-call` fires once per call."""

    def __init__(self, aws: Aws) -> None:
        self.session = aws.session
        self.counts: Counter[tuple[str, str, str]] = Counter()
        aws.session.boto_session.events.register("before-call", self._seen)

    def _seen(self, model: Any, request_signer: Any, **_: Any) -> None:
        self.counts[(str(request_signer.region_name), model.service_model.service_name, model.name)] += 1

    @property
    def actions(self) -> set[str]:
        """The IAM actions called (as a permission error would name them)."""
        return {iam_action(self.session.client(service), operation) for _r, service, operation in self.counts}

    def regions(self) -> set[str]:
        return {region for region, _service, _operation in self.counts}

    def reset(self) -> None:
        self.counts.clear()


def spec(**aws: Any) -> AwsSpec:
    return AwsSpec.model_validate({"type": "aws", "region": REGION, "source": SOURCE, **aws})


def key(aws: Aws, region: str, policy: dict[str, Any] | None = None) -> str:
    kms = aws.session.client("kms", region)
    arn = str(kms.create_key(Description="ebs")["KeyMetadata"]["Arn"])
    if policy is not None:
        kms.put_key_policy(KeyId=arn.rsplit("/", 1)[1], PolicyName="default", Policy=json.dumps(policy))
    return arn


def share_policy(*accounts: str, condition: dict[str, Any] | None = None, principal: Any = None) -> dict[str, Any]:
    """The owner's statement and one for the receivers, as the EBS User Guide's key-sharing page describes."""
    statement: dict[str, Any] = {
        "Sid": "receivers",
        "Effect": "Allow",
        "Principal": principal or {"AWS": [f"arn:aws:iam::{a}:root" for a in accounts]},
        "Action": ["kms:DescribeKey", "kms:CreateGrant", "kms:Decrypt", "kms:GenerateDataKey*", "kms:ReEncrypt*"],
        "Resource": "*",
    }
    if condition is not None:
        statement["Condition"] = condition
    owner = {
        "Effect": "Allow",
        "Principal": {"AWS": f"arn:aws:iam::{ACCOUNT}:root"},
        "Action": "kms:*",
        "Resource": "*",
    }
    return {"Version": "2012-10-17", "Statement": [owner, statement]}


def named(report: AccountReport | list[AccountCheck], name: str, region: str | None = None) -> AccountCheck:
    checks = report.checks if isinstance(report, AccountReport) else report
    [found] = [c for c in checks if c.name == name and (region is None or c.region == region)]
    return found


def statuses(report: AccountReport) -> dict[tuple[str, str | None], str]:
    return {(c.name, c.region): c.status for c in report.checks}


# --- the report and its calls --------------------------------------------------------------------------------------


def test_report_names_the_account_regions_and_a_policy_that_covers_its_own_calls(
    online: Aws, calls: RegionCalls
) -> None:
    calls.reset()
    report = aws_report(online.session)
    assert report.account.isdigit() and len(report.account) == 12
    assert report.arn.startswith("arn:aws:")
    assert report.region == REGION and REGION in report.regions and "us-east-1" in report.regions
    assert DISABLED not in report.regions  # only the regions the account can use
    assert calls.actions <= actions_for(["doctor"])
    statements = report.policy["Statement"]
    granted = {a for s in statements for a in ([s["Action"]] if isinstance(s["Action"], str) else s["Action"])}
    assert actions_for(["distribute", "publish", "sign-kms", "doctor"]) <= granted
    assert report.policy["Version"] == "2012-10-17"
    # Without a recipe: the home region's checks, and the rest say how to get them.
    assert statuses(report) == {
        ("region enabled", REGION): "ok",
        ("placement", REGION): "ok",
        ("SSM reachability", REGION): "ok",
        ("SSM instance profile", None): "skipped",
        ("source image", None): "skipped",
        ("EBS encryption by default", REGION): "ok",
        ("KMS key policy", None): "skipped",
        ("image block public access", None): "skipped",
        ("public AMIs quota", None): "skipped",
        ("concurrent AMI copies", None): "skipped",
    }
    assert "--recipe" in named(report, "KMS key policy").detail


def test_every_declared_doctor_action_is_called_and_nothing_else(
    online: Aws, emulation: DoctorEmulation, calls: RegionCalls
) -> None:
    """Two recipes between them reach every check (public sharing and encrypted shares exclude each other): one
    public, from an SSM parameter, over SSH; one shared, from an encrypted image of the account."""
    emulation.public_access.state[(ACCOUNT, REGION)] = "unblocked"
    online.session.client("ec2", COPY).enable_ebs_encryption_by_default()
    online.session.client("ssm").put_parameter(Name="/src/debian", Value=source_image(online, "plain"), Type="String")
    source_image(online, "debian-13-20250101", encrypted_under=key(online, REGION, share_policy(RECEIVER)))
    shared = {
        "regions": [{"region": COPY, "kms_key": key(online, COPY, share_policy(RECEIVER))}],
        "accounts": [RECEIVER],
    }
    subnet, ssh = _subnet(online), _ssh(online)
    public = spec(
        source={"ssm_parameter": "/src/debian"},
        root_volume={"encrypted": True},  # under the default key, which cannot be public
        distribution={"regions": [{"region": COPY}], "public": True},
        **ssh,
    )
    calls.reset()
    aws_report(online.session, public)
    aws_report(online.session, spec(source=ENCRYPTED_SOURCE, subnet_id=subnet, distribution=shared))
    assert calls.actions == PERMISSIONS["doctor"]


def _subnet(aws: Aws, region: str = REGION, *, public_ip: bool = False) -> str:
    ec2 = aws.ec2(region)
    vpc = ec2.describe_vpcs(Filters=[{"Name": "isDefault", "Values": ["true"]}])["Vpcs"][0]["VpcId"]
    subnet = ec2.create_subnet(VpcId=vpc, CidrBlock="172.31.200.0/24")["Subnet"]["SubnetId"]
    ec2.modify_subnet_attribute(SubnetId=subnet, MapPublicIpOnLaunch={"Value": public_ip})
    return str(subnet)


# --- regions ---------------------------------------------------------------------------------------------------------


def test_a_disabled_distribution_region_fails_by_name_and_is_never_called(
    online: Aws, emulation: DoctorEmulation, calls: RegionCalls
) -> None:
    calls.reset()
    recipe = spec(distribution={"regions": [{"region": DISABLED}], "public": True})
    report = aws_report(online.session, recipe)
    check = named(report, "region enabled", DISABLED)
    assert check.status == "fail"
    assert "opt-in region" in check.detail and "not enabled" in check.detail and "credentials" in check.detail
    assert check.fix is not None and f"enable {DISABLED}" in check.fix
    for name in (
        "EBS encryption by default",
        "image block public access",
        "public AMIs quota",
        "concurrent AMI copies",
    ):
        assert named(report, name, DISABLED).status == "skipped"
    assert DISABLED not in calls.regions()  # AWS would answer every call there as bad credentials
    emulation.regions.enable(DISABLED)
    assert named(aws_report(online.session, recipe), "region enabled", DISABLED).status == "ok"


def test_a_region_the_partition_does_not_have_fails(online: Aws) -> None:
    report = aws_report(online.session, spec(distribution={"regions": [{"region": "eu-nowhere-9"}]}))
    check = named(report, "region enabled", "eu-nowhere-9")
    assert check.status == "fail" and check.fix is not None and "describe-regions" in check.fix


def test_a_call_into_a_disabled_region_names_the_region_not_only_the_credentials(aws: Aws, emulation: Any) -> None:
    for service, operation, kwargs in (
        ("ec2", "DescribeImages", {"Owners": ["self"]}),
        ("kms", "ListKeys", {}),
        ("service-quotas", "GetServiceQuota", {"ServiceCode": "ec2", "QuotaCode": PUBLIC_AMIS_QUOTA}),
    ):
        with pytest.raises(ConfigError) as refused:
            call(aws.session.client(service, DISABLED), operation, "something", **kwargs)
        assert refused.value.fix is not None
        assert "enable it for the account" in refused.value.fix and "credentials" in refused.value.fix, service


# --- the emulations refuse what AWS refuses --------------------------------------------------------------------------


def test_emulation_disabled_regions_answer_like_bad_credentials(aws: Aws, emulation: DoctorEmulation) -> None:
    with pytest.raises(ClientError) as ec2:
        aws.session.client("ec2", DISABLED).describe_images(Owners=["self"])
    assert ec2.value.response["Error"]["Code"] == "AuthFailure"
    assert ec2.value.response["ResponseMetadata"]["HTTPStatusCode"] == 401
    with pytest.raises(ClientError) as kms:
        aws.session.client("kms", DISABLED).list_keys()
    assert kms.value.response["Error"]["Code"] == "UnrecognizedClientException"
    emulation.regions.enable(DISABLED)
    assert aws.session.client("ec2", DISABLED).describe_images(Owners=["self"])["Images"] == []


def test_emulation_block_public_access_refuses_a_state_other_than_block_new_sharing(
    aws: Aws, emulation: DoctorEmulation
) -> None:
    ec2 = aws.ec2()
    assert ec2.get_image_block_public_access_state()["ImageBlockPublicAccessState"] == "block-new-sharing"
    with pytest.raises(ClientError) as refused:
        ec2.enable_image_block_public_access(ImageBlockPublicAccessState="unblocked")
    assert refused.value.response["Error"]["Code"] == "InvalidParameterValue"
    assert ec2.disable_image_block_public_access()["ImageBlockPublicAccessState"] == "unblocked"
    assert ec2.get_image_block_public_access_state()["ImageBlockPublicAccessState"] == "unblocked"
    ec2.enable_image_block_public_access(ImageBlockPublicAccessState="block-new-sharing")
    assert ec2.get_image_block_public_access_state()["ImageBlockPublicAccessState"] == "block-new-sharing"


def test_emulation_ebs_default_key_is_aws_managed_until_one_is_set(aws: Aws, emulation: DoctorEmulation) -> None:
    ec2 = aws.ec2()
    assert ec2.get_ebs_default_kms_key_id()["KmsKeyId"] == "alias/aws/ebs"
    arn = key(aws, REGION)
    assert ec2.modify_ebs_default_kms_key_id(KmsKeyId=arn.rsplit("/", 1)[1])["KmsKeyId"] == arn
    assert ec2.get_ebs_default_kms_key_id()["KmsKeyId"] == arn
    assert aws.ec2(COPY).get_ebs_default_kms_key_id()["KmsKeyId"] == "alias/aws/ebs"  # per region
    ec2.reset_ebs_default_kms_key_id()
    assert ec2.get_ebs_default_kms_key_id()["KmsKeyId"] == "alias/aws/ebs"


def test_emulation_quotas_refuse_an_unknown_code_or_service_and_page(aws: Aws, emulation: DoctorEmulation) -> None:
    quotas = aws.session.client("service-quotas")
    public = quotas.get_service_quota(ServiceCode="ec2", QuotaCode=PUBLIC_AMIS_QUOTA)["Quota"]
    assert (public["QuotaName"], public["Value"]) == ("Public AMIs", 5.0)
    for service, code in (("ec2", "L-00000000"), ("no-such-service", PUBLIC_AMIS_QUOTA)):
        with pytest.raises(ClientError) as refused:
            quotas.get_service_quota(ServiceCode=service, QuotaCode=code)
        assert refused.value.response["Error"]["Code"] == "NoSuchResourceException"
    with pytest.raises(ClientError) as unlisted:
        quotas.list_service_quotas(ServiceCode="no-such-service")
    assert unlisted.value.response["Error"]["Code"] == "NoSuchResourceException"
    first = quotas.list_service_quotas(ServiceCode="ec2", MaxResults=2)
    rest = quotas.list_service_quotas(ServiceCode="ec2", MaxResults=2, NextToken=first["NextToken"])
    assert [q["QuotaCode"] for q in first["Quotas"] + rest["Quotas"]] == ["L-B665C33B", "L-0E3CBAB9", "L-70015FFA"]
    assert "NextToken" not in rest
    # The error table knows Service Quotas' "no such quota".
    with pytest.raises(NotFound):
        call(quotas, "GetServiceQuota", "quota", ServiceCode="ec2", QuotaCode="L-00000000")


# --- placement and SSM reachability -----------------------------------------------------------------------------------


def test_no_default_vpc_fails_with_a_recipe_and_warns_without(online: Aws) -> None:
    ec2 = online.ec2()
    vpc = ec2.describe_vpcs(Filters=[{"Name": "isDefault", "Values": ["true"]}])["Vpcs"][0]["VpcId"]
    for subnet in ec2.describe_subnets(Filters=[{"Name": "vpc-id", "Values": [vpc]}])["Subnets"]:
        ec2.delete_subnet(SubnetId=subnet["SubnetId"])
    for gateway in ec2.describe_internet_gateways()["InternetGateways"]:
        ec2.detach_internet_gateway(InternetGatewayId=gateway["InternetGatewayId"], VpcId=vpc)
    ec2.delete_vpc(VpcId=vpc)
    check = named(aws_report(online.session, spec()), "placement")
    assert check.status == "fail" and "no default VPC" in check.detail
    assert check.fix is not None and "subnet_id" in check.fix and "create-default-vpc" in check.fix
    assert named(aws_report(online.session), "placement").status == "warn"


def test_a_subnet_that_does_not_exist_fails(online: Aws) -> None:
    check = named(aws_report(online.session, spec(subnet_id="subnet-00000000000000bad")), "placement")
    assert check.status == "fail" and "subnet-00000000000000bad does not exist" in check.detail


def test_ssm_reachability_of_a_private_subnet(online: Aws) -> None:
    """No way out fails; a NAT gateway, or the three interface endpoints with private DNS, make it reachable."""
    ec2 = online.ec2()
    subnet = _subnet(online)
    vpc = ec2.describe_subnets(SubnetIds=[subnet])["Subnets"][0]["VpcId"]
    table = ec2.create_route_table(VpcId=vpc)["RouteTable"]["RouteTableId"]
    ec2.associate_route_table(RouteTableId=table, SubnetId=subnet)
    recipe = spec(subnet_id=subnet)
    check = named(aws_report(online.session, recipe), "SSM reachability")
    assert check.status == "fail" and f"subnet {subnet} has no route to the internet" in check.detail
    assert check.fix is not None and f"com.amazonaws.{REGION}.ssm" in check.fix and "NAT" in check.fix

    endpoints = []
    for service in ("ssm", "ssmmessages"):
        endpoints.append(
            ec2.create_vpc_endpoint(
                VpcId=vpc, ServiceName=f"com.amazonaws.{REGION}.{service}", VpcEndpointType="Interface",
                SubnetIds=[subnet], PrivateDnsEnabled=True,
            )["VpcEndpoint"]["VpcEndpointId"]
        )  # fmt: skip
    check = named(aws_report(online.session, recipe), "SSM reachability")
    assert check.status == "fail" and "endpoints only for ssm, ssmmessages" in check.detail
    ec2.create_vpc_endpoint(
        VpcId=vpc, ServiceName=f"com.amazonaws.{REGION}.ec2messages", VpcEndpointType="Interface",
        SubnetIds=[subnet], PrivateDnsEnabled=True,
    )  # fmt: skip
    assert named(aws_report(online.session, recipe), "SSM reachability").status == "ok"

    ec2.delete_vpc_endpoints(VpcEndpointIds=endpoints)
    public = _subnet_in(online, vpc, "172.31.201.0/24")
    nat = ec2.create_nat_gateway(SubnetId=public)["NatGateway"]["NatGatewayId"]
    ec2.create_route(RouteTableId=table, DestinationCidrBlock="0.0.0.0/0", NatGatewayId=nat)
    check = named(aws_report(online.session, recipe), "SSM reachability")
    assert check.status == "ok" and nat in check.detail


def _subnet_in(aws: Aws, vpc: str, cidr: str) -> str:
    return str(aws.ec2().create_subnet(VpcId=vpc, CidrBlock=cidr)["Subnet"]["SubnetId"])


def test_an_internet_gateway_without_public_ips_is_no_way_out(online: Aws) -> None:
    private = named(aws_report(online.session, spec(subnet_id=_subnet(online))), "SSM reachability")
    assert private.status == "fail" and "gives instances no public IP" in private.detail
    public = spec(subnet_id=_subnet_in(online, _default_vpc(online), "172.31.202.0/24"))
    online.ec2().modify_subnet_attribute(SubnetId=public.subnet_id, MapPublicIpOnLaunch={"Value": True})
    assert named(aws_report(online.session, public), "SSM reachability").status == "ok"


def _default_vpc(aws: Aws) -> str:
    return str(aws.ec2().describe_vpcs(Filters=[{"Name": "isDefault", "Values": ["true"]}])["Vpcs"][0]["VpcId"])


def test_moto_default_vpc_without_internet_fails_ssm_reachability(aws: Aws, emulation: DoctorEmulation) -> None:
    """moto's default VPC has no internet gateway (AWS's has): the check sees that, as it would on AWS."""
    check = named(aws_report(aws.session), "SSM reachability")
    assert check.status == "fail" and "no route to the internet" in check.detail


def _ssh(aws: Aws, *cidrs: str, vpc: str | None = None) -> dict[str, Any]:
    """communicator ssh with a new security group (in the default VPC unless `vpc`) letting TCP 22 in from `cidrs`
    (default: anywhere)."""
    ec2 = aws.ec2()
    group = ec2.create_security_group(
        GroupName=f"ssh-{len(cidrs)}-{vpc}-{len(ec2.describe_security_groups()['SecurityGroups'])}",
        Description="ssh",
        VpcId=vpc or _default_vpc(aws),
    )["GroupId"]
    ranges = [{"CidrIp": c} for c in cidrs or ("0.0.0.0/0",)]
    ec2.authorize_security_group_ingress(
        GroupId=group, IpPermissions=[{"IpProtocol": "tcp", "FromPort": 22, "ToPort": 22, "IpRanges": ranges}]
    )
    return {"communicator": "ssh", "security_group_ids": [group]}


def test_an_ssh_communicator_at_public_ips_needs_an_internet_gateway(online: Aws) -> None:
    SSH = _ssh(online)
    report = aws_report(online.session, spec(**SSH))
    assert named(report, "SSH reachability").status == "ok"
    assert not [c for c in report.checks if c.name == "SSM reachability"]
    ec2 = online.ec2()
    subnet = _subnet(online)
    table = ec2.create_route_table(VpcId=_default_vpc(online))["RouteTable"]["RouteTableId"]
    ec2.associate_route_table(RouteTableId=table, SubnetId=subnet)
    check = named(aws_report(online.session, spec(subnet_id=subnet, **SSH)), "SSH reachability")
    assert check.status == "fail" and "would be unreachable" in check.detail
    assert check.fix is not None and "private_ip" in check.fix
    private = named(
        aws_report(online.session, spec(subnet_id=subnet, ssh_interface="private_ip", **SSH)), "SSH reachability"
    )
    assert private.status == "skipped"


def test_ssh_ingress_reads_the_recipes_security_groups(online: Aws) -> None:
    """0.0.0.0/0 certainly includes this machine; a narrower source may not (warn, never ok); no rule for TCP 22, a
    group that does not exist or one of another VPC fail."""
    anywhere = named(aws_report(online.session, spec(**_ssh(online))), "SSH ingress")
    assert anywhere.status == "ok" and "from anywhere: 0.0.0.0/0" in anywhere.detail
    narrow = named(aws_report(online.session, spec(**_ssh(online, "198.51.100.7/32"))), "SSH ingress")
    assert narrow.status == "warn" and "only from 198.51.100.7/32" in narrow.detail
    assert "cannot be seen from AWS" in narrow.detail and narrow.fix is not None and "public IP" in narrow.fix

    ec2 = online.ec2()
    closed = ec2.create_security_group(GroupName="closed", Description="no ssh", VpcId=_default_vpc(online))
    ec2.authorize_security_group_ingress(
        GroupId=closed["GroupId"],
        IpPermissions=[{"IpProtocol": "tcp", "FromPort": 443, "ToPort": 443, "IpRanges": [{"CidrIp": "0.0.0.0/0"}]}],
    )
    recipe = spec(communicator="ssh", security_group_ids=[closed["GroupId"]])
    check = named(aws_report(online.session, recipe), "SSH ingress")
    assert check.status == "fail" and "lets TCP 22 in" in check.detail
    assert check.fix is not None and f"authorize-security-group-ingress --group-id {closed['GroupId']}" in check.fix

    missing = spec(communicator="ssh", security_group_ids=["sg-000000000000000ff"])
    check = named(aws_report(online.session, missing), "SSH ingress")
    assert check.status == "fail" and "sg-000000000000000ff does not exist" in check.detail

    other_vpc = ec2.create_vpc(CidrBlock="10.9.0.0/16")["Vpc"]["VpcId"]
    check = named(aws_report(online.session, spec(**_ssh(online, vpc=other_vpc))), "SSH ingress")
    assert check.status == "fail" and f"is in {other_vpc}" in check.detail and "another VPC" in check.detail


def test_ssm_without_an_instance_profile_warns_about_default_host_management(online: Aws) -> None:
    check = named(aws_report(online.session, spec()), "SSM instance profile", REGION)
    assert check.status == "warn" and "Default Host Management Configuration" in check.detail
    assert check.fix is not None and "instance_profile" in check.fix and "AmazonSSMManagedInstanceCore" in check.fix
    profiled = named(aws_report(online.session, spec(instance_profile="amiforge-builder")), "SSM instance profile")
    assert profiled.status == "ok" and "amiforge-builder" in profiled.detail
    assert not [c for c in aws_report(online.session, spec(**_ssh(online))).checks if c.name == "SSM instance profile"]


# --- the source image -------------------------------------------------------------------------------------------------


def test_the_source_image_resolves_as_a_bake_resolves_it(online: Aws) -> None:
    check = named(aws_report(online.session, spec()), "source image", REGION)
    assert check.status == "ok" and "debian-12-20240501" in check.detail and "not encrypted" in check.detail
    missing = spec(source={"owners": [ACCOUNT], "name": "ubuntu-*"})
    check = named(aws_report(online.session, missing), "source image", REGION)
    assert check.status == "fail" and "no available image matches" in check.detail and check.fix is not None


def test_an_encrypted_source_of_the_account_keeps_its_key(online: Aws) -> None:
    """EBS restores an encrypted snapshot the account owns under the same key: that key is the image's, and its
    policy is checked for the receivers."""
    arn = key(online, REGION)  # the owner's statement only
    source_image(online, "debian-13-20250101", encrypted_under=arn)
    report = aws_report(online.session, spec(source=ENCRYPTED_SOURCE, distribution={"accounts": [RECEIVER]}))
    source = named(report, "source image", REGION)
    assert source.status == "ok" and "encrypted, so the image will be too" in source.detail and arn in source.detail
    ebs = named(report, "EBS encryption by default", REGION)
    assert ebs.status == "warn" and f"the source image is encrypted under {arn}" in ebs.detail
    policy = named(report, "KMS key policy", REGION)
    assert policy.status == "fail" and f"{RECEIVER} is not allowed" in policy.detail


# --- encryption -------------------------------------------------------------------------------------------------------


def test_ebs_encryption_by_default_under_the_aws_managed_key(online: Aws) -> None:
    online.ec2().enable_ebs_encryption_by_default()
    assert named(aws_report(online.session, spec()), "EBS encryption by default", REGION).status == "ok"
    shared = named(
        aws_report(online.session, spec(distribution={"accounts": [RECEIVER]})), "EBS encryption by default", REGION
    )
    assert shared.status == "fail" and "cannot be shared" in shared.detail
    assert shared.fix is not None and "modify-ebs-default-kms-key-id" in shared.fix
    public = named(aws_report(online.session, spec(distribution={"public": True})), "EBS encryption by default", REGION)
    assert public.status == "fail" and "cannot be made public" in public.detail


def test_a_customer_default_key_warns_and_its_policy_is_checked_for_the_receivers(online: Aws) -> None:
    ec2 = online.ec2()
    ec2.enable_ebs_encryption_by_default()
    arn = key(online, REGION)  # moto's default policy: the owner account only
    ec2.modify_ebs_default_kms_key_id(KmsKeyId=arn)
    report = aws_report(online.session, spec(distribution={"accounts": [RECEIVER]}))
    ebs = named(report, "EBS encryption by default", REGION)
    assert ebs.status == "warn" and arn in ebs.detail and "kms:CreateGrant" in ebs.detail
    policy = named(report, "KMS key policy", REGION)
    assert policy.status == "fail" and f"{RECEIVER} is not allowed kms:DescribeKey" in policy.detail
    assert policy.fix is not None and f"arn:aws:iam::{RECEIVER}:root" in policy.fix


def test_the_recipes_root_volume_key_is_the_one_the_image_is_under(online: Aws) -> None:
    arn = key(online, REGION)  # the owner's statement only
    recipe = spec(root_volume={"kms_key": arn}, distribution={"accounts": [RECEIVER]})
    report = aws_report(online.session, recipe)  # EBS encryption by default is off: the recipe's key still applies
    ebs = named(report, "EBS encryption by default", REGION)
    assert ebs.status == "warn" and f"root_volume.kms_key {arn}" in ebs.detail
    policy = named(report, "KMS key policy", REGION)
    assert policy.status == "fail" and policy.detail.startswith(f"root_volume.kms_key {arn}")
    public = spec(root_volume={"kms_key": arn}, distribution={"public": True})
    assert named(aws_report(online.session, public), "EBS encryption by default", REGION).status == "fail"


def test_an_encrypted_root_volume_under_the_default_key_cannot_be_shared(online: Aws) -> None:
    recipe = spec(root_volume={"encrypted": True}, distribution={"accounts": [RECEIVER]})
    check = named(aws_report(online.session, recipe), "EBS encryption by default", REGION)
    assert (
        check.status == "fail" and "AWS-managed" in check.detail and "root_volume asks for encryption" in check.detail
    )


def _encrypt_image_by(aws: Aws, how: str) -> dict[str, Any]:
    """Make the baked image encrypted one way; the recipe fields that go with it."""
    if how == "root_volume.encrypted":
        return {"root_volume": {"encrypted": True}}
    if how == "root_volume.kms_key":
        return {"root_volume": {"kms_key": key(aws, REGION, share_policy(RECEIVER))}}
    if how == "encryption by default":
        aws.ec2().enable_ebs_encryption_by_default()
        return {}
    assert how == "encrypted source"
    source_image(aws, "debian-13-20250101", encrypted_under=key(aws, REGION, share_policy(RECEIVER)))
    return {"source": ENCRYPTED_SOURCE}


@pytest.mark.parametrize(
    "how", ["root_volume.encrypted", "root_volume.kms_key", "encryption by default", "encrypted source"]
)
def test_a_copy_region_without_a_kms_key_inherits_the_images_encryption(online: Aws, how: str) -> None:
    """CopyImage without a KmsKeyId never drops encryption and puts the copy under the region's default EBS key,
    which distribute does not share: a keyless copy region of an encrypted, shared image fails with the field to
    set, though the region's own encryption by default is off."""
    fields = _encrypt_image_by(online, how)
    shared = spec(distribution={"regions": [{"region": COPY}], "accounts": [RECEIVER]}, **fields)
    check = named(aws_report(online.session, shared), "EBS encryption by default", COPY)
    assert check.status == "fail", check
    assert check.detail.startswith("off; the image is encrypted") and "cannot be shared" in check.detail
    assert check.fix is not None and "distribution.regions[0].kms_key" in check.fix
    # Not shared: the copy stays in the account under the region's default key.
    alone = spec(distribution={"regions": [{"region": COPY}]}, **fields)
    check = named(aws_report(online.session, alone), "EBS encryption by default", COPY)
    assert check.status == "ok" and "AWS-managed" in check.detail and "stay in this account" in check.detail


def test_a_copy_region_without_a_kms_key_is_fine_only_while_nothing_encrypts(online: Aws) -> None:
    recipe = spec(distribution={"regions": [{"region": COPY}, {"region": "eu-north-1"}], "accounts": [RECEIVER]})
    check = named(aws_report(online.session, recipe), "EBS encryption by default", COPY)
    assert check.status == "ok" and "stay unencrypted" in check.detail
    online.ec2(COPY).enable_ebs_encryption_by_default()  # the copy region's own default encrypts its copies
    check = named(aws_report(online.session, recipe), "EBS encryption by default", COPY)
    assert check.status == "fail" and "EBS encryption by default encrypts copies made here" in check.detail
    assert check.fix is not None and "distribution.regions[0].kms_key" in check.fix
    assert named(aws_report(online.session, recipe), "EBS encryption by default", "eu-north-1").status == "ok"
    # An encrypted copy cannot be public either.
    public = spec(distribution={"regions": [{"region": COPY}], "public": True})
    check = named(aws_report(online.session, public), "EBS encryption by default", COPY)
    assert check.status == "fail" and "cannot be made public" in check.detail


def test_a_copy_region_warns_when_the_images_encryption_is_not_known(online: Aws) -> None:
    recipe = spec(
        source={"owners": [ACCOUNT], "name": "ubuntu-*"},  # resolves to nothing
        distribution={"regions": [{"region": COPY}], "accounts": [RECEIVER]},
    )
    check = named(aws_report(online.session, recipe), "EBS encryption by default", COPY)
    assert check.status == "warn" and "not known" in check.detail
    assert check.fix is not None and "distribution.regions[0].kms_key" in check.fix


def test_a_copy_regions_default_does_not_matter_when_it_has_a_kms_key(online: Aws) -> None:
    online.ec2(COPY).enable_ebs_encryption_by_default()
    arn = key(online, COPY, share_policy(RECEIVER))
    recipe = spec(distribution={"regions": [{"region": COPY, "kms_key": arn}], "accounts": [RECEIVER]})
    check = named(aws_report(online.session, recipe), "EBS encryption by default", COPY)
    assert check.status == "ok" and "kms_key" in check.detail


@pytest.mark.parametrize(
    ("policy", "audience", "status", "fragment"),
    [
        (share_policy(RECEIVER), {"accounts": [RECEIVER]}, "ok", f"lets {RECEIVER} use it"),
        (share_policy("444455556666"), {"accounts": [RECEIVER]}, "fail", f"{RECEIVER} is not allowed"),
        (
            share_policy(principal="*", condition={"StringEquals": {"aws:PrincipalOrgID": "o-abcdefghij"}}),
            {"accounts": [RECEIVER]},
            "warn",
            "aws:PrincipalOrgID",
        ),
        (
            share_policy(principal="*", condition={"StringEquals": {"aws:PrincipalOrgID": "o-abcdefghij"}}),
            {"organizations": [ORG]},
            "ok",
            "organization o-abcdefghij",
        ),
        (
            share_policy(RECEIVER, condition={"StringEquals": {"kms:ViaService": "ec2.us-west-2.amazonaws.com"}}),
            {"accounts": [RECEIVER]},
            "fail",
            "not allowed",
        ),
    ],
)
def test_kms_key_policy_of_a_distribution_region(
    online: Aws, policy: dict[str, Any], audience: dict[str, Any], status: str, fragment: str
) -> None:
    arn = key(online, COPY, policy)
    recipe = spec(distribution={"regions": [{"region": COPY, "kms_key": arn}], **audience})
    check = named(aws_report(online.session, recipe), "KMS key policy", COPY)
    assert check.status == status and fragment in check.detail, check


def test_an_aws_managed_kms_key_cannot_be_shared(online: Aws) -> None:
    arn = key(online, COPY)
    kms_backends[ACCOUNT][COPY].keys[arn.rsplit("/", 1)[1]].key_manager = "AWS"  # moto reports every key as CUSTOMER
    recipe = spec(distribution={"regions": [{"region": COPY, "kms_key": arn}], "accounts": [RECEIVER]})
    check = named(aws_report(online.session, recipe), "KMS key policy", COPY)
    assert check.status == "fail" and "AWS-managed" in check.detail


def test_a_key_policy_is_skipped_when_nothing_is_shared(online: Aws) -> None:
    recipe = spec(distribution={"regions": [{"region": COPY, "kms_key": key(online, COPY)}]})
    assert named(aws_report(online.session, recipe), "KMS key policy", COPY).status == "skipped"


# --- public sharing and quotas ----------------------------------------------------------------------------------------


def test_public_sharing_needs_block_public_access_off(online: Aws, emulation: DoctorEmulation) -> None:
    recipe = spec(distribution={"public": True})
    check = named(aws_report(online.session, recipe), "image block public access", REGION)
    assert check.status == "fail" and check.fix == f"aws ec2 disable-image-block-public-access --region {REGION}"
    emulation.public_access.managed_by[(ACCOUNT, REGION)] = "declarative-policy"
    assert "declarative policy" in (named(aws_report(online.session, recipe), "image block public access").fix or "")
    online.ec2().disable_image_block_public_access()
    assert named(aws_report(online.session, recipe), "image block public access").status == "ok"


def _images(aws: Aws, region: str, count: int, *, public: bool = False) -> list[str]:
    ec2 = aws.ec2(region)
    instance = ec2.run_instances(ImageId="ami-12345678", MinCount=1, MaxCount=1)["Instances"][0]["InstanceId"]
    ids = [str(ec2.create_image(InstanceId=instance, Name=f"img-{region}-{i}")["ImageId"]) for i in range(count)]
    for image in ids if public else []:
        ec2.modify_image_attribute(ImageId=image, LaunchPermission={"Add": [{"Group": "all"}]})
    return ids


def test_the_public_amis_quota_counts_the_public_images_there(online: Aws, emulation: DoctorEmulation) -> None:
    recipe = spec(distribution={"public": True})
    _images(online, REGION, 4, public=True)
    _images(online, REGION, 2)  # private ones do not count
    check = named(aws_report(online.session, recipe), "public AMIs quota", REGION)
    assert check.status == "ok" and "4 public images of a quota of 5" in check.detail
    assert "Recycle Bin count too" in check.detail  # which DescribeImages does not list
    _images(online, REGION, 1, public=True)
    check = named(aws_report(online.session, recipe), "public AMIs quota", REGION)
    assert check.status == "fail" and check.fix is not None and PUBLIC_AMIS_QUOTA in check.fix
    emulation.quotas.applied[(ACCOUNT, REGION, PUBLIC_AMIS_QUOTA)] = 20.0
    check = named(aws_report(online.session, recipe), "public AMIs quota", REGION)
    assert check.status == "ok" and "of a quota of 20 (Service Quotas" in check.detail


def test_concurrent_copies_count_what_is_in_flight_in_each_destination(online: Aws, emulation: DoctorEmulation) -> None:
    recipe = spec(distribution={"regions": [{"region": COPY}]})
    check = named(aws_report(online.session, recipe), "concurrent AMI copies", COPY)
    assert check.status == "ok" and "0 own images are pending" in check.detail
    assert "limit 25 (a default from an older EC2 User Guide" in check.detail  # not claimed as current AWS docs
    for image in _images(online, COPY, 25):
        pending(COPY, image)
    check = named(aws_report(online.session, recipe), "concurrent AMI copies", COPY)
    assert check.status == "fail" and "25 own images are pending" in check.detail
    # When EC2 lists the quota (by name), its value counts instead of the documented number.
    emulation.quotas.extra.append(("L-TEST0001", "Concurrent AMI copies", 100.0))
    check = named(aws_report(online.session, recipe), "concurrent AMI copies", COPY)
    assert check.status == "ok" and "limit 100 (Service Quotas L-TEST0001)" in check.detail


# --- a refused call fails its check only ------------------------------------------------------------------------------


def test_an_access_denied_check_says_what_to_grant_and_the_others_still_run(online: Aws) -> None:
    def deny(model: Any, params: dict[str, Any], **_: Any) -> tuple[AWSResponse, dict[str, Any]] | None:
        if model.name != "GetImageBlockPublicAccessState":
            return None
        error = {"Code": "UnauthorizedOperation", "Message": "You are not authorized to perform this operation."}
        return AWSResponse(str(params.get("url", "")), 403, {}, _Raw(b"")), {"Error": error, "ResponseMetadata": {}}

    # On the cached client doctor uses (a client copies the session's handlers when it is made, not later).
    online.ec2().meta.events.register_first("before-call.ec2.GetImageBlockPublicAccessState", deny)
    report = aws_report(online.session, spec(distribution={"public": True}))
    check = named(report, "image block public access", REGION)
    assert check.status == "fail" and check.detail == "not allowed to call ec2:GetImageBlockPublicAccessState"
    assert check.fix is not None and check.fix.startswith("grant ec2:GetImageBlockPublicAccessState")
    assert named(report, "public AMIs quota", REGION).status == "ok"  # the next check ran


def test_every_permission_error_names_an_action_the_doctor_policy_grants(online: Aws) -> None:
    """The action a refused check names is the one iam.py declares (derived from the client, not spelled twice)."""
    for service, operation in (("service-quotas", "GetServiceQuota"), ("kms", "GetKeyPolicy"), ("ec2", "DescribeVpcs")):
        assert iam_action(online.session.client(service), operation) in PERMISSIONS["doctor"]


def test_a_refused_describe_regions_fails_the_region_check_and_the_others_still_run(online: Aws) -> None:
    def deny(model: Any, params: dict[str, Any], **_: Any) -> tuple[AWSResponse, dict[str, Any]] | None:
        error = {"Code": "UnauthorizedOperation", "Message": "You are not authorized to perform this operation."}
        return AWSResponse(str(params.get("url", "")), 403, {}, _Raw(b"")), {"Error": error, "ResponseMetadata": {}}

    online.ec2().meta.events.register_first("before-call.ec2.DescribeRegions", deny)
    report = aws_report(online.session, spec(distribution={"regions": [{"region": COPY}]}))
    assert report.regions == ()
    check = named(report, "region enabled")
    assert check.status == "fail" and check.detail == "not allowed to call ec2:DescribeRegions"
    assert named(report, "placement").status == "ok" and named(report, "concurrent AMI copies", COPY).status == "ok"


def test_a_disabled_home_region_is_its_region_line_not_a_credentials_failure(
    aws: Aws, emulation: DoctorEmulation, calls: RegionCalls
) -> None:
    """STS refuses a call into a region the account has not enabled as it refuses bad credentials: the partition's
    global STS region is asked instead, and the home region shows as the failed region line; nothing else is asked
    there."""
    session = AwsSession(DISABLED, boto_session=aws.session.boto_session)
    calls.reset()
    report = aws_report(session)
    assert report.account == ACCOUNT and report.region == DISABLED and DISABLED not in report.regions
    check = named(report, "region enabled", DISABLED)
    assert check.status == "fail" and "opt-in region" in check.detail
    assert check.fix is not None and f"enable {DISABLED}" in check.fix
    assert named(report, "placement", DISABLED).status == "skipped"
    assert {(r, op) for r, _s, op in calls.counts if r == DISABLED} == {(DISABLED, "GetCallerIdentity")}
    assert ("us-east-1", "sts", "GetCallerIdentity") in calls.counts


def test_bad_credentials_still_fail_the_whole_report(aws: Aws, emulation: DoctorEmulation) -> None:
    """Refused in the home region and in the global STS region alike: the credentials, with the fix naming both
    causes."""

    def refuse(model: Any, params: dict[str, Any], **_: Any) -> tuple[AWSResponse, dict[str, Any]] | None:
        error = {"Code": "InvalidClientTokenId", "Message": "The security token included in the request is invalid."}
        return AWSResponse(str(params.get("url", "")), 403, {}, _Raw(b"")), {"Error": error, "ResponseMetadata": {}}

    aws.session.boto_session.events.register_first("before-call.sts.GetCallerIdentity", refuse)
    session = AwsSession(REGION, boto_session=aws.session.boto_session)
    with pytest.raises(ConfigError) as refused:
        aws_report(session)
    assert refused.value.fix is not None and "enable it for the account" in refused.value.fix
    assert "credentials" in refused.value.fix
    assert aws_code(refused.value) == "InvalidClientTokenId"  # the home region's refusal, with its cause


def test_the_home_region_is_asked_for_else_the_recipes_else_configured_else_the_default() -> None:
    recipe = spec()
    assert home_region("ap-south-1", recipe, "eu-north-1") == ("ap-south-1", "asked for (--region)")
    assert home_region(None, recipe, "eu-north-1") == (REGION, "the recipe's region")
    assert home_region(None, None, "eu-north-1") == ("eu-north-1", "the AWS configuration's region")
    assert home_region(None, None, None)[0] == DEFAULT_HOME_REGION == "us-east-1"
