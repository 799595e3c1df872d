"""pipeline run: bake → boot-test → scan → sign → (promote), each step the same verb a user can run alone."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime

from amiforge.lifecycle.bake import BakeOutcome, bake
from amiforge.lifecycle.promote import PromoteOutcome, policy_of, promote
from amiforge.lifecycle.scan import ScanOutcome, scan, scan_gate
from amiforge.lifecycle.sign import sign
from amiforge.model import SignatureRecord
from amiforge.providers.interface import PhaseUpdate
from amiforge.recipe import Recipe
from amiforge.settings import Settings
from amiforge.store.interface import Store


@dataclass(frozen=True)
class PipelineOutcome:
    baked: BakeOutcome
    scanned: ScanOutcome
    signature: SignatureRecord
    promoted: PromoteOutcome | None


def run_pipeline(
    recipe: Recipe,
    *,
    store: Store,
    settings: Settings,
    promote_to: str | None = None,
    progress: Callable[[PhaseUpdate], None] = lambda _u: None,
) -> PipelineOutcome:
    baked = bake(recipe, store=store, settings=settings, test=True, progress=progress)
    ref = baked.version.ref
    progress(PhaseUpdate("scan", "start"))
    scanned = scan(ref, store=store, settings=settings)
    progress(
        PhaseUpdate("scan", "done", f"{len(scanned.scan.packages)} packages, {len(scanned.scan.findings)} findings")
    )
    # A version whose findings fail the entry channel's rules is not signed: the pipeline stops here (exit 4).
    scan_gate(scanned.scan, policy=policy_of(settings), now=datetime.now(UTC), ref=scanned.version.ref).raise_if_unmet()
    # The pipeline makes the default key on first use, so `make demo` works on a fresh machine.
    signature = sign(ref, store=store, settings=settings, create_key=True)
    progress(PhaseUpdate("sign", "done", signature.key_id))
    promoted = None
    if promote_to:
        promoted = promote(ref, promote_to, store=store, settings=settings, reason="pipeline run")
        progress(PhaseUpdate(f"promote {promote_to}", "done", promoted.pointer.current))
    return PipelineOutcome(baked, scanned, signature, promoted)
