"""What `/metrics` renders: the registry's telemetry through `lifecycle.exporter.TelemetryCollector`, for the policy
as its file says now (a new SLO threshold is a new histogram bucket, which the rules regenerated from it need)."""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable

from amiforge.errors import ConfigError
from amiforge.lifecycle.exporter import TelemetryCollector
from amiforge.policy.document import Policy
from amiforge.settings import Settings
from amiforge.store.interface import Store

logger = logging.getLogger(__name__)


class PolicySource:
    """The policy as its file says now: read again when the file changes, the previous one kept while an edit does
    not validate."""

    def __init__(self, settings: Settings, load: Callable[[Settings], Policy]) -> None:
        self.settings, self._load = settings, load
        self._key: int | None = None
        self._policy = load(settings)
        self._key = self._stamp()

    def _stamp(self) -> int | None:
        path = self.settings.policy
        try:
            return path.stat().st_mtime_ns if path is not None else None
        except OSError:
            return self._key

    def get(self) -> Policy:
        stamp = self._stamp()
        if stamp != self._key:
            self._key = stamp
            try:
                self._policy = self._load(self.settings)
            except ConfigError as e:
                logger.warning("the policy no longer validates; /metrics keeps the previous one: %s", e.message)
        return self._policy


class Metrics:
    """Renders the exposition (amiforge's families only: no process metrics of this server mixed into the
    contract), with a collector for the policy as it is now."""

    def __init__(self, store: Store, policy: Policy | PolicySource, *, console_lines: bool = True) -> None:
        self.store, self.policy, self.console_lines = store, policy, console_lines
        self._lock = threading.Lock()
        self.collector = TelemetryCollector(store, self.current_policy(), console_lines=console_lines)

    def current_policy(self) -> Policy:
        return self.policy.get() if isinstance(self.policy, PolicySource) else self.policy

    def render(self) -> bytes:
        policy = self.current_policy()
        with self._lock:
            if policy is not self.collector.policy:
                self.collector = TelemetryCollector(self.store, policy, console_lines=self.console_lines)
            collector = self.collector
        return collector.render()
