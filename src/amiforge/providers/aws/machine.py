"""A running EC2 instance as a `Machine`: commands through SSM Run Command, the serial console through EC2.

`SsmMachine` needs no SSH key and no open port: the instance needs only the SSM agent and an instance profile that lets
it talk to SSM. (`providers/aws/ssh.py` is the other communicator, for images without the agent.) `run()` sends one
`AWS-RunShellScript` command and polls `GetCommandInvocation` with doubling delays until the invocation reaches a
terminal status (right after SendCommand the invocation may not exist yet: normal, retried).

What SSM keeps of a command, and why uploads are sealed. SSM returns every command's parameters in full to anyone
allowed `ssm:ListCommands` in the account for about 30 days, and the agent writes each command's script to the
instance's root volume (its orchestration folder), whose freed blocks end up in the image's snapshot even after the
generalisation removed the files. So the bytes of an upload (recipe files, which may be credentials) never travel in
clear: on first use the instance makes an RSA-3072 key pair in STAGE (a tmpfs, mode 0700; the key file 0600) with
`openssl genpkey` and answers its public key; each upload is encrypted here with a fresh data key (AES-256-CBC in
OpenSSL's `Salted__` format, the key and IV from PBKDF2-HMAC-SHA256 of the data key, as `openssl enc -pbkdf2` reads
it), the data key wrapped with RSA-OAEP-SHA256. The plaintext's SHA-256 is sealed too (its hex digest encrypted the
same way under the same data key, with a salt of its own): an unsalted digest of a short credential file would give
the file away to a brute force. Only the wrapped key and the two ciphertexts are sent. The instance unwraps the data
key into a file in STAGE (`openssl pkeyutl`; never on a command line), decrypts the expected digest into a file there
and the upload (`openssl enc -d -pass file:…`), checks the SHA-256 of the plaintext against the digest read from that
file and installs it; the data key, the digest and every intermediate file are removed whatever happens. The
private key never leaves STAGE, which no image contains. Commands themselves — the argv of `run()`, short step
commands — are recipe content that the recipe shows anyway and go in clear; what `read_file()` brings back (the
package list, a readiness file) is SSM command output, in clear too.

Limits SSM imposes, and how they are kept:
- "the content of the document must not exceed 64KB. This quota also includes the content specified for input
  parameters at runtime" (Systems Manager User Guide, "Creating SSM document content"; SendCommand refuses more with
  MaxDocumentSizeExceeded, "The size limit of a document is 64 KB"). AWS-RunShellScript's own content takes about
  1.3 KB of it, and how SSM counts the parameters (raw, JSON-escaped) is not documented, so a command goes inline only
  while its longest plausible encoding (`encoded_size`) is at most `MAX_COMMAND_CHARS`, half the quota. A longer
  script is uploaded first and then run from that file. `put_file()` uploads in numbered parts of that size, each
  written with `>` to a file of its own; the parts are joined in order, decrypted, and installed only if the SHA-256
  of the result is the one computed here;
- `StandardOutputContent` is cut at 24,000 characters, so `read_file()` reads a gzip copy of the file in base64
  slices that each fit (a dpkg status of 671 KB, 749 packages: 11 SendCommands instead of 43 uncompressed).

Sending a command once. A SendCommand that SSM took can still fail on the way back (a lost connection, a 5xx), and
sending it again would run it twice. So botocore never retries SendCommand (a single-attempt client); each command
carries a token of its own in `Comment`, and after a failure whose outcome is unknown the command is looked for with
ListCommands (this instance, sent since shortly before) before it is sent again. ListCommands may lag a moment behind,
so a command can still run twice in the rare case it stays invisible there for several seconds: every upload command
is safe to repeat (a part is rewritten; an install whose target already has the expected SHA-256 and mode is done).

What the SSM agent keeps on the instance (every command's script and output, uploaded parts included) must not ship
in an image: `SsmMachine.leftovers()` names it and `Leftovers.script()` removes it (see `Leftovers`).
"""

from __future__ import annotations

import base64
import gzip
import hashlib
import json
import logging
import os
import posixpath
import re
import secrets
import shlex
import time
import uuid
import zlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any, Protocol

from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes, padding, serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from cryptography.hazmat.primitives.asymmetric.padding import MGF1, OAEP
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes
from cryptography.hazmat.primitives.kdf.pbkdf2 import PBKDF2HMAC

from amiforge.awsapi.clients import AwsSession, iam_action, paginate
from amiforge.awsapi.errors import CAUGHT, translate
from amiforge.errors import AmiforgeError, ConfigError, InfraError, NotFound
from amiforge.providers.aws.console import ConsoleReader
from amiforge.waiting import Wait, retry

__all__ = [
    "MAX_COMMAND_CHARS",
    "SSM_AGENT_LOGS",
    "SSM_AGENT_STATE",
    "STAGE",
    "UPLOAD_KEY",
    "CommandResult",
    "Leftovers",
    "Machine",
    "MachineFactory",
    "SsmMachine",
    "digest_mismatch",
    "encoded_size",
    "install_script",
    "scrub_unit",
]

logger = logging.getLogger(__name__)

# Where uploads and oversized scripts are staged on the instance (a tmpfs; generalisation never sees it in the image).
STAGE = "/run/amiforge"
# The instance's upload key pair (private key, PEM), in STAGE.
UPLOAD_KEY = "upload-key.pem"
# The most `encoded_size` of one inline command: half of SSM's 64 KB document quota (see the module docstring).
MAX_COMMAND_CHARS = 32_000
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
# Exit codes of the upload scripts (sysexits): the bytes that arrived are not the ones sent (EX_DATAERR); the
# instance has no usable openssl (EX_UNAVAILABLE); the upload key is not the one the upload was sealed with, e.g. the
# instance rebooted and STAGE was emptied (EX_TEMPFAIL: made again, and the upload sent again).
_DAMAGED = 65
_NO_OPENSSL = 69
_KEY_CHANGED = 75
_DAMAGED_MARK = ": the uploaded bytes "
_KEY_CHANGED_MARK = "amiforge: the upload key changed"

# Sealing: RSA-OAEP-SHA256 with a 3072-bit key wraps a data key of 32 random bytes (as 64 hex characters: `openssl
# enc -pass file:` reads one line of text); AES-256-CBC with key and IV from PBKDF2-HMAC-SHA256. The data key is
# random, so the iterations add nothing; they are given explicitly because openssl's default may change.
_RSA_BITS = 3072
_PBKDF2_ITERATIONS = 10_000
_SALTED = b"Salted__"
# openssl binaries tried in order: Amazon Linux 2's `openssl` is 1.0.2, whose enc lacks -pbkdf2; its openssl11 has it.
_OPENSSL = ("openssl", "openssl11")

# Sending once (see the module docstring): SendCommands whose outcome was unknown and which ListCommands did not show,
# sent again at most this many times; how far back ListCommands looks (for the clock difference between this host and
# AWS); and the pauses between looks, for ListCommands to catch up with SendCommand.
_RESENDS = 3
_CLOCK_SKEW = timedelta(minutes=5)
_LOOKUP_PAUSES = (1.0, 2.0, 4.0)


def encoded_size(command: str) -> int:
    """The most characters `command` can count for against SSM's document quota: its JSON encoding with every
    non-ASCII character escaped (\\uXXXX) and <, > and & escaped too (as Go's JSON encoder writes them)."""
    return len(json.dumps(command)) + 5 * sum(command.count(c) for c in "<>&")


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

# Every home directory in the password database, so a key is found wherever cloud-init put it. grep exits 1 when it
# selects no line (the key is not in the file; every line of it was the key), 2 when it cannot read: then the file is
# left as it is and the script fails, never emptied or skipped. The new text is written into the same file (`cat >`),
# so its owner, mode, ACLs and SELinux label stay.
_REMOVE_KEY = """\
getent passwd | cut -d: -f6 | sort -u | while read -r home; do
    for f in "$home/.ssh/authorized_keys" "$home/.ssh/authorized_keys2"; do
        [ -f "$f" ] || continue
        found=0
        grep -qF -- '{blob}' "$f" || found=$?
        if [ "$found" -eq 1 ]; then continue; fi
        kept=0
        if [ "$found" -eq 0 ]; then grep -vF -- '{blob}' "$f" > "$f.amiforge-tmp" || kept=$?; fi
        if [ "$found" -gt 1 ] || [ "$kept" -gt 1 ]; then
            rm -f -- "$f.amiforge-tmp"
            printf 'amiforge: cannot read %s to remove the build key from it\\n' "$f" >&2
            exit 1
        fi
        cat "$f.amiforge-tmp" > "$f"
        rm -f -- "$f.amiforge-tmp"
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
    staged: str,
    path: str,
    mode: int,
    sha256: str = "",
    *,
    sha256_file: str = "",
    scratch: Sequence[str] = (),
    prepare: str = "",
    produce: str = "",
) -> str:
    """POSIX shell, run as root, that installs the bytes uploaded to `staged` at `path` with `mode`, atomically (a
    temporary file beside `path`, renamed over it; parents created), only if their SHA-256 is the expected one:
    otherwise it exits 65 and says so on stderr (without either digest: SSM keeps the output too). The expected hex
    digest is `sha256`, written into the script, or else read from `sha256_file`, which `prepare` makes, so that it is
    in no script text. `prepare` runs first, `produce` (which makes `staged`, if needed) after the "already installed"
    check; both are shell lines run under `set -e` that may call `damaged REASON` to refuse the upload the same way.
    `staged`, the temporary file and `scratch` (shell words: globs are expanded) are removed whatever happens.

    Safe to run twice (a retried delivery): when `path` is already a regular file of this user with `mode` and the
    expected SHA-256, it is done (exit 0) before it looks at what was uploaded, which the first run removed."""
    if bool(sha256) == bool(sha256_file):
        raise ValueError("install_script takes the expected SHA-256 either in clear or in a file, one of them")
    q = shlex.quote
    tmp = f"{path}.amiforge-tmp"
    parent = posixpath.dirname(path) or "/"
    leftovers = " ".join([q(staged), q(tmp), *scratch])
    # `[` is a shell builtin: "$expected" reaches no process's argv.
    expected = f"$(cat -- {q(sha256_file)})" if sha256_file else q(sha256)
    return (
        f"cleanup() {{ rm -f -- {leftovers}; }}\n"
        "trap cleanup EXIT\n"
        "set -e\n"
        f"damaged() {{ printf 'amiforge: %s{_DAMAGED_MARK}%s\\n' {q(path)} \"$1\" >&2; exit {_DAMAGED}; }}\n"
        f"{prepare}"
        f"expected={expected}\n"
        'case "$expected" in *[!0-9a-f]* | "") damaged "came with no SHA-256 to check";; esac\n'
        'if [ "${#expected}" -ne 64 ]; then damaged "came with no SHA-256 to check"; fi\n'
        f"if [ -f {q(path)} ] && [ ! -L {q(path)} ] \\\n"
        f'    && [ "$(stat -c \'%a %u\' -- {q(path)})" = "{mode:o} $(id -u)" ] \\\n'
        f'    && [ "$(sha256sum < {q(path)} | cut -c1-64)" = "$expected" ]; then\n'
        "    exit 0\n"
        "fi\n"
        f"{produce}"
        f"sum=$(sha256sum < {q(staged)} | cut -c1-64)\n"
        'if [ "$sum" != "$expected" ]; then damaged "do not have the SHA-256 they were sent with"; fi\n'
        f"(umask 022; mkdir -p -- {q(parent)})\n"
        f"rm -f -- {q(tmp)}\n"
        f"(umask 077; cat < {q(staged)} > {q(tmp)})\n"
        f"chmod {mode:o} {q(tmp)}\n"
        f"mv -fT -- {q(tmp)} {q(path)}\n"
    )


def digest_mismatch(result: CommandResult) -> bool:
    """Whether an install_script run failed because the bytes that arrived were not the ones sent."""
    return result.exit_code == _DAMAGED and _DAMAGED_MARK in result.stderr


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


# --- SSM Run Command --------------------------------------------------------------------------------------------


class _StillRunning(AmiforgeError):
    """The invocation exists but has not finished: poll again."""


class _NotTaken(Exception):
    """A SendCommand failed with an unknown outcome and ListCommands does not show it: it may be sent again."""

    def __init__(self, error: InfraError) -> None:
        super().__init__(str(error))
        self.error = error


class _KeyChanged(Exception):
    """The instance's upload key is not the one an upload was sealed with: make it again, seal again."""


@dataclass(frozen=True)
class _UploadKey:
    """The public half of an instance's upload key, and the openssl binary there that reads what it seals."""

    openssl: str
    public: rsa.RSAPublicKey
    fingerprint: str  # SHA-256 of the DER SubjectPublicKeyInfo, as `openssl pkey -pubout -outform DER | sha256sum`


class SsmMachine:
    """One EC2 instance reached through SSM Run Command. `sleep`, `clock` and `now` (the wall clock ListCommands
    filters by) are injectable so tests do not wait."""

    def __init__(
        self,
        session: AwsSession,
        region: str,
        instance_id: str,
        *,
        sleep: Callable[[float], None] = time.sleep,
        clock: Callable[[], float] = time.monotonic,
        now: Callable[[], datetime] = lambda: datetime.now(UTC),
        online_timeout: float = 600.0,
    ) -> None:
        self.session = session
        self.online_timeout = online_timeout
        self.region = region
        self.instance_id = instance_id
        self._sleep = sleep
        self._clock = clock
        self._now = now
        self._console = ConsoleReader(session, region, instance_id)
        self._key: _UploadKey | None = None

    # --- commands ---------------------------------------------------------------------------------------------

    def run(self, argv: Sequence[str], *, timeout: float) -> CommandResult:
        """Run `argv` as root on the instance; its exit code, stdout and stderr (SSM keeps at most 24,000 chars)."""
        command = shlex.join(argv)
        if encoded_size(command) <= MAX_COMMAND_CHARS:
            return self._send(command, timeout)
        script = f"{STAGE}/cmd-{uuid.uuid4().hex[:12]}.sh"
        self.put_file(script, command.encode(), 0o700)
        return self._send(f"/bin/sh {script}; rc=$?; rm -f {script}; exit $rc", timeout)

    def _send(self, command: str, timeout: float) -> CommandResult:
        ssm = self.session.client("ssm", self.region)
        execution = max(1, min(int(timeout), 172_800))
        command_id = self._submit(command, execution)

        def finished() -> dict[str, Any]:
            answer = self._invocation(ssm, command_id)
            if answer.get("Status") in _RUNNING:
                raise _StillRunning(f"command {command_id} is {answer.get('Status')}")
            return answer

        try:
            answer = retry(
                finished,
                again=lambda e: isinstance(e, (NotFound, _StillRunning)),
                wait=self._wait(timeout + POLL_GRACE, first_delay=0.5, max_delay=5.0),
            )
        except (NotFound, _StillRunning) as e:
            raise InfraError(
                f"SSM command {command_id} on {self.instance_id} did not finish within {timeout + POLL_GRACE:.0f}s",
                retryable=True,
                fix="check the SSM agent on the instance (aws ssm list-command-invocations --details)",
            ) from e
        return self._result(command_id, answer, execution)

    def _wait(self, deadline: float, *, first_delay: float, max_delay: float) -> Wait:
        return Wait(
            first_delay=first_delay, max_delay=max_delay, deadline=deadline, sleep=self._sleep, clock=self._clock
        )

    def _submit(self, command: str, execution: int) -> str:
        """Send `command` so that it runs once; its CommandId. Waits up to `online_timeout` for a new instance to
        register with SSM (SSM answers InvalidInstanceId until then)."""
        if encoded_size(command) > MAX_COMMAND_CHARS:  # run() and the uploads keep to it; this is a bug otherwise
            raise ValueError(f"an SSM command of {encoded_size(command)} characters is over {MAX_COMMAND_CHARS}")
        # Never retried by botocore: a retry would run the command again if SSM had taken the first one.
        ssm = self.session.client("ssm", self.region, single_attempt=True)
        comment = f"amiforge {uuid.uuid4()}"  # Comment: at most 100 characters
        since = self._now() - _CLOCK_SKEW
        unknown = 0

        def send() -> str:
            nonlocal unknown
            try:
                answer = ssm.send_command(
                    InstanceIds=[self.instance_id],
                    DocumentName="AWS-RunShellScript",
                    Parameters={"commands": [command], "executionTimeout": [str(execution)]},
                    TimeoutSeconds=DELIVERY_TIMEOUT,
                    Comment=comment,
                )
                return str(answer["Command"]["CommandId"])
            except CAUGHT as e:
                # InvalidInstanceId maps to NotFound in the table: a new instance's agent has not registered yet.
                error = translate(e, iam_action(ssm, "SendCommand"), self.instance_id)
                if not (isinstance(error, InfraError) and error.retryable):
                    raise error from e
                unknown += 1
                cause: BaseException = e
                failure = error
            # Throttled, a 5xx or a lost connection: SSM may have taken it. Look before sending it again.
            found = self._sent_with(comment, since)
            if found is None:
                raise _NotTaken(failure) from cause
            logger.info("SSM command %s on %s was taken although its answer was lost", found, self.instance_id)
            return found

        try:
            return retry(
                send,
                again=lambda e: isinstance(e, NotFound) or (isinstance(e, _NotTaken) and unknown <= _RESENDS),
                wait=self._wait(self.online_timeout, first_delay=2.0, max_delay=15.0),
            )
        except NotFound as e:
            raise InfraError(
                f"{self.instance_id} did not register with SSM within {self.online_timeout:.0f}s",
                fix="give the instance an instance profile with AmazonSSMManagedInstanceCore, a route to the SSM "
                "endpoints, and an image that runs the SSM agent (or use the SSH communicator)",
            ) from e
        except _NotTaken as e:
            raise e.error from e

    def _sent_with(self, comment: str, since: datetime) -> str | None:
        """The id of the command sent to this instance with `comment` since `since`, if SSM has it; None if it does
        not show after a few looks (ListCommands can lag behind SendCommand)."""
        ssm = self.session.client("ssm", self.region)
        after = since.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
        for pause in (*_LOOKUP_PAUSES, None):
            for command in paginate(
                ssm,
                "ListCommands",
                "Commands",
                self.instance_id,
                InstanceId=self.instance_id,
                Filters=[{"key": "InvokedAfter", "value": after}],
            ):
                if command.get("Comment") == comment:
                    return str(command["CommandId"])
            if pause is None:
                return None
            self._sleep(pause)
        return None

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
        """Write `data` to `path` (parents created), mode `mode`, atomically, checked against its SHA-256; sealed to
        the instance's upload key on the way (see the module docstring). An upload key that changed since it was
        read (the instance rebooted: STAGE is a tmpfs) is read again and the upload sent again, once."""
        try:
            self._upload(path, data, mode)
        except _KeyChanged:
            self._key = None
            try:
                self._upload(path, data, mode)
            except _KeyChanged as e:
                raise InfraError(
                    f"upload of {path} to {self.instance_id}: the instance's upload key changed twice in a row",
                    retryable=True,
                    fix=f"check that nothing else on the instance writes {STAGE}/{UPLOAD_KEY} (one build per instance)",
                ) from e

    def _upload(self, path: str, data: bytes, mode: int) -> None:
        q = shlex.quote
        key = self._upload_key()
        sealed = _seal(data, key.public)
        upload = f"{STAGE}/put-{uuid.uuid4().hex[:12]}"
        parts = self._send_parts(upload, base64.b64encode(sealed.data).decode(), path)
        ssl, key_file = q(key.openssl), q(f"{STAGE}/{UPLOAD_KEY}")
        decrypt = f"{ssl} enc -d -aes-256-cbc -pbkdf2 -iter {_PBKDF2_ITERATIONS} -md sha256 -pass file:{q(upload)}.key"
        # The data key is unwrapped and the expected digest decrypted before install_script's "already installed"
        # check (both arrive in this command, so a retried delivery can still check); the parts are joined in order
        # by number (printf pads as the names were padded), decoded and decrypted after it. Every file made here is
        # `upload.*`, removed however the script ends.
        unwrap = (
            f'if [ ! -f {key_file} ] || [ "$({ssl} pkey -in {key_file} -pubout -outform DER | sha256sum | cut -c1-64)'
            f'" != {key.fingerprint} ]; then\n'
            f"    echo {q(_KEY_CHANGED_MARK)} >&2; exit {_KEY_CHANGED}\n"
            "fi\n"
            "umask 077\n"
            f"printf '%s' {q(base64.b64encode(sealed.wrapped_key).decode())} | base64 -d > {q(upload)}.wrapped\n"
            f"{ssl} pkeyutl -decrypt -inkey {key_file} -pkeyopt rsa_padding_mode:oaep -pkeyopt rsa_oaep_md:sha256 "
            f"-in {q(upload)}.wrapped -out {q(upload)}.key 2>/dev/null || damaged 'hold a key that does not unwrap'\n"
            f"printf '%s' {q(base64.b64encode(sealed.digest).decode())} | base64 -d > {q(upload)}.sha256.enc\n"
            f"{decrypt} -in {q(upload)}.sha256.enc -out {q(upload)}.sha256 2>/dev/null "
            "|| damaged 'hold a SHA-256 that does not decrypt'\n"
        )
        unseal = (
            f"i=1; while [ $i -le {parts} ]; do\n"
            f'    cat "$(printf \'%s.part-%04d\' {q(upload)} $i)" || damaged "lack part $i of {parts}"\n'
            f"    i=$((i + 1))\n"
            f"done > {q(upload)}.b64\n"
            f"base64 -d {q(upload)}.b64 > {q(upload)}.enc || damaged 'are not base64'\n"
            f"{decrypt} -in {q(upload)}.enc -out {q(upload)}.bin 2>/dev/null || damaged 'do not decrypt'\n"
            f"rm -f -- {q(upload)}.key\n"
        )
        install = install_script(
            f"{upload}.bin",
            path,
            mode,
            sha256_file=f"{upload}.sha256",
            scratch=[f"{q(upload)}.*"],
            prepare=unwrap,
            produce=unseal,
        )
        result = self._send(install, 120)
        if result.exit_code == _KEY_CHANGED and _KEY_CHANGED_MARK in result.stderr:
            raise _KeyChanged(path)
        if digest_mismatch(result):
            raise InfraError(
                f"upload of {path} to {self.instance_id} arrived damaged: {result.stderr.strip()[-300:]}",
                retryable=True,
                fix="re-run; the damaged upload was removed",
            )
        self._check(result, f"upload of {path}")

    def _send_parts(self, upload: str, encoded: str, path: str) -> int:
        """Send `encoded` in numbered parts `upload.part-NNNN`, each in a file of its own (a part sent twice is
        written twice, not appended twice), each command as long as SSM takes; the number of parts."""
        q = shlex.quote

        def part_command(n: int, piece: str) -> str:
            return f"set -e; umask 077; mkdir -p {q(STAGE)}; printf '%s' {q(piece)} > {q(f'{upload}.part-{n:04d}')}"

        room = MAX_COMMAND_CHARS - encoded_size(part_command(9999, ""))  # base64 needs no escaping
        pieces = [encoded[i : i + room] for i in range(0, len(encoded), room)] or [""]
        for n, piece in enumerate(pieces, start=1):
            self._check(self._send(part_command(n, piece), 120), f"upload of {path} (part {n}/{len(pieces)})")
        return len(pieces)

    def _upload_key(self) -> _UploadKey:
        """The instance's upload key: made there on first use (kept in STAGE), its public half read back."""
        if self._key is None:
            result = self._send(_key_script(STAGE), 300)
            if result.exit_code == _NO_OPENSSL:
                raise InfraError(
                    f"{self.instance_id} has no OpenSSL 1.1.1 or later ({' or '.join(_OPENSSL)}), which SSM uploads "
                    f"are sealed for: {result.stderr.strip()[-300:]}",
                    fix="use a source image that ships OpenSSL 1.1.1 or later (Debian, Ubuntu and Amazon Linux 2023 "
                    "do; on Amazon Linux 2 install the openssl11 package into it), or the SSH communicator",
                )
            self._check(result, "making the upload key")
            self._key = _parse_upload_key(result.stdout, self.instance_id)
        return self._key

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
        """The serial console output EC2 has captured so far ('' if none yet); see console.ConsoleReader."""
        return self._console.read()

    def leftovers(self) -> Leftovers:
        """The SSM agent's record of this instance (every command's document, script and output, so every uploaded
        part, sealed): the commands before the generalisation's at once, the rest with the agent's logs at shutdown,
        once the agent has stopped. STAGE is a tmpfs: nothing there reaches the image; the upload key goes at once
        all the same (an upload after the generalisation would make a new one)."""
        records = f"{SSM_AGENT_STATE}/{self.instance_id}/document"
        return Leftovers(
            paths=(f"{STAGE}/{UPLOAD_KEY}",),
            command_records=(f"{records}/orchestration", f"{records}/state/*"),
            at_shutdown=(f"{SSM_AGENT_STATE}/{self.instance_id}", SSM_AGENT_LOGS),
        )


# --- sealing uploads ------------------------------------------------------------------------------------------------


def _key_script(stage: str) -> str:
    """Shell that makes the instance's upload key unless it has one (so a repeated delivery is harmless), then prints
    the openssl binary that reads sealed uploads and the public key (PEM)."""
    q = shlex.quote
    key = q(f"{stage}/{UPLOAD_KEY}")
    return (
        "set -e\n"
        "ssl=\n"
        f"for candidate in {' '.join(_OPENSSL)}; do\n"
        '    if command -v "$candidate" >/dev/null 2>&1 \\\n'
        '        && "$candidate" enc -aes-256-cbc -pbkdf2 -iter 1 -md sha256 -pass pass:probe -in /dev/null \\\n'
        "        -out /dev/null 2>/dev/null; then ssl=$candidate; break; fi\n"
        "done\n"
        'if [ -z "$ssl" ]; then\n'
        f"    echo 'amiforge: no openssl with enc -pbkdf2 on this instance' >&2; exit {_NO_OPENSSL}\n"
        "fi\n"
        f"umask 077; mkdir -p {q(stage)}; chmod 700 {q(stage)}\n"
        f"if [ ! -s {key} ]; then\n"
        f'    "$ssl" genpkey -algorithm RSA -pkeyopt rsa_keygen_bits:{_RSA_BITS} -out {key}.$$\n'
        f"    mv -f {key}.$$ {key}\n"
        "fi\n"
        'echo "$ssl"\n'
        f'"$ssl" pkey -in {key} -pubout\n'
    )


def _parse_upload_key(stdout: str, instance_id: str) -> _UploadKey:
    openssl, _, pem = stdout.strip().partition("\n")
    try:
        public = serialization.load_pem_public_key(pem.encode())
    except (ValueError, UnsupportedAlgorithm) as e:
        raise InfraError(f"{instance_id} answered no public key for uploads ({stdout[:120]!r})", retryable=True) from e
    if openssl not in _OPENSSL or not isinstance(public, rsa.RSAPublicKey) or public.key_size < _RSA_BITS:
        raise InfraError(
            f"{instance_id} answered an upload key amiforge does not use ({openssl!r}, "
            f"{getattr(public, 'key_size', '?')}-bit {type(public).__name__}): want RSA of {_RSA_BITS} bits or more",
            fix=f"remove {STAGE}/{UPLOAD_KEY} on the instance (or reboot it) and run again",
        )
    der = public.public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
    return _UploadKey(openssl, public, hashlib.sha256(der).hexdigest())


@dataclass(frozen=True)
class _Sealed:
    """An upload as it is sent: its data key wrapped with RSA-OAEP-SHA256, and under that key the bytes and the hex
    SHA-256 of the bytes, each encrypted on its own (see `_encrypt`)."""

    wrapped_key: bytes
    data: bytes
    digest: bytes


def _seal(data: bytes, public: rsa.RSAPublicKey) -> _Sealed:
    """`data` and its SHA-256 sealed to `public` under a fresh data key."""
    data_key = secrets.token_hex(32).encode()
    return _Sealed(
        wrapped_key=public.encrypt(data_key, OAEP(mgf=MGF1(hashes.SHA256()), algorithm=hashes.SHA256(), label=None)),
        data=_encrypt(data, data_key),
        digest=_encrypt(hashlib.sha256(data).hexdigest().encode(), data_key),
    )


def _encrypt(plaintext: bytes, data_key: bytes) -> bytes:
    """`plaintext` as `openssl enc -aes-256-cbc -pbkdf2 -iter N -md sha256 -pass file:KEY` writes it: b'Salted__', 8
    bytes of salt (fresh each time, so each use of a data key has a key and IV of its own), then AES-256-CBC with
    PKCS#7 padding."""
    salt = os.urandom(8)
    derived = PBKDF2HMAC(hashes.SHA256(), 48, salt, _PBKDF2_ITERATIONS).derive(data_key)
    padder = padding.PKCS7(128).padder()
    padded = padder.update(plaintext) + padder.finalize()
    encryptor = Cipher(algorithms.AES(derived[:32]), modes.CBC(derived[32:])).encryptor()
    return _SALTED + salt + encryptor.update(padded) + encryptor.finalize()
