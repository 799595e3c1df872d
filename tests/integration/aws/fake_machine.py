"""Stand-ins for what moto cannot run: a Machine (SSM Run Command executes nothing in moto, and there is no sshd), the
serial console it shows, and a clock for waits."""

from __future__ import annotations

import base64
import re
import shlex
from collections.abc import Callable, Mapping, Sequence

from amiforge.awsapi.clients import AwsSession
from amiforge.providers.aws.console import ConsoleFactory
from amiforge.providers.aws.machine import CommandResult, Leftovers, MachineFactory

DPKG = "Package: nginx\nStatus: install ok installed\nArchitecture: amd64\nVersion: 1.22.1-9\n\n"
READY = "[  OK  ] Started amiforge-ready.service\nAMIFORGE-READY 11.25\n"
LEFTOVERS = Leftovers(paths=("/dev/shm/amiforge-ssh-*",), authorized_key="AAAAC3NzaC1lZDI1NTE5AAAAIThrowAway0")


class Clock:
    def __init__(self) -> None:
        self.now = 0.0
        self.sleeps: list[float] = []

    def sleep(self, seconds: float) -> None:
        self.sleeps.append(seconds)
        self.now += seconds

    def __call__(self) -> float:
        return self.now


class FakeConsole:
    """The console EC2 gives, one window per read: each read takes the next of `windows`, the last one stays.
    `latest=False` is a Xen instance type's buffered console (console.ConsoleReader after its fallback)."""

    def __init__(self, windows: Sequence[str] = (), *, latest: bool = True) -> None:
        self.windows = list(windows)
        self.latest = latest
        self.reads = 0

    def read(self) -> str:
        self.reads += 1
        if len(self.windows) > 1:
            return self.windows.pop(0)
        return self.windows[0] if self.windows else ""


class FakeMachine:
    """Records every upload and command; `respond(script)` scripts the result of each step script run.

    Boot checks (framed by guest_script) are answered as a guest would: units are active unless in `failed_units`,
    commands exit 0 unless in `failed_commands` (command → exit code and output), ports answer (HTTP 200) unless in
    `closed_ports`. `cat PATH` reads `files`, as does `read_file` (the dpkg status is there from the start)."""

    def __init__(
        self,
        respond: Callable[[str], CommandResult] | None = None,
        consoles: Sequence[str] = (),
        *,
        failed_units: Sequence[str] = (),
        failed_commands: Mapping[str, tuple[int, str]] | None = None,
        closed_ports: Sequence[int] = (),
        leftovers: Leftovers = LEFTOVERS,
    ) -> None:
        self.files: dict[str, bytes] = {"/var/lib/dpkg/status": DPKG.encode()}
        self.log: list[str] = []  # the step scripts run, in order
        self.argvs: list[list[str]] = []
        self.respond = respond or (lambda _s: CommandResult(0, "", ""))
        self.screen = FakeConsole(consoles)
        self.failed_units = set(failed_units)
        self.failed_commands = dict(failed_commands or {})
        self.closed_ports = set(closed_ports)
        self._leftovers = leftovers
        self.instance_id = ""
        self.regions: list[str] = []

    @property
    def consoles(self) -> list[str]:
        return self.screen.windows

    def run(self, argv: Sequence[str], *, timeout: float) -> CommandResult:
        self.argvs.append(list(argv))
        if list(argv[:2]) == ["/bin/sh", "-c"]:  # a boot check framed by guest_script
            index = re.search(r"\nr (\d+) (.*)\n", argv[2])
            assert index is not None
            code, out = self._check(shlex.split(index.group(2))[0])
            encoded = base64.b64encode(out.encode()).decode()
            return CommandResult(0, f"\nAMIFORGE-RESULT {index.group(1)} {code} {encoded}\n", "")
        if argv[0] == "cat":
            path = argv[-1]
            if path not in self.files:
                return CommandResult(1, "", f"cat: {path}: No such file or directory\n")
            return CommandResult(0, self.files[path].decode(), "")
        script = self.files[argv[1]].decode()
        self.log.append(script)
        return self.respond(script)

    def _check(self, shell: str) -> tuple[int, str]:
        """What a guest would answer to one check's shell (see bake._guest_checks and guest.guest_checks)."""
        if shell.startswith("systemctl is-active -- "):
            unit = shlex.split(shell)[-1]
            return (3, "failed") if unit in self.failed_units else (0, "active")
        port = re.search(r"127\.0\.0\.1[:/](\d+)", shell)
        if port is not None:
            closed = int(port.group(1)) in self.closed_ports
            if "curl" in shell:
                return (7, "status 000") if closed else (0, "status 200")
            return (1, "") if closed else (0, "")
        return self.failed_commands.get(shell, (0, ""))

    def put_file(self, path: str, data: bytes, mode: int = 0o644) -> None:
        self.files[path] = data

    def read_file(self, path: str) -> bytes:
        return self.files[path]

    def console(self) -> str:
        return self.screen.read()

    def leftovers(self) -> Leftovers:
        return self._leftovers


def factory(machine: FakeMachine) -> MachineFactory:
    """A MachineFactory handing out `machine` (typed as one: FakeMachine must stay a Machine)."""

    def make(_session: AwsSession, region: str, instance_id: str) -> FakeMachine:
        machine.regions.append(region)
        machine.instance_id = instance_id
        return machine

    return make


def console_of(screen: FakeMachine | FakeConsole) -> ConsoleFactory:
    """A ConsoleFactory handing out `screen` (a FakeMachine's own console, or a FakeConsole)."""
    console = screen.screen if isinstance(screen, FakeMachine) else screen

    def make(_session: AwsSession, _region: str, _instance_id: str) -> FakeConsole:
        return console

    return make
