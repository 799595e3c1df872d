"""The SSH communicator: a `Machine` reached over SSH with a throw-away key, for images that run no SSM agent
(Debian's official AMIs among them).

How the bake uses it, as Packer does: make a key with `new_key_pair`, import its public half as an EC2 key pair and
launch the builder with it (cloud-init installs it for the image's default user, `admin` on Debian), read the
instance's SSH host keys from its serial console (`host_keys_from_console`: cloud-init prints them there), then
`SshMachine(...)` with those keys. Only those host keys are accepted — never one learnt on first contact — and
nothing is read from or written to the user's ~/.ssh (no known_hosts, no agent, no key files).

Commands run as root: through `sudo -n` when the user is not root (the default users of cloud images have
passwordless sudo), under coreutils `timeout` so a command that outlives its timeout is stopped on the instance too.
Uploads go by SFTP to a private directory on /dev/shm (a tmpfs: the bytes never touch the image's disk, whose free
blocks the secret scan reads) and are installed by `machine.install_script` (SHA-256 checked, atomic rename). Every
SFTP request waits at most `_SFTP_TIMEOUT` seconds for its answer; a file operation that fails is an InfraError, and
the connection is made again for the next one (after a timeout its state is unknown).
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import io
import math
import re
import select
import shlex
import socket
import struct
import time
import uuid
from collections.abc import Callable, Sequence
from types import TracebackType

import paramiko
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from paramiko.ssh_exception import IncompatiblePeer

from amiforge.errors import ConfigError, InfraError
from amiforge.providers.aws.machine import CommandResult, Leftovers, digest_mismatch, install_script
from amiforge.waiting import Wait, retry

__all__ = ["HOST_KEYS_BEGIN", "HOST_KEYS_END", "SshMachine", "host_keys_from_console", "new_key_pair"]

# cloud-init's write-ssh-key-fingerprints (run by cc_keys_to_console) echoes these around `cat` of each host key.
HOST_KEYS_BEGIN = "-----BEGIN SSH HOST KEY KEYS-----"
HOST_KEYS_END = "-----END SSH HOST KEY KEYS-----"

# Host key types → the host key algorithms that prove them (RSA keys sign with SHA-2; SHA-1 `ssh-rsa` is not offered).
_ALGORITHMS: dict[str, tuple[str, ...]] = {
    "ssh-ed25519": ("ssh-ed25519",),
    "ecdsa-sha2-nistp256": ("ecdsa-sha2-nistp256",),
    "ecdsa-sha2-nistp384": ("ecdsa-sha2-nistp384",),
    "ecdsa-sha2-nistp521": ("ecdsa-sha2-nistp521",),
    "ssh-rsa": ("rsa-sha2-512", "rsa-sha2-256"),
}
_KEY_ON_A_LINE = re.compile(
    r"(?<![\w-])(" + "|".join(re.escape(t) for t in _ALGORITHMS) + r") (AAAA[A-Za-z0-9+/]+={0,3})(?![A-Za-z0-9+/=])"
)

# Seconds for one TCP connect and one SSH handshake; the whole connection is bounded by `connect_timeout`.
_ATTEMPT_TIMEOUT = 20.0
# After `timeout`, coreutils `timeout` sends KILL this much later; the client gives up this much after that.
_KILL_AFTER = 10
_CLIENT_GRACE = 20.0
_UPLOAD_PARENTS = ("/dev/shm", "/tmp")
_UPLOAD_PREFIX = "amiforge-ssh-"
_FILE_TIMEOUT = 300.0
# Seconds an SFTP request may wait for its answer (paramiko waits forever otherwise, e.g. on an instance that froze).
_SFTP_TIMEOUT = 120.0
_FILE_FIX = (
    "check that the instance still runs and its disk is not full (its console); amiforge connects again on the next try"
)


def new_key_pair(comment: str) -> tuple[str, str]:
    """A throw-away ed25519 key: (private key in OpenSSH PEM text, public key line 'ssh-ed25519 AAAA... comment')."""
    if re.fullmatch(r"[\x21-\x7e]+(?: [\x21-\x7e]+)*", comment) is None:
        raise ConfigError(f"SSH key comment {comment!r} must be printable ASCII words, without line breaks")
    key = Ed25519PrivateKey.generate()
    private = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH, serialization.NoEncryption()
    ).decode()
    public = key.public_key().public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH)
    return private, f"{public.decode()} {comment}"


def host_keys_from_console(console: str) -> list[str]:
    """The host public keys cloud-init printed to the serial console between
    '-----BEGIN SSH HOST KEY KEYS-----' and '-----END SSH HOST KEY KEYS-----' ('ssh-ed25519 AAAA...' lines); [] if not
    (yet) there.

    Only the last complete block counts (an instance that booted twice printed its current keys last). Each key is
    returned as 'TYPE BASE64' without its comment; a line the kernel's own console messages broke, or whose blob does
    not hold the key type it claims, is left out rather than guessed at."""
    text = console.replace("\r", "")
    end = text.rfind(HOST_KEYS_END)
    begin = text.rfind(HOST_KEYS_BEGIN, 0, end) if end >= 0 else -1
    if begin < 0:
        return []
    keys: list[str] = []
    for line in text[begin + len(HOST_KEYS_BEGIN) : end].splitlines():
        found = _KEY_ON_A_LINE.search(line)
        if found is None:
            continue
        key = f"{found.group(1)} {found.group(2)}"
        if _parsed(key) is not None and key not in keys:
            keys.append(key)
    return keys


def _parsed(line: str) -> tuple[str, bytes] | None:
    """(key type, public key blob) of an OpenSSH public key line, if it is one of a type amiforge accepts."""
    fields = line.split()
    if len(fields) < 2 or fields[0] not in _ALGORITHMS:
        return None
    try:
        blob = base64.b64decode(fields[1], validate=True)
    except (binascii.Error, ValueError):
        return None
    # The blob begins with its own type as an SSH string: a line cut and glued by console noise fails this.
    if len(blob) < 4:
        return None
    (length,) = struct.unpack(">I", blob[:4])
    if blob[4 : 4 + length] != fields[0].encode():
        return None
    return fields[0], blob


def _fingerprint(blob: bytes) -> str:
    """As `ssh-keygen -l` prints it: SHA256:<unpadded base64>."""
    return "SHA256:" + base64.b64encode(hashlib.sha256(blob).digest()).decode().rstrip("=")


class _NotYet(Exception):
    """The instance is not ready for SSH yet (nothing listens, the handshake failed, the key is not installed)."""


class SshMachine:
    """One instance reached over SSH (implements providers.aws.machine.Machine). Connects on first use, retrying with
    doubling delays for up to `connect_timeout` seconds while sshd is not up or does not accept the key yet, and
    again after a lost connection. `sleep` and `clock` are injectable so tests do not wait. Not thread-safe."""

    def __init__(
        self,
        host: str,
        *,
        username: str,
        private_key: str,
        host_keys: Sequence[str],
        console: Callable[[], str],
        port: int = 22,
        connect_timeout: float = 600.0,
        sleep: Callable[[float], None] = time.sleep,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if re.fullmatch(r"[a-z_][a-z0-9_.-]*", username) is None:
            raise ConfigError(f"SSH user name {username!r} is not a valid user name")
        self.host = host
        self.port = port
        self.username = username
        self.connect_timeout = connect_timeout
        self._key = _private_key(private_key)
        parsed = [_parsed(line) for line in host_keys]
        if not host_keys or None in parsed:
            bad = [line[:60] for line, p in zip(host_keys, parsed, strict=True) if p is None]
            raise InfraError(
                f"no usable SSH host key for {host}: {bad or 'none given'}",
                fix="give the keys cloud-init printed on the instance's console (host_keys_from_console)",
            )
        self._host_keys = {blob for _type, blob in (p for p in parsed if p is not None)}
        self._algorithms = {a for type_, _blob in (p for p in parsed if p is not None) for a in _ALGORITHMS[type_]}
        self._console = console
        self._sleep = sleep
        self._clock = clock
        self._sudo = username != "root"
        self._transport: paramiko.Transport | None = None
        self._sftp: paramiko.SFTPClient | None = None
        self._upload_dir: str | None = None

    @property
    def where(self) -> str:
        return f"{self.username}@{self.host}:{self.port}"

    # --- connecting -------------------------------------------------------------------------------------------

    def _connection(self) -> paramiko.Transport:
        if self._transport is not None and self._transport.is_active() and self._transport.is_authenticated():
            return self._transport
        self._drop()
        wait = Wait(
            first_delay=1.0, max_delay=15.0, deadline=self.connect_timeout, sleep=self._sleep, clock=self._clock
        )
        try:
            self._transport = retry(self._connect_once, again=lambda e: isinstance(e, _NotYet), wait=wait)
        except _NotYet as e:
            raise InfraError(
                f"SSH to {self.where} did not succeed within {self.connect_timeout:.0f}s: {e}",
                retryable=True,
                fix="check that the instance booted (its console), that a security group lets this host reach the "
                "port, and that the image's cloud-init installs the launch key pair for this user",
            ) from e
        if self._sudo:
            self._check_sudo()
        return self._transport

    def _connect_once(self) -> paramiko.Transport:
        try:
            sock = socket.create_connection((self.host, self.port), timeout=_ATTEMPT_TIMEOUT)
        except OSError as e:  # refused, unreachable, timed out: sshd is not up (yet)
            raise _NotYet(f"cannot connect ({e})") from e
        transport = paramiko.Transport(sock)
        try:
            options = transport.get_security_options()
            # Ask only for host keys of the types the console listed, so the server proves one of those.
            options.key_types = [a for a in options.key_types if a in self._algorithms]
            transport.start_client(timeout=_ATTEMPT_TIMEOUT)
            self._verify_host_key(transport.get_remote_server_key())
            transport.auth_publickey(self.username, self._key)
            transport.set_keepalive(30)
            return transport
        except IncompatiblePeer as e:
            transport.close()
            raise InfraError(
                f"{self.host}:{self.port} offers none of the host key types its console listed "
                f"({', '.join(sorted(self._algorithms))}): {e}",
                fix="read the host keys from this instance's console again; if they match, the server is not it",
            ) from e
        except paramiko.AuthenticationException as e:
            transport.close()
            raise _NotYet(f"{self.username} does not accept the key (yet): {e}") from e
        except (paramiko.SSHException, EOFError, OSError) as e:
            transport.close()
            raise _NotYet(f"SSH handshake failed ({type(e).__name__}: {e})") from e
        except BaseException:
            transport.close()
            raise

    def _verify_host_key(self, key: paramiko.PKey) -> None:
        # The handshake already proved the server holds the private half of `key`; this says it is the right key.
        if key.asbytes() not in self._host_keys:
            raise InfraError(
                f"the SSH host key of {self.host}:{self.port} ({key.get_name()} {_fingerprint(key.asbytes())}) is not "
                f"one of the {len(self._host_keys)} host key(s) the instance's console listed: refusing to connect",
                fix="another machine answers at this address, or something in between does; check the address and "
                "the console (never accept an unknown host key)",
            )

    def _check_sudo(self) -> None:
        code, _out, err = self._exec(shlex.join(["sudo", "-n", "true"]), 60.0)
        if code != 0:
            self._drop()  # checked again on the next connection, never taken for granted
            raise InfraError(
                f"{self.where} cannot run commands as root: sudo -n true exited {code}: "
                f"{err.decode('utf-8', 'replace').strip()[-300:]}",
                fix="use the image's default user, which has passwordless sudo, or root",
            )

    def _drop(self) -> None:
        if self._sftp is not None:
            self._sftp.close()
        if self._transport is not None:
            self._transport.close()
        self._sftp, self._transport, self._upload_dir = None, None, None

    def close(self) -> None:
        """Remove the upload directory (best effort) and close the connection; the machine can connect again."""
        if self._sftp is not None and self._upload_dir is not None:
            try:
                for name in self._sftp.listdir(self._upload_dir):
                    self._sftp.remove(f"{self._upload_dir}/{name}")
                self._sftp.rmdir(self._upload_dir)
            except (OSError, paramiko.SSHException, EOFError):
                pass  # a tmpfs that the generalisation empties anyway (leftovers())
        self._drop()

    def __enter__(self) -> SshMachine:
        return self

    def __exit__(
        self, kind: type[BaseException] | None, error: BaseException | None, traceback: TracebackType | None
    ) -> None:
        self.close()

    # --- commands ---------------------------------------------------------------------------------------------

    def _as_root(self, argv: Sequence[str], timeout: float) -> str:
        """The command line sshd hands to the user's shell: argv as root, stopped after `timeout` seconds."""
        limited = ["timeout", f"--kill-after={_KILL_AFTER}", str(max(1, math.ceil(timeout))), *argv]
        return shlex.join(["sudo", "-n", "--", *limited] if self._sudo else limited)

    def _exec(self, command: str, timeout: float) -> tuple[int, bytes, bytes]:
        """Run one command line; (exit status, stdout, stderr). InfraError if it does not end within `timeout`."""
        transport = self._connection()
        try:
            channel = transport.open_session(timeout=_ATTEMPT_TIMEOUT)
        except (paramiko.SSHException, EOFError, OSError) as e:
            self._drop()
            raise InfraError(f"SSH to {self.where}: cannot open a session ({e})", retryable=True) from e
        out, err = bytearray(), bytearray()
        deadline = self._clock() + timeout
        try:
            channel.exec_command(command)
            channel.shutdown_write()  # no input: a command that reads stdin sees its end
            while True:
                while channel.recv_ready():
                    out += channel.recv(1 << 16)
                while channel.recv_stderr_ready():
                    err += channel.recv_stderr(1 << 16)
                # EOF covers both streams; the exit status may come before the last output, so wait for both.
                if channel.exit_status_ready() and (channel.eof_received or channel.closed):
                    if not (channel.recv_ready() or channel.recv_stderr_ready()):
                        break
                    continue
                if self._clock() > deadline:
                    raise InfraError(
                        f"a command on {self.where} did not end within {timeout:.0f}s",
                        fix="raise the step's timeout, or look for what the step waits on",
                    )
                select.select([channel], [], [], 0.2)
            return channel.recv_exit_status(), bytes(out), bytes(err)
        except (paramiko.SSHException, EOFError, OSError) as e:
            self._drop()
            raise InfraError(
                f"SSH connection to {self.where} failed while a command ran ({type(e).__name__}: {e}); it may or "
                "may not have run to its end",
                retryable=True,
            ) from e
        finally:
            channel.close()

    def run(self, argv: Sequence[str], *, timeout: float) -> CommandResult:
        """Run `argv` as root; its exit code and output. InfraError if it outlives `timeout` seconds (it is stopped
        on the instance too) or ends without an exit status."""
        started = self._clock()
        code, out, err = self._exec(self._as_root(argv, timeout), timeout + _KILL_AFTER + _CLIENT_GRACE)
        # coreutils timeout: 124 when it stopped the command, 137 when it had to KILL it. A command may exit 124
        # itself, so it counts as a timeout only if the command also ran that long.
        if code in (124, 137) and self._clock() - started >= timeout:
            raise InfraError(
                f"{shlex.join(argv)[:200]} on {self.where} did not end within {timeout:.0f}s and was stopped",
                fix="raise the step's timeout, or look for what the step waits on",
            )
        if code < 0:
            raise InfraError(f"{shlex.join(argv)[:200]} on {self.where} ended without an exit status (a signal?)")
        return CommandResult(code, out.decode("utf-8", "replace"), err.decode("utf-8", "replace"))

    # --- files ------------------------------------------------------------------------------------------------

    def _sftp_client(self) -> paramiko.SFTPClient:
        transport = self._connection()
        if self._sftp is None:
            try:
                sftp = paramiko.SFTPClient.from_transport(transport)
                channel = sftp.get_channel() if sftp is not None else None
                if sftp is None or channel is None:
                    raise paramiko.SSHException("the server refused the sftp subsystem")
                channel.settimeout(_SFTP_TIMEOUT)
            except (paramiko.SSHException, EOFError, OSError) as e:
                raise self._file_error("starting SFTP", e) from e
            self._sftp = sftp
        return self._sftp

    def _file_error(self, what: str, error: BaseException) -> InfraError:
        """A failed file operation as an InfraError. The connection is dropped: after a timeout or a broken SFTP
        session, nothing more can be read from it in step."""
        self._drop()
        waited = f" (no answer within {_SFTP_TIMEOUT:.0f}s)" if isinstance(error, TimeoutError) else ""
        return InfraError(
            f"{what} on {self.where} failed{waited}: {type(error).__name__}: {error}", retryable=True, fix=_FILE_FIX
        )

    def _upload_directory(self, sftp: paramiko.SFTPClient) -> str:
        """A directory only this user can enter, on a tmpfs where there is one; made once per connection."""
        if self._upload_dir is None:
            for parent in _UPLOAD_PARENTS:
                candidate = f"{parent}/{_UPLOAD_PREFIX}{uuid.uuid4().hex[:16]}"
                try:
                    sftp.mkdir(candidate, 0o700)  # fails if it exists: nobody else's directory is reused
                except (FileNotFoundError, PermissionError):
                    continue  # no such parent here, or not one this user may write: the next one
                except (paramiko.SSHException, EOFError, OSError) as e:
                    raise self._file_error(f"making an upload directory in {parent}", e) from e
                self._upload_dir = candidate
                break
            else:
                raise InfraError(
                    f"{self.where} has no {' or '.join(_UPLOAD_PARENTS)} this user can upload into",
                    fix=f"use an image where {self.username} may write to /dev/shm or /tmp (its default user does)",
                )
        return self._upload_dir

    def put_file(self, path: str, data: bytes, mode: int = 0o644) -> None:
        """Write `data` to `path` as root (parents created), mode `mode`, atomically, checked against its SHA-256."""
        sftp = self._sftp_client()
        staged = f"{self._upload_directory(sftp)}/{uuid.uuid4().hex[:16]}"
        try:
            sftp.putfo(io.BytesIO(data), staged, file_size=len(data), confirm=True)
        except (OSError, paramiko.SSHException, EOFError) as e:
            raise self._file_error(f"upload of {path}", e) from e
        # The digest may go in clear here (SsmMachine seals it): it travels inside the encrypted SSH channel, and no
        # agent stores the script on the instance or keeps it in an API.
        script = install_script(staged, path, mode, hashlib.sha256(data).hexdigest())
        result = self.run(["/bin/sh", "-c", script], timeout=_FILE_TIMEOUT)
        if digest_mismatch(result):
            raise InfraError(
                f"upload of {path} to {self.where} arrived damaged: {result.stderr.strip()[-300:]}",
                retryable=True,
                fix="re-run; the damaged upload was removed",
            )
        if result.exit_code != 0:
            raise InfraError(
                f"installing {path} on {self.where} failed with exit {result.exit_code}: "
                f"{result.stderr.strip()[-500:]}",
                fix=f"check that root can write beside {path} on the instance (not read-only, not full)",
            )

    def read_file(self, path: str) -> bytes:
        """The bytes of `path`: by SFTP as the user, or through `sudo -n cat` when only root may read it."""
        sftp = self._sftp_client()
        try:
            with sftp.open(path, "rb") as remote:
                remote.prefetch()
                return remote.read()
        except PermissionError:
            if not self._sudo:
                raise InfraError(
                    f"read {path} on {self.where}: permission denied to root",
                    fix="check the file's attributes and the image's security modules (lsattr, SELinux, AppArmor)",
                ) from None
        except FileNotFoundError:
            raise InfraError(
                f"read {path} on {self.where}: no such file", fix="check the path, and that the step making it ran"
            ) from None
        except (OSError, paramiko.SSHException, EOFError) as e:
            raise self._file_error(f"read {path}", e) from e
        code, out, err = self._exec(self._as_root(["cat", "--", path], _FILE_TIMEOUT), _FILE_TIMEOUT + _CLIENT_GRACE)
        if code != 0:
            raise InfraError(
                f"read {path} on {self.where} as root failed: {err.decode('utf-8', 'replace')[-300:]}",
                fix="check the path, and that the step making it ran",
            )
        return out

    # --- console and leftovers --------------------------------------------------------------------------------

    def console(self) -> str:
        """The instance's serial console so far, from the callable given (EC2's GetConsoleOutput in the bake)."""
        return self._console()

    def leftovers(self) -> Leftovers:
        """The throw-away key's line in every authorized_keys (cloud-init put it there for this user, and for root
        with a `command=` prefix) and any upload directory close() could not remove. The host keys the console
        listed are the generalisation's already (it removes /etc/ssh/ssh_host_*)."""
        return Leftovers(
            paths=tuple(f"{parent}/{_UPLOAD_PREFIX}*" for parent in _UPLOAD_PARENTS),
            authorized_key=self._key.get_base64(),
        )


def _private_key(text: str) -> paramiko.Ed25519Key:
    try:
        return paramiko.Ed25519Key.from_private_key(io.StringIO(text))
    except (paramiko.SSHException, ValueError) as e:
        raise ConfigError(
            f"the SSH private key is not an unencrypted ed25519 key in OpenSSH format ({e})",
            fix="make it with providers.aws.ssh.new_key_pair",
        ) from e
