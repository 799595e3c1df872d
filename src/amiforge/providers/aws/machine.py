"""A running EC2 instance as a `Machine`: commands through SSM Run Command, the serial console through EC2.

No SSH key, no open port: the instance needs only the SSM agent and an instance profile that lets it talk to SSM.
`run()` sends one `AWS-RunShellScript` command and polls `GetCommandInvocation` with doubling delays until the
invocation reaches a terminal status (right after SendCommand the invocation may not exist yet: normal, retried).

Limits SSM imposes, and how they are kept:
- a command's parameters are limited in size, so a script longer than `MAX_COMMAND_CHARS` is uploaded first (base64
  chunks appended to a file under `STAGE`) and then run from that file; `put_file()` uses the same chunking;
- `StandardOutputContent` is cut at 24,000 characters, so `read_file()` reads a file in base64 slices that each fit.
"""

from __future__ import annotations

import base64
import re
import shlex
import time
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

from botocore.exceptions import ClientError

from amiforge.awsapi.clients import AwsSession, call, eventually, iam_action
from amiforge.awsapi.errors import CAUGHT, translate
from amiforge.errors import AmiforgeError, InfraError, NotFound

__all__ = [
    "MAX_COMMAND_CHARS",
    "STAGE",
    "CommandResult",
    "Machine",
    "MachineFactory",
    "SsmMachine",
]

# Where uploads and oversized scripts are staged on the instance (a tmpfs; generalisation never sees it in the image).
STAGE = "/run/amiforge"
# Conservative bound for one `commands` value: SSM's documented parameter limits are well above this.
MAX_COMMAND_CHARS = 32_000
# Raw bytes per read slice: base64 of 16,000 bytes is 21,336 characters, under SSM's 24,000-character output cut.
READ_SLICE = 16_000
# SendCommand's TimeoutSeconds is the *delivery* timeout (the agent must pick the command up within it).
DELIVERY_TIMEOUT = 600
# How long after `timeout` the poller still waits for SSM to report the end of a command it timed out.
POLL_GRACE = 60.0
_PENDING = {"Pending", "InProgress", "Delayed", "Cancelling"}


@dataclass(frozen=True)
class CommandResult:
    exit_code: int
    stdout: str
    stderr: str


class Machine(Protocol):
    """A running guest: SSM Run Command on AWS, a fake in tests (docs/architecture.md §2)."""

    def run(self, argv: Sequence[str], *, timeout: float) -> CommandResult: ...

    def put_file(self, path: str, data: bytes, mode: int = 0o644) -> None: ...

    def read_file(self, path: str) -> bytes: ...

    def console(self) -> str: ...


# (session, region, instance id) -> Machine: how bake and boot test get at an instance; tests inject fakes.
MachineFactory = Callable[[AwsSession, str, str], Machine]


class _StillRunning(AmiforgeError):
    """The invocation exists but has not finished: poll again."""


def _code(error: ClientError) -> str:
    return str(error.response.get("Error", {}).get("Code") or "")


class SsmMachine:
    """One EC2 instance reached through SSM Run Command. `sleep` and `clock` are injectable so tests do not wait."""

    def __init__(
        self,
        session: AwsSession,
        region: str,
        instance_id: str,
        *,
        sleep: Callable[[float], None] = time.sleep,
        clock: Callable[[], float] = time.monotonic,
        online_timeout: float = 600.0,
    ) -> None:
        self.session = session
        self.online_timeout = online_timeout
        self.region = region
        self.instance_id = instance_id
        self._sleep = sleep
        self._clock = clock

    # --- commands ---------------------------------------------------------------------------------------------

    def run(self, argv: Sequence[str], *, timeout: float) -> CommandResult:
        """Run `argv` as root on the instance; its exit code, stdout and stderr (SSM keeps at most 24,000 chars)."""
        command = shlex.join(argv)
        if len(command) <= MAX_COMMAND_CHARS:
            return self._send(command, timeout)
        script = f"{STAGE}/cmd-{uuid.uuid4().hex[:12]}.sh"
        self.put_file(script, command.encode(), 0o700)
        return self._send(f"/bin/sh {script}; rc=$?; rm -f {script}; exit $rc", timeout)

    def _send(self, command: str, timeout: float) -> CommandResult:
        ssm = self.session.client("ssm", self.region)
        execution = max(1, min(int(timeout), 172_800))

        def send() -> dict[str, Any]:
            try:
                return dict(
                    ssm.send_command(
                        InstanceIds=[self.instance_id],
                        DocumentName="AWS-RunShellScript",
                        Parameters={"commands": [command], "executionTimeout": [str(execution)]},
                        TimeoutSeconds=DELIVERY_TIMEOUT,
                        Comment="amiforge",
                    )
                )
            except CAUGHT as e:
                # InvalidInstanceId maps to NotFound in the table: a new instance's agent has not registered yet.
                raise translate(e, iam_action(ssm, "SendCommand"), self.instance_id) from e

        try:
            sent = eventually(
                send, timeout=self.online_timeout, first_delay=2.0, max_delay=15.0, sleep=self._sleep, clock=self._clock
            )
        except NotFound as e:
            raise InfraError(
                f"{self.instance_id} did not register with SSM within {self.online_timeout:.0f}s",
                fix="give the instance an instance profile with AmazonSSMManagedInstanceCore, a route to the SSM "
                "endpoints, and an image that runs the SSM agent",
            ) from e
        command_id = str(sent["Command"]["CommandId"])

        def finished() -> dict[str, Any]:
            answer = self._invocation(ssm, command_id)
            if answer.get("Status") in _PENDING:
                raise _StillRunning(f"command {command_id} is {answer.get('Status')}")
            return answer

        try:
            answer = eventually(
                finished,
                retry_on=(NotFound, _StillRunning),
                timeout=timeout + POLL_GRACE,
                first_delay=0.5,
                max_delay=5.0,
                sleep=self._sleep,
                clock=self._clock,
            )
        except (NotFound, _StillRunning) as e:
            raise InfraError(
                f"SSM command {command_id} on {self.instance_id} did not finish within {timeout + POLL_GRACE:.0f}s",
                retryable=True,
                fix="check the SSM agent on the instance (aws ssm list-command-invocations --details)",
            ) from e
        status = str(answer.get("Status"))
        code = int(answer.get("ResponseCode", -1))
        if status not in ("Success", "Failed") or code < 0:
            detail = str(answer.get("StatusDetails") or status)
            raise InfraError(
                f"SSM command {command_id} on {self.instance_id} ended {status} ({detail}) without an exit code",
                retryable=status in ("TimedOut", "DeliveryTimedOut", "Undeliverable"),
                fix="check that the instance runs the SSM agent and its instance profile allows SSM",
            )
        return CommandResult(
            code, str(answer.get("StandardOutputContent") or ""), str(answer.get("StandardErrorContent") or "")
        )

    def _invocation(self, ssm: Any, command_id: str) -> dict[str, Any]:
        try:
            return dict(ssm.get_command_invocation(CommandId=command_id, InstanceId=self.instance_id))
        except CAUGHT as e:
            # InvocationDoesNotExist maps to NotFound in the table: normal for a moment right after SendCommand.
            raise translate(e, iam_action(ssm, "GetCommandInvocation"), command_id) from e

    def _check(self, result: CommandResult, what: str) -> CommandResult:
        if result.exit_code != 0:
            raise InfraError(
                f"{what} on {self.instance_id} failed with exit {result.exit_code}: {result.stderr.strip()[-500:]}"
            )
        return result

    # --- files ------------------------------------------------------------------------------------------------

    def put_file(self, path: str, data: bytes, mode: int = 0o644) -> None:
        """Write `data` to `path` (parents created), mode `mode`, atomically (a temp file renamed into place)."""
        q = shlex.quote
        encoded = base64.b64encode(data).decode()
        part = f"{STAGE}/put-{uuid.uuid4().hex[:12]}.b64"
        chunk = MAX_COMMAND_CHARS - 200
        pieces = [encoded[i : i + chunk] for i in range(0, len(encoded), chunk)] or [""]
        for n, piece in enumerate(pieces):
            redirect = ">" if n == 0 else ">>"
            self._check(
                self._send(f"set -e; umask 077; mkdir -p {STAGE}; printf '%s' {q(piece)} {redirect} {part}", 120),
                f"upload of {path} (part {n + 1}/{len(pieces)})",
            )
        tmp = f"{path}.amiforge-tmp"
        finish = (
            f"set -e; mkdir -p {q(path.rsplit('/', 1)[0] or '/')}; base64 -d {part} > {q(tmp)}; "
            f"chmod {mode:o} {q(tmp)}; mv -f {q(tmp)} {q(path)}; rm -f {part}"
        )
        self._check(self._send(finish, 120), f"upload of {path}")

    def read_file(self, path: str) -> bytes:
        """The bytes of `path`, read in slices that each fit in SSM's output limit."""
        q = shlex.quote(path)
        size_out = self._check(self._send(f"stat -c %s {q}", 60), f"stat {path}").stdout.strip()
        if not re.fullmatch(r"\d+", size_out):
            raise InfraError(f"stat {path} on {self.instance_id} answered {size_out[:80]!r}, not a size")
        size = int(size_out)
        data = bytearray()
        while len(data) < size:
            cmd = f"tail -c +{len(data) + 1} {q} | head -c {READ_SLICE} | base64 -w0"
            piece = base64.b64decode(self._check(self._send(cmd, 120), f"read {path}").stdout.strip())
            if not piece:
                break  # the file shrank while being read
            data += piece
        return bytes(data)

    # --- console ----------------------------------------------------------------------------------------------

    def console(self) -> str:
        """The serial console output EC2 has captured so far ('' if none yet); base64 is decoded if EC2 sent it."""
        ec2 = self.session.client("ec2", self.region)
        answer = call(ec2, "GetConsoleOutput", self.instance_id, InstanceId=self.instance_id, Latest=True)
        output = str(answer.get("Output") or "")
        # botocore normally decodes it already; decode only what is unmistakably base64 of UTF-8 text.
        if not output or len(output) % 4 or re.fullmatch(r"[A-Za-z0-9+/]+=*", output) is None:
            return output
        try:
            return base64.b64decode(output, validate=True).decode("utf-8")
        except ValueError:
            return output
