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
)

from amiforge.model import AWS_REGION_PATTERN
from amiforge.recipe.fields import STRICT, PackageName
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
            'e.g. owners: [amazon] or owners: ["136693071363"] (quote account ids)',
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

    owners: list[Owner] = Field(min_length=1, description="account ids or aliases (amazon, self, aws-marketplace)")
    name: NonEmptyStr = Field(description="image name filter; * and ? wildcards allowed")
    most_recent: bool = True


class SsmSource(BaseModel):
    """An image id published in an SSM parameter (the owner is whoever controls the parameter path)."""

    model_config = STRICT

    ssm_parameter: Annotated[str, AfterValidator(_check_ssm_parameter)]


def _check_source(value: object) -> object:
    if isinstance(value, OwnersSource | SsmSource):
        return value
    if not isinstance(value, dict):
        raise fail(
            f"source must be a mapping, got {yaml_type(value)}",
            "use {owners: [amazon], name: 'debian-12-amd64-*'} or {ssm_parameter: /aws/service/...}",
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
            "add owners: [amazon] (or the 12-digit account id publishing the image), or use ssm_parameter",
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


class AwsProvider(BaseModel):
    """Bake on EC2 from an owner-pinned source image."""

    model_config = STRICT

    type: Literal["aws"]
    region: AwsRegion
    instance_type: InstanceType = "t3.micro"
    source: Source
    subnet_id: SubnetId | None = Field(
        default=None, description="subnet for builder and boot-test instances; default: the default VPC's"
    )
    security_group_ids: list[SecurityGroupId] = Field(
        default_factory=list, description="security groups for builder and boot-test instances (none inbound needed)"
    )
    instance_profile: NonEmptyStr | None = Field(
        default=None, description="instance profile (name or ARN) with AmazonSSMManagedInstanceCore: steps run via SSM"
    )
    boot_test_instance_type: InstanceType | None = Field(
        default=None, description="instance type of the boot test; default: instance_type"
    )
    distribution: Distribution = Field(default_factory=lambda: Distribution(), description="amiforge distribute")
    publish: Publish = Field(default_factory=lambda: Publish(), description="what promote writes per channel")

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
