"""SSM Run Command that really runs commands, and EC2's console on Xen instance types, emulated on moto (tested in
test_machine.py).

moto's SendCommand runs nothing and its invocation reports Success with empty output, so SsmMachine's shell (uploads
in parts, their SHA-256 check, the compressed read) would go untested. `RunCommandEmulation` answers SendCommand and
GetCommandInvocation itself — a botocore `before-send` handler on the test's boto3 session, ahead of moto, through
botocore's real response parsing and retry handler — and runs each AWS-RunShellScript command with /bin/sh on this
host. Tests point `machine.STAGE` and every path they use at a temporary folder.

What AWS documents (SSM API reference: SendCommand, GetCommandInvocation; user guide, "Understanding command
statuses"), and the emulation keeps:
- SendCommand: a document other than AWS-RunShellScript (the only one emulated) → InvalidDocument; an instance that
  is not a managed node → InvalidInstanceId. The answer holds Command.CommandId.
- GetCommandInvocation: a command id and instance that match no invocation → InvocationDoesNotExist, which is also
  what comes back right after SendCommand for a moment (`lag` reads); then the invocation is InProgress
  (`in_progress` reads), then terminal.
- StandardOutputContent is the first 24,000 characters of stdout, StandardErrorContent the first 8,000 of stderr.
- A command still running after its `executionTimeout` is stopped: StatusDetails ExecutionTimedOut. AWS documents
  that this counts as a failure "with a non-zero reply" but not which `Status` comes with it; the emulation answers
  TimedOut with ResponseCode 1, and the tests script the Failed variant too (`outcomes`).

Faults a test can ask for:
- `deliver_twice`: numbers (1-based) of SendCommands whose first answer is lost after SSM took the command: it runs,
  the answer is an HTTP 500 InternalServerError, botocore's standard retry sends it again, and it runs again.
- `tamper`: rewrites a command before it runs (bytes damaged on the way).
- `outcomes`: scripted (Status, StatusDetails, ResponseCode) answers for the next invocations, instead of running them.

`XenConsole` answers GetConsoleOutput with Latest=true for an instance whose type runs on the Xen hypervisor (t2, m4,
c4, …, as DescribeInstanceTypes says: moto's own instance type data) with UnsupportedOperation, as EC2 does: "the
latest serial console output … is supported on instance types that use the Nitro hypervisor". Everything else goes on
to moto.
"""

from __future__ import annotations

import json
import subprocess
import uuid
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import parse_qs

from botocore.awsrequest import AWSResponse
from moto.ec2.exceptions import InvalidInstanceIdError
from moto.ec2.models import ec2_backends
from moto.ec2.models.instance_types import INSTANCE_TYPES
from moto_emulation import _Raw, error_response

# An answer given here must not also reach moto (it would run the request too): point it where no backend matches.
_ANSWERED = "https://amiforge-emulated.invalid/"
STDOUT_LIMIT = 24_000
STDERR_LIMIT = 8_000


def json_response(url: str, payload: dict[str, Any]) -> AWSResponse:
    return AWSResponse(url, 200, {"Content-Type": "application/x-amz-json-1.1"}, _Raw(json.dumps(payload).encode()))


@dataclass
class _Invocation:
    status: str
    details: str
    code: int
    stdout: str = ""
    stderr: str = ""
    reads: int = 0


@dataclass
class RunCommandEmulation:
    instances: set[str]
    lag: int = 1
    in_progress: int = 1
    deliver_twice: set[int] = field(default_factory=set)
    tamper: Callable[[str], str] | None = None
    outcomes: list[tuple[str, str, int]] = field(default_factory=list)
    sends: int = 0  # SendCommand calls (a retried one counts once)
    runs: list[str] = field(default_factory=list)  # every command run, in order (a twice-delivered one twice)
    _invocations: dict[tuple[str, str], _Invocation] = field(default_factory=dict)

    def install(self, events: Any) -> None:
        events.register_first("before-send.ssm.SendCommand", self._send_command)
        events.register_first("before-send.ssm.GetCommandInvocation", self._get_invocation)

    def _refuse(self, request: Any, code: str) -> AWSResponse:
        response = error_response(request.url, "ssm", code)
        request.url = _ANSWERED
        return response

    def _send_command(self, request: Any, **_: Any) -> AWSResponse:
        body = json.loads(request.body)
        attempt = int((getattr(request, "context", {}).get("retries") or {}).get("attempt", 1))
        if body.get("DocumentName") != "AWS-RunShellScript":
            return self._refuse(request, "InvalidDocument")
        instance_ids = list(body.get("InstanceIds") or [])
        if not instance_ids or any(i not in self.instances for i in instance_ids):
            return self._refuse(request, "InvalidInstanceId")
        if attempt == 1:
            self.sends += 1
        parameters = body.get("Parameters") or {}
        command = "\n".join(parameters.get("commands") or [])
        timeout = float((parameters.get("executionTimeout") or ["3600"])[0])
        command_id = str(uuid.uuid4())
        for instance_id in instance_ids:
            self._invocations[(command_id, instance_id)] = self._run(command, timeout)
        if attempt == 1 and self.sends in self.deliver_twice:
            return self._lost(request)
        request.url = _ANSWERED
        return json_response(request.url, {"Command": {"CommandId": command_id, "Status": "Pending"}})

    def _lost(self, request: Any) -> AWSResponse:
        response = error_response(request.url, "ssm", "InternalServerError", status=500)
        request.url = _ANSWERED
        return response

    def _run(self, command: str, timeout: float) -> _Invocation:
        if self.outcomes:
            status, details, code = self.outcomes.pop(0)
            return _Invocation(status, details, code)
        if self.tamper is not None:
            command = self.tamper(command)
        self.runs.append(command)
        try:
            done = subprocess.run(["/bin/sh", "-c", command], capture_output=True, timeout=timeout, check=False)
        except subprocess.TimeoutExpired as e:
            out = (e.stdout or b"").decode("utf-8", "replace")
            return _Invocation("TimedOut", "ExecutionTimedOut", 1, out[:STDOUT_LIMIT])
        state = "Success" if done.returncode == 0 else "Failed"
        return _Invocation(
            state,
            state,
            done.returncode,
            done.stdout.decode("utf-8", "replace")[:STDOUT_LIMIT],
            done.stderr.decode("utf-8", "replace")[:STDERR_LIMIT],
        )

    def _get_invocation(self, request: Any, **_: Any) -> AWSResponse:
        body = json.loads(request.body)
        key = (str(body.get("CommandId")), str(body.get("InstanceId")))
        invocation = self._invocations.get(key)
        if invocation is None:
            return self._refuse(request, "InvocationDoesNotExist")
        invocation.reads += 1
        request.url = _ANSWERED
        answer: dict[str, Any] = {"CommandId": key[0], "InstanceId": key[1], "DocumentName": "AWS-RunShellScript"}
        if invocation.reads <= self.lag:
            return self._refuse(request, "InvocationDoesNotExist")
        if invocation.reads <= self.lag + self.in_progress:
            answer.update(Status="InProgress", StatusDetails="InProgress", ResponseCode=-1)
        else:
            answer.update(
                Status=invocation.status,
                StatusDetails=invocation.details,
                ResponseCode=invocation.code,
                StandardOutputContent=invocation.stdout,
                StandardErrorContent=invocation.stderr,
            )
        return json_response(request.url, answer)


class XenConsole:
    """GetConsoleOutput(Latest=true) refused for instances of Xen instance types; see the module docstring."""

    def __init__(self, account: str, region: str) -> None:
        self.account = account
        self.region = region
        self.refused = 0

    def install(self, events: Any) -> None:
        events.register_first("before-send.ec2.GetConsoleOutput", self._console)

    def _console(self, request: Any, **_: Any) -> AWSResponse | None:
        body = request.body.decode() if isinstance(request.body, bytes) else str(request.body or "")
        query = {k: v[0] for k, v in parse_qs(body).items()}
        if query.get("Latest", "").lower() != "true":
            return None
        try:
            instance = ec2_backends[self.account][self.region].get_instance(query.get("InstanceId", ""))
        except InvalidInstanceIdError:
            return None  # moto answers InvalidInstanceID.NotFound, as EC2 does
        if INSTANCE_TYPES[instance.instance_type].get("Hypervisor") != "xen":
            return None
        self.refused += 1
        response = error_response(request.url, "ec2", "UnsupportedOperation")
        request.url = _ANSWERED
        return response


def managed(instances: Iterable[str]) -> RunCommandEmulation:
    """An emulation whose managed nodes are `instances`, answering without lag or InProgress reads."""
    return RunCommandEmulation(set(instances), lag=0, in_progress=0)
