"""bake_on_ec2 / boot_test_on_ec2 under moto, with a FakeMachine standing in for SSM Run Command (moto's SendCommand
runs nothing), and SsmMachine itself against moto's SSM (chunking, polling) and an emulated console."""

from __future__ import annotations

import base64
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
from botocore.awsrequest import AWSResponse
from conftest import REGION, Aws
from fake_machine import Clock, FakeMachine, factory

from amiforge.errors import InfraError
from amiforge.model import RemovedFile
from amiforge.providers.aws.bake import AmiBuild, bake_on_ec2, boot_test_on_ec2
from amiforge.providers.aws.images import SourceImage
from amiforge.providers.aws.machine import MAX_COMMAND_CHARS, CommandResult, SsmMachine
from amiforge.providers.interface import Cleanups, RunContext
from amiforge.recipe import Recipe, parse_recipe
from amiforge.waiting import Wait

SOURCE = SourceImage("ami-0123456789abcdef0", "debian-12", "136693071363", datetime(2024, 5, 1, tzinfo=UTC), None)
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


def context(stack: Cleanups, lines: list[str] | None = None) -> RunContext:
    return RunContext(run_id="run42", cleanup=stack, log=(lines.append if lines is not None else lambda _l: None))


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


def bake(aws: Aws, recipe: Recipe, machine: FakeMachine, stack: Cleanups, clock: Clock) -> AmiBuild:
    return bake_on_ec2(
        recipe,
        SOURCE,
        aws.session,
        context(stack),
        machine_factory=factory(machine),
        wait=wait(clock),
        tag_snapshots_at_creation=False,  # moto: NotImplementedError for ResourceType=snapshot in CreateImage
    )


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
    assert machine.files["/run/amiforge/file"] == b"web tier\n"
    assert b"AMIFORGE-READY" in machine.files["/usr/local/lib/amiforge/ready"]

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


def test_boot_test_reads_ready_marker_and_runs_checks(aws: Aws, recipe: Recipe, clock: Clock) -> None:
    machine = FakeMachine(consoles=["", "[  OK  ] Reached target\n", "Booting\nAMIFORGE-READY 12.34\n"])
    requests = record_run_instances(aws)
    with Cleanups() as stack:
        report = boot_test_on_ec2(
            "ami-0123456789abcdef0",
            recipe.checks,
            aws.session,
            context(stack),
            machine_factory=factory(machine),
            wait=wait(clock),
        )
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


def test_boot_test_never_ready_is_a_failed_report(aws: Aws, recipe: Recipe, clock: Clock) -> None:
    machine = FakeMachine(consoles=["still booting"])
    with Cleanups() as stack:
        report = boot_test_on_ec2(
            "ami-0123456789abcdef0",
            recipe.checks,
            aws.session,
            context(stack),
            machine_factory=factory(machine),
            wait=Wait(first_delay=1.0, max_delay=15.0, deadline=120.0, sleep=clock.sleep, clock=clock),
        )
    assert not report.passed and report.time_to_ready is None
    assert [c.kind for c in report.checks] == ["ready"]
    assert machine.argvs == []
    assert set(instance_states(aws).values()) == {"terminated"}


# --- SsmMachine against moto ----------------------------------------------------------------------------------


def launched(aws: Aws) -> str:
    ec2: Any = aws.ec2()
    return str(ec2.run_instances(ImageId="ami-0123456789abcdef0", MinCount=1, MaxCount=1)["Instances"][0]["InstanceId"])


def test_ssm_machine_run_and_chunked_upload(aws: Aws, clock: Clock) -> None:
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

    sent.clear()
    machine.put_file("/etc/big", b"x" * (MAX_COMMAND_CHARS * 2), 0o600)
    assert len(sent) == 4  # three base64 chunks, then decode-and-rename
    assert all(len(p["Parameters"]["commands"][0]) <= MAX_COMMAND_CHARS for p in sent)
    assert "chmod 600" in sent[-1]["Parameters"]["commands"][0]

    sent.clear()
    machine.run(["sh", "-c", "y" * MAX_COMMAND_CHARS], timeout=60)  # too long for one command: staged, then run
    assert len(sent) >= 3 and sent[-1]["Parameters"]["commands"][0].startswith("/bin/sh /run/amiforge/cmd-")


def test_ssm_machine_console_emulated(aws: Aws) -> None:
    """moto's console is fixed text; a before-call handler answers as EC2 does (base64, decoded by botocore)."""

    def console(**_: Any) -> tuple[AWSResponse, dict[str, Any]]:
        text = base64.b64encode(b"Booting\nAMIFORGE-READY 7.5\n").decode()
        return AWSResponse("https://ec2.invalid/", 200, {}, None), {"InstanceId": "i-x", "Output": text}

    # Before any ec2 client exists: a client copies the session's handlers when it is made.
    aws.session.boto_session.events.register("before-call.ec2.GetConsoleOutput", console)
    instance_id = launched(aws)
    assert "AMIFORGE-READY 7.5" in SsmMachine(aws.session, REGION, instance_id).console()
