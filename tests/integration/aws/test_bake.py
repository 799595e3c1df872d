"""bake_on_ec2 / boot_test_on_ec2 under moto, with a FakeMachine standing in for the communicator (moto's SendCommand
runs nothing, and no sshd answers) and a FakeConsole for the serial console: both communicators (the SSH one's key
pair, address and pinned host keys), the root volume and IMDS settings, the readiness line however the console shows
it, and failed checks named in the report. Then SsmMachine itself against moto's SSM and an emulated console."""

from __future__ import annotations

import base64
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import boto3
import pytest
from botocore.awsrequest import AWSResponse
from conftest import REGION, Aws
from cryptography.hazmat.primitives import serialization
from fake_machine import LEFTOVERS, Clock, FakeConsole, FakeMachine, console_of, factory

from amiforge.errors import ConfigError, InfraError
from amiforge.model import RemovedFile
from amiforge.providers.aws.bake import AmiBuild, bake_on_ec2, boot_test_on_ec2
from amiforge.providers.aws.console import CONSOLE_WINDOW, ConsoleLog
from amiforge.providers.aws.images import SourceImage
from amiforge.providers.aws.instances import Access, Placement
from amiforge.providers.aws.machine import CommandResult, Machine, SsmMachine
from amiforge.providers.aws.ssh import HOST_KEYS_BEGIN, HOST_KEYS_END, new_key_pair
from amiforge.providers.guest import READY_FILE
from amiforge.providers.interface import Cleanups, Release, RunContext
from amiforge.recipe import Recipe, parse_recipe
from amiforge.waiting import Wait

SOURCE = SourceImage(
    "ami-0123456789abcdef0", "debian-12", "136693071363", datetime(2024, 5, 1, tzinfo=UTC), "x86_64", "/dev/xvda", 8
)
RECIPE = """\
name: web
provider: {type: aws, region: eu-west-1, source: {owners: [amazon], name: debian-12-*}}
steps:
  - packages: [nginx]
  - file: {src: index.html, dest: /var/www/html/index.html}
  - shell: echo hi > /etc/motd
  - service: {enable: [nginx]}
  - user: {name: deploy}
checks:
  units: [nginx]
  commands: [{run: "nginx -t"}]
tags: {team: web}
"""


@pytest.fixture
def recipe(tmp_path: Path) -> Recipe:
    (tmp_path / "index.html").write_text("web tier\n")
    return parse_recipe(RECIPE, tmp_path / "recipe.yaml")


@pytest.fixture
def clock() -> Clock:
    return Clock()


RELEASE = Release("web", "web@7", "ab" * 32, datetime(2026, 1, 2, 3, 4, 5, tzinfo=UTC))


def context(stack: Cleanups, lines: list[str] | None = None) -> RunContext:
    return RunContext(run_id="run42", cleanup=stack, release=RELEASE,
                      log=(lines.append if lines is not None else lambda _l: None))  # fmt: skip


def wait(clock: Clock) -> Wait:
    return Wait(first_delay=1.0, max_delay=30.0, deadline=7200.0, sleep=clock.sleep, clock=clock)


def instance_states(aws: Aws) -> dict[str, str]:
    ec2: Any = aws.ec2()
    return {
        i["InstanceId"]: i["State"]["Name"] for r in ec2.describe_instances()["Reservations"] for i in r["Instances"]
    }


def tags_of(items: Any) -> dict[str, str]:
    return {t["Key"]: t["Value"] for t in items.get("Tags", [])}


def record_run_instances(aws: Aws) -> list[dict[str, Any]]:
    seen: list[dict[str, Any]] = []

    def hook(params: dict[str, Any], **_: Any) -> None:
        seen.append(params)

    aws.session.boto_session.events.register("provide-client-params.ec2.RunInstances", hook)
    return seen


def record(aws: Aws, operation: str) -> list[dict[str, Any]]:
    """The parameters of every `operation` request (e.g. "ec2.ImportKeyPair") the session's clients send."""
    seen: list[dict[str, Any]] = []

    def hook(params: dict[str, Any], **_: Any) -> None:
        seen.append(params)

    aws.session.boto_session.events.register(f"provide-client-params.{operation}", hook)
    return seen


def bake(aws: Aws, recipe: Recipe, machine: FakeMachine, stack: Cleanups, clock: Clock, **kwargs: Any) -> AmiBuild:
    return bake_on_ec2(
        recipe,
        SOURCE,
        aws.session,
        context(stack),
        machine_factory=factory(machine),
        wait=wait(clock),
        tag_snapshots_at_creation=False,  # moto: NotImplementedError for ResourceType=snapshot in CreateImage
        **kwargs,
    )


def aws_recipe(tmp_path: Path, extra: str) -> Recipe:
    """RECIPE with more lines in its provider block."""
    text = RECIPE.replace(
        "provider: {type: aws, region: eu-west-1, source: {owners: [amazon], name: debian-12-*}}",
        "provider:\n  type: aws\n  region: eu-west-1\n  source: {owners: [amazon], name: debian-12-*}\n" + extra,
    )
    (tmp_path / "index.html").write_text("web tier\n")
    return parse_recipe(text, tmp_path / "recipe.yaml")


def key_pairs(aws: Aws) -> list[dict[str, Any]]:
    ec2: Any = aws.ec2()
    return list(ec2.describe_key_pairs()["KeyPairs"])


@pytest.fixture
def image_id(aws: Aws) -> str:
    """An image to boot-test (x86_64, as moto's CreateImage makes them). Made with a client of its own: the session's
    clients are made later, after a test's hooks are on the session (a client copies them when it is made)."""
    ec2: Any = boto3.client("ec2", region_name=REGION)
    instance = ec2.run_instances(ImageId="ami-12345678", MinCount=1, MaxCount=1)["Instances"][0]["InstanceId"]
    image = str(ec2.create_image(InstanceId=instance, Name="web-under-test")["ImageId"])
    ec2.terminate_instances(InstanceIds=[instance])
    return image


def boot(aws: Aws, image: str, checks: Any, machine: FakeMachine, stack: Cleanups, clock: Clock, **kwargs: Any) -> Any:
    kwargs.setdefault("console_reader", console_of(machine))
    kwargs.setdefault("wait", wait(clock))
    return boot_test_on_ec2(image, checks, aws.session, context(stack), machine_factory=factory(machine), **kwargs)


def test_bake_happy_path(aws: Aws, recipe: Recipe, clock: Clock) -> None:
    def respond(script: str) -> CommandResult:
        # Generalisation on the builder says what it removed, as GENERALISE prints it.
        said = "AMIFORGE-GENERALISED netrc\t/root/.netrc\n" if "AMIFORGE_HOSTNAME=" in script else ""
        return CommandResult(0, said, "")

    machine = FakeMachine(respond)
    requests = record_run_instances(aws)
    with Cleanups() as stack:
        build = bake(aws, recipe, machine, stack, clock)
        assert instance_states(aws)[build.builder_instance_id] == "stopped"
    assert stack.leftovers == []
    ec2: Any = aws.ec2()
    image = ec2.describe_images(ImageIds=[build.image_id])["Images"][0]
    assert image["State"] == "available"
    assert image["Name"] == "web-run42"
    assert tags_of(image) == {
        "team": "web",
        "amiforge:managed": "true",
        "amiforge:run": "run42",
        "amiforge:recipe": "web",
    }
    assert build.snapshot_ids
    for snap in ec2.describe_snapshots(SnapshotIds=list(build.snapshot_ids))["Snapshots"]:
        assert tags_of(snap)["amiforge:run"] == "run42"
    assert instance_states(aws)[build.builder_instance_id] == "terminated"
    assert [p.name for p in build.packages] == ["nginx"]
    assert build.generalised == (RemovedFile("/root/.netrc", "netrc"),)

    # Every step ran, in recipe order, then the readiness unit, then generalisation last.
    assert len(machine.log) == 7
    assert "apt-get install" in machine.log[0] and "nginx" in machine.log[0]
    assert "/run/amiforge/file /var/www/html/index.html" in machine.log[1]
    assert machine.files["/run/amiforge/user.sh"] == b"echo hi > /etc/motd"
    assert "systemctl enable nginx" in machine.log[3]
    assert "useradd" in machine.log[4]
    assert "amiforge-ready.service" in machine.log[5]
    assert "AMIFORGE_HOSTNAME=web" in machine.log[6] and "/etc/machine-id" in machine.log[6]
    # What the communicator left goes last, in the same (last) command: the generalise step removes it.
    assert LEFTOVERS.authorized_key is not None and LEFTOVERS.authorized_key in machine.log[6]
    assert machine.log[6].endswith(LEFTOVERS.script())
    assert machine.files["/run/amiforge/file"] == b"web tier\n"
    assert b"AMIFORGE-READY" in machine.files["/usr/local/lib/amiforge/ready"]
    # The CloudWatch reporter and what it needs (curl with --aws-sigv4, the CA bundle), and the image's identity.
    assert b"PutMetricData" in machine.files["/usr/local/lib/amiforge/cloudwatch"]
    assert "apt-get install -y -q --no-install-recommends curl ca-certificates" in machine.log[5]
    release = dict(line.split("=", 1) for line in machine.files["/etc/amiforge/release"].decode().splitlines()[1:])
    assert release.keys() == {"AMIFORGE_IMAGE", "AMIFORGE_VERSION", "AMIFORGE_RECIPE_DIGEST", "AMIFORGE_BUILT_AT"}
    assert (release["AMIFORGE_IMAGE"], release["AMIFORGE_VERSION"]) == ("web", "web@7")
    assert release["AMIFORGE_RECIPE_DIGEST"] == "ab" * 32
    assert release["AMIFORGE_BUILT_AT"] == "2026-01-02T03:04:05Z"  # when the version's bake started

    # Tagged at creation, IMDSv2 required, idempotent client token.
    (request,) = requests
    assert request["MetadataOptions"]["HttpTokens"] == "required"
    assert request["ClientToken"] == "run42-builder"
    kinds = {spec["ResourceType"]: tags_of(spec) for spec in request["TagSpecifications"]}
    assert kinds["instance"]["amiforge:managed"] == "true" and kinds["volume"]["amiforge:run"] == "run42"
    instance = ec2.describe_instances(InstanceIds=[build.builder_instance_id])["Reservations"][0]["Instances"][0]
    assert tags_of(instance)["amiforge:managed"] == "true"
    if "MetadataOptions" in instance:  # moto reports what was asked
        assert instance["MetadataOptions"]["HttpTokens"] == "required"
    assert all(delay <= 30.0 for delay in clock.sleeps)


def test_failing_step_names_the_step_and_leaves_nothing(aws: Aws, recipe: Recipe, clock: Clock) -> None:
    machine = FakeMachine(lambda s: CommandResult(3, "", "E: boom\n") if "useradd" in s else CommandResult(0, "", ""))
    with pytest.raises(InfraError) as caught, Cleanups() as stack:
        bake(aws, recipe, machine, stack, clock)
    assert "step 5: user: deploy" in caught.value.message and "exit 3" in caught.value.message
    assert "E: boom" in caught.value.message
    assert stack.leftovers == []
    assert set(instance_states(aws).values()) == {"terminated"}
    ec2: Any = aws.ec2()
    assert ec2.describe_images(Owners=["self"])["Images"] == []
    assert not any("machine-id" in s for s in machine.log)  # generalise never ran


def test_interrupt_terminates_builder_and_propagates(aws: Aws, recipe: Recipe, clock: Clock) -> None:
    def interrupt(script: str) -> CommandResult:
        if "systemctl enable nginx" in script:
            raise KeyboardInterrupt
        return CommandResult(0, "", "")

    with pytest.raises(KeyboardInterrupt), Cleanups() as stack:
        bake(aws, recipe, FakeMachine(interrupt), stack, clock)
    assert set(instance_states(aws).values()) == {"terminated"}


def test_failed_cleanup_does_not_mask_the_error(aws: Aws, recipe: Recipe, clock: Clock) -> None:
    def deny(model: Any, **_: Any) -> tuple[AWSResponse, dict[str, Any]]:
        body = {"Error": {"Code": "UnauthorizedOperation", "Message": "injected"}, "ResponseMetadata": {}}
        return AWSResponse("https://ec2.invalid/", 403, {}, None), body

    aws.session.boto_session.events.register("before-call.ec2.TerminateInstances", deny)
    machine = FakeMachine(lambda s: CommandResult(3, "", "bad") if "apt-get" in s else CommandResult(0, "", ""))
    with pytest.raises(InfraError, match="step 1"), Cleanups() as stack:
        bake(aws, recipe, machine, stack, clock)
    (leftover,) = stack.leftovers
    assert "ec2:TerminateInstances" in leftover.error and leftover.what == "EC2 instance (builder)"
    assert leftover.where.endswith(f" in {REGION}") and f"amiforge gc --region {REGION} --apply" in leftover.remove
    assert set(instance_states(aws).values()) == {"running"}  # orphaned, and reported as such


def test_image_that_never_becomes_available_is_discarded(
    aws: Aws, recipe: Recipe, clock: Clock, monkeypatch: pytest.MonkeyPatch
) -> None:
    from moto.ec2.models.amis import Ami

    monkeypatch.setattr(Ami, "state", property(lambda _self: "pending", lambda _self, _v: None), raising=False)
    with pytest.raises(InfraError, match="not done after 600s"), Cleanups() as stack:
        bake_on_ec2(
            recipe,
            SOURCE,
            aws.session,
            context(stack),
            machine_factory=factory(FakeMachine()),
            wait=Wait(first_delay=1.0, max_delay=30.0, deadline=600.0, sleep=clock.sleep, clock=clock),
            tag_snapshots_at_creation=False,
        )
    assert max(clock.sleeps) == 30.0  # adaptive: capped backoff, the deadline is the caller's
    ec2: Any = aws.ec2()
    assert ec2.describe_images(Owners=["self"])["Images"] == []
    assert set(instance_states(aws).values()) == {"terminated"}


def test_boot_test_reads_ready_marker_and_runs_checks(aws: Aws, recipe: Recipe, clock: Clock, image_id: str) -> None:
    machine = FakeMachine(consoles=["", "[  OK  ] Reached target\n", "Booting\nAMIFORGE-READY 12.34\n"])
    requests = record_run_instances(aws)
    with Cleanups() as stack:
        report = boot(aws, image_id, recipe.checks, machine, stack, clock)
        assert instance_states(aws)[machine.instance_id] == "running"
    assert stack.leftovers == []
    assert report.passed, report.checks
    assert report.time_to_ready == pytest.approx(12.34)
    assert [c.name for c in report.checks] == ["ready", "unit nginx", "command nginx -t"]
    assert "AMIFORGE-READY" in report.console
    assert len(machine.argvs) == 2
    assert instance_states(aws)[machine.instance_id] == "terminated"
    assert requests[0]["MetadataOptions"]["HttpTokens"] == "required"
    assert tags_of(requests[0]["TagSpecifications"][0])["amiforge:run"] == "run42"


def short_wait(clock: Clock) -> Wait:
    return Wait(first_delay=1.0, max_delay=15.0, deadline=120.0, sleep=clock.sleep, clock=clock)


def test_boot_test_never_ready_is_a_failed_report(aws: Aws, recipe: Recipe, clock: Clock, image_id: str) -> None:
    machine = FakeMachine(consoles=["still booting"])
    with Cleanups() as stack:
        report = boot(aws, image_id, recipe.checks, machine, stack, clock, wait=short_wait(clock))
    assert not report.passed and report.time_to_ready is None
    assert [c.kind for c in report.checks] == ["ready"]
    assert machine.argvs == []  # the console showed everything there was: nothing to ask the instance
    assert set(instance_states(aws).values()) == {"terminated"}


# --- the builder's volume, the image's IMDS support, architectures ------------------------------------------------


def test_root_volume_is_mapped_on_the_source_images_root_device(aws: Aws, tmp_path: Path, clock: Clock) -> None:
    recipe = aws_recipe(tmp_path, "  root_volume: {size_gib: 20, type: gp3, iops: 4000, kms_key: alias/images}\n")
    requests = record_run_instances(aws)
    volumes: list[Any] = []  # the builder's, while it runs (they go with it: DeleteOnTermination)

    def respond(_script: str) -> CommandResult:
        ec2: Any = aws.ec2()
        volumes[:] = ec2.describe_volumes()["Volumes"]
        return CommandResult(0, "", "")

    with Cleanups() as stack:
        bake(aws, recipe, FakeMachine(respond), stack, clock)
    (request,) = requests
    assert request["BlockDeviceMappings"] == [
        {
            "DeviceName": "/dev/xvda",  # SOURCE's root device
            "Ebs": {
                "DeleteOnTermination": True,
                "VolumeSize": 20,
                "VolumeType": "gp3",
                "Iops": 4000,
                "Encrypted": True,  # implied by the key
                "KmsKeyId": "alias/images",
            },
        }
    ]
    (volume,) = volumes
    assert (volume["Size"], volume["VolumeType"], volume["Encrypted"]) == (20, "gp3", True)


def test_no_root_volume_maps_nothing_and_encrypted_false_is_never_sent(
    aws: Aws, recipe: Recipe, tmp_path: Path, clock: Clock
) -> None:
    requests = record_run_instances(aws)
    with Cleanups() as stack:
        bake(aws, recipe, FakeMachine(), stack, clock)
        bake(aws, aws_recipe(tmp_path, "  root_volume: {size_gib: 9, encrypted: false}\n"), FakeMachine(), stack, clock)
    assert "BlockDeviceMappings" not in requests[0]
    assert requests[1]["BlockDeviceMappings"][0]["Ebs"] == {"DeleteOnTermination": True, "VolumeSize": 9}


def test_root_volume_smaller_than_the_source_snapshot_is_refused_before_launch(
    aws: Aws, tmp_path: Path, clock: Clock
) -> None:
    recipe = aws_recipe(tmp_path, "  root_volume: {size_gib: 4}\n")
    with pytest.raises(ConfigError, match=r"smaller than the root snapshot .* \(8 GiB\)") as caught, Cleanups() as s:
        bake(aws, recipe, FakeMachine(), s, clock)
    assert caught.value.fix and "at least 8" in caught.value.fix
    assert instance_states(aws) == {}


@pytest.mark.parametrize(("setting", "expected"), [("", [{"Value": "v2.0"}]), ("  imds_support: none\n", [])])
def test_image_requires_imdsv2_unless_the_recipe_says_none(
    aws: Aws, tmp_path: Path, clock: Clock, setting: str, expected: list[dict[str, str]]
) -> None:
    modified = record(aws, "ec2.ModifyImageAttribute")
    with Cleanups() as stack:
        build = bake(aws, aws_recipe(tmp_path, setting), FakeMachine(), stack, clock)
    assert [m["ImdsSupport"] for m in modified] == expected
    assert all(m["ImageId"] == build.image_id for m in modified)


def test_a_builder_type_of_another_architecture_is_refused_before_launch(
    aws: Aws, tmp_path: Path, clock: Clock
) -> None:
    recipe = aws_recipe(tmp_path, "  instance_type: t4g.micro\n")
    with pytest.raises(ConfigError, match=r"is x86_64, but instance type t4g\.micro runs arm64"), Cleanups() as stack:
        bake(aws, recipe, FakeMachine(), stack, clock)
    assert instance_states(aws) == {}


def test_boot_test_refuses_an_instance_type_the_image_cannot_run(
    aws: Aws, recipe: Recipe, clock: Clock, image_id: str
) -> None:
    with pytest.raises(ConfigError, match=r"t4g\.small runs arm64"), Cleanups() as stack:
        boot(aws, image_id, recipe.checks, FakeMachine(), stack, clock, instance_type="t4g.small")
    assert aws.calls["ec2.RunInstances"] == 0


# --- the SSH communicator --------------------------------------------------------------------------------------


def host_key_block() -> tuple[str, list[str]]:
    """What cloud-init prints on the console, and the keys it names (TYPE BASE64, as host_keys_from_console gives)."""
    keys = [" ".join(new_key_pair("root@builder")[1].split()[:2]) for _ in range(2)]
    lines = [HOST_KEYS_BEGIN, *(f"{k} root@builder" for k in keys), HOST_KEYS_END]
    return "\n".join(lines) + "\n", keys


class Connect:
    """Stands in for SshMachine: records what it is given, hands out `machine`, and knows whether it was closed."""

    def __init__(self, machine: FakeMachine) -> None:
        self.machine = machine
        self.calls: list[dict[str, Any]] = []
        self.closed = 0

    def __call__(self, host: str, *, username: str, private_key: str, host_keys: Any, console: Any) -> Machine:
        self.calls.append(
            {"host": host, "username": username, "private_key": private_key, "host_keys": list(host_keys)}
        )
        self.machine.close = self.close  # type: ignore[attr-defined]
        return self.machine

    def close(self) -> None:
        self.closed += 1


@pytest.fixture
def group(aws: Aws) -> str:
    """A security group (as the recipe must name for SSH), made with a client of its own like `image_id`."""
    ec2: Any = boto3.client("ec2", region_name=REGION)
    return str(ec2.create_security_group(GroupName="amiforge-ssh", Description="22 from the build host")["GroupId"])


def ssh_recipe(tmp_path: Path, group: str, interface: str = "") -> Recipe:
    return aws_recipe(tmp_path, f"  communicator: ssh\n  security_group_ids: [{group}]\n{interface}")


def ssh_bake(
    aws: Aws,
    tmp_path: Path,
    clock: Clock,
    group: str,
    stack: Cleanups,
    console: Any,
    connect: Any,
    *,
    interface: str = "",
    access: Access = Access("ssh"),
) -> AmiBuild:
    """bake_on_ec2 of an ssh recipe through `group`, reading `console` (a ConsoleSource) and connecting with
    `connect`, on the test's clock."""
    return bake_on_ec2(
        ssh_recipe(tmp_path, group, interface),
        SOURCE,
        aws.session,
        context(stack),
        console_reader=console_of(console),
        ssh_connect=connect,
        wait=wait(clock),
        access=access,
        placement=Placement(security_group_ids=(group,)),
        tag_snapshots_at_creation=False,  # moto 5.2.5: no snapshot TagSpecifications in CreateImage
    )


def public_key_of(private_key: str) -> bytes:
    key = serialization.load_ssh_private_key(private_key.encode(), password=None)
    return key.public_key().public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH)


def test_ssh_bake_imports_a_throwaway_key_pins_the_consoles_host_keys_and_deletes_the_key(
    aws: Aws, tmp_path: Path, clock: Clock, group: str
) -> None:
    block, host_keys = host_key_block()
    console = FakeConsole(["", "Booting\n", "cloud-init\n" + block + "login:\n"])
    machine = FakeMachine()
    connect = Connect(machine)
    imported = record(aws, "ec2.ImportKeyPair")
    requests = record_run_instances(aws)
    pairs_during: list[list[dict[str, Any]]] = []
    running: list[dict[str, Any]] = []

    def respond(_script: str) -> CommandResult:
        ec2: Any = aws.ec2()
        pairs_during.append(key_pairs(aws))
        running[:] = [i for r in ec2.describe_instances()["Reservations"] for i in r["Instances"]]
        return CommandResult(0, "", "")

    machine.respond = respond
    with Cleanups() as stack:
        build = ssh_bake(aws, tmp_path, clock, group, stack, console, connect)
    assert stack.leftovers == []

    # The key pair: imported tagged (it existed while the steps ran), gone after the run.
    (imported_request,) = imported
    name = imported_request["KeyName"]
    assert name == "amiforge-run42-builder"
    assert {t["Key"]: t["Value"] for t in imported_request["TagSpecifications"][0]["Tags"]} == {
        "amiforge:managed": "true",
        "amiforge:run": "run42",
        "Name": name,
    }
    assert imported_request["TagSpecifications"][0]["ResourceType"] == "key-pair"
    assert [p["KeyName"] for p in pairs_during[0]] == [name] and tags_of(pairs_during[0][0])["amiforge:run"] == "run42"
    assert key_pairs(aws) == []

    # Launched with the key, a public IP asked for on the interface that carries subnet and groups.
    (request,) = requests
    assert request["KeyName"] == name
    assert request["NetworkInterfaces"] == [
        {"DeviceIndex": 0, "AssociatePublicIpAddress": True, "DeleteOnTermination": True, "Groups": [group]}
    ]
    assert "SecurityGroupIds" not in request and "SubnetId" not in request

    # Connected as admin to the public address, with the imported key and only the console's host keys.
    (instance,) = running
    assert instance["InstanceId"] == build.builder_instance_id
    (call,) = connect.calls
    assert call["host"] == instance["PublicIpAddress"] and call["username"] == "admin"
    assert call["host_keys"] == host_keys
    assert public_key_of(call["private_key"]).split()[1] == imported_request["PublicKeyMaterial"].split()[1]
    assert connect.closed == 1
    assert machine.log[-1].endswith(LEFTOVERS.script())  # the generalisation removes what SSH left


def test_ssh_key_pair_left_by_an_earlier_attempt_of_the_run_is_replaced(
    aws: Aws, tmp_path: Path, clock: Clock, group: str
) -> None:
    """ImportKeyPair is not idempotent: when botocore retries one whose answer was lost, or an earlier attempt of the
    same run made the key pair, AWS answers InvalidKeyPair.Duplicate. The name is the run's own, and its private half is
    gone: the bake replaces it with its new key and goes on, and the run's cleanup still deletes it."""
    block, _keys = host_key_block()
    _stale_private, stale_public = new_key_pair("stale")
    ec2: Any = boto3.client("ec2", region_name=REGION)
    ec2.import_key_pair(KeyName="amiforge-run42-builder", PublicKeyMaterial=stale_public.encode())
    connect = Connect(FakeMachine())
    imported = record(aws, "ec2.ImportKeyPair")
    fingerprints: list[str] = []

    def respond(_script: str) -> CommandResult:
        fingerprints.append(key_pairs(aws)[0]["KeyFingerprint"])
        return CommandResult(0, "", "")

    connect.machine.respond = respond
    with Cleanups() as stack:
        ssh_bake(aws, tmp_path, clock, group, stack, FakeConsole([block]), connect)
    assert stack.leftovers == [] and key_pairs(aws) == []
    assert len(imported) == 2, "the duplicate import, then the import of the replaced key pair"
    (used,) = {public_key_of(call["private_key"]).split()[1] for call in connect.calls}
    assert used == imported[1]["PublicKeyMaterial"].split()[1] != stale_public.encode().split()[1]
    assert len(set(fingerprints)) == 1  # while the steps ran, one key pair: the new one


def test_ssh_over_the_private_address(aws: Aws, tmp_path: Path, clock: Clock, group: str) -> None:
    block, _keys = host_key_block()
    connect = Connect(FakeMachine())
    requests = record_run_instances(aws)
    with Cleanups() as stack:
        build = ssh_bake(
            aws,
            tmp_path,
            clock,
            group,
            stack,
            FakeConsole([block]),
            connect,
            interface="  ssh_interface: private_ip\n",
            access=Access("ssh", "debian", "private_ip"),
        )
    assert "NetworkInterfaces" not in requests[0] and requests[0]["SecurityGroupIds"] == [group]
    ec2: Any = aws.ec2()
    instance = ec2.describe_instances(InstanceIds=[build.builder_instance_id])["Reservations"][0]["Instances"][0]
    assert (connect.calls[0]["host"], connect.calls[0]["username"]) == (instance["PrivateIpAddress"], "debian")


def test_ssh_without_host_keys_on_the_console_fails_and_leaves_nothing(
    aws: Aws, tmp_path: Path, clock: Clock, group: str
) -> None:
    connect = Connect(FakeMachine())
    console = FakeConsole(["Booting\n", f"{HOST_KEYS_BEGIN}\nssh-ed25519 AAAAbroken\n"])  # never a whole block
    with pytest.raises(InfraError, match="SSH host keys on the console") as caught, Cleanups() as stack:
        ssh_bake(aws, tmp_path, clock, group, stack, console, connect)
    assert caught.value.fix and "cloud-init" in caught.value.fix and "Nitro" in caught.value.fix
    assert connect.calls == []
    assert clock.now <= 600.0 + 30.0  # bounded: the host keys' own deadline, not the bake's two hours
    assert set(instance_states(aws).values()) == {"terminated"} and key_pairs(aws) == []
    assert stack.leftovers == []


def test_ssh_console_errors_are_not_taken_for_missing_host_keys(
    aws: Aws, tmp_path: Path, clock: Clock, group: str
) -> None:
    """A console that cannot be read (here: not allowed) says so, with its own fix, at once."""

    class Denied(FakeConsole):
        def read(self) -> str:
            raise ConfigError("ec2:GetConsoleOutput on i-x failed: UnauthorizedOperation", fix="grant it")

    with pytest.raises(ConfigError, match="UnauthorizedOperation") as caught, Cleanups() as stack:
        ssh_bake(aws, tmp_path, clock, group, stack, Denied(), Connect(FakeMachine()))
    assert caught.value.fix == "grant it" and clock.now == 0.0
    assert set(instance_states(aws).values()) == {"terminated"} and key_pairs(aws) == []


def test_ssh_without_a_public_address_is_refused_clearly(aws: Aws, tmp_path: Path, clock: Clock, group: str) -> None:
    """Fault injection: DescribeInstances shows no public IP (as for a subnet that gives none)."""

    def no_public_ip(parsed: dict[str, Any], **_: Any) -> None:
        for reservation in parsed.get("Reservations", []):
            for instance in reservation["Instances"]:
                instance.pop("PublicIpAddress", None)

    aws.session.boto_session.events.register("after-call.ec2.DescribeInstances", no_public_ip)
    block, _keys = host_key_block()
    with pytest.raises(ConfigError, match="got no public IP address") as caught, Cleanups() as stack:
        ssh_bake(aws, tmp_path, clock, group, stack, FakeConsole([block]), Connect(FakeMachine()))
    assert caught.value.fix and "ssh_interface: private_ip" in caught.value.fix
    assert set(instance_states(aws).values()) == {"terminated"} and key_pairs(aws) == []


def test_ssh_boot_test_pins_host_keys_seen_before_they_scrolled_out(
    aws: Aws, recipe: Recipe, clock: Clock, image_id: str, group: str
) -> None:
    """cloud-init prints the host keys early; by the time the checks need them, a chatty boot has pushed them out of
    EC2's 64 KB window. The console log keeps what it saw."""
    block, host_keys = host_key_block()
    chatter = "".join(f"[{i:6}] noisy: line {i}\n" for i in range(4000))  # ~100 KB
    console = FakeConsole(
        ["Booting\n" + block, (block + chatter)[-CONSOLE_WINDOW:], chatter[-30000:] + "AMIFORGE-READY 20.5\n"]
    )
    machine = FakeMachine()
    connect = Connect(machine)
    with Cleanups() as stack:
        report = boot_test_on_ec2(
            image_id,
            recipe.checks,
            aws.session,
            context(stack),
            console_reader=console_of(console),
            ssh_connect=connect,
            wait=wait(clock),
            access=Access("ssh"),
            placement=Placement(security_group_ids=(group,)),
        )
    assert report.passed, report.checks
    assert report.time_to_ready == pytest.approx(20.5)
    assert connect.calls[0]["host_keys"] == host_keys
    assert key_pairs(aws) == [] and set(instance_states(aws).values()) == {"terminated"}


# --- readiness, however the console shows it -------------------------------------------------------------------


def test_a_ready_line_read_while_it_was_written_is_completed_by_the_next_read(
    aws: Aws, recipe: Recipe, clock: Clock, image_id: str
) -> None:
    """A read can end inside the number: "AMIFORGE-READY 12.3" of 12.34. Only a whole line counts."""
    machine = FakeMachine(consoles=["Booting\nAMIFORGE-READY 12.3", "Booting\nAMIFORGE-READY 12.34\nlogin:\n"])
    with Cleanups() as stack:
        report = boot(aws, image_id, recipe.checks, machine, stack, clock)
    assert report.time_to_ready == pytest.approx(12.34)


def test_a_ready_line_scrolled_out_between_two_reads_is_read_from_the_instance(
    aws: Aws, recipe: Recipe, clock: Clock, image_id: str
) -> None:
    """The first read catches the line half-written; by the next, a chatty boot has pushed it out of the 64 KB window
    (no overlap between the two reads): the half line is dropped, never guessed at, and the line the readiness unit
    recorded on the instance gives the time to ready."""
    chatter = "".join(f"[{i:6}] noisy: line {i}\n" for i in range(3000))
    machine = FakeMachine(consoles=["Booting\nAMIFORGE-READY 12.3", chatter[-CONSOLE_WINDOW:]])
    machine.files[READY_FILE] = b"AMIFORGE-READY 12.34\n"
    with Cleanups() as stack:
        report = boot(aws, image_id, recipe.checks, machine, stack, clock)
    assert report.passed, report.checks
    assert report.time_to_ready == pytest.approx(12.34)
    assert ["cat", READY_FILE] in machine.argvs


def test_a_buffered_xen_console_is_backed_by_the_instances_record(
    aws: Aws, recipe: Recipe, clock: Clock, image_id: str
) -> None:
    """On Xen types EC2 shows only what it posted after boot: the readiness line may never appear there."""
    machine = FakeMachine()
    machine.screen = FakeConsole(["Xen boot\nlogin:\n"], latest=False)
    probes = iter([False, False, True])

    def respond(_script: str) -> CommandResult:
        raise AssertionError("no step runs in a boot test")

    machine.respond = respond
    original = machine.run

    def run(argv: Any, *, timeout: float) -> CommandResult:
        if argv[0] == "cat" and next(probes):
            machine.files[READY_FILE] = b"AMIFORGE-READY 31\n"  # the unit ran by the third look
        return original(argv, timeout=timeout)

    machine.run = run  # type: ignore[method-assign]
    with Cleanups() as stack:
        report = boot(aws, image_id, recipe.checks, machine, stack, clock)
    assert report.time_to_ready == pytest.approx(31.0)
    assert machine.argvs.count(["cat", READY_FILE]) == 3


def test_a_lossy_console_without_a_record_is_not_ready(aws: Aws, recipe: Recipe, clock: Clock, image_id: str) -> None:
    chatter = "".join(f"[{i:6}] noisy: line {i}\n" for i in range(3000))[-CONSOLE_WINDOW:]
    machine = FakeMachine(consoles=[chatter])
    with Cleanups() as stack:
        report = boot(aws, image_id, recipe.checks, machine, stack, clock, wait=short_wait(clock))
    assert report.time_to_ready is None and not report.passed
    assert machine.argvs and all(a == ["cat", READY_FILE] for a in machine.argvs)  # asked, never found, no checks


def _lines(first: int, last: int) -> str:
    return "".join(f"[{i:8}] kernel: message number {i}\n" for i in range(first, last))


def test_console_log_joins_sliding_windows_and_marks_gaps() -> None:
    windows = [_lines(0, 10), _lines(0, 20), _lines(5, 25), "", _lines(15, 30), _lines(100, 110)]
    log = ConsoleLog(FakeConsole(windows))
    assert log.read() == _lines(0, 10)
    assert log.read() == _lines(0, 20)  # grown
    assert log.read() == _lines(0, 25) and not log.lossy  # slid: joined where the two overlap
    assert log.read() == _lines(0, 25)  # nothing captured: nothing added, nothing forgotten
    assert log.read() == _lines(0, 30) and not log.lossy
    assert log.read() == _lines(0, 30) + _lines(100, 110) and log.lossy  # no overlap: text was lost in between


def test_console_log_keeps_a_repeated_stretch_rather_than_skipping_text() -> None:
    block = "login: \n" * 20
    log = ConsoleLog(FakeConsole([block + "a\n", block + "a\n" + block]))
    log.read()
    assert log.read().endswith(block) and "a\n" in log.text and not log.lossy


def test_console_log_drops_a_half_line_before_a_gap_and_calls_a_full_window_lossy() -> None:
    log = ConsoleLog(FakeConsole(["one\ntwo-half", "unrelated\n"]))
    log.read()
    assert log.read() == "one\nunrelated\n" and log.lossy  # never glued to what follows
    full = ConsoleLog(FakeConsole(["x" * CONSOLE_WINDOW]))
    full.read()
    assert full.lossy  # a full window may have lost what came before it


# --- failed checks are named -------------------------------------------------------------------------------------


def test_boot_test_names_the_failed_unit_command_and_port(
    aws: Aws, tmp_path: Path, clock: Clock, image_id: str
) -> None:
    text = RECIPE.replace(
        'checks:\n  units: [nginx]\n  commands: [{run: "nginx -t"}]\n',
        "checks:\n"
        "  units: [nginx, ssh]\n"
        '  commands: [{run: "nginx -t"}, {run: "test -f /etc/motd"}]\n'
        "  http: [{port: 80, path: /, expect_status: 200}, {port: 8080, path: /health, expect_status: 200}]\n"
        "  tcp: [{port: 22}, {port: 5432}]\n",
    )
    (tmp_path / "index.html").write_text("web tier\n")
    checks = parse_recipe(text, tmp_path / "recipe.yaml").checks
    machine = FakeMachine(
        consoles=[READY_LINE],
        failed_units=["nginx"],
        failed_commands={"nginx -t": (1, "nginx: [emerg] unknown directive")},
        closed_ports=[8080, 5432],
    )
    with Cleanups() as stack:
        report = boot(aws, image_id, checks, machine, stack, clock)
    failed = {c.name: c.detail for c in report.checks if not c.passed}
    assert set(failed) == {"unit nginx", "command nginx -t", "http :8080/health", "tcp :5432"}
    assert "exit 3" in failed["unit nginx"] and "failed" in failed["unit nginx"]
    assert "exit 1" in failed["command nginx -t"] and "unknown directive" in failed["command nginx -t"]
    assert "status 000" in failed["http :8080/health"]
    passed = {c.name for c in report.checks if c.passed}
    assert passed == {"ready", "unit ssh", "command test -f /etc/motd", "http :80/", "tcp :22"}
    assert not report.passed


READY_LINE = "Booting\nAMIFORGE-READY 9.5\n"


# --- SsmMachine against moto ----------------------------------------------------------------------------------


def launched(aws: Aws) -> str:
    ec2: Any = aws.ec2()
    return str(ec2.run_instances(ImageId="ami-0123456789abcdef0", MinCount=1, MaxCount=1)["Instances"][0]["InstanceId"])


def test_ssm_machine_run(aws: Aws, clock: Clock) -> None:
    """A command against moto's SSM. Uploads need the instance's answers (its upload key), which moto cannot give:
    test_machine.py runs them through an emulation that runs each command."""
    instance_id = launched(aws)
    machine = SsmMachine(aws.session, REGION, instance_id, sleep=clock.sleep, clock=clock)
    sent: list[dict[str, Any]] = []
    aws.session.boto_session.events.register(
        "provide-client-params.ssm.SendCommand", lambda params, **_: sent.append(params)
    )
    result = machine.run(["echo", "hello world"], timeout=60)
    assert result == CommandResult(0, "", "")  # moto runs nothing and reports Success
    assert sent[0]["DocumentName"] == "AWS-RunShellScript"
    assert sent[0]["Parameters"]["commands"] == ["echo 'hello world'"]
    assert sent[0]["InstanceIds"] == [instance_id]


def test_ssm_machine_console_emulated(aws: Aws) -> None:
    """moto's console is fixed text; a before-call handler answers as EC2 does (base64, decoded by botocore)."""

    def console(**_: Any) -> tuple[AWSResponse, dict[str, Any]]:
        text = base64.b64encode(b"Booting\nAMIFORGE-READY 7.5\n").decode()
        return AWSResponse("https://ec2.invalid/", 200, {}, None), {"InstanceId": "i-x", "Output": text}

    # Before any ec2 client exists: a client copies the session's handlers when it is made.
    aws.session.boto_session.events.register("before-call.ec2.GetConsoleOutput", console)
    instance_id = launched(aws)
    assert "AMIFORGE-READY 7.5" in SsmMachine(aws.session, REGION, instance_id).console()
