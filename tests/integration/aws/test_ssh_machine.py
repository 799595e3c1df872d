"""SshMachine against a real OpenSSH server on 127.0.0.1: a throw-away sshd per test (its own host key, an
authorized_keys file in the test's folder, no PAM), started as this user; scripts/bootstrap.sh --test installs it.

The connection is strict about the host key (a wrong one is refused at once, never learnt), retries while sshd is
not up or does not take the key yet (cloud-init installs it late), runs commands as root with their exit code and
output, stops them after their timeout, and moves files of any size and mode; nothing reaches ~/.ssh.
"""

from __future__ import annotations

import errno
import getpass
import os
import pwd
import random
import re
import shutil
import signal
import socket
import stat
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import paramiko
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519
from fake_machine import Clock

from amiforge.errors import InfraError
from amiforge.providers.aws import ssh as ssh_module
from amiforge.providers.aws.machine import CommandResult, Leftovers
from amiforge.providers.aws.ssh import SshMachine, new_key_pair
from tests.conftest import BOOTSTRAP, required_or_skip

SSHD = Path("/usr/sbin/sshd")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def listening(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.2):
            return True
    except OSError:
        return False


@dataclass
class Sshd:
    folder: Path
    port: int
    host_key: str  # 'ssh-ed25519 AAAA…' as the console would list it
    authorized_keys: Path
    process: subprocess.Popen[bytes] | None = None
    log: Path = field(init=False)

    def __post_init__(self) -> None:
        self.log = self.folder / "sshd.log"

    def start(self) -> None:
        with self.log.open("ab") as log:
            self.process = subprocess.Popen(
                [str(SSHD), "-D", "-e", "-f", str(self.folder / "sshd_config")], stdout=log, stderr=log
            )
        deadline = time.monotonic() + 10
        while not listening(self.port):
            if self.process.poll() is not None or time.monotonic() > deadline:
                pytest.fail(f"sshd did not start: {self.log.read_text()[-2000:]}")
            time.sleep(0.05)

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            self.process.wait(10)


@pytest.fixture
def sshd(tmp_path: Path) -> Iterator[Sshd]:
    """An sshd configured and ready to start (not started: a test may want it late)."""
    required_or_skip(SSHD.exists(), f"no OpenSSH server at {SSHD}", f"{BOOTSTRAP} installs openssh-server")
    folder = tmp_path / "sshd"
    folder.mkdir()
    key = ed25519.Ed25519PrivateKey.generate()
    host_key = folder / "ssh_host_ed25519_key"
    host_key.write_bytes(
        key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH, serialization.NoEncryption())
    )
    host_key.chmod(0o600)
    public = key.public_key().public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH)
    authorized = folder / "authorized_keys"
    authorized.touch()
    port = free_port()
    (folder / "sshd_config").write_text(
        f"Port {port}\nListenAddress 127.0.0.1\nHostKey {host_key}\nPidFile {folder / 'sshd.pid'}\n"
        f"AuthorizedKeysFile {authorized}\nStrictModes no\nUsePAM no\nPasswordAuthentication no\n"
        "KbdInteractiveAuthentication no\nPubkeyAuthentication yes\nPermitRootLogin prohibit-password\n"
        "Subsystem sftp internal-sftp\nLogLevel VERBOSE\n"
    )
    if os.geteuid() == 0:
        Path("/run/sshd").mkdir(
            mode=0o755, exist_ok=True
        )  # sshd's privilege separation folder (Debian's unit makes it)
    server = Sshd(folder, port, public.decode(), authorized)
    yield server
    server.stop()


@pytest.fixture
def key() -> tuple[str, str]:
    return new_key_pair("amiforge-test")


@pytest.fixture
def running(sshd: Sshd, key: tuple[str, str]) -> Sshd:
    sshd.authorized_keys.write_text(key[1] + "\n")
    sshd.start()
    return sshd


def _upload_folders() -> set[Path]:
    return {p for parent in ("/dev/shm", "/tmp") for p in Path(parent).glob("amiforge-ssh-*")}


@pytest.fixture(autouse=True)
def no_upload_folders_left() -> Iterator[set[Path]]:
    """The "instance" here is this host: the upload folders a test's SshMachine makes are its own (yielded: those there
    before it; scripts/test.sh runs a file's tests on one pytest-xdist worker, one at a time). A test that cuts a
    connection leaves its folder, as an instance would until generalisation removes it (Leftovers): removed after the
    test, so no other test or run sees it."""
    before = _upload_folders()
    yield before
    for folder in _upload_folders() - before:
        shutil.rmtree(folder, ignore_errors=True)


@pytest.fixture(autouse=True)
def untouched_ssh_folders(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Iterator[None]:
    """Nothing is written to ~/.ssh: neither the real one of this user nor one under a HOME made for the test."""
    real = Path(pwd.getpwuid(os.getuid()).pw_dir) / ".ssh"

    def snapshot() -> list[tuple[str, int, float]]:
        if not real.exists():
            return []
        return sorted((str(p), p.stat().st_size, p.stat().st_mtime) for p in real.rglob("*"))

    before = snapshot()
    home = tmp_path / "home"
    home.mkdir()
    monkeypatch.setenv("HOME", str(home))
    yield
    assert list(home.iterdir()) == []
    assert snapshot() == before


def connect(server: Sshd, key: tuple[str, str], **kwargs: object) -> SshMachine:
    options: dict[str, object] = {
        "username": getpass.getuser(),
        "private_key": key[0],
        "host_keys": [server.host_key],
        "console": lambda: "console text",
        "port": server.port,
        "connect_timeout": 30.0,
    }
    options.update(kwargs)
    return SshMachine("127.0.0.1", **options)  # type: ignore[arg-type]


@pytest.fixture
def machine(running: Sshd, key: tuple[str, str]) -> Iterator[SshMachine]:
    with connect(running, key) as m:
        yield m


# --- commands ---------------------------------------------------------------------------------------------------


def test_run_returns_exit_code_and_output_with_argv_intact(machine: SshMachine) -> None:
    assert machine.run(["sh", "-c", "echo out; echo err >&2; exit 3"], timeout=30) == CommandResult(3, "out\n", "err\n")
    assert machine.run(["printf", "%s|", "a b", "c'd", "$HOME", ""], timeout=30).stdout == "a b|c'd|$HOME||"
    assert machine.run(["true"], timeout=30) == CommandResult(0, "", "")
    assert machine.run(["cat"], timeout=30) == CommandResult(0, "", "")  # stdin is closed, not left open


def test_large_output_on_both_streams_arrives_whole(machine: SshMachine) -> None:
    result = machine.run(
        ["sh", "-c", "head -c 3000000 /dev/zero | tr '\\0' o; head -c 500000 /dev/zero >&2"], timeout=60
    )
    assert result.exit_code == 0 and len(result.stdout) == 3_000_000 and len(result.stderr) == 500_000


def test_a_command_that_outlives_its_timeout_is_stopped(machine: SshMachine) -> None:
    started = time.monotonic()
    with pytest.raises(InfraError, match="did not end within 1s and was stopped"):
        machine.run(["sleep", "30.25"], timeout=1)
    assert time.monotonic() - started < 15
    assert subprocess.run(["pgrep", "-f", "sleep 30.25"], capture_output=True, check=False).returncode == 1
    assert machine.run(["sh", "-c", "exit 124"], timeout=30).exit_code == 124  # its own 124 is just an exit code


def test_commands_go_through_sudo_for_other_users(machine: SshMachine) -> None:
    if os.geteuid() != 0 or shutil.which("sudo") is None:
        required_or_skip(False, "sudo as root is needed to run this user's commands through sudo", BOOTSTRAP)
    machine._sudo = True  # as for Debian's `admin`; root may sudo without a password, so the path runs for real
    assert machine.run(["sh", "-c", 'echo "$SUDO_USER $(id -u)"'], timeout=30).stdout == "root 0\n"


# --- files ------------------------------------------------------------------------------------------------------


def test_put_file_and_read_file_round_trip(machine: SshMachine, tmp_path: Path) -> None:
    data = random.Random(9).randbytes(1_500_000)
    target = tmp_path / "etc" / "deep" / "blob.bin"
    machine.put_file(str(target), data, 0o640)
    assert target.read_bytes() == data
    assert stat.S_IMODE(target.stat().st_mode) == 0o640
    assert stat.S_IMODE(target.parent.stat().st_mode) == 0o755
    assert machine.read_file(str(target)) == data
    script = tmp_path / "run.sh"
    machine.put_file(str(script), b"#!/bin/sh\necho ran\n", 0o700)
    assert stat.S_IMODE(script.stat().st_mode) == 0o700
    assert machine.run([str(script)], timeout=30).stdout == "ran\n"
    machine.put_file(str(script), b"", 0o600)  # replaced, empty
    assert script.read_bytes() == b"" and machine.read_file(str(script)) == b""
    assert sorted(p.name for p in target.parent.iterdir()) == ["blob.bin"]


def test_uploads_are_staged_privately_and_removed(
    machine: SshMachine, tmp_path: Path, no_upload_folders_left: set[Path]
) -> None:
    machine.put_file(str(tmp_path / "a"), b"secret", 0o600)
    (folder,) = _upload_folders() - no_upload_folders_left
    assert folder.parent == Path("/dev/shm") and folder.stat().st_uid == os.getuid()
    assert stat.S_IMODE(folder.stat().st_mode) == 0o700 and list(folder.iterdir()) == []
    machine.close()
    assert not folder.exists()


def test_read_file_falls_back_to_sudo_cat(machine: SshMachine, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    if os.geteuid() != 0 or shutil.which("sudo") is None:
        required_or_skip(False, "sudo as root is needed to read through sudo", BOOTSTRAP)
    secret = tmp_path / "root-only"
    secret.write_bytes(b"\x00only root\xff")
    secret.chmod(0o600)
    machine._sudo = True
    sftp = machine._sftp_client()

    def refused(path: str, mode: str = "r", bufsize: int = -1) -> object:
        raise PermissionError(13, "Permission denied")  # what SFTP answers a user who may not read it

    monkeypatch.setattr(sftp, "open", refused)
    assert machine.read_file(str(secret)) == b"\x00only root\xff"


def test_read_file_of_a_missing_file_is_an_error(machine: SshMachine, tmp_path: Path) -> None:
    with pytest.raises(InfraError, match="no such file") as caught:
        machine.read_file(str(tmp_path / "nothing"))
    assert caught.value.fix is not None and "check the path" in caught.value.fix


def session_processes(server: Sshd) -> list[int]:
    """The sshd processes serving connections (the listener's descendants): they answer SFTP too."""
    assert server.process is not None
    found, parents = [], [server.process.pid]
    while parents:
        children = subprocess.run(["pgrep", "-P", str(parents.pop())], capture_output=True, text=True, check=False)
        pids = [int(pid) for pid in children.stdout.split()]
        found += pids
        parents += pids
    return found


def test_an_sftp_server_that_stops_answering_times_out(
    machine: SshMachine, running: Sshd, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """paramiko waits forever for an SFTP answer unless its channel has a timeout: an instance that froze would
    hang the bake. Here the sshd serving the connection is stopped (SIGSTOP) while an upload waits for its answer."""
    monkeypatch.setattr(ssh_module, "_SFTP_TIMEOUT", 1.0)
    machine.put_file(str(tmp_path / "first"), b"connected", 0o600)  # connection, SFTP and upload directory made
    stopped = session_processes(running)
    assert stopped
    outcome: list[BaseException | None] = []

    def upload() -> None:
        try:
            machine.put_file(str(tmp_path / "second"), b"never arrives", 0o600)
            outcome.append(None)
        except BaseException as e:  # handed to the test thread
            outcome.append(e)

    for pid in stopped:
        os.kill(pid, signal.SIGSTOP)
    try:
        worker = threading.Thread(target=upload, daemon=True)
        worker.start()
        worker.join(20)
        assert not worker.is_alive(), "the upload still waits for an SFTP answer"
    finally:
        for pid in stopped:
            os.kill(pid, signal.SIGCONT)
    (error,) = outcome
    assert isinstance(error, InfraError) and error.retryable
    assert "no answer within 1s" in str(error) and error.fix is not None
    assert machine._transport is None  # dropped: the next operation connects again
    assert machine.run(["true"], timeout=30).exit_code == 0


@pytest.mark.parametrize(
    "failure",
    [OSError(errno.EIO, "Input/output error"), paramiko.SSHException("Server connection dropped"), EOFError()],
    ids=["os-error", "ssh-exception", "eof"],
)
def test_sftp_failures_are_infra_errors_with_a_fix(
    machine: SshMachine, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, failure: BaseException
) -> None:
    """Any failure of an SFTP request (not only a missing file) is an InfraError with a fix, never paramiko's or the
    OS's own exception; the connection is made again for the next operation."""
    target = str(tmp_path / "x")

    def fails(*_: object, **__: object) -> None:
        raise failure

    for operation, act, what in (
        ("mkdir", lambda: machine.put_file(target, b"data", 0o600), "making an upload directory in /dev/shm"),
        ("putfo", lambda: machine.put_file(target, b"data", 0o600), f"upload of {target}"),
        ("open", lambda: machine.read_file(target), f"read {target}"),
    ):
        sftp = machine._sftp_client()  # a new connection after the previous failure
        if operation == "putfo":
            machine._upload_directory(sftp)
        monkeypatch.setattr(sftp, operation, fails)
        with pytest.raises(InfraError, match=re.escape(what)) as caught:
            act()
        assert caught.value.retryable and caught.value.fix is not None
        assert type(failure).__name__ in str(caught.value)
        assert machine._transport is None


def test_an_upload_directory_this_user_may_not_make_is_looked_for_elsewhere(
    machine: SshMachine, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    sftp = machine._sftp_client()
    real_mkdir = sftp.mkdir

    def mkdir(path: str, mode: int = 0o777) -> None:
        if path.startswith("/dev/shm/"):
            raise PermissionError(errno.EACCES, "Permission denied")
        real_mkdir(path, mode)

    monkeypatch.setattr(sftp, "mkdir", mkdir)
    machine.put_file(str(tmp_path / "x"), b"data", 0o600)
    assert (tmp_path / "x").read_bytes() == b"data"
    assert machine._upload_dir is not None and machine._upload_dir.startswith("/tmp/amiforge-ssh-")


# --- connecting -------------------------------------------------------------------------------------------------


def test_a_wrong_host_key_is_refused_at_once(running: Sshd, key: tuple[str, str]) -> None:
    clock = Clock()
    other = ed25519.Ed25519PrivateKey.generate().public_key()
    impostor = other.public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH).decode()
    machine = connect(running, key, host_keys=[impostor], sleep=clock.sleep, clock=clock)
    with pytest.raises(InfraError, match=r"is not one of the 1 host key.*refusing to connect") as caught:
        machine.run(["true"], timeout=30)
    assert not caught.value.retryable and clock.sleeps == []
    assert "Accepted publickey" not in running.log.read_text()  # it never got as far as logging in


def test_host_keys_of_other_types_only_are_refused(running: Sshd, key: tuple[str, str]) -> None:
    ecdsa = ec.generate_private_key(ec.SECP256R1()).public_key()
    line = ecdsa.public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH).decode()
    with pytest.raises(InfraError, match="offers none of the host key types its console listed"):
        connect(running, key, host_keys=[line]).run(["true"], timeout=30)


def test_unusable_host_keys_are_refused_before_connecting(sshd: Sshd, key: tuple[str, str]) -> None:
    for keys in ([], ["ssh-ed25519 not-base64"], ["ssh-dss AAAAB3NzaC1kc3MAAACBAP"]):
        with pytest.raises(InfraError, match="no usable SSH host key"):
            connect(sshd, key, host_keys=keys)


def sleeper(clock: Clock, after: int, then: Callable[[], None]) -> Callable[[float], None]:
    """clock.sleep that does `then` (sshd starts, the key gets installed) on its `after`-th call."""

    def sleep(seconds: float) -> None:
        clock.sleep(seconds)
        if len(clock.sleeps) == after:
            then()

    return sleep


def test_a_key_not_yet_authorised_is_retried_until_it_is(sshd: Sshd, key: tuple[str, str]) -> None:
    sshd.start()  # cloud-init has not installed the key yet
    clock = Clock()

    def authorise() -> None:
        sshd.authorized_keys.write_text(key[1] + "\n")

    install = sleeper(clock, 3, authorise)
    with connect(sshd, key, sleep=install, clock=clock) as machine:
        assert machine.run(["echo", "in"], timeout=30).stdout == "in\n"
    assert clock.sleeps == [1.0, 2.0, 4.0]  # doubling delays


def test_sshd_not_up_yet_is_retried(sshd: Sshd, key: tuple[str, str]) -> None:
    sshd.authorized_keys.write_text(key[1] + "\n")
    clock = Clock()
    with connect(sshd, key, sleep=sleeper(clock, 2, sshd.start), clock=clock) as machine:
        assert machine.run(["true"], timeout=30).exit_code == 0
    assert clock.sleeps == [1.0, 2.0]


def test_giving_up_after_the_connect_timeout(sshd: Sshd, key: tuple[str, str]) -> None:
    sshd.start()  # the key never arrives
    clock = Clock()
    machine = connect(sshd, key, sleep=clock.sleep, clock=clock, connect_timeout=10.0)
    with pytest.raises(InfraError, match=r"did not succeed within 10s.*does not accept the key") as caught:
        machine.run(["true"], timeout=30)
    assert caught.value.retryable and clock.sleeps == [1.0, 2.0, 4.0]


def test_a_lost_connection_is_made_again(machine: SshMachine, running: Sshd) -> None:
    assert machine.run(["true"], timeout=30).exit_code == 0
    assert machine._transport is not None
    machine._transport.close()  # dropped between two commands (an idle timeout, a reboot)
    assert machine.run(["echo", "again"], timeout=30).stdout == "again\n"


# --- console and leftovers --------------------------------------------------------------------------------------


def test_console_and_leftovers(machine: SshMachine, key: tuple[str, str]) -> None:
    assert machine.console() == "console text"
    blob = key[1].split()[1]
    assert machine.leftovers() == Leftovers(
        paths=("/dev/shm/amiforge-ssh-*", "/tmp/amiforge-ssh-*"), authorized_key=blob
    )
