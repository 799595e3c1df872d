"""Images on EC2: resolving a recipe's source image, owner-pinned, and listing the images amiforge manages.

This module owns the whoAMI rule (docs/architecture.md §8, CVE-2018-15869): an image looked up by name is only ever
looked up among pinned owners. The recipe schema already refuses a source without owners; `resolve_source` refuses it
again at runtime, because a source can also be built in code (`model_construct`, an API payload) without passing the
schema.

A source resolves for the architecture of the instance type that will run it (DescribeInstanceTypes): a name
pattern like `debian-12-*` matches amd64 and arm64 images alike, and the newest of them may not boot on the builder.

Listing goes through the paginator at full page size: an inventory of N images costs ⌈N/1000⌉ DescribeImages calls
per region, never one call per image.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from amiforge.awsapi.clients import AwsSession, call, paginate
from amiforge.errors import ConfigError, NotFound, StateError
from amiforge.recipe import OwnersSource, SsmSource

__all__ = [
    "MANAGED_TAG",
    "ImageSummary",
    "SourceImage",
    "check_architecture",
    "describe_image",
    "image_digest",
    "instance_architectures",
    "instance_type_info",
    "inventory",
    "parse_aws_time",
    "resolve_source",
]

# Every resource amiforge creates carries this tag; inventory, retire and gc only look at tagged ones
# (docs/architecture.md §8).
MANAGED_TAG = "amiforge:managed"
_WHOAMI_FIX = (
    "pin the publisher: owners with the 12-digit account id publishing the image (Debian: '136693071363'; "
    "Amazon Linux: amazon), or use ssm_parameter"
)


@dataclass(frozen=True)
class SourceImage:
    """The base image a bake starts from, as resolved in one region."""

    image_id: str
    name: str
    owner: str
    creation_date: datetime
    architecture: str | None
    root_device_name: str | None = None
    root_volume_gib: int | None = None  # the size of the root device's snapshot: a builder's volume is at least this


@dataclass(frozen=True)
class ImageSummary:
    """One image in an account and region, as DescribeImages reports it."""

    image_id: str
    name: str
    state: str
    owner: str
    creation_date: datetime
    tags: tuple[tuple[str, str], ...]
    snapshot_ids: tuple[str, ...]

    def tag(self, key: str) -> str | None:
        return dict(self.tags).get(key)


def parse_aws_time(value: object) -> datetime:
    """EC2's CreationDate (`2024-05-01T12:00:00.000Z`) as an aware UTC datetime."""
    if isinstance(value, datetime):
        return value if value.tzinfo else value.replace(tzinfo=UTC)
    parsed = datetime.fromisoformat(str(value).replace("Z", "+00:00"))
    return parsed if parsed.tzinfo else parsed.replace(tzinfo=UTC)


def _source_image(image: Mapping[str, Any]) -> SourceImage:
    root = image.get("RootDeviceName")
    sizes = [
        m["Ebs"]["VolumeSize"]
        for m in image.get("BlockDeviceMappings", [])
        if m.get("DeviceName") == root and "VolumeSize" in m.get("Ebs", {})
    ]
    return SourceImage(
        image_id=str(image["ImageId"]),
        name=str(image.get("Name") or ""),
        owner=str(image.get("OwnerId") or ""),
        creation_date=parse_aws_time(image["CreationDate"]),
        architecture=image.get("Architecture"),
        root_device_name=str(root) if root else None,
        root_volume_gib=int(sizes[0]) if sizes else None,
    )


def _summary(image: Mapping[str, Any]) -> ImageSummary:
    snapshots = [
        m["Ebs"]["SnapshotId"] for m in image.get("BlockDeviceMappings", []) if "SnapshotId" in m.get("Ebs", {})
    ]
    return ImageSummary(
        image_id=str(image["ImageId"]),
        name=str(image.get("Name") or ""),
        state=str(image.get("State") or ""),
        owner=str(image.get("OwnerId") or ""),
        creation_date=parse_aws_time(image["CreationDate"]),
        tags=tuple(sorted((str(t["Key"]), str(t["Value"])) for t in image.get("Tags", []))),
        snapshot_ids=tuple(snapshots),
    )


def _newest_first(images: Iterable[Mapping[str, Any]]) -> list[Mapping[str, Any]]:
    # The image id breaks ties, so two images stamped in the same millisecond still resolve the same way every time.
    return sorted(images, key=lambda i: (parse_aws_time(i["CreationDate"]), str(i["ImageId"])), reverse=True)


def describe_image(session: AwsSession, region: str, image_id: str) -> Mapping[str, Any]:
    """DescribeImages for one id; NotFound if EC2 does not know it (or no longer does: a deregistered image can come
    back as an empty list rather than an error). Wrap in `eventually()` right after creating or copying it."""
    ec2 = session.client("ec2", region)
    images = call(ec2, "DescribeImages", image_id, ImageIds=[image_id]).get("Images", [])
    if not images:
        raise NotFound(f"image {image_id} does not exist in {region}", fix="check the id and the region")
    return dict(images[0])


# What an image is, as opposed to how it is labelled: EC2 never changes these after registration (a description, tags,
# launch permissions, deprecation and protection can all change and are left out).
_IDENTITY_KEYS = ("ImageId", "Name", "Architecture", "RootDeviceName", "VirtualizationType", "BootMode", "EnaSupport")
_VOLUME_KEYS = ("SnapshotId", "VolumeSize", "VolumeType", "Encrypted", "KmsKeyId")


def image_digest(image: Mapping[str, Any], region: str) -> str:
    """The digest of an AMI: sha256 of the canonical JSON of its immutable description — id, region, name,
    architecture, root device, and every block device's snapshot, size, type and encryption.

    amiforge cannot hash an AMI's bytes the way it hashes a local disk, but an AMI's snapshots cannot be swapped
    under its id: a signature over this digest fails as soon as the id names another image or the image is
    re-registered with other snapshots. (A scan reads the snapshot's bytes themselves, through snapshot.py.)"""
    identity: dict[str, Any] = {key: image.get(key) for key in _IDENTITY_KEYS}
    identity["Region"] = region
    identity["BlockDeviceMappings"] = sorted(
        (
            {"DeviceName": m.get("DeviceName"), **{k: m.get("Ebs", {}).get(k) for k in _VOLUME_KEYS}}
            for m in image.get("BlockDeviceMappings", [])
            if "Ebs" in m
        ),
        key=lambda m: str(m["DeviceName"]),
    )
    canonical = json.dumps(identity, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(canonical.encode()).hexdigest()


def instance_type_info(session: AwsSession, region: str, instance_type: str) -> Mapping[str, Any] | None:
    """What DescribeInstanceTypes says of `instance_type` in `region` (architectures, hypervisor, …); None if EC2 does
    not offer the type there."""
    ec2 = session.client("ec2", region)
    # A filter rather than InstanceTypes=[…]: an unknown type is then an empty answer, not an error code to decode.
    found = call(
        ec2,
        "DescribeInstanceTypes",
        instance_type,
        Filters=[{"Name": "instance-type", "Values": [instance_type]}],
    ).get("InstanceTypes", [])
    return dict(found[0]) if found else None


def instance_architectures(session: AwsSession, region: str, instance_type: str) -> tuple[str, ...]:
    """The architectures `instance_type` runs in `region` (x86_64, arm64, i386, …), from DescribeInstanceTypes.
    ConfigError if EC2 does not offer the type there."""
    info = instance_type_info(session, region, instance_type)
    if info is None:
        raise ConfigError(
            f"instance type {instance_type} is not offered in {region}",
            fix="check provider.instance_type (and boot_test_instance_type): aws ec2 describe-instance-types "
            f"--region {region} lists the types there",
        )
    return tuple(str(a) for a in info.get("ProcessorInfo", {}).get("SupportedArchitectures", []))


def check_architecture(
    image_id: str, architecture: str | None, architectures: Sequence[str], instance_type: str, *, named_by: str = ""
) -> None:
    """ConfigError unless `architecture` (an image's) is one of `architectures` (what `instance_type` runs)."""
    if architecture is not None and architecture not in architectures:
        raise ConfigError(
            f"image {image_id}{named_by} is {architecture}, but instance type {instance_type} runs "
            f"{' or '.join(architectures) or 'no known architecture'}",
            fix="use an instance type of the image's architecture (arm64: Graviton types such as t4g or m7g; "
            "x86_64: t3, m7i, …), or a source of the instance type's architecture (the …/amd64 or …/arm64 parameter)",
        )


def resolve_source(
    source: OwnersSource | SsmSource, session: AwsSession, region: str, *, instance_type: str | None = None
) -> SourceImage:
    """The image a recipe's source names in `region`: read from an SSM parameter, or the newest available image
    named like `source.name` among `source.owners`. With `instance_type`, only an image of an architecture that type
    runs: a name lookup filters on it, a parameter naming another architecture is a ConfigError. No side effects."""
    if isinstance(source, OwnersSource):
        _refuse_unpinned(source)
    architectures = instance_architectures(session, region, instance_type) if instance_type else None
    if isinstance(source, SsmSource):
        image = _resolve_ssm(source, session, region)
        if architectures is not None and instance_type:
            named_by = f" (named by {source.ssm_parameter})"
            check_architecture(image.image_id, image.architecture, architectures, instance_type, named_by=named_by)
        return image
    return _resolve_owners(source, session, region, architectures)


def _resolve_ssm(source: SsmSource, session: AwsSession, region: str) -> SourceImage:
    ssm = session.client("ssm", region)
    parameter = call(ssm, "GetParameter", source.ssm_parameter, Name=source.ssm_parameter)["Parameter"]
    image_id = str(parameter.get("Value") or "").strip()
    if not image_id.startswith("ami-"):
        raise ConfigError(
            f"SSM parameter {source.ssm_parameter} in {region} holds {image_id[:64]!r}, not an image id",
            fix="point ssm_parameter at a parameter that holds an ami-… id (e.g. under /aws/service/)",
        )
    image = describe_image(session, region, image_id)
    if image.get("State") != "available":
        raise StateError(
            f"image {image_id} named by {source.ssm_parameter} is {image.get('State')!r}, not available",
            fix="wait for the publisher to fix the parameter, or pin an owners + name source",
        )
    return _source_image(image)


def _refuse_unpinned(source: OwnersSource) -> None:
    if not [o for o in source.owners if o]:
        # Defence in depth behind the schema: without owners, anyone's public image with a matching name qualifies.
        what = "most_recent lookup" if source.most_recent else "lookup"
        raise ConfigError(
            f"refusing an image {what} by name {source.name!r} without owners (whoAMI name squatting)",
            fix=_WHOAMI_FIX,
        )


def _resolve_owners(
    source: OwnersSource, session: AwsSession, region: str, architectures: Sequence[str] | None
) -> SourceImage:
    owners = [o for o in source.owners if o]
    filters = [{"Name": "name", "Values": [source.name]}, {"Name": "state", "Values": ["available"]}]
    if architectures is not None:
        filters.append({"Name": "architecture", "Values": list(architectures)})
    described = f"name={source.name!r} owners={owners}" + (
        f" architecture={'|'.join(architectures)}" if architectures is not None else ""
    )
    ec2 = session.client("ec2", region)
    images = _newest_first(paginate(ec2, "DescribeImages", "Images", described, Owners=owners, Filters=filters))
    if not images:
        raise NotFound(
            f"no available image matches {described} in {region}",
            fix="check the name pattern (* and ? wildcards), the owners and the region",
        )
    if not source.most_recent and len(images) > 1:
        ids = ", ".join(str(i["ImageId"]) for i in images[:5])
        raise ConfigError(
            f"{len(images)} images match {described} in {region} ({ids}…) and most_recent is false",
            fix="make the name pattern match exactly one image, or set most_recent: true",
        )
    return _source_image(images[0])


def inventory(session: AwsSession, region: str, *, tag_filters: Mapping[str, str] | None = None) -> list[ImageSummary]:
    """Every image of the caller's account in `region` that carries `amiforge:managed=true` (and `tag_filters`),
    oldest first. One DescribeImages call per 1000 images."""
    wanted = {MANAGED_TAG: "true", **(tag_filters or {})}
    filters = [{"Name": f"tag:{key}", "Values": [value]} for key, value in wanted.items()]
    ec2 = session.client("ec2", region)
    images = paginate(ec2, "DescribeImages", "Images", f"managed images in {region}", Owners=["self"], Filters=filters)
    return sorted((_summary(i) for i in images), key=lambda s: (s.creation_date, s.image_id))
