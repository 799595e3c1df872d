"""Where a recipe is baked: the base layer, and the `provider:` section (local, or AWS with its source image,
distribution and publishing).

These are the recipe's words for a provider, validated like every other part of the file; the providers
themselves (amiforge.providers) read them and never the other way round. The AWS part is most of this module:
an owner-pinned source image, the network a builder runs in, where `distribute` copies the image and what
`promote` publishes.
"""

from __future__ import annotations

import re
from typing import Annotated, Literal

from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    Discriminator,
    Field,
    Tag,
    ValidationInfo,
    WithJsonSchema,
    field_validator,
    model_validator,
)

from amiforge.model import AWS_REGION_PATTERN
from amiforge.recipe.fields import STRICT, PackageName, PosixName
from amiforge.yamlfile import NonEmptyStr, fail, matching, short, yaml_type

__all__ = [
    "PROVIDER_TAGS",
    "AwsProvider",
    "Base",
    "Distribution",
    "LocalProvider",
    "OwnersSource",
    "Provider",
    "Publish",
    "RegionCopy",
    "RootVolume",
    "Source",
    "SsmSource",
]


# ----------------------------------------------------------------------------------------------------------
# Base image and the local provider


def _check_suite(value: object) -> object:
    if value != "bookworm":
        raise fail(
            f"suite {short(value)} is not supported: only 'bookworm' is served by the Debian mirror amiforge uses",
            "use suite: bookworm",
        )
    return value


class Base(BaseModel):
    """The base layer the local provider builds with mmdebstrap."""

    model_config = STRICT

    distro: Literal["debian"] = "debian"
    suite: Annotated[Literal["bookworm"], BeforeValidator(_check_suite)] = "bookworm"
    packages: list[PackageName] = Field(default_factory=list, description="extra packages in the base layer")


class LocalProvider(BaseModel):
    """Bake with mmdebstrap + chroot and boot under QEMU on this machine."""

    model_config = STRICT

    type: Literal["local"] = "local"


# ----------------------------------------------------------------------------------------------------------
# AWS: identifiers


_ACCOUNT_RE = r"[0-9]{12}"
_OWNER_ALIASES = ("amazon", "self", "aws-marketplace")
_ORG_ARN_RE = r"arn:aws[a-z-]*:organizations::[0-9]{12}:organization/o-[a-z0-9]{10,32}"
_OU_ARN_RE = r"arn:aws[a-z-]*:organizations::[0-9]{12}:ou/o-[a-z0-9]{10,32}/ou-[0-9a-z]{4,32}-[a-z0-9]{8,32}"

AwsRegion = Annotated[str, *matching(AWS_REGION_PATTERN, "AWS region", "like us-east-1 or eu-west-3", "'eu-west-1'")]
InstanceType = Annotated[
    str, *matching(r"[a-z0-9-]+\.[a-z0-9-]+", "EC2 instance type", "family.size like t3.micro", "'t3.micro'")
]
SubnetId = Annotated[
    str, *matching(r"subnet-[0-9a-f]{8,17}", "subnet id", "subnet-<hex>", "'subnet-0123456789abcdef0'")
]
SecurityGroupId = Annotated[
    str, *matching(r"sg-[0-9a-f]{8,17}", "security group id", "sg-<hex>", "'sg-0123456789abcdef0'")
]
AccountId = Annotated[str, *matching(_ACCOUNT_RE, "AWS account id", "12 digits", "'123456789012'")]
OrgArn = Annotated[
    str, *matching(_ORG_ARN_RE, "organization ARN", "arn:aws:organizations::<account>:organization/o-<id>", "its ARN")
]
OuArn = Annotated[
    str, *matching(_OU_ARN_RE, "organizational-unit ARN", "arn:aws:organizations::<acct>:ou/o-<org>/ou-<id>", "its ARN")
]
SsmPrefix = Annotated[
    str, *matching(r"(?:/[A-Za-z0-9_.-]+)+", "SSM parameter prefix", "an absolute path without trailing /", "/amiforge")
]


def _check_owner(value: str) -> str:
    if re.fullmatch(_ACCOUNT_RE, value) is None and value not in _OWNER_ALIASES:
        raise fail(
            f"{short(value)} is not an image owner: use a 12-digit AWS account id or one of "
            f"{', '.join(_OWNER_ALIASES)}",
            'e.g. owners: ["136693071363"] (Debian\'s account; quote account ids) or owners: [amazon] (Amazon Linux)',
        )
    return value


Owner = Annotated[
    str,
    AfterValidator(_check_owner),
    WithJsonSchema({"anyOf": [{"type": "string", "pattern": f"^{_ACCOUNT_RE}$"}, {"enum": list(_OWNER_ALIASES)}]}),
]


def _check_ssm_parameter(value: str) -> str:
    if not value.startswith("/") or len(value) < 2:
        raise fail(
            f"ssm_parameter {short(value)} must be a full parameter name starting with '/'",
            "e.g. ssm_parameter: /aws/service/debian/release/bookworm/latest/amd64",
        )
    return value


# ----------------------------------------------------------------------------------------------------------
# AWS: the source image


class OwnersSource(BaseModel):
    """The newest image matching a name filter, among images of pinned owners only (never a name alone)."""

    model_config = STRICT

    owners: list[Owner] = Field(
        min_length=1,
        description="the publishers' account ids or aliases (amazon, self, aws-marketplace); Debian publishes its "
        "images from its own account '136693071363', not amazon",
    )
    name: NonEmptyStr = Field(
        description="image name filter; * and ? wildcards allowed (e.g. debian-12-amd64-*); only images of the "
        "instance type's architecture are considered"
    )
    most_recent: bool = True


class SsmSource(BaseModel):
    """An image id published in an SSM parameter (the owner is whoever controls the parameter path)."""

    model_config = STRICT

    ssm_parameter: Annotated[str, AfterValidator(_check_ssm_parameter)] = Field(
        description="parameter holding an ami-… id, e.g. /aws/service/debian/release/bookworm/latest/amd64; its image "
        "must be of the instance type's architecture (…/arm64 for Graviton types)"
    )


def _check_source(value: object) -> object:
    if isinstance(value, OwnersSource | SsmSource):
        return value
    if not isinstance(value, dict):
        raise fail(
            f"source must be a mapping, got {yaml_type(value)}",
            "use {owners: ['136693071363'], name: 'debian-12-amd64-*'} (Debian's own account) "
            "or {ssm_parameter: /aws/service/debian/release/bookworm/latest/amd64}",
        )
    has_ssm = "ssm_parameter" in value
    if has_ssm and ("owners" in value or "name" in value):
        raise fail(
            "source has both ssm_parameter and owners/name; it must be one or the other",
            "keep either ssm_parameter, or owners + name",
        )
    if not has_ssm and not value.get("owners"):
        # A name filter alone lets anyone publish a matching public AMI ("whoAMI" name squatting; architecture.md §8).
        raise fail(
            "source has no owners: an image looked up by name alone can be any account's public image "
            "(the 'whoAMI' name-squatting attack), so owners are required",
            "add owners with the 12-digit account id publishing the image (Debian: '136693071363'; "
            "Amazon Linux: amazon), or use ssm_parameter",
            key="owners",
        )
    return value


def _source_tag(value: object) -> str | None:
    if isinstance(value, SsmSource) or (isinstance(value, dict) and "ssm_parameter" in value):
        return "<ssm_parameter>"
    return "<owners>"


Source = Annotated[
    Annotated[OwnersSource, Tag("<owners>")] | Annotated[SsmSource, Tag("<ssm_parameter>")],
    Discriminator(_source_tag),
    BeforeValidator(_check_source),
]


# ----------------------------------------------------------------------------------------------------------
# AWS: distribution, publishing, and the provider section itself


class RegionCopy(BaseModel):
    """One region `amiforge distribute` copies the image to, encrypted with that region's KMS key."""

    model_config = STRICT

    region: AwsRegion
    kms_key: NonEmptyStr | None = Field(
        default=None, description="KMS key (id, ARN or alias) in that region; needed to share an encrypted image"
    )


class Distribution(BaseModel):
    """Where `amiforge distribute` copies the image and whom it shares it with (orgs/OUs preferred to accounts)."""

    model_config = STRICT

    regions: list[RegionCopy] = Field(default_factory=list, description="copies besides the bake region")
    accounts: list[AccountId] = Field(default_factory=list, description="accounts that may launch the image")
    organizations: list[OrgArn] = Field(default_factory=list, description="organizations that may launch it")
    organizational_units: list[OuArn] = Field(default_factory=list, description="OUs that may launch it")
    public: bool = Field(default=False, description="share with everyone; distribute also needs --public")


class Publish(BaseModel):
    """What a promotion writes in every region holding the image: an SSM parameter per channel and, optionally,
    a new default version of a launch template (with the numeric AMI id, never $Latest)."""

    model_config = STRICT

    parameter_prefix: SsmPrefix = "/amiforge"
    launch_template: NonEmptyStr | None = Field(
        default=None, description="launch template (same name in each region) whose default follows the channel"
    )
    accounts: list[AccountId] = Field(
        default_factory=list,
        description="also publish the parameter in these accounts (through the role aws_roles names for each); "
        "the image must be shared with them (distribution)",
    )


# What each communicator needs from the account and the image: `amiforge recipe schema` shows these words.
SSM_NEEDS = (
    "ssm (default): steps run through SSM Run Command, no inbound port. Needs an instance_profile whose role has "
    "AmazonSSMManagedInstanceCore, a source image that runs the SSM agent (Amazon Linux and Ubuntu do; Debian's "
    "official images do not) and has OpenSSL 1.1.1 or later (uploads are encrypted to a key made on the instance; "
    "Amazon Linux 2 needs its openssl11 package), and a route from the subnet to the SSM endpoints (internet or NAT, "
    "or VPC interface endpoints for ssm, ssmmessages and ec2messages)"
)
SSH_NEEDS = (
    "ssh: steps run over SSH with a throw-away key pair (imported for the run, deleted after it) and host keys pinned "
    "from the instance's console. Needs security_group_ids with a group allowing TCP 22 from the host running "
    "amiforge (none is created for you), a public IP (ssh_interface: public_ip, requested at launch) or a private "
    "address routable from this host (private_ip), and cloud-init on the image printing the SSH host keys on the "
    "console (Debian's official images do; their user is admin)"
)
_SSH_GROUPS_FIX = (
    "add provider.security_group_ids: [sg-…], a group allowing inbound TCP 22 from the address amiforge runs from "
    "(e.g. aws ec2 authorize-security-group-ingress --group-id sg-… --protocol tcp --port 22 --cidr <your IP>/32); "
    "or use communicator: ssm"
)
_IOPS_TYPES = ("io1", "io2", "gp3")


class RootVolume(BaseModel):
    """The builder's root volume, launched from the source image's root snapshot; the image keeps its size, type and
    encryption. Unset fields keep the source image's (size, type) or the account's EBS default (encryption)."""

    model_config = STRICT

    size_gib: int | None = Field(
        default=None, ge=1, le=65536, description="size in GiB; at least the source image's root snapshot"
    )
    type: Literal["gp3", "gp2", "io1", "io2", "standard"] | None = Field(default=None, description="EBS volume type")
    iops: int | None = Field(default=None, ge=100, le=256000, description="provisioned IOPS (io1/io2: required)")
    encrypted: bool | None = Field(
        default=None,
        description="true: encrypt the volume (and so the image's snapshot); kms_key implies it. Unset or false: as "
        "the source snapshot and the account's EBS encryption default have it (EBS never removes encryption)",
    )
    kms_key: NonEmptyStr | None = Field(
        default=None, description="KMS key (id, ARN or alias) for the encryption; default: the account's EBS key"
    )

    @model_validator(mode="after")
    def _consistent(self) -> RootVolume:
        if self.kms_key is not None and self.encrypted is False:
            raise fail(
                "kms_key is set but encrypted is false: a KMS key only applies to an encrypted volume",
                "drop encrypted: false, or drop kms_key",
                key="encrypted",
            )
        if self.type in ("io1", "io2") and self.iops is None:
            raise fail(f"a {self.type} volume needs iops", "add iops: 3000 (or another value)", key="iops")
        if self.iops is not None and self.type not in _IOPS_TYPES:
            raise fail(
                f"iops applies to {', '.join(_IOPS_TYPES)} volumes, not {self.type or 'the source image’s type'}",
                "set type: gp3 (or io1/io2), or drop iops",
                key="iops",
            )
        return self


class AwsProvider(BaseModel):
    """Bake on EC2 from an owner-pinned source image. The communicator is how amiforge runs steps and checks on the
    builder and the boot-test instance: ssm (SSM Run Command) or ssh (a throw-away key pair)."""

    model_config = STRICT

    type: Literal["aws"]
    region: AwsRegion
    instance_type: InstanceType = Field(
        default="t3.micro", description="builder instance type; the source image must be of its architecture"
    )
    source: Source
    communicator: Literal["ssm", "ssh"] = Field(default="ssm", description=f"{SSM_NEEDS}. {SSH_NEEDS}")
    ssh_username: PosixName = Field(
        default="admin", description="communicator ssh: the image's default user (Debian: admin, Ubuntu: ubuntu)"
    )
    ssh_interface: Literal["public_ip", "private_ip"] = Field(
        default="public_ip",
        description="communicator ssh: reach the instance at a public IP requested at launch (the subnet must route "
        "to an internet gateway), or at its private address (a VPN, peering or a host in the VPC)",
    )
    subnet_id: SubnetId | None = Field(
        default=None, description="subnet for builder and boot-test instances; default: the default VPC's"
    )
    security_group_ids: list[SecurityGroupId] = Field(
        default_factory=list,
        description="security groups for builder and boot-test instances: none inbound for ssm; for ssh, one "
        "allowing TCP 22 from the host running amiforge (required)",
    )
    instance_profile: NonEmptyStr | None = Field(
        default=None,
        description="instance profile (name or ARN); for ssm its role needs AmazonSSMManagedInstanceCore",
    )
    boot_test_instance_type: InstanceType | None = Field(
        default=None,
        description="instance type of the boot test (same architecture as the image); default: instance_type",
    )
    root_volume: RootVolume | None = Field(
        default=None, description="the builder's root volume (size, type, encryption); default: the source image's"
    )
    imds_support: Literal["v2.0", "none"] | None = Field(
        default="v2.0",
        description="v2.0: instances launched from the image require IMDSv2 (set on the image once it exists; it "
        "cannot be undone); none (or null): leave the image's metadata options alone",
    )
    distribution: Distribution = Field(default_factory=lambda: Distribution(), description="amiforge distribute")
    publish: Publish = Field(default_factory=lambda: Publish(), description="what promote writes per channel")

    @model_validator(mode="after")
    def _communicator_settings(self) -> AwsProvider:
        if self.communicator == "ssh" and not self.security_group_ids:
            # A group open to 0.0.0.0/0 made behind the user's back is exactly what must not happen.
            raise fail(
                "communicator ssh needs security_group_ids: amiforge creates no group, and the VPC's default group "
                "lets no SSH in from outside",
                _SSH_GROUPS_FIX,
                key="security_group_ids",
            )
        if self.communicator == "ssm":
            # By value, not by presence: a recipe stored with its version is dumped with every default.
            defaults = type(self).model_fields
            stray = [k for k in ("ssh_username", "ssh_interface") if getattr(self, k) != defaults[k].default]
            if stray:
                raise fail(
                    f"{', '.join(stray)} only apply to communicator: ssh, and this recipe uses ssm",
                    "add communicator: ssh, or drop " + " and ".join(stray),
                    key=stray[0],
                )
        return self

    @field_validator("distribution")
    @classmethod
    def _copies_go_elsewhere(cls, value: Distribution, info: ValidationInfo) -> Distribution:
        home = info.data.get("region")
        seen: set[str] = set()
        for i, copy in enumerate(value.regions):
            if copy.region == home:
                raise fail(
                    f"regions[{i}] is {home}, the region the image is baked in",
                    "drop it: the image is there already, and distribute shares it there too",
                    key="regions",
                )
            if copy.region in seen:
                raise fail(f"regions[{i}]: {copy.region} is listed twice", "list each region once", key="regions")
            seen.add(copy.region)
        return value


_PROVIDER_TYPES = ("local", "aws")


def _check_provider(value: object) -> object:
    if isinstance(value, LocalProvider | AwsProvider):
        return value
    if not isinstance(value, dict):
        raise fail(f"provider must be a mapping, got {yaml_type(value)}", "use provider: {type: local}")
    if "type" not in value:
        raise fail(
            f"provider has no type; allowed types: {', '.join(_PROVIDER_TYPES)}",
            "add type: local (or type: aws with region and source)",
            key="type",
        )
    if value["type"] not in _PROVIDER_TYPES:
        raise fail(
            f"unknown provider type {short(value['type'])}; allowed types: {', '.join(_PROVIDER_TYPES)}",
            "use type: local or type: aws",
            key="type",
        )
    return value


def _provider_tag(value: object) -> str | None:
    if isinstance(value, LocalProvider | AwsProvider):
        return f"<{value.type}>"
    if isinstance(value, dict) and value.get("type") in _PROVIDER_TYPES:
        return f"<{value['type']}>"
    return None


Provider = Annotated[
    Annotated[LocalProvider, Tag("<local>")] | Annotated[AwsProvider, Tag("<aws>")],
    Discriminator(_provider_tag),
    BeforeValidator(_check_provider),
]

# The union tags of this module (see yamlfile.YamlKind.tagged): the model each one stands for.
PROVIDER_TAGS: dict[str, type[BaseModel]] = {
    "<local>": LocalProvider,
    "<aws>": AwsProvider,
    "<owners>": OwnersSource,
    "<ssm_parameter>": SsmSource,
}
