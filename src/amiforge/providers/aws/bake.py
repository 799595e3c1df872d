"""Bake an AMI on EC2 (like Packer's amazon-ebs) and boot-test it.

bake: start a builder from the source image (`instances.start`: tagged, IMDSv2 required, the recipe's root volume,
reached through the recipe's communicator) → every recipe step through the `Machine`, as the same shell scripts the
local provider runs in its chroot (the files a step needs are staged under /run/amiforge with `put_file`) → install
the readiness unit → read the package inventory (dpkg status) for the SBOM → GENERALISE, with what the communicator
left appended (`Machine.leftovers()`) → stop → CreateImage, tags on the image and its snapshots → wait for
`available` with an adaptive poll (doubling delays capped at 30 s, an overall deadline of 2 h by default: image
creation time grows with the volume, so there is no fixed 10-minute limit) → ImdsSupport v2.0 on the image.

The builder's termination is on `ctx.cleanup` from the moment its id exists, so it goes in every case; an image that
was created but never finished is deregistered (and its snapshots deleted) the same way.

boot test: start a test instance from the image, read the serial console until the `AMIFORGE-READY <uptime>` line
(time-to-ready is that uptime), run the unit/command/port checks on the instance through the `Machine`, terminate it.
The console is read as EC2 gives it — the last 64 KB, and on Xen instance types only what EC2 posted around the last
state change — so everything read is kept (`ConsoleLog`), and when the log may have lost text, or the console is not
the live one, the readiness unit's own record (`READY_FILE`) is read through the Machine.
"""

from __future__ import annotations

import contextlib
import re
import shlex
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from amiforge.awsapi.clients import AwsSession, call
from amiforge.errors import ConfigError, InfraError, NotFound
from amiforge.model import BootReport, CheckResult, Leftover, Package, RemovedFile
from amiforge.providers.aws.console import CONSOLE_WINDOW, ConsoleFactory, ConsoleReader, ready_uptime
from amiforge.providers.aws.images import MANAGED_TAG, SourceImage, describe_image
from amiforge.providers.aws.instances import (
    RUN_TAG,
    Access,
    Placement,
    Reach,
    SshConnect,
    architectures_fit,
    root_mapping,
    start,
    tag_list,
    wait_state,
)
from amiforge.providers.aws.machine import STAGE, Machine, MachineFactory
from amiforge.providers.aws.ssh import SshMachine
from amiforge.providers.guest import (
    COMMAND_TIMEOUT,
    READY_FILE,
    RELEASE_FILE,
    STEP_TIMEOUT,
    GuestCheck,
    guest_checks,
    guest_file,
    guest_results,
    guest_script,
    parse_generalised,
    release_file,
    step_script,
)
from amiforge.providers.interface import PhaseUpdate, RunContext
from amiforge.providers.local.tools import remove_tree, temporary_dir
from amiforge.recipe import AwsProvider, Checks, FileStep, Recipe, Step
from amiforge.scanners.sbom import parse_dpkg_status
from amiforge.waiting import Wait, poll

__all__ = ["AmiBuild", "bake_on_ec2", "boot_test_on_ec2"]

DPKG_STATUS = "/var/lib/dpkg/status"
_READY_FILES = (
    ("ready", "/usr/local/lib/amiforge/ready", 0o755),
    ("amiforge-ready.service", "/etc/systemd/system/amiforge-ready.service", 0o644),
    ("amiforge-ready-repeat.service", "/etc/systemd/system/amiforge-ready-repeat.service", 0o644),
    ("amiforge-heartbeat.service", "/etc/systemd/system/amiforge-heartbeat.service", 0o644),
)


@dataclass(frozen=True)
class AmiBuild:
    image_id: str
    snapshot_ids: tuple[str, ...]
    region: str
    builder_instance_id: str
    packages: tuple[Package, ...] = field(default=())
    generalised: tuple[RemovedFile, ...] = field(default=())


# --- steps ----------------------------------------------------------------------------------------------------


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
    machine: Machine,
    step: Step | None,
    recipe: Recipe,
    what: str,
    ctx: RunContext,
    timeout: float,
    *,
    leftovers: str = "",
) -> list[str]:
    """The local provider's script for `step`, with the files it stages uploaded to the same paths (/run/amiforge)."""
    stage = temporary_dir(ctx.cleanup, "amiforge-step-")  # what it stages may be a credential: never left unsaid
    try:
        # Only file steps read the recipe's folder; a recipe built in memory has none.
        folder = recipe.folder if isinstance(step, FileStep) else stage
        script = step_script(step, stage, folder, recipe.name, leftovers=leftovers)
        for staged in sorted(stage.iterdir()):
            machine.put_file(f"{STAGE}/{staged.name}", staged.read_bytes(), 0o600)
    finally:
        with contextlib.suppress(OSError):
            remove_tree(stage)  # now; should it fail, the run's cleanup tries again and reports it
    return _run_script(machine, "export DEBIAN_FRONTEND=noninteractive\n" + script, what, ctx, timeout)


# EC2 only: readiness and heartbeats also go to CloudWatch (guest_files/cloudwatch), which needs curl with
# --aws-sigv4 (7.75 or later: Debian 12 has 7.88, Debian 11's 7.74 has not) and a CA bundle (only a Recommends of
# libcurl: a minimal image may lack it). Installed with apt where there is apt; an image that still lacks them is
# baked all the same (the reporter is telemetry, not the image's function) and the bake log says what it misses.
_REPORTER = ("cloudwatch", "/usr/local/lib/amiforge/cloudwatch", 0o755)
_REPORTER_PACKAGES = """set -e
systemctl enable amiforge-ready.service
able() {
    command -v curl >/dev/null && curl --help all 2>/dev/null | grep -q -- --aws-sigv4 &&
        { [ -s /etc/ssl/certs/ca-certificates.crt ] || [ -s /etc/pki/tls/certs/ca-bundle.crt ]; }
}
if ! able && command -v apt-get >/dev/null; then
    export DEBIAN_FRONTEND=noninteractive
    { apt-get update -q && apt-get install -y -q --no-install-recommends curl ca-certificates; } || true
fi
able || echo "amiforge: this image cannot report to CloudWatch: it needs curl 7.75 or later (--aws-sigv4) and a CA" \
    "bundle; the coverage (M4) of its instances will show as not measured"
"""


def _install_ready_unit(machine: Machine, ctx: RunContext) -> None:
    """The readiness and heartbeat units, the CloudWatch reporter, and what the image says it is (the release
    file, when the bake knows the version it makes)."""
    for name, dest, mode in (*_READY_FILES, _REPORTER):
        machine.put_file(dest, guest_file(name), mode)
    if ctx.release is not None:
        machine.put_file(RELEASE_FILE, release_file(ctx.release), 0o644)
    _run_script(machine, _REPORTER_PACKAGES, "readiness unit and its reporter", ctx, 600)


def bake_on_ec2(
    recipe: Recipe,
    source: SourceImage,
    session: AwsSession,
    ctx: RunContext,
    *,
    machine_factory: MachineFactory | None = None,
    console_reader: ConsoleFactory = ConsoleReader,
    ssh_connect: SshConnect = SshMachine,
    wait: Wait = Wait(),
    placement: Placement = Placement(),
    access: Access = Access(),
    step_timeout: float = STEP_TIMEOUT,
    tag_snapshots_at_creation: bool = True,
) -> AmiBuild:
    """Bake `recipe` on a builder instance launched from `source`; the image is `available` when this returns.

    `machine_factory`: how to reach the builder (default: the communicator `access` names). `tag_snapshots_at_creation
    =False` tags the snapshots with CreateTags once the image is available instead of in CreateImage's
    TagSpecifications (moto 5.2.5 lacks ResourceType=snapshot there); on AWS keep the default."""
    provider = recipe.provider
    if not isinstance(provider, AwsProvider):
        raise ConfigError(f"recipe {recipe.name!r} has provider {provider.type!r}, not aws", fix="use type: aws")
    region = provider.region
    ec2 = session.client("ec2", region)
    block_devices = root_mapping(provider.root_volume, source)
    architectures_fit(session, region, provider.instance_type, source.image_id, source.architecture)

    ctx.progress(PhaseUpdate("builder", "start", source.image_id))
    t0 = wait.clock()
    instance_id, reach = start(
        session,
        region,
        ctx,
        image_id=source.image_id,
        instance_type=provider.instance_type,
        role="builder",
        name=f"amiforge-{recipe.name}-builder",
        placement=placement,
        access=access,
        wait=wait,
        factory=machine_factory,
        console_reader=console_reader,
        ssh_connect=ssh_connect,
        block_devices=block_devices,
    )
    machine = reach.machine()
    ctx.phase_done("builder", wait.clock() - t0, instance_id)

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
    # The last command sent to the builder: it also removes what the communicator left (its own access included).
    leftovers = machine.leftovers().script()
    generalised = parse_generalised(
        _run_step(machine, None, recipe, "generalise", ctx, step_timeout, leftovers=leftovers)
    )

    t = wait.clock()
    call(ec2, "StopInstances", instance_id, InstanceIds=[instance_id])
    wait_state(session, region, instance_id, "stopped", wait)
    ctx.phase_done("stop", wait.clock() - t)

    image_tags = tag_list({**recipe.tags, MANAGED_TAG: "true", RUN_TAG: ctx.run_id, "amiforge:recipe": recipe.name})
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
    if provider.imds_support == "v2.0":
        # CreateImage has no ImdsSupport parameter; ModifyImageAttribute sets it, once and for good (AWS: it cannot
        # be undone). Instances of the image then require IMDSv2 by default, as the builder did.
        call(ec2, "ModifyImageAttribute", image_id, ImageId=image_id, ImdsSupport={"Value": "v2.0"})
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


def _recorded_readiness(reach: Reach, ctx: RunContext) -> float | None:
    """The readiness line the unit recorded in READY_FILE, read through the Machine (None: not there yet, or the
    machine cannot be reached yet)."""
    try:
        machine = reach.now()
        if machine is None:
            return None
        answer = machine.run(["cat", READY_FILE], timeout=COMMAND_TIMEOUT)
    except InfraError as e:
        ctx.log(f"could not read {READY_FILE} on {reach.instance_id} yet: {e.message}")
        return None
    return ready_uptime(answer.stdout) if answer.exit_code == 0 else None


def boot_test_on_ec2(
    image_id: str,
    checks: Checks,
    session: AwsSession,
    ctx: RunContext,
    *,
    region: str | None = None,
    instance_type: str = "t3.micro",
    machine_factory: MachineFactory | None = None,
    console_reader: ConsoleFactory = ConsoleReader,
    ssh_connect: SshConnect = SshMachine,
    wait: Wait = Wait(first_delay=5.0, max_delay=15.0, deadline=900.0),
    placement: Placement = Placement(),
    access: Access = Access(),
) -> BootReport:
    """Boot a throw-away instance of `image_id`, wait for AMIFORGE-READY on its console, run the checks on it.

    Returns the report whatever the outcome (the gate decides); the instance is terminated through ctx.cleanup.
    `wait.deadline` bounds how long the console is read: EC2 publishes console output with a delay, so it is
    longer than `checks.ready_within`, which the reported uptime is judged against. When the console may have lost
    the line (a full 64 KB window, a gap between reads) or is not the live one (Xen instance types), the line the
    readiness unit recorded on the instance is read through the Machine as well."""
    region = region or session.region
    image = describe_image(session, region, image_id)
    architectures_fit(session, region, instance_type, image_id, image.get("Architecture"))
    started_at = datetime.now(UTC)
    t0 = wait.clock()
    instance_id, reach = start(
        session,
        region,
        ctx,
        image_id=image_id,
        instance_type=instance_type,
        role="boottest",
        name=f"amiforge-boottest-{ctx.run_id}",
        placement=placement,
        access=access,
        wait=wait,
        factory=machine_factory,
        console_reader=console_reader,
        ssh_connect=ssh_connect,
    )
    ctx.progress(PhaseUpdate("boot", "start", instance_id))
    console = reach.console

    def ready() -> float | None:
        uptime = ready_uptime(console.read())
        if uptime is None and (console.lossy or not console.latest):
            uptime = _recorded_readiness(reach, ctx)
        return uptime

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
        guest = _guest_checks(checks)
        if guest:
            machine = reach.machine()
            for check in guest:
                answer = machine.run(["/bin/sh", "-c", guest_script([check])], timeout=COMMAND_TIMEOUT + 30)
                results += guest_results([check], answer.stdout.splitlines())
    return BootReport(
        time_to_ready=time_to_ready,
        checks=tuple(results),
        console=_printable(console.text[-CONSOLE_WINDOW:]),  # the end, as much as one read gives
        accel=f"ec2:{instance_type}",
        started_at=started_at,
        duration=round(wait.clock() - t0, 3),
    )


def _printable(text: str) -> str:
    return re.sub(r"[\x00-\x08\x0b\x0c\x0e-\x1f]", "", text)
