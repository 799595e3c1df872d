"""Who drives a rollout: a controller's lease (docs/architecture.md §5, §14; migration 0013).

A controller (`amiforge rollout start|resume|rollback`, or a thread of `amiforge serve`) claims the rollout by
compare-and-set on (controller, controller_seen_at), renews the lease every RENEW_SECONDS from a thread of its own (a
wave can wait minutes on its fleet), and gives it up at the end. Another controller is refused while the lease is
live. A lease not renewed for LEASE_SECONDS is stale; so is one held by a dead process of this very machine and PID
namespace (its owner id says which: host, pid, boot and namespace). A controller that loses its lease stops at its
next step (`Lease.check`, through `Controls.fence`). Hosts that drive rollouts of one registry need clocks within
LEASE_SECONDS − RENEW_SECONDS of each other (NTP).
"""

from __future__ import annotations

import hashlib
import logging
import os
import secrets
import socket
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path

from amiforge.errors import StateError
from amiforge.model import ROLLOUT_LIVE, Rollout
from amiforge.store.interface import Store

logger = logging.getLogger(__name__)

LEASE_SECONDS = 60.0
RENEW_SECONDS = 15.0


def _here() -> str:
    """This machine's boot and this process's PID namespace, in 12 hex digits: a pid means the same process only
    where both match (a container with the host's name has another namespace)."""
    try:
        boot = Path("/proc/sys/kernel/random/boot_id").read_text().strip()
        namespace = str(os.stat("/proc/self/ns/pid").st_ino)
    except OSError:
        return "unknown"
    return hashlib.sha256(f"{boot}/{namespace}".encode()).hexdigest()[:12]


HERE = _here()


def owner_id() -> str:
    return f"{socket.gethostname()}:{os.getpid()}:{HERE}:{secrets.token_hex(4)}"


def controller_gone(rollout: Rollout, now: datetime | None = None) -> bool:
    """Whether nobody drives the rollout now: no controller, a lease not renewed for LEASE_SECONDS, or a controller
    of this machine and PID namespace whose process is gone."""
    if rollout.controller is None or rollout.controller_seen_at is None:
        return True
    if (now or datetime.now(UTC)) - rollout.controller_seen_at > timedelta(seconds=LEASE_SECONDS):
        return True
    host, pid, where, *_ = [*rollout.controller.split(":"), "", "", ""]
    if host != socket.gethostname() or where != HERE or where == "unknown" or not pid.isdigit():
        return False
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return True
    except PermissionError:  # alive, someone else's
        return False
    return False


def ensure_undriven(rollout: Rollout) -> None:
    """StateError if a live controller drives the rollout (a second one would race it)."""
    if not controller_gone(rollout):
        seen = rollout.controller_seen_at
        ago = f", heard {(datetime.now(UTC) - seen).total_seconds():.0f} s ago" if seen else ""
        raise StateError(
            f"rollout #{rollout.id} is driven by {rollout.controller}{ago}",
            fix=f"let it finish, or pause or abort it (amiforge rollout pause|abort {rollout.id}); if that "
            f"controller died on another host, resume again once it has not been heard for {LEASE_SECONDS:.0f} s",
        )


@dataclass
class Lease:
    rollout_id: int
    owner: str
    lost: threading.Event = field(default_factory=threading.Event)

    def check(self) -> None:
        """StateError once the lease is lost: the controller stops before its next step."""
        if self.lost.is_set():
            raise StateError(
                f"rollout #{self.rollout_id}: this controller lost its lease to another",
                fix=f"amiforge rollout status {self.rollout_id} shows who drives it now",
            )


@contextmanager
def lease(rollout_id: int, store: Store) -> Iterator[Lease]:
    """Hold the rollout's lease while the block runs; StateError if the rollout is over or a live controller
    holds it. Given up at the end, however the block ends."""
    rollout = store.get_rollout(rollout_id)
    if rollout.state not in ROLLOUT_LIVE:
        raise StateError(f"rollout #{rollout_id} is {rollout.state}: there is nothing to drive", fix="start another")
    ensure_undriven(rollout)
    held = Lease(rollout_id, owner_id())
    if not store.claim_rollout(
        rollout_id, held.owner, expect=rollout.controller, expect_seen=rollout.controller_seen_at
    ):
        raise StateError(f"another controller took rollout #{rollout_id} just now", fix="look at it again")
    stop = threading.Event()

    def renew() -> None:
        while not stop.wait(RENEW_SECONDS):
            try:
                if not store.renew_rollout(rollout_id, held.owner):
                    logger.warning("rollout #%d: another controller took the lease; this one stops", rollout_id)
                    held.lost.set()
                    return
            except Exception as e:  # the next renewal tries again; the lease lasts LEASE_SECONDS
                logger.warning("rollout #%d: the lease was not renewed: %s", rollout_id, e)

    renewer = threading.Thread(target=renew, name=f"amiforge-lease-{rollout_id}", daemon=True)
    renewer.start()
    try:
        yield held
    finally:
        stop.set()
        renewer.join(timeout=RENEW_SECONDS)
        try:
            store.renew_rollout(rollout_id, held.owner, release=True)
        except Exception as e:  # it expires by itself
            logger.warning("rollout #%d: the lease was not released: %s", rollout_id, e)
