"""The recipe: its schema, loading it from YAML, and the path rules that keep it inside its folder.

This module owns everything about the recipe file (DESIGN.md §9): the pydantic models (all
`extra="forbid"`, frozen); `load_recipe()`, which reports every problem at once with file, line, field and
fix; path confinement of `file.src` (inside the recipe's folder) and `file.dest` (inside the image root, see
`imagefs.resolve_inside()`); the JSON Schema export; and the digests the registry and the layer cache are keyed on
(`recipe_digest()`, `step_fingerprint()`). Nothing here touches a provider, the store or the network.
The YAML-with-line-numbers machinery it shares with the policy file lives in `amiforge.yamlfile`.
"""

from __future__ import annotations

import difflib
import hashlib
import json
import re
import shutil
from collections.abc import Mapping
from pathlib import Path, PurePosixPath
from typing import Annotated, Any, ClassVar, Literal

from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Discriminator,
    Field,
    PrivateAttr,
    Tag,
    ValidationError,
    ValidationInfo,
    WithJsonSchema,
    field_validator,
    model_validator,
)

from amiforge import durations
from amiforge.errors import ConfigError, Problem
from amiforge.inputs import file_sha256
from amiforge.model import AWS_REGION_PATTERN, IMAGE_NAME_PATTERN
from amiforge.yamlfile import (
    YamlKind,
    parse_mapping,
    problems_from_validation,
    raise_problems,
    read_text,
)
from amiforge.yamlfile import fail as _fail
from amiforge.yamlfile import short as _short
from amiforge.yamlfile import yaml_type as _yaml_type

__all__ = [
    "AwsProvider",
    "Base",
    "Checks",
    "CommandCheck",
    "FileSpec",
    "FileStep",
    "HttpCheck",
    "LocalProvider",
    "OwnersSource",
    "PackagesStep",
    "Provider",
    "Recipe",
    "ServiceSpec",
    "ServiceStep",
    "ShellStep",
    "Source",
    "SsmSource",
    "Step",
    "TcpCheck",
    "UserSpec",
    "UserStep",
    "load_recipe",
    "parse_duration",
    "parse_recipe",
    "recipe_digest",
    "recipe_json_schema",
    "step_fingerprint",
]

# A recipe is a few KB; anything far bigger is a mistake (or an attack on the parser), not a recipe.
MAX_RECIPE_BYTES = 1024 * 1024
# Bump when the meaning of a step changes, so old cache layers stop matching.
_FINGERPRINT_VERSION = 1

_FORBID = ConfigDict(extra="forbid", frozen=True)
_SCHEMA_HINT = "`amiforge recipe schema` prints every key and the values it allows"


# ----------------------------------------------------------------------------------------------------------
# Constrained scalars. Each is checked by a small function that says what is allowed and how to fix it;
# the JSON Schema keeps the pattern so editors can flag mistakes too.


def _pattern_check(pattern: str, what: str, allowed: str, example: str) -> Any:
    compiled = re.compile(pattern)

    def check(value: str) -> str:
        if compiled.fullmatch(value) is None:
            raise _fail(f"{_short(value)} is not a valid {what}: {allowed}", f"use something like {example}")
        return value

    return check


_NAME_RE = IMAGE_NAME_PATTERN
_PACKAGE_RE = r"[a-z0-9][a-z0-9+.-]+"
_POSIX_NAME_RE = r"[a-z_][a-z0-9_-]{0,31}"
_UNIT_RE = r"[A-Za-z0-9][A-Za-z0-9:_.@\\-]{0,254}"  # never a leading "-": it would read as an option
_TAG_KEY_RE = r"[A-Za-z0-9_.:/=+@-]{1,128}"
_ACCOUNT_RE = r"[0-9]{12}"
_OWNER_ALIASES = ("amazon", "self", "aws-marketplace")
_MODE_RE = r"[0-7]{3,4}"
_DURATION_RE = durations.PATTERN

RecipeName = Annotated[
    str,
    AfterValidator(
        _pattern_check(
            _NAME_RE,
            "recipe name",
            "lowercase letters, digits and '-', starting with a letter or digit, at most 63 characters",
            "'web' or 'web-tier'",
        )
    ),
    WithJsonSchema({"type": "string", "pattern": f"^{_NAME_RE}$"}),
]
PackageName = Annotated[
    str,
    AfterValidator(
        _pattern_check(
            _PACKAGE_RE,
            "Debian package name",
            "lowercase letters, digits and '+', '.', '-', at least 2 characters, no version or '=' pin",
            "'nginx' or 'ca-certificates'",
        )
    ),
    WithJsonSchema({"type": "string", "pattern": f"^{_PACKAGE_RE}$"}),
]
PosixName = Annotated[
    str,
    AfterValidator(
        _pattern_check(
            _POSIX_NAME_RE,
            "user or group name",
            "lowercase letters, digits, '_' and '-', starting with a letter or '_', at most 32 characters",
            "'deploy' or 'www-data'",
        )
    ),
    WithJsonSchema({"type": "string", "pattern": f"^{_POSIX_NAME_RE}$"}),
]
UnitName = Annotated[
    str,
    AfterValidator(
        _pattern_check(
            _UNIT_RE,
            "systemd unit name",
            "letters, digits and ':', '_', '.', '@', '-', '\\'",
            "'nginx' or 'nginx.service'",
        )
    ),
    WithJsonSchema({"type": "string", "pattern": f"^{_UNIT_RE}$"}),
]


def _check_tag_key(value: str) -> str:
    _pattern_check(
        _TAG_KEY_RE,
        "tag key",
        "1-128 of letters, digits and '_', '.', ':', '/', '=', '+', '@', '-'",
        "'team' or 'cost-center'",
    )(value)
    # Our own bookkeeping tags (DESIGN §5) and AWS's namespace must not be forged from a recipe.
    if value.lower().startswith(("amiforge:", "aws:")):
        raise _fail(
            f"tag key {value!r} uses a reserved prefix ('amiforge:' and 'aws:' are set by amiforge and AWS)",
            "rename the tag",
        )
    return value


def _check_tag_value(value: str) -> str:
    if len(value) > 256:
        raise _fail(f"tag value is {len(value)} characters long; at most 256 are allowed", "shorten it")
    return value


TagKey = Annotated[
    str, AfterValidator(_check_tag_key), WithJsonSchema({"type": "string", "pattern": f"^{_TAG_KEY_RE}$"})
]
TagValue = Annotated[str, AfterValidator(_check_tag_value), WithJsonSchema({"type": "string", "maxLength": 256})]


def _check_owner(value: str) -> str:
    if re.fullmatch(_ACCOUNT_RE, value) is None and value not in _OWNER_ALIASES:
        raise _fail(
            f"{_short(value)} is not an image owner: use a 12-digit AWS account id or one of "
            f"{', '.join(_OWNER_ALIASES)}",
            'e.g. owners: [amazon] or owners: ["136693071363"] (quote account ids)',
        )
    return value


Owner = Annotated[
    str,
    AfterValidator(_check_owner),
    WithJsonSchema({"anyOf": [{"type": "string", "pattern": f"^{_ACCOUNT_RE}$"}, {"enum": list(_OWNER_ALIASES)}]}),
]


def _check_mode(value: object) -> object:
    # YAML 1.1 reads an unquoted 0644 as the octal number 420 and 644 as decimal 644: both silently wrong.
    if isinstance(value, int) and not isinstance(value, bool):
        raise _fail(
            f"mode {value} was read as a number; YAML turns an unquoted 0644 into 420",
            'quote it: mode: "0644"',
        )
    if isinstance(value, str) and re.fullmatch(_MODE_RE, value) is None:
        raise _fail(f"mode {_short(value)} is not an octal mode of 3 or 4 digits 0-7", 'e.g. mode: "0644" or "0755"')
    return value


FileMode = Annotated[str, BeforeValidator(_check_mode), WithJsonSchema({"type": "string", "pattern": f"^{_MODE_RE}$"})]


def _check_abs_path(value: str) -> str:
    if not value.startswith("/") or "\x00" in value:
        raise _fail(f"{_short(value)} is not an absolute path", "e.g. /bin/bash")
    return value


AbsPath = Annotated[str, AfterValidator(_check_abs_path)]


def _non_empty(value: str) -> str:
    if not value.strip():
        raise _fail("must not be empty", "write a value, or remove the key if it is optional")
    if "\x00" in value:
        raise _fail("must not contain a NUL character", "remove it")
    return value


NonEmptyStr = Annotated[str, AfterValidator(_non_empty), WithJsonSchema({"type": "string", "minLength": 1})]


# ----------------------------------------------------------------------------------------------------------
# Durations


def parse_duration(value: object) -> float:
    """`"90s"`, `"2m"`, `"1h"`, `"1m30s"`, `"500ms"` or a bare positive number of seconds → float seconds.

    Raises ConfigError for anything else (also used for CLI flags such as `--timeout`).
    """
    seconds = durations.seconds_of(value)
    if seconds is None or seconds <= 0:
        raise ConfigError(
            f"{_short(value)} is not a duration: accepted forms are {durations.FORMS}, more than 0",
            fix=f"use e.g. {durations.FORMS}",
        )
    if seconds > durations.MAX_SECONDS:
        limit = durations.format_duration(durations.MAX_SECONDS)
        raise ConfigError(f"{_short(value)} is longer than {limit}", fix=f"use a duration of at most {limit}")
    return seconds


def _duration_validator(value: object) -> float:
    try:
        return parse_duration(value)
    except ConfigError as e:
        raise _fail(e.message, e.fix or "") from None


def _ready_bounds(value: float) -> float:
    if not 1.0 <= value <= 3600.0:
        raise _fail(f"ready_within is {value:g}s; it must be between 1s and 1h", "e.g. ready_within: 90s")
    return value


Duration = Annotated[
    float,
    BeforeValidator(_duration_validator),
    WithJsonSchema(
        {
            "anyOf": [
                {"type": "number", "exclusiveMinimum": 0},
                {"type": "string", "pattern": f"^(?:{_DURATION_RE})$"},
            ],
            "description": "seconds, or a duration such as 90s, 2m, 1h, 1m30s, 1d, 500ms",
        },
        mode="validation",
    ),
]
ReadyWithin = Annotated[Duration, AfterValidator(_ready_bounds)]


# ----------------------------------------------------------------------------------------------------------
# Base image and provider


def _check_suite(value: object) -> object:
    if value != "bookworm":
        raise _fail(
            f"suite {_short(value)} is not supported: only 'bookworm' is served by the Debian mirror amiforge uses",
            "use suite: bookworm",
        )
    return value


class Base(BaseModel):
    """The base layer the local provider builds with mmdebstrap."""

    model_config = _FORBID

    distro: Literal["debian"] = "debian"
    suite: Annotated[Literal["bookworm"], BeforeValidator(_check_suite)] = "bookworm"
    packages: list[PackageName] = Field(default_factory=list, description="extra packages in the base layer")


class LocalProvider(BaseModel):
    """Bake with mmdebstrap + chroot and boot under QEMU on this machine."""

    model_config = _FORBID

    type: Literal["local"] = "local"


class OwnersSource(BaseModel):
    """The newest image matching a name filter, among images of pinned owners only (never a name alone)."""

    model_config = _FORBID

    owners: list[Owner] = Field(min_length=1, description="account ids or aliases (amazon, self, aws-marketplace)")
    name: NonEmptyStr = Field(description="image name filter; * and ? wildcards allowed")
    most_recent: bool = True


def _check_ssm_parameter(value: str) -> str:
    if not value.startswith("/") or len(value) < 2:
        raise _fail(
            f"ssm_parameter {_short(value)} must be a full parameter name starting with '/'",
            "e.g. ssm_parameter: /aws/service/debian/release/bookworm/latest/amd64",
        )
    return value


class SsmSource(BaseModel):
    """An image id published in an SSM parameter (the owner is whoever controls the parameter path)."""

    model_config = _FORBID

    ssm_parameter: Annotated[str, AfterValidator(_check_ssm_parameter)]


def _check_source(value: object) -> object:
    if isinstance(value, OwnersSource | SsmSource):
        return value
    if not isinstance(value, dict):
        raise _fail(
            f"source must be a mapping, got {_yaml_type(value)}",
            "use {owners: [amazon], name: 'debian-12-amd64-*'} or {ssm_parameter: /aws/service/...}",
        )
    has_ssm = "ssm_parameter" in value
    if has_ssm and ("owners" in value or "name" in value):
        raise _fail(
            "source has both ssm_parameter and owners/name; it must be one or the other",
            "keep either ssm_parameter, or owners + name",
        )
    if not has_ssm and not value.get("owners"):
        # DESIGN §5: a name filter alone lets anyone publish a matching public AMI ("whoAMI" name squatting).
        raise _fail(
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

_REGION_RE = AWS_REGION_PATTERN
_INSTANCE_TYPE_RE = r"[a-z0-9-]+\.[a-z0-9-]+"


_SUBNET_RE = r"subnet-[0-9a-f]{8,17}"
_SG_RE = r"sg-[0-9a-f]{8,17}"
_ORG_ARN_RE = r"arn:aws[a-z-]*:organizations::[0-9]{12}:organization/o-[a-z0-9]{10,32}"
_OU_ARN_RE = r"arn:aws[a-z-]*:organizations::[0-9]{12}:ou/o-[a-z0-9]{10,32}/ou-[0-9a-z]{4,32}-[a-z0-9]{8,32}"
_SSM_PREFIX_RE = r"(?:/[A-Za-z0-9_.-]+)+"


def _checked(pattern: str, what: str, allowed: str, example: str) -> tuple[AfterValidator, WithJsonSchema]:
    """The metadata of a string type checked against `pattern`, with the pattern in the JSON Schema too."""
    return (
        AfterValidator(_pattern_check(pattern, what, allowed, example)),
        WithJsonSchema({"type": "string", "pattern": f"^{pattern}$"}),
    )


_REGION_CHECK = _checked(_REGION_RE, "AWS region", "like us-east-1 or eu-west-3", "'eu-west-1'")
_TYPE_CHECK = _checked(_INSTANCE_TYPE_RE, "EC2 instance type", "family.size like t3.micro", "'t3.micro'")
_SUBNET_CHECK = _checked(_SUBNET_RE, "subnet id", "subnet-<hex>", "'subnet-0123456789abcdef0'")
_SG_CHECK = _checked(_SG_RE, "security group id", "sg-<hex>", "'sg-0123456789abcdef0'")
_ACCOUNT_CHECK = _checked(_ACCOUNT_RE, "AWS account id", "12 digits", "'123456789012'")
_ORG_CHECK = _checked(
    _ORG_ARN_RE, "organization ARN", "arn:aws:organizations::<account>:organization/o-<id>", "its ARN"
)
_OU_CHECK = _checked(
    _OU_ARN_RE, "organizational-unit ARN", "arn:aws:organizations::<acct>:ou/o-<org>/ou-<id>", "its ARN"
)
AwsRegion = Annotated[str, _REGION_CHECK[0], _REGION_CHECK[1]]
InstanceType = Annotated[str, _TYPE_CHECK[0], _TYPE_CHECK[1]]
SubnetId = Annotated[str, _SUBNET_CHECK[0], _SUBNET_CHECK[1]]
SecurityGroupId = Annotated[str, _SG_CHECK[0], _SG_CHECK[1]]
AccountId = Annotated[str, _ACCOUNT_CHECK[0], _ACCOUNT_CHECK[1]]
OrgArn = Annotated[str, _ORG_CHECK[0], _ORG_CHECK[1]]
OuArn = Annotated[str, _OU_CHECK[0], _OU_CHECK[1]]


class RegionCopy(BaseModel):
    """One region `amiforge distribute` copies the image to, encrypted with that region's KMS key."""

    model_config = _FORBID

    region: AwsRegion
    kms_key: NonEmptyStr | None = Field(
        default=None, description="KMS key (id, ARN or alias) in that region; needed to share an encrypted image"
    )


class Distribution(BaseModel):
    """Where `amiforge distribute` copies the image and whom it shares it with (orgs/OUs preferred to accounts)."""

    model_config = _FORBID

    regions: list[RegionCopy] = Field(default_factory=list, description="copies besides the bake region")
    accounts: list[AccountId] = Field(default_factory=list, description="accounts that may launch the image")
    organizations: list[OrgArn] = Field(default_factory=list, description="organizations that may launch it")
    organizational_units: list[OuArn] = Field(default_factory=list, description="OUs that may launch it")
    public: bool = Field(default=False, description="share with everyone; distribute also needs --public")


class Publish(BaseModel):
    """What a promotion writes in every region holding the image: an SSM parameter per channel and, optionally,
    a new default version of a launch template (with the numeric AMI id, never $Latest)."""

    model_config = _FORBID

    parameter_prefix: Annotated[
        str,
        AfterValidator(
            _pattern_check(_SSM_PREFIX_RE, "SSM parameter prefix", "an absolute path without trailing /", "/amiforge")
        ),
    ] = "/amiforge"
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

    model_config = _FORBID

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
                raise _fail(
                    f"regions[{i}] is {home}, the region the image is baked in",
                    "drop it: the image is there already, and distribute shares it there too",
                    key="regions",
                )
            if copy.region in seen:
                raise _fail(f"regions[{i}]: {copy.region} is listed twice", "list each region once", key="regions")
            seen.add(copy.region)
        return value


_PROVIDER_TYPES = ("local", "aws")


def _check_provider(value: object) -> object:
    if isinstance(value, LocalProvider | AwsProvider):
        return value
    if not isinstance(value, dict):
        raise _fail(f"provider must be a mapping, got {_yaml_type(value)}", "use provider: {type: local}")
    if "type" not in value:
        raise _fail(
            f"provider has no type; allowed types: {', '.join(_PROVIDER_TYPES)}",
            "add type: local (or type: aws with region and source)",
            key="type",
        )
    if value["type"] not in _PROVIDER_TYPES:
        raise _fail(
            f"unknown provider type {_short(value['type'])}; allowed types: {', '.join(_PROVIDER_TYPES)}",
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


# ----------------------------------------------------------------------------------------------------------
# Steps


def _shorten(text: str, limit: int = 60) -> str:
    text = " ".join(text.split())
    return text if len(text) <= limit else text[: limit - 1] + "…"


def _src_problem(folder: Path, src: str) -> tuple[str, str] | None:
    """Why `src` may not be copied from `folder` (message, fix); None for a regular file inside it."""
    try:
        root = folder.resolve(strict=True)
        # strict: a missing file fails here; resolve follows every symlink, so an escape shows in the result.
        resolved = (root / src).resolve(strict=True)
    except FileNotFoundError:
        return (
            f"source file {src!r} does not exist in the recipe's folder {folder}",
            "create it, or fix the path (it is relative to the folder holding the recipe)",
        )
    except (OSError, RuntimeError) as e:  # symlink loops: RuntimeError before 3.13, OSError(ELOOP) after
        return (f"source file {src!r} cannot be resolved: {e}", "replace the symlink with the file itself")
    if not resolved.is_relative_to(root):
        return (
            f"source file {src!r} resolves to {resolved}, outside the recipe's folder {root} (through a symlink)",
            "copy the file into the recipe's folder instead of linking to it",
        )
    if not resolved.is_file():
        return (
            f"source {src!r} is not a regular file (a directory or a device?)",
            "point src at a single regular file",
        )
    return None


class FileSpec(BaseModel):
    model_config = _FORBID

    src: str = Field(description="path relative to the recipe's folder; must stay inside it")
    dest: str = Field(description="absolute path in the image")
    mode: FileMode = "0644"
    owner: PosixName = "root"
    group: PosixName = "root"

    @field_validator("src")
    @classmethod
    def _src_confined(cls, value: str, info: ValidationInfo) -> str:
        fix = "write it relative to the recipe's folder, e.g. files/index.html"
        if not value or "\x00" in value:
            raise _fail("src must be a non-empty path without NUL characters", fix)
        if value.startswith(("/", "\\", "~")) or re.match(r"[A-Za-z]:", value):
            raise _fail(f"src {value!r} is absolute; sources must be relative to the recipe's folder", fix)
        if ".." in re.split(r"[/\\]", value):
            raise _fail(
                f"src {value!r} contains '..'; sources must stay inside the recipe's folder",
                "move the file into the recipe's folder and refer to it without '..'",
            )
        folder = info.context.get("folder") if isinstance(info.context, Mapping) else None
        # Without a folder (a recipe built in memory) only the syntax is checked; _read_src re-checks.
        if isinstance(folder, Path):
            problem = _src_problem(folder, value)
            if problem is not None:
                raise _fail(*problem)
        return value

    @field_validator("dest")
    @classmethod
    def _dest_confined(cls, value: str) -> str:
        if "\x00" in value:
            raise _fail("dest must not contain a NUL character", "remove it")
        if not value.startswith("/"):
            raise _fail(
                f"dest {value!r} is relative; it must be an absolute path in the image",
                f"write it from the image root, e.g. /{value.lstrip('./') or 'etc/motd'}",
            )
        if ".." in value.split("/"):
            raise _fail(f"dest {value!r} contains '..'", "write the final path without '..'")
        if PurePosixPath(value) == PurePosixPath("/"):
            raise _fail("dest must not be '/' itself", "name the file to create, e.g. /etc/motd")
        if value.endswith("/"):
            raise _fail(
                f"dest {value!r} ends with '/'; it must name the file, not its directory",
                "append the file name, e.g. /var/www/html/index.html",
            )
        return value


class PackagesStep(BaseModel):
    """Install Debian packages (apt)."""

    model_config = _FORBID
    kind: ClassVar[str] = "packages"

    packages: list[PackageName] = Field(min_length=1)

    def describe(self) -> str:
        return _shorten(f"packages: {' '.join(self.packages)}")


class FileStep(BaseModel):
    """Copy one file from the recipe's folder into the image."""

    model_config = _FORBID
    kind: ClassVar[str] = "file"

    file: FileSpec

    def describe(self) -> str:
        return f"file {self.file.src} -> {self.file.dest}"


class ShellStep(BaseModel):
    """Run a shell script in the image (chroot locally, the build instance on AWS)."""

    model_config = _FORBID
    kind: ClassVar[str] = "shell"

    shell: NonEmptyStr

    def describe(self) -> str:
        return _shorten(f"shell: {self.shell}")


class ServiceSpec(BaseModel):
    model_config = _FORBID

    enable: list[UnitName] = Field(default_factory=list)
    disable: list[UnitName] = Field(default_factory=list)

    @model_validator(mode="after")
    def _something_to_do(self) -> ServiceSpec:
        if not self.enable and not self.disable:
            raise _fail("service step enables and disables nothing", "add enable: [unit] and/or disable: [unit]")
        both = sorted(set(self.enable) & set(self.disable))
        if both:
            raise _fail(f"units both enabled and disabled: {', '.join(both)}", "keep each unit in one list")
        return self


class ServiceStep(BaseModel):
    """Enable or disable systemd units."""

    model_config = _FORBID
    kind: ClassVar[str] = "service"

    service: ServiceSpec

    def describe(self) -> str:
        parts = []
        if self.service.enable:
            parts.append("enable " + " ".join(self.service.enable))
        if self.service.disable:
            parts.append("disable " + " ".join(self.service.disable))
        return _shorten("service: " + "; ".join(parts))


def _check_authorized_key(value: str) -> str:
    # Public keys only: DESIGN §5 keeps secrets out of recipes and images.
    if "PRIVATE KEY" in value:
        raise _fail("this is a private key; recipes must never hold secrets", "use the matching .pub line instead")
    if not value.strip() or "\n" in value.strip() or "\x00" in value:
        raise _fail("an authorized key must be one non-empty line", "paste the single line of the .pub file")
    return value


class UserSpec(BaseModel):
    model_config = _FORBID

    name: PosixName
    groups: list[PosixName] = Field(default_factory=list)
    shell: AbsPath = "/bin/bash"
    ssh_authorized_keys: list[Annotated[str, AfterValidator(_check_authorized_key)]] = Field(default_factory=list)


class UserStep(BaseModel):
    """Create a local user."""

    model_config = _FORBID
    kind: ClassVar[str] = "user"

    user: UserSpec

    def describe(self) -> str:
        return f"user: {self.user.name}"


_STEP_CLASSES: dict[str, type[PackagesStep | FileStep | ShellStep | ServiceStep | UserStep]] = {
    cls.kind: cls for cls in (PackagesStep, FileStep, ShellStep, ServiceStep, UserStep)
}
_STEP_KINDS = ", ".join(_STEP_CLASSES)


def _check_step(value: object) -> object:
    """Each step is a mapping with exactly one known key; say which rule was broken before pydantic tries."""
    if isinstance(value, tuple(_STEP_CLASSES.values())):
        return value
    if not isinstance(value, dict):
        raise _fail(
            f"a step must be a mapping with one key ({_STEP_KINDS}), got {_yaml_type(value)}",
            "write it as e.g. '- packages: [nginx]'",
        )
    if not value:
        raise _fail(
            f"empty step; each step has exactly one of: {_STEP_KINDS}",
            "fill it in (e.g. '- packages: [nginx]') or delete the line",
        )
    keys = [str(k) for k in value]
    if len(keys) > 1:
        raise _fail(
            f"step has {len(keys)} keys ({', '.join(keys)}); each step must have exactly one of: {_STEP_KINDS}",
            "split it into separate list items, one '- <kind>: …' per step (check the '-' indentation)",
        )
    key = keys[0]
    if key not in _STEP_CLASSES:
        close = difflib.get_close_matches(key, list(_STEP_CLASSES), n=1)
        hint = f"did you mean '{close[0]}'? " if close else ""
        raise _fail(f"unknown step kind {key!r}; allowed: {_STEP_KINDS}", f"{hint}use one of: {_STEP_KINDS}")
    return value


def _step_tag(value: object) -> str | None:
    if isinstance(value, BaseModel) and hasattr(value, "kind"):
        return f"<{value.kind}>"
    if isinstance(value, dict) and len(value) == 1:
        return f"<{next(iter(value))}>"
    return None


Step = Annotated[
    Annotated[PackagesStep, Tag("<packages>")]
    | Annotated[FileStep, Tag("<file>")]
    | Annotated[ShellStep, Tag("<shell>")]
    | Annotated[ServiceStep, Tag("<service>")]
    | Annotated[UserStep, Tag("<user>")],
    Discriminator(_step_tag),
    BeforeValidator(_check_step),
]


# ----------------------------------------------------------------------------------------------------------
# Checks


def _check_http_path(value: str) -> str:
    if not value.startswith("/"):
        raise _fail(f"http path {value!r} must start with '/'", f"write it as /{value}")
    return value


def _check_port(value: int) -> int:
    if not 1 <= value <= 65535:
        raise _fail(f"port {value} is out of range; ports are 1 to 65535", "e.g. port: 80")
    return value


Port = Annotated[int, AfterValidator(_check_port), WithJsonSchema({"type": "integer", "minimum": 1, "maximum": 65535})]


class CommandCheck(BaseModel):
    model_config = _FORBID

    run: NonEmptyStr
    expect_exit: Annotated[int, Field(ge=0, le=255)] = 0
    expect_output: str | None = Field(default=None, description="substring the output must contain")


class HttpCheck(BaseModel):
    model_config = _FORBID

    port: Port
    path: Annotated[str, AfterValidator(_check_http_path)] = "/"
    expect_status: Annotated[int, Field(ge=100, le=599)] = 200
    expect_body: str | None = Field(default=None, description="substring the body must contain")


class TcpCheck(BaseModel):
    model_config = _FORBID

    port: Port


class Checks(BaseModel):
    """The boot-test gate: ready within a time, then every listed check passes."""

    model_config = _FORBID

    ready_within: ReadyWithin = 90.0
    units: list[UnitName] = Field(default_factory=list, description="units that must be active")
    commands: list[CommandCheck] = Field(default_factory=list)
    http: list[HttpCheck] = Field(default_factory=list)
    tcp: list[TcpCheck] = Field(default_factory=list)


# ----------------------------------------------------------------------------------------------------------
# The recipe


class Recipe(BaseModel):
    """A validated recipe. `load_recipe()` also records which file it came from (`source_path`, `folder`)."""

    model_config = ConfigDict(extra="forbid", frozen=True, title="amiforge recipe")

    name: RecipeName
    description: str | None = None
    base: Base = Field(default_factory=Base)
    provider: Provider = Field(default_factory=LocalProvider)
    steps: list[Step] = Field(default_factory=list, description="ordered; each step is one cache layer")
    checks: Checks = Field(default_factory=Checks)
    tags: dict[TagKey, TagValue] = Field(default_factory=dict)

    # Not part of the schema: where the recipe was read from, so file sources resolve against its folder.
    _source_path: Path | None = PrivateAttr(default=None)

    @property
    def source_path(self) -> Path:
        if self._source_path is None:
            raise ConfigError(
                f"recipe {self.name!r} was not loaded from a file, so its file sources cannot be resolved",
                fix="load it with load_recipe(path), or call .bound_to(path)",
            )
        return self._source_path

    @property
    def folder(self) -> Path:
        return self.source_path.parent

    def bound_to(self, path: Path) -> Recipe:
        """A copy that knows it lives at `path` (no re-validation of file sources)."""
        copy = self.model_copy()
        copy._source_path = path.absolute()
        return copy


# ----------------------------------------------------------------------------------------------------------
# Loading: YAML text → node tree (for lines) → data → pydantic, every problem collected into one ConfigError.
# The machinery is shared with the policy file (amiforge.yamlfile); what is recipe-specific is described here.

_TAGGED: dict[str, type[BaseModel]] = {
    **{f"<{kind}>": cls for kind, cls in _STEP_CLASSES.items()},
    "<local>": LocalProvider,
    "<aws>": AwsProvider,
    "<owners>": OwnersSource,
    "<ssm_parameter>": SsmSource,
}

_KIND = YamlKind(
    noun="recipe",
    model=Recipe,
    schema_hint=_SCHEMA_HINT,
    max_bytes=MAX_RECIPE_BYTES,
    missing_fix="check the path; recipes are YAML files such as examples/web/recipe.yaml",
    default_name="recipe.yaml",
    tagged=_TAGGED,
)


def load_recipe(path: Path) -> Recipe:
    """Read, validate and return the recipe at `path`; raise ConfigError listing every problem found."""
    return parse_recipe(read_text(path, _KIND), path)


def parse_recipe(text: str, path: Path) -> Recipe:
    """Validate recipe YAML `text` as if read from `path` (file sources resolve against `path`'s folder)."""
    node, data, problems = parse_mapping(
        text,
        path,
        _KIND,
        top_keys="name:, steps:, …",
        empty_fix="start from examples/web/recipe.yaml; at least 'name:' is required",
        mapping_fix="write the recipe as 'key: value' lines at the top level, from 'name: …'",
    )
    file = str(path)
    try:
        recipe = Recipe.model_validate(data, context={"folder": path.absolute().parent})
    except ValidationError as e:
        raise_problems(_KIND, path, problems + problems_from_validation(e, node, file, _KIND))
    if problems:  # e.g. duplicate keys, which YAML itself accepts
        raise_problems(_KIND, path, problems)
    return recipe.bound_to(path)


# ----------------------------------------------------------------------------------------------------------
# Image-root confinement


# ----------------------------------------------------------------------------------------------------------
# Schema and digests


def recipe_json_schema() -> dict[str, object]:
    """JSON Schema (draft 2020-12) of a recipe file, for editors and `amiforge recipe schema`."""
    schema: dict[str, object] = Recipe.model_json_schema(mode="validation")
    return {"$schema": "https://json-schema.org/draft/2020-12/schema", **schema, "title": "amiforge recipe"}


def _canonical(value: object) -> bytes:
    return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode()


def _source(folder: Path, src: str) -> Path:
    """The path of a file step's source, confined to the recipe's folder and a regular file. Checked again at every
    use: the folder may have changed since the recipe was validated."""
    problem = _src_problem(folder, src)
    if problem is not None:
        message, fix = problem
        raise ConfigError(message, problems=[Problem(message=message, field="file.src", fix=fix)], fix=fix)
    return (folder.resolve() / src).resolve()


def source_sha256(folder: Path, src: str) -> str:
    """sha256 hex of a file step's source, read in chunks (a source may be a large binary)."""
    return file_sha256(_source(folder, src))


def stage_source(folder: Path, src: str, dest: Path) -> None:
    """Copy a file step's source (re-checked) to `dest`, in chunks."""
    shutil.copyfile(_source(folder, src), dest)


def step_fingerprint(step: Step, folder: Path, *, src_sha256: str | None = None) -> str:
    """sha256 hex of one step's definition plus the bytes it copies (file steps); layer cache keys use it.

    `src_sha256`: the digest of the bytes actually staged for a file step, to check they are the ones the key was
    made from."""
    payload: dict[str, object] = {
        "v": _FINGERPRINT_VERSION,
        "kind": step.kind,
        "step": step.model_dump(mode="json"),
    }
    if isinstance(step, FileStep):
        payload["src_sha256"] = src_sha256 if src_sha256 is not None else source_sha256(folder, step.file.src)
    return hashlib.sha256(_canonical(payload)).hexdigest()


def recipe_digest(recipe: Recipe) -> str:
    """sha256 hex of the validated recipe (canonical JSON) plus the sha256 of every file it copies."""
    files: dict[str, str] = {}
    for step in recipe.steps:
        if isinstance(step, FileStep):
            files[step.file.src] = source_sha256(recipe.folder, step.file.src)
    return hashlib.sha256(_canonical({"recipe": recipe.model_dump(mode="json"), "files": files})).hexdigest()
