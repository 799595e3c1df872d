"""The one wait/retry helper: pace, deadline, what counts as "again", and what is raised at the end."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from amiforge.errors import InfraError, NotFound
from amiforge.waiting import Wait, poll, retry


class FakeClock:
    def __init__(self) -> None:
        self.now = 0.0
        self.slept: list[float] = []

    def sleep(self, seconds: float) -> None:
        self.slept.append(seconds)
        self.now += seconds

    def wait(self, **pace: float) -> Wait:
        return Wait(sleep=self.sleep, clock=lambda: self.now, **pace)


def test_poll_doubles_up_to_the_ceiling_and_returns_the_first_value() -> None:
    clock = FakeClock()
    answers = iter([None, None, None, None, "ready"])
    assert poll("thing", lambda: next(answers), clock.wait(first_delay=1, max_delay=3, deadline=100)) == "ready"
    assert clock.slept == [1, 2, 3, 3]


def test_poll_counts_not_found_as_not_yet() -> None:
    clock = FakeClock()
    calls: Iterator[NotFound | str] = iter([NotFound("not yet"), "there"])

    def probe() -> str:
        answer = next(calls)
        if isinstance(answer, Exception):
            raise answer
        return answer

    assert poll("image", probe, clock.wait(first_delay=1)) == "there"


def test_poll_gives_up_before_the_next_delay_would_pass_the_deadline() -> None:
    clock = FakeClock()
    with pytest.raises(InfraError, match=r"image ami-0000000000test01 becoming available: not done after 10s") as e:
        poll("image ami-0000000000test01 becoming available", lambda: None, clock.wait(first_delay=2, deadline=10))
    assert e.value.retryable
    assert clock.slept == [2, 4]  # 6 s waited; 8 more would end at 14 > 10
    assert clock.now <= 10


def test_retry_raises_an_error_it_does_not_accept_at_once() -> None:
    clock = FakeClock()

    def boom() -> str:
        raise ValueError("not retryable")

    with pytest.raises(ValueError):
        retry(boom, again=lambda e: isinstance(e, InfraError), wait=clock.wait())
    assert clock.slept == []


def test_retry_raises_the_last_accepted_error_at_the_deadline() -> None:
    clock = FakeClock()
    errors = iter(InfraError(f"busy {i}", retryable=True) for i in range(100))

    def busy() -> str:
        raise next(errors)

    with pytest.raises(InfraError, match="busy 3"):
        retry(busy, again=lambda e: isinstance(e, InfraError), wait=clock.wait(first_delay=1, deadline=10))
    assert clock.slept == [1, 2, 4]


def test_until_keeps_the_pace_and_changes_the_deadline() -> None:
    clock = FakeClock()
    wait = clock.wait(first_delay=5, max_delay=15, deadline=600).until(30)
    assert (wait.first_delay, wait.max_delay, wait.deadline, wait.sleep) == (5, 15, 30, clock.sleep)
