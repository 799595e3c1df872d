"""Builder and boot-test instances on EC2: launched tagged, reached through the recipe's communicator, ended by the
run's cleanups.

`start()` launches an instance (tagged `amiforge:managed`/`amiforge:run` at creation, IMDSv2 required, the recipe's
root volume on the image's root device), registers its termination on `ctx.cleanup` the moment its id exists, waits
until it runs, and returns a `Reach`: how to get its `Machine`. The communicator is the recipe's `communicator`:
SSM Run Command (no key, no open port; the image must run the SSM agent), or SSH with a throw-away key pair —
generated here, imported for the run (tagged at creation) and deleted by the run's cleanup — and the host keys
cloud-init prints on the console, pinned (docs/architecture.md §11). Tests inject fakes through `factory` (and, for
the SSH wiring itself, `ssh_connect` and the console reader).
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal, Protocol

from amiforge.awsapi.clients import AwsSession, call
from amiforge.awsapi.errors import aws_code
from amiforge.errors import AmiforgeError, ConfigError, InfraError, NotFound, StateError
from amiforge.model import Leftover
from amiforge.providers.aws.console import ConsoleFactory, ConsoleLog
from amiforge.providers.aws.images import MANAGED_TAG, SourceImage, check_architecture, instance_architectures
from amiforge.providers.aws.machine import Machine, MachineFactory, SsmMachine
from amiforge.providers.aws.ssh import host_keys_from_console, new_key_pair
from amiforge.providers.interface import RunContext
from amiforge.recipe.provider_specs import RootVolume
from amiforge.waiting import Wait, poll

__all__ = [
    "HOST_KEYS_DEADLINE",
    "RUN_TAG",
    "Access",
    "Placement",
    "Reach",
    "SshConnect",
    "architectures_fit",
    "client_token",
    "root_mapping",
    "start",
    "tag_list",
    "wait_state",
]

RUN_TAG = "amiforge:run"
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


def client_token(run_id: str, role: str) -> str:
    token = f"{run_id}-{role}"
    # EC2 client tokens are at most 64 ASCII characters; a long run id still gives a stable token.
    return token if len(token) <= 64 else hashlib.sha256(token.encode()).hexdigest()[:64]


def tag_list(tags: Mapping[str, str]) -> list[dict[str, str]]:
    return [{"Key": k, "Value": v} for k, v in tags.items()]


# --- reaching an instance -------------------------------------------------------------------------------------


@dataclass(frozen=True)
class KeyPair:
    name: str
    private_key: str = field(repr=False)  # never in a log line or a traceback's locals


def throwaway_key(session: AwsSession, region: str, ctx: RunContext, role: str) -> KeyPair:
    """A key pair made here for one instance: imported (tagged at creation), deleted by the run's cleanup."""
    name = f"amiforge-{ctx.run_id}-{role}"[:255]
    private_key, public_key = new_key_pair(name)
    ec2 = session.client("ec2", region)
    # Registered before the import: an import whose answer was lost may still have made the key pair.
    ctx.cleanup.add(
        Leftover(
            "EC2 key pair (throw-away)",
            f"{name} in {region}",
            f"aws ec2 delete-key-pair --region {region} --key-name {name}",
        ),
        lambda: _delete_key_pair(ec2, name, ctx.run_id),
    )
    tags = tag_list({MANAGED_TAG: "true", RUN_TAG: ctx.run_id, "Name": name})
    request: dict[str, Any] = {
        "KeyName": name,
        "PublicKeyMaterial": public_key.encode(),
        "TagSpecifications": [{"ResourceType": "key-pair", "Tags": tags}],
    }
    try:
        call(ec2, "ImportKeyPair", name, **request)
    except StateError as e:
        if aws_code(e) != "InvalidKeyPair.Duplicate":
            raise
        # The name is this run's and role's: an attempt whose answer was lost (botocore retried it) or an earlier
        # attempt of this run made it, with a private half that is gone. Replace it with this key.
        ctx.log(f"key pair {name} exists from an earlier attempt of this run: replacing it")
        call(ec2, "DeleteKeyPair", name, KeyName=name)
        call(ec2, "ImportKeyPair", name, **request)
    ctx.log(f"imported throw-away key pair {name}")
    return KeyPair(name, private_key)


def _delete_key_pair(ec2: Any, name: str, run_id: str) -> None:
    """The run's key pair `name`, if the import made it: looked up by name and amiforge's tags first. An import that
    never happened left nothing, and IAM allows DeleteKeyPair only on a key pair tagged amiforge:managed (iam.py), so
    deleting the name blindly would fail the cleanup — a leftover reported that does not exist."""
    wanted = {"key-name": name, f"tag:{MANAGED_TAG}": "true", f"tag:{RUN_TAG}": run_id}
    filters = [{"Name": key, "Values": [value]} for key, value in wanted.items()]
    if call(ec2, "DescribeKeyPairs", name, Filters=filters).get("KeyPairs"):
        call(ec2, "DeleteKeyPair", name, KeyName=name)


class _Failed(Exception):
    """An error while waiting for something, carried past the wait so it is not taken for the wait's end."""

    def __init__(self, error: AmiforgeError) -> None:
        super().__init__(str(error))
        self.error = error


class Reach:
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
        key: KeyPair | None,
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
        # An SSH reach is made by start with the key its instance was launched with and the address to use.
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


def address_of(session: AwsSession, region: str, instance_id: str, interface: str) -> str:
    instance = describe_instance(session, region, instance_id)
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


def root_mapping(volume: RootVolume | None, source: SourceImage) -> list[dict[str, Any]] | None:
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


def launch(
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
    tags = tag_list({MANAGED_TAG: "true", RUN_TAG: ctx.run_id, "Name": name})
    request: dict[str, Any] = {
        "ImageId": image_id,
        "InstanceType": instance_type,
        "MinCount": 1,
        "MaxCount": 1,
        "ClientToken": client_token(ctx.run_id, role),
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
        lambda: terminate(session, region, instance_id, ctx),
    )
    ctx.log(f"launched {role} {instance_id} from {image_id} ({instance_type})")
    return instance_id


def terminate(session: AwsSession, region: str, instance_id: str, ctx: RunContext) -> None:
    ctx.log(f"terminating {instance_id}")
    ec2 = session.client("ec2", region)
    # Raises on failure: the run's Cleanups keep it as a leftover without masking the first error.
    call(ec2, "TerminateInstances", instance_id, InstanceIds=[instance_id])


def describe_instance(session: AwsSession, region: str, instance_id: str) -> Mapping[str, Any]:
    ec2 = session.client("ec2", region)
    reservations = call(ec2, "DescribeInstances", instance_id, InstanceIds=[instance_id]).get("Reservations", [])
    instances = [i for r in reservations for i in r.get("Instances", [])]
    if not instances:
        raise NotFound(f"instance {instance_id} not visible yet")
    return dict(instances[0])


def wait_state(session: AwsSession, region: str, instance_id: str, want: str, wait: Wait) -> None:
    passing = {"running": {"pending"}, "stopped": {"running", "stopping", "pending"}}[want]

    def probe() -> bool | None:
        instance = describe_instance(session, region, instance_id)
        state = str(instance["State"]["Name"])
        if state == want:
            return True
        if state not in passing:
            reason = str(instance.get("StateReason", {}).get("Message") or "no reason")
            raise InfraError(f"instance {instance_id} is {state} while waiting for {want}: {reason}")
        return None

    poll(f"instance {instance_id} becoming {want}", probe, wait)


def start(
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
) -> tuple[str, Reach]:
    """Launch an instance the communicator can reach (over SSH: a throw-away key, and a public IP if asked for), wait
    until it runs; its id and how to get its Machine."""
    key = throwaway_key(session, region, ctx, role) if access.ssh else None
    instance_id = launch(
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
    wait_state(session, region, instance_id, "running", wait)
    # Over SSH, the address first: a missing public IP is known now, not after the wait for host keys.
    host = address_of(session, region, instance_id, access.ssh_interface) if access.ssh else None
    reach = Reach(
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


def architectures_fit(session: AwsSession, region: str, instance_type: str, image_id: str, architecture: Any) -> None:
    """ConfigError before anything is launched when `instance_type` cannot run the image."""
    architectures = instance_architectures(session, region, instance_type)
    check_architecture(image_id, architecture, architectures, instance_type)
