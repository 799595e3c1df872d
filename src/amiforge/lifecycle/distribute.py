"""distribute: copy a signed version to the recipe's regions and share it — resumable from the registry.

Only a version that may be released is distributed (docs/architecture.md §8): signed, its signature verifying against
the artifacts as they are now, and its findings passing the policy's entry gate. Each attempt is an `operations` row;
attempts on the same version share one run id, so a rerun after a crash (or a failed region) adopts the copies an
earlier attempt made instead of copying again. Each copy is recorded as an artifact of the version the moment it is
done, and in the operation's detail as a copy of the signed artifact (which is what lets `verify` accept it).
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from dataclasses import dataclass

from amiforge.errors import ConfigError, NotFound
from amiforge.lifecycle.boottest import provider_spec_of
from amiforge.lifecycle.release import releasable
from amiforge.lifecycle.runs import DISTRIBUTE, new_run_id, recorded_copies
from amiforge.model import Artifact, ImageVersion, Operation
from amiforge.providers import provider_for
from amiforge.providers.interface import Copy, Distributor, PhaseUpdate
from amiforge.settings import Settings
from amiforge.store.interface import Store

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class DistributeOutcome:
    version: ImageVersion
    source: Artifact
    copies: list[Copy]
    operation: Operation


def distribute(
    ref: str,
    *,
    store: Store,
    settings: Settings,
    public: bool = False,
    progress: Callable[[PhaseUpdate], None] = lambda _u: None,
) -> DistributeOutcome:
    version = store.get_version(ref)
    releasable(version, store=store, settings=settings, action="distributed")
    provider = provider_for(version.provider, settings)
    if not isinstance(provider, Distributor):
        raise ConfigError(
            f"{version.ref} was baked by the {version.provider} provider, which does not distribute to regions",
            fix="distribution is for aws versions (provider: {type: aws, distribution: …})",
        )
    spec = provider_spec_of(version)
    copies_of = recorded_copies(version, store)
    sources = [a for a in store.artifacts(version.id) if a.provider == version.provider and a.location not in copies_of]
    if not sources:
        raise NotFound(f"{version.ref} has no artifact to distribute")
    source = sources[0]
    actor = settings.actor
    op = store.begin_operation(DISTRIBUTE, version.id, actor=actor, new_run_id=new_run_id())
    made: dict[str, str] = {}  # copy location -> source location
    detail: dict[str, object] = {"source": source.location, "copies": made, "public": public}
    lock = threading.Lock()

    def on_copy(copy: Copy) -> None:
        # Worker threads: one store write at a time. The copy is recorded before anything else can fail.
        with lock:
            store.add_artifact(version.id, copy.artifact)
            made[copy.artifact.location] = copy.source.location
            store.update_operation(op.id, "running", detail)

    store.append_event("distribute.started", actor=actor, ref=version.ref, data={"run": op.run_id, "attempt": op.id})
    logger.info(
        "distribute %s from %s (run %s, attempt %d, %d earlier copies)",
        version.ref,
        source.location,
        op.run_id,
        op.id,
        len(copies_of),
    )
    try:
        copies = provider.distribute(source, spec, run_id=op.run_id, public=public, on_copy=on_copy, progress=progress)
    except BaseException as e:  # KeyboardInterrupt too: the attempt is over, the next one resumes it
        detail["error"] = f"{type(e).__name__}: {e}"[:2000]
        logger.info("distribute %s failed after %d copies: %s", version.ref, len(made), type(e).__name__)
        store.update_operation(op.id, "failed", detail)
        store.append_event("distribute.failed", actor=actor, ref=version.ref, data={"run": op.run_id, **detail})
        raise
    op = store.update_operation(op.id, "done", detail)
    logger.info(
        "distribute %s done: %s",
        version.ref,
        ", ".join(f"{c.artifact.region} {c.artifact.location}" for c in copies) or "nothing to copy",
    )
    store.append_event(
        "distribute.completed",
        actor=actor,
        ref=version.ref,
        data={
            "run": op.run_id,
            "regions": {c.artifact.region: c.artifact.location for c in copies},
            "adopted": sorted(c.artifact.region for c in copies if c.adopted),
            "shared_with": sorted({who for c in copies for who in c.shared_with}),
        },
    )
    return DistributeOutcome(store.get_version(version.ref), source, copies, op)
