"""Fleets amiforge keeps itself (local: long-running QEMU guests booted from one version): create, look, destroy.

Creating and destroying are recorded in the event log (`fleet.created`, `fleet.destroyed`). A fleet only ever runs a
version that passed its boot test. Rolling a fleet over to another version is the rollout controller's business
(lifecycle/rollout.py); an Auto Scaling group is made outside amiforge and only rolled out to.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from amiforge.errors import ConfigError, GateFailed, GateFailure, NotFound
from amiforge.lifecycle.boottest import checks_of, machine_release
from amiforge.lifecycle.telemetry import measure
from amiforge.lifecycle.views import version_named
from amiforge.model import ImageVersion, Status, require_status
from amiforge.providers import provider_for
from amiforge.providers.interface import FleetDetail, FleetKeeper, Member, PhaseUpdate
from amiforge.settings import Settings
from amiforge.store.interface import Store

# A fleet runs only versions that passed their boot test; the later states only add gates on top of it.
USABLE = (Status.TESTED, Status.SCANNED, Status.SIGNED)
# The provider whose fleets amiforge makes and ends (an Auto Scaling group is made outside amiforge).
KEEPER = "local"


@dataclass(frozen=True)
class FleetCreated:
    fleet: FleetDetail
    version: ImageVersion
    not_ready: list[Member]

    @property
    def failure(self) -> GateFailed | None:
        """The readiness gate's verdict: None when every member came up ready."""
        if not self.not_ready:
            return None
        return GateFailed(
            "fleet readiness",
            [GateFailure(m.id, f"{m.state}: {m.detail}") for m in self.not_ready],
            fix=f"see each guest's console.log under {self.fleet.where}; "
            f"`amiforge fleet destroy {self.fleet.name}` stops them all",
        )


@dataclass(frozen=True)
class FleetDestroyed:
    name: str
    existed: bool
    stopped: list[str]


def _keeper(settings: Settings) -> FleetKeeper:
    provider = provider_for(KEEPER, settings)
    if not isinstance(provider, FleetKeeper):  # pragma: no cover - the local provider keeps fleets
        raise ConfigError(f"the {KEEPER} provider keeps no fleets")
    return provider


def _unusable_fix(v: ImageVersion) -> str:
    if v.status in (Status.BUILT, Status.FAILED):
        return f"boot-test it first: `amiforge test {v.ref}`"
    if v.status is Status.BAKING:
        return "wait for its bake to finish"
    return f"run another version: `amiforge images list --name {v.name}`"


def fleet_version(store: Store, *, channel: str | None, ref: str | None) -> ImageVersion:
    """The version to run: `ref` (NAME@N), or the current version of `channel` (IMAGE:CHANNEL); exactly one."""
    version = version_named(store, ref=ref, channel=channel)
    require_status(version, USABLE, doing="run by a fleet", fix=_unusable_fix(version))
    return version


def create_fleet(
    name: str,
    size: int,
    *,
    channel: str | None = None,
    ref: str | None = None,
    store: Store,
    settings: Settings,
    progress: Callable[[PhaseUpdate], None] = lambda _u: None,
) -> FleetCreated:
    """Boot `size` guests of a tested version and wait for each; `failure` of the outcome says if any is not
    ready (the guests stay up either way, for a look at their consoles)."""
    version = fleet_version(store, channel=channel, ref=ref)
    artifacts = [a for a in store.artifacts(version.id) if a.provider == KEEPER]
    if not artifacts:
        raise NotFound(f"{version.ref} has no local artifact", fix="a local fleet runs versions baked locally")
    fleet = _keeper(settings).create_fleet(
        name, size, artifacts[0], machine_release(version, artifacts[0]), checks_of(version), progress=progress
    )
    not_ready = [d.member for d in fleet.members if d.member.state != "ready"]
    store.append_event(
        "fleet.created",
        actor=settings.actor,
        ref=version.ref,
        data={"fleet": name, "members": [d.member.id for d in fleet.members], "not_ready": [m.id for m in not_ready]},
    )
    measure(store, settings, f"{KEEPER}:{name}")
    return FleetCreated(fleet, version, not_ready)


def fleet_detail(name: str, *, settings: Settings) -> FleetDetail:
    return _keeper(settings).fleet_detail(name)


def fleets(*, settings: Settings) -> list[FleetDetail]:
    """Every fleet, as it is now."""
    keeper = _keeper(settings)
    return [keeper.fleet_detail(name) for name in keeper.fleet_names()]


def destroy_fleet(name: str, *, store: Store, settings: Settings) -> FleetDestroyed:
    """Stop every guest of the fleet and remove it; recorded when there was a fleet to destroy. Safe to repeat."""
    keeper = _keeper(settings)
    existed = name in keeper.fleet_names()
    if existed:
        measure(store, settings, f"{KEEPER}:{name}")  # its last heartbeats and replacements, before they are gone
    stopped = keeper.destroy_fleet(name)
    if existed:
        store.append_event("fleet.destroyed", actor=settings.actor, data={"fleet": name, "stopped": stopped})
    measure(store, settings, f"{KEEPER}:{name}")  # the fleet is gone: every boot of it stops now
    return FleetDestroyed(name, existed, stopped)
