"""What every lifecycle verb shares: a run id, a RunContext whose cleanups always run, and the rule that a
failed cleanup is recorded as an `orphaned` event but never hides the error that caused the unwinding."""

from __future__ import annotations

import uuid
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager

from amiforge.providers.interface import PhaseUpdate, RunContext
from amiforge.store.interface import Store


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
    stack = ExitStack()
    ctx = RunContext(run_id=new_run_id(), cleanup=stack, log=log, progress=progress)
    try:
        yield ctx
    finally:
        try:
            stack.close()
        except Exception as e:  # a cleanup failed: keep the original outcome, leave a trace to act on
            store.append_event(
                "orphaned",
                actor=actor,
                ref=ref,
                data={"run": ctx.run_id, "error": f"{type(e).__name__}: {e}"},
            )
