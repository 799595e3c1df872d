"""What runs on EC2, for `amiforge drift`, and what the account's Allowed AMIs setting says of each image.

Instances are read over every page (DescribeInstances, states pending to stopped); an instance an Auto Scaling group
launched names its group in the `aws:autoscaling:groupName` tag. The Allowed AMIs setting (GetAllowedImagesSettings)
is evaluated as the EC2 User Guide describes it: an image is allowed when it meets at least one criterion, and meets
one when it matches every field the criterion sets — its provider (`amazon`, `aws-marketplace`, `aws-backup-vault`,
an account id, or `none`: the account's own), a name pattern (`*`, `?`), a Marketplace product code, a maximum age, a
maximum time since deprecation. The account's own images are always allowed. A criterion on watermarks or Inspector
scan results cannot be judged from DescribeImages: an image only such a criterion could allow is "unknown" (None).
"""

from __future__ import annotations

import fnmatch
from collections.abc import Collection, Iterable, Mapping, Sequence
from datetime import UTC, datetime
from typing import Any

from amiforge.awsapi.clients import AwsSession, call, paginate
from amiforge.errors import AmiforgeError, ConfigError, NotFound
from amiforge.model import Member
from amiforge.providers.aws.retire import parse_time
from amiforge.providers.interface import Running, RunningSurvey, SourceFailure

_LISTED_STATES = ["pending", "running", "stopping", "stopped"]
# DescribeImages with explicit ids: this many a call.
_IMAGES_BATCH = 100
_UNJUDGED = ("ImageWatermarks", "ScanResultCondition")


def _provider_matches(image: Mapping[str, Any], providers: Sequence[str], account: str) -> bool:
    owner, alias = str(image.get("OwnerId", "")), str(image.get("ImageOwnerAlias", ""))
    aliases = {"amazon", "aws-marketplace", "aws-backup-vault"}
    return any(p == owner or (p == "none" and owner == account) or (p in aliases and alias == p) for p in providers)


def criterion_allows(
    criterion: Mapping[str, Any], image: Mapping[str, Any], account: str, now: datetime
) -> bool | None:
    """True/False when the criterion says; None when it sets a field DescribeImages cannot show."""
    providers = criterion.get("ImageProviders")
    if providers and not _provider_matches(image, providers, account):
        return False
    names = criterion.get("ImageNames")
    if names and not any(fnmatch.fnmatchcase(str(image.get("Name", "")), n) for n in names):
        return False
    codes = criterion.get("MarketplaceProductCodes")
    if codes and not {str(c.get("ProductCodeId")) for c in image.get("ProductCodes", [])} & set(codes):
        return False
    created = criterion.get("CreationDateCondition", {}).get("MaximumDaysSinceCreated")
    made = parse_time(image.get("CreationDate"))
    if created is not None and (made is None or (now - made).days > int(created)):
        return False
    deprecated = criterion.get("DeprecationTimeCondition", {}).get("MaximumDaysSinceDeprecated")
    since = parse_time(image.get("DeprecationTime"))
    if deprecated is not None and since is not None and since < now and (now - since).days > int(deprecated):
        return False
    return None if any(criterion.get(k) for k in _UNJUDGED) else True


def image_allowed(
    criteria: Sequence[Mapping[str, Any]], image: Mapping[str, Any] | None, account: str, now: datetime
) -> bool | None:
    if image is None:
        return None  # not visible to the account any more: nothing to judge
    if str(image.get("OwnerId")) == account:
        return True  # "The Allowed AMIs feature does not restrict the AMIs owned by your account"
    verdicts = [criterion_allows(c, image, account, now) for c in criteria]
    if any(v is True for v in verdicts):
        return True
    return None if any(v is None for v in verdicts) else False


def _images(session: AwsSession, region: str, ids: Collection[str]) -> dict[str, Mapping[str, Any]]:
    ec2 = session.client("ec2", region)
    found: dict[str, Mapping[str, Any]] = {}
    listed = sorted(ids)
    for start in range(0, len(listed), _IMAGES_BATCH):
        batch = listed[start : start + _IMAGES_BATCH]
        for image in paginate(ec2, "DescribeImages", "Images", f"{len(batch)} image(s) instances run", page_size=None,
                              ImageIds=batch, IncludeDeprecated=True, IncludeDisabled=True):  # fmt: skip
            found[str(image["ImageId"])] = image
    return found


def _instances(session: AwsSession, region: str) -> list[tuple[str, Mapping[str, Any]]]:
    ec2 = session.client("ec2", region)
    filters = [{"Name": "instance-state-name", "Values": _LISTED_STATES}]
    return [
        (str(reservation.get("OwnerId", "")), instance)
        for reservation in paginate(ec2, "DescribeInstances", "Reservations", f"instances in {region}", Filters=filters)
        for instance in reservation.get("Instances", [])
    ]


def _member(instance: Mapping[str, Any]) -> Member:
    state = str(instance.get("State", {}).get("Name", ""))
    tags = {str(t["Key"]): str(t["Value"]) for t in instance.get("Tags", [])}
    return Member(
        str(instance["InstanceId"]),
        tags.get("amiforge:version"),
        str(instance.get("ImageId", "")),
        "ready" if state == "running" else "launching" if state == "pending" else "stopped",
        parse_time(instance.get("LaunchTime")) or datetime.now(UTC),
        detail=state,
    )


def running_region(session: AwsSession, region: str) -> RunningSurvey:
    try:
        instances = _instances(session, region)
    except AmiforgeError as e:
        return RunningSurvey((), (SourceFailure(region, "instances", e.message),))
    notes: list[str] = []
    verdicts: dict[str, bool | None] = {}
    try:
        setting = call(session.client("ec2", region), "GetAllowedImagesSettings", f"the Allowed AMIs of {region}")
    except AmiforgeError as e:
        setting = {}
        notes.append(f"the Allowed AMIs setting of {region} could not be read ({e.message})")
    if setting.get("State") in ("enabled", "audit-mode") and instances:
        account = instances[0][0]
        images = _images(session, region, {str(i.get("ImageId")) for _, i in instances if i.get("ImageId")})
        now = datetime.now(UTC)
        criteria = setting.get("ImageCriteria", [])
        verdicts = {image: image_allowed(criteria, images.get(image), account, now) for image in images}
    machines = []
    for _, instance in instances:
        tags = {str(t["Key"]): str(t["Value"]) for t in instance.get("Tags", [])}
        group = tags.get("aws:autoscaling:groupName")
        member = _member(instance)
        machines.append(
            Running("aws", region, f"{region}/{group}" if group else "", member, verdicts.get(member.location))
        )
    return RunningSurvey(tuple(machines), (), tuple(notes))


def running(session_for: Any, regions: Iterable[str]) -> RunningSurvey:
    machines: list[Running] = []
    failures: list[SourceFailure] = []
    notes: list[str] = []
    for region in sorted(set(regions)):
        found = running_region(session_for(region), region)
        machines += found.machines
        failures += found.failures
        notes += found.notes
    return RunningSurvey(tuple(machines), tuple(failures), tuple(notes))


# The Allowed AMIs setting's limits (the EC2 API reference, ImageCriterionRequest): 50 names a criterion, 10 criteria.
NAMES_PER_CRITERION = 50
MAX_CRITERIA = 10


def criteria_for(session: AwsSession, region: str, images: Collection[str]) -> list[dict[str, Any]]:
    """Allowed AMIs criteria that allow exactly these images (of this account) by their names, and no other image of
    another provider: ImageProviders the owning account, ImageNames the images' names."""
    found = _images(session, region, set(images))
    missing = sorted(set(images) - set(found))
    if missing:
        raise NotFound(f"image(s) {', '.join(missing)} are not in {region}", fix="`amiforge retire` shows their stage")
    by_owner: dict[str, list[str]] = {}
    for image in found.values():
        by_owner.setdefault(str(image["OwnerId"]), []).append(str(image["Name"]))
    criteria = [
        {"ImageProviders": [owner], "ImageNames": sorted(names)[start : start + NAMES_PER_CRITERION]}
        for owner, names in sorted(by_owner.items())
        for start in range(0, len(names), NAMES_PER_CRITERION)
    ]
    if len(criteria) > MAX_CRITERIA:
        raise ConfigError(
            f"{len(found)} images need {len(criteria)} criteria; the Allowed AMIs setting takes at most {MAX_CRITERIA}",
            fix="name the images with a common prefix and allow it with a wildcard (ImageNames: ['web-*'])",
        )
    return criteria
