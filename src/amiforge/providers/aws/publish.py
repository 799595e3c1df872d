"""Publishing a promoted image on AWS: the channel's SSM parameter and, optionally, a launch template's default version.

This module owns the AWS side of a channel pointer (docs/architecture.md §3, step 6): per channel and region, an SSM
parameter `<prefix>/<name>/<channel>` of DataType `aws:ec2:image` holding the AMI id, and for a launch template a new
version with that numeric AMI id which becomes the template's default. The default is always set to a version
*number*, never `$Latest`: an Auto Scaling group following `$Default` must not pick up whatever version someone
creates next.

Each publication reports what it replaced (the previous AMI id, the previous default version): the rollback target.
A channel goes back by publishing the version it held before again (`amiforge promote` of that version), through the
same path and rules; there is no second write path for rolling back.

Publishing is idempotent and resumable: an unchanged parameter is not written again (a tag it lacks is added: see
`_tag_parameter`), a default that already holds the image gets no new version, and the template's newest version is
reused rather than duplicated only when its whole LaunchTemplateData is what creating the version now would give (an
interrupted run made it and stopped before making it the default); a newer version that holds the image but differs
in any other field is someone else's and is never taken (templates.version_holding and templates.created_from,
shared with the Auto Scaling fleet).

Everything that could refuse is read before anything is written, so a missing launch template or image leaves the
parameter untouched. Every call goes through `clients.call`/`paginate`, so errors translate through the one table.

SSM validates a parameter of DataType `aws:ec2:image` *asynchronously* (SSM API reference, PutParameter; "Native
parameter support for Amazon Machine Image IDs"): PutParameter answers 200 with the new version number at once, and
only after SSM has checked that the image exists, is available and is visible to the account does the parameter hold
it. A failed check is reported only as an EventBridge event; the parameter keeps its previous value (or, when new, is
never created). So a 200 is not a publication: after PutParameter this module waits (`waiting.retry`, bounded,
injectable clock) until GetParameter shows the image at the version PutParameter returned, and only then tags the
parameter, moves the launch template and returns the Publication that the caller records. A validation that does not
finish in time is an error naming what the parameter still holds; nothing is returned, so nothing is recorded.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

from amiforge.awsapi.clients import AwsSession, call, paginate
from amiforge.errors import ConfigError, InfraError, NotFound, StateError
from amiforge.providers.aws.images import MANAGED_TAG, describe_image
from amiforge.providers.aws.templates import (
    Template,
    client_token,
    find_template,
    version_holding,
)
from amiforge.waiting import Wait, retry

__all__ = ["IMAGE_DATA_TYPE", "RUN_TAG", "VALIDATION_WAIT", "Publication", "parameter_name", "publish"]

IMAGE_DATA_TYPE = "aws:ec2:image"
RUN_TAG = "amiforge:run"
_IMAGE_ID_RE = re.compile(r"ami-[0-9a-f]{8}(?:[0-9a-f]{9})?")
_SEGMENT_RE = re.compile(r"[a-z0-9][a-z0-9-]{0,62}")
_PREFIX_RE = re.compile(r"(?:/[A-Za-z0-9_.-]+)+")
# How long SSM may take to validate an aws:ec2:image value. AWS gives no bound; it is seconds when the image is fine,
# and a failed validation never shows in GetParameter, so this is also how long a bad publication takes to fail.
VALIDATION_WAIT = Wait(first_delay=1.0, max_delay=10.0, deadline=180.0)


@dataclass(frozen=True)
class Publication:
    """What one publish left in place, and what it replaced: the rollback target.

    `version` is the SSM parameter's version now holding `image_id`. `previous_image_id` is the value before it
    (None for a new parameter). `launch_template_version` is the template's numeric default now holding `image_id`;
    `previous_lt_version` the default before this call moved it (None if there is no template, or it did not move).
    `changed` is False when everything already pointed at the image and nothing was written."""

    parameter: str
    version: int
    previous_image_id: str | None
    launch_template_version: int | None
    previous_lt_version: int | None
    image_id: str
    region: str
    launch_template: str | None = None
    changed: bool = True


def parameter_name(prefix: str, name: str, channel: str) -> str:
    """`/amiforge/web/prod`: the channel's SSM parameter. Refuses names that would leave the prefix's tree."""
    problems = []
    if _PREFIX_RE.fullmatch(prefix) is None:
        problems.append(f"parameter prefix {prefix!r} is not an absolute SSM path like /amiforge (no trailing /)")
    for what, value in (("image name", name), ("channel", channel)):
        if _SEGMENT_RE.fullmatch(value) is None:
            problems.append(f"{what} {value!r} is not [a-z0-9][a-z0-9-]{{0,62}}")
    if problems:
        raise ConfigError("; ".join(problems), fix="use lower-case names, digits and dashes; a prefix like /amiforge")
    return f"{prefix}/{name}/{channel}"


def publish(
    session: AwsSession,
    *,
    region: str,
    name: str,
    channel: str,
    image_id: str,
    parameter_prefix: str = "/amiforge",
    launch_template: str | None = None,
    run_id: str,
    wait: Wait = VALIDATION_WAIT,
) -> Publication:
    """Point `name`'s `channel` in `region` at `image_id`: the SSM parameter, and `launch_template`'s default version.

    The image must exist and be available in `region`. A launch template that does not exist is a NotFound, raised
    before the parameter is written. Returns only once SSM holds the image (`wait` bounds how long SSM's validation
    may take); an image SSM does not accept is an InfraError, and nothing after the parameter is written."""
    parameter = parameter_name(parameter_prefix, name, channel)
    _check_image(session, region, image_id)
    template = find_template(session, region, name=launch_template) if launch_template is not None else None
    return _apply(session, region, parameter, image_id, template, run_id, wait)


# --- reads (nothing is written until all of them succeeded) -------------------------------------------------------


def _check_image(session: AwsSession, region: str, image_id: str) -> None:
    if _IMAGE_ID_RE.fullmatch(image_id) is None:
        raise ConfigError(f"{image_id!r} is not an image id", fix="an image id looks like ami-0123456789abcdef0")
    image = describe_image(session, region, image_id)
    if image.get("State") != "available":
        raise StateError(
            f"image {image_id} in {region} is {image.get('State')!r}, not available",
            fix="publish only an image that is available in this region (distribute it first)",
        )


def _read_parameter(session: AwsSession, region: str, parameter: str) -> tuple[str | None, int | None]:
    ssm = session.client("ssm", region)
    try:
        current = call(ssm, "GetParameter", parameter, Name=parameter)["Parameter"]
    except NotFound:
        return None, None
    return str(current["Value"]), int(current["Version"])


def _value_before(session: AwsSession, region: str, parameter: str, current: str) -> str | None:
    """The parameter's last value other than `current`: the rollback target when this call changed nothing."""
    ssm = session.client("ssm", region)
    history = paginate(ssm, "GetParameterHistory", "Parameters", parameter, Name=parameter)
    previous: str | None = None
    for entry in sorted(history, key=lambda h: int(h["Version"])):
        value = str(entry["Value"])
        if value != current:
            previous = value
    return previous


# --- writes ---------------------------------------------------------------------------------------------------------


def _apply(
    session: AwsSession,
    region: str,
    parameter: str,
    image_id: str,
    template: Template | None,
    run_id: str,
    wait: Wait,
) -> Publication:
    previous, version = _read_parameter(session, region, parameter)
    ssm = session.client("ssm", region)
    created = previous is None
    parameter_changed = previous != image_id
    if parameter_changed:
        answer = call(
            ssm,
            "PutParameter",
            parameter,
            Name=parameter,
            Value=image_id,
            Type="String",
            DataType=IMAGE_DATA_TYPE,
            Overwrite=True,
            Description=f"amiforge channel pointer (run {run_id})",
        )
        version = _await_validation(session, region, parameter, image_id, int(answer["Version"]), wait)
    else:
        previous = _value_before(session, region, parameter, image_id)
    assert version is not None  # read back or just written
    _tag_parameter(ssm, parameter, run_id, created=created)
    lt_version: int | None = None
    previous_lt: int | None = None
    if template is not None:
        lt_version, previous_lt = _point_template(session, region, template, image_id, run_id)
    return Publication(
        parameter=parameter,
        version=version,
        previous_image_id=previous,
        launch_template_version=lt_version,
        previous_lt_version=previous_lt,
        image_id=image_id,
        region=region,
        launch_template=template.name if template is not None else None,
        changed=parameter_changed or previous_lt is not None,
    )


def _tag_parameter(ssm: Any, parameter: str, run_id: str, *, created: bool) -> None:
    """Give the parameter the amiforge tags it lacks: both when this call created it, else those a read shows missing.

    SSM refuses Tags together with Overwrite (and Overwrite keeps a retried put from failing on its own first attempt),
    so tags are a call of their own after the put — which a run killed or timed out in between never made, while SSM
    still created the parameter once it validated the image. Hence the read on every later publication. Tags that are
    there are never overwritten: `amiforge:run` keeps naming the run that made the parameter."""
    wanted = {MANAGED_TAG: "true", RUN_TAG: run_id}
    if not created:
        answer = call(ssm, "ListTagsForResource", parameter, ResourceType="Parameter", ResourceId=parameter)
        for tag in answer.get("TagList", []):
            wanted.pop(str(tag["Key"]), None)
    if wanted:
        call(
            ssm,
            "AddTagsToResource",
            parameter,
            ResourceType="Parameter",
            ResourceId=parameter,
            Tags=[{"Key": key, "Value": value} for key, value in wanted.items()],
        )


class _NotValidated(Exception):
    """The parameter does not hold the image at the written version yet: (value, version) as GetParameter shows."""

    def __init__(self, value: str | None, version: int | None) -> None:
        super().__init__(value, version)
        self.value, self.version = value, version


def _await_validation(
    session: AwsSession,
    region: str,
    parameter: str,
    image_id: str,
    written: int,
    wait: Wait,
) -> int:
    """`written`, once GetParameter shows `image_id` at that version: SSM has validated the image (module docstring).

    A later version means another writer moved the parameter meanwhile (StateError); no change by the deadline means
    SSM refused the image or has not finished (InfraError naming what the parameter holds)."""

    def validated() -> int:
        value, version = _read_parameter(session, region, parameter)
        if version is not None and version > written:
            raise StateError(
                f"SSM parameter {parameter} in {region} moved on to version {version} ({value}) while amiforge "
                f"waited for version {written} to hold {image_id}",
                fix="another writer changed the channel's parameter; find out who, then re-run the promote",
            )
        if value == image_id and version == written:
            return written
        raise _NotValidated(value, version)

    try:
        return retry(validated, again=lambda e: isinstance(e, _NotValidated), wait=wait)
    except _NotValidated as e:
        now = "does not exist" if e.version is None else f"still holds {e.value} (version {e.version})"
        raise InfraError(
            f"SSM did not take {image_id} into parameter {parameter} in {region}: PutParameter answered version "
            f"{written}, but after {wait.deadline:.0f}s the parameter {now}. SSM validates an {IMAGE_DATA_TYPE} "
            "value asynchronously and drops a value it refuses",
            retryable=True,
            fix=f"the image must exist in {region}, be available and be visible to this account, and the identity "
            "amiforge runs as needs ec2:DescribeImages (SSM checks the image with it); SSM reports a refused value as "
            "an EventBridge 'Parameter Store Change' event. Then run it again: it converges",
        ) from None


def _point_template(
    session: AwsSession, region: str, template: Template, image_id: str, run_id: str
) -> tuple[int, int | None]:
    """Make a numeric version holding `image_id` the template's default; (that version, the default it replaced).

    The default itself if it holds the image, else the version `templates.version_holding` finds or makes from the
    default (an interrupted publish's version is reused, never duplicated)."""
    target = version_holding(
        session,
        region,
        template,
        source=template.default,
        image_id=image_id,
        token=client_token(run_id, template.template_id, str(template.default), image_id),
        description=f"amiforge {image_id} (run {run_id})",
    )
    if target == template.default:
        return target, None
    ec2 = session.client("ec2", region)
    call(
        ec2,
        "ModifyLaunchTemplate",
        f"launch template {template.name}",
        LaunchTemplateId=template.template_id,
        DefaultVersion=str(target),  # a number: never "$Latest"
    )
    return target, template.default
