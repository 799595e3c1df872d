"""run_context: every cleanup runs, and each failing one becomes its own `orphaned` event."""

from __future__ import annotations

from pathlib import Path

import pytest

from amiforge.lifecycle.runs import run_context
from amiforge.model import Leftover
from amiforge.store.sql import open_store


def test_every_failing_cleanup_is_recorded_and_the_original_error_wins(tmp_path: Path) -> None:
    store = open_store(f"sqlite:///{tmp_path / 'r.db'}")
    ran: list[str] = []

    def fails(name: str) -> None:
        ran.append(name)
        raise OSError(f"cannot remove {name}")

    context = run_context(store, actor="TEST", ref="web@1", progress=lambda _u: None, log=lambda _l: None)
    with pytest.raises(ValueError, match="the real problem"), context as ctx:
        ctx.cleanup.callback(ran.append, "first-registered")
        ctx.cleanup.callback(fails, "overlay-a")
        ctx.cleanup.callback(fails, "overlay-b")
        raise ValueError("the real problem")

    # Reverse order of registration, all of them, despite two failures.
    assert ran == ["overlay-b", "overlay-a", "first-registered"]
    orphaned = [e for e in store.events() if e.kind == "orphaned"]
    assert [e.data["error"] for e in orphaned] == [
        "OSError: cannot remove overlay-b",
        "OSError: cannot remove overlay-a",
    ]
    assert {e.data["run"] for e in orphaned} == {ctx.run_id}


def test_an_interrupt_during_cleanup_is_recorded_then_raised(tmp_path: Path) -> None:
    """Ctrl-C while cleaning up: what the interrupted cleanups were removing is recorded before amiforge stops."""
    store = open_store(f"sqlite:///{tmp_path / 'r.db'}")

    ran: list[str] = []

    def interrupted() -> None:
        raise KeyboardInterrupt

    context = run_context(store, actor="TEST", ref="web@1", progress=lambda _u: None, log=lambda _l: None)
    with pytest.raises(KeyboardInterrupt), context as ctx:
        ctx.cleanup.callback(ran.append, "registered first")
        ctx.cleanup.add(Leftover("EC2 instance (builder)", "i-0000000000test01 in eu-west-1", "amiforge gc"),
                        interrupted)  # fmt: skip
    # The interrupted cleanup's own leftover is recorded, and the cleanups registered before it still ran.
    (orphaned,) = [e for e in store.events() if e.kind == "orphaned"]
    assert (orphaned.data["where"], orphaned.data["error"]) == (
        "i-0000000000test01 in eu-west-1",
        "interrupted (KeyboardInterrupt)",
    )
    assert ran == ["registered first"]


def test_a_registry_failure_while_unwinding_keeps_the_first_error(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    store = open_store(f"sqlite:///{tmp_path / 'r.db'}")

    def fails() -> None:
        raise OSError("busy")

    def no_registry(*_args: object, **_kwargs: object) -> None:
        raise RuntimeError("the registry is down")

    monkeypatch.setattr(store, "append_event", no_registry)
    context = run_context(store, actor="TEST", ref="web@1", progress=lambda _u: None, log=lambda _l: None)
    with pytest.raises(ValueError, match="the real problem") as caught, context as ctx:
        ctx.cleanup.callback(fails)
        raise ValueError("the real problem")
    notes = caught.value.__notes__
    assert notes[0].startswith("left behind:") and "could not be recorded in the registry" in notes[1]
