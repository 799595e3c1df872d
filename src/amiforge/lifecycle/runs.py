"""What every lifecycle verb shares: a run id, a RunContext whose cleanups always run, and the rule that a
failed cleanup is recorded as an `orphaned` event and shown, but never hides the error that caused the unwinding."""

from __future__ import annotations

import logging
import time
import uuid
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager

from amiforge.model import Event, ImageVersion, Leftover
from amiforge.providers.interface import Cleanups, PhaseUpdate, Release, RunContext
from amiforge.store.interface import Store

logger = logging.getLogger(__name__)


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
    release: Release | None = None,
) -> Iterator[RunContext]:
    """A RunContext whose cleanups run when the block ends. Each cleanup that failed becomes an `orphaned` event (what,
    where, the command that removes it, the error) and stays in `ctx.cleanup.leftovers` for the caller's outcome;
    when the block raised, each is also a note on the exception, so the error a user sees says what stayed."""
    stack = Cleanups()
    run_id = new_run_id()
    ctx = RunContext(run_id=run_id, cleanup=stack, release=release, log=log, progress=_logged(progress, run_id, ref))
    started = time.monotonic()
    logger.info("run %s (%s): started", run_id, ref or "-")
    try:
        yield ctx
    except BaseException as e:
        logger.info(
            "run %s (%s): failed after %.1fs (%s); cleaning up",
            run_id,
            ref or "-",
            time.monotonic() - started,
            type(e).__name__,
        )
        interrupted = _close(stack)
        for leftover in stack.leftovers:
            e.add_note(leftover.describe())
        try:
            record_leftovers(store, stack.leftovers, actor=actor, ref=ref, run_id=ctx.run_id)
        except Exception as unrecorded:  # the registry failed too: keep the first error, say what was not recorded
            e.add_note(f"the leftovers above could not be recorded in the registry: {unrecorded}")
        raise
    logger.info("run %s (%s): done after %.1fs; cleaning up", run_id, ref or "-", time.monotonic() - started)
    interrupted = _close(stack)
    try:
        record_leftovers(store, stack.leftovers, actor=actor, ref=ref, run_id=ctx.run_id)
    except BaseException as unrecorded:  # the run went well, but its leftovers could not be recorded: say which
        for leftover in stack.leftovers:
            unrecorded.add_note(leftover.describe())
        raise
    if interrupted is not None:
        raise interrupted


def _logged(progress: Callable[[PhaseUpdate], None], run_id: str, ref: str | None) -> Callable[[PhaseUpdate], None]:
    """`progress`, and each phase of the run at INFO in the log too (names, states, details and seconds only)."""

    def report(u: PhaseUpdate) -> None:
        seconds = f" ({u.seconds:.1f}s)" if u.seconds is not None else ""
        detail = f": {u.detail}" if u.detail else ""
        # A shell step's phase is named after its script's first words, which a log file keeps: not logged.
        name = u.name.split("shell:", 1)[0] + "shell step" if "shell:" in u.name else u.name
        logger.info("run %s (%s): %s %s%s%s", run_id, ref or "-", name, u.state, detail, seconds)
        progress(u)

    return report


def _close(stack: Cleanups) -> BaseException | None:
    """Run the cleanups. One that fails is kept as a leftover. Ctrl-C or SIGTERM during one is kept as that cleanup's
    leftover too (Cleanups.add); the cleanups registered before it still run, and the interrupt is returned so the
    caller records what was left before it stops."""
    try:
        stack.close()
    except Exception as e:  # an enter_context()/push() exit failed: kept like a failed cleanup
        error = f"{type(e).__name__}: {e}"
        stack.leftovers.append(Leftover("what a context manager holds", "-", "see the error", error))
    except BaseException as e:
        return e
    return None


def record_leftovers(store: Store, leftovers: Sequence[Leftover], *, actor: str, ref: str | None, run_id: str) -> None:
    """One `orphaned` event per leftover: what, where, the command that removes it, why its cleanup failed."""
    for leftover in leftovers:  # a cleanup failed: keep the original outcome, leave a trace to act on
        store.append_event(
            "orphaned",
            actor=actor,
            ref=ref,
            data={
                "run": run_id,
                "what": leftover.what,
                "where": leftover.where,
                "remove": leftover.remove,
                "error": leftover.error,
            },
        )


def recorded_leftovers(events: Iterable[Event]) -> list[tuple[Event, Leftover]]:
    """Every leftover the `orphaned` events among `events` recorded, with its event."""
    found = []
    for e in events:
        if e.kind == "orphaned":
            text = {k: str(e.data.get(k, "")) for k in ("what", "where", "remove", "error")}
            # Events written before leftovers were described carry only the error.
            found.append((e, Leftover(text["what"] or "unknown", text["where"] or "?", text["remove"] or "?",
                                      text["error"])))  # fmt: skip
    return found


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
