"""What every route of `amiforge serve` shares: the registry, the settings, `/metrics`'s renderer and the rollout
controllers this server drives."""

from __future__ import annotations

import logging
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

from fastapi import Request

from amiforge.settings import Settings
from amiforge.store.interface import Store
from amiforge.web.auth import Caller, Refused
from amiforge.web.metrics import Metrics

logger = logging.getLogger(__name__)


class Controllers:
    """Rollouts started, resumed or rolled back from the web are driven here, one thread each, by the same
    controller as `amiforge rollout start` (lifecycle.rollout.drive). A server that stops leaves them in the
    registry as they are: `amiforge rollout resume ID` (or the console's Resume) carries on."""

    def __init__(self, store: Store) -> None:
        self.store = store
        self._lock = threading.Lock()
        self._threads: dict[int, threading.Thread] = {}

    def drive(self, rollout_id: int, settings: Settings) -> None:
        from amiforge.lifecycle import rollout as controller  # the providers load with the first rollout

        def run() -> None:
            try:
                controller.drive(rollout_id, store=self.store, settings=settings)
            except Exception as e:  # recorded by the controller where it can be; the log says the rest
                logger.error("rollout #%d: the controller stopped: %s: %s", rollout_id, type(e).__name__, e)

        with self._lock:
            running = self._threads.get(rollout_id)
            if running is not None and running.is_alive():
                return  # already driven here: a second controller would only race the first
            thread = threading.Thread(target=run, name=f"amiforge-rollout-{rollout_id}", daemon=True)
            self._threads[rollout_id] = thread
            thread.start()

    def driving(self) -> list[int]:
        with self._lock:
            return sorted(i for i, t in self._threads.items() if t.is_alive())

    def join(self, timeout: float) -> None:
        """Wait (at most `timeout` seconds each) for the controllers to finish: for tests."""
        with self._lock:
            threads = list(self._threads.values())
        for thread in threads:
            thread.join(timeout)


# How many requests at once may do the expensive reads (hashing artifacts, recomputing the audit chain, diffs), so a
# read token cannot take every worker thread: the others get 503 at once (waiting would hold a thread too).
HEAVY_AT_ONCE = 2


@dataclass
class Context:
    store: Store
    settings: Settings
    metrics: Metrics
    controllers: Controllers
    secure_cookies: bool = False  # served over TLS: the session cookie is Secure
    open_metrics: bool = False  # /metrics without a token (loopback Prometheus)
    public_origin: str | None = None  # scheme://host[:port] the browser sees, behind a proxy (serve --public-url)
    _heavy: threading.BoundedSemaphore = field(default_factory=lambda: threading.BoundedSemaphore(HEAVY_AT_ONCE))

    @contextmanager
    def heavy(self) -> Iterator[None]:
        """Hold one of the HEAVY_AT_ONCE places for an expensive read; 503 when none is free."""
        if not self._heavy.acquire(blocking=False):
            raise Refused(503, "the server is busy with other expensive reads", fix="try again in a minute")
        try:
            yield
        finally:
            self._heavy.release()

    def settings_for(self, caller: Caller) -> Settings:
        """The settings with the caller as the actor every event it causes names."""
        return self.settings.model_copy(update={"actor": caller.actor})


def context(request: Request) -> Context:
    ctx = request.app.state.amiforge
    assert isinstance(ctx, Context)
    return ctx
