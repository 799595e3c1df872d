"""What every lifecycle verb shares: a run id, a RunContext whose cleanups always run, and the rule that a
failed cleanup is recorded as an `orphaned` event but never hides the error that caused the unwinding."""

from __future__ import annotations

import uuid
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from typing import Any, ParamSpec, TypeVar

from amiforge.model import ImageVersion
from amiforge.providers.interface import PhaseUpdate, RunContext
from amiforge.store.interface import Store

P = ParamSpec("P")
R = TypeVar("R")


class RecordingExitStack(ExitStack):
    """An ExitStack whose callbacks never raise: each failure is kept in `.failures` (all of them, where a
    plain ExitStack would surface only the last) so the caller can record every orphaned resource."""

    def __init__(self) -> None:
        super().__init__()
        self.failures: list[str] = []

    def callback(self, callback: Callable[P, R], /, *args: P.args, **kwds: P.kwargs) -> Callable[P, R]:
        def guarded() -> None:
            try:
                callback(*args, **kwds)
            except Exception as e:
                self.failures.append(f"{getattr(callback, '__name__', callback)!s}{args!r}: {type(e).__name__}: {e}")

        super().callback(guarded)
        return callback


def new_run_id() -> str:
    return uuid.uuid4().hex[:12]


@contextmanager
def run_context(
    store: Store,
    *,
    actor: str,
    ref: str | None,
    progress: Callable[[PhaseUpdate], None],
    log: Callable[[str], None],
) -> Iterator[RunContext]:
    stack = RecordingExitStack()
    ctx = RunContext(run_id=new_run_id(), cleanup=stack, log=log, progress=progress)
    failures: list[Any] = stack.failures
    try:
        yield ctx
    finally:
        try:
            stack.close()
        except Exception as e:  # an enter_context()/push() exit failed: same treatment
            failures.append(f"{type(e).__name__}: {e}")
        for failure in failures:  # a cleanup failed: keep the original outcome, leave a trace to act on
            store.append_event("orphaned", actor=actor, ref=ref, data={"run": ctx.run_id, "error": failure})


# Long operations recorded in the store's `operations` table, by kind.
DISTRIBUTE = "distribute"


def recorded_copies(version: ImageVersion, store: Store) -> dict[str, str]:
    """Copy location → the location of the artifact it was copied from, over every distribute attempt."""
    copies: dict[str, str] = {}
    for op in store.operations(version.id, DISTRIBUTE):
        recorded = op.detail.get("copies", {})
        if isinstance(recorded, dict):
            copies.update({str(k): str(v) for k, v in recorded.items()})
    return copies
