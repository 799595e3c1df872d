"""SSM Run Command that really runs commands, and EC2's console on Xen instance types, emulated on moto (tested in
test_machine.py).

moto's SendCommand runs nothing and its invocation reports Success with empty output, so SsmMachine's shell (the
upload key, sealed uploads in parts, their SHA-256 check, the compressed read) would go untested. `RunCommandEmulation`
answers SendCommand, GetCommandInvocation and ListCommands itself — a botocore `before-send` handler on the test's
boto3 session, ahead of moto, through botocore's real response parsing and retry handler — and runs each
AWS-RunShellScript command with /bin/sh on this host. Tests point `machine.STAGE` and every path they use at a
temporary folder.

What AWS documents (SSM API reference: SendCommand, GetCommandInvocation, ListCommands, Command; user guide,
"Understanding command statuses", "Creating SSM document content"), and the emulation keeps:
- SendCommand: a document other than AWS-RunShellScript (the only one emulated) → InvalidDocument; an instance that
  is not a managed node → InvalidInstanceId; a Comment over 100 characters → ValidationException; a document whose
  content with the parameters given exceeds 64 KB ("This quota also includes the content specified for input
  parameters at runtime") → MaxDocumentSizeExceeded. AWS does not say how it counts; the emulation counts the UTF-8
  bytes of AWS-RunShellScript's content (`RUN_SHELL_SCRIPT`) plus those of the parameters as JSON. The answer holds
  Command.CommandId.
- GetCommandInvocation: a command id and instance that match no invocation → InvocationDoesNotExist, which is also
  what comes back right after SendCommand for a moment (`lag` reads); then the invocation is InProgress
  (`in_progress` reads), then terminal.
- ListCommands: the commands sent, newest first, each with its Comment and its Parameters in full (what anyone with
  ssm:ListCommands can read for 30 days); InstanceId and the Filters InvokedAfter/InvokedBefore (timestamps) narrow
  them; MaxResults 1–50 (else ValidationException), at most 5 filters with keys of the documented enum (else
  InvalidFilterKey), a malformed instance id → InvalidInstanceId, a NextToken it did not hand out → InvalidNextToken.
  A command shows only after `list_lag` ListCommands calls have passed since it was sent (AWS promises no read-after-
  write consistency for it).
- StandardOutputContent is the first 24,000 characters of stdout, StandardErrorContent the first 8,000 of stderr.
- A command still running after its `executionTimeout` is stopped: StatusDetails ExecutionTimedOut. AWS documents
  that this counts as a failure "with a non-zero reply" but not which `Status` comes with it; the emulation answers
  TimedOut with ResponseCode 1, and the tests script the Failed variant too (`outcomes`).

Faults a test can ask for (SendCommand requests are numbered from 1 as they arrive, every attempt counted):
- `lose_answer`: requests SSM takes (the command runs) whose answer is lost: an HTTP 500 InternalServerError, or a
  read timeout when `lost_as` is "timeout". A client that retries sends it again and it runs again.
- `throttle`: requests refused with ThrottlingException (HTTP 400), nothing taken.
- `tamper`: rewrites a command before it runs (bytes damaged on the way).
- `outcomes`: scripted (Status, StatusDetails, ResponseCode) answers for the next invocations, instead of running them.

`XenConsole` answers GetConsoleOutput with Latest=true for an instance whose type runs on the Xen hypervisor (t2, m4,
c4, …, as DescribeInstanceTypes says: moto's own instance type data) with UnsupportedOperation, as EC2 does: "the
latest serial console output … is supported on instance types that use the Nitro hypervisor". Everything else goes on
to moto.
"""

from __future__ import annotations

import json
import re
import subprocess
import uuid
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any
from urllib.parse import parse_qs

from botocore.awsrequest import AWSResponse
from botocore.exceptions import ReadTimeoutError
from moto.ec2.exceptions import InvalidInstanceIdError
from moto.ec2.models import ec2_backends
from moto.ec2.models.instance_types import INSTANCE_TYPES
from moto_emulation import _Raw, error_response

# An answer given here must not also reach moto (it would run the request too): point it where no backend matches.
_ANSWERED = "https://amiforge-emulated.invalid/"
STDOUT_LIMIT = 24_000
STDERR_LIMIT = 8_000
COMMENT_LIMIT = 100
DOCUMENT_LIMIT = 64 * 1024  # bytes: the document's content and the parameters given at runtime
MAX_RESULTS = 50
FILTER_KEYS = {"InvokedAfter", "InvokedBefore", "Status", "ExecutionStage", "DocumentName"}
_INSTANCE_ID = re.compile(r"(^i-(\w{8}|\w{17})$)|(^mi-\w{17}$)")  # the model's InstanceId pattern

# AWS-RunShellScript as `aws ssm get-document --name AWS-RunShellScript` gives it (schema 1.2).
RUN_SHELL_SCRIPT = json.dumps(
    {
        "schemaVersion": "1.2",
        "description": "Run a shell script or specify the commands to run.",
        "parameters": {
            "commands": {
                "type": "StringList",
                "description": "(Required) Specify a shell script or a command to run.",
                "minItems": 1,
                "displayType": "textarea",
            },
            "workingDirectory": {
                "type": "String",
                "default": "",
                "description": "(Optional) The path to the working directory on your instance.",
                "maxChars": 4096,
            },
            "executionTimeout": {
                "type": "String",
                "default": "3600",
                "description": "(Optional) The time in seconds for a command to complete before it is considered to "
                "have failed. Default is 3600 (1 hour). Maximum is 172800 (48 hours).",
                "allowedPattern": "([1-9][0-9]{0,4})|(1[0-6][0-9]{4})|(17[0-1][0-9]{3})|(172[0-7][0-9]{2})|(172800)",
            },
        },
        "runtimeConfig": {
            "aws:runShellScript": {
                "properties": [
                    {
                        "id": "0.aws:runShellScript",
                        "runCommand": "{{ commands }}",
                        "workingDirectory": "{{ workingDirectory }}",
                        "timeoutSeconds": "{{ executionTimeout }}",
                    }
                ]
            }
        },
    },
    indent=4,
)


def json_response(url: str, payload: dict[str, Any]) -> AWSResponse:
    return AWSResponse(url, 200, {"Content-Type": "application/x-amz-json-1.1"}, _Raw(json.dumps(payload).encode()))


def document_size(parameters: dict[str, Any]) -> int:
    """What a SendCommand of AWS-RunShellScript with `parameters` counts against the 64 KB document quota here."""
    return len(RUN_SHELL_SCRIPT.encode()) + len(json.dumps(parameters, ensure_ascii=False).encode())


@dataclass
class _Invocation:
    status: str
    details: str
    code: int
    stdout: str = ""
    stderr: str = ""
    reads: int = 0


@dataclass
class SentCommand:
    """A command as SSM keeps it (ListCommands' `Command`)."""

    command_id: str
    comment: str
    parameters: dict[str, Any]
    instance_ids: list[str]
    requested: datetime
    lists_before_visible: int


@dataclass
class RunCommandEmulation:
    instances: set[str]
    lag: int = 1
    in_progress: int = 1
    list_lag: int = 0
    lose_answer: set[int] = field(default_factory=set)
    lost_as: str = "500"
    throttle: set[int] = field(default_factory=set)
    tamper: Callable[[str], str] | None = None
    outcomes: list[tuple[str, str, int]] = field(default_factory=list)
    sends: int = 0  # SendCommand requests received, every attempt counted
    runs: list[str] = field(default_factory=list)  # every command run, in order (one taken twice, twice)
    sent: list[SentCommand] = field(default_factory=list)  # every command SSM took, oldest first
    _invocations: dict[tuple[str, str], _Invocation] = field(default_factory=dict)
    _tokens: dict[str, int] = field(default_factory=dict)

    def install(self, events: Any) -> None:
        events.register_first("before-send.ssm.SendCommand", self._send_command)
        events.register_first("before-send.ssm.GetCommandInvocation", self._get_invocation)
        events.register_first("before-send.ssm.ListCommands", self._list_commands)

    def _refuse(self, request: Any, code: str, status: int = 400) -> AWSResponse:
        response = error_response(request.url, "ssm", code, status=status)
        request.url = _ANSWERED
        return response

    def _send_command(self, request: Any, **_: Any) -> AWSResponse:
        body = json.loads(request.body)
        if body.get("DocumentName") != "AWS-RunShellScript":
            return self._refuse(request, "InvalidDocument")
        instance_ids = list(body.get("InstanceIds") or [])
        if not instance_ids or any(i not in self.instances for i in instance_ids):
            return self._refuse(request, "InvalidInstanceId")
        comment = str(body.get("Comment") or "")
        if len(comment) > COMMENT_LIMIT:
            return self._refuse(request, "ValidationException")
        parameters = body.get("Parameters") or {}
        if document_size(parameters) > DOCUMENT_LIMIT:
            return self._refuse(request, "MaxDocumentSizeExceeded")
        self.sends += 1
        number = self.sends
        if number in self.throttle:
            return self._refuse(request, "ThrottlingException")
        command = "\n".join(parameters.get("commands") or [])
        timeout = float((parameters.get("executionTimeout") or ["3600"])[0])
        command_id = str(uuid.uuid4())
        self.sent.append(SentCommand(command_id, comment, parameters, instance_ids, datetime.now(UTC), self.list_lag))
        for instance_id in instance_ids:
            self._invocations[(command_id, instance_id)] = self._run(command, timeout)
        if number in self.lose_answer:
            return self._lost(request)
        request.url = _ANSWERED
        return json_response(request.url, {"Command": {"CommandId": command_id, "Status": "Pending"}})

    def _lost(self, request: Any) -> AWSResponse:
        if self.lost_as == "timeout":
            request.url = _ANSWERED
            raise ReadTimeoutError(endpoint_url="https://ssm.amazonaws.com/")
        return self._refuse(request, "InternalServerError", status=500)

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

    def _list_commands(self, request: Any, **_: Any) -> AWSResponse:
        body = json.loads(request.body)
        visible = [c for c in self.sent if c.lists_before_visible == 0]
        for command in self.sent:  # each ListCommands call brings a lagging command closer to being shown
            command.lists_before_visible = max(0, command.lists_before_visible - 1)
        limit = int(body.get("MaxResults") or MAX_RESULTS)
        filters = list(body.get("Filters") or [])
        if not 1 <= limit <= MAX_RESULTS or len(filters) > 5:
            return self._refuse(request, "ValidationException")
        if any(f.get("key") not in FILTER_KEYS for f in filters):
            return self._refuse(request, "InvalidFilterKey")
        instance_id = body.get("InstanceId")
        if instance_id is not None and not _INSTANCE_ID.search(str(instance_id)):
            return self._refuse(request, "InvalidInstanceId")
        after = [_timestamp(f["value"]) for f in filters if f["key"] == "InvokedAfter"]
        before = [_timestamp(f["value"]) for f in filters if f["key"] == "InvokedBefore"]
        if None in after or None in before:
            return self._refuse(request, "ValidationException")
        shown = [
            c
            for c in reversed(visible)
            if (instance_id is None or instance_id in c.instance_ids)
            and all(t is not None and c.requested >= t for t in after)
            and all(t is not None and c.requested < t for t in before)
        ]
        token = body.get("NextToken")
        start = 0
        if token is not None:
            if token not in self._tokens:
                return self._refuse(request, "InvalidNextToken")
            start = self._tokens[token]
        page = shown[start : start + limit]
        answer: dict[str, Any] = {"Commands": [_listed(c) for c in page]}
        if start + limit < len(shown):
            next_token = uuid.uuid4().hex
            self._tokens[next_token] = start + limit
            answer["NextToken"] = next_token
        request.url = _ANSWERED
        return json_response(request.url, answer)


def _timestamp(value: str) -> datetime | None:
    try:
        parsed = datetime.fromisoformat(value.replace("Z", "+00:00"))
    except ValueError:
        return None
    return parsed if parsed.tzinfo is not None else parsed.replace(tzinfo=UTC)


def _listed(command: SentCommand) -> dict[str, Any]:
    return {
        "CommandId": command.command_id,
        "DocumentName": "AWS-RunShellScript",
        "Comment": command.comment,
        "Parameters": command.parameters,
        "InstanceIds": command.instance_ids,
        "RequestedDateTime": command.requested.timestamp(),
        "Status": "Success",
    }


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
