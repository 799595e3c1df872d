"""One runner per declared IAM operation: the operation's real code path under moto, and the AWS calls it made.

`observe(operation, work)` runs `RUNNERS[operation]` in a fresh moto (its own emulations, its own boto3 session) and
returns every AWS call the operation made — after the runner's setup, which `Harness.begin()` marks — as an
`ObservedCall`: its IAM action and the line of amiforge that made it (the innermost frame under src/amiforge that is
not one of awsapi.clients' call forms). test_iam.py checks those against iam.PERMISSIONS, and against the call sites
the source has (aws_call_sites.py).

Runners drive what the command drives (the provider's methods where it has them) through the emulations the other
AWS tests use (asg_emulation, distribute_fixtures, ebs_emulation, gc_fixtures, fake_machine). What each must reach:
- bake: a bake that succeeds, one whose step fails (the builder is terminated), one whose image never becomes
  available (the unfinished image is deregistered and its snapshots deleted: `_discard_unfinished`), from both kinds
  of source (owners, SSM parameter);
- bake and boot-test, with each communicator: SSM through a `ShadowedMachine` (the real `SsmMachine` sends every
  command against moto, which answers Success with no output, while a `FakeMachine` supplies what the guest would
  have answered), so SSM Run Command is attributed to the operations that use it, as on AWS; SSH through the real
  key-pair and host-key wiring with a FakeMachine for the connection (no sshd here). The serial console is read by the
  real ConsoleReader: `SerialConsole` answers GetConsoleOutput as EC2 does (moto's console is fixed text), with
  cloud-init's host keys and the readiness line.
"""

from __future__ import annotations

import base64
import inspect
import json
import subprocess
import uuid
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import boto3
import pytest
from asg_emulation import FakeTime, InstanceRefreshEmulation, install_asg_emulation, make_group
from aws_call_sites import action_of
from botocore.awsrequest import AWSResponse
from conftest import ACCOUNT, REGION, Aws
from distribute_fixtures import CopyImageEmulation, DeregistrationProtection
from doctor_emulation import DoctorEmulation, internet_for_default_vpc
from ebs_emulation import EbsEmulation
from fake_machine import READY, Clock, FakeMachine
from gc_fixtures import install_gc_emulation
from moto import mock_aws
from moto_emulation import ApiCalls, PagingEmulation, fast_tag_lookup, shared_images

import amiforge
import amiforge.providers
from amiforge.awsapi.clients import AwsSession
from amiforge.errors import InfraError
from amiforge.lifecycle.sign import check_artifact_bytes
from amiforge.model import Artifact, ImageVersion, Status
from amiforge.providers.aws.fleet import AsgFleet
from amiforge.providers.aws.gc import apply_gc, plan_gc
from amiforge.providers.aws.images import describe_image, inventory, resolve_source
from amiforge.providers.aws.instances import SshConnect
from amiforge.providers.aws.key_policy import SHARE_ACTIONS
from amiforge.providers.aws.machine import CommandResult, Leftovers, Machine, MachineFactory, SsmMachine
from amiforge.providers.aws.provider import AwsProvider, artifact_of
from amiforge.providers.aws.refresh import refresh_status, roll_back_refresh, start_refresh
from amiforge.providers.aws.ssh import HOST_KEYS_BEGIN, HOST_KEYS_END, new_key_pair
from amiforge.providers.interface import Cleanups, Replacement, RunContext
from amiforge.recipe import AwsProvider as AwsSpec
from amiforge.recipe import Checks, OwnersSource, Recipe, SsmSource, parse_recipe
from amiforge.settings import Settings
from amiforge.signing.kms import KmsSigner, KmsVerifier
from amiforge.waiting import Wait

SRC = Path(amiforge.__file__).resolve().parent
# A consumer account publish writes into through its role (moto's STS acts as any account).
CONSUMER = "222233334444"
CONSUMER_ROLE = f"arn:aws:iam::{CONSUMER}:role/amiforge-publish"
# Frames that are amiforge's call forms, not call sites: the site is their caller (and waiting.py's loops, whole).
_CALL_FORMS = {("awsapi/clients.py", name) for name in ("call", "paginate", "eventually")}


@dataclass(frozen=True)
class ObservedCall:
    action: str
    site: str  # src/amiforge/…:line of the amiforge code that made the call


class CallRecorder:
    """Every API call made through a boto3 session, with its IAM action and the amiforge line that made it."""

    def __init__(self) -> None:
        self.calls: list[ObservedCall] = []

    def install(self, events: Any) -> None:
        # First: emulations that answer in before-call (DeregistrationProtection) stop the handlers after them.
        events.register_first("before-call", self._before_call)

    def _before_call(self, model: Any, **_: Any) -> None:
        self.calls.append(ObservedCall(action_of(model.service_model.service_name, model.name), _site()))

    def reset(self) -> None:
        self.calls.clear()


def _site() -> str:
    """The innermost amiforge frame of the current call that is not a call form."""
    frame = inspect.currentframe()
    while frame is not None:
        path = Path(frame.f_code.co_filename)
        if path.is_relative_to(SRC):
            relative = path.relative_to(SRC).as_posix()
            if (relative, frame.f_code.co_name) not in _CALL_FORMS and relative != "waiting.py":
                return f"src/amiforge/{relative}:{frame.f_lineno}"
        frame = frame.f_back
    return "(not amiforge: a test's own call)"


@dataclass
class Harness:
    """One runner's world: moto, an AwsSession counting and recording calls, a scratch folder, a monkeypatch."""

    aws: Aws
    recorder: CallRecorder
    work: Path
    patch: pytest.MonkeyPatch
    clock: Clock = field(default_factory=Clock)

    @property
    def boto(self) -> boto3.Session:
        return self.aws.session.boto_session

    def begin(self) -> None:
        """The operation starts here: what the runner called to set things up is not the operation's."""
        self.recorder.reset()
        self.aws.calls.reset()

    def ec2(self, region: str = REGION) -> Any:
        return self.aws.session.client("ec2", region)

    def wait(self, deadline: float = 7200.0) -> Wait:
        return Wait(first_delay=1.0, max_delay=30.0, deadline=deadline, sleep=self.clock.sleep, clock=self.clock)

    def provider(self, settings: Settings | None = None, **kwargs: Any) -> AwsProvider:
        """The AWS provider as the CLI makes it, on this harness's boto3 session (so every call is recorded)."""
        settings = settings or Settings(data_dir=self.work / "data")
        kwargs.setdefault("tag_snapshots_at_creation", False)  # moto 5.2.5: NotImplementedError for snapshot tags
        kwargs.setdefault("publish_wait", self.wait(deadline=180.0))  # never the real clock
        kwargs.setdefault("copy_wait", self.wait(deadline=3 * 3600.0))
        return AwsProvider(settings, boto_session=self.boto, **kwargs)


@contextmanager
def harness(work: Path) -> Iterator[Harness]:
    """A fresh moto and session, as the `aws` fixture makes them (conftest.py), plus the call recorder."""
    with pytest.MonkeyPatch.context() as patch:
        paging = PagingEmulation()
        paging.install(patch)
        fast_tag_lookup(patch)
        with mock_aws():
            boto = boto3.Session(region_name=REGION)
            recorder = CallRecorder()
            recorder.install(boto.events)
            calls = ApiCalls()
            calls.install(boto.events)
            session = AwsSession(REGION, boto_session=boto, run_id="test", max_attempts=10)
            yield Harness(Aws(session, calls, paging), recorder, work, patch)


def observe(operation: str, work: Path) -> list[ObservedCall]:
    """What `operation` calls, run by its runner in a fresh moto."""
    with harness(work) as h:
        RUNNERS[operation](h)
        return list(h.recorder.calls)


# --- the machine bake and boot test talk to ------------------------------------------------------------------------


class ShadowedMachine:
    """A `Machine` whose every command also goes to the instance through the real SsmMachine (moto answers Success with
    no output), while `fake` answers as the guest would: the SSM calls are made as on AWS, the bake sees a guest."""

    def __init__(self, real: SsmMachine, fake: FakeMachine) -> None:
        self.real, self.fake = real, fake

    def run(self, argv: Sequence[str], *, timeout: float) -> CommandResult:
        self.real.run(argv, timeout=timeout)
        return self.fake.run(argv, timeout=timeout)

    def put_file(self, path: str, data: bytes, mode: int = 0o644) -> None:
        self.real.put_file(path, data, mode)
        self.fake.put_file(path, data, mode)

    def read_file(self, path: str) -> bytes:
        # The real read_file cannot finish on moto (its empty output is no file): one command stands for its reads.
        self.real.run(["stat", "-c", "%s", path], timeout=60)
        return self.fake.read_file(path)

    def console(self) -> str:
        self.real.console()
        return self.fake.console()

    def leftovers(self) -> Leftovers:
        return self.real.leftovers()  # what the bake's generalisation removes is SSM's, as on AWS


class SerialConsole:
    """GetConsoleOutput answered as EC2 does, base64 text (moto's is fixed text): cloud-init's host key block and the
    readiness line. On the generic before-call event, after the CallRecorder, so the call is still recorded."""

    def __init__(self) -> None:
        keys = [" ".join(new_key_pair("root@builder")[1].split()[:2]) for _ in range(2)]
        self.text = "\n".join(["cloud-init", HOST_KEYS_BEGIN, *keys, HOST_KEYS_END, READY])

    def install(self, events: Any) -> None:
        events.register("before-call", self._answer)

    def _answer(self, model: Any, params: dict[str, Any], **_: Any) -> tuple[AWSResponse, dict[str, Any]] | None:
        if model.name != "GetConsoleOutput":
            return None
        output = base64.b64encode(self.text.encode()).decode()
        answer = {"InstanceId": params["body"]["InstanceId"], "Output": output, "ResponseMetadata": {}}
        return AWSResponse(str(params.get("url", "")), 200, {}, None), answer


def ssh_to(fake: FakeMachine) -> SshConnect:
    """Stands in for SshMachine's connection (no sshd answers here); everything before it is the real SSH wiring."""

    def connect(host: str, *, username: str, private_key: str, host_keys: Sequence[str], console: Any) -> Machine:
        assert host and private_key and host_keys  # the instance's address, the imported key, the pinned host keys
        return fake

    return connect


def shadowed(h: Harness, fake: FakeMachine) -> MachineFactory:
    def make(session: AwsSession, region: str, instance_id: str) -> Machine:
        fake.instance_id = instance_id
        real = SsmMachine(session, region, instance_id, sleep=h.clock.sleep, clock=h.clock)
        return ShadowedMachine(real, fake)

    return make


# --- worlds -------------------------------------------------------------------------------------------------------

RECIPE = """\
name: web
provider:
  type: aws
  region: {region}
  source: {source}
  distribution:
    regions: [{{region: us-east-1, kms_key: {key}}}, {{region: ap-southeast-2}}]
    accounts: ["{consumer}"]
    organizations: ["arn:aws:organizations::999988887777:organization/o-abcdefghij"]
  publish: {{launch_template: web-fleet, accounts: ["{consumer}"]}}
steps:
  - packages: [nginx]
  - file: {{src: index.html, dest: /var/www/html/index.html}}
  - shell: echo hi > /etc/motd
  - user: {{name: deploy}}
checks:
  units: [nginx]
  commands: [{{run: "nginx -t"}}]
"""
OWNERS_SOURCE = f'{{owners: ["{ACCOUNT}"], name: debian-12-*}}'
SSM_SOURCE = "{ssm_parameter: /src/debian}"


def recipe(h: Harness, source: str = OWNERS_SOURCE, key: str = "alias/aws/ebs", *, ssh: bool = False) -> Recipe:
    folder = h.work / "recipe"
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "index.html").write_text("web tier\n")
    text = RECIPE.format(region=REGION, source=source, key=key, consumer=CONSUMER)
    if ssh:  # the SSH communicator, and a group that lets port 22 in (amiforge makes none)
        group = h.ec2().create_security_group(GroupName=f"ssh-{uuid.uuid4().hex[:8]}", Description="ssh")["GroupId"]
        text = text.replace("  source:", f"  communicator: ssh\n  security_group_ids: [{group}]\n  source:", 1)
    return parse_recipe(text, folder / "recipe.yaml")


def image(h: Harness, name: str, region: str = REGION) -> str:
    """An available image of this account, tagged as amiforge's."""
    ec2 = h.ec2(region)
    instance = ec2.run_instances(ImageId="ami-12345678", MinCount=1, MaxCount=1)["Instances"][0]["InstanceId"]
    managed = [{"ResourceType": "image", "Tags": [{"Key": "amiforge:managed", "Value": "true"}]}]
    return str(ec2.create_image(InstanceId=instance, Name=name, TagSpecifications=managed)["ImageId"])


def artifact(h: Harness, image_id: str, region: str = REGION) -> Artifact:
    return artifact_of(describe_image(h.aws.session, region, image_id), region)


def context(stack: Cleanups, run_id: str) -> RunContext:
    return RunContext(run_id=run_id, cleanup=stack, log=lambda _line: None)


def images(h: Harness) -> dict[str, str]:
    """Two managed images, a launch template on the first, an SSM parameter naming it."""
    ids = {name: image(h, f"web-{name}") for name in ("a", "b")}
    h.ec2().create_launch_template(LaunchTemplateName="web-fleet", LaunchTemplateData={"ImageId": ids["a"]})
    h.aws.session.client("ssm").put_parameter(Name="/src/debian", Value=ids["a"], Type="String", Overwrite=True)
    return ids


# --- the runners ----------------------------------------------------------------------------------------------------


def _resolve(h: Harness) -> None:
    images(h)
    h.begin()
    resolve_source(OwnersSource(owners=[ACCOUNT], name="web-*"), h.aws.session, REGION)
    resolve_source(SsmSource(ssm_parameter="/src/debian"), h.aws.session, REGION)
    # Only an image the recipe's instance type can run (its architectures, from DescribeInstanceTypes).
    resolve_source(SsmSource(ssm_parameter="/src/debian"), h.aws.session, REGION, instance_type="t3.micro")


def _inventory(h: Harness) -> None:
    images(h)
    h.begin()
    assert len(inventory(h.aws.session, REGION)) == 2


def _bake(h: Harness) -> None:
    """A bake that succeeds; one whose step fails; one whose image never becomes available."""
    source = image(h, "debian-12-20240501")
    h.aws.session.client("ssm").put_parameter(Name="/src/debian", Value=source, Type="String")
    SerialConsole().install(h.boto.events)
    ssh_recipe = recipe(h, ssh=True)
    h.begin()

    def respond(script: str) -> CommandResult:
        return CommandResult(
            0, "AMIFORGE-GENERALISED netrc\t/root/.netrc\n" if "AMIFORGE_HOSTNAME=" in script else "", ""
        )

    fine = h.provider(machine_factory=shadowed(h, FakeMachine(respond)), wait=h.wait())
    with Cleanups() as stack:
        fine.bake(recipe(h), context(stack, "bake-ok"))
    assert stack.leftovers == []

    # The SSH communicator: a throw-away key pair imported for the run and deleted after it, host keys from the console.
    ssh = h.provider(ssh_connect=ssh_to(FakeMachine(respond)), wait=h.wait())
    with Cleanups() as stack:
        ssh.bake(ssh_recipe, context(stack, "bake-ssh"))
    assert stack.leftovers == []

    failing = FakeMachine(lambda s: CommandResult(3, "", "E: boom") if "useradd" in s else CommandResult(0, "", ""))
    provider = h.provider(machine_factory=shadowed(h, failing), wait=h.wait())
    with pytest.raises(InfraError, match="step 4"), Cleanups() as stack:
        provider.bake(recipe(h, SSM_SOURCE), context(stack, "bake-step-fails"))
    assert stack.leftovers == []

    existing = {i["ImageId"] for i in h.ec2().describe_images(Owners=["self"])["Images"]}
    with pytest.MonkeyPatch.context() as patch:
        never_available(patch, existing)
        stuck = h.provider(machine_factory=shadowed(h, FakeMachine(respond)), wait=h.wait(deadline=600.0))
        with pytest.raises(InfraError, match="not done after"), Cleanups() as stack:
            stuck.bake(recipe(h), context(stack, "bake-never-available"))
    assert stack.leftovers == []
    assert {i["ImageId"] for i in h.ec2().describe_images(Owners=["self"])["Images"]} == existing


def never_available(patch: pytest.MonkeyPatch, existing: set[str]) -> None:
    """Every image but `existing` stays `pending` (an image whose snapshot never completes), as test_bake.py does."""
    from moto.ec2.models.amis import Ami

    def state(ami: Any) -> str:
        return str(ami.__dict__.get("state", "available")) if ami.id in existing else "pending"

    def set_state(ami: Any, value: str) -> None:
        ami.__dict__["state"] = value

    patch.setattr(Ami, "state", property(state, set_state), raising=False)


def _boot_test(h: Harness) -> None:
    """The boot test with each communicator: the readiness line on the console, then the checks on the instance."""
    tested = artifact(h, image(h, "web-1"))
    SerialConsole().install(h.boto.events)
    ssm, ssh = recipe(h), recipe(h, ssh=True)
    h.begin()
    provider = h.provider(machine_factory=shadowed(h, FakeMachine()), boot_wait=h.wait(deadline=900.0))
    with Cleanups() as stack:
        report = provider.boot_test(tested, ssm.checks, context(stack, "boot-ssm"), ssm.provider)
    assert report.passed, report.checks
    provider = h.provider(ssh_connect=ssh_to(FakeMachine()), boot_wait=h.wait(deadline=900.0))
    with Cleanups() as stack:
        report = provider.boot_test(tested, ssh.checks, context(stack, "boot-ssh"), ssh.provider)
    assert report.passed, report.checks


def _scan(h: Harness) -> None:
    """An AMI's root snapshot read through the EBS direct APIs and mounted, as `amiforge scan` does."""
    ebs = EbsEmulation()
    ebs.install(h.patch)
    tree = h.work / "tree"
    (tree / "etc").mkdir(parents=True)
    (tree / "etc/hostname").write_text("scan\n")
    raw = h.work / "root.raw"
    subprocess.run(["mkfs.ext4", "-q", "-F", "-d", str(tree), str(raw), "8M"], check=True)
    scanned = artifact(h, ebs.register_ami(h.ec2(), "scan-me", raw))
    h.begin()
    with h.provider().inspect(scanned) as view:
        assert (view.root / "etc/hostname").read_text() == "scan\n"


def _import(h: Harness) -> None:
    ids = images(h)
    h.begin()
    h.provider().adopt(REGION, ids["a"])


def _signing_key(h: Harness) -> str:
    kms: Any = h.aws.session.client("kms")
    return str(kms.create_key(KeySpec="ECC_NIST_P256", KeyUsage="SIGN_VERIFY")["KeyMetadata"]["Arn"])


def _signed_artifacts(h: Harness) -> Callable[[], None]:
    """What `amiforge sign` and `verify` ask of a version's AWS artifacts before they sign or verify: that each still
    has the digest the registry recorded (lifecycle.sign.check_artifact_bytes, through the provider it names)."""
    signed = artifact(h, image(h, "web-1"))
    settings = Settings(data_dir=h.work / "data")
    h.patch.setattr(amiforge.providers, "PROVIDERS", {**amiforge.providers.PROVIDERS, "aws": h.provider})
    now = datetime.now(UTC)
    version = ImageVersion(1, "web", 1, Status.SCANNED, "0" * 64, "recipe.yaml", "aws", now, now, digest="0" * 64)
    return lambda: check_artifact_bytes(version, [signed], settings)


def _sign(h: Harness) -> None:
    """`amiforge keys trust --kms-key` and `amiforge sign --kms-key`: the artifacts' digests, the key resolved, its
    public key, a signature."""
    key = _signing_key(h)
    check_artifacts = _signed_artifacts(h)
    h.begin()
    check_artifacts()
    signer = KmsSigner(key, REGION, session=h.aws.session)
    assert signer.key_id == f"kms:{key}"
    signer.public_key_pem()
    signer.sign(b"manifest")


def _verify(h: Harness) -> None:
    """`amiforge verify` with a KMS key the registry lacks the public key of, and the artifacts' digests."""
    key = _signing_key(h)
    check_artifacts = _signed_artifacts(h)
    h.begin()
    KmsVerifier(REGION, session=h.aws.session).public_key_pem("kms:" + key)
    check_artifacts()


def _distribute(h: Harness) -> None:
    """Copies to two regions (one under a customer managed key, one keeping the source's encryption), shared with an
    account and an organization: preflight, copy, wait, tag, share, protect."""
    CopyImageEmulation().install(h.patch)
    DeregistrationProtection().install(h.boto.events)
    key = h.aws.session.client("kms", "us-east-1").create_key(Description="ebs us-east-1")["KeyMetadata"]["Arn"]
    source = artifact(h, image(h, "web-20240501"))
    spec = recipe(h, key=key).provider
    h.begin()
    copies = h.provider().distribute(
        source, spec, run_id="dist-1", public=False, on_copy=lambda _c: None, progress=lambda _p: None
    )
    assert sorted(c.artifact.region for c in copies) == ["ap-southeast-2", "us-east-1"]


def _publish(h: Harness) -> None:
    """A channel published in this account and, through its role, in a consumer account: the parameter created,
    overwritten, then left as it is; the launch template's default moved."""
    shared_images(h.patch)  # the consumer account sees the image shared with it, as on AWS
    ids = images(h)
    settings = Settings(data_dir=h.work / "data", aws_roles={CONSUMER: CONSUMER_ROLE})
    setup = AwsSession(REGION, role_arns=settings.aws_roles, boto_session=h.boto)  # not the provider's: its role
    consumer = setup.as_account(CONSUMER).client("ec2")  # is assumed by the publication itself, as on AWS
    consumer.create_launch_template(LaunchTemplateName="web-fleet", LaunchTemplateData={"ImageId": ids["a"]})
    provider = h.provider(settings)
    for image_id in ids.values():
        h.ec2().modify_image_attribute(ImageId=image_id, LaunchPermission={"Add": [{"UserId": CONSUMER}]})
    spec = recipe(h).provider
    h.begin()
    for image_id in (ids["a"], ids["b"], ids["b"]):  # new parameter and tags; overwrite and new LT version; no-op
        provider.publish([artifact(h, image_id)], spec, name="web", channel="prod", run_id="r")


def _alarm(h: Harness, name: str, state: str) -> None:
    cloudwatch: Any = h.aws.session.client("cloudwatch")
    cloudwatch.put_metric_alarm(
        AlarmName=name, MetricName="HTTPCode_Target_5XX_Count", Namespace="AWS/ApplicationELB", Statistic="Sum",
        Period=60, EvaluationPeriods=1, Threshold=1.0, ComparisonOperator="GreaterThanOrEqualToThreshold",
    )  # fmt: skip
    cloudwatch.set_alarm_state(AlarmName=name, StateValue=state, StateReason="test")


def _rollout(h: Harness) -> None:
    """A wave of one on an Auto Scaling group (replace), then current() and signals(); then an instance refresh
    started, looked at and rolled back: what a rollout calls, in either mode."""
    ids = images(h)
    install_asg_emulation(h.patch)  # console readiness, Auto Scaling's asynchronous termination, LT inheritance
    make_group(h.aws.session, "web-asg", ids["a"], size=2)
    make_group(h.aws.session, "web-refresh", ids["a"], size=2)  # for the instance-refresh mode
    InstanceRefreshEmulation().install(h.patch)
    _alarm(h, "web-5xx", "OK")
    h.begin()
    time = FakeTime()
    fleet = AsgFleet(h.aws.session, REGION, "web-asg", wait=time.wait(), now=time.now)
    member = fleet.current()[0].id
    image_b = Artifact(provider="aws", region=REGION, location=ids["b"], digest="sha256:x", size_bytes=0)
    (new,) = fleet.replace([Replacement(member, "token-1")], image_b, "web@2", Checks())
    assert new.state == "ready"
    assert {m.id for m in fleet.current()} >= {new.id}
    assert {s.kind for s in fleet.signals(datetime(2000, 1, 1, tzinfo=UTC))} == {"launch", "ready", "replaced"}
    assert fleet.alarms_firing(["web-5xx"]) == []
    refreshed = AsgFleet(h.aws.session, REGION, "web-refresh", wait=time.wait(), now=time.now)
    refresh_id = start_refresh(
        refreshed, image_b, "web@2", checkpoints=[50, 100], checkpoint_delay=600, alarms=["web-5xx"], token="r-1"
    )
    assert refresh_status(refreshed, refresh_id).status == "InProgress"
    assert roll_back_refresh(refreshed, refresh_id).status.startswith("Rollback")


def _gc(h: Harness) -> None:
    """Leftovers of one of each kind (a key pair too) from a finished run, planned and removed."""
    ids = images(h)
    install_gc_emulation(h.aws.paging, h.patch)  # DescribeVolumes paging, the snapshot-id image filter
    ec2 = h.ec2()
    tags = [{"Key": "amiforge:managed", "Value": "true"}, {"Key": "amiforge:run", "Value": "gc-run"}]
    spec = [{"ResourceType": "instance", "Tags": tags}]
    instance = ec2.run_instances(ImageId="ami-12345678", MinCount=1, MaxCount=1, TagSpecifications=spec)
    leftover = ec2.create_image(
        InstanceId=instance["Instances"][0]["InstanceId"],
        Name="gc-leftover",
        TagSpecifications=[{"ResourceType": "image", "Tags": tags}],
    )["ImageId"]
    image_snapshot = ec2.describe_images(ImageIds=[leftover])["Images"][0]["BlockDeviceMappings"][0]["Ebs"]
    ec2.create_tags(Resources=[image_snapshot["SnapshotId"]], Tags=tags)
    volume = ec2.create_volume(Size=1, AvailabilityZone=f"{REGION}a")["VolumeId"]
    ec2.create_snapshot(VolumeId=volume, TagSpecifications=[{"ResourceType": "snapshot", "Tags": tags}])
    ec2.create_volume(
        Size=1, AvailabilityZone=f"{REGION}a", TagSpecifications=[{"ResourceType": "volume", "Tags": tags}]
    )
    ec2.import_key_pair(  # the SSH communicator's throw-away key, as a killed bake leaves it
        KeyName="amiforge-gc-run-builder",
        PublicKeyMaterial=new_key_pair("amiforge-gc-run-builder")[1].encode(),
        TagSpecifications=[{"ResourceType": "key-pair", "Tags": tags}],
    )
    h.begin()
    plan = plan_gc(
        h.aws.session,
        REGION,
        registered_images=set(ids.values()),
        run_state=lambda run: "finished" if run == "gc-run" else "unknown",
        now=datetime(2100, 1, 1, tzinfo=UTC),  # everything is old enough
    )
    assert sorted(o.kind for o in plan.orphans) == ["image", "instance", "key-pair", "snapshot", "snapshot", "volume"]
    assert apply_gc(h.aws.session, plan).ok


def _doctor(h: Harness) -> None:
    """`amiforge doctor --aws --recipe`, for two recipes that between them reach every check (public sharing and
    encrypted shares exclude each other), as test_doctor.py's own exactness test does."""
    emulation = DoctorEmulation(h.patch)
    copy_region, receiver = "eu-central-1", "111122223333"
    for region in (REGION, copy_region):
        internet_for_default_vpc(h.ec2(region))
    emulation.public_access.state[(ACCOUNT, REGION)] = "unblocked"
    h.ec2(copy_region).enable_ebs_encryption_by_default()
    kms = h.aws.session.client("kms", copy_region)
    key = str(kms.create_key(Description="ebs")["KeyMetadata"]["Arn"])
    owner = {
        "Effect": "Allow",
        "Principal": {"AWS": f"arn:aws:iam::{ACCOUNT}:root"},
        "Action": "kms:*",
        "Resource": "*",
    }
    receivers = {
        "Effect": "Allow",
        "Principal": {"AWS": f"arn:aws:iam::{receiver}:root"},
        "Action": list(SHARE_ACTIONS),
        "Resource": "*",
    }
    policy = json.dumps({"Version": "2012-10-17", "Statement": [owner, receivers]})
    kms.put_key_policy(KeyId=key.rsplit("/", 1)[1], PolicyName="default", Policy=policy)
    vpc = h.ec2().describe_vpcs(Filters=[{"Name": "isDefault", "Values": ["true"]}])["Vpcs"][0]["VpcId"]
    subnet = h.ec2().create_subnet(VpcId=vpc, CidrBlock="172.31.200.0/24")["Subnet"]["SubnetId"]
    base = {"type": "aws", "region": REGION, "source": {"owners": ["amazon"], "name": "debian-12-*"}}
    public = AwsSpec.model_validate({**base, "distribution": {"regions": [{"region": copy_region}], "public": True}})
    shared = AwsSpec.model_validate(
        {
            **base,
            "subnet_id": subnet,
            "distribution": {"regions": [{"region": copy_region, "kms_key": key}], "accounts": [receiver]},
        }
    )
    h.begin()
    provider = h.provider()
    for spec in (public, shared):
        report = provider.account_report(REGION, spec)
        assert report.account == ACCOUNT and REGION in report.regions


# Every declared operation, and how to run it. test_iam.py fails for an operation without a runner.
RUNNERS: dict[str, Callable[[Harness], None]] = {
    "resolve-source": _resolve,
    "inventory": _inventory,
    "bake": _bake,
    "boot-test": _boot_test,
    "scan": _scan,
    "import": _import,
    "sign-kms": _sign,
    "verify-kms": _verify,
    "distribute": _distribute,
    "publish": _publish,
    "rollout": _rollout,
    "gc": _gc,
    "doctor": _doctor,
}
