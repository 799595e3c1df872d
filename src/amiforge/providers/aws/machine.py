"""A running EC2 instance as a `Machine`: commands through SSM Run Command, the serial console through EC2.

`SsmMachine` needs no SSH key and no open port: the instance needs only the SSM agent and an instance profile that lets
it talk to SSM. (`providers/aws/ssh.py` is the other communicator, for images without the agent.) `run()` sends one
`AWS-RunShellScript` command and polls `GetCommandInvocation` with doubling delays until the invocation reaches a
terminal status (right after SendCommand the invocation may not exist yet: normal, retried).

Limits SSM imposes, and how they are kept:
- a command's parameters are limited in size, so a script longer than `MAX_COMMAND_CHARS` is uploaded first and then
  run from that file. `put_file()` uploads in numbered parts, each written with `>` to a file of its own, so a
  SendCommand that SSM delivers twice (botocore retries a send whose answer was lost) rewrites the same part instead
  of appending it again; the parts are then joined in order and installed only if the SHA-256 of the joined bytes is
  the one computed here;
- `StandardOutputContent` is cut at 24,000 characters, so `read_file()` reads a gzip copy of the file in base64
  slices that each fit (a dpkg status of 671 KB, 749 packages: 11 SendCommands instead of 43 uncompressed).

What the SSM agent keeps on the instance (every command's script and output, uploaded parts included) must not ship
in an image: `SsmMachine.leftovers()` names it and `Leftovers.script()` removes it (see `Leftovers`).
"""

from __future__ import annotations

import base64
import gzip
import hashlib
import posixpath
import re
import shlex
import time
import uuid
import zlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

from amiforge.awsapi.clients import AwsSession, call, eventually, iam_action
from amiforge.awsapi.errors import CAUGHT, aws_code, translate
from amiforge.errors import AmiforgeError, ConfigError, InfraError, NotFound

__all__ = [
    "MAX_COMMAND_CHARS",
    "SSM_AGENT_LOGS",
    "SSM_AGENT_STATE",
    "STAGE",
    "CommandResult",
    "ConsoleReader",
    "Leftovers",
    "Machine",
    "MachineFactory",
    "SsmMachine",
    "digest_mismatch",
    "install_script",
    "scrub_unit",
]

# Where uploads and oversized scripts are staged on the instance (a tmpfs; generalisation never sees it in the image).
STAGE = "/run/amiforge"
# Conservative bound for one `commands` value: SSM's documented parameter limits are well above this.
MAX_COMMAND_CHARS = 32_000
# base64 characters per uploaded part: the rest of the command (paths, printf) fits in the remaining 200.
PART_CHARS = MAX_COMMAND_CHARS - 200
# Raw bytes per read slice: base64 of 16,000 bytes is 21,336 characters, under SSM's 24,000-character output cut.
READ_SLICE = 16_000
# SendCommand's TimeoutSeconds is the *delivery* timeout (the agent must pick the command up within it).
DELIVERY_TIMEOUT = 600
# How long after `timeout` the poller still waits for SSM to report the end of a command it timed out.
POLL_GRACE = 60.0
# The SSM agent's state (per instance: every command's document, script and output) and its logs.
SSM_AGENT_STATE = "/var/lib/amazon/ssm"
SSM_AGENT_LOGS = "/var/log/amazon/ssm"

# `Status` (the model's CommandInvocationStatus enum) of an invocation that has not ended yet.
_RUNNING = {"Pending", "InProgress", "Delayed", "Cancelling"}
# `StatusDetails` (a free string in the model; these are the values AWS documents) that explain how it ended.
_NOT_DELIVERED = {"DeliveryTimedOut", "Undeliverable"}
_CANCELLED = {"Cancelled", "Terminated"}
# Exit code of install_script when the uploaded bytes are not the ones sent (EX_DATAERR).
_DIGEST_MISMATCH = 65


@dataclass(frozen=True)
class CommandResult:
    exit_code: int
    stdout: str
    stderr: str


_SHELL_SAFE = re.compile(r"[A-Za-z0-9_./@%+=:,*-]+")
_KEY_BLOB = re.compile(r"[A-Za-z0-9+/]+={0,3}")


@dataclass(frozen=True)
class Leftovers:
    """What a communicator leaves on the instance that must not ship in the image, and the shell that removes it.

    The contract, for the bake's generalisation: append `script()` to the generalise step (it runs as root, under
    `set -e`) — the last command the bake sends through this machine. After it, the machine may refuse further
    commands (the SSH key it logged in with is gone). Then stop the instance cleanly (StopInstances) before
    CreateImage: `at_shutdown` is removed while the instance shuts down.

    - `paths`: removed at once, recursively (shell globs allowed).
    - `command_records`: folders (shell globs allowed) holding one entry per command the communicator ran; every
      entry is removed at once but that of the command running the script — `$SSM_COMMAND_ID` (SSM agents since
      3.0.284 set it), else the newest entry — which the agent is still writing.
    - `at_shutdown`: removed after the communicator itself has stopped, as the instance shuts down: the SSM agent
      writes the script and output of the very command that runs `script()` into its state directory after that
      command ends, so removing that directory from inside the command cannot be the last word. A unit under
      /run/systemd/system (a tmpfs: the unit never reaches the image) removes them once the agent is stopped; without
      systemd they are removed at once. No globs (systemd does not expand them).
    - `authorized_key`: the base64 blob of a throw-away public key. Every line holding it is deleted from every
      user's ~/.ssh/authorized_keys and authorized_keys2 (cloud-init writes the EC2 key pair for the default user,
      and with a `command=` prefix for root); every other line, and each file's owner and mode, stay.
    """

    paths: tuple[str, ...] = ()
    command_records: tuple[str, ...] = ()
    at_shutdown: tuple[str, ...] = ()
    authorized_key: str | None = None

    def __post_init__(self) -> None:
        for path in (*self.paths, *self.command_records, *self.at_shutdown):
            if not path.startswith("/") or _SHELL_SAFE.fullmatch(path) is None or "/../" in f"{path}/":
                raise ConfigError(f"leftover path {path!r} is not an absolute path of plain characters")
        for path in self.at_shutdown:
            if "*" in path:
                raise ConfigError(f"leftover path {path!r} is removed by systemd at shutdown, which expands no globs")
        if self.authorized_key is not None and _KEY_BLOB.fullmatch(self.authorized_key) is None:
            raise ConfigError("the authorized key to remove is not the base64 blob of a public key")

    def script(self) -> str:
        """POSIX shell that removes all of it (empty when there is nothing to remove)."""
        parts: list[str] = []
        if self.paths:
            parts.append("rm -rf -- " + " ".join(self.paths) + "\n")
        if self.command_records:
            parts.append(_REMOVE_RECORDS.format(folders=" ".join(self.command_records)))
        if self.authorized_key:
            parts.append(_REMOVE_KEY.format(blob=self.authorized_key))
        if self.at_shutdown:
            listed = " ".join(self.at_shutdown)
            parts.append(_SCRUB_AT_SHUTDOWN.format(unit=SCRUB_UNIT, text=scrub_unit(self.at_shutdown), paths=listed))
        return "".join(parts)


SCRUB_UNIT = "amiforge-scrub.service"

# `ls -t` for agents that do not say which command runs: the newest entry is the one being written.
_REMOVE_RECORDS = """\
for d in {folders}; do
    [ -d "$d" ] || continue
    keep=${{SSM_COMMAND_ID:-$(ls -t "$d" | head -n 1)}}
    for e in "$d"/* "$d"/.[!.]*; do
        [ -e "$e" ] || [ -L "$e" ] || continue
        case "${{e##*/}}" in "$keep"*) [ -n "$keep" ] && continue ;; esac
        rm -rf -- "$e"
    done
done
"""

# Every home directory in the password database, so a key is found wherever cloud-init put it.
_REMOVE_KEY = """\
getent passwd | cut -d: -f6 | sort -u | while read -r home; do
    for f in "$home/.ssh/authorized_keys" "$home/.ssh/authorized_keys2"; do
        if [ -f "$f" ] && grep -qF -- '{blob}' "$f"; then
            grep -vF -- '{blob}' "$f" > "$f.amiforge-tmp" || true
            cat "$f.amiforge-tmp" > "$f"
            rm -f "$f.amiforge-tmp"
        fi
    done
done
"""

_SCRUB_AT_SHUTDOWN = """\
if [ -d /run/systemd/system ]; then
    cat > /run/systemd/system/{unit} <<'AMIFORGE_UNIT'
{text}AMIFORGE_UNIT
    systemctl daemon-reload
    systemctl start {unit}
else
    rm -rf -- {paths}
fi
"""


def scrub_unit(paths: Sequence[str]) -> str:
    """A unit that removes `paths` when it stops. It is ordered before the SSM agent's units (Debian/Amazon Linux
    package, Ubuntu snap), so at shutdown — which stops units in reverse order — it stops after the agent, and
    before the file systems holding the paths are unmounted."""
    mounts = " ".join(sorted({posixpath.dirname(p.rstrip("/")) or "/" for p in paths}))
    return (
        "[Unit]\n"
        "Description=amiforge: remove what the build left, once its communicator has stopped\n"
        "DefaultDependencies=no\n"
        "Conflicts=shutdown.target\n"
        "Before=shutdown.target amazon-ssm-agent.service snap.amazon-ssm-agent.amazon-ssm-agent.service\n"
        "After=local-fs.target\n"
        f"RequiresMountsFor={mounts}\n"
        "\n"
        "[Service]\n"
        "Type=oneshot\n"
        "RemainAfterExit=yes\n"
        "ExecStart=/bin/true\n"
        f"ExecStop=/bin/rm -rf -- {' '.join(paths)}\n"
    )


def install_script(
    staged: str, path: str, mode: int, sha256: str, *, scratch: Sequence[str] = (), produce: str = ""
) -> str:
    """POSIX shell, run as root, that installs the bytes uploaded to `staged` at `path` with `mode`, atomically (a
    temporary file beside `path`, renamed over it; parents created), only if their SHA-256 is `sha256`: otherwise it
    exits 65 and says so on stderr. `produce` (shell lines, run under `set -e`) makes `staged` first, if needed.
    `staged`, the temporary file and `scratch` (shell words: globs are expanded) are removed whatever happens."""
    q = shlex.quote
    tmp = f"{path}.amiforge-tmp"
    parent = posixpath.dirname(path) or "/"
    leftovers = " ".join([q(staged), q(tmp), *scratch])
    return (
        f"cleanup() {{ rm -f -- {leftovers}; }}\n"
        "trap cleanup EXIT\n"
        "set -e\n"
        f"{produce}"
        f"sum=$(sha256sum < {q(staged)} | cut -c1-64)\n"
        f'if [ "$sum" != {sha256} ]; then\n'
        f'    echo "amiforge: {q(path)[:200]}: the uploaded bytes have SHA-256 $sum, not {sha256}" >&2\n'
        f"    exit {_DIGEST_MISMATCH}\n"
        "fi\n"
        f"(umask 022; mkdir -p -- {q(parent)})\n"
        f"rm -f -- {q(tmp)}\n"
        f"(umask 077; cat < {q(staged)} > {q(tmp)})\n"
        f"chmod {mode:o} {q(tmp)}\n"
        f"mv -fT -- {q(tmp)} {q(path)}\n"
    )


def digest_mismatch(result: CommandResult) -> bool:
    """Whether an install_script run failed because the bytes that arrived were not the ones sent."""
    return result.exit_code == _DIGEST_MISMATCH and "the uploaded bytes have SHA-256" in result.stderr


class Machine(Protocol):
    """A running guest: SSM Run Command or SSH on AWS, a fake in tests (docs/architecture.md §2).

    `run` runs argv as root and returns its exit code and output, raising InfraError when it cannot say (not
    delivered, timed out after `timeout` seconds, connection lost); `put_file` writes atomically as root;
    `read_file` reads as root; `console` is the serial console so far; `leftovers` is what the communicator left on
    the instance that the generalisation must remove (see `Leftovers`)."""

    def run(self, argv: Sequence[str], *, timeout: float) -> CommandResult: ...

    def put_file(self, path: str, data: bytes, mode: int = 0o644) -> None: ...

    def read_file(self, path: str) -> bytes: ...

    def console(self) -> str: ...

    def leftovers(self) -> Leftovers: ...


# (session, region, instance id) -> Machine: how bake and boot test get at an instance; tests inject fakes.
MachineFactory = Callable[[AwsSession, str, str], Machine]


# --- the serial console -----------------------------------------------------------------------------------------

# What EC2 answers when GetConsoleOutput(Latest=True) is asked of an instance type that cannot give it (the Xen types:
# t2, m4, c4, …; only Nitro types can). UnsupportedOperation is EC2's code for a request the resource does not
# support; the parameter codes are taken too, but the fallback sticks only when the same call without Latest works.
_LATEST_REFUSED = {"UnsupportedOperation", "Unsupported", "InvalidParameterValue", "InvalidParameterCombination"}


class ConsoleReader:
    """The serial console of one instance, as EC2 has captured it so far ('' if nothing yet).

    It asks with Latest=True (the console as it is now, on Nitro instances); when EC2 refuses that for the instance
    type, it asks without Latest (the buffered output EC2 posts after boot and state changes) for the rest of its
    life, so a Xen instance costs one refused call, not one per read."""

    def __init__(self, session: AwsSession, region: str, instance_id: str) -> None:
        self.session = session
        self.region = region
        self.instance_id = instance_id
        self.latest = True

    def read(self) -> str:
        ec2 = self.session.client("ec2", self.region)
        if not self.latest:
            return _decoded(call(ec2, "GetConsoleOutput", self.instance_id, InstanceId=self.instance_id))
        try:
            answer = ec2.get_console_output(InstanceId=self.instance_id, Latest=True)
        except CAUGHT as e:
            if aws_code(e) not in _LATEST_REFUSED:
                raise translate(e, iam_action(ec2, "GetConsoleOutput"), self.instance_id) from e
            answer = call(ec2, "GetConsoleOutput", self.instance_id, InstanceId=self.instance_id)
            self.latest = False  # only once the call without Latest has worked: it was Latest that was refused
        return _decoded(answer)


def _decoded(answer: Any) -> str:
    output = str(answer.get("Output") or "")
    # botocore normally decodes it already; decode only what is unmistakably base64 of UTF-8 text.
    if not output or len(output) % 4 or re.fullmatch(r"[A-Za-z0-9+/]+=*", output) is None:
        return output
    try:
        return base64.b64decode(output, validate=True).decode("utf-8")
    except ValueError:
        return output


# --- SSM Run Command --------------------------------------------------------------------------------------------


class _StillRunning(AmiforgeError):
    """The invocation exists but has not finished: poll again."""


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
        self._console = ConsoleReader(session, region, instance_id)

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
                "endpoints, and an image that runs the SSM agent (or use the SSH communicator)",
            ) from e
        command_id = str(sent["Command"]["CommandId"])

        def finished() -> dict[str, Any]:
            answer = self._invocation(ssm, command_id)
            if answer.get("Status") in _RUNNING:
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
        return self._result(command_id, answer, execution)

    def _result(self, command_id: str, answer: dict[str, Any], execution: int) -> CommandResult:
        """The command's result, judged by `StatusDetails` (how it ended) rather than `Status`: the values that say a
        command was never delivered or ran out of time exist only there, and an execution timeout can come with an
        exit code that must not pass for the command's own."""
        status = str(answer.get("Status") or "")
        detail = str(answer.get("StatusDetails") or status).replace(" ", "")
        raw_code = answer.get("ResponseCode")
        code = int(raw_code) if raw_code is not None else -1
        what = f"SSM command {command_id} on {self.instance_id}"
        if detail == "ExecutionTimedOut":
            raise InfraError(
                f"{what} did not finish within its {execution}s (SSM stopped it: {status}, {detail})",
                fix="raise the step's timeout, or look for what the step waits on",
            )
        if detail in ("Success", "Failed") and status in ("Success", "Failed") and code >= 0:
            return CommandResult(
                code, str(answer.get("StandardOutputContent") or ""), str(answer.get("StandardErrorContent") or "")
            )
        if detail in _NOT_DELIVERED:
            raise InfraError(
                f"{what} was not delivered ({status}, {detail})",
                retryable=True,
                fix="check that the instance runs the SSM agent, reaches the SSM endpoints, and its instance profile "
                "allows SSM",
            )
        if detail in _CANCELLED:
            raise InfraError(f"{what} was cancelled ({status}, {detail})", fix="see who cancelled it in CloudTrail")
        raise InfraError(
            f"{what} ended {status} ({detail}) without an exit code",
            fix="check that the instance runs the SSM agent and its instance profile allows SSM "
            "(aws ssm get-command-invocation --details)",
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
        """Write `data` to `path` (parents created), mode `mode`, atomically, checked against its SHA-256.

        Each part goes to a file of its own (`>`), so a part SSM delivers twice is written twice, not appended twice."""
        q = shlex.quote
        encoded = base64.b64encode(data).decode()
        upload = f"{STAGE}/put-{uuid.uuid4().hex[:12]}"
        pieces = [encoded[i : i + PART_CHARS] for i in range(0, len(encoded), PART_CHARS)] or [""]
        for n, piece in enumerate(pieces, start=1):
            part = q(f"{upload}.part-{n:04d}")
            self._check(
                self._send(f"set -e; umask 077; mkdir -p {q(STAGE)}; printf '%s' {q(piece)} > {part}", 120),
                f"upload of {path} (part {n}/{len(pieces)})",
            )
        # Joined in order by number (printf pads as the names were padded), decoded, then checked and installed.
        encoded_file, staged = q(f"{upload}.b64"), f"{upload}.bin"
        join = (
            f"umask 077; i=1; while [ $i -le {len(pieces)} ]; do "
            f"cat \"$(printf '%s.part-%04d' {q(upload)} $i)\"; i=$((i + 1)); done > {encoded_file}\n"
            f"base64 -d {encoded_file} > {q(staged)}\n"
        )
        install = install_script(
            staged,
            path,
            mode,
            hashlib.sha256(data).hexdigest(),
            scratch=[f"{q(upload)}.part-*", encoded_file],
            produce=join,
        )
        result = self._send(install, 120)
        if digest_mismatch(result):
            raise InfraError(
                f"upload of {path} to {self.instance_id} arrived damaged: {result.stderr.strip()[-300:]}",
                retryable=True,
                fix="re-run; the damaged upload was removed",
            )
        self._check(result, f"upload of {path}")

    def read_file(self, path: str) -> bytes:
        """The bytes of `path`: gzip-compressed on the instance, read in slices that each fit in SSM's output limit."""
        q = shlex.quote
        packed = q(f"{STAGE}/get-{uuid.uuid4().hex[:12]}.gz")
        first = (
            f"set -e; umask 077; mkdir -p {q(STAGE)}\n"
            f"gzip -c -- {q(path)} > {packed} || {{ rm -f {packed}; exit 1; }}\n"
            f"size=$(stat -c %s {packed}); echo $size\n"
            f"head -c {READ_SLICE} {packed} | base64 -w0\n"
            f"if [ $size -le {READ_SLICE} ]; then rm -f {packed}; fi\n"
        )
        head, _, first_slice = self._check(self._send(first, 120), f"read {path}").stdout.partition("\n")
        if not re.fullmatch(r"\d+", head.strip()):
            raise InfraError(f"read {path} on {self.instance_id} answered {head[:80]!r}, not a size")
        size = int(head)
        data = bytearray(base64.b64decode(first_slice.strip()))
        while len(data) < size:
            last = len(data) + READ_SLICE >= size
            cmd = f"tail -c +{len(data) + 1} {packed} | head -c {READ_SLICE} | base64 -w0"
            piece = base64.b64decode(
                self._check(self._send(cmd + (f"; rm -f {packed}" if last else ""), 120), f"read {path}").stdout.strip()
            )
            if not piece:
                raise InfraError(
                    f"read {path} on {self.instance_id}: its compressed copy {packed} ended at {len(data)} of "
                    f"{size} bytes",
                    retryable=True,
                )
            data += piece
        try:
            return gzip.decompress(bytes(data))
        except (OSError, EOFError, zlib.error) as e:
            raise InfraError(
                f"read {path} on {self.instance_id}: the compressed copy is damaged ({e})", retryable=True
            ) from e

    # --- console and leftovers --------------------------------------------------------------------------------

    def console(self) -> str:
        """The serial console output EC2 has captured so far ('' if none yet); see ConsoleReader."""
        return self._console.read()

    def leftovers(self) -> Leftovers:
        """The SSM agent's record of this instance (every command's document, script and output, so every uploaded
        file): the commands before the generalisation's at once, the rest with the agent's logs at shutdown, once the
        agent has stopped. STAGE is a tmpfs: nothing there reaches the image."""
        records = f"{SSM_AGENT_STATE}/{self.instance_id}/document"
        return Leftovers(
            command_records=(f"{records}/orchestration", f"{records}/state/*"),
            at_shutdown=(f"{SSM_AGENT_STATE}/{self.instance_id}", SSM_AGENT_LOGS),
        )
