"""The one way amiforge waits for something outside it: doubling delays up to a ceiling, until a deadline.

`poll` asks "is it there yet?" (an image becoming available, a console line, a group launching replacements);
`retry` calls again while the answer is an error worth another try (EC2's eventual consistency right after a
create, a busy Auto Scaling group). Throttling is botocore's business (its standard retry mode), not this module's.
The clock and sleep are injectable, so tests never wait.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import TypeVar

from amiforge.errors import InfraError, NotFound

T = TypeVar("T")


@dataclass(frozen=True)
class Wait:
    """Delays double from `first_delay` up to `max_delay`; give up after `deadline` seconds."""

    first_delay: float = 2.0
    max_delay: float = 30.0
    deadline: float = 7200.0
    sleep: Callable[[float], None] = time.sleep
    clock: Callable[[], float] = time.monotonic

    def until(self, deadline: float) -> Wait:
        """The same pace with another deadline."""
        return replace(self, deadline=deadline)


def retry(fn: Callable[[], T], *, again: Callable[[Exception], bool], wait: Wait) -> T:
    """`fn()`, called again while it raises an error `again` accepts, until the next try would pass the deadline;
    then that last error is raised."""
    start = wait.clock()
    delay = wait.first_delay
    while True:
        try:
            return fn()
        except Exception as e:
            if not again(e) or wait.clock() - start + delay > wait.deadline:
                raise
        wait.sleep(delay)
        delay = min(delay * 2, wait.max_delay)


class _NotYet(Exception):
    pass


def poll(what: str, probe: Callable[[], T | None], wait: Wait) -> T:
    """`probe()` until it returns a value; NotFound counts as "not yet" (EC2 is eventually consistent after a
    create). Raises InfraError (retryable) naming `what` once the deadline has passed."""

    def attempt() -> T:
        try:
            value = probe()
        except NotFound:
            value = None
        if value is None:
            raise _NotYet
        return value

    try:
        return retry(attempt, again=lambda e: isinstance(e, _NotYet), wait=wait)
    except _NotYet:
        raise InfraError(f"{what}: not done after {wait.deadline:.0f}s", retryable=True) from None
