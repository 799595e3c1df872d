"""cache gc: the bake cache's entries (base file systems, step layers, disk records) that no kept version uses —
every version but the retired ones — planned by default and removed on request. Refused while a bake runs: its
layers are in the cache before the registry records them."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

from amiforge.errors import StateError
from amiforge.lifecycle.retire import STALE_RUN
from amiforge.model import Status
from amiforge.providers import provider_for
from amiforge.providers.interface import CacheEntry, CacheKeeper, CachePlan
from amiforge.settings import Settings
from amiforge.store.interface import Store


@dataclass(frozen=True)
class CacheOutcome:
    plan: CachePlan
    applied: bool
    removed: tuple[CacheEntry, ...] = ()


def cache_gc(
    store: Store,
    settings: Settings,
    *,
    apply: bool,
    min_age: timedelta,
    actor: str,
    now: datetime | None = None,
) -> CacheOutcome:
    moment = now or datetime.now(UTC)
    baking = [v.ref for v in store.list_versions(statuses=[Status.BAKING], summary=True)
              if moment - v.created_at < STALE_RUN]  # fmt: skip
    if baking:
        raise StateError(
            f"a bake is running ({', '.join(baking)}): the layers it makes are not recorded yet",
            fix="run `amiforge cache gc` once it has ended",
        )
    keeper = provider_for("local", settings)
    assert isinstance(keeper, CacheKeeper)
    plan = keeper.plan_cache_gc(store.layer_keys(excluding=[Status.RETIRED]), min_age=min_age, now=moment)
    if not apply or not plan.entries:
        return CacheOutcome(plan, applied=apply)
    removed = keeper.apply_cache_gc(plan)
    store.append_event(
        "cache.gc",
        actor=actor,
        data={
            "removed": [{"folder": e.folder, "key": e.key} for e in removed],
            "bytes": sum(e.size_bytes for e in removed),
        },
    )
    return CacheOutcome(plan, applied=True, removed=tuple(removed))
