"""SsmMachine against SSM Run Command that really runs its shell (runcommand_emulation) with this host's /bin/sh and
openssl: commands sent once, uploads sealed to the instance's key, reads; its console on Xen and Nitro instance types;
and what a communicator leaves behind (`Leftovers`), whose script runs here on temporary folders."""

from __future__ import annotations

import base64
import gzip
import hashlib
import math
import os
import random
import re
import secrets
import shlex
import shutil
import stat
import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from botocore.exceptions import ClientError
from conftest import ACCOUNT, REGION, Aws
from fake_machine import Clock
from moto_emulation import error_response, no_backoff
from runcommand_emulation import (
    DOCUMENT_LIMIT,
    RUN_SHELL_SCRIPT,
    STDERR_LIMIT,
    STDOUT_LIMIT,
    RunCommandEmulation,
    XenConsole,
    document_size,
)

from amiforge.errors import ConfigError, InfraError, NotFound
from amiforge.providers.aws import machine as machine_module
from amiforge.providers.aws.console import ConsoleReader
from amiforge.providers.aws.machine import (
    MAX_COMMAND_CHARS,
    READ_SLICE,
    UPLOAD_KEY,
    CommandResult,
    Leftovers,
    SsmMachine,
    encoded_size,
    install_script,
    scrub_unit,
)

INSTANCE = "i-00000000000test01"


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


def ssm_client(aws: Aws) -> Any:
    """A plain boto3 SSM client on the test's session: the emulation answers it too."""
    return aws.session.boto_session.client("ssm", region_name=REGION)


def listed(aws: Aws) -> list[dict[str, Any]]:
    """Every command ListCommands shows: what anyone allowed ssm:ListCommands reads, parameters in full."""
    pages = ssm_client(aws).get_paginator("list_commands").paginate(InstanceId=INSTANCE)
    return [command for page in pages for command in page["Commands"]]


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
        client.get_command_invocation(CommandId=command_id, InstanceId="i-00000000000test02")
    assert client.get_command_invocation(CommandId=command_id, InstanceId=INSTANCE)["Status"] == "InProgress"
    assert client.get_command_invocation(CommandId=command_id, InstanceId=INSTANCE)["Status"] == "Success"
    with pytest.raises(ClientError, match="ValidationException"):  # Comment: at most 100 characters
        client.send_command(InstanceIds=[INSTANCE], Comment="c" * 101, **run)
    # The document's 64 KB include the parameters given at runtime: AWS-RunShellScript leaves this much for them.
    room = DOCUMENT_LIMIT - len(RUN_SHELL_SCRIPT.encode()) - len('{"commands": [": "]}')
    assert document_size({"commands": [": " + "x" * room]}) == DOCUMENT_LIMIT
    client.send_command(
        InstanceIds=[INSTANCE], DocumentName="AWS-RunShellScript", Parameters={"commands": [": " + "x" * room]}
    )
    with pytest.raises(ClientError, match="MaxDocumentSizeExceeded"):
        client.send_command(
            InstanceIds=[INSTANCE],
            DocumentName="AWS-RunShellScript",
            Parameters={"commands": [": " + "x" * (room + 1)]},
        )
    for bad, code in (
        ({"MaxResults": 51}, "ValidationException"),
        ({"Filters": [{"key": "InvokedSince", "value": "2024-07-07T00:00:00Z"}]}, "InvalidFilterKey"),
        ({"Filters": [{"key": "InvokedAfter", "value": "yesterday"}]}, "ValidationException"),
        ({"Filters": [{"key": "Status", "value": "Success"}] * 6}, "ValidationException"),
        ({"InstanceId": "i-nothere"}, "InvalidInstanceId"),
        ({"NextToken": "not-one-it-gave"}, "InvalidNextToken"),
    ):
        with pytest.raises(ClientError, match=code):
            client.list_commands(**bad)


def test_emulation_lists_commands_as_ssm_keeps_them(aws: Aws, ssm: RunCommandEmulation) -> None:
    """Newest first, with Comment and Parameters in full, narrowed by instance and time, in pages; a command shows
    only once `list_lag` ListCommands calls have passed since it was sent."""
    client = ssm_client(aws)
    ssm.instances.add("i-00000000000test02")
    for n in range(5):
        client.send_command(
            InstanceIds=[INSTANCE if n != 2 else "i-00000000000test02"],
            DocumentName="AWS-RunShellScript",
            Parameters={"commands": [f"echo {n}"]},
            Comment=f"number {n}",
        )
    shown = listed(aws)
    assert [c["Comment"] for c in shown] == ["number 4", "number 3", "number 1", "number 0"]
    assert shown[0]["Parameters"] == {"commands": ["echo 4"]}
    first = client.list_commands(InstanceId=INSTANCE, MaxResults=3)
    assert len(first["Commands"]) == 3 and "NextToken" in first
    rest = client.list_commands(InstanceId=INSTANCE, MaxResults=3, NextToken=first["NextToken"])
    assert [c["Comment"] for c in rest["Commands"]] == ["number 0"] and "NextToken" not in rest
    later = ssm.sent[-1].requested.strftime("%Y-%m-%dT%H:%M:%S.%fZ")
    assert client.list_commands(Filters=[{"key": "InvokedAfter", "value": "2999-01-01T00:00:00Z"}])["Commands"] == []
    assert [
        c["Comment"] for c in client.list_commands(Filters=[{"key": "InvokedBefore", "value": later}])["Commands"]
    ] == [
        "number 3",
        "number 2",
        "number 1",
        "number 0",
    ]
    ssm.list_lag = 2
    client.send_command(InstanceIds=[INSTANCE], DocumentName="AWS-RunShellScript", Parameters={"commands": [":"]})
    assert len(listed(aws)) == 4 and len(listed(aws)) == 4 and len(listed(aws)) == 5


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
    assert ssm.sends >= 4  # the upload key, the script in parts, its installation, then the run
    assert leftovers_in(stage) == [UPLOAD_KEY]


def test_inline_commands_stay_within_half_the_document_quota(machine: SsmMachine, ssm: RunCommandEmulation) -> None:
    """A command counts as its longest plausible encoding: non-ASCII and <, >, & escaped as \\uXXXX. 6,000 'é' are
    36,002 characters of JSON: staged, though the text is only 6,000 characters long."""
    assert encoded_size("é" * 6_000) == 36_002 and encoded_size("a<b") == len('"a<b"') + 5
    result = machine.run(["sh", "-c", 'printf %s "$1" | wc -m', "sh", "é" * 6_000], timeout=60)
    assert result.stdout.strip() in ("6000", "12000")  # wc -m counts bytes under the C locale
    assert len(ssm.runs) > 1 and not any("é" in run for run in ssm.runs)  # sent as a sealed upload
    assert all(encoded_size(command.parameters["commands"][0]) <= MAX_COMMAND_CHARS for command in ssm.sent)


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


# --- sending once ---------------------------------------------------------------------------------------------


def test_every_send_is_one_run_shell_script_command_with_a_token_of_its_own(
    machine: SsmMachine, ssm: RunCommandEmulation, tmp_path: Path
) -> None:
    machine.run(["echo", "hello world"], timeout=60)
    machine.put_file(str(tmp_path / "big"), random.Random(1).randbytes(MAX_COMMAND_CHARS * 2), 0o600)
    assert ssm.sent[0].parameters["commands"] == ["echo 'hello world'"]
    assert ssm.sent[0].instance_ids == [INSTANCE]
    comments = [command.comment for command in ssm.sent]
    assert all(re.fullmatch(r"amiforge [0-9a-f-]{36}", c) for c in comments) and len(set(comments)) == len(comments)
    assert all(encoded_size(command.parameters["commands"][0]) <= MAX_COMMAND_CHARS for command in ssm.sent)
    assert len(ssm.sent) == 1 + 1 + 3 + 1  # the run, the upload key, 85 KB of base64 in three parts, the install
    assert "chmod 600" in ssm.sent[-1].parameters["commands"][0]


def counter(tmp_path: Path) -> tuple[list[str], Callable[[], int]]:
    """A command that appends a line to a file each time it runs, and how many lines that file has."""
    log = tmp_path / "ran.log"
    return ["sh", "-c", f"echo ran >> {shlex.quote(str(log))}"], lambda: len(log.read_text().splitlines())


@pytest.mark.parametrize("lost_as", ["500", "timeout"])
def test_a_lost_answer_does_not_run_the_command_twice(
    aws: Aws, machine: SsmMachine, ssm: RunCommandEmulation, tmp_path: Path, lost_as: str
) -> None:
    """SSM took the command and ran it; its answer was lost (a 5xx, a read timeout). botocore does not send it
    again (single attempt); the machine finds it by its Comment token and polls that one."""
    ssm.lose_answer, ssm.lost_as = {1}, lost_as
    argv, ran = counter(tmp_path)
    aws.calls.reset()
    assert machine.run(argv, timeout=60).exit_code == 0
    assert ran() == 1 and ssm.sends == 1
    assert aws.calls["ssm.ListCommands"] == 1


def test_a_throttled_send_is_looked_for_then_sent_again(
    aws: Aws, machine: SsmMachine, ssm: RunCommandEmulation, tmp_path: Path
) -> None:
    ssm.throttle = {1}
    argv, ran = counter(tmp_path)
    assert machine.run(argv, timeout=60).exit_code == 0
    assert ran() == 1 and ssm.sends == 2
    assert aws.calls["ssm.ListCommands"] == 4  # a look and three more after pauses: ListCommands may lag


def test_a_command_listcommands_shows_late_is_still_found(
    aws: Aws, machine: SsmMachine, ssm: RunCommandEmulation, tmp_path: Path
) -> None:
    ssm.lose_answer, ssm.list_lag = {1}, 2
    argv, ran = counter(tmp_path)
    assert machine.run(argv, timeout=60).exit_code == 0
    assert ran() == 1 and ssm.sends == 1 and aws.calls["ssm.ListCommands"] == 3


def test_a_retried_install_succeeds(machine: SsmMachine, ssm: RunCommandEmulation, tmp_path: Path, stage: Path) -> None:
    """The install's answer is lost and ListCommands does not show it in time, so it is sent again: the first run
    installed the file and removed the parts; the second finds the file with its SHA-256 and mode and is done."""
    data = random.Random(2).randbytes(60_000)  # sends: the upload key, 3 parts, the install (5th)
    ssm.lose_answer, ssm.list_lag = {5}, 100
    target = tmp_path / "twice.bin"
    machine.put_file(str(target), data, 0o640)
    installs = [run for run in ssm.runs if "mv -fT" in run]
    assert len(installs) == 2 and ssm.sends == 6
    assert target.read_bytes() == data and stat.S_IMODE(target.stat().st_mode) == 0o640
    assert leftovers_in(stage) == [UPLOAD_KEY]


def test_an_install_that_finds_another_file_does_not_count_it_as_installed(machine: SsmMachine, tmp_path: Path) -> None:
    target = tmp_path / "conf"
    target.write_bytes(b"same\n")
    target.chmod(0o600)
    machine.put_file(str(target), b"same\n", 0o644)  # same bytes, another mode: installed again
    assert stat.S_IMODE(target.stat().st_mode) == 0o644


def test_without_listcommands_a_failed_send_is_not_sent_blindly(
    aws: Aws, machine: SsmMachine, ssm: RunCommandEmulation, tmp_path: Path
) -> None:
    def denied(params: Any, **_: Any) -> tuple[Any, dict[str, Any]]:
        # before-call runs ahead of the emulation's before-send and short-circuits the call.
        error = {"Code": "AccessDeniedException", "Message": "not authorized to perform: ssm:ListCommands"}
        return error_response(str(params.get("url", "")), "ssm", "AccessDeniedException"), {
            "Error": error,
            "ResponseMetadata": {"HTTPStatusCode": 400},
        }

    aws.session.boto_session.events.register("before-call.ssm.ListCommands", denied)
    ssm.lose_answer = {1}
    argv, ran = counter(tmp_path)
    with pytest.raises(ConfigError, match="ssm:ListCommands") as caught:
        machine.run(argv, timeout=60)
    assert "grant ssm:ListCommands" in str(caught.value.fix)
    assert ran() == 1 and ssm.sends == 1


def test_sends_whose_outcome_stays_unknown_give_up(machine: SsmMachine, ssm: RunCommandEmulation) -> None:
    ssm.throttle = {1, 2, 3, 4, 5}
    with pytest.raises(InfraError, match="ThrottlingException") as caught:
        machine.run(["true"], timeout=60)
    assert caught.value.retryable and ssm.sends == 4  # the first send and three more


def test_an_unregistered_instance_is_reported_after_the_online_timeout(aws: Aws, ssm: RunCommandEmulation) -> None:
    clock = Clock()
    machine = SsmMachine(aws.session, REGION, "i-00000000000test02", sleep=clock.sleep, clock=clock, online_timeout=30)
    with pytest.raises(InfraError, match="did not register with SSM within 30s"):
        machine.run(["true"], timeout=60)
    assert sum(clock.sleeps) <= 30


# --- files ------------------------------------------------------------------------------------------------------


def test_put_file_and_read_file_round_trip(machine: SsmMachine, tmp_path: Path, stage: Path) -> None:
    data = random.Random(7).randbytes(1_100_000)  # binary, more than a MB: 47 parts of base64
    target = tmp_path / "etc" / "new" / "blob.bin"
    machine.put_file(str(target), data, 0o640)
    assert target.read_bytes() == data
    assert stat.S_IMODE(target.stat().st_mode) == 0o640
    assert stat.S_IMODE(target.parent.stat().st_mode) == 0o755  # parents made with the usual mode, not the stage's
    assert machine.read_file(str(target)) == data
    empty = tmp_path / "empty"
    machine.put_file(str(empty), b"", 0o600)
    assert empty.read_bytes() == b"" and machine.read_file(str(empty)) == b""
    assert leftovers_in(stage) == [UPLOAD_KEY]  # parts, sealed copies, data keys and compressed reads are all gone
    assert leftovers_in(target.parent) == ["blob.bin"]  # no temporary file beside it


def test_put_file_replaces_a_file_atomically(machine: SsmMachine, tmp_path: Path) -> None:
    target = tmp_path / "conf"
    target.write_text("old\n")
    os.link(target, tmp_path / "old-inode")
    machine.put_file(str(target), b"new\n", 0o600)
    assert target.read_text() == "new\n"
    assert (tmp_path / "old-inode").read_text() == "old\n"  # renamed over, never rewritten in place


def test_a_part_sent_twice_is_written_once(machine: SsmMachine, ssm: RunCommandEmulation, tmp_path: Path) -> None:
    """A part whose answer was lost and that ListCommands did not show in time is sent again and runs twice on the
    instance. Appending parts (`>>`) made that part appear twice in the file; a file per part makes it harmless."""
    data = random.Random(3).randbytes(60_000)  # sends: the upload key, 3 parts, the install
    ssm.lose_answer, ssm.list_lag = {3}, 100
    target = tmp_path / "twice.bin"
    machine.put_file(str(target), data, 0o600)
    assert len(ssm.runs) == 6 and ssm.runs[2] == ssm.runs[3]  # the second part did run twice
    assert target.read_bytes() == data


@pytest.fixture
def data_keys(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Every data key an upload draws (secrets.token_hex, as the machine calls it)."""
    drawn: list[str] = []
    original = secrets.token_hex

    def token_hex(n: int | None = None) -> str:
        value = original(n)
        drawn.append(value)
        return value

    monkeypatch.setattr(secrets, "token_hex", token_hex)  # the module the machine draws from
    return drawn


def test_uploads_never_travel_in_clear(
    aws: Aws, machine: SsmMachine, ssm: RunCommandEmulation, tmp_path: Path, stage: Path, data_keys: list[str]
) -> None:
    """Neither the bytes of a file (in clear, base64 or hex), nor their SHA-256 (which would give a short file away to
    a brute force), nor its data key is in any command: not in what
    ListCommands answers for 30 days, not in the scripts the agent writes to the instance's disk. The private key
    stays in STAGE (0700), mode 0600; nothing else remains there."""
    secret = b"AKIA" + random.Random(4).randbytes(40_000) + b"-----END PRIVATE KEY-----"
    target = tmp_path / "credentials"
    machine.put_file(str(target), secret, 0o600)
    assert target.read_bytes() == secret
    (data_key,) = data_keys
    forms = [
        secret[:64].decode("latin-1"),
        base64.b64encode(secret)[:64].decode(),
        secret[:32].hex(),
        hashlib.sha256(secret).hexdigest(),
        data_key,
    ]
    shown = [json_text for command in listed(aws) for json_text in command["Parameters"]["commands"]]
    assert len(shown) == len(ssm.runs) == 4  # the upload key, two parts, the install
    for text in [*shown, *ssm.runs]:
        assert not any(form in text for form in forms)
    assert leftovers_in(stage) == [UPLOAD_KEY]
    assert stat.S_IMODE(stage.stat().st_mode) == 0o700
    assert stat.S_IMODE((stage / UPLOAD_KEY).stat().st_mode) == 0o600
    assert data_key.encode() not in (stage / UPLOAD_KEY).read_bytes()
    machine.put_file(str(tmp_path / "second"), b"more", 0o600)
    assert len(ssm.runs) == 6  # one part and the install: the key is made once per instance


def damage_first_part(at: int) -> Callable[[str], str]:
    """Changes the base64 character at `at` of the first part on the way (it still decodes, to other bytes)."""
    done: list[str] = []

    def damage(command: str) -> str:
        found = re.search(r"printf '%s' ([A-Za-z0-9+/=]+) > \S+\.part-0001$", command)
        if done or found is None:
            return command
        done.append(command)
        i = found.start(1) + at
        return command[:i] + ("B" if command[i] != "B" else "C") + command[i + 1 :]

    return damage


@pytest.mark.parametrize(
    ("at", "why"),
    [
        (0, "do not decrypt"),  # OpenSSL's Salted__ header: not a sealed upload
        (20_000, "do not have the SHA-256 they were sent with"),  # inside the ciphertext: decrypts to other bytes
    ],
)
def test_a_damaged_part_is_refused_and_cleaned_up(
    machine: SsmMachine, ssm: RunCommandEmulation, tmp_path: Path, stage: Path, at: int, why: str
) -> None:
    ssm.tamper = damage_first_part(at)
    target = tmp_path / "damaged.bin"
    data = random.Random(5).randbytes(40_000)
    with pytest.raises(InfraError, match=f"arrived damaged.*the uploaded bytes {why}") as caught:
        machine.put_file(str(target), data, 0o600)
    assert caught.value.retryable
    assert hashlib.sha256(data).hexdigest() not in str(caught.value)  # SSM keeps the output for 30 days too
    assert not target.exists() and leftovers_in(tmp_path) == ["stage"]
    assert leftovers_in(stage) == [UPLOAD_KEY]


def test_a_wrapped_key_that_does_not_unwrap_is_refused(
    machine: SsmMachine, ssm: RunCommandEmulation, tmp_path: Path, stage: Path
) -> None:
    def damage(command: str) -> str:
        # One character of the wrapped data key in the install command changed on the way.
        return re.sub(r"printf '%s' ([A-Za-z0-9+/=]{8})", lambda m: "printf '%s' " + m.group(1)[::-1], command)

    ssm.tamper = damage
    target = tmp_path / "damaged.bin"
    with pytest.raises(InfraError, match="the uploaded bytes hold a key that does not unwrap"):
        machine.put_file(str(target), b"payload", 0o600)
    assert not target.exists() and leftovers_in(stage) == [UPLOAD_KEY]


def test_a_sealed_digest_that_does_not_decrypt_is_refused(
    machine: SsmMachine, ssm: RunCommandEmulation, tmp_path: Path, stage: Path
) -> None:
    def damage(command: str) -> str:
        # The first character of the sealed SHA-256 (its Salted__ header) changed on the way.
        return re.sub(r"printf '%s' U(\S+ \| base64 -d > \S+\.sha256\.enc)", r"printf '%s' V\1", command)

    ssm.tamper = damage
    target = tmp_path / "damaged.bin"
    with pytest.raises(InfraError, match="the uploaded bytes hold a SHA-256 that does not decrypt"):
        machine.put_file(str(target), b"payload", 0o600)
    assert not target.exists() and leftovers_in(stage) == [UPLOAD_KEY]


def test_a_missing_part_is_refused(machine: SsmMachine, ssm: RunCommandEmulation, tmp_path: Path, stage: Path) -> None:
    ssm.tamper = lambda command: command.replace(".part-0002", ".part-lost")
    with pytest.raises(InfraError, match="the uploaded bytes lack part 2 of 3"):
        machine.put_file(str(tmp_path / "x"), random.Random(6).randbytes(60_000), 0o600)
    assert leftovers_in(stage) == [UPLOAD_KEY]


def test_an_upload_key_lost_with_a_reboot_is_made_again(
    machine: SsmMachine, ssm: RunCommandEmulation, tmp_path: Path, stage: Path
) -> None:
    machine.put_file(str(tmp_path / "a"), b"first", 0o600)
    (stage / UPLOAD_KEY).unlink()  # STAGE is a tmpfs: a reboot empties it
    machine.put_file(str(tmp_path / "b"), b"second", 0o600)
    assert (tmp_path / "b").read_bytes() == b"second"
    assert sum("genpkey" in run for run in ssm.runs) == 2
    # Another key in its place (another machine object made one) is noticed the same way.
    first = (stage / UPLOAD_KEY).read_bytes()
    subprocess.run(
        [
            "openssl",
            "genpkey",
            "-algorithm",
            "RSA",
            "-pkeyopt",
            "rsa_keygen_bits:3072",
            "-out",
            str(stage / UPLOAD_KEY),
        ],
        check=True,
        capture_output=True,
    )
    assert (stage / UPLOAD_KEY).read_bytes() != first
    machine.put_file(str(tmp_path / "c"), b"third", 0o600)
    assert (tmp_path / "c").read_bytes() == b"third"


def test_an_instance_without_openssl_is_a_clear_error(
    machine: SsmMachine, ssm: RunCommandEmulation, tmp_path: Path
) -> None:
    ssm.tamper = lambda command: "PATH=/nonexistent\n" + command if "genpkey" in command else command
    with pytest.raises(InfraError, match=r"has no OpenSSL 1\.1\.1 or later") as caught:
        machine.put_file(str(tmp_path / "x"), b"data", 0o600)
    assert "SSH communicator" in str(caught.value.fix) and "openssl11" in str(caught.value.fix)
    assert not (tmp_path / "x").exists()


def test_a_path_is_never_expanded_by_the_shell(tmp_path: Path) -> None:
    """The refusal names the path with printf, not inside a double-quoted echo, where $(...) would run."""
    staged = tmp_path / "staged"
    staged.write_bytes(b"bytes")
    script = install_script(str(staged), str(tmp_path / "x$(touch pwned)"), 0o600, "0" * 64)
    done = subprocess.run(["/bin/sh", "-c", script], cwd=tmp_path, capture_output=True, text=True, check=False)
    assert done.returncode == 65
    assert "x$(touch pwned): the uploaded bytes do not have the SHA-256" in done.stderr
    assert not (tmp_path / "pwned").exists()


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
    answer = ec2.run_instances(ImageId="ami-00000000000test01", InstanceType=instance_type, MinCount=1, MaxCount=1)
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


def test_ssm_leftovers_name_the_agents_records_of_this_instance(machine: SsmMachine, stage: Path) -> None:
    found = machine.leftovers()
    records = f"/var/lib/amazon/ssm/{INSTANCE}/document"
    assert found.paths == (f"{stage}/{UPLOAD_KEY}",)
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


@pytest.fixture
def failing_grep(sandbox: tuple[Path, dict[str, str]], tmp_path: Path) -> Callable[[str], None]:
    """Makes the sandbox's grep fail (exit 2, as on a read error, after some output) when called with `option`."""

    def fail_on(option: str) -> None:
        real = shutil.which("grep")
        wrapper = tmp_path / "bin" / "grep"
        wrapper.write_text(
            f'#!/bin/sh\nif [ "$1" = {option} ]; then echo "half a line"; echo "grep: read error" >&2; exit 2; fi\n'
            f'exec {real} "$@"\n'
        )
        wrapper.chmod(0o755)

    return fail_on


@pytest.mark.parametrize("option", ["-qF", "-vF"])
def test_a_key_file_that_cannot_be_read_is_left_whole_and_fails_the_script(
    sandbox: tuple[Path, dict[str, str]], tmp_path: Path, failing_grep: Callable[[str], None], option: str
) -> None:
    """grep exits 2 when it cannot read: the file must not be emptied (or cut to what grep wrote before it
    failed) and the key must not be skipped in silence."""
    root, env = sandbox
    blob = "AAAAC3NzaC1lZDI1NTE5AAAAIOurthrowaway"
    keys = root / "root/.ssh/authorized_keys"
    keys.parent.mkdir(parents=True)
    text = f"ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIOtheruser someone\nssh-ed25519 {blob} amiforge-run42\n"
    keys.write_text(text)
    failing_grep(option)
    with pytest.raises(subprocess.CalledProcessError):
        run_script(Leftovers(authorized_key=blob).script(), env, tmp_path / "no-systemd")
    assert keys.read_text() == text
    assert leftovers_in(keys.parent) == ["authorized_keys"]


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
    unit.write_text(scrub_unit(["/var/lib/amazon/ssm/i-00000000000test01", "/var/log/amazon/ssm"]))
    done = subprocess.run([analyze, "verify", str(unit)], capture_output=True, text=True, check=False)
    assert "amiforge-scrub.service" not in done.stderr, done.stderr
    text = unit.read_text()
    assert "Before=shutdown.target amazon-ssm-agent.service" in text
    assert "RequiresMountsFor=/var/lib/amazon/ssm /var/log/amazon" in text
