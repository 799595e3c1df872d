"""`amiforge logs`: the console lines of boot tests and fleet members, as JSON lines with ECS fields (Elastic Common
Schema: `@timestamp`, `message`, `host.name`, `cloud.instance.id`, `labels.*`), ready for Filebeat, Vector or the
CloudWatch agent to ship.

A serial console carries no wall-clock time: a line's `@timestamp` is the member's launch plus the guest's uptime
as last printed on or before that line (the kernel's `[   12.345]` prefix, amiforge's READY and HEARTBEAT
lines), so it is never later than the line really was written (lines without an uptime of their own take the last
one seen), and the guest's clock starts a moment after the launch. `--follow` keeps each member's place (a byte
offset) and prints only whole new lines.
"""

from __future__ import annotations

import re
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from amiforge.errors import ConfigError
from amiforge.lifecycle.controller import canonical_target, parse_target
from amiforge.model import BOOT_TEST_TARGET
from amiforge.providers import provider_for
from amiforge.providers.guest import printable
from amiforge.providers.interface import FleetKeeper
from amiforge.settings import Settings
from amiforge.store.interface import Store

ECS_VERSION = "8.11.0"
LOOK_FOR_NEW = 5  # polls between looks for new members and boot tests while following
# An uptime printed on the line: the kernel's "[   12.345678]" prefix, or amiforge's own markers.
UPTIME_RE = re.compile(r"^\[\s*(\d+\.\d+)\]|AMIFORGE-(?:READY|HEARTBEAT) (\d+(?:\.\d+)?)")
# The newest part of a console read at once (a guest that ran for months writes a heartbeat a minute).
MAX_READ = 8 << 20


@dataclass(frozen=True)
class ConsoleLine:
    at: datetime
    instance: str
    version: str
    target: str
    message: str

    def ecs(self) -> dict[str, Any]:
        image = self.version.partition("@")[0]
        return {
            "@timestamp": self.at.isoformat().replace("+00:00", "Z"),
            "message": self.message,
            "host": {"name": self.instance},
            "cloud": {"instance": {"id": self.instance}},
            "labels": {"image": image, "version": self.version, "target": self.target},
            "event": {"dataset": "amiforge.console", "kind": "event"},
            "ecs": {"version": ECS_VERSION},
        }


@dataclass
class _Place:
    """Where reading one console stopped: the byte offset of the first line not yet printed, the last uptime."""

    offset: int = 0
    uptime: float = 0.0


@dataclass
class _Source:
    instance: str
    version: str
    target: str
    launched_at: datetime
    text: Callable[[], bytes] | None = None  # a console that grows (a fleet member's file)
    fixed: str | None = None  # a console that is whole (a boot test's, as recorded)
    place: _Place = field(default_factory=_Place)


def _lines(source: _Source, data: str, *, whole: bool) -> list[ConsoleLine]:
    """The lines of `data` (from `source.place.offset` on) as console lines; only complete ones unless `whole`."""
    parts = data.split("\n")
    if not whole:
        parts = parts[:-1]  # the last one may be half-written
    found = []
    for raw in parts:
        source.place.offset += len(raw.encode("utf-8", "surrogateescape")) + 1
        line = printable(raw)
        m = UPTIME_RE.search(line)
        if m:
            source.place.uptime = max(source.place.uptime, float(m.group(1) or m.group(2)))
        if line:
            at = source.launched_at + timedelta(seconds=source.place.uptime)
            found.append(ConsoleLine(at, source.instance, source.version, source.target, line))
    return found


def _read(source: _Source) -> list[ConsoleLine]:
    if source.fixed is not None:
        if source.place.offset:
            return []
        return _lines(source, source.fixed, whole=True)
    assert source.text is not None
    data = source.text()
    if len(data) < source.place.offset:  # replaced (a new console): start again
        source.place = _Place()
    if len(data) - source.place.offset > MAX_READ:
        source.place.offset = len(data) - MAX_READ  # skip to the newest part (and its first whole line)
        skipped = data[source.place.offset :].split(b"\n", 1)[0]
        source.place.offset += len(skipped) + 1
    return _lines(source, data[source.place.offset :].decode("utf-8", "surrogateescape"), whole=False)


def _file(path: Path) -> Callable[[], bytes]:
    def read() -> bytes:
        try:
            with path.open("rb") as f:
                return f.read()
        except OSError:  # gone (the fleet was destroyed): nothing more to read
            return b""

    return read


def _sources(store: Store, settings: Settings, ref: str | None, target: str | None, since: datetime) -> list[_Source]:
    found: list[_Source] = []
    version = store.get_version(ref).ref if ref is not None else None
    if target in (None, BOOT_TEST_TARGET):
        ids = [store.get_version(version).id] if version else sorted(
            {b.version_id for b in store.boots_in_window(since, datetime.now(UTC), targets=[BOOT_TEST_TARGET])}
        )  # fmt: skip
        for vid in ids:
            for report in store.boot_reports(vid):
                if report.started_at + timedelta(seconds=report.duration) < since:
                    continue
                ref_of = version or _ref(store, vid)
                found.append(_Source(f"report-{report.id}", ref_of, BOOT_TEST_TARGET, report.started_at,
                                     fixed=report.console))  # fmt: skip
    if target == BOOT_TEST_TARGET:
        return found
    kind, name = parse_target(target) if target is not None else ("local", None)
    if kind != "local":
        raise ConfigError(
            f"logs of {target} are not read by amiforge: an Auto Scaling group's consoles stay in EC2",
            fix="ship the instances' logs with the CloudWatch agent, or read one with aws ec2 get-console-output",
        )
    keeper = provider_for("local", settings)
    if not isinstance(keeper, FleetKeeper):  # pragma: no cover - the local provider keeps fleets
        return found
    for fleet in [name] if name is not None else keeper.fleet_names():
        detail = keeper.fleet_detail(fleet)
        for d in detail.members:
            m = d.member
            if m.version_ref is None or (version is not None and m.version_ref != version):
                continue
            found.append(_Source(m.id, m.version_ref, f"local:{fleet}", m.launched_at, text=_file(Path(d.console))))
    return found


def _ref(store: Store, version_id: int) -> str:
    name, number, _ = store.version_heads([version_id])[version_id]
    return f"{name}@{number}"


def console_lines(
    *,
    store: Store,
    settings: Settings,
    ref: str | None = None,
    target: str | None = None,
    since: timedelta = timedelta(hours=24),
    follow: bool = False,
    poll: float = 1.0,
    until: Callable[[], bool] = lambda: False,
) -> Iterator[ConsoleLine]:
    """Every console line of the boot tests and fleet members chosen (`ref`, `target`), oldest source first; with
    `follow`, then each new whole line as it is written, until `until()` says stop (or Ctrl-C)."""
    chosen = None if target is None or target == BOOT_TEST_TARGET else canonical_target(target)
    start = datetime.now(UTC) - since
    sources = _sources(store, settings, ref, chosen if chosen is not None else target, start)
    sources.sort(key=lambda s: s.launched_at)
    for source in sources:
        yield from (line for line in _read(source) if line.at >= start)
    known = {(s.target, s.instance) for s in sources}
    polls = 0
    while follow and not until():
        time.sleep(poll)
        polls += 1
        if polls % LOOK_FOR_NEW == 0:  # new members and boot tests: looked for now and then, not at every poll
            for source in _sources(store, settings, ref, chosen if chosen is not None else target, start):
                if (source.target, source.instance) not in known:  # launched since: from its start
                    known.add((source.target, source.instance))
                    sources.append(source)
        for source in sources:
            yield from _read(source)
