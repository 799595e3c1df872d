"""Bake an AMI on EC2 (like Packer's amazon-ebs, without SSH keys) and boot-test it.

bake: launch a builder from the source image (tagged `amiforge:managed`/`amiforge:run` at creation, IMDSv2 required)
→ every recipe step through the `Machine` (SSM Run Command), as the same shell scripts the local provider runs in its
chroot (`layers._step_script`; the files a step needs are staged under /run/amiforge with `put_file`) → install the
readiness unit → read the package inventory (dpkg status) for the SBOM → GENERALISE → stop → CreateImage, tags on the
image and its snapshots → wait for `available` with an adaptive poll (doubling delays capped at 30 s, an overall
deadline of 2 h by default: image creation time grows with the volume, so there is no fixed 10-minute limit).

The builder's termination is registered on `ctx.cleanup` the moment its id exists, so it goes in every case; an image
that was created but never became available is deregistered (and its snapshots deleted) the same way.

boot test: launch a test instance from the image, read the serial console until the `AMIFORGE-READY <uptime>` line
(time-to-ready is that uptime), run the unit/command/port checks on the instance through the `Machine`, terminate it.
"""

from __future__ import annotations

import contextlib
import hashlib
import re
import shlex
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, TypeVar

from amiforge.awsapi.clients import AwsSession, call
from amiforge.errors import ConfigError, InfraError, NotFound
from amiforge.model import BootReport, CheckResult, Leftover, Package, RemovedFile
from amiforge.providers.aws.images import MANAGED_TAG, SourceImage, describe_image
from amiforge.providers.aws.machine import STAGE, Machine, MachineFactory, SsmMachine
from amiforge.providers.guest import (
    COMMAND_TIMEOUT,
    READY_RE,
    STEP_TIMEOUT,
    GuestCheck,
    guest_checks,
    guest_file,
    guest_results,
    guest_script,
    parse_generalised,
    step_script,
)
from amiforge.providers.interface import PhaseUpdate, RunContext
from amiforge.providers.local.tools import remove_tree, temporary_dir
from amiforge.recipe import AwsProvider, Checks, FileStep, Recipe, Step
from amiforge.scanners.sbom import parse_dpkg_status
from amiforge.waiting import Wait, poll

__all__ = ["RUN_TAG", "AmiBuild", "Placement", "bake_on_ec2", "boot_test_on_ec2"]

T = TypeVar("T")
RUN_TAG = "amiforge:run"
DPKG_STATUS = "/var/lib/dpkg/status"
_READY_FILES = (
    ("ready", "/usr/local/lib/amiforge/ready", 0o755),
    ("amiforge-ready.service", "/etc/systemd/system/amiforge-ready.service", 0o644),
)


@dataclass(frozen=True)
class Placement:
    """Where builder and test instances run. Not in the recipe's aws block yet: see the module's callers."""

    subnet_id: str | None = None
    security_group_ids: tuple[str, ...] = ()
    instance_profile: str | None = None  # a name, or an instance-profile ARN


@dataclass(frozen=True)
class AmiBuild:
    image_id: str
    snapshot_ids: tuple[str, ...]
    region: str
    builder_instance_id: str
    packages: tuple[Package, ...] = field(default=())
    generalised: tuple[RemovedFile, ...] = field(default=())


def _client_token(run_id: str, role: str) -> str:
    token = f"{run_id}-{role}"
    # EC2 client tokens are at most 64 ASCII characters; a long run id still gives a stable token.
    return token if len(token) <= 64 else hashlib.sha256(token.encode()).hexdigest()[:64]


def _tags(tags: Mapping[str, str]) -> list[dict[str, str]]:
    return [{"Key": k, "Value": v} for k, v in tags.items()]


def _launch(
    session: AwsSession,
    region: str,
    ctx: RunContext,
    *,
    image_id: str,
    instance_type: str,
    role: str,
    name: str,
    placement: Placement,
) -> str:
    """RunInstances (tagged at creation, IMDSv2 required); termination is on ctx.cleanup before this returns."""
    ec2 = session.client("ec2", region)
    tags = _tags({MANAGED_TAG: "true", RUN_TAG: ctx.run_id, "Name": name})
    request: dict[str, Any] = {
        "ImageId": image_id,
        "InstanceType": instance_type,
        "MinCount": 1,
        "MaxCount": 1,
        "ClientToken": _client_token(ctx.run_id, role),
        "MetadataOptions": {"HttpTokens": "required", "HttpEndpoint": "enabled", "HttpPutResponseHopLimit": 1},
        "InstanceInitiatedShutdownBehavior": "terminate",
        "TagSpecifications": [
            {"ResourceType": "instance", "Tags": tags},
            {"ResourceType": "volume", "Tags": tags},
        ],
    }
    if placement.subnet_id:
        request["SubnetId"] = placement.subnet_id
    if placement.security_group_ids:
        request["SecurityGroupIds"] = list(placement.security_group_ids)
    if placement.instance_profile:
        key = "Arn" if placement.instance_profile.startswith("arn:") else "Name"
        request["IamInstanceProfile"] = {key: placement.instance_profile}
    answer = call(ec2, "RunInstances", image_id, **request)
    instance_id = str(answer["Instances"][0]["InstanceId"])
    ctx.cleanup.add(
        Leftover(
            f"EC2 instance ({role})",
            f"{instance_id} in {region}",
            f"amiforge gc --region {region} --apply "
            f"(or: aws ec2 terminate-instances --region {region} --instance-ids {instance_id})",
        ),
        lambda: _terminate(session, region, instance_id, ctx),
    )
    ctx.log(f"launched {role} {instance_id} from {image_id} ({instance_type})")
    return instance_id


def _terminate(session: AwsSession, region: str, instance_id: str, ctx: RunContext) -> None:
    ctx.log(f"terminating {instance_id}")
    ec2 = session.client("ec2", region)
    # Raises on failure: the run's Cleanups keep it as a leftover without masking the first error.
    call(ec2, "TerminateInstances", instance_id, InstanceIds=[instance_id])


def _instance_state(session: AwsSession, region: str, instance_id: str) -> tuple[str, str]:
    ec2 = session.client("ec2", region)
    reservations = call(ec2, "DescribeInstances", instance_id, InstanceIds=[instance_id]).get("Reservations", [])
    instances = [i for r in reservations for i in r.get("Instances", [])]
    if not instances:
        raise NotFound(f"instance {instance_id} not visible yet")
    inst = instances[0]
    return str(inst["State"]["Name"]), str(inst.get("StateReason", {}).get("Message") or "")


def _wait_state(session: AwsSession, region: str, instance_id: str, want: str, wait: Wait) -> None:
    passing = {"running": {"pending"}, "stopped": {"running", "stopping", "pending"}}[want]

    def probe() -> bool | None:
        state, reason = _instance_state(session, region, instance_id)
        if state == want:
            return True
        if state not in passing:
            raise InfraError(f"instance {instance_id} is {state} while waiting for {want}: {reason or 'no reason'}")
        return None

    poll(f"instance {instance_id} becoming {want}", probe, wait)


def _run_script(machine: Machine, script: str, what: str, ctx: RunContext, timeout: float) -> list[str]:
    """Run `script` on the machine; returns its output lines (stdout), which the build log also gets."""
    machine.put_file(f"{STAGE}/step.sh", script.encode(), 0o700)
    result = machine.run(["/bin/sh", f"{STAGE}/step.sh"], timeout=timeout)
    for line in (result.stdout + result.stderr).splitlines():
        ctx.log(line)
    if result.exit_code != 0:
        tail = "\n".join(result.stderr.strip().splitlines()[-10:]) or "(no stderr)"
        raise InfraError(
            f"{what} failed with exit {result.exit_code}: {tail}",
            fix="fix the step in the recipe; the build log has its full output",
        )
    return result.stdout.splitlines()


def _run_step(
    machine: Machine, step: Step | None, recipe: Recipe, what: str, ctx: RunContext, timeout: float
) -> list[str]:
    """The local provider's script for `step`, with the files it stages uploaded to the same paths (/run/amiforge)."""
    stage = temporary_dir(ctx.cleanup, "amiforge-step-")  # what it stages may be a credential: never left unsaid
    try:
        # Only file steps read the recipe's folder; a recipe built in memory has none.
        folder = recipe.folder if isinstance(step, FileStep) else stage
        script = step_script(step, stage, folder, recipe.name)
        for staged in sorted(stage.iterdir()):
            machine.put_file(f"{STAGE}/{staged.name}", staged.read_bytes(), 0o600)
    finally:
        with contextlib.suppress(OSError):
            remove_tree(stage)  # now; should it fail, the run's cleanup tries again and reports it
    return _run_script(machine, "export DEBIAN_FRONTEND=noninteractive\n" + script, what, ctx, timeout)


def _install_ready_unit(machine: Machine, ctx: RunContext) -> None:
    for name, dest, mode in _READY_FILES:
        machine.put_file(dest, guest_file(name), mode)
    _run_script(machine, "set -e\nsystemctl enable amiforge-ready.service\n", "readiness unit", ctx, 120)


def bake_on_ec2(
    recipe: Recipe,
    source: SourceImage,
    session: AwsSession,
    ctx: RunContext,
    *,
    machine_factory: MachineFactory = SsmMachine,
    wait: Wait = Wait(),
    placement: Placement = Placement(),
    step_timeout: float = STEP_TIMEOUT,
    tag_snapshots_at_creation: bool = True,
) -> AmiBuild:
    """Bake `recipe` on a builder instance launched from `source`; the image is `available` when this returns.

    `tag_snapshots_at_creation=False` tags the snapshots with CreateTags once the image is available instead of in
    CreateImage's TagSpecifications (moto 5.2.5 lacks ResourceType=snapshot there); on AWS keep the default."""
    provider = recipe.provider
    if not isinstance(provider, AwsProvider):
        raise ConfigError(f"recipe {recipe.name!r} has provider {provider.type!r}, not aws", fix="use type: aws")
    region = provider.region
    ec2 = session.client("ec2", region)

    ctx.progress(PhaseUpdate("builder", "start", source.image_id))
    t0 = wait.clock()
    instance_id = _launch(
        session,
        region,
        ctx,
        image_id=source.image_id,
        instance_type=provider.instance_type,
        role="builder",
        name=f"amiforge-{recipe.name}-builder",
        placement=placement,
    )
    _wait_state(session, region, instance_id, "running", wait)
    ctx.phase_done("builder", wait.clock() - t0, instance_id)
    machine = machine_factory(session, region, instance_id)

    for i, step in enumerate(recipe.steps, start=1):
        what = f"step {i}: {step.describe()}"
        ctx.progress(PhaseUpdate(what, "start"))
        t = wait.clock()
        ctx.log(f"--- {what}")
        _run_step(machine, step, recipe, what, ctx, step_timeout)
        ctx.phase_done(what, wait.clock() - t)

    _install_ready_unit(machine, ctx)
    packages = tuple(parse_dpkg_status(machine.read_file(DPKG_STATUS).decode("utf-8", "replace"), file=DPKG_STATUS))
    ctx.log(f"--- generalise ({len(packages)} packages installed)")
    generalised = parse_generalised(_run_step(machine, None, recipe, "generalise", ctx, step_timeout))

    t = wait.clock()
    call(ec2, "StopInstances", instance_id, InstanceIds=[instance_id])
    _wait_state(session, region, instance_id, "stopped", wait)
    ctx.phase_done("stop", wait.clock() - t)

    image_tags = _tags({**recipe.tags, MANAGED_TAG: "true", RUN_TAG: ctx.run_id, "amiforge:recipe": recipe.name})
    specs = [{"ResourceType": "image", "Tags": image_tags}]
    if tag_snapshots_at_creation:
        specs.append({"ResourceType": "snapshot", "Tags": image_tags})
    name = f"{recipe.name}-{ctx.run_id}"
    t = wait.clock()
    image_id = str(
        call(
            ec2,
            "CreateImage",
            instance_id,
            InstanceId=instance_id,
            Name=name,
            Description=f"amiforge {recipe.name} run {ctx.run_id} from {source.image_id}",
            NoReboot=True,  # stopped already: a clean file system without a reboot
            TagSpecifications=specs,
        )["ImageId"]
    )
    done = [False]
    ctx.cleanup.add(
        Leftover(
            "unfinished AMI and its snapshots",
            f"{image_id} in {region}",
            f"amiforge gc --region {region} --apply (or: aws ec2 deregister-image --region {region} "
            f"--image-id {image_id}, then delete its snapshots)",
        ),
        lambda: _discard_unfinished(session, region, image_id, done, ctx),
    )
    ctx.log(f"creating image {image_id} ({name})")

    def available() -> Mapping[str, Any] | None:
        image = describe_image(session, region, image_id)
        state = image.get("State")
        if state == "available":
            return image
        if state in ("failed", "error", "invalid", "deregistered"):
            reason = image.get("StateReason", {}).get("Message") or "no reason given"
            raise InfraError(f"image {image_id} is {state}: {reason}", retryable=True)
        return None

    image = poll(f"image {image_id} becoming available", available, wait)
    snapshots = tuple(
        str(m["Ebs"]["SnapshotId"]) for m in image.get("BlockDeviceMappings", []) if "SnapshotId" in m.get("Ebs", {})
    )
    if snapshots and not tag_snapshots_at_creation:
        call(ec2, "CreateTags", ",".join(snapshots), Resources=list(snapshots), Tags=image_tags)
    done[0] = True
    ctx.phase_done("image", wait.clock() - t, image_id)
    return AmiBuild(image_id, snapshots, region, instance_id, packages, generalised)


def _discard_unfinished(session: AwsSession, region: str, image_id: str, done: list[bool], ctx: RunContext) -> None:
    """Deregister an image whose bake did not finish, then delete its snapshots (never the other way round)."""
    if done[0]:
        return
    ctx.log(f"discarding unfinished image {image_id}")
    ec2 = session.client("ec2", region)
    try:
        image = describe_image(session, region, image_id)
    except NotFound:
        return
    snapshots = [
        m["Ebs"]["SnapshotId"] for m in image.get("BlockDeviceMappings", []) if "SnapshotId" in m.get("Ebs", {})
    ]
    call(ec2, "DeregisterImage", image_id, ImageId=image_id)
    for snapshot in snapshots:
        call(ec2, "DeleteSnapshot", snapshot, SnapshotId=snapshot)


# --- boot test ----------------------------------------------------------------------------------------------


def _guest_checks(checks: Checks) -> list[GuestCheck]:
    """The local provider's in-guest checks, plus the port checks run on the instance itself (no port reaches it
    from here, unlike QEMU's hostfwd)."""
    q = shlex.quote
    out = guest_checks(checks)
    for h in checks.http:
        body = f" && grep -qF -- {q(h.expect_body)} /tmp/amiforge-body" if h.expect_body is not None else ""
        shell = (
            f"code=$(curl -s -m 10 -o /tmp/amiforge-body -w '%{{http_code}}' {q(f'http://127.0.0.1:{h.port}{h.path}')});"
            f' echo "status $code"; [ "$code" = {h.expect_status} ]{body}'
        )
        out.append(GuestCheck(f"http :{h.port}{h.path}", "http", shell))
    for t in checks.tcp:
        out.append(GuestCheck(f"tcp :{t.port}", "tcp", f"timeout 5 bash -c '</dev/tcp/127.0.0.1/{t.port}'"))
    return out


def boot_test_on_ec2(
    image_id: str,
    checks: Checks,
    session: AwsSession,
    ctx: RunContext,
    *,
    region: str | None = None,
    instance_type: str = "t3.micro",
    machine_factory: MachineFactory = SsmMachine,
    wait: Wait = Wait(first_delay=5.0, max_delay=15.0, deadline=900.0),
    placement: Placement = Placement(),
) -> BootReport:
    """Boot a throw-away instance of `image_id`, wait for AMIFORGE-READY on its console, run the checks on it.

    Returns the report whatever the outcome (the gate decides); the instance is terminated through ctx.cleanup.
    `wait.deadline` bounds how long the console is read: EC2 publishes console output with a delay, so it is
    longer than `checks.ready_within`, which the reported uptime is judged against."""
    region = region or session.region
    started_at = datetime.now(UTC)
    t0 = wait.clock()
    instance_id = _launch(
        session,
        region,
        ctx,
        image_id=image_id,
        instance_type=instance_type,
        role="boottest",
        name=f"amiforge-boottest-{ctx.run_id}",
        placement=placement,
    )
    ctx.progress(PhaseUpdate("boot", "start", instance_id))
    _wait_state(session, region, instance_id, "running", wait)
    machine = machine_factory(session, region, instance_id)
    console = [""]

    def ready() -> float | None:
        console[0] = machine.console()
        found = READY_RE.search(console[0])
        return float(found.group(1)) if found else None

    results: list[CheckResult] = []
    time_to_ready: float | None = None
    try:
        time_to_ready = poll(f"AMIFORGE-READY on the console of {instance_id}", ready, wait)
    except InfraError as e:
        results.append(CheckResult("ready", "ready", False, str(e)))
        ctx.progress(PhaseUpdate("boot", "failed", str(e)))
    if time_to_ready is not None:
        ok = time_to_ready <= checks.ready_within
        limit = f"{checks.ready_within:.0f}s"
        detail = f"ready after {time_to_ready:.1f}s" + ("" if ok else f", more than {limit}")
        results.append(CheckResult("ready", "ready", ok, detail))
        ctx.phase_done("boot", time_to_ready, "ready")
        for check in _guest_checks(checks):
            answer = machine.run(["/bin/sh", "-c", guest_script([check])], timeout=COMMAND_TIMEOUT + 30)
            results += guest_results([check], answer.stdout.splitlines())
    return BootReport(
        time_to_ready=time_to_ready,
        checks=tuple(results),
        console=_printable(console[0]),
        accel=f"ec2:{instance_type}",
        started_at=started_at,
        duration=round(wait.clock() - t0, 3),
    )


def _printable(text: str) -> str:
    return re.sub(r"[\x00-\x08\x0b\x0c\x0e-\x1f]", "", text)
