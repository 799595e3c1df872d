"""`amiforge doctor --aws`: who amiforge is on AWS, which regions it can use, the least-privilege IAM policy every
amiforge operation needs (printed from the declarations in iam.py, so it never drifts from the code) — and the
day-one checks that catch, before a bake or a distribution, what would otherwise fail an hour into it.

Each check is an `AccountCheck` (ok | warn | fail | skipped, a detail and a fix), for the home region alone or, with a
recipe, for what that recipe needs:

- **region enabled**: the bake region and every distribution region, from DescribeRegions(AllRegions) OptInStatus.
  A region the account has not opted into fails here, by name — elsewhere AWS answers calls into it exactly as it
  answers bad credentials. Nothing else is asked of a region that is not enabled (its checks are skipped). A home
  region that refuses STS that way is asked no more: identity and regions come from the partition's global STS region.
- **placement**: the default VPC, or the recipe's `subnet_id` (that it exists).
- **source image**: the recipe's source resolves in the bake region as a bake resolves it, and whether it is
  encrypted (then so is the image).
- **SSM reachability** (communicator `ssm`): the builder's subnet routes 0.0.0.0/0 to an internet gateway (with
  public IPs on launch) or a NAT gateway, or its VPC has interface endpoints for ssm, ssmmessages and ec2messages;
  **SSM instance profile**: without `instance_profile` the agent registers only under Default Host Management
  Configuration. **SSH reachability** (communicator `ssh` at a public IP): the subnet routes to an internet gateway;
  **SSH ingress**: the recipe's security groups (in the builder's VPC) let TCP 22 in.
- **EBS encryption by default** and the key images end up under, per region. In the bake region: the recipe's
  `root_volume` key, else the default EBS key when encryption by default is on, `root_volume` asks for encryption or
  the source is another account's encrypted image, else the source snapshot's own key. A copy region's `kms_key`
  decides there; without one, the copy is encrypted when the baked image is or the region encrypts by default, and
  CopyImage without a KmsKeyId puts it under that region's default EBS key — distribute refuses to share such a copy,
  so the check fails with the fix (give the region a kms_key). An image under an AWS-managed key cannot be shared, an
  encrypted one cannot be public, and a customer key needs KMS permissions (and a policy for the receivers).
- **KMS key policy**: each distribution region's `kms_key` (and a customer key the baked image is under) lets the
  receiving accounts, organizations or OUs use it (key_policy.py: a static read, so "conditional" warns, never passes).
- **image block public access** in every region, when the recipe shares publicly.
- **quotas**: public AMIs per region (Service Quotas L-0E3CBAB9) against the public images there (public images in
  the Recycle Bin count too and are not listed: said in the line), and concurrent AMI copies per destination region
  against the copies already in flight.

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
from amiforge.providers.aws.iam import OPERATIONS, policy_document, policy_warnings
from amiforge.providers.aws.images import describe_image, resolve_source
from amiforge.providers.aws.key_policy import KeyAccess, audiences, grant_fix, key_access, parse_policy, refusals
from amiforge.providers.interface import AccountCheck, AccountReport, CheckStatus
from amiforge.recipe import AwsProvider as AwsSpec
from amiforge.recipe import OwnersSource, SsmSource

__all__ = [
    "COPIES_FROM_ONE_SOURCE",
    "DEFAULT_HOME_REGION",
    "PUBLIC_AMIS_QUOTA",
    "SSM_ENDPOINTS",
    "aws_report",
    "day_one_checks",
    "home_region",
]

REGION = "region enabled"
PLACEMENT = "placement"
SOURCE = "source image"
SSM_PATH = "SSM reachability"
SSM_PROFILE = "SSM instance profile"
SSH_PATH = "SSH reachability"
SSH_INGRESS = "SSH ingress"
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
# Concurrent AMI copies. An earlier edition of the EC2 User Guide's "Copy an AMI" page (Limits) said "Destination
# regions are limited to 50 concurrent AMI copies at a time, with no more than 25 of those coming from a single source
# region"; a later one said "Destination Regions are limited to 100 concurrent AMI copies" (both in the guide's source,
# github.com/awsdocs/amazon-ec2-user-guide, doc_source/CopyingAMIs.md); no current page giving a number could be read.
# So these are defaults from an older edition, not a current documented quota: the smallest one that can bind (every
# copy amiforge makes into a region comes from the bake region) stands when Service Quotas lists none. No Service
# Quotas code for it could be found with confidence (the "Concurrent AMI copies" quota L-69312229 is EC2 Image
# Builder's, per distribution configuration), so ListServiceQuotas for ec2 is searched by name.
COPIES_FROM_ONE_SOURCE = 25
COPIES_PER_DESTINATION = 50
_COPY_QUOTA_NAME = re.compile(r"\bAMI cop(y|ies)\b", re.IGNORECASE)
# The AWS-managed EBS key's alias: what GetEbsDefaultKmsKeyId answers until a customer key is made the default.
_AWS_EBS_ALIAS = "alias/aws/ebs"
_KEY_USERS = "kms:CreateGrant, kms:Decrypt, kms:DescribeKey, kms:GenerateDataKeyWithoutPlaintext and kms:ReEncrypt*"
_NEEDS_RECIPE = "pass --recipe FILE to check what a recipe needs"


# The home region when neither --region nor a recipe names one and the AWS configuration names none either.
DEFAULT_HOME_REGION = "us-east-1"
# Per partition, the region of its global STS endpoint, which every account can call: asked when the home region
# refuses STS the way an opt-in region the account has not enabled refuses everything.
_GLOBAL_STS_REGION = {"aws": "us-east-1", "aws-cn": "cn-north-1", "aws-us-gov": "us-gov-west-1"}
# What AWS answers in a region the account has not enabled — and for bad credentials (awsapi/errors.py).
_REFUSED_LIKE_BAD_CREDENTIALS = {"AuthFailure", "InvalidClientTokenId", "UnrecognizedClientException"}


def home_region(asked: str | None, spec: AwsSpec | None, configured: str | None) -> tuple[str, str]:
    """The region doctor asks from, and why: the one asked for (--region), else the recipe's, else the one the AWS
    configuration names (profile, AWS_REGION / AWS_DEFAULT_REGION), else us-east-1."""
    if asked:
        return asked, "asked for (--region)"
    if spec is not None:
        return spec.region, "the recipe's region"
    if configured:
        return configured, "the AWS configuration's region"
    return DEFAULT_HOME_REGION, f"no region configured, so {DEFAULT_HOME_REGION}"


def aws_report(
    session: AwsSession,
    spec: AwsSpec | None = None,
    *,
    parameter_prefix: str | None = None,
    region_from: str = "",
    pass_roles: Sequence[str] = (),
    kms_keys: Sequence[str] = (),
) -> AccountReport:
    """Credentials (STS GetCallerIdentity), enabled regions (EC2 DescribeRegions), the IAM policy, and the day-one
    checks for the home region or, with `spec` (a recipe's aws section), for what that recipe needs. The policy's
    iam:PassRole is on `pass_roles` and the signing actions on `kms_keys` when given; `policy_notes` says which of
    them stays open otherwise. A malformed role or key ARN is refused before AWS is asked."""
    prefix = parameter_prefix or (spec.publish.parameter_prefix if spec is not None else "/amiforge")
    policy = policy_document(OPERATIONS, parameter_prefix=prefix, pass_roles=pass_roles, kms_keys=kms_keys)
    notes = [
        AccountCheck("IAM policy", "warn", detail, fix)
        for detail, fix in policy_warnings(
            OPERATIONS, pass_roles=pass_roles, kms_keys=kms_keys, parameter_prefix=prefix
        )
    ]
    identity, asked_from = _identity(session)
    account = str(identity["Account"])
    opt_in: dict[str, str] | None = None
    region_problem: list[AccountCheck] = []
    try:
        answer = _ask(session.client("ec2", asked_from), "DescribeRegions", "regions", AllRegions=True)
        opt_in = {str(r["RegionName"]): str(r.get("OptInStatus") or "opt-in-not-required") for r in answer["Regions"]}
    except (_Denied, AmiforgeError) as e:
        region_problem = _failed(REGION, asked_from, e)
    refused = frozenset({session.region} if asked_from != session.region else ())
    if opt_in is None and refused:
        region_problem.append(_refused_home(session.region))
    enabled = tuple(sorted(n for n, s in (opt_in or {}).items() if s != "not-opted-in"))
    plan = _Plan.of(spec, session.region)
    checks = region_problem + day_one_checks(session, plan, opt_in=opt_in, account=account, refused=refused)
    return AccountReport(
        account=account,
        arn=str(identity["Arn"]),
        region=session.region,
        regions=enabled,
        policy=policy,
        checks=tuple(checks),
        region_from=region_from,
        policy_notes=tuple(notes),
    )


def _identity(session: AwsSession) -> tuple[Mapping[str, Any], str]:
    """STS GetCallerIdentity from the home region and the region that answered. A home region that refuses it as
    it refuses bad credentials may be an opt-in region the account has not enabled: the partition's global STS
    region is asked once more, and if it answers, the credentials are good and the region check says why the home
    region refused. If it refuses too, the first refusal stands (with its fix naming both causes)."""
    partition = session.boto_session.get_partition_for_region(session.region)
    fallback = _GLOBAL_STS_REGION.get(partition, DEFAULT_HOME_REGION)
    first: AmiforgeError | None = None
    for region in dict.fromkeys((session.region, fallback)):
        try:
            return call(session.client("sts", region), "GetCallerIdentity", "the caller"), region
        except AmiforgeError as e:
            if first is None and aws_code(e) not in _REFUSED_LIKE_BAD_CREDENTIALS:
                raise
            first = first or e
    assert first is not None  # every region asked refused
    raise first  # the home region's refusal, with its cause (the ClientError aws_code reads)


def _refused_home(region: str) -> AccountCheck:
    return AccountCheck(
        REGION,
        "fail",
        "home region: refuses calls as AWS refuses them in an opt-in region the account has not enabled, while the "
        "same credentials work elsewhere",
        fix=f"enable {region} in the account settings (aws account enable-region --region-name {region}), or ask "
        "from another region (--region)",
        region=region,
    )


@dataclass(frozen=True)
class _Plan:
    """What the checks need from a recipe (or, without one, the home region and the defaults)."""

    bake_region: str
    recipe: bool
    copies: Mapping[str, str | None] = field(default_factory=dict)  # destination region → its kms_key, in order
    subnet_id: str | None = None
    communicator: str = "ssm"
    ssh_interface: str = "public_ip"
    security_group_ids: tuple[str, ...] = ()
    instance_profile: str | None = None
    source: OwnersSource | SsmSource | None = None
    instance_type: str | None = None
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
            security_group_ids=tuple(spec.security_group_ids),
            instance_profile=spec.instance_profile,
            source=spec.source,
            instance_type=spec.instance_type,
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

    def copy_field(self, region: str) -> str:
        """The recipe field of a copy region's key, as the fix names it."""
        return f"distribution.regions[{list(self.copies).index(region)}].kms_key"


@dataclass
class _Found:
    """What one check learns that a later one needs: the source image and the baked image's encryption."""

    source_encrypted: bool | None = None  # None: not known (no recipe, the source did not resolve)
    source_owned: bool = False
    source_key: str | None = None  # the key of an encrypted source of this account (its snapshots' KmsKeyId)
    baked_encrypted: bool | None = None  # None: not known (the bake region was not checked, or could not tell)
    baked_why: str = ""
    shared_keys: dict[str, tuple[str, str]] = field(default_factory=dict)  # region → (customer key, its role)


def day_one_checks(
    session: AwsSession,
    plan: _Plan,
    *,
    opt_in: Mapping[str, str] | None,
    account: str,
    refused: frozenset[str] = frozenset(),
) -> list[AccountCheck]:
    """Every check, in the order a person fixes them: regions, network, source, encryption, keys, public sharing,
    quotas. `refused`: regions known to refuse calls (checked no further)."""
    checks: list[AccountCheck] = []
    usable = set(plan.regions)
    if opt_in is not None:
        region_checks = [_region_check(plan, region, opt_in, account) for region in plan.regions]
        usable = {c.region for c in region_checks if c.status == "ok" and c.region}
        checks += region_checks
    usable -= refused

    def each(name: str, regions: Iterable[str], work: Callable[[str], list[AccountCheck]]) -> None:
        for region in regions:
            if region not in usable:
                checks.append(AccountCheck(name, "skipped", f"{region} is not enabled for the account", region=region))
            else:
                checks.extend(_guarded(name, region, partial(work, region)))

    found = _Found()
    each(PLACEMENT, [plan.bake_region], lambda region: _placement(session, plan, region))
    if plan.source is None:
        checks.append(AccountCheck(SOURCE, "skipped", _NEEDS_RECIPE))
    else:
        each(SOURCE, [plan.bake_region], lambda region: _source(session, plan, region, account, found))
    # The bake region first: whether the image is encrypted decides what a copy region without a kms_key gets.
    each(EBS_DEFAULT, plan.regions, lambda region: _ebs_default(session, plan, region, found))
    checks += _key_policy_checks(session, plan, usable, found.shared_keys)
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
        limits: list[_CopyLimit] = []
        each(COPY_QUOTA, plan.copies, lambda region: [_copy_quota(session, plan, region, limits)])
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
        checks += _guarded(SSH_INGRESS, region, lambda: [_ssh_ingress(ec2, plan, region, vpc_id)])
    else:
        checks += _guarded(SSM_PATH, region, lambda: [_ssm_path(ec2, region, vpc_id, subnets)])
        checks.append(_ssm_profile(plan, region))
    return checks


def _ssm_profile(plan: _Plan, region: str) -> AccountCheck:
    """The SSM agent registers with the instance profile's role, or — with none — only under Default Host Management
    Configuration (DHMC: an account-and-region setting of Systems Manager that gives instances a role of its own).
    Whether DHMC is on is a Systems Manager service setting this check does not read."""
    if not plan.recipe:
        return AccountCheck(SSM_PROFILE, "skipped", _NEEDS_RECIPE)
    if plan.instance_profile is not None:
        return AccountCheck(
            SSM_PROFILE,
            "ok",
            f"instance_profile {plan.instance_profile} (its role needs AmazonSSMManagedInstanceCore: not read here)",
            region=region,
        )
    return AccountCheck(
        SSM_PROFILE,
        "warn",
        "the recipe names no instance_profile: the builder's SSM agent can register only if Default Host Management "
        f"Configuration is turned on in {region} (and the instance meets its conditions: IMDSv2, a recent agent); "
        "otherwise the bake times out waiting for the agent",
        fix="set provider.instance_profile to an instance profile whose role has AmazonSSMManagedInstanceCore, or "
        f"turn on Default Host Management Configuration in {region} (Systems Manager → Fleet Manager, or aws ssm "
        "register-default-host-management-configuration)",
        region=region,
    )


def _ssh_path(ec2: Any, plan: _Plan, region: str, vpc_id: str, subnets: Sequence[Mapping[str, Any]]) -> AccountCheck:
    """communicator ssh: amiforge connects from this machine to a public IP it requests at launch, which works only in
    a subnet whose default route is an internet gateway; a private address depends on a way into the VPC (VPN,
    peering) that the account does not show. The security groups are `_ssh_ingress`'s."""
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


def _ssh_ingress(ec2: Any, plan: _Plan, region: str, vpc_id: str) -> AccountCheck:
    """The recipe's security groups: in the builder's VPC, and some ingress rule lets TCP 22 in. Only 0.0.0.0/0
    certainly includes this machine: which address it reaches the builder from is not visible from AWS, so narrower
    sources warn (IPv6 ranges do not count: amiforge connects over IPv4)."""
    wanted = list(plan.security_group_ids)
    named = ", ".join(wanted)
    try:
        groups = _pages(
            ec2, "DescribeSecurityGroups", "SecurityGroups", f"security groups {named}", page_size=None, GroupIds=wanted
        )
    except NotFound as e:
        groups, missing_why = [], e.message
    else:
        missing_why = ""
    missing = sorted(set(wanted) - {str(g["GroupId"]) for g in groups})
    if missing:
        return AccountCheck(
            SSH_INGRESS,
            "fail",
            f"security group {', '.join(missing)} does not exist in {region}"
            + (f" ({missing_why})" if missing_why else ""),
            fix="check provider.security_group_ids and provider.region in the recipe",
            region=region,
        )
    elsewhere = [g for g in groups if g.get("VpcId") != vpc_id]
    if elsewhere:
        strays = ", ".join(f"{g['GroupId']} is in {g.get('VpcId')}" for g in elsewhere)
        return AccountCheck(
            SSH_INGRESS,
            "fail",
            f"{strays}, but the builder launches in {vpc_id}: EC2 refuses a security group of another VPC",
            fix=f"use security groups of {vpc_id}, or set subnet_id to a subnet of their VPC",
            region=region,
        )
    anywhere: list[str] = []
    narrower: list[str] = []
    for group in groups:
        for rule in group.get("IpPermissions", []):
            if not _lets_port_22_in(rule):
                continue
            for cidr in (str(r.get("CidrIp")) for r in rule.get("IpRanges", [])):
                (anywhere if cidr == "0.0.0.0/0" else narrower).append(f"{cidr} ({group['GroupId']})")
            narrower += [f"prefix list {r['PrefixListId']}" for r in rule.get("PrefixListIds", [])]
            narrower += [f"members of {r['GroupId']}" for r in rule.get("UserIdGroupPairs", [])]
    if anywhere:
        return AccountCheck(SSH_INGRESS, "ok", f"TCP 22 is let in from anywhere: {', '.join(anywhere)}", region=region)
    if narrower:
        return AccountCheck(
            SSH_INGRESS,
            "warn",
            f"TCP 22 is let in only from {', '.join(narrower)}: whether this machine's address is among them cannot "
            "be seen from AWS",
            fix="make sure the address this machine reaches the builder from "
            + ("(its public IP) " if plan.ssh_interface == "public_ip" else "(inside the VPC, VPN or peering) ")
            + "is in one of them",
            region=region,
        )
    return AccountCheck(
        SSH_INGRESS,
        "fail",
        f"no ingress rule of {named} lets TCP 22 in: amiforge could not reach the builder over SSH",
        fix=f"aws ec2 authorize-security-group-ingress --group-id {wanted[0]} --protocol tcp --port 22 --cidr "
        f"<this machine's address>/32 --region {region}",
        region=region,
    )


def _lets_port_22_in(rule: Mapping[str, Any]) -> bool:
    protocol = str(rule.get("IpProtocol", ""))
    if protocol == "-1":  # all traffic
        return True
    if protocol not in ("tcp", "6"):
        return False
    return int(rule.get("FromPort", -1)) <= 22 <= int(rule.get("ToPort", -1))


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


# --- the source image: it resolves, and whether it is encrypted ------------------------------------------------------


def _source(session: AwsSession, plan: _Plan, region: str, account: str, found: _Found) -> list[AccountCheck]:
    """The recipe's source resolved as a bake resolves it (owner-pinned, the instance type's architecture), and
    whether its snapshots are encrypted: then so is the image. DescribeImages says so per mapping; where it does not,
    and for the key an encrypted source of this account keeps, DescribeSnapshots does (the root device's first)."""
    assert plan.source is not None
    resolved = resolve_source(plan.source, session, region, instance_type=plan.instance_type)
    image = describe_image(session, region, resolved.image_id)
    root = image.get("RootDeviceName")
    mappings = sorted(image.get("BlockDeviceMappings", []), key=lambda m: m.get("DeviceName") != root)
    ebs = [m["Ebs"] for m in mappings if m.get("Ebs", {}).get("SnapshotId")]
    found.source_owned = resolved.owner == account
    looked_up = [str(e["SnapshotId"]) for e in ebs if "Encrypted" not in e or (found.source_owned and e["Encrypted"])]
    snapshots: dict[str, Mapping[str, Any]] = {}
    if looked_up:
        ec2 = session.client("ec2", region)
        listed = _pages(
            ec2, "DescribeSnapshots", "Snapshots", ", ".join(looked_up), page_size=None, SnapshotIds=looked_up
        )
        snapshots = {str(s["SnapshotId"]): s for s in listed}
    encrypted = [
        str(e["SnapshotId"])
        for e in ebs
        if e.get("Encrypted", snapshots.get(str(e["SnapshotId"]), {}).get("Encrypted"))
    ]
    found.source_encrypted = bool(encrypted)
    where = f"{resolved.image_id} ({resolved.name}, owner {resolved.owner})"
    if not encrypted:
        return [AccountCheck(SOURCE, "ok", f"{where}: not encrypted", region=region)]
    detail = f"{where}: encrypted, so the image will be too"
    if found.source_owned:
        keys = [str(snapshots[i]["KmsKeyId"]) for i in encrypted if snapshots.get(i, {}).get("KmsKeyId")]
        found.source_key = keys[0] if keys else None
        if keys:
            detail += f" (under {', '.join(dict.fromkeys(keys))}, which the builder's volumes keep)"
    else:
        detail += " (another account's image: the builder's volume is encrypted under this account's default EBS key)"
    return [AccountCheck(SOURCE, "ok", detail, region=region)]


# --- encryption: EBS encryption by default, and the key policies of shared encrypted images --------------------------


def _ebs_default(session: AwsSession, plan: _Plan, region: str, found: _Found) -> list[AccountCheck]:
    """EBS encryption by default in `region` and the key images made there end up under: the bake region's decides
    whether the image is encrypted (recorded in `found`), which a copy region without a kms_key then inherits."""
    ec2 = session.client("ec2", region)
    on = bool(
        _ask(ec2, "GetEbsEncryptionByDefault", f"EBS encryption by default in {region}")["EbsEncryptionByDefault"]
    )
    if region == plan.bake_region:
        return [_bake_encryption(session, plan, region, on, found)]
    return [_copy_encryption(session, plan, region, on, found)]


def _default_key(session: AwsSession, region: str) -> str:
    ec2 = session.client("ec2", region)
    return str(_ask(ec2, "GetEbsDefaultKmsKeyId", f"the default EBS key in {region}")["KmsKeyId"])


def _bake_encryption(session: AwsSession, plan: _Plan, region: str, on: bool, found: _Found) -> AccountCheck:
    """The key the builder's root volume, and so the image, is under — as EBS picks it at launch ("Use encryption
    with EBS-backed AMIs", EC2 User Guide): the recipe's root_volume.kms_key; else an encrypted source snapshot this
    account owns keeps its own key; else the default EBS key when encryption by default is on, root_volume asks for
    encryption, or the source is another account's encrypted image; else the image is not encrypted."""
    setting = "on" if on else "off"
    if plan.root_kms_key:
        key, role = plan.root_kms_key, "root_volume.kms_key"
        why = f"the recipe's root_volume.kms_key {key} encrypts the image"
    elif found.source_encrypted and found.source_owned and found.source_key:
        key, role = found.source_key, "the source image's key"
        why = f"the source image is encrypted under {key}, which the image keeps"
    elif on or plan.root_encrypted or found.source_encrypted:
        key, role = _default_key(session, region), "default EBS key"
        why = (
            "EBS encryption by default encrypts the image"
            if on
            else "the recipe's root_volume asks for encryption"
            if plan.root_encrypted
            else "the source image is another account's and encrypted"
        )
        why += f", under the default key {key}"
    else:
        found.baked_encrypted = False if found.source_encrypted is not None or not plan.recipe else None
        if found.baked_encrypted is None:
            detail = (
                "off: the image is encrypted only if the source image is, which is not known (the source image line)"
            )
        else:
            detail = (
                "off: the image is not encrypted (neither the recipe's root_volume nor the source image asks for it)"
            )
        return AccountCheck(EBS_DEFAULT, "ok", detail, region=region)
    found.baked_encrypted, found.baked_why = True, why
    return _key_verdict(session, plan, region, f"{setting}; {why}", key, role, found, baked_here=True)


def _copy_encryption(session: AwsSession, plan: _Plan, region: str, on: bool, found: _Found) -> AccountCheck:
    """A copy region: its kms_key decides. Without one, CopyImage (sent without Encrypted or KmsKeyId) keeps the
    image's encryption and adds the region's encryption by default ("you cannot create an unencrypted copy of an
    encrypted snapshot"; encryption by default "has the same effect as setting Encrypted"), and an encrypted copy is
    under the key the API reference names for a request without KmsKeyId: the region's default key for EBS, the
    AWS-managed aws/ebs unless another was made the default. distribute refuses to share such a copy (a key it did not
    name), so sharing fails here with the fix: name a kms_key for the region."""
    setting = "on" if on else "off"
    if plan.copies.get(region):
        return AccountCheck(EBS_DEFAULT, "ok", f"{setting}; copies here use the recipe's kms_key", region=region)
    field_name = plan.copy_field(region)
    if found.baked_encrypted:
        why = f"the image is encrypted ({found.baked_why})"
    elif on:
        why = "EBS encryption by default encrypts copies made here"
    elif found.baked_encrypted is None:
        if not (plan.public or plan.shares):
            return AccountCheck(EBS_DEFAULT, "ok", "off; copies here are encrypted only if the image is", region=region)
        return AccountCheck(
            EBS_DEFAULT,
            "warn",
            "off; whether the image is encrypted is not known (the bake region's lines): if it is, copies here land "
            "under this region's default EBS key, which distribute does not share",
            fix=f"set {field_name} to a customer-managed key in {region} whose policy lets the receiving accounts use "
            "it",
            region=region,
        )
    else:
        return AccountCheck(EBS_DEFAULT, "ok", "off; copies here stay unencrypted, as the image is", region=region)
    if plan.public:
        return AccountCheck(
            EBS_DEFAULT,
            "fail",
            f"{setting}; {why}: copies made here are encrypted, and an encrypted image cannot be made public",
            fix=f"drop public: true, or the encryption (the recipe's root_volume; EBS encryption by default: aws ec2 "
            f"disable-ebs-encryption-by-default --region {region} and in {plan.bake_region})",
            region=region,
        )
    if plan.shares:
        return AccountCheck(
            EBS_DEFAULT,
            "fail",
            f"{setting}; {why}: the region has no kms_key, so CopyImage encrypts the copy under {region}'s default EBS "
            "key (the AWS-managed aws/ebs unless another was made the default) — an AWS-managed key cannot be shared "
            "with other accounts, and distribute refuses to share a copy under a key the recipe does not name",
            fix=f"set {field_name} to a customer-managed key in {region} whose policy lets the receiving accounts use "
            "it",
            region=region,
        )
    key = _default_key(session, region)
    return _key_verdict(session, plan, region, f"{setting}; {why}, under the default key {key}", key, "", found)


def _key_verdict(
    session: AwsSession,
    plan: _Plan,
    region: str,
    setting: str,
    key: str,
    role: str,
    found: _Found,
    *,
    baked_here: bool = False,
) -> AccountCheck:
    """What an image encrypted under `key` in `region` allows: no public sharing; no sharing under an AWS-managed
    key; under a customer key, KMS permissions for amiforge (and its policy checked for the receivers)."""
    what = "images baked here" if baked_here else "copies made here (the region has no kms_key)"
    if plan.public:
        return AccountCheck(
            EBS_DEFAULT,
            "fail",
            f"{setting}: {what} are encrypted, and an encrypted image cannot be made public",
            fix=f"drop public: true, or encryption (the recipe's root_volume; EBS encryption by default: aws ec2 "
            f"disable-ebs-encryption-by-default --region {region})",
            region=region,
        )
    if key == _AWS_EBS_ALIAS or _key_manager(session, region, key) == "AWS":
        if not plan.shares:
            return AccountCheck(
                EBS_DEFAULT, "ok", f"{setting} (AWS-managed): {what} stay in this account", None, region
            )
        if plan.root_kms_key:
            fix = "give root_volume a customer-managed kms_key whose policy lets the receiving accounts use it"
        else:
            fix = (
                f"give root_volume a customer-managed kms_key, or make one the default (aws ec2 "
                f"modify-ebs-default-kms-key-id --kms-key-id KEY --region {region}); its policy must let the "
                "receiving accounts use it"
            )
        return AccountCheck(
            EBS_DEFAULT,
            "fail",
            f"{setting} (AWS-managed): {what} are encrypted under it and cannot be shared with other accounts",
            fix=fix,
            region=region,
        )
    detail = (
        f"{setting} (customer-managed): the builder's volumes are encrypted with it, so the identity amiforge runs as "
        f"needs {_KEY_USERS} on it"
        if baked_here
        else f"{setting} (customer-managed): CopyImage encrypts with it, so the identity amiforge runs as needs "
        f"{_KEY_USERS} on it"
    )
    if plan.shares:
        found.shared_keys[region] = (key, role)
        detail += "; the receiving accounts must be allowed to use it too (the KMS key policy check)"
    return AccountCheck(
        EBS_DEFAULT, "warn", detail, fix="allow those actions on the key (key policy or IAM)", region=region
    )


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
    receivers = audiences(plan.accounts, plan.organizations, plan.organizational_units)
    verdicts = [key_access(policy, a, key_arn=arn, region=region) for a in receivers]
    return _policy_verdict(name, region, verdicts)


def _policy_verdict(name: str, region: str, verdicts: Sequence[KeyAccess]) -> AccountCheck:
    conditional = [v for v in verdicts if v.verdict == "conditional"]
    refused = refusals(verdicts)
    if refused is not None:
        return AccountCheck(KEY_POLICY, "fail", f"{name}: {refused}", fix=grant_fix(verdicts), region=region)
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
    # The quota also counts public images in the Recycle Bin ("AMI quotas", EC2 User Guide), which DescribeImages
    # does not list, and ListImagesInRecycleBin does not say which are public: said, not counted.
    detail = (
        f"{public} public images of a quota of {limit} ({source}, {PUBLIC_AMIS_QUOTA}); public images in the Recycle "
        "Bin count too and are not listed here"
    )
    if public + 1 <= limit:
        return AccountCheck(PUBLIC_QUOTA, "ok", detail + ": room for this one", region=region)
    return AccountCheck(
        PUBLIC_QUOTA,
        "fail",
        detail + ": making this image public would exceed it",
        fix=f"make old public images private or retire them (amiforge retire; empty the Recycle Bin of public ones), "
        f"or request more (Service Quotas, ec2 {PUBLIC_AMIS_QUOTA}, {region})",
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
        except NotFound:  # Service Quotas lists nothing for EC2 there: the defaults above stand
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
            f"a default from an older EC2 User Guide: {COPIES_PER_DESTINATION} per destination region, "
            f"{COPIES_FROM_ONE_SOURCE} of them from one source region; Service Quotas lists none"
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
