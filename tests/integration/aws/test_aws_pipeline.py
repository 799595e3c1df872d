"""The AWS provider end to end through the CLI, on moto: bake → test → scan → sign → distribute → promote (publish),
resume of an interrupted distribution, verification of copies, and `import packer`.

SSM Run Command is a FakeMachine (moto runs nothing); the scan reads the image's root snapshot through the EBS direct
APIs, which the EbsEmulation serves from a real ext4 file system made here (moto's CreateImage snapshots are empty).
"""

from __future__ import annotations

import json
import subprocess
from collections import Counter
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from asg_emulation import FakeTime
from conftest import ACCOUNT, REGION, Aws
from distribute_fixtures import CopyImageEmulation, DeregistrationProtection
from ebs_emulation import EbsEmulation
from fake_machine import DPKG, READY, Clock, FakeMachine, console_of, factory
from moto.ec2.models import ec2_backends
from moto_emulation import shared_images
from ssm_emulation import SsmImageValidation

import amiforge.providers
from amiforge.awsapi.clients import AwsSession
from amiforge.providers.aws import distribute as distribute_module
from amiforge.providers.aws.machine import CommandResult
from amiforge.providers.aws.provider import AwsProvider
from amiforge.settings import Settings
from amiforge.waiting import Wait
from tests.cli_harness import Cli, make_cli
from tests.conftest import DEBIAN_12_OS_RELEASE, synthetic_osv

COPY_REGION = "us-east-1"
SHARE_ACCOUNT = "111122223333"
RECIPE = f"""\
name: web
provider:
  type: aws
  region: {REGION}
  source: {{owners: [self], name: "debian-12-amd64-*"}}
  distribution:
    regions: [{{region: {COPY_REGION}}}]
    accounts: ["{SHARE_ACCOUNT}"]
  publish: {{parameter_prefix: /amiforge}}
steps:
  - shell: echo web > /etc/motd
checks:
  units: [nginx]
"""


@pytest.fixture
def ebs(monkeypatch: pytest.MonkeyPatch) -> EbsEmulation:
    emulation = EbsEmulation()
    emulation.install(monkeypatch)
    return emulation


@pytest.fixture
def disk(tmp_path: Path) -> Path:
    """A real ext4 root file system with a dpkg database: what the baked image's snapshot holds."""
    tree = tmp_path / "tree"
    (tree / "var/lib/dpkg").mkdir(parents=True)
    (tree / "var/lib/dpkg/status").write_text(DPKG)
    (tree / "etc").mkdir()
    (tree / "etc/motd").write_text("web\n")
    (tree / "etc/os-release").write_text(DEBIAN_12_OS_RELEASE)
    raw = tmp_path / "root.raw"
    subprocess.run(["mkfs.ext4", "-q", "-F", "-d", str(tree), "-L", "root", str(raw), "16M"], check=True)
    return raw


class Env:
    """A registry in tmp, the CLI in-process, and the aws provider on moto with a fake SSM machine."""

    def __init__(self, aws: Aws, ebs: EbsEmulation, disk: Path, tmp: Path, cli: Cli) -> None:
        self.aws, self.ebs, self.disk, self.cli = aws, ebs, disk, cli
        self.machine = FakeMachine(consoles=[READY])
        self.fleet_time = FakeTime()
        self.clock = Clock()  # every other wait of the provider: bake, boot test, copies, SSM's validation
        self.ssm: SsmImageValidation | None = None
        self.recipe = tmp / "recipe.yaml"
        self.recipe.write_text(RECIPE)
        self.ec2: Any = aws.ec2()
        instance = self.ec2.run_instances(ImageId="ami-12345678", MinCount=1, MaxCount=1)["Instances"][0]
        self.source = self.ec2.create_image(InstanceId=instance["InstanceId"], Name="debian-12-amd64-20240501")

    def provider(self, settings: Settings) -> AwsProvider:
        fast = Wait(first_delay=1.0, max_delay=5.0, deadline=600.0, sleep=self.clock.sleep, clock=self.clock)
        return AwsProvider(
            settings,
            boto_session=self.aws.session.boto_session,
            machine_factory=factory(self.machine),
            console_reader=console_of(self.machine),
            wait=fast,
            boot_wait=fast,
            tag_snapshots_at_creation=False,  # moto: NotImplementedError for snapshot TagSpecifications
            fleet_wait=self.fleet_time.wait(),
            fleet_now=self.fleet_time.now,  # the fleet's readiness deadlines move with its (fake) sleeps
            publish_wait=fast,
            copy_wait=fast,
        )

    def seed_root(self, image_id: str) -> None:
        """Give the baked image's root snapshot the bytes of `disk` (moto's CreateImage makes an empty one)."""
        image = self.ec2.describe_images(ImageIds=[image_id])["Images"][0]
        root = next(m for m in image["BlockDeviceMappings"] if m["DeviceName"] == image["RootDeviceName"])
        self.ebs.seed(self.disk, root["Ebs"]["SnapshotId"], REGION)

    def images(self, region: str) -> list[dict[str, Any]]:
        ec2: Any = self.aws.ec2(region)
        return list(ec2.describe_images(Owners=["self"])["Images"])


@pytest.fixture
def env(
    aws: Aws,
    ebs: EbsEmulation,
    disk: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> Env:
    return _environment(aws, ebs, disk, tmp_path, monkeypatch, capsys)


@pytest.fixture(params=["aws", "faulty"])
def clean_or_faulty(
    request: pytest.FixtureRequest,
    ebs: EbsEmulation,
    disk: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> Env:
    """The same environment, and the same with 30 % of sends throttled and NotFound right after each create."""
    aws: Aws = request.getfixturevalue(request.param)
    # Ten attempts, as the `faulty` session has: at 30 % the chance that one call exhausts them is 6e-6.
    monkeypatch.setenv("AMIFORGE_AWS_MAX_ATTEMPTS", "10")
    return _environment(aws, ebs, disk, tmp_path, monkeypatch, capsys)


def _environment(
    aws: Aws,
    ebs: EbsEmulation,
    disk: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> Env:
    monkeypatch.setenv("AMIFORGE_DATA_DIR", str(tmp_path / "data"))
    monkeypatch.delenv("AMIFORGE_STORE_URL", raising=False)
    monkeypatch.delenv("AMIFORGE_CONFIG", raising=False)
    monkeypatch.chdir(tmp_path)  # no amiforge.toml here
    # What moto lacks for distribute: CopyImage's ClientToken/TagSpecifications, deregistration protection.
    CopyImageEmulation().install(monkeypatch)
    DeregistrationProtection().install(aws.session.boto_session.events)
    # …and for promote: SSM validates an aws:ec2:image parameter asynchronously, as on AWS.
    validation = SsmImageValidation()
    validation.install(monkeypatch)
    environment = Env(aws, ebs, disk, tmp_path, make_cli(monkeypatch, capsys))
    environment.ssm = validation
    monkeypatch.setattr(amiforge.providers, "PROVIDERS", {**amiforge.providers.PROVIDERS, "aws": environment.provider})
    imported = environment.cli("vulndb", "import", str(synthetic_osv(tmp_path / "osv")))  # gates need some data
    assert imported.code == 0, imported.err
    return environment


def bake_to_signed(env: Env, number: int = 1) -> dict[str, Any]:
    ref = f"web@{number}"
    baked = env.cli("bake", str(env.recipe), "--json")
    assert baked.code == 0, baked.err
    version = baked.json()["version"]
    assert (
        (version["name"], version["number"]) == ("web", number)
        and version["status"] == "tested"
        and version["provider"] == "aws"
    )
    assert baked.json()["boot_report"]["time_to_ready"] == 11.25
    shown = env.cli("images", "show", ref, "--json").json()
    (artifact,) = shown["artifacts"]
    env.seed_root(artifact["location"])
    scanned = env.cli("scan", ref, "--json")
    assert scanned.code == 0, scanned.err
    assert scanned.json()["packages"] == 1  # read from the snapshot's bytes, not from the builder
    sbom = env.cli("sbom", ref).json()
    assert [c["name"] for c in sbom["components"]] == ["nginx"]
    if number == 1:
        assert env.cli("keys", "generate").code == 0
    signed = env.cli("sign", ref, "--json")
    assert signed.code == 0, signed.err
    return dict(artifact)


def test_bake_to_publish_on_moto(clean_or_faulty: Env) -> None:
    """The end state is the same with faults as without: every assertion below holds for both."""
    env = clean_or_faulty
    artifact = bake_to_signed(env)
    assert artifact["region"] == REGION and artifact["location"].startswith("ami-")
    # The builder and the boot-test instance are gone; the image is tagged as ours.
    (image,) = [i for i in env.images(REGION) if i["ImageId"] == artifact["location"]]
    assert {t["Key"]: t["Value"] for t in image["Tags"]}["amiforge:managed"] == "true"

    slept = len(env.clock.sleeps)
    distributed = env.cli("distribute", "web@1", "--json")
    assert distributed.code == 0, distributed.err
    assert len(env.clock.sleeps) > slept  # the copy was pending a while: the provider's clock waited, not time.sleep
    (copy,) = distributed.json()["copies"]
    assert copy["artifact"]["region"] == COPY_REGION and copy["shared_with"] == [SHARE_ACCOUNT]
    assert [i["ImageId"] for i in env.images(COPY_REGION)] == [copy["artifact"]["location"]]

    # The copy is not in the signed manifest, but it is a recorded copy of an artifact that is: still verifies.
    assert env.cli("verify", "web@1").code == 0

    slept = len(env.clock.sleeps)
    promoted = env.cli("promote", "web@1", "--channel", "dev", "--json")
    assert promoted.code == 0, promoted.err
    # SSM took each region's image only after a few reads: the publication waited for it on the provider's clock.
    assert env.ssm is not None and [e["operation"] for e in env.ssm.events] == ["Create", "Create"]
    assert len(env.clock.sleeps) > slept
    published = {r["region"]: r for r in promoted.json()["published"]}
    assert set(published) == {REGION, COPY_REGION}
    for region, expected in ((REGION, artifact["location"]), (COPY_REGION, copy["artifact"]["location"])):
        ssm: Any = env.aws.session.client("ssm", region)
        value = ssm.get_parameter(Name="/amiforge/web/dev")["Parameter"]["Value"]
        assert value == expected == published[region]["image_id"]
    events = [e["kind"] for e in env.cli("events", "web@1", "--json").json()]
    assert "distribute.completed" in events and "publish" in events

    # Rerunning converges: the copy is adopted (no second image), the parameter is not written again.
    again = env.cli("distribute", "web@1", "--json")
    assert again.code == 0 and again.json()["copies"][0]["adopted"] is True
    assert len(env.images(COPY_REGION)) == 1
    repeat = env.cli("promote", "web@1", "--channel", "dev", "--json").json()
    assert repeat["moved"] is False and all(r["changed"] is False for r in repeat["published"])
    # Nothing left running: the builder and the boot-test instance were terminated.
    ours = [
        i.state
        for r in ec2_backends[ACCOUNT][REGION].reservations.values()
        for i in r.instances
        if i.get_tags() and {t["key"] for t in i.get_tags()} >= {"amiforge:managed", "amiforge:run"}
    ]
    assert len(ours) == 2 and all(state in ("shutting-down", "terminated") for state in ours), ours
    if env.aws.faults is not None:
        assert env.aws.faults.injected["RequestLimitExceeded"] > 10  # the faults really happened


def test_debian_source_over_ssh_for_the_builders_architecture(env: Env) -> None:
    """A Debian source (no SSM agent) through the CLI: `communicator: ssh` gives the builder and the boot-test instance
    a throw-away key pair each (deleted after), and `debian-12-*` resolves to the newest image the recipe's x86
    instance type runs, though a newer arm64 one matches the name."""
    ec2: Any = env.ec2
    group = ec2.create_security_group(GroupName="ssh-from-build-host", Description="tcp 22")["GroupId"]
    instance = ec2.run_instances(ImageId="ami-12345678", MinCount=1, MaxCount=1)["Instances"][0]["InstanceId"]
    arm = ec2.create_image(InstanceId=instance, Name="debian-12-arm64-20240601")["ImageId"]
    ec2_backends[ACCOUNT][REGION].amis[arm].architecture = "arm64"  # moto's CreateImage is always x86_64
    env.recipe.write_text(
        RECIPE.replace('"debian-12-amd64-*"', '"debian-12-*"').replace(
            "  publish:", f"  communicator: ssh\n  security_group_ids: [{group}]\n  publish:"
        )
    )
    launched: list[dict[str, Any]] = []
    imported: list[str] = []
    events = env.aws.session.boto_session.events
    events.register("provide-client-params.ec2.RunInstances", lambda params, **_: launched.append(params))
    events.register("provide-client-params.ec2.ImportKeyPair", lambda params, **_: imported.append(params["KeyName"]))

    baked = env.cli("bake", str(env.recipe), "--json")
    assert baked.code == 0, baked.err
    builder, tester = launched
    assert builder["ImageId"] == env.source["ImageId"] != arm
    assert [builder["KeyName"], tester["KeyName"]] == imported and len(set(imported)) == 2
    assert all(r["NetworkInterfaces"][0]["Groups"] == [group] for r in launched)
    assert ec2.describe_key_pairs()["KeyPairs"] == []


def test_interrupted_distribution_resumes_with_the_same_run(env: Env, monkeypatch: pytest.MonkeyPatch) -> None:
    bake_to_signed(env)
    real_protect = distribute_module.protect
    calls = []

    def interrupted_once(client: Any, image_id: str, *, cooldown: bool = False) -> None:
        calls.append(image_id)
        if len(calls) == 1:
            raise KeyboardInterrupt  # Ctrl-C after the copy exists, before it is protected and recorded
        real_protect(client, image_id, cooldown=cooldown)

    monkeypatch.setattr(distribute_module, "protect", interrupted_once)
    first = env.cli("distribute", "web@1")
    assert first.code == 130
    assert len(env.images(COPY_REGION)) == 1  # the copy was made…
    shown = env.cli("images", "show", "web@1", "--json").json()
    assert [a["region"] for a in shown["artifacts"]] == [REGION]  # …but not recorded as done

    second = env.cli("distribute", "web@1", "--json")
    assert second.code == 0, second.err
    assert second.json()["copies"][0]["adopted"] is True
    assert len(env.images(COPY_REGION)) == 1  # adopted, not copied twice
    events = env.cli("events", "web@1", "--json").json()
    runs = {e["data"]["run"] for e in events if e["kind"].startswith("distribute.")}
    assert len(runs) == 1 and {"distribute.failed", "distribute.completed"} <= {e["kind"] for e in events}


def test_distribute_refuses_an_unsigned_version(env: Env) -> None:
    assert env.cli("bake", str(env.recipe), "--json").code == 0
    refused = env.cli("distribute", "web@1")
    assert refused.code == 3 and "only signed versions can be distributed" in refused.err
    assert env.images(COPY_REGION) == []


def test_a_copy_nobody_recorded_fails_verification(env: Env) -> None:
    artifact = bake_to_signed(env)
    # An AMI slipped into the registry as an artifact of web@1 outside of distribute: not signed, not a copy.
    from amiforge.model import Artifact
    from amiforge.store.sql import open_store

    store = open_store(Settings().registry_url)
    version = store.get_version("web@1")
    ec2: Any = env.aws.ec2(COPY_REGION)
    stray = ec2.copy_image(SourceImageId=artifact["location"], SourceRegion=REGION, Name="stray")["ImageId"]
    store.add_artifact(version.id, Artifact("aws", COPY_REGION, stray, "0" * 64, 0))
    refused = env.cli("verify", "web@1")
    assert refused.code == 4 and stray in refused.err


def test_import_packer_manifest(env: Env, tmp_path: Path) -> None:
    instance = env.ec2.run_instances(ImageId="ami-12345678", MinCount=1, MaxCount=1)["Instances"][0]
    packer_image = env.ec2.create_image(InstanceId=instance["InstanceId"], Name="web-packer-1")["ImageId"]
    manifest = tmp_path / "packer-manifest.json"
    build = {
        "name": "amazon-ebs.web",
        "builder_type": "amazon-ebs",
        "build_time": 1700000000,
        "files": None,
        "artifact_id": f"{REGION}:{packer_image}",
        "packer_run_uuid": "00000000-0000-0000-0000-000000000001",
        "custom_data": {},
    }
    manifest.write_text(json.dumps({"builds": [build], "last_run_uuid": build["packer_run_uuid"]}))
    imported = env.cli("import", "packer", str(manifest), "--recipe", str(env.recipe), "--json")
    assert imported.code == 0, imported.err
    body = imported.json()
    assert body["created"] is True and body["version"]["status"] == "built"
    assert [a["location"] for a in body["artifacts"]] == [packer_image]
    again = env.cli("import", "packer", str(manifest), "--recipe", str(env.recipe), "--json").json()
    assert again["created"] is False and again["version"]["number"] == body["version"]["number"] == 1
    # The imported version goes through the usual gates: a boot test on EC2 first.
    tested = env.cli("test", "web@1", "--json")
    assert tested.code == 0, tested.err
    assert tested.json()["version"]["status"] == "tested"


def test_import_packer_bad_manifest_names_the_entry(env: Env, tmp_path: Path) -> None:
    manifest = tmp_path / "m.json"
    manifest.write_text(json.dumps({"builds": [{"builder_type": "amazon-ebs", "artifact_id": "ami-123"}]}))
    refused = env.cli("import", "packer", str(manifest), "--recipe", str(env.recipe))
    assert refused.code == 2 and "builds[0].artifact_id" in refused.err


def test_import_of_a_missing_image_registers_nothing(env: Env, tmp_path: Path) -> None:
    before = ec2_backends[ACCOUNT][REGION].amis.keys() - set()
    manifest = tmp_path / "m.json"
    build = {"name": "x", "builder_type": "amazon-ebs", "artifact_id": f"{REGION}:ami-00000000000000001"}
    manifest.write_text(json.dumps({"builds": [build]}))
    refused = env.cli("import", "packer", str(manifest), "--recipe", str(env.recipe))
    assert refused.code == 3 and "ami-00000000000000001" in refused.err
    assert env.cli("images", "list", "--json").json() == []
    assert ec2_backends[ACCOUNT][REGION].amis.keys() == before


def test_gc_finds_what_a_failed_bake_left_and_removes_it_only_with_apply(
    env: Env, monkeypatch: pytest.MonkeyPatch
) -> None:
    from gc_fixtures import install_gc_emulation

    from amiforge.errors import InfraError
    from amiforge.providers.aws import instances

    install_gc_emulation(env.aws.paging, monkeypatch)
    assert env.cli("bake", str(env.recipe), "--json").code == 0  # web@1: its image is registered, never collected

    def refuse(*_args: object) -> None:
        raise InfraError("TerminateInstances refused (injected)")

    monkeypatch.setattr(instances, "terminate", refuse)
    env.machine.respond = lambda _script: CommandResult(1, "", "step failed (injected)")
    failed = env.cli("bake", str(env.recipe))
    assert failed.code == 5  # web@2 fails, and its builder cannot be terminated: the error says what was left
    assert (
        "left behind: EC2 instance (builder)" in failed.err and f"amiforge gc --region {REGION} --apply" in failed.err
    )
    events = env.cli("events", "web@2", "--json").json()
    (orphaned,) = [e for e in events if e["kind"] == "orphaned"]
    backend = ec2_backends[ACCOUNT][REGION]
    for reservation in backend.reservations.values():  # everything launched so far is two hours old
        for instance in reservation.instances:
            instance.launch_time = datetime.now(UTC) - timedelta(hours=2)
    for image in backend.amis.values():
        image.creation_date = datetime.now(UTC) - timedelta(hours=2)

    plan = env.cli("gc", "--region", REGION, "--json")
    assert plan.code == 0, plan.err
    (region_plan,) = plan.json()["plans"]
    (orphan,) = region_plan["orphans"]
    assert orphan["kind"] == "instance" and orphan["run_id"] == orphaned["data"]["run"]
    assert plan.json()["applied"] is False
    running = [i for r in backend.reservations.values() for i in r.instances if i.id == orphan["id"]]
    assert running[0].state == "running"  # the plan changed nothing

    applied = env.cli("gc", "--region", REGION, "--apply", "--json")
    assert applied.code == 0, applied.err
    assert [o["outcome"] for o in applied.json()["results"][0]["outcomes"]] == ["deleted"]
    assert running[0].state in ("shutting-down", "terminated")
    shown = env.cli("images", "show", "web@1", "--json").json()
    assert env.ec2.describe_images(ImageIds=[shown["artifacts"][0]["location"]])["Images"]  # still there
    assert env.cli("gc", "--region", REGION, "--json").json()["plans"][0]["orphans"] == []


def test_gc_blast_radius_and_unknown_regions(env: Env) -> None:
    # An empty registry knows no AWS region: gc looks only at this machine (and never guesses a region).
    local = env.cli("gc", "--json")
    assert local.code == 0, local.err
    assert [p["region"] for p in local.json()["plans"]] == ["local"]
    bad = env.cli("gc", "--region", "eu-west-1/../x", "--json")
    assert bad.code == 2 and bad.json()["message"] == "--region 'eu-west-1/../x' is not an AWS region name"
    refused = env.cli("gc", "--region", REGION, "--min-age", "soon")
    assert refused.code == 2 and "soon" in refused.err


def test_promote_publishes_in_consumer_accounts_through_their_roles(env: Env, monkeypatch: pytest.MonkeyPatch) -> None:
    shared_images(monkeypatch)
    role = f"arn:aws:iam::{SHARE_ACCOUNT}:role/amiforge-publisher"
    monkeypatch.setenv("AMIFORGE_AWS_ROLES", json.dumps({SHARE_ACCOUNT: role}))
    env.recipe.write_text(
        RECIPE.replace("publish: {parameter_prefix: /amiforge}", f'publish: {{accounts: ["{SHARE_ACCOUNT}"]}}')
    )
    artifact = bake_to_signed(env)
    assert env.cli("distribute", "web@1").code == 0  # shares the source and the copy with the consumer account
    promoted = env.cli("promote", "web@1", "--channel", "dev", "--json")
    assert promoted.code == 0, promoted.err
    records = promoted.json()["published"]
    assert len(records) == 4 and {(r["region"], r["account"]) for r in records} == {
        (region, account) for region in (REGION, COPY_REGION) for account in (None, SHARE_ACCOUNT)
    }
    consumer = AwsSession(REGION, role_arns={SHARE_ACCOUNT: role}, boto_session=env.aws.session.boto_session)
    theirs: Any = consumer.as_account(SHARE_ACCOUNT).client("ssm", REGION)
    assert theirs.get_parameter(Name="/amiforge/web/dev")["Parameter"]["Value"] == artifact["location"]


def test_a_publication_that_fails_in_a_later_region_records_the_ones_before(env: Env) -> None:
    """The recipe's launch template exists in the bake region only: promote publishes there, then fails in the copy's
    region. What happened is recorded (a publish event with the first region's record, what it replaced included),
    then publish.failed, and the command fails as the failure itself (NotFound: exit 3). The rerun converges."""
    env.recipe.write_text(
        RECIPE.replace("publish: {parameter_prefix: /amiforge}", "publish: {launch_template: web-fleet}")
    )
    artifact = bake_to_signed(env)
    assert env.cli("distribute", "web@1").code == 0
    env.ec2.create_launch_template(LaunchTemplateName="web-fleet", LaunchTemplateData={"ImageId": artifact["location"]})

    failed = env.cli("promote", "web@1", "--channel", "dev")
    assert failed.code == 3, failed.err
    assert "web-fleet" in failed.err and COPY_REGION in failed.err and "rerun the promote" in failed.err
    events = [e for e in env.cli("events", "web@1", "--json").json() if e["kind"].startswith("publish")]
    assert [e["kind"] for e in events] == ["publish", "publish.failed"]
    done, failure = events[0]["data"], events[1]["data"]
    assert done["incomplete"] is True and done["run"] == failure["run"] and "web-fleet" in failure["error"]
    (record,) = done["records"]
    assert (record["region"], record["image_id"], record["previous_image_id"]) == (REGION, artifact["location"], None)
    assert (record["launch_template"], record["launch_template_version"], record["previous_lt_version"]) == (
        "web-fleet",
        1,
        None,
    )  # the template's default already held the image

    copy_ec2: Any = env.aws.ec2(COPY_REGION)
    (copy,) = env.images(COPY_REGION)
    copy_ec2.create_launch_template(LaunchTemplateName="web-fleet", LaunchTemplateData={"ImageId": copy["ImageId"]})
    again = env.cli("promote", "web@1", "--channel", "dev", "--json")
    assert again.code == 0, again.err
    assert {r["region"]: r["changed"] for r in again.json()["published"]} == {REGION: False, COPY_REGION: True}


def test_publishing_for_an_account_without_a_role_says_how_to_configure_it(env: Env) -> None:
    env.recipe.write_text(
        RECIPE.replace("publish: {parameter_prefix: /amiforge}", f'publish: {{accounts: ["{SHARE_ACCOUNT}"]}}')
    )
    bake_to_signed(env)
    refused = env.cli("promote", "web@1", "--channel", "dev")
    assert refused.code == 2 and "AMIFORGE_AWS_ROLES" in refused.err and "rerun the promote" in refused.err


def test_rollout_on_an_auto_scaling_group_and_automatic_rollback(env: Env, monkeypatch: pytest.MonkeyPatch) -> None:
    """Through the CLI: web@2 rolls over a 3-instance group in two waves; web@3, whose instances never get ready,
    stops at wave 1 and the group ends entirely on web@2's image again — read from EC2, not from the registry."""
    from asg_emulation import install_asg_emulation, make_group

    emulation = install_asg_emulation(monkeypatch)
    images = {n: bake_to_signed(env, n)["location"] for n in (1, 2)}
    make_group(env.aws.session, "web", images[1], size=3, region=REGION)
    backend: Any = env.aws.session.client("autoscaling", REGION)

    def group_images() -> Counter[str]:
        (group,) = backend.describe_auto_scaling_groups(AutoScalingGroupNames=["web"])["AutoScalingGroups"]
        ids = [i["InstanceId"] for i in group["Instances"] if i["LifecycleState"] == "InService"]
        reservations = env.ec2.describe_instances(InstanceIds=ids)["Reservations"]
        return Counter(i["ImageId"] for r in reservations for i in r["Instances"])

    assert group_images() == Counter({images[1]: 3})
    started = env.cli(
        "rollout", "start", "--target", f"aws:{REGION}/web", "--version", "web@2", "--waves", "1,100%",
        "--bake-time", "0", "--json",
    )  # fmt: skip
    assert started.code == 0, started.err
    body = started.json()
    assert body["rollout"]["state"] == "succeeded" and [d["numbers"]["members"] for d in body["decisions"]] == [1, 2]
    assert group_images() == Counter({images[2]: 3})
    assert {r["old_version"] for r in body["replacements"]} == {"web@1"}  # known from the registry, by AMI

    images[3] = bake_to_signed(env, 3)["location"]
    emulation.console.never_ready.add(images[3])
    failed = env.cli(
        "rollout", "start", "--target", f"aws:{REGION}/web", "--version", "web@3", "--bake-time", "0", "--json"
    )
    assert failed.code == 4, failed.err
    assert group_images() == Counter({images[2]: 3})  # wave 1's instance was put back on web@2
    status = env.cli("rollout", "status", "2", "--json").json()
    assert status["rollout"]["state"] == "failed"
    assert [r["kind"] for r in status["replacements"]] == ["forward", "rollback"]
    incident = env.cli("incident", "web@3", "--json").json()
    assert [r["state"] for r in incident["rollouts"]] == ["failed"]
    assert any(t["kind"] == "rollout.rolled_back" for t in incident["timeline"])


def test_rollout_as_an_instance_refresh_with_gates_at_each_checkpoint(
    env: Env, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """mode: refresh — AWS replaces the instances (checkpoints = the waves); amiforge judges the new ones at each look
    and rolls the refresh back when a gate fails. The controller's sleeps run on the same fake clock as the fleet's."""
    from types import SimpleNamespace

    from asg_emulation import InstanceRefreshEmulation, install_asg_emulation, make_group

    from amiforge.lifecycle import controller as controller_module

    emulation = install_asg_emulation(monkeypatch)
    refreshes = InstanceRefreshEmulation()
    refreshes.install(monkeypatch)
    monkeypatch.setattr(
        controller_module, "time", SimpleNamespace(sleep=env.fleet_time.sleep, monotonic=env.fleet_time.clock)
    )
    images = {n: bake_to_signed(env, n)["location"] for n in (1, 2, 3)}
    make_group(env.aws.session, "web", images[1], size=4, region=REGION)
    strategy = tmp_path / "refresh.yaml"
    strategy.write_text("mode: refresh\nwaves: [25%, 100%]\nbake_time: 120s\ngates: {time_to_ready_p95: 60s}\n")

    def group_images() -> Counter[str]:
        backend: Any = env.aws.session.client("autoscaling", REGION)
        (group,) = backend.describe_auto_scaling_groups(AutoScalingGroupNames=["web"])["AutoScalingGroups"]
        ids = [i["InstanceId"] for i in group["Instances"] if i["LifecycleState"] == "InService"]
        reservations = env.ec2.describe_instances(InstanceIds=ids)["Reservations"]
        return Counter(i["ImageId"] for r in reservations for i in r["Instances"])

    target = f"aws:{REGION}/web"
    good = env.cli("rollout", "start", "--target", target, "--version", "web@2", "--strategy", str(strategy), "--json")
    assert good.code == 0, good.err
    body = good.json()
    assert body["rollout"]["state"] == "succeeded" and body["rollout"]["detail"]["checkpoints"] == [25, 100]
    assert [d["wave"] for d in body["decisions"]] == [0, 1] and all(d["passed"] for d in body["decisions"])
    (started,) = refreshes.refreshes
    assert started.preferences["AutoRollback"] is True and started.preferences["CheckpointDelay"] == 120
    assert group_images() == Counter({images[2]: 4})

    emulation.console.never_ready.add(images[3])  # its instances boot but never report ready
    bad = env.cli("rollout", "start", "--target", target, "--version", "web@3", "--strategy", str(strategy), "--json")
    assert bad.code == 4, bad.err
    status = env.cli("rollout", "status", "2", "--json").json()
    assert status["rollout"]["state"] == "failed" and status["decisions"][-1]["action"] == "rollback"
    # Which gate fires first depends on when the poll lands: every instance judged (success rate), or one already
    # failed while another still boots (the burn rate stops the wave before it settles).
    why = json.dumps(status["rollout"]["detail"].get("reasons"))
    assert any(gate in why for gate in ("not ready", "boot success rate", "burn rate")), why
    # AWS had finished before the gate could judge (120 s checkpoints, 390 s readiness grace): rolled forward.
    assert status["rollout"]["detail"]["refresh_status"] == "Successful (rolled forward to web@2)"
    assert group_images() == Counter({images[2]: 4})  # the group is back on web@2's image

    # With checkpoints long enough for the gate (600 s > the grace), the refresh itself is rolled back mid-way.
    strategy.write_text(strategy.read_text().replace("bake_time: 120s", "bake_time: 600s"))
    again = env.cli("rollout", "start", "--target", target, "--version", "web@3", "--strategy", str(strategy), "--json")
    assert again.code == 4, again.err
    status = env.cli("rollout", "status", "3", "--json").json()
    assert status["rollout"]["detail"]["refresh_status"] == "RollbackSuccessful"
    assert group_images() == Counter({images[2]: 4})
