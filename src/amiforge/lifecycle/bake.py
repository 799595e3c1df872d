"""bake: recipe → NAME@N. Registers the version before any work, so a failure — or Ctrl-C — midway still
leaves a `failed` version with its log, and nothing temporary behind (RunContext cleanups)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, replace

from amiforge.lifecycle.boottest import TestOutcome, boot_test, machine_release
from amiforge.lifecycle.runs import run_context
from amiforge.model import BootReport, ImageVersion, LayerRecord, Leftover, RemovedFile, Status
from amiforge.providers import provider_for
from amiforge.providers.interface import PhaseUpdate
from amiforge.recipe import Recipe, recipe_digest
from amiforge.settings import Settings
from amiforge.store.interface import Store

# States a successor's parent may be in: anything that was built (ancestry follows the last good bake).
BUILT_STATES = (Status.BUILT, Status.TESTED, Status.SCANNED, Status.SIGNED)


@dataclass(frozen=True)
class BakeOutcome:
    version: ImageVersion
    layers: tuple[LayerRecord, ...]
    phases: dict[str, float]
    report: BootReport | None
    generalised: tuple[RemovedFile, ...] = ()  # credentials and histories a step left that generalisation removed
    orphaned: tuple[Leftover, ...] = ()  # what the bake's (and boot test's) failed cleanups left behind


def bake(
    recipe: Recipe,
    *,
    store: Store,
    settings: Settings,
    test: bool = True,
    progress: Callable[[PhaseUpdate], None] = lambda _u: None,
) -> BakeOutcome:
    provider = provider_for(recipe.provider.type, settings)
    provider.preflight(recipe)
    parent = store.latest(recipe.name, BUILT_STATES)
    version = store.create_version(
        name=recipe.name,
        recipe_digest=recipe_digest(recipe),
        recipe_path=str(recipe.source_path),
        provider=recipe.provider.type,
        tags=recipe.tags,
        parent=parent.ref if parent else None,
        recipe=recipe.model_dump_json(),
    )
    actor = settings.actor
    log: list[str] = []
    release = machine_release(version)
    with run_context(store, actor=actor, ref=version.ref, progress=progress, log=log.append, release=release) as ctx:
        store.append_event(
            "bake.started",
            actor=actor,
            ref=version.ref,
            data={"run": ctx.run_id, "recipe": str(recipe.source_path)},
        )
        log_saved = False
        try:
            result = provider.bake(recipe, ctx)
            store.append_log(version.id, "\n".join(log))
            log_saved = True
            store.record_layers(version.id, result.layers)
            store.add_artifact(version.id, result.artifact)
            version = store.transition(
                version.id,
                Status.BUILT,
                expect=Status.BAKING,
                digest=result.artifact.digest,
                size_bytes=result.artifact.size_bytes,
            )
        except BaseException as e:  # KeyboardInterrupt too: the version must not stay `baking`
            # Recording the result is inside the try: a store failure (or Ctrl-C) after the provider finished
            # must fail the version too, not leave it `baking` forever.
            if not log_saved:
                store.append_log(version.id, "\n".join(log))
            store.transition(version.id, Status.FAILED, expect=Status.BAKING)
            store.append_event(
                "bake.failed",
                actor=actor,
                ref=version.ref,
                data={"run": ctx.run_id, "error": f"{type(e).__name__}: {e}"[:2000]},
            )
            raise
        store.append_event(
            "bake.built",
            actor=actor,
            ref=version.ref,
            data={
                "run": ctx.run_id,
                "digest": result.artifact.digest,
                "layers_hit": sum(1 for layer in result.layers if layer.hit),
                "layers": len(result.layers),
                "phases": ctx.phases,
                "generalised": [{"path": r.path, "kind": r.kind} for r in result.generalised],
            },
        )
        phases = dict(ctx.phases)
    outcome = BakeOutcome(version, result.layers, phases, None, result.generalised, tuple(ctx.cleanup.leftovers))
    if not test:
        return outcome
    try:
        tested: TestOutcome = boot_test(version.ref, store=store, settings=settings, progress=progress)
    except BaseException as e:  # the boot test failed: what the bake itself left behind must not go unsaid
        for leftover in outcome.orphaned:
            e.add_note(leftover.describe())
        raise
    return replace(outcome, version=tested.version, report=tested.report, orphaned=outcome.orphaned + tested.orphaned)
