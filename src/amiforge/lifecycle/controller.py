"""What the rollout controller's two modes (lifecycle/rollout.py: canary waves; lifecycle/refresh.py: a cloud's
instance refresh) share: the controller's clock and progress, its outcome, rollout targets and which artifact of a
version a fleet runs."""

from __future__ import annotations

import logging
import os
import re
import secrets
import socket
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta

from amiforge.errors import ConfigError, NotFound, StateError
from amiforge.model import AWS_REGION_PATTERN, IMAGE_NAME_PATTERN, Artifact, ImageVersion, Rollout
from amiforge.providers import provider_for
from amiforge.providers.interface import Fleet, FleetProvider, Member, PhaseUpdate
from amiforge.settings import Settings
from amiforge.store.interface import Store
from amiforge.strategy import WaveDecision

logger = logging.getLogger(__name__)

# How often a wave is looked at while it bakes.
POLL_SECONDS = 5.0


@dataclass(frozen=True)
class Controls:
    """The controller's clock and progress, injectable for tests."""

    progress: Callable[[PhaseUpdate], None] = lambda _u: None
    # Looked up when a Controls is made (not when this class is defined), so a test can swap the module's clock.
    sleep: Callable[[float], None] = field(default_factory=lambda: time.sleep)
    clock: Callable[[], float] = field(default_factory=lambda: time.monotonic)


@dataclass(frozen=True)
class RolloutOutcome:
    rollout: Rollout
    decisions: list[WaveDecision]


# --- targets -----------------------------------------------------------------------------------------------------


# What a target's name may be: a local fleet's name, or an Auto Scaling group (1–255 characters, no ':' and no control
# characters, as AWS allows) with its region.
_TARGETS = {
    "local": re.compile(IMAGE_NAME_PATTERN),
    "aws": re.compile(rf"{AWS_REGION_PATTERN}/[^:\x00-\x1f\x7f]{{1,255}}"),
}


def parse_target(target: str) -> tuple[str, str]:
    """`local:NAME` (or a bare NAME) → ("local", NAME); `aws:REGION/GROUP` → ("aws", "REGION/GROUP")."""
    kind, sep, name = target.partition(":")
    if not sep:
        kind, name = "local", target
    pattern = _TARGETS.get(kind)
    if pattern is None or pattern.fullmatch(name) is None:
        raise ConfigError(
            f"target {target!r} is not local:NAME or aws:REGION/GROUP",
            fix="name a local fleet (amiforge fleet list) or an Auto Scaling group as aws:eu-west-1/web-asg",
        )
    return kind, name


def canonical_target(target: str) -> str:
    kind, name = parse_target(target)
    return f"{kind}:{name}"


def fleet_of(target: str, settings: Settings) -> tuple[Fleet, str, str]:
    """(the fleet, its provider's name, the region whose artifacts it runs)."""
    kind, name = parse_target(target)
    provider = provider_for(kind, settings)
    if not isinstance(provider, FleetProvider):
        raise ConfigError(f"the {kind} provider has no fleets", fix="use a local fleet or an Auto Scaling group")
    return provider.fleet(name), kind, provider.fleet_region(name)


def artifact_in(version: ImageVersion, store: Store, provider: str, region: str) -> Artifact:
    for artifact in store.artifacts(version.id):
        if artifact.provider == provider and artifact.region == region:
            return artifact
    raise NotFound(
        f"{version.ref} has no {provider} artifact in {region}",
        fix=f"amiforge distribute {version.ref} (its recipe must list {region})"
        if provider == "aws"
        else "bake it with the local provider",
    )


def versions_by_location(store: Store, provider: str) -> dict[str, str]:
    """Artifact location (qcow2 path, AMI id) → NAME@N, for members that do not carry their version."""
    return {artifact.location: ref for ref, artifact in store.provider_artifacts(provider)}


def live(members: Sequence[Member]) -> list[Member]:
    """The members that count as the fleet: not stopped."""
    return [m for m in members if m.state != "stopped"]


# --- who drives a rollout: the controller's lease -------------------------------------------------------------------

# A controller renews its lease this often, and one not heard for LEASE_SECONDS is gone (so is one on this host
# whose process has died, at once).
LEASE_SECONDS = 60.0
RENEW_SECONDS = 15.0


def controller_gone(rollout: Rollout, now: datetime | None = None) -> bool:
    """Whether nobody drives the rollout now: no controller, a lease not renewed for LEASE_SECONDS, or a controller
    on this host whose process is gone."""
    if rollout.controller is None or rollout.controller_seen_at is None:
        return True
    if (now or datetime.now(UTC)) - rollout.controller_seen_at > timedelta(seconds=LEASE_SECONDS):
        return True
    host, _, rest = rollout.controller.partition(":")
    pid = rest.partition(":")[0]
    if host != socket.gethostname() or not pid.isdigit():
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


@contextmanager
def lease(rollout_id: int, store: Store) -> Iterator[str]:
    """Hold the rollout's controller lease while the block runs, renewed by a thread of its own (a wave can wait
    minutes on its fleet); StateError if a live controller holds it. Released at the end, however it ends."""
    rollout = store.get_rollout(rollout_id)
    ensure_undriven(rollout)
    owner = f"{socket.gethostname()}:{os.getpid()}:{secrets.token_hex(4)}"
    if not store.claim_rollout(rollout_id, owner, expect=rollout.controller):
        raise StateError(f"another controller took rollout #{rollout_id} just now", fix="look at it again")
    stop = threading.Event()

    def renew() -> None:
        while not stop.wait(RENEW_SECONDS):
            try:
                if not store.renew_rollout(rollout_id, owner):
                    logger.warning("rollout #%d: another controller took the lease", rollout_id)
                    return
            except Exception as e:  # the next renewal tries again; the lease lasts LEASE_SECONDS
                logger.warning("rollout #%d: the lease was not renewed: %s", rollout_id, e)

    renewer = threading.Thread(target=renew, name=f"amiforge-lease-{rollout_id}", daemon=True)
    renewer.start()
    try:
        yield owner
    finally:
        stop.set()
        renewer.join()
        try:
            store.renew_rollout(rollout_id, owner, release=True)
        except Exception as e:  # it expires by itself
            logger.warning("rollout #%d: the lease was not released: %s", rollout_id, e)
