"""Stand-ins for what moto cannot run: a Machine (SSM Run Command executes nothing in moto) and a clock for waits."""

from __future__ import annotations

import base64
import re
from collections.abc import Callable, Sequence

from amiforge.awsapi.clients import AwsSession
from amiforge.providers.aws.machine import CommandResult, MachineFactory

DPKG = "Package: nginx\nStatus: install ok installed\nArchitecture: amd64\nVersion: 1.22.1-9\n\n"
READY = "[  OK  ] Started amiforge-ready.service\nAMIFORGE-READY 11.25\n"


class Clock:
    def __init__(self) -> None:
        self.now = 0.0
        self.sleeps: list[float] = []

    def sleep(self, seconds: float) -> None:
        self.sleeps.append(seconds)
        self.now += seconds

    def __call__(self) -> float:
        return self.now


class FakeMachine:
    """Records every upload and command; `respond(script)` scripts the result of each step script run."""

    def __init__(self, respond: Callable[[str], CommandResult] | None = None, consoles: Sequence[str] = ()) -> None:
        self.files: dict[str, bytes] = {}
        self.log: list[str] = []  # the step scripts run, in order
        self.argvs: list[list[str]] = []
        self.respond = respond or (lambda _s: CommandResult(0, "", ""))
        self.consoles = list(consoles)
        self.instance_id = ""
        self.regions: list[str] = []

    def run(self, argv: Sequence[str], *, timeout: float) -> CommandResult:
        self.argvs.append(list(argv))
        if list(argv[:2]) == ["/bin/sh", "-c"]:  # a boot check framed by guest_script
            index = re.search(r"\nr (\d+) ", argv[2])
            assert index is not None
            out = base64.b64encode(b"active").decode()
            return CommandResult(0, f"\nAMIFORGE-RESULT {index.group(1)} 0 {out}\n", "")
        script = self.files[argv[1]].decode()
        self.log.append(script)
        return self.respond(script)

    def put_file(self, path: str, data: bytes, mode: int = 0o644) -> None:
        self.files[path] = data

    def read_file(self, path: str) -> bytes:
        assert path == "/var/lib/dpkg/status"
        return DPKG.encode()

    def console(self) -> str:
        return self.consoles.pop(0) if len(self.consoles) > 1 else (self.consoles[0] if self.consoles else "")


def factory(machine: FakeMachine) -> MachineFactory:
    """A MachineFactory handing out `machine` (typed as one: FakeMachine must stay a Machine)."""

    def make(_session: AwsSession, region: str, instance_id: str) -> FakeMachine:
        machine.regions.append(region)
        machine.instance_id = instance_id
        return machine

    return make
