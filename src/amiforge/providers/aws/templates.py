"""Launch templates: reading one, and getting a numeric version that holds an image without ever duplicating one.

Shared by publish.py (a channel's template default) and fleet.py (an Auto Scaling group's version). Both need "the
version that is `source` with ImageId = this image": `source` itself when it already holds the image; else the
newest version after `source` when its whole LaunchTemplateData is what creating it now would give (an interrupted run
made it and stopped before using it: reused, not duplicated — a version someone else made with the same image but
another instance type, user data or key is *not* ours and is never picked up); else a new version created from
`source`, with a ClientToken derived from what it is made of, so a retry after a lost answer returns the version the
first attempt made. Versions are always numbers, never `$Latest`.

What creating gives (`created_from`): EC2 copies the source version's data, the fields passed replacing theirs, and
drops the snapshot ids of the inherited block device mappings ("Snapshots applied to the block device mapping are
ignored when creating a new version unless they are explicitly included", CreateLaunchTemplateVersion, SourceVersion).
"""

from __future__ import annotations

import copy
import hashlib
from collections.abc import Collection, Mapping
from dataclasses import dataclass
from typing import Any

from amiforge.awsapi.clients import AwsSession, call, paginate
from amiforge.errors import NotFound

__all__ = [
    "Template",
    "client_token",
    "created_from",
    "describe_versions",
    "find_template",
    "image_of",
    "version_holding",
]


@dataclass(frozen=True)
class Template:
    template_id: str
    name: str
    default: int
    latest: int


def _template(lt: Mapping[str, Any]) -> Template:
    return Template(
        template_id=str(lt["LaunchTemplateId"]),
        name=str(lt["LaunchTemplateName"]),
        default=int(lt["DefaultVersionNumber"]),
        latest=int(lt["LatestVersionNumber"]),
    )


def find_template(
    session: AwsSession, region: str, *, name: str | None = None, template_id: str | None = None
) -> Template:
    """The launch template called `name` (or with id `template_id`) in `region`; NotFound if there is none."""
    ec2 = session.client("ec2", region)
    if template_id is not None:
        # EC2 has no launch-template-id filter; an unknown id is InvalidLaunchTemplateId.NotFound (→ NotFound).
        answer = call(ec2, "DescribeLaunchTemplates", f"launch template {template_id}", LaunchTemplateIds=[template_id])
        found = list(answer.get("LaunchTemplates", []))
        value = template_id
    elif name is not None:
        # By filter, not LaunchTemplateNames: an unknown name is then an empty answer we can explain.
        found = list(
            paginate(
                ec2,
                "DescribeLaunchTemplates",
                "LaunchTemplates",
                f"launch template {name}",
                Filters=[{"Name": "launch-template-name", "Values": [name]}],
            )
        )
        value = name
    else:
        raise TypeError("find_template needs a name or a template id")
    if not found:
        raise NotFound(
            f"launch template {value} does not exist in {region}",
            fix="create the launch template first, or check its name and the region (amiforge never creates one)",
        )
    return _template(found[0])


def describe_versions(
    session: AwsSession, region: str, template: Template, numbers: Collection[int]
) -> dict[int, Mapping[str, Any]]:
    """The versions `numbers` of `template` (one call), by number."""
    ec2 = session.client("ec2", region)
    answer = call(
        ec2,
        "DescribeLaunchTemplateVersions",
        f"launch template {template.name}",
        LaunchTemplateId=template.template_id,
        Versions=[str(n) for n in sorted(set(numbers))],
    )
    return {int(v["VersionNumber"]): v for v in answer.get("LaunchTemplateVersions", [])}


def image_of(version: Mapping[str, Any] | None) -> str | None:
    """The ImageId a launch template version holds (None for no version, or one without an image)."""
    if version is None:
        return None
    value = version.get("LaunchTemplateData", {}).get("ImageId")
    return str(value) if value is not None else None


def created_from(source: Mapping[str, Any], image_id: str) -> dict[str, Any]:
    """The LaunchTemplateData of a version created from version `source` with only ImageId passed (see the module)."""
    data = copy.deepcopy(dict(source.get("LaunchTemplateData", {})))
    for mapping in data.get("BlockDeviceMappings", []):
        if isinstance(mapping.get("Ebs"), dict):
            mapping["Ebs"].pop("SnapshotId", None)
    data["ImageId"] = image_id
    return data


def client_token(*parts: str) -> str:
    """A ClientToken (at most 64 characters) that is the same exactly when `parts` are."""
    return hashlib.sha256("\0".join(parts).encode()).hexdigest()[:64]


def version_holding(
    session: AwsSession,
    region: str,
    template: Template,
    *,
    source: int,
    image_id: str,
    token: str,
    description: str,
) -> int:
    """The number of a version of `template` that is version `source` with ImageId `image_id` (see the module).

    Reads `source` and the template's latest version in one call; creates at most one version, with `token` as its
    ClientToken (derive it from everything the version is made of, e.g. `client_token(...)`)."""
    versions = describe_versions(session, region, template, {source, template.latest})
    if source not in versions:
        raise NotFound(
            f"launch template {template.name} has no version {source} (latest is {template.latest})",
            fix="point the group or channel at an existing version number",
        )
    if image_of(versions[source]) == image_id:
        return source
    latest = versions.get(template.latest)
    if (
        template.latest > source
        and latest is not None
        and latest.get("LaunchTemplateData") == created_from(versions[source], image_id)
    ):
        # An interrupted run made this version and stopped before using it: reuse, do not duplicate. Only when it is
        # exactly what would be created: the same image with another field changed is someone else's version.
        return template.latest
    ec2 = session.client("ec2", region)
    created = call(
        ec2,
        "CreateLaunchTemplateVersion",
        f"launch template {template.name}",
        LaunchTemplateId=template.template_id,
        SourceVersion=str(source),
        LaunchTemplateData={"ImageId": image_id},
        VersionDescription=description[:255],
        # A retry after a lost answer returns the version the first attempt made instead of a second one.
        ClientToken=token,
    )
    return int(created["LaunchTemplateVersion"]["VersionNumber"])
