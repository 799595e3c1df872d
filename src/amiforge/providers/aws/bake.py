"""Bake an AMI on EC2 (like Packer's amazon-ebs) and boot-test it.

The communicator is how amiforge reaches an instance (the recipe's `communicator`): SSM Run Command (no key, no open
port; the image must run the SSM agent), or SSH with a throw-away key pair — generated here, imported for the run
(tagged at creation) and deleted by the run's cleanup — and the host keys cloud-init prints on the console, pinned.
Either gives a `Machine`; tests inject fakes through `machine_factory` (and, for the SSH wiring itself, `ssh_connect`
and `console_reader`).

bake: launch a builder from the source image (tagged `amiforge:managed`/`amiforge:run` at creation, IMDSv2 required,
the recipe's root volume mapped on the image's root device) → every recipe step through the `Machine`, as the same
shell scripts the local provider runs in its chroot (the files a step needs are staged under /run/amiforge with
`put_file`) → install the readiness unit → read the package inventory (dpkg status) for the SBOM → GENERALISE, with
what the communicator left appended (`Machine.leftovers()`) → stop → CreateImage, tags on the image and its snapshots
→ wait for `available` with an adaptive poll (doubling delays capped at 30 s, an overall deadline of 2 h by default:
image creation time grows with the volume, so there is no fixed 10-minute limit) → ImdsSupport v2.0 on the image.

The builder's termination is registered on `ctx.cleanup` the moment its id exists, so it goes in every case; an image
that was created but never finished is deregistered (and its snapshots deleted) the same way, as is the key pair.

boot test: launch a test instance from the image, read the serial console until the `AMIFORGE-READY <uptime>` line
(time-to-ready is that uptime), run the unit/command/port checks on the instance through the `Machine`, terminate it.
The console is read as EC2 gives it — the last 64 KB, and on Xen instance types only what EC2 posted around the last
state change — so everything read is kept (`ConsoleLog`), and when the log may have lost text, or the console is not
the live one, the readiness unit's own record (`READY_FILE`) is read through the Machine.
"""

from __future__ import annotations

import contextlib
import hashlib
import re
import shlex
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, Literal, Protocol

from amiforge.awsapi.clients import AwsSession, call
from amiforge.errors import AmiforgeError, ConfigError, InfraError, NotFound
from amiforge.model import BootReport, CheckResult, Leftover, Package, RemovedFile
from amiforge.providers.aws.console import (
    CONSOLE_WINDOW,
    ConsoleFactory,
    ConsoleLog,
    ready_uptime,
)
from amiforge.providers.aws.images import (
    MANAGED_TAG,
    SourceImage,
    check_architecture,
    describe_image,
    instance_architectures,
)
from amiforge.providers.aws.machine import STAGE, ConsoleReader, Machine, MachineFactory, SsmMachine
from amiforge.providers.aws.ssh import SshMachine, host_keys_from_console, new_key_pair
from amiforge.providers.guest import (
    COMMAND_TIMEOUT,
    READY_FILE,
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
from amiforge.recipe.provider_specs import RootVolume
from amiforge.scanners.sbom import parse_dpkg_status
from amiforge.waiting import Wait, poll

__all__ = [
    "CONSOLE_WINDOW",
    "RUN_TAG",
    "Access",
    "AmiBuild",
    "ConsoleFactory",
    "ConsoleLog",
    "Placement",
    "SshConnect",
    "bake_on_ec2",
    "boot_test_on_ec2",
]

RUN_TAG = "amiforge:run"
DPKG_STATUS = "/var/lib/dpkg/status"
_READY_FILES = (
    ("ready", "/usr/local/lib/amiforge/ready", 0o755),
    ("amiforge-ready.service", "/etc/systemd/system/amiforge-ready.service", 0o644),
)
# How long to wait for the host keys cloud-init prints on the console, once the instance runs.
HOST_KEYS_DEADLINE = 600.0


@dataclass(frozen=True)
class Placement:
    """Where builder and test instances run: the recipe's subnet_id, security_group_ids and instance_profile."""

    subnet_id: str | None = None
    security_group_ids: tuple[str, ...] = ()
    instance_profile: str | None = None  # a name, or an instance-profile ARN


@dataclass(frozen=True)
class Access:
    """How amiforge reaches its instances: the recipe's communicator, ssh_username and ssh_interface."""

    communicator: Literal["ssm", "ssh"] = "ssm"
    ssh_username: str = "admin"
    ssh_interface: Literal["public_ip", "private_ip"] = "public_ip"

    @property
    def ssh(self) -> bool:
        return self.communicator == "ssh"


@dataclass(frozen=True)
class AmiBuild:
    image_id: str
    snapshot_ids: tuple[str, ...]
    region: str
    builder_instance_id: str
    packages: tuple[Package, ...] = field(default=())
    generalised: tuple[RemovedFile, ...] = field(default=())


class SshConnect(Protocol):
    """How an SSH Machine is made (ssh.SshMachine); tests inject fakes to see what it is given."""

    def __call__(
        self,
        host: str,
        *,
        username: str,
        private_key: str,
        host_keys: Sequence[str],
        console: Callable[[], str],
    ) -> Machine: ...


def _client_token(run_id: str, role: str) -> str:
    token = f"{run_id}-{role}"
    # EC2 client tokens are at most 64 ASCII characters; a long run id still gives a stable token.
    return token if len(token) <= 64 else hashlib.sha256(token.encode()).hexdigest()[:64]


def _tags(tags: Mapping[str, str]) -> list[dict[str, str]]:
    return [{"Key": k, "Value": v} for k, v in tags.items()]


# --- reaching an instance -------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _KeyPair:
    name: str
    private_key: str


def _throwaway_key(session: AwsSession, region: str, ctx: RunContext, role: str) -> _KeyPair:
    """A key pair made here for one instance: imported (tagged at creation), deleted by the run's cleanup."""
    name = f"amiforge-{ctx.run_id}-{role}"[:255]
    private_key, public_key = new_key_pair(name)
    ec2 = session.client("ec2", region)
    # Registered before the import: an import whose answer was lost may still have made the key pair, and deleting
    # one that does not exist succeeds.
    ctx.cleanup.add(
        Leftover(
            "EC2 key pair (throw-away)",
            f"{name} in {region}",
            f"aws ec2 delete-key-pair --region {region} --key-name {name}",
        ),
        lambda: call(ec2, "DeleteKeyPair", name, KeyName=name),
    )
    tags = _tags({MANAGED_TAG: "true", RUN_TAG: ctx.run_id, "Name": name})
    call(
        ec2,
        "ImportKeyPair",
        name,
        KeyName=name,
        PublicKeyMaterial=public_key.encode(),
        TagSpecifications=[{"ResourceType": "key-pair", "Tags": tags}],
    )
    ctx.log(f"imported throw-away key pair {name}")
    return _KeyPair(name, private_key)


class _Failed(Exception):
    """An error while waiting for something, carried past the wait so it is not taken for the wait's end."""

    def __init__(self, error: AmiforgeError) -> None:
        super().__init__(str(error))
        self.error = error


class _Reach:
    """One instance as a Machine, made once: through `factory` when one is given (tests), else through the
    communicator `access` names — SSM, or SSH at `host` with the host keys the instance's console shows."""

    def __init__(
        self,
        session: AwsSession,
        region: str,
        instance_id: str,
        ctx: RunContext,
        *,
        access: Access,
        key: _KeyPair | None,
        host: str | None,
        factory: MachineFactory | None,
        console: ConsoleLog,
        ssh_connect: SshConnect,
        wait: Wait,
    ) -> None:
        self.session, self.region, self.instance_id, self.ctx = session, region, instance_id, ctx
        self.access, self.key, self.host, self.factory = access, key, host, factory
        self.console, self.ssh_connect, self.wait = console, ssh_connect, wait
        self._machine: Machine | None = None

    def now(self) -> Machine | None:
        """The machine if it can be made without waiting (over SSH: once the console read so far shows the host
        keys — kept by the ConsoleLog even after they scrolled out of EC2's window)."""
        if self._machine is None:
            if self.factory is not None:
                self._machine = self.factory(self.session, self.region, self.instance_id)
            elif not self.access.ssh:
                self._machine = SsmMachine(self.session, self.region, self.instance_id)
            else:
                keys = host_keys_from_console(self.console.text)
                if keys:
                    self._machine = self._ssh(keys)
        return self._machine

    def machine(self) -> Machine:
        """The machine, reading the console (bounded) until it shows what the connection needs."""
        if (machine := self.now()) is not None:
            return machine

        def probe() -> Machine | None:
            try:
                self.console.read()
                return self.now()
            except NotFound:
                raise  # not visible yet: poll asks again
            except AmiforgeError as e:
                raise _Failed(e) from e  # not the wait's end, which alone gets the fix below

        what = f"SSH host keys on the console of {self.instance_id}"
        try:
            return poll(what, probe, self.wait.until(min(self.wait.deadline, HOST_KEYS_DEADLINE)))
        except _Failed as failed:
            raise failed.error from failed.error.__cause__
        except InfraError as e:
            raise InfraError(
                e.message,
                retryable=True,
                fix="use an image whose cloud-init prints the SSH host keys on the console (its default; Debian's "
                "images do), on a Nitro instance type (t3, m5, …): EC2 shows a Xen type's console only around state "
                "changes",
            ) from e

    def _ssh(self, host_keys: list[str]) -> Machine:
        # An SSH reach is made by _start with the key its instance was launched with and the address to use.
        assert self.key is not None and self.host is not None
        machine = self.ssh_connect(
            self.host,
            username=self.access.ssh_username,
            private_key=self.key.private_key,
            host_keys=host_keys,
            console=self.console.read,
        )
        close = getattr(machine, "close", None)
        if callable(close):
            where = f"{self.access.ssh_username}@{self.host}"
            self.ctx.cleanup.add(Leftover("SSH connection", where, "nothing: it ends with amiforge"), close)
        self.ctx.log(f"SSH to {self.access.ssh_username}@{self.host}, {len(host_keys)} host key(s) pinned")
        return machine


def _address(session: AwsSession, region: str, instance_id: str, interface: str) -> str:
    instance = _describe_instance(session, region, instance_id)
    if interface == "public_ip":
        address = instance.get("PublicIpAddress")
        if not address:
            raise ConfigError(
                f"instance {instance_id} got no public IP address though one was asked for "
                f"(subnet {instance.get('SubnetId') or 'default'})",
                fix="use a subnet that assigns public IPv4 addresses and routes to an internet gateway, or set "
                "provider.ssh_interface: private_ip when this host reaches the VPC",
            )
    else:
        address = instance.get("PrivateIpAddress")
        if not address:
            raise InfraError(f"instance {instance_id} has no private IP address yet", retryable=True)
    return str(address)


# --- launching and stopping -----------------------------------------------------------------------------------


def _root_mapping(volume: RootVolume | None, source: SourceImage) -> list[dict[str, Any]] | None:
    """RunInstances' BlockDeviceMappings for the recipe's root_volume, on the source image's root device."""
    if volume is None:
        return None
    if not source.root_device_name:
        raise ConfigError(
            f"source image {source.image_id} names no root device, so root_volume cannot be applied to it",
            fix="drop provider.root_volume, or use an EBS-backed source image",
        )
    if volume.size_gib is not None and source.root_volume_gib is not None and volume.size_gib < source.root_volume_gib:
        raise ConfigError(
            f"root_volume.size_gib is {volume.size_gib}, smaller than the root snapshot of the source image "
            f"{source.image_id} ({source.root_volume_gib} GiB)",
            fix=f"set provider.root_volume.size_gib to at least {source.root_volume_gib}, or drop it",
        )
    ebs: dict[str, Any] = {"DeleteOnTermination": True}
    if volume.size_gib is not None:
        ebs["VolumeSize"] = volume.size_gib
    if volume.type is not None:
        ebs["VolumeType"] = volume.type
    if volume.iops is not None:
        ebs["Iops"] = volume.iops
    # Only ever true: EBS cannot remove encryption, and false would not mean "unencrypted" anyway.
    if volume.encrypted or volume.kms_key is not None:
        ebs["Encrypted"] = True
    if volume.kms_key is not None:
        ebs["KmsKeyId"] = volume.kms_key
    return [{"DeviceName": source.root_device_name, "Ebs": ebs}]


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
    key_name: str | None = None,
    public_ip: bool = False,
    block_devices: list[dict[str, Any]] | None = None,
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
    if public_ip:
        # A public address is a property of the network interface: subnet and groups move there with it.
        interface: dict[str, Any] = {"DeviceIndex": 0, "AssociatePublicIpAddress": True, "DeleteOnTermination": True}
        if placement.subnet_id:
            interface["SubnetId"] = placement.subnet_id
        if placement.security_group_ids:
            interface["Groups"] = list(placement.security_group_ids)
        request["NetworkInterfaces"] = [interface]
    else:
        if placement.subnet_id:
            request["SubnetId"] = placement.subnet_id
        if placement.security_group_ids:
            request["SecurityGroupIds"] = list(placement.security_group_ids)
    if placement.instance_profile:
        key = "Arn" if placement.instance_profile.startswith("arn:") else "Name"
        request["IamInstanceProfile"] = {key: placement.instance_profile}
    if key_name is not None:
        request["KeyName"] = key_name
    if block_devices:
        request["BlockDeviceMappings"] = block_devices
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


def _describe_instance(session: AwsSession, region: str, instance_id: str) -> Mapping[str, Any]:
    ec2 = session.client("ec2", region)
    reservations = call(ec2, "DescribeInstances", instance_id, InstanceIds=[instance_id]).get("Reservations", [])
    instances = [i for r in reservations for i in r.get("Instances", [])]
    if not instances:
        raise NotFound(f"instance {instance_id} not visible yet")
    return dict(instances[0])


def _wait_state(session: AwsSession, region: str, instance_id: str, want: str, wait: Wait) -> None:
    passing = {"running": {"pending"}, "stopped": {"running", "stopping", "pending"}}[want]

    def probe() -> bool | None:
        instance = _describe_instance(session, region, instance_id)
        state = str(instance["State"]["Name"])
        if state == want:
            return True
        if state not in passing:
            reason = str(instance.get("StateReason", {}).get("Message") or "no reason")
            raise InfraError(f"instance {instance_id} is {state} while waiting for {want}: {reason}")
        return None

    poll(f"instance {instance_id} becoming {want}", probe, wait)


def _start(
    session: AwsSession,
    region: str,
    ctx: RunContext,
    *,
    image_id: str,
    instance_type: str,
    role: str,
    name: str,
    placement: Placement,
    access: Access,
    wait: Wait,
    factory: MachineFactory | None,
    console_reader: ConsoleFactory,
    ssh_connect: SshConnect,
    block_devices: list[dict[str, Any]] | None = None,
) -> tuple[str, _Reach]:
    """Launch an instance the communicator can reach (over SSH: a throw-away key, and a public IP if asked for), wait
    until it runs; its id and how to get its Machine."""
    key = _throwaway_key(session, region, ctx, role) if access.ssh else None
    instance_id = _launch(
        session,
        region,
        ctx,
        image_id=image_id,
        instance_type=instance_type,
        role=role,
        name=name,
        placement=placement,
        key_name=key.name if key else None,
        public_ip=access.ssh and access.ssh_interface == "public_ip",
        block_devices=block_devices,
    )
    _wait_state(session, region, instance_id, "running", wait)
    # Over SSH, the address first: a missing public IP is known now, not after the wait for host keys.
    host = _address(session, region, instance_id, access.ssh_interface) if access.ssh else None
    reach = _Reach(
        session,
        region,
        instance_id,
        ctx,
        access=access,
        key=key,
        host=host,
        factory=factory,
        console=ConsoleLog(console_reader(session, region, instance_id)),
        ssh_connect=ssh_connect,
        wait=wait,
    )
    return instance_id, reach


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


def _install_ready_unit(machine: Machine, ctx: RunContext) -> None:
    for name, dest, mode in _READY_FILES:
        machine.put_file(dest, guest_file(name), mode)
    _run_script(machine, "set -e\nsystemctl enable amiforge-ready.service\n", "readiness unit", ctx, 120)


def _architectures_fit(session: AwsSession, region: str, instance_type: str, image_id: str, architecture: Any) -> None:
    """ConfigError before anything is launched when `instance_type` cannot run the image."""
    architectures = instance_architectures(session, region, instance_type)
    check_architecture(image_id, architecture, architectures, instance_type)


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
    block_devices = _root_mapping(provider.root_volume, source)
    _architectures_fit(session, region, provider.instance_type, source.image_id, source.architecture)

    ctx.progress(PhaseUpdate("builder", "start", source.image_id))
    t0 = wait.clock()
    instance_id, reach = _start(
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


def _recorded_readiness(reach: _Reach, ctx: RunContext) -> float | None:
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
    _architectures_fit(session, region, instance_type, image_id, image.get("Architecture"))
    started_at = datetime.now(UTC)
    t0 = wait.clock()
    instance_id, reach = _start(
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
