"""What the live AWS suite (tests/live) shares: its settings from the environment, the recipe it bakes, the amiforge
CLI in a subprocess with a registry of its own, and the boto3 cleanups that remove what a test made whatever happens.

Everything the suite creates carries the tag `amiforge-live=<session>`: the recipe's `tags:` put it on the images
amiforge bakes (and distribute carries it to the copies); the tests put it on what they create themselves (launch
templates, Auto Scaling groups and their instances, KMS keys). `sweep` finds whatever a test's own cleanup missed by
that tag, and so can a person after a killed run (README, "Live tests"). amiforge's own leftovers (a builder a failed
bake could not terminate) carry `amiforge:managed`/`amiforge:run`, which `amiforge gc` collects.

boto3 is imported only by the fixtures that talk to AWS (conftest.py), so collecting the suite needs no AWS at all.
"""

from __future__ import annotations

import json
import os
import secrets
import subprocess
import sys
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any, TypeVar

import pytest
import yaml

OPT_IN = "AMIFORGE_LIVE_AWS"
LIVE_TAG = "amiforge-live"
ROLLOUT_TAG = "amiforge:rollout"  # the opt-in tag of a group amiforge may roll (the IAM policy is conditioned on it)
DEBIAN_SOURCE = "/aws/service/debian/release/bookworm/latest/amd64"
CLI_TIMEOUT = 3600.0  # a bake with its boot test on a t3.micro takes 10-20 minutes

T = TypeVar("T")


# --- settings ---------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class LiveConfig:
    """The sandbox account's settings (README, "Live tests"), and the names of this session's resources."""

    region: str
    security_group: str
    instance_profile: str | None = None
    subnet: str | None = None
    region2: str | None = None
    share_account: str | None = None
    # A fresh id per session: names and tags never collide with another run's (or a killed run's) resources.
    session: str = field(default_factory=lambda: secrets.token_hex(4))

    @classmethod
    def from_env(cls, environ: Mapping[str, str]) -> LiveConfig:
        def get(name: str) -> str | None:
            return environ.get(name, "").strip() or None

        security_group = get("AMIFORGE_LIVE_SECURITY_GROUP")
        if security_group is None:
            pytest.fail(
                "AMIFORGE_LIVE_SECURITY_GROUP is not set: the Debian builder is reached over SSH, so the recipe "
                "needs a security group letting this machine in on port 22 (README, 'Live tests')",
                pytrace=False,
            )
        return cls(
            region=get("AMIFORGE_LIVE_REGION") or "eu-west-1",
            security_group=security_group,
            instance_profile=get("AMIFORGE_LIVE_INSTANCE_PROFILE"),
            subnet=get("AMIFORGE_LIVE_SUBNET"),
            region2=get("AMIFORGE_LIVE_REGION2"),
            share_account=get("AMIFORGE_LIVE_SHARE_ACCOUNT"),
        )

    @property
    def name(self) -> str:
        """The recipe's (so the image's) name: versions, channels and the parameter path all start from it."""
        return f"live-{self.session}"

    @property
    def parameter_prefix(self) -> str:
        return f"/amiforge-live/{self.session}"

    @property
    def publish_template(self) -> str:
        """The launch template promote gives a new default version (the publish test creates it in each region)."""
        return f"{self.name}-publish"

    @property
    def regions(self) -> tuple[str, ...]:
        return (self.region, self.region2) if self.region2 else (self.region,)

    def tags(self, key: str = "Key", value: str = "Value") -> list[dict[str, str]]:
        """The session tag in the shape of an API (KMS spells it TagKey/TagValue)."""
        return [{key: LIVE_TAG, value: self.session}]

    def recipe(self) -> str:
        provider: dict[str, object] = {
            "type": "aws",
            "region": self.region,
            "instance_type": "t3.micro",
            "source": {"ssm_parameter": DEBIAN_SOURCE},
            # Debian's cloud images ship no SSM agent: the builder is reached over SSH as Debian's default user.
            "communicator": "ssh",
            "ssh_username": "admin",
            "security_group_ids": [self.security_group],
            "publish": {"parameter_prefix": self.parameter_prefix, "launch_template": self.publish_template},
        }
        if self.instance_profile:
            provider["instance_profile"] = self.instance_profile
        if self.subnet:
            provider["subnet_id"] = self.subnet
        distribution: dict[str, object] = {}
        if self.region2:
            distribution["regions"] = [{"region": self.region2}]
        if self.share_account:
            distribution["accounts"] = [self.share_account]
        if distribution:
            provider["distribution"] = distribution
        recipe = {
            "name": self.name,
            "provider": provider,
            "steps": [{"packages": ["nginx"]}, {"service": {"enable": ["nginx"]}}],
            "checks": {
                "ready_within": "300s",
                "units": ["nginx"],
                "http": [{"port": 80, "path": "/", "expect_status": 200}],
            },
            "tags": {LIVE_TAG: self.session},
        }
        return yaml.safe_dump(recipe, sort_keys=False)


# --- the CLI ----------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Amiforge:
    """`amiforge ARGS --json` in a subprocess, with a registry of its own under `home` (also its working directory,
    so no amiforge.toml of the caller's applies)."""

    home: Path

    @property
    def env(self) -> dict[str, str]:
        # The caller's AWS credentials and amiforge's AWS settings pass; no other AMIFORGE_* setting may point the
        # suite at another registry, signing key or policy.
        kept = {k: v for k, v in os.environ.items() if not k.startswith("AMIFORGE_") or k.startswith("AMIFORGE_AWS_")}
        return kept | {"AMIFORGE_DATA_DIR": str(self.home / "data")}

    def run(self, *args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "amiforge", *args, "--json"],
            cwd=self.home,
            env=self.env,
            capture_output=True,
            text=True,
            timeout=CLI_TIMEOUT,
            check=False,
        )

    def __call__(self, *args: str) -> Any:
        proc = self.run(*args)
        assert proc.returncode == 0, f"amiforge {' '.join(args)}: exit {proc.returncode}\n{proc.stdout}\n{proc.stderr}"
        return json.loads(proc.stdout)

    def images(self, ref: str) -> dict[str, str]:
        """The version's AMI in each region holding it (the bake's, and the copies distribute recorded)."""
        return {a["region"]: a["location"] for a in self("images", "show", ref)["artifacts"]}

    def status(self, ref: str) -> str:
        return str(self("images", "show", ref)["version"]["status"])


@dataclass(frozen=True)
class Baked:
    """The session's one baked (and boot-tested) version, shared by every test: a bake costs 10-20 minutes."""

    ref: str
    image_id: str
    outcome: Mapping[str, Any]  # what `bake --json` printed
    recipe: Path


def ensure_scanned(amiforge: Amiforge, ref: str) -> None:
    """Scan `ref` unless an earlier test did: the tests run in any order, or alone."""
    if amiforge.status(ref) == "tested":
        amiforge("scan", ref)


def ensure_signed(amiforge: Amiforge, ref: str) -> None:
    """Scan and sign `ref` (with the registry's Ed25519 key, made on first use) unless it is signed already."""
    ensure_scanned(amiforge, ref)
    if amiforge.status(ref) != "scanned":
        return
    if not amiforge("keys", "list"):
        amiforge("keys", "generate")
    amiforge("sign", ref)


def packer_manifest(path: Path, region: str, image_id: str) -> Path:
    """A manifest as Packer's manifest post-processor writes it, for `amiforge import packer`."""
    run = f"live-{secrets.token_hex(8)}"
    build = {
        "name": "amazon-ebs.live",
        "builder_type": "amazon-ebs",
        "build_time": int(time.time()),
        "files": None,
        "artifact_id": f"{region}:{image_id}",
        "packer_run_uuid": run,
        "custom_data": {},
    }
    path.write_text(json.dumps({"builds": [build], "last_run_uuid": run}))
    return path


# --- waiting and cleaning up --------------------------------------------------------------------------------------


def eventually(what: str, probe: Callable[[], T | None], *, timeout: float = 600.0, every: float = 15.0) -> T:
    """`probe()` until it returns something other than None; an AssertionError naming `what` after `timeout`."""
    deadline = time.monotonic() + timeout
    while (value := probe()) is None:
        if time.monotonic() >= deadline:
            raise AssertionError(f"{what}: not within {timeout:.0f} s")
        time.sleep(every)
    return value


def error_code(error: BaseException) -> str:
    """The AWS error code of a botocore ClientError ('' for anything else)."""
    response = getattr(error, "response", None)
    return str(response.get("Error", {}).get("Code", "")) if isinstance(response, dict) else ""


def _gone(error: BaseException) -> bool:
    code = error_code(error)
    return "NotFound" in code or code == "InvalidAMIID.Unavailable"


def run_all(steps: Iterable[tuple[str, Callable[[], object]]]) -> None:
    """Run every cleanup step even when some fail (one stuck resource must not keep the others alive), then raise
    one error naming each failure."""
    failures = []
    for what, step in steps:
        try:
            step()
        except Exception as e:
            failures.append(f"{what}: {e!r}")
    if failures:
        raise AssertionError(
            "cleanup failed; look for the tag amiforge-live to remove by hand:\n" + "\n".join(failures)
        )


def discard_image(ec2: Any, image_id: str) -> None:
    """Deregister an image with its snapshots; first lift the deregistration protection distribute puts on copies
    (without a cooldown, so it lifts at once)."""
    try:
        images = ec2.describe_images(ImageIds=[image_id])["Images"]
    except Exception as e:
        if _gone(e):
            return
        raise
    if not images:
        return
    if str(images[0].get("DeregistrationProtection", "disabled")).startswith("enabled"):
        ec2.disable_image_deregistration_protection(ImageId=image_id)
    ec2.deregister_image(ImageId=image_id, DeleteAssociatedSnapshots=True)


def unless_gone(action: Callable[[], object]) -> None:
    """`action()`, where the resource being gone already is success."""
    try:
        action()
    except Exception as e:
        if not _gone(e):
            raise


def delete_template(ec2: Any, name: str) -> None:
    """Delete a launch template with all its versions (also those publish and the rollout added)."""
    unless_gone(partial(ec2.delete_launch_template, LaunchTemplateName=name))


def delete_snapshot(ec2: Any, snapshot_id: str) -> None:
    unless_gone(partial(ec2.delete_snapshot, SnapshotId=snapshot_id))


def delete_group(autoscaling: Any, name: str) -> None:
    """Delete an Auto Scaling group and its instances, and wait until it is gone (its launch template goes next)."""

    def deleted() -> bool | None:
        if not autoscaling.describe_auto_scaling_groups(AutoScalingGroupNames=[name])["AutoScalingGroups"]:
            return True
        try:
            autoscaling.delete_auto_scaling_group(AutoScalingGroupName=name, ForceDelete=True)
        except Exception as e:  # a group still scaling refuses for a while; asked again at the next look
            if error_code(e) not in ("ScalingActivityInProgress", "ResourceInUse"):
                raise
        return None

    eventually(f"Auto Scaling group {name} deleted", deleted, timeout=900.0)


def delete_parameters(ssm: Any, prefix: str) -> None:
    """Delete every SSM parameter under `prefix` (DeleteParameters takes ten names at a time)."""
    pages = ssm.get_paginator("get_parameters_by_path").paginate(Path=prefix, Recursive=True)
    names = [p["Name"] for page in pages for p in page["Parameters"]]
    for start in range(0, len(names), 10):
        ssm.delete_parameters(Names=names[start : start + 10])


def schedule_key_deletion(kms: Any, key_id: str) -> None:
    """Schedule a KMS key's deletion after the shortest wait AWS allows (7 days; no charge while pending)."""
    if kms.describe_key(KeyId=key_id)["KeyMetadata"]["KeyState"] != "PendingDeletion":
        kms.schedule_key_deletion(KeyId=key_id, PendingWindowInDays=7)


def terminate_instances(ec2: Any, filters: list[dict[str, Any]]) -> None:
    alive = {"Name": "instance-state-name", "Values": ["pending", "running", "stopping", "stopped"]}
    pages = ec2.get_paginator("describe_instances").paginate(Filters=[*filters, alive])
    ids = [i["InstanceId"] for page in pages for r in page["Reservations"] for i in r["Instances"]]
    if ids:
        ec2.terminate_instances(InstanceIds=ids)


def discard_registered(aws: Any, amiforge: Amiforge, name: str) -> None:
    """Every AMI the registry holds for any version of `name`: the bake's, its copies, adopted ones."""
    versions = amiforge("images", "list", "--name", name, "--all")
    run_all(
        (f"image {image_id} in {region}", partial(discard_image, aws.client("ec2", region_name=region), image_id))
        for version in versions
        for region, image_id in amiforge.images(version["ref"]).items()
    )


def sweep(aws: Any, live: LiveConfig) -> None:
    """Remove whatever still carries this session's tag, in every region of the session: groups (with their
    instances), stray instances, launch templates, images with their snapshots, snapshots, and the parameters under
    the session's prefix. KMS keys are not swept: the KMS test schedules its key's deletion itself."""
    tagged: list[dict[str, Any]] = [{"Name": f"tag:{LIVE_TAG}", "Values": [live.session]}]

    def each(found: Iterable[str], what: str, remove: Callable[[str], object]) -> None:
        run_all((f"{what} {item}", partial(remove, item)) for item in found)

    def region_steps(region: str) -> list[tuple[str, Callable[[], object]]]:
        ec2 = aws.client("ec2", region_name=region)
        autoscaling = aws.client("autoscaling", region_name=region)
        ssm = aws.client("ssm", region_name=region)

        def groups() -> None:
            found = autoscaling.describe_auto_scaling_groups(Filters=tagged)["AutoScalingGroups"]
            each((g["AutoScalingGroupName"] for g in found), "group", partial(delete_group, autoscaling))

        def templates() -> None:
            found = ec2.describe_launch_templates(Filters=tagged)["LaunchTemplates"]
            each((t["LaunchTemplateName"] for t in found), "launch template", partial(delete_template, ec2))

        def images() -> None:
            found = ec2.describe_images(Owners=["self"], Filters=tagged)["Images"]
            each((i["ImageId"] for i in found), "image", partial(discard_image, ec2))

        def snapshots() -> None:
            found = ec2.describe_snapshots(OwnerIds=["self"], Filters=tagged)["Snapshots"]
            each((s["SnapshotId"] for s in found), "snapshot", partial(delete_snapshot, ec2))

        return [
            (f"groups in {region}", groups),
            (f"instances in {region}", partial(terminate_instances, ec2, tagged)),
            (f"launch templates in {region}", templates),
            (f"images in {region}", images),
            (f"snapshots in {region}", snapshots),
            (f"parameters in {region}", partial(delete_parameters, ssm, live.parameter_prefix)),
        ]

    run_all(step for region in live.regions for step in region_steps(region))
