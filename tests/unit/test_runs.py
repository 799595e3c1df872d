"""run_context: every cleanup runs, and each failing one becomes its own `orphaned` event."""

from __future__ import annotations

from pathlib import Path

import pytest

from amiforge.lifecycle.runs import run_context
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
