"""An EC2 instance's serial console as amiforge reads it, for the boot test (bake.py) and the rollout fleet (fleet.py).

GetConsoleOutput answers the last 64 KB of the console: with Latest=True the console as it is now (instance types on
the Nitro hypervisor), without it the buffered copy EC2 posts shortly after a state change (start, stop, reboot,
terminate) — on Xen types the only one, which may never show a line written after boot (`ConsoleReader` asks for
the latest and falls back once). A line can scroll out of that window between two reads, and a read can end inside
a line still being written, so `ConsoleLog` keeps everything read of one instance, joined where the windows overlap,
and the readiness line counts only when it is complete (`ready_uptime`).
"""

from __future__ import annotations

import base64
import re
from collections.abc import Callable
from typing import Any, Protocol

from amiforge.awsapi.clients import AwsSession, call, iam_action
from amiforge.awsapi.errors import CAUGHT, aws_code, translate
from amiforge.providers.guest import READY_LINE_RE

__all__ = ["CONSOLE_WINDOW", "ConsoleFactory", "ConsoleLog", "ConsoleReader", "ConsoleSource", "ready_uptime"]

# GetConsoleOutput gives at most the last 64 KB; a read this close to it may have lost what came before.
CONSOLE_WINDOW = 64 * 1024
_WINDOW_FULL = CONSOLE_WINDOW - 4 * 1024
# Characters of a new read looked for in the previous one to find where the two overlap.
_ANCHOR = 64
# How much console one instance keeps (its readiness and host keys are found long before this).
_CONSOLE_KEEP = 4 * 1024 * 1024


class ConsoleSource(Protocol):
    """An instance's serial console (`ConsoleReader`): `latest` is False once EC2 gives only its buffered
    copy (Xen instance types), which may never show a line written after boot."""

    latest: bool

    def read(self) -> str: ...


# (session, region, instance id) -> the console of that instance; tests inject fakes.
ConsoleFactory = Callable[[AwsSession, str, str], ConsoleSource]

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


def ready_uptime(text: str) -> float | None:
    """The uptime of the first complete `AMIFORGE-READY <uptime>` line in `text` (a line still being written, such as
    `AMIFORGE-READY 1` of `AMIFORGE-READY 150`, does not count)."""
    found = READY_LINE_RE.search(text)
    return float(found.group(1)) if found else None


class ConsoleLog:
    """Everything read of one instance's console. EC2 answers with a sliding window (the last 64 KB), so a line can
    scroll out between two reads: each read is joined to what came before where the two overlap, and what was seen
    once stays searchable. `lossy` says some text may never have been seen (a full window, or two reads that do not
    overlap); then the last, unfinished line before the gap is dropped, so no line is ever made of two pieces."""

    def __init__(self, source: ConsoleSource) -> None:
        self.source = source
        self.text = ""
        self.lossy = False
        self._last = ""

    def read(self) -> str:
        window = self.source.read()
        if not window:  # nothing captured (yet): nothing to join the next read to either
            return self.text
        if len(window.encode("utf-8", "replace")) >= _WINDOW_FULL:
            self.lossy = True
        new = self._new_part(window)  # first: at a gap it also cuts self.text
        self.text += new
        self._last = window
        if len(self.text) > _CONSOLE_KEEP:
            self.text = self.text[-_CONSOLE_KEEP:]
        return self.text

    def _new_part(self, window: str) -> str:
        last = self._last
        if window.startswith(last):
            return window[len(last) :]
        # The window moved on: it begins inside the previous one, so a suffix of that one is a prefix of this. Of the
        # places it could begin, take the latest: a repeated stretch then comes twice, which costs nothing; an earlier
        # one could skip text.
        anchor = window[:_ANCHOR]
        at = last.rfind(anchor)
        while at >= 0:
            if window.startswith(last[at:]):
                return window[len(last) - at :]
            at = last.rfind(anchor, 0, at + len(anchor) - 1)
        self.lossy = True
        self.text = self.text[: self.text.rfind("\n") + 1]  # its unfinished line will never be completed
        return window

    @property
    def latest(self) -> bool:
        return self.source.latest
