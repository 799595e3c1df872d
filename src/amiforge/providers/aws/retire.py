"""Retire on EC2: everything in a region that uses an image, read completely, and the steps out.

The sources (docs/architecture.md §15), each read over every page — the cleaners that deleted images in use read
one page, or forgot launch templates, or shares:

- **instances** in any state (DescribeInstances);
- **launch templates**, every version of each, default or not (DescribeLaunchTemplates, DescribeLaunchTemplateVersions);
- **Auto Scaling groups** (their launch template versions, mixed-instances overrides included; their launch
  configuration; their warm pool's instances) and **launch configurations**;
- **SSM parameters**: every parameter whose value holds an image id, ours and others' (DescribeParameters,
  GetParameters with decryption: a SecureString that cannot be read is a source that failed);
- **shares** of each image the plan could touch (DescribeImageAttribute launchPermission): an account with a role
  configured (`aws_roles`) is read through it — its instances, templates, groups and parameters in the region — and
  any other account, an organization, an OU or "all" is judged to use the image;
- **copies** being made from an image (DescribeImages: pending images naming it as their source);
- **DescribeImageReferences**, where the region offers it (a region that does not is noted, not a failure).

A source that fails — an error, a throttle that outlasts the retries, a missing permission or role — is a
`SourceFailure`: retire then changes nothing in the region. DescribeImages lists the account's images once
(⌈N/1000⌉ calls), for the state, deprecation time, deregistration protection and snapshots of each artifact; and the
Recycle Bin's rules are read, to warn when a deregistered image could not be restored.

The steps: EnableImageDeprecation; DisableImageDeregistrationProtection when it is on (with a cool-down, EC2 refuses
the deregistration for 24 h: the image waits for a later run), DeregisterImage; DeleteSnapshot for each snapshot no
other image uses.
"""

from __future__ import annotations

import contextlib
import re
from collections import Counter
from collections.abc import Callable, Collection, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

from amiforge.awsapi.clients import AwsSession, call, paginate
from amiforge.awsapi.errors import aws_code
from amiforge.errors import AmiforgeError, NotFound
from amiforge.model import Artifact
from amiforge.providers.aws.images import MANAGED_TAG
from amiforge.providers.interface import ImageState, Reference, RegionSurvey, Removal, SourceFailure, Stored

AMI_ID = re.compile(r"\bami-[0-9a-f]{8,17}\b")
# What a region that does not offer an API answers (DescribeImageReferences is not in every region).
_UNSUPPORTED = {"InvalidAction", "UnsupportedOperation", "UnknownOperation", "NotImplemented"}
# SSM GetParameters takes at most 10 names a call.
_SSM_BATCH = 10
# DescribeImageReferences takes at most this many image ids a call (the API reference's limit).
_REFERENCES_BATCH = 100


def protection_of(value: object) -> str | None:
    """DescribeImages' DeregistrationProtection as the planner reads it: None (off), "enabled" (lifted at once) or
    "enabled-with-cooldown" (lifting it starts a 24 h cool-down), or "disabled after <time>" while a cool-down runs."""
    text = str(value or "disabled").strip()
    if text == "disabled":
        return None
    if text.startswith("disabled"):
        return text  # "disabled after 2026-12-08T10:00:00Z": the cool-down of a lifted protection
    return "enabled-with-cooldown" if text == "enabled-with-cooldown" else "enabled"


def _snapshots(image: Mapping[str, Any]) -> tuple[str, ...]:
    return tuple(
        str(m["Ebs"]["SnapshotId"]) for m in image.get("BlockDeviceMappings", []) if m.get("Ebs", {}).get("SnapshotId")
    )


def parse_time(value: object) -> datetime | None:
    if not value:
        return None
    try:
        moment = datetime.fromisoformat(str(value).replace("Z", "+00:00"))
    except ValueError:
        return None
    return moment.replace(tzinfo=UTC) if moment.tzinfo is None else moment


@dataclass
class _Survey:
    """One reading of a region: the references found, the sources that failed, the API calls made."""

    session: AwsSession
    region: str
    page_size: int
    references: list[Reference] = field(default_factory=list)
    failures: list[SourceFailure] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    calls: Counter[str] = field(default_factory=Counter)

    def pages_of(self, client: Any, operation: str, key: str, what: str, **kwargs: Any) -> Iterable[Any]:
        return paginate(client, operation, key, what, page_size=self.page_size, pages=self.calls, **kwargs)

    def call_once(self, client: Any, operation: str, what: str, **kwargs: Any) -> Any:
        self.calls[operation] += 1
        return call(client, operation, what, **kwargs)

    def read(self, source: str, reader: Callable[[], list[Reference]]) -> bool:
        try:
            self.references += reader()
            return True
        except AmiforgeError as e:
            self.failures.append(SourceFailure(self.region, source, e.message))
            return False

    def ref(self, source: str, name: str, image: str | None, *, region: str | None = None) -> Reference:
        return Reference(source, name, region or self.region, image)


# --- the account-wide sources ------------------------------------------------------------------------------


@dataclass
class _Templates:
    """Launch template versions and what image each names: for the groups that launch from them."""

    images: dict[tuple[str, str], str | None] = field(default_factory=dict)  # (template id, version) → image
    default: dict[str, str] = field(default_factory=dict)  # template id → its default version number
    latest: dict[str, str] = field(default_factory=dict)
    names: dict[str, str] = field(default_factory=dict)  # template name → id

    def image_of(self, spec: Mapping[str, Any]) -> tuple[str, str | None] | None:
        """(template id, image) of a LaunchTemplateSpecification; None if the template is unknown."""
        template = str(spec.get("LaunchTemplateId") or self.names.get(str(spec.get("LaunchTemplateName")), ""))
        if template not in self.default:
            return None
        version = str(spec.get("Version") or "$Default")
        version = {"$Default": self.default[template], "$Latest": self.latest[template]}.get(version, version)
        return template, self.images.get((template, version))


def _instances(s: _Survey, ec2: Any, *, account: str = "") -> tuple[list[Reference], dict[str, str]]:
    refs, images = [], {}
    for reservation in s.pages_of(ec2, "DescribeInstances", "Reservations", f"instances in {s.region}"):
        for instance in reservation.get("Instances", []):
            iid, image = str(instance["InstanceId"]), instance.get("ImageId")
            images[iid] = str(image) if image else ""
            state = instance.get("State", {}).get("Name", "?")
            refs.append(s.ref(f"{account}instance", f"{iid} ({state})", str(image) if image else None))
    return refs, images


def _launch_templates(s: _Survey, ec2: Any, templates: _Templates, *, account: str = "") -> list[Reference]:
    refs = []
    for t in s.pages_of(ec2, "DescribeLaunchTemplates", "LaunchTemplates", f"launch templates in {s.region}"):
        tid, name = str(t["LaunchTemplateId"]), str(t.get("LaunchTemplateName", ""))
        templates.names[name] = tid
        templates.default[tid] = str(t.get("DefaultVersionNumber"))
        templates.latest[tid] = str(t.get("LatestVersionNumber"))
        for v in s.pages_of(ec2, "DescribeLaunchTemplateVersions", "LaunchTemplateVersions",
                        f"versions of launch template {tid}", LaunchTemplateId=tid):  # fmt: skip
            number = str(v["VersionNumber"])
            image = v.get("LaunchTemplateData", {}).get("ImageId")
            templates.images[(tid, number)] = str(image) if image else None
            default = " (default)" if v.get("DefaultVersion") else ""
            what = f"{name} ({tid}) version {number}{default}"
            if image and str(image).startswith("resolve:ssm:"):
                refs += _pinned_parameter(s, str(image), f"{account}launch template", what)
                image = None
            refs.append(s.ref(f"{account}launch template", what, str(image) if image else None))
    return refs


def _pinned_parameter(s: _Survey, value: str, source: str, what: str) -> list[Reference]:
    """`resolve:ssm:NAME` launches the parameter's current value, which the parameters source reads; with a version
    or label (`NAME:3`, `NAME:stable`) it launches that one, read here (parameter names hold no colon)."""
    name = value.removeprefix("resolve:ssm:")
    if ":" not in name.lstrip("/"):
        return []
    ssm = s.session.client("ssm", s.region)
    found = s.call_once(ssm, "GetParameter", f"SSM parameter {name}", Name=name, WithDecryption=True)
    text = str(found.get("Parameter", {}).get("Value", ""))
    return [s.ref(source, f"{what} ({value})", image) for image in sorted(set(AMI_ID.findall(text)))]


def _groups(
    s: _Survey, asg: Any, templates: _Templates, instances: Mapping[str, str], configs: Mapping[str, str]
) -> list[Reference]:
    refs = []
    for g in s.pages_of(asg, "DescribeAutoScalingGroups", "AutoScalingGroups", f"Auto Scaling groups in {s.region}"):
        name = str(g["AutoScalingGroupName"])
        specs = [g.get("LaunchTemplate")]
        mixed = g.get("MixedInstancesPolicy", {}).get("LaunchTemplate", {})
        specs.append(mixed.get("LaunchTemplateSpecification"))
        specs += [o.get("LaunchTemplateSpecification") for o in mixed.get("Overrides", [])]
        for spec in (x for x in specs if x):
            found = templates.image_of(spec)
            if found is not None and found[1] and not found[1].startswith("resolve:ssm:"):
                refs.append(s.ref("auto scaling group", f"{name} (launch template {found[0]})", found[1]))
        config = g.get("LaunchConfigurationName")
        if config and configs.get(str(config)):
            refs.append(s.ref("auto scaling group", f"{name} (launch configuration {config})", configs[str(config)]))
        if g.get("WarmPoolConfiguration"):
            for iid in _warm_pool(s, asg, name):
                refs.append(s.ref("auto scaling group", f"{name} warm pool instance {iid}", instances.get(iid)))
    return refs


def _warm_pool(s: _Survey, asg: Any, group: str) -> list[str]:
    """The instances of a group's warm pool, every page (DescribeWarmPool has no paginator of its own)."""
    found: list[str] = []
    token: str | None = None
    while True:
        extra = {"NextToken": token} if token else {}
        page = s.call_once(asg, "DescribeWarmPool", f"the warm pool of {group}", AutoScalingGroupName=group,
                           MaxRecords=min(s.page_size, 50), **extra)  # fmt: skip
        found += [str(i["InstanceId"]) for i in page.get("Instances", [])]
        token = page.get("NextToken")
        if not token:
            return found


def _launch_configurations(s: _Survey, asg: Any, configs: dict[str, str]) -> list[Reference]:
    refs = []
    for c in s.pages_of(
        asg, "DescribeLaunchConfigurations", "LaunchConfigurations", f"launch configurations in {s.region}"
    ):
        name, image = str(c["LaunchConfigurationName"]), str(c.get("ImageId", ""))
        configs[name] = image
        refs.append(s.ref("launch configuration", name, image or None))
    return refs


def _parameters(s: _Survey, ssm: Any, *, account: str = "") -> list[Reference]:
    names = [
        str(p["Name"]) for p in s.pages_of(ssm, "DescribeParameters", "Parameters", f"SSM parameters in {s.region}")
    ]
    refs = []
    for start in range(0, len(names), _SSM_BATCH):
        batch = names[start : start + _SSM_BATCH]
        answer = s.call_once(
            ssm, "GetParameters", f"SSM parameters {', '.join(batch)}", Names=batch, WithDecryption=True
        )
        for p in answer.get("Parameters", []):
            for image in sorted(set(AMI_ID.findall(str(p.get("Value", ""))))):
                refs.append(s.ref(f"{account}ssm parameter", str(p["Name"]), image))
    return refs


def _account_sources(s: _Survey, session: AwsSession) -> list[Reference]:
    """Everything of one account that can hold an image id (instances, templates, groups, parameters)."""
    ec2, asg, ssm = (session.client(x, s.region) for x in ("ec2", "autoscaling", "ssm"))
    refs, instances = _instances(s, ec2)
    templates, configs = _Templates(), dict[str, str]()
    refs += _launch_templates(s, ec2, templates)
    refs += _launch_configurations(s, asg, configs)
    refs += _groups(s, asg, templates, instances, configs)
    refs += _parameters(s, ssm)
    return refs


# --- the per-image sources ---------------------------------------------------------------------------------


def _shares(s: _Survey, ec2: Any, images: Collection[str], roles: Mapping[str, str]) -> list[Reference]:
    """Each launch permission of each image: an account read through its role, or judged to use the image."""
    refs: list[Reference] = []
    checked: dict[str, list[Reference]] = {}
    for image in sorted(images):
        try:
            answer = s.call_once(ec2, "DescribeImageAttribute", f"the launch permissions of {image}", ImageId=image,
                            Attribute="launchPermission")  # fmt: skip
        except NotFound:
            continue  # gone: nothing can launch it
        for permission in answer.get("LaunchPermissions", []):
            account = permission.get("UserId")
            if account and str(account) in roles:
                if account not in checked:
                    view = _Survey(s.session.as_account(str(account)), s.region, s.page_size, calls=s.calls)
                    found = _account_sources(view, view.session)
                    checked[str(account)] = [
                        Reference(f"account {account}: {r.source}", r.name, r.region, r.location) for r in found
                    ]
                refs += [r for r in checked[str(account)] if r.location == image]
                continue
            if account:
                who = f"account {account} (no role to look with: judged to use it)"
            elif permission.get("Group") == "all":
                who = "everyone (public)"
            else:
                who = str(permission.get("OrganizationArn") or permission.get("OrganizationalUnitArn") or permission)
                who += " (judged to use it)"
            refs.append(s.ref("share", who, image))
    return refs


def _image_references(s: _Survey, ec2: Any, images: Collection[str]) -> list[Reference]:
    refs: list[Reference] = []
    ids = sorted(images)
    for start in range(0, len(ids), _REFERENCES_BATCH):
        batch = ids[start : start + _REFERENCES_BATCH]
        try:
            what = f"references to {len(batch)} image(s)"
            found = list(s.pages_of(ec2, "DescribeImageReferences", "ImageReferences", what, ImageIds=batch,
                                IncludeAllResourceTypes=True))  # fmt: skip
        except AmiforgeError as e:
            if aws_code(e) in _UNSUPPORTED:
                s.notes.append(f"{s.region} does not offer DescribeImageReferences; the other sources were read")
                return refs
            raise
        refs += [s.ref("image reference", f"{r.get('ResourceType')} {r.get('Arn')}", str(r["ImageId"])) for r in found]
    return refs


def _recycle_bin(s: _Survey, session: AwsSession) -> None:
    """Warn when no Recycle Bin rule keeps amiforge's deregistered images: neither a region-level rule nor a
    tag-level one for `amiforge:managed=true` (the tag every image amiforge makes or adopts carries)."""
    rbin = session.client("rbin", s.region)
    what = f"Recycle Bin rules in {s.region}"
    ours = [{"ResourceTagKey": MANAGED_TAG, "ResourceTagValue": "true"}]
    region_level = list(s.pages_of(rbin, "ListRules", "Rules", what, ResourceType="EC2_IMAGE"))
    tag_level = list(s.pages_of(rbin, "ListRules", "Rules", what, ResourceType="EC2_IMAGE", ResourceTags=ours))
    if not region_level and not tag_level:
        s.notes.append(
            f"no Recycle Bin rule keeps deregistered images in {s.region}: `amiforge retire restore` could not bring "
            f"one back (aws rbin create-rule --resource-type EC2_IMAGE --resource-tags "
            f"ResourceTagKey={MANAGED_TAG},ResourceTagValue=true --retention-period …)"
        )


# --- the survey ------------------------------------------------------------------------------------------------


def survey_region(
    session: AwsSession,
    region: str,
    artifacts: Collection[Artifact],
    *,
    page_size: int,
    roles: Mapping[str, str],
    seen: dict[str, Mapping[str, Any]] | None = None,
) -> RegionSurvey:
    """`seen` receives each artifact's image as DescribeImages listed it, so the steps that follow need not describe
    each image again (one DescribeImages per step would cost more than the steps: EC2's non-mutating bucket)."""
    s = _Survey(session, region, page_size)
    ec2, asg, ssm = (session.client(x, region) for x in ("ec2", "autoscaling", "ssm"))
    wanted = {a.location for a in artifacts}
    images: dict[str, ImageState] = {}

    def own_images() -> list[Reference]:
        listed = s.pages_of(ec2, "DescribeImages", "Images", f"the account's images in {region}", Owners=["self"],
                        IncludeDeprecated=True, IncludeDisabled=True)  # fmt: skip
        refs = []
        for image in listed:
            iid = str(image["ImageId"])
            if iid in wanted and seen is not None:
                seen[iid] = image
            if iid in wanted:
                images[iid] = ImageState(
                    iid, image.get("State") != "deregistered", parse_time(image.get("DeprecationTime")),
                    protection_of(image.get("DeregistrationProtection")), _snapshots(image),
                )  # fmt: skip
            source = image.get("SourceImageId")
            if image.get("State") == "pending" and source:
                where = str(image.get("SourceImageRegion") or region)
                refs.append(s.ref("copy", f"{iid} in {region} (being copied)", str(source), region=where))
        return refs

    instances: dict[str, str] = {}
    templates, configs = _Templates(), dict[str, str]()

    def read_instances() -> list[Reference]:
        refs, found = _instances(s, ec2)
        instances.update(found)
        return refs

    s.read("images", own_images)
    s.read("instances", read_instances)
    s.read("launch templates", lambda: _launch_templates(s, ec2, templates))
    s.read("launch configurations", lambda: _launch_configurations(s, asg, configs))
    s.read("auto scaling groups", lambda: _groups(s, asg, templates, instances, configs))
    s.read("ssm parameters", lambda: _parameters(s, ssm))
    present = {i for i in wanted if images.get(i, ImageState(i, False)).present}
    s.read("shares", lambda: _shares(s, ec2, present, roles))
    s.read("image references", lambda: _image_references(s, ec2, present))
    try:
        _recycle_bin(s, session)
    except AmiforgeError as e:
        s.notes.append(f"the Recycle Bin rules of {region} could not be read ({e.message})")
    for iid in wanted - set(images):
        images[iid] = ImageState(iid, present=False)
    return RegionSurvey(region, tuple(s.references), tuple(s.failures), images, dict(s.calls), tuple(s.notes))


# --- the steps -------------------------------------------------------------------------------------------------


def _describe(ec2: Any, image: str) -> Mapping[str, Any] | None:
    try:
        found = call(ec2, "DescribeImages", image, ImageIds=[image], IncludeDeprecated=True, IncludeDisabled=True)
    except NotFound:
        return None
    listed = found.get("Images", [])
    return listed[0] if listed and listed[0].get("State") != "deregistered" else None


def deprecate(
    session: AwsSession, artifact: Artifact, at: datetime, *, known: Mapping[str, Any] | None = None
) -> tuple[str, ...]:
    """Deprecate the image from the next whole minute (EC2 refuses a time in the past); its snapshots. `known`: the
    image as the survey just listed it."""
    ec2 = session.client("ec2", artifact.region)
    image = known if known is not None else _describe(ec2, artifact.location)
    if image is None:
        return ()
    when = max(at, datetime.now(UTC)).replace(second=0, microsecond=0) + timedelta(minutes=1)
    try:
        call(ec2, "EnableImageDeprecation", artifact.location, ImageId=artifact.location,
             DeprecateAt=when.strftime("%Y-%m-%dT%H:%M:%SZ"))  # fmt: skip
    except NotFound:
        return ()  # gone since the survey: nothing left to deprecate
    return _snapshots(image)


def deregister(
    session: AwsSession, artifact: Artifact, *, known: Mapping[str, Any] | None = None
) -> tuple[Removal, str]:
    """`known`: the image as the survey right before listed it (its protection)."""
    ec2 = session.client("ec2", artifact.region)
    image = known if known is not None else _describe(ec2, artifact.location)
    if image is None:
        return "gone", ""
    protection = protection_of(image.get("DeregistrationProtection"))
    if protection is not None and protection.startswith("enabled"):
        call(ec2, "DisableImageDeregistrationProtection", artifact.location, ImageId=artifact.location)
        if protection == "enabled-with-cooldown":
            return "waiting", "its deregistration protection is lifted; EC2 holds it 24 h more (a later run)"
    # A cool-down the plan judged over ("disabled after …" in the past): EC2 has the last word.
    try:
        call(ec2, "DeregisterImage", artifact.location, ImageId=artifact.location)
    except NotFound:
        return "gone", ""  # deregistered meanwhile (InvalidAMIID.NotFound or .Unavailable)
    return "removed", ""


def delete_snapshots(session: AwsSession, region: str, snapshots: Sequence[str]) -> list[str]:
    """Delete each snapshot no image of any owner still uses; the ones kept."""
    ec2 = session.client("ec2", region)
    kept = []
    for snapshot in snapshots:
        users = call(ec2, "DescribeImages", f"images using {snapshot}", IncludeDeprecated=True, IncludeDisabled=True,
                     Filters=[{"Name": "block-device-mapping.snapshot-id", "Values": [snapshot]}])  # fmt: skip
        if any(i.get("State") != "deregistered" for i in users.get("Images", [])):
            kept.append(snapshot)
            continue
        with contextlib.suppress(NotFound):  # gone already: a run killed before it recorded it deleted it
            call(ec2, "DeleteSnapshot", snapshot, SnapshotId=snapshot)
    return kept


def restore(session: AwsSession, artifact: Artifact) -> None:
    ec2 = session.client("ec2", artifact.region)
    if _describe(ec2, artifact.location) is not None:
        return  # restored already (a run killed before the registry heard of it)
    binned = call(ec2, "ListImagesInRecycleBin", artifact.location, ImageIds=[artifact.location])
    if not binned.get("Images"):
        raise NotFound(
            f"{artifact.location} is not in the Recycle Bin of {artifact.region}",
            fix="no Recycle Bin rule kept it, or its retention is over (aws rbin list-rules --resource-type EC2_IMAGE)",
        )
    call(ec2, "RestoreImageFromRecycleBin", artifact.location, ImageId=artifact.location)


def stored(session: AwsSession, region: str, artifacts: Collection[Artifact]) -> dict[str, Stored]:
    """Each image's snapshots (DescribeImages for the images, DescribeSnapshots for the account's snapshots, one
    listing each): the stored size EC2 reports (FullSnapshotSizeInBytes), else the volume size as an upper bound."""
    ec2 = session.client("ec2", region)
    wanted = {a.location for a in artifacts}
    images = {
        str(i["ImageId"]): i
        for i in paginate(
            ec2,
            "DescribeImages",
            "Images",
            f"the account's images in {region}",
            Owners=["self"],
            IncludeDeprecated=True,
            IncludeDisabled=True,
        )
        if str(i["ImageId"]) in wanted
    }
    snapshots = {
        str(s["SnapshotId"]): s
        for s in paginate(
            ec2, "DescribeSnapshots", "Snapshots", f"the account's snapshots in {region}", OwnerIds=["self"]
        )
    }
    found = {}
    for iid, image in images.items():
        parts = [snapshots[s] for s in _snapshots(image) if s in snapshots]
        size, exact = 0, True
        for snap in parts:
            if snap.get("FullSnapshotSizeInBytes") is not None:
                size += int(snap["FullSnapshotSizeInBytes"])
            else:
                size += int(snap.get("VolumeSize", 0)) * 1024**3
                exact = False
        tags = {str(t["Key"]): str(t["Value"]) for t in image.get("Tags", [])}
        resources = [("image", iid, tags)] + [
            ("snapshot", str(s["SnapshotId"]), {str(t["Key"]): str(t["Value"]) for t in s.get("Tags", [])})
            for s in parts
        ]
        found[iid] = Stored(iid, size, exact, tags, tuple(resources))
    return found
