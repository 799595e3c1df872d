"""SsmMachine against SSM Run Command that really runs its shell (runcommand_emulation), its console on Xen and Nitro
instance types, and what a communicator leaves behind (`Leftovers`), whose script runs here on temporary folders."""

from __future__ import annotations

import gzip
import math
import os
import random
import re
import shutil
import stat
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from botocore.exceptions import ClientError
from conftest import ACCOUNT, REGION, Aws
from fake_machine import Clock
from moto_emulation import no_backoff
from runcommand_emulation import STDERR_LIMIT, STDOUT_LIMIT, RunCommandEmulation, XenConsole

from amiforge.errors import ConfigError, InfraError, NotFound
from amiforge.providers.aws import machine as machine_module
from amiforge.providers.aws.machine import (
    MAX_COMMAND_CHARS,
    READ_SLICE,
    CommandResult,
    ConsoleReader,
    Leftovers,
    SsmMachine,
    scrub_unit,
)

INSTANCE = "i-0000000000test01"


@pytest.fixture
def stage(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """STAGE on this host, where the emulation runs the machine's shell."""
    folder = tmp_path / "stage"
    monkeypatch.setattr(machine_module, "STAGE", str(folder))
    return folder


@pytest.fixture
def ssm(aws: Aws, monkeypatch: pytest.MonkeyPatch) -> RunCommandEmulation:
    no_backoff(monkeypatch)  # a lost answer is retried by botocore at once
    emulation = RunCommandEmulation({INSTANCE})
    emulation.install(aws.session.boto_session.events)
    return emulation


@pytest.fixture
def machine(aws: Aws, ssm: RunCommandEmulation, stage: Path) -> SsmMachine:
    clock = Clock()
    return SsmMachine(aws.session, REGION, INSTANCE, sleep=clock.sleep, clock=clock)


def leftovers_in(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir()) if folder.exists() else []


# --- the emulation refuses what SSM refuses -------------------------------------------------------------------


def test_emulation_refuses_what_ssm_refuses(aws: Aws, ssm: RunCommandEmulation) -> None:
    client: Any = aws.session.boto_session.client("ssm", region_name=REGION)
    run = {"DocumentName": "AWS-RunShellScript", "Parameters": {"commands": ["true"]}}
    with pytest.raises(ClientError, match="InvalidInstanceId"):
        client.send_command(InstanceIds=["i-0000000000nothere"], **run)
    with pytest.raises(ClientError, match="InvalidDocument"):
        client.send_command(InstanceIds=[INSTANCE], DocumentName="AWS-NoSuchDocument", Parameters={})
    with pytest.raises(ClientError, match="InvocationDoesNotExist"):
        client.get_command_invocation(CommandId="00000000-0000-0000-0000-000000000000", InstanceId=INSTANCE)
    command_id = client.send_command(InstanceIds=[INSTANCE], **run)["Command"]["CommandId"]
    with pytest.raises(ClientError, match="InvocationDoesNotExist"):  # right after SendCommand: not yet
        client.get_command_invocation(CommandId=command_id, InstanceId=INSTANCE)
    with pytest.raises(ClientError, match="InvocationDoesNotExist"):  # another instance's invocation: none
        client.get_command_invocation(CommandId=command_id, InstanceId="i-0000000000test02")
    assert client.get_command_invocation(CommandId=command_id, InstanceId=INSTANCE)["Status"] == "InProgress"
    assert client.get_command_invocation(CommandId=command_id, InstanceId=INSTANCE)["Status"] == "Success"


def test_emulation_cuts_output_as_ssm_does(aws: Aws, ssm: RunCommandEmulation) -> None:
    client: Any = aws.session.boto_session.client("ssm", region_name=REGION)
    ssm.lag = ssm.in_progress = 0
    loud = "head -c 30000 /dev/zero | tr '\\0' o; head -c 9000 /dev/zero | tr '\\0' e >&2; exit 4"
    command_id = client.send_command(
        InstanceIds=[INSTANCE], DocumentName="AWS-RunShellScript", Parameters={"commands": [loud]}
    )["Command"]["CommandId"]
    answer = client.get_command_invocation(CommandId=command_id, InstanceId=INSTANCE)
    assert (answer["Status"], answer["StatusDetails"], answer["ResponseCode"]) == ("Failed", "Failed", 4)
    assert answer["StandardOutputContent"] == "o" * STDOUT_LIMIT
    assert answer["StandardErrorContent"] == "e" * STDERR_LIMIT


# --- commands ---------------------------------------------------------------------------------------------------


def test_run_returns_exit_code_and_output(machine: SsmMachine, ssm: RunCommandEmulation) -> None:
    result = machine.run(["sh", "-c", 'echo "out $1"; echo err >&2; exit 3', "sh", "a b"], timeout=60)
    assert result == CommandResult(3, "out a b\n", "err\n")
    assert ssm.sends == 1


def test_a_command_too_long_for_one_send_is_staged_and_run(
    machine: SsmMachine, ssm: RunCommandEmulation, stage: Path
) -> None:
    text = "y" * MAX_COMMAND_CHARS
    result = machine.run(["sh", "-c", 'printf %s "$1" | wc -c', "sh", text], timeout=60)
    assert result.exit_code == 0 and result.stdout.strip() == str(len(text))
    assert ssm.sends >= 3  # the script in parts, its installation, then the run
    assert leftovers_in(stage) == []


def test_a_command_that_outlives_its_timeout_is_an_error(machine: SsmMachine) -> None:
    with pytest.raises(InfraError, match="did not finish within its 1s") as caught:
        machine.run(["sleep", "5"], timeout=1)
    assert not caught.value.retryable


# How an invocation ended is in StatusDetails; Status alone cannot tell a timeout or an undelivered command apart.
@pytest.mark.parametrize(
    ("status", "details", "code", "expected"),
    [
        ("Success", "Success", 0, CommandResult(0, "", "")),
        ("Failed", "Failed", 3, CommandResult(3, "", "")),
        # SSM stopped it: its "non-zero reply" is not the command's own exit code.
        ("Failed", "ExecutionTimedOut", 1, "did not finish within"),
        ("TimedOut", "ExecutionTimedOut", -1, "did not finish within"),
        ("TimedOut", "DeliveryTimedOut", -1, "retryable: was not delivered"),
        ("Failed", "Undeliverable", -1, "retryable: was not delivered"),
        ("Cancelled", "Cancelled", -1, "was cancelled"),
        ("Failed", "Terminated", -1, "was cancelled"),
        ("Failed", "Access Denied", -1, "without an exit code"),
    ],
)
def test_the_end_of_a_command_is_judged_by_its_status_details(
    machine: SsmMachine, ssm: RunCommandEmulation, status: str, details: str, code: int, expected: object
) -> None:
    ssm.outcomes.append((status, details, code))
    if isinstance(expected, CommandResult):
        assert machine.run(["true"], timeout=60) == expected
        return
    assert isinstance(expected, str)
    retryable = expected.startswith("retryable: ")
    with pytest.raises(InfraError, match=expected.removeprefix("retryable: ")) as caught:
        machine.run(["true"], timeout=60)
    assert caught.value.retryable == retryable


def test_an_unregistered_instance_is_reported_after_the_online_timeout(aws: Aws, ssm: RunCommandEmulation) -> None:
    clock = Clock()
    machine = SsmMachine(aws.session, REGION, "i-0000000000test02", sleep=clock.sleep, clock=clock, online_timeout=30)
    with pytest.raises(InfraError, match="did not register with SSM within 30s"):
        machine.run(["true"], timeout=60)
    assert sum(clock.sleeps) <= 30


# --- files ------------------------------------------------------------------------------------------------------


def test_put_file_and_read_file_round_trip(machine: SsmMachine, tmp_path: Path, stage: Path) -> None:
    data = random.Random(7).randbytes(1_100_000)  # binary, more than a MB: 47 parts
    target = tmp_path / "etc" / "new" / "blob.bin"
    machine.put_file(str(target), data, 0o640)
    assert target.read_bytes() == data
    assert stat.S_IMODE(target.stat().st_mode) == 0o640
    assert stat.S_IMODE(target.parent.stat().st_mode) == 0o755  # parents made with the usual mode, not the stage's
    assert machine.read_file(str(target)) == data
    empty = tmp_path / "empty"
    machine.put_file(str(empty), b"", 0o600)
    assert empty.read_bytes() == b"" and machine.read_file(str(empty)) == b""
    assert leftovers_in(stage) == []  # parts, joined copies and compressed reads are all gone
    assert leftovers_in(target.parent) == ["blob.bin"]  # no temporary file beside it


def test_put_file_replaces_a_file_atomically(machine: SsmMachine, tmp_path: Path) -> None:
    target = tmp_path / "conf"
    target.write_text("old\n")
    os.link(target, tmp_path / "old-inode")
    machine.put_file(str(target), b"new\n", 0o600)
    assert target.read_text() == "new\n"
    assert (tmp_path / "old-inode").read_text() == "old\n"  # renamed over, never rewritten in place


def test_a_part_delivered_twice_is_written_once(machine: SsmMachine, ssm: RunCommandEmulation, tmp_path: Path) -> None:
    """A SendCommand whose answer was lost is sent again by botocore and runs twice on the instance. Appending parts
    (`>>`) made that part appear twice in the file; each part in a file of its own makes the retry harmless."""
    data = random.Random(3).randbytes(60_000)  # three parts
    ssm.deliver_twice = {2}
    target = tmp_path / "twice.bin"
    machine.put_file(str(target), data, 0o600)
    assert len(ssm.runs) == 5 and ssm.runs[1] == ssm.runs[2]  # the second part did run twice
    assert target.read_bytes() == data


def test_damaged_upload_is_refused_and_cleaned_up(
    machine: SsmMachine, ssm: RunCommandEmulation, tmp_path: Path, stage: Path
) -> None:
    damaged: list[str] = []

    def damage(command: str) -> str:
        # The first base64 character of the first part changed on the way: it still decodes, to other bytes.
        if damaged or not command.startswith("set -e; umask 077; mkdir -p"):
            return command
        damaged.append(command)
        return re.sub(r"printf '%s' (.)", lambda m: "printf '%s' " + ("B" if m.group(1) != "B" else "C"), command)

    ssm.tamper = damage
    target = tmp_path / "damaged.bin"
    with pytest.raises(InfraError, match=r"arrived damaged.*SHA-256") as caught:
        machine.put_file(str(target), random.Random(5).randbytes(40_000), 0o600)
    assert caught.value.retryable and len(damaged) == 1
    assert not target.exists() and leftovers_in(tmp_path) == ["stage"]
    assert leftovers_in(stage) == []


def test_read_file_goes_compressed(machine: SsmMachine, ssm: RunCommandEmulation, tmp_path: Path) -> None:
    """A dpkg status of 1,500 packages (~1 MB, compressing about as well as a real one: 671 KB → 163 KB for 749
    packages): 1 + ⌈size/16,000⌉ SendCommands uncompressed, about a quarter of that gzipped."""
    rng = random.Random(11)
    words = ["".join(rng.choices("abcdefghijklmnopqrstuvwxyz", k=rng.randint(2, 10))) for _ in range(300)]
    status = "".join(
        f"Package: {rng.choice(words)}-{i}\nStatus: install ok installed\nPriority: optional\nSection: libs\n"
        f"Installed-Size: {rng.randint(10, 99999)}\nMaintainer: Debian {rng.choice(words)} <{rng.choice(words)}@"
        f"example.org>\nArchitecture: amd64\nVersion: {rng.randint(0, 9)}.{rng.randint(0, 99)}-{rng.randint(1, 9)}\n"
        f"Depends: libc6 (>= 2.36), {rng.choice(words)}, {rng.choice(words)}\nDescription: {rng.choice(words)}\n "
        + " ".join(rng.choices(words, k=rng.randint(40, 90)))
        + "\n\n"
        for i in range(1500)
    )
    path = tmp_path / "status"
    path.write_text(status)
    assert machine.read_file(str(path)).decode() == status
    uncompressed = 1 + math.ceil(len(status) / READ_SLICE)
    compressed = math.ceil(len(gzip.compress(status.encode())) / READ_SLICE)
    assert ssm.sends == compressed  # the first send compresses and brings the first slice
    assert (uncompressed, compressed) == (68, 17)


def test_read_file_of_a_missing_file_is_an_error(machine: SsmMachine, tmp_path: Path, stage: Path) -> None:
    with pytest.raises(InfraError, match="No such file"):
        machine.read_file(str(tmp_path / "nothing"))
    assert leftovers_in(stage) == []


# --- console --------------------------------------------------------------------------------------------------


def launched(aws: Aws, instance_type: str) -> str:
    ec2: Any = aws.ec2()
    answer = ec2.run_instances(ImageId="ami-0000000000test01", InstanceType=instance_type, MinCount=1, MaxCount=1)
    return str(answer["Instances"][0]["InstanceId"])


@pytest.fixture
def xen(aws: Aws) -> XenConsole:
    emulation = XenConsole(ACCOUNT, REGION)
    emulation.install(aws.session.boto_session.events)
    return emulation


def test_xen_console_emulation_refuses_latest_as_ec2_does(aws: Aws, xen: XenConsole) -> None:
    ec2: Any = aws.session.boto_session.client("ec2", region_name=REGION)
    old, nitro = launched(aws, "t2.micro"), launched(aws, "t3.micro")
    with pytest.raises(ClientError, match="UnsupportedOperation"):
        ec2.get_console_output(InstanceId=old, Latest=True)
    assert "Output" in ec2.get_console_output(InstanceId=old)
    assert "Output" in ec2.get_console_output(InstanceId=nitro, Latest=True)
    with pytest.raises(ClientError, match=r"InvalidInstanceID\.NotFound"):
        ec2.get_console_output(InstanceId="i-0000000000nothere", Latest=True)


def test_console_falls_back_to_the_buffered_output_on_xen_types(aws: Aws, xen: XenConsole) -> None:
    instance_id = launched(aws, "t2.micro")
    reader = ConsoleReader(aws.session, REGION, instance_id)
    aws.calls.reset()
    first, second = reader.read(), reader.read()
    assert first and first == second
    assert not reader.latest
    assert xen.refused == 1 and aws.calls["ec2.GetConsoleOutput"] == 3  # refused once, never asked again
    assert SsmMachine(aws.session, REGION, instance_id).console() == first


def test_console_keeps_asking_for_the_latest_output_on_nitro_types(aws: Aws, xen: XenConsole) -> None:
    reader = ConsoleReader(aws.session, REGION, launched(aws, "t3.micro"))
    assert reader.read() and reader.read()
    assert reader.latest and xen.refused == 0


def test_console_of_an_unknown_instance_is_not_found_and_keeps_latest(aws: Aws, xen: XenConsole) -> None:
    reader = ConsoleReader(aws.session, REGION, "i-0000000000nothere")
    with pytest.raises(NotFound):
        reader.read()
    assert reader.latest


# --- leftovers --------------------------------------------------------------------------------------------------


def test_ssm_leftovers_name_the_agents_records_of_this_instance(machine: SsmMachine) -> None:
    found = machine.leftovers()
    records = f"/var/lib/amazon/ssm/{INSTANCE}/document"
    assert found.command_records == (f"{records}/orchestration", f"{records}/state/*")
    assert found.at_shutdown == (f"/var/lib/amazon/ssm/{INSTANCE}", "/var/log/amazon/ssm")
    assert found.authorized_key is None


def test_leftovers_refuse_paths_that_are_not_plain() -> None:
    for bad in ("relative/path", "/a b", "/x;rm -rf /", "/a/../b", "/$(id)"):
        with pytest.raises(ConfigError):
            Leftovers(paths=(bad,))
    with pytest.raises(ConfigError, match="globs"):
        Leftovers(at_shutdown=("/var/lib/*",))
    with pytest.raises(ConfigError):
        Leftovers(authorized_key="AAAA' ; reboot ; '")


@pytest.fixture
def sandbox(tmp_path: Path) -> Iterator[tuple[Path, dict[str, str]]]:
    """A root folder with two homes, and an environment whose getent, systemctl and /run/systemd stay in it."""
    root = tmp_path / "root"
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    homes = [root / "root", root / "home" / "admin"]
    (bin_dir / "getent").write_text("#!/bin/sh\n" + "".join(f"echo 'x:x:0:0::{h}:/bin/sh'\n" for h in homes))
    (bin_dir / "systemctl").write_text(f'#!/bin/sh\necho "$@" >> {tmp_path}/systemctl.log\n')
    for tool in ("getent", "systemctl"):
        (bin_dir / tool).chmod(0o755)
    yield root, {"PATH": f"{bin_dir}:{os.environ['PATH']}"}


def run_script(script: str, env: dict[str, str], systemd_dir: Path) -> None:
    script = script.replace("/run/systemd/system", str(systemd_dir))
    subprocess.run(["/bin/sh", "-c", "set -e\n" + script], env={**os.environ, **env}, check=True)


def test_leftovers_script_removes_the_key_by_line_and_old_command_records(
    sandbox: tuple[Path, dict[str, str]], tmp_path: Path
) -> None:
    root, env = sandbox
    blob, other = "AAAAC3NzaC1lZDI1NTE5AAAAIOurthrowaway", "AAAAC3NzaC1lZDI1NTE5AAAAIOtheruser"
    admin_keys = root / "home/admin/.ssh/authorized_keys"
    root_keys = root / "root/.ssh/authorized_keys"
    for path, text in (
        (admin_keys, f"ssh-ed25519 {other} someone\nssh-ed25519 {blob} amiforge-run42\n"),
        (root_keys, f'no-port-forwarding,command="echo no;exit 142" ssh-ed25519 {blob} amiforge-run42\n'),
    ):
        path.parent.mkdir(parents=True)
        path.write_text(text)
        path.chmod(0o600)
    records = tmp_path / "ssm/i-1/document"
    for folder in ("orchestration", "state/completed"):
        for name in ("cmd-a", "cmd-b", "cmd-c"):
            (records / folder / name).mkdir(parents=True)
    gone, later = tmp_path / "uploads-1", tmp_path / "agent-logs"
    gone.mkdir()
    later.mkdir()
    leftovers = Leftovers(
        paths=(f"{tmp_path}/uploads-*",),
        command_records=(f"{records}/orchestration", f"{records}/state/*"),
        at_shutdown=(str(later),),
        authorized_key=blob,
    )
    systemd_dir = tmp_path / "no-systemd"  # absent: removed at once
    run_script(leftovers.script(), {**env, "SSM_COMMAND_ID": "cmd-b"}, systemd_dir)
    assert admin_keys.read_text() == f"ssh-ed25519 {other} someone\n"
    assert root_keys.read_text() == ""
    assert stat.S_IMODE(admin_keys.stat().st_mode) == 0o600
    assert leftovers_in(admin_keys.parent) == ["authorized_keys"]
    assert leftovers_in(records / "orchestration") == ["cmd-b"]  # the running command's own stays
    assert leftovers_in(records / "state/completed") == ["cmd-b"]
    assert not gone.exists() and not later.exists()


def test_without_a_command_id_the_newest_record_is_the_running_one(
    sandbox: tuple[Path, dict[str, str]], tmp_path: Path
) -> None:
    _root, env = sandbox
    records = tmp_path / "orchestration"
    for age, name in enumerate(("cmd-new", "cmd-mid", "cmd-old")):
        (records / name).mkdir(parents=True)
        os.utime(records / name, (1_700_000_000 - age * 60, 1_700_000_000 - age * 60))
    run_script(Leftovers(command_records=(str(records),)).script(), env, tmp_path / "no-systemd")
    assert leftovers_in(records) == ["cmd-new"]


def test_with_systemd_leftovers_wait_for_shutdown(sandbox: tuple[Path, dict[str, str]], tmp_path: Path) -> None:
    _root, env = sandbox
    later = tmp_path / "agent-state"
    later.mkdir()
    systemd_dir = tmp_path / "systemd"
    systemd_dir.mkdir()
    run_script(Leftovers(at_shutdown=(str(later),)).script(), env, systemd_dir)
    assert later.exists()  # still there: the agent may write into it until it stops
    unit = systemd_dir / "amiforge-scrub.service"
    assert unit.read_text() == scrub_unit([str(later)])
    assert (tmp_path / "systemctl.log").read_text() == "daemon-reload\nstart amiforge-scrub.service\n"
    # What systemd runs when the unit stops at shutdown:
    (stop,) = [line.removeprefix("ExecStop=") for line in unit.read_text().splitlines() if line.startswith("ExecStop=")]
    subprocess.run(stop.split(), check=True)
    assert not later.exists()


def test_scrub_unit_is_a_valid_unit(tmp_path: Path) -> None:
    analyze = shutil.which("systemd-analyze")
    if analyze is None:
        pytest.skip("systemd-analyze is not installed")
    unit = tmp_path / "amiforge-scrub.service"
    unit.write_text(scrub_unit(["/var/lib/amazon/ssm/i-0000000000test01", "/var/log/amazon/ssm"]))
    done = subprocess.run([analyze, "verify", str(unit)], capture_output=True, text=True, check=False)
    assert "amiforge-scrub.service" not in done.stderr, done.stderr
    text = unit.read_text()
    assert "Before=shutdown.target amazon-ssm-agent.service" in text
    assert "RequiresMountsFor=/var/lib/amazon/ssm /var/log/amazon" in text
