"""`amiforge doctor --aws`: who amiforge is on AWS, which regions it can use, the least-privilege IAM policy every
amiforge operation needs (printed from the declarations in iam.py, so it never drifts from the code) — and the
day-one checks that catch, before a bake or a distribution, what would otherwise fail an hour into it.

Each check is an `AccountCheck` (ok | warn | fail | skipped, a detail and a fix), for the home region alone or, with a
recipe, for what that recipe needs:

- **region enabled**: the bake region and every distribution region, from DescribeRegions(AllRegions) OptInStatus.
  A region the account has not opted into fails here, by name — elsewhere AWS answers calls into it exactly as it
  answers bad credentials. Nothing else is asked of a region that is not enabled (its checks are skipped).
- **placement**: the default VPC, or the recipe's `subnet_id` (that it exists).
- **SSM reachability** (communicator `ssm`): the builder's subnet routes 0.0.0.0/0 to an internet gateway (with
  public IPs on launch) or a NAT gateway, or its VPC has interface endpoints for ssm, ssmmessages and ec2messages.
  **SSH reachability** (communicator `ssh` at a public IP): the subnet routes to an internet gateway.
- **EBS encryption by default** and the key images end up under, per region (in the bake region the recipe's
  `root_volume` first, in a copy region its `kms_key`): an image encrypted under the AWS-managed key cannot be shared,
  an encrypted one cannot be public, and a customer key needs KMS permissions (and a policy for the receivers).
- **KMS key policy**: each distribution region's `kms_key` (and a customer key the baked image is under) lets the
  receiving accounts, organizations or OUs use it (key_policy.py: a static read, so "conditional" warns, never passes).
- **image block public access** in every region, when the recipe shares publicly.
- **quotas**: public AMIs per region (Service Quotas L-0E3CBAB9) against the public images there, and concurrent AMI
  copies per destination region against the copies already in flight.

A check that AWS refuses (AccessDenied, UnauthorizedOperation) fails as "not allowed to call X" with the action to
grant; any other error fails that check with its message and fix, never the whole report. Reads only.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from functools import partial
from typing import Any

from amiforge.awsapi.clients import AwsSession, call, iam_action, paginate
from amiforge.awsapi.errors import aws_code, is_permission_error
from amiforge.errors import AmiforgeError, NotFound
from amiforge.providers.aws.iam import OPERATIONS, policy_document
from amiforge.providers.aws.key_policy import SHARE_ACTIONS, Audience, KeyAccess, key_access, parse_policy
from amiforge.providers.interface import AccountCheck, AccountReport, CheckStatus
from amiforge.recipe import AwsProvider as AwsSpec

__all__ = [
    "COPIES_FROM_ONE_SOURCE",
    "PUBLIC_AMIS_QUOTA",
    "SSM_ENDPOINTS",
    "aws_report",
    "day_one_checks",
]

REGION = "region enabled"
PLACEMENT = "placement"
SSM_PATH = "SSM reachability"
SSH_PATH = "SSH reachability"
EBS_DEFAULT = "EBS encryption by default"
KEY_POLICY = "KMS key policy"
PUBLIC_BLOCK = "image block public access"
PUBLIC_QUOTA = "public AMIs quota"
COPY_QUOTA = "concurrent AMI copies"

# The interface endpoints the SSM agent needs when the subnet has no way out (Systems Manager User Guide, "Use VPC
# endpoints"); amiforge's steps use Run Command, not S3 output, so no S3 endpoint is needed.
SSM_ENDPOINTS: tuple[str, ...] = ("ssm", "ssmmessages", "ec2messages")
# EC2's "Public AMIs" quota (the EC2 User Guide's AMI quotas: 5 per region by default).
PUBLIC_AMIS_QUOTA = "L-0E3CBAB9"
PUBLIC_AMIS_DEFAULT = 5
# Concurrent AMI copies: EC2 documents 50 per destination region, at most 25 of them from one source region ("Copy an
# AMI", EC2 User Guide). No Service Quotas code for it could be found with confidence (the "Concurrent AMI copies"
# quota L-69312229 is EC2 Image Builder's, per distribution configuration), so ListServiceQuotas for ec2 is searched by
# name; when EC2 lists none, the documented numbers stand. Every copy amiforge makes into a region comes from the bake
# region, so the per-source number is the one that binds.
COPIES_FROM_ONE_SOURCE = 25
COPIES_PER_DESTINATION = 50
_COPY_QUOTA_NAME = re.compile(r"\bAMI cop(y|ies)\b", re.IGNORECASE)
# The AWS-managed EBS key's alias: what GetEbsDefaultKmsKeyId answers until a customer key is made the default.
_AWS_EBS_ALIAS = "alias/aws/ebs"
_ORG_RE = re.compile(r"arn:aws[a-z-]*:organizations::[0-9]{12}:organization/(o-[a-z0-9]+)")
_OU_RE = re.compile(r"arn:aws[a-z-]*:organizations::[0-9]{12}:ou/(o-[a-z0-9]+)/(ou-[0-9a-z]+-[a-z0-9]+)")
_KEY_USERS = "kms:CreateGrant, kms:Decrypt, kms:DescribeKey, kms:GenerateDataKeyWithoutPlaintext and kms:ReEncrypt*"
_NEEDS_RECIPE = "pass --recipe FILE to check what a recipe needs"


def aws_report(
    session: AwsSession, spec: AwsSpec | None = None, *, parameter_prefix: str | None = None
) -> AccountReport:
    """Credentials (STS GetCallerIdentity), enabled regions (EC2 DescribeRegions), the IAM policy, and the day-one
    checks for the home region or, with `spec` (a recipe's aws section), for what that recipe needs."""
    sts = session.client("sts")
    identity = call(sts, "GetCallerIdentity", "the caller")
    account = str(identity["Account"])
    opt_in: dict[str, str] | None = None
    region_problem: list[AccountCheck] = []
    try:
        answer = _ask(session.client("ec2"), "DescribeRegions", "regions", AllRegions=True)
        opt_in = {str(r["RegionName"]): str(r.get("OptInStatus") or "opt-in-not-required") for r in answer["Regions"]}
    except (_Denied, AmiforgeError) as e:
        region_problem = _failed(REGION, session.region, e)
    enabled = tuple(sorted(n for n, s in (opt_in or {}).items() if s != "not-opted-in"))
    plan = _Plan.of(spec, session.region)
    checks = region_problem + day_one_checks(session, plan, opt_in=opt_in, account=account)
    prefix = parameter_prefix or (spec.publish.parameter_prefix if spec is not None else "/amiforge")
    return AccountReport(
        account=account,
        arn=str(identity["Arn"]),
        region=session.region,
        regions=enabled,
        policy=policy_document(OPERATIONS, parameter_prefix=prefix),
        checks=tuple(checks),
    )


@dataclass(frozen=True)
class _Plan:
    """What the checks need from a recipe (or, without one, the home region and the defaults)."""

    bake_region: str
    recipe: bool
    copies: Mapping[str, str | None] = field(default_factory=dict)  # destination region → its kms_key
    subnet_id: str | None = None
    communicator: str = "ssm"
    ssh_interface: str = "public_ip"
    root_kms_key: str | None = None  # the recipe's root_volume.kms_key
    root_encrypted: bool = False  # root_volume.encrypted: true (under the default key unless kms_key)
    public: bool = False
    accounts: tuple[str, ...] = ()
    organizations: tuple[str, ...] = ()
    organizational_units: tuple[str, ...] = ()

    @classmethod
    def of(cls, spec: AwsSpec | None, home: str) -> _Plan:
        if spec is None:
            return cls(bake_region=home, recipe=False)
        wanted = spec.distribution
        return cls(
            bake_region=spec.region,
            recipe=True,
            copies={c.region: c.kms_key for c in wanted.regions},
            subnet_id=spec.subnet_id,
            communicator=spec.communicator,
            ssh_interface=spec.ssh_interface,
            root_kms_key=spec.root_volume.kms_key if spec.root_volume else None,
            root_encrypted=bool(spec.root_volume and (spec.root_volume.encrypted or spec.root_volume.kms_key)),
            public=wanted.public,
            accounts=tuple(wanted.accounts),
            organizations=tuple(wanted.organizations),
            organizational_units=tuple(wanted.organizational_units),
        )

    @property
    def regions(self) -> tuple[str, ...]:
        return (self.bake_region, *self.copies)

    @property
    def shares(self) -> bool:
        """Shared with other accounts (launch permissions), which encrypted images allow only under a customer key."""
        return bool(self.accounts or self.organizations or self.organizational_units)

    def audiences(self) -> list[Audience]:
        audiences = [Audience(account=a) for a in self.accounts]
        for arn in self.organizations:
            match = _ORG_RE.fullmatch(arn)
            audiences.append(Audience(org_id=match.group(1) if match else arn))
        for arn in self.organizational_units:
            match = _OU_RE.fullmatch(arn)
            audiences.append(Audience(org_id=match.group(1), ou_id=match.group(2)) if match else Audience(ou_id=arn))
        return audiences


def day_one_checks(
    session: AwsSession, plan: _Plan, *, opt_in: Mapping[str, str] | None, account: str
) -> list[AccountCheck]:
    """Every check, in the order a person fixes them: regions, network, encryption, keys, public sharing, quotas."""
    checks: list[AccountCheck] = []
    usable = set(plan.regions)
    if opt_in is not None:
        region_checks = [_region_check(plan, region, opt_in, account) for region in plan.regions]
        usable = {c.region for c in region_checks if c.status == "ok" and c.region}
        checks += region_checks

    def each(name: str, regions: Iterable[str], work: Callable[[str], list[AccountCheck]]) -> None:
        for region in regions:
            if region not in usable:
                checks.append(AccountCheck(name, "skipped", f"{region} is not enabled for the account", region=region))
            else:
                checks.extend(_guarded(name, region, partial(work, region)))

    each(PLACEMENT, [plan.bake_region], lambda region: _placement(session, plan, region))
    shared_keys: dict[str, tuple[str, str]] = {}  # region → (a customer key shared images are under, its role)
    each(EBS_DEFAULT, plan.regions, lambda region: _ebs_default(session, plan, region, shared_keys))
    checks += _key_policy_checks(session, plan, usable, shared_keys)
    if not plan.public:
        reason = "the recipe does not share the image publicly" if plan.recipe else _NEEDS_RECIPE
        checks.append(AccountCheck(PUBLIC_BLOCK, "skipped", reason))
        checks.append(AccountCheck(PUBLIC_QUOTA, "skipped", reason))
    else:
        each(PUBLIC_BLOCK, plan.regions, lambda region: [_public_block(session, region)])
        each(PUBLIC_QUOTA, plan.regions, lambda region: [_public_quota(session, region)])
    if not plan.copies:
        reason = "the recipe copies the image to no other region" if plan.recipe else _NEEDS_RECIPE
        checks.append(AccountCheck(COPY_QUOTA, "skipped", reason))
    else:
        found: list[_CopyLimit] = []
        each(COPY_QUOTA, plan.copies, lambda region: [_copy_quota(session, plan, region, found)])
    return checks


# --- asking AWS: a refused call becomes "not allowed to call X", any other error fails only its check --------------


class _Denied(Exception):
    """AWS refused a call for want of an IAM permission; `action` is the one to grant."""

    def __init__(self, action: str) -> None:
        super().__init__(action)
        self.action = action


def _raise_if_denied(error: AmiforgeError, client: Any, operation: str) -> None:
    code = aws_code(error)
    if code is not None and is_permission_error(code):
        raise _Denied(iam_action(client, operation)) from error


def _ask(client: Any, operation: str, what: str, **kwargs: Any) -> Any:
    try:
        return call(client, operation, what, **kwargs)
    except AmiforgeError as e:
        _raise_if_denied(e, client, operation)
        raise


def _pages(client: Any, operation: str, key: str, what: str, **kwargs: Any) -> list[Any]:
    try:
        return list(paginate(client, operation, key, what, **kwargs))
    except AmiforgeError as e:
        _raise_if_denied(e, client, operation)
        raise


def _failed(name: str, region: str | None, error: Exception) -> list[AccountCheck]:
    if isinstance(error, _Denied):
        return [
            AccountCheck(
                name,
                "fail",
                f"not allowed to call {error.action}",
                fix=f"grant {error.action} to the identity amiforge runs as (the policy above lists it for doctor)",
                region=region,
            )
        ]
    assert isinstance(error, AmiforgeError)
    return [AccountCheck(name, "fail", error.message, fix=error.fix, region=region)]


def _guarded(name: str, region: str | None, work: Callable[[], list[AccountCheck]]) -> list[AccountCheck]:
    try:
        return work()
    except (_Denied, AmiforgeError) as e:
        return _failed(name, region, e)


# --- regions ---------------------------------------------------------------------------------------------------------


def _region_check(plan: _Plan, region: str, opt_in: Mapping[str, str], account: str) -> AccountCheck:
    role = "bake region" if region == plan.bake_region else "distribution region"
    status = opt_in.get(region)
    if status is None:
        return AccountCheck(
            REGION,
            "fail",
            f"{role}: not a region this account's partition has",
            fix="check the region name (aws ec2 describe-regions --all-regions lists them)",
            region=region,
        )
    if status == "not-opted-in":
        return AccountCheck(
            REGION,
            "fail",
            f"{role}: an opt-in region that account {account} has not enabled; AWS refuses every call there as if "
            "the credentials were wrong",
            fix=f"enable {region} in the account settings (Account → AWS Regions, or aws account enable-region "
            f"--region-name {region}), wait until it is enabled, then run doctor again",
            region=region,
        )
    how = "opted in" if status == "opted-in" else "enabled (no opt-in needed)"
    return AccountCheck(REGION, "ok", f"{role}: {how}", region=region)


# --- network: where the builder launches, and whether its SSM agent can reach SSM -------------------------------------


def _placement(session: AwsSession, plan: _Plan, region: str) -> list[AccountCheck]:
    ec2 = session.client("ec2", region)
    if plan.subnet_id is None:
        default = [{"Name": "isDefault", "Values": ["true"]}]
        vpcs = _pages(ec2, "DescribeVpcs", "Vpcs", f"the default VPC in {region}", Filters=default)
        if not vpcs:
            return [
                AccountCheck(
                    PLACEMENT,
                    "fail" if plan.recipe else "warn",
                    f"{region} has no default VPC, and "
                    + ("the recipe sets no subnet_id" if plan.recipe else "a recipe baking here must set subnet_id")
                    + ": builder and boot-test instances have nowhere to launch",
                    fix=f"set provider.subnet_id in the recipe, or create a default VPC (aws ec2 create-default-vpc "
                    f"--region {region})",
                    region=region,
                )
            ]
        vpc_id = str(vpcs[0]["VpcId"])
        filters = [{"Name": "vpc-id", "Values": [vpc_id]}, {"Name": "default-for-az", "Values": ["true"]}]
        subnets = _pages(ec2, "DescribeSubnets", "Subnets", f"the default subnets of {vpc_id}", Filters=filters)
        if not subnets:
            return [
                AccountCheck(
                    PLACEMENT,
                    "fail",
                    f"default VPC {vpc_id} has no default subnet: instances launched without a subnet have none",
                    fix=f"aws ec2 create-default-subnet --availability-zone <zone> --region {region}, or set subnet_id",
                    region=region,
                )
            ]
        where = f"default VPC {vpc_id}: instances launch in one of its {len(subnets)} default subnets"
    else:
        try:
            subnets = _pages(
                ec2,
                "DescribeSubnets",
                "Subnets",
                f"subnet {plan.subnet_id}",
                page_size=None,
                SubnetIds=[plan.subnet_id],
            )
        except NotFound:
            subnets = []
        if not subnets:
            return [
                AccountCheck(
                    PLACEMENT,
                    "fail",
                    f"subnet {plan.subnet_id} does not exist in {region}",
                    fix="check provider.subnet_id and provider.region in the recipe",
                    region=region,
                )
            ]
        vpc_id = str(subnets[0]["VpcId"])
        where = f"subnet {plan.subnet_id} in VPC {vpc_id} ({subnets[0].get('AvailabilityZone', '?')})"
    checks = [AccountCheck(PLACEMENT, "ok", where, region=region)]
    if plan.communicator == "ssh":
        checks += _guarded(SSH_PATH, region, lambda: [_ssh_path(ec2, plan, region, vpc_id, subnets)])
    else:
        checks += _guarded(SSM_PATH, region, lambda: [_ssm_path(ec2, region, vpc_id, subnets)])
    return checks


def _ssh_path(ec2: Any, plan: _Plan, region: str, vpc_id: str, subnets: Sequence[Mapping[str, Any]]) -> AccountCheck:
    """communicator ssh: amiforge connects from this machine to a public IP it requests at launch, which works only in
    a subnet whose default route is an internet gateway; a private address depends on a way into the VPC (VPN,
    peering) that the account does not show. (The security groups must let TCP 22 in from this machine: not read.)"""
    if plan.ssh_interface != "public_ip":
        return AccountCheck(
            SSH_PATH,
            "skipped",
            "ssh_interface private_ip: whether this machine reaches the VPC (VPN, peering) is not visible from AWS",
            region=region,
        )
    in_vpc = [{"Name": "vpc-id", "Values": [vpc_id]}]
    tables = _pages(ec2, "DescribeRouteTables", "RouteTables", f"the route tables of {vpc_id}", Filters=in_vpc)
    for subnet in subnets:
        route = _default_route(str(subnet["SubnetId"]), tables)
        gateway = str((route or {}).get("GatewayId") or "")
        if not gateway.startswith("igw-"):
            return AccountCheck(
                SSH_PATH,
                "fail",
                f"subnet {subnet['SubnetId']} does not route 0.0.0.0/0 to an internet gateway: the public IP amiforge "
                "requests at launch would be unreachable",
                fix="set subnet_id to a public subnet (a route to an internet gateway), or ssh_interface: private_ip "
                "with a way into the VPC from this machine",
                region=region,
            )
    return AccountCheck(
        SSH_PATH,
        "ok",
        f"the builder's subnet routes to an internet gateway; {vpc_id} is reachable at public IPs",
        None,
        region,
    )


def _default_route(subnet_id: str, tables: Sequence[Mapping[str, Any]]) -> Mapping[str, Any] | None:
    """The 0.0.0.0/0 route of the subnet's route table (the VPC's main table when the subnet has none of its own)."""
    own = [t for t in tables if any(a.get("SubnetId") == subnet_id for a in t.get("Associations", []))]
    main = [t for t in tables if any(a.get("Main") for a in t.get("Associations", []))]
    table = (own or main or [{}])[0]
    routes = [
        r
        for r in table.get("Routes", [])
        if r.get("DestinationCidrBlock") == "0.0.0.0/0" and r.get("State", "active") != "blackhole"
    ]
    return routes[0] if routes else None


def _ssm_path(ec2: Any, region: str, vpc_id: str, subnets: Sequence[Mapping[str, Any]]) -> AccountCheck:
    in_vpc = [{"Name": "vpc-id", "Values": [vpc_id]}]
    endpoints = _pages(ec2, "DescribeVpcEndpoints", "VpcEndpoints", f"the VPC endpoints of {vpc_id}", Filters=in_vpc)
    names = {f"com.amazonaws.{region}.{service}": service for service in SSM_ENDPOINTS}
    usable = [
        e
        for e in endpoints
        if e.get("ServiceName") in names
        and str(e.get("State", "")).lower() == "available"
        and e.get("VpcEndpointType", "Interface") == "Interface"
    ]
    present = {names[str(e["ServiceName"])] for e in usable}
    private_dns = all(e.get("PrivateDnsEnabled") for e in usable)
    endpoint_fix = (
        f"create interface endpoints com.amazonaws.{region}.ssm, .ssmmessages and .ec2messages with private DNS in "
        f"{vpc_id}"
    )
    if present == set(SSM_ENDPOINTS) and private_dns:
        return AccountCheck(
            SSM_PATH, "ok", f"{vpc_id} has interface endpoints for ssm, ssmmessages and ec2messages", region=region
        )
    tables = _pages(ec2, "DescribeRouteTables", "RouteTables", f"the route tables of {vpc_id}", Filters=in_vpc)
    verdicts = [_subnet_way_out(subnet, tables) for subnet in subnets]
    order: dict[CheckStatus, int] = {"fail": 0, "warn": 1, "ok": 2, "skipped": 3}
    status, detail = min(verdicts, key=lambda v: order[v[0]])
    if present and present != set(SSM_ENDPOINTS):
        detail += f"; endpoints only for {', '.join(sorted(present))}"
    elif present and not private_dns:
        detail += "; its SSM endpoints have private DNS off, so the agent does not use them"
    if status == "ok":
        return AccountCheck(SSM_PATH, "ok", detail, region=region)
    fix = f"give the subnet a route to a NAT gateway, or {endpoint_fix}"
    if status == "warn":
        return AccountCheck(SSM_PATH, "warn", detail + ": amiforge cannot tell whether that reaches SSM", fix, region)
    return AccountCheck(
        SSM_PATH,
        "fail",
        detail + ": the builder's SSM agent cannot reach SSM, so the bake would time out waiting for it",
        fix=fix,
        region=region,
    )


def _subnet_way_out(subnet: Mapping[str, Any], tables: Sequence[Mapping[str, Any]]) -> tuple[CheckStatus, str]:
    """How instances in `subnet` reach the internet: its route table's default route (the VPC's main table when the
    subnet has no table of its own)."""
    subnet_id = str(subnet["SubnetId"])
    route = _default_route(subnet_id, tables)
    if route is None:
        return "fail", f"subnet {subnet_id} has no route to the internet (no internet gateway or NAT)"
    gateway = str(route.get("GatewayId") or "")
    if gateway.startswith("igw-"):
        if subnet.get("MapPublicIpOnLaunch"):
            return "ok", f"subnet {subnet_id} routes to internet gateway {gateway} and gives instances public IPs"
        return (
            "fail",
            f"subnet {subnet_id} routes to internet gateway {gateway} but gives instances no public IP (amiforge asks "
            "for none)",
        )
    if route.get("NatGatewayId"):
        return "ok", f"subnet {subnet_id} routes to NAT gateway {route['NatGatewayId']}"
    target = next(
        (
            str(route[k])
            for k in (
                "TransitGatewayId",
                "NetworkInterfaceId",
                "InstanceId",
                "VpcPeeringConnectionId",
                "CoreNetworkArn",
            )
            if route.get(k)
        ),
        gateway or "an unknown target",
    )
    return "warn", f"subnet {subnet_id} sends 0.0.0.0/0 to {target}"


# --- encryption: EBS encryption by default, and the key policies of shared encrypted images --------------------------


def _ebs_default(
    session: AwsSession, plan: _Plan, region: str, shared_keys: dict[str, tuple[str, str]]
) -> list[AccountCheck]:
    """EBS encryption by default in `region` and the key the images made there end up under: in the bake region the
    recipe's root_volume (kms_key, or encrypted: true under the default key) comes first; a copy region's kms_key
    overrides its default. A customer key of a shared image goes into `shared_keys` for the key-policy check."""
    ec2 = session.client("ec2", region)
    on = bool(
        _ask(ec2, "GetEbsEncryptionByDefault", f"EBS encryption by default in {region}")["EbsEncryptionByDefault"]
    )
    setting = "on" if on else "off"
    baked_here = region == plan.bake_region
    if not baked_here and plan.copies.get(region):
        return [AccountCheck(EBS_DEFAULT, "ok", f"{setting}; copies here use the recipe's kms_key", region=region)]
    if baked_here and plan.root_kms_key:
        key, role = plan.root_kms_key, "root_volume.kms_key"
        setting += f"; the recipe's root_volume.kms_key {key} encrypts the image"
    elif on or (baked_here and plan.root_encrypted):
        key, role = (
            str(_ask(ec2, "GetEbsDefaultKmsKeyId", f"the default EBS key in {region}")["KmsKeyId"]),
            "default EBS key",
        )
        setting += "" if on else "; the recipe's root_volume asks for encryption"
        setting += f", default key {key}"
    else:
        detail = "off (the image is encrypted only if the source image is)" if baked_here else "off"
        return [AccountCheck(EBS_DEFAULT, "ok", detail, region=region)]
    what = "images baked here" if baked_here else "copies made here (the region has no kms_key)"
    if plan.public:
        return [
            AccountCheck(
                EBS_DEFAULT,
                "fail",
                f"{setting}: {what} are encrypted, and an encrypted image cannot be made public",
                fix=f"drop public: true, or encryption (the recipe's root_volume; EBS encryption by default: aws ec2 "
                f"disable-ebs-encryption-by-default --region {region})",
                region=region,
            )
        ]
    if key == _AWS_EBS_ALIAS or _key_manager(session, region, key) == "AWS":
        if not plan.shares:
            return [
                AccountCheck(EBS_DEFAULT, "ok", f"{setting} (AWS-managed): {what} stay in this account", None, region)
            ]
        if baked_here and plan.root_kms_key:
            fix = "give root_volume a customer-managed kms_key whose policy lets the receiving accounts use it"
        elif baked_here:
            fix = (
                f"give root_volume a customer-managed kms_key, or make one the default (aws ec2 "
                f"modify-ebs-default-kms-key-id --kms-key-id KEY --region {region}); its policy must let the "
                "receiving accounts use it"
            )
        else:
            fix = f"give regions[{region}] a customer-managed kms_key whose policy lets the receiving accounts use it"
        return [
            AccountCheck(
                EBS_DEFAULT,
                "fail",
                f"{setting} (AWS-managed): {what} are encrypted under it and cannot be shared with other accounts",
                fix=fix,
                region=region,
            )
        ]
    detail = (
        f"{setting} (customer-managed): the builder's volumes are encrypted with it, so the identity amiforge runs as "
        f"needs {_KEY_USERS} on it"
    )
    if plan.shares:
        shared_keys[region] = (key, role)
        detail += "; the receiving accounts must be allowed to use it too (the KMS key policy check)"
    return [
        AccountCheck(
            EBS_DEFAULT, "warn", detail, fix="allow those actions on the key (key policy or IAM)", region=region
        )
    ]


def _key_manager(session: AwsSession, region: str, key: str) -> str:
    meta = _ask(session.client("kms", region), "DescribeKey", f"KMS key {key} in {region}", KeyId=key)["KeyMetadata"]
    return str(meta.get("KeyManager") or "CUSTOMER")


def _key_policy_checks(
    session: AwsSession, plan: _Plan, usable: set[str], shared_keys: Mapping[str, tuple[str, str]]
) -> list[AccountCheck]:
    keys = [(region, key, "kms_key") for region, key in plan.copies.items() if key]
    keys += [(region, key, role) for region, (key, role) in shared_keys.items()]
    if not keys:
        reason = "no region of the recipe encrypts under a customer key" if plan.recipe else _NEEDS_RECIPE
        return [AccountCheck(KEY_POLICY, "skipped", reason)]
    checks: list[AccountCheck] = []
    for region, key, role in keys:
        if region not in usable:
            checks.append(
                AccountCheck(KEY_POLICY, "skipped", f"{region} is not enabled for the account", region=region)
            )
        elif not plan.shares:
            checks.append(
                AccountCheck(
                    KEY_POLICY, "skipped", f"{role} {key}: the image is shared with no other account", None, region
                )
            )
        else:
            checks += _guarded(KEY_POLICY, region, partial(_key_policy, session, plan, region, key, role))
    return checks


def _key_policy(session: AwsSession, plan: _Plan, region: str, key: str, role: str) -> list[AccountCheck]:
    return [_key_policy_check(session, plan, region, key, role)]


def _key_policy_check(session: AwsSession, plan: _Plan, region: str, key: str, role: str) -> AccountCheck:
    kms = session.client("kms", region)
    meta = _ask(kms, "DescribeKey", f"KMS key {key} in {region}", KeyId=key)["KeyMetadata"]
    arn = str(meta["Arn"])
    name = f"{role} {key}" + (f" ({arn})" if arn != key else "")
    if meta.get("KeyManager") == "AWS":
        return AccountCheck(
            KEY_POLICY,
            "fail",
            f"{name} is AWS-managed: an image encrypted with it cannot be shared with other accounts",
            fix="use a customer-managed key whose policy lets the receiving accounts use it",
            region=region,
        )
    # GetKeyPolicy takes a key id or ARN, never an alias: the ARN DescribeKey resolved.
    text = str(_ask(kms, "GetKeyPolicy", f"the policy of {name}", KeyId=arn, PolicyName="default")["Policy"])
    try:
        policy = parse_policy(text)
    except ValueError as e:
        return AccountCheck(KEY_POLICY, "warn", f"{name}: its policy could not be read ({e})", region=region)
    verdicts = [key_access(policy, a, key_arn=arn, region=region) for a in plan.audiences()]
    return _policy_verdict(name, region, verdicts)


def _policy_verdict(name: str, region: str, verdicts: Sequence[KeyAccess]) -> AccountCheck:
    refused = [v for v in verdicts if v.verdict == "refused"]
    conditional = [v for v in verdicts if v.verdict == "conditional"]
    if refused:
        parts = []
        for v in refused:
            if v.missing:
                parts.append(f"{v.audience.label} is not allowed {', '.join(v.missing)}")
            if v.denied:
                parts.append(f"{v.audience.label} is denied {', '.join(v.denied)}")
        principals = ", ".join(
            f"arn:aws:iam::{v.audience.account}:root" if v.audience.account else v.audience.label for v in refused
        )
        return AccountCheck(
            KEY_POLICY,
            "fail",
            f"{name}: " + "; ".join(parts),
            fix=f"add a key policy statement allowing {principals} {', '.join(SHARE_ACTIONS)} (kms:CreateGrant may "
            "carry the condition kms:GrantIsForAWSResource=true), and remove any Deny that matches them",
            region=region,
        )
    if conditional:
        reasons = sorted({w for v in conditional for w in v.why})
        who = ", ".join(v.audience.label for v in conditional)
        return AccountCheck(
            KEY_POLICY,
            "warn",
            f"{name}: {who} may use it only under what a static read cannot decide ({'; '.join(reasons)})",
            fix="check that these conditions hold for the receiving accounts when they launch the image",
            region=region,
        )
    who = ", ".join(v.audience.label for v in verdicts)
    return AccountCheck(
        KEY_POLICY,
        "ok",
        f"{name}: its policy lets {who} use it (their own IAM policies must allow the same actions; not visible here)",
        region=region,
    )


# --- public sharing: block public access and the public AMIs quota ----------------------------------------------------


def _public_block(session: AwsSession, region: str) -> AccountCheck:
    ec2 = session.client("ec2", region)
    answer = _ask(ec2, "GetImageBlockPublicAccessState", f"image block public access in {region}")
    state = str(answer.get("ImageBlockPublicAccessState") or "")
    if state == "unblocked":
        return AccountCheck(PUBLIC_BLOCK, "ok", "unblocked: images can be made public", region=region)
    if answer.get("ManagedBy") == "declarative-policy":
        fix = "the organization's declarative policy blocks it: ask its administrators to allow public AMIs here"
    else:
        fix = f"aws ec2 disable-image-block-public-access --region {region}"
    return AccountCheck(
        PUBLIC_BLOCK,
        "fail",
        f"{state or 'blocked'}: the account blocks new public sharing of images in {region}",
        fix=fix,
        region=region,
    )


def _quota(session: AwsSession, region: str, code: str) -> float | None:
    """The applied value of EC2 quota `code` in `region`, or None when Service Quotas has no such quota there."""
    quotas = session.client("service-quotas", region)
    try:
        answer = _ask(quotas, "GetServiceQuota", f"EC2 quota {code} in {region}", ServiceCode="ec2", QuotaCode=code)
    except NotFound:
        return None
    return float(answer["Quota"]["Value"])


def _count_images(session: AwsSession, region: str, name: str, value: str) -> int:
    ec2 = session.client("ec2", region)
    filters = [{"Name": name, "Values": [value]}]
    return len(
        _pages(
            ec2,
            "DescribeImages",
            "Images",
            f"own images ({name}={value}) in {region}",
            Owners=["self"],
            Filters=filters,
        )
    )


def _public_quota(session: AwsSession, region: str) -> AccountCheck:
    value = _quota(session, region, PUBLIC_AMIS_QUOTA)
    source = "Service Quotas" if value is not None else "EC2's documented default"
    limit = int(value) if value is not None else PUBLIC_AMIS_DEFAULT
    public = _count_images(session, region, "is-public", "true")
    detail = f"{public} public images of a quota of {limit} ({source}, {PUBLIC_AMIS_QUOTA})"
    if public + 1 <= limit:
        return AccountCheck(PUBLIC_QUOTA, "ok", detail + ": room for this one", region=region)
    return AccountCheck(
        PUBLIC_QUOTA,
        "fail",
        detail + ": making this image public would exceed it",
        fix=f"make old public images private or retire them (amiforge retire), or request more (Service Quotas, "
        f"ec2 {PUBLIC_AMIS_QUOTA}, {region})",
        region=region,
    )


@dataclass(frozen=True)
class _CopyLimit:
    code: str | None  # the Service Quotas code EC2 lists for concurrent AMI copies, None when it lists none


def _copy_quota(session: AwsSession, plan: _Plan, region: str, found: list[_CopyLimit]) -> AccountCheck:
    if not found:
        # One look-up by name for all regions, in the bake region (quota names and codes are the same everywhere).
        quotas = session.client("service-quotas", plan.bake_region)
        try:
            listed = _pages(
                quotas, "ListServiceQuotas", "Quotas", f"EC2 quotas in {plan.bake_region}", ServiceCode="ec2"
            )
        except NotFound:  # Service Quotas lists nothing for EC2 there: the documented numbers stand
            listed = []
        code = next((str(q["QuotaCode"]) for q in listed if _COPY_QUOTA_NAME.search(str(q.get("QuotaName", "")))), None)
        found.append(_CopyLimit(code))
    code = found[0].code
    value = _quota(session, region, code) if code is not None else None
    if value is not None:
        limit, source = int(value), f"Service Quotas {code}"
    else:
        limit = COPIES_FROM_ONE_SOURCE
        source = (
            f"EC2 documents {COPIES_PER_DESTINATION} per destination region, {COPIES_FROM_ONE_SOURCE} from one source"
        )
    pending = _count_images(session, region, "state", "pending")
    detail = (
        f"distribute copies 1 image into {region} from {plan.bake_region}; {pending} own images are pending there "
        f"(copies or creations in flight); limit {limit} ({source})"
    )
    if pending + 1 <= limit:
        return AccountCheck(COPY_QUOTA, "ok", detail, region=region)
    return AccountCheck(
        COPY_QUOTA,
        "fail",
        detail + ": one more copy would be refused",
        fix=f"wait for the pending images to finish (aws ec2 describe-images --owners self --filters "
        f"Name=state,Values=pending --region {region}), then distribute",
        region=region,
    )
