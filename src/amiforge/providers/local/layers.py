"""Recipe steps as content-addressed overlay layers.

Each step is one layer: an overlayfs upper dir produced by running the step in a chroot over the base and the
layers below it. Its key is sha256(parent key + the step's fingerprint, which covers the bytes of any file it
copies), so an unchanged prefix of the recipe is served from the cache and an edit rebuilds from that step on.
A cached layer is never written again: it is only ever a read-only lower dir.

The last layer of every bake is generalisation (GENERALISE below): what must not ship in a golden image.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from amiforge.errors import ConfigError
from amiforge.inputs import file_sha256
from amiforge.model import RemovedFile
from amiforge.providers.guest import GENERALISE, STEP_TIMEOUT, parse_generalised, step_script
from amiforge.providers.interface import PhaseUpdate, RunContext
from amiforge.providers.local.overlay import run_in_chroot
from amiforge.providers.local.tools import cached_size, publish_cache_entry, temporary_dir
from amiforge.recipe import (
    FileStep,
    Step,
    step_fingerprint,
)

# Bump when GENERALISE or the step scripts change meaning, so cached layers are rebuilt.
LAYER_FORMAT = 1

# What the generalisation layer's cache entry keeps of its report, for bakes that hit it.
GENERALISED_FILE = "generalised.json"


def generalised_files(layer_upper: Path) -> tuple[RemovedFile, ...]:
    """What the generalisation layer whose upper dir this is removed (recorded when the layer was built)."""
    record = layer_upper.parent / GENERALISED_FILE
    try:
        return tuple(RemovedFile(str(item["path"]), str(item["kind"])) for item in json.loads(record.read_text()))
    except (OSError, ValueError, TypeError, KeyError):
        return ()  # not recorded (a layer from before reports), or damaged: nothing known to report


@dataclass(frozen=True)
class LayerPlan:
    index: int  # 0 is the base; 1..n the steps; n+1 generalisation
    key: str
    description: str
    step: Step | None  # None for generalisation
    fingerprint: str = ""  # the step's fingerprint when the key was made (file steps are re-checked against it)


def chain_key(parent: str, material: str) -> str:
    return hashlib.sha256(f"{LAYER_FORMAT}\n{parent}\n{material}".encode()).hexdigest()


def plan_layers(base: str, steps: Sequence[Step], folder: Path, hostname: str) -> list[LayerPlan]:
    plans: list[LayerPlan] = []
    parent = base
    for i, step in enumerate(steps, start=1):
        fingerprint = step_fingerprint(step, folder)
        parent = chain_key(parent, fingerprint)
        plans.append(LayerPlan(i, parent, step.describe(), step, fingerprint))
    key = chain_key(parent, "generalise\n" + GENERALISE + hostname)
    plans.append(LayerPlan(len(steps) + 1, key, "generalise", None))
    return plans


def ensure_layer(
    plan: LayerPlan, lowers: Sequence[Path], cache: Path, folder: Path, hostname: str, ctx: RunContext
) -> tuple[Path, bool, float, int]:
    """Return (upper dir, hit, seconds, size) for the layer, building it if the cache lacks it.

    The layer is built in a temporary dir and renamed into place only when the step succeeded, so a failed or
    interrupted step never leaves a layer that a later bake would trust."""
    started = time.monotonic()
    final = cache / "layers" / plan.key
    name = f"layer {plan.index}: {plan.description}"
    if (final / "upper").is_dir():
        size = cached_size(final)
        seconds = time.monotonic() - started
        ctx.progress(PhaseUpdate(name, "done", "hit", seconds))
        return final / "upper", True, seconds, size
    ctx.progress(PhaseUpdate(name, "start", "miss"))
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = temporary_dir(ctx.cleanup, f".tmp-{plan.key[:12]}-", final.parent)
    for d in ("upper", "work", "merged", "stage"):
        (tmp / d).mkdir()
    script = step_script(plan.step, tmp / "stage", folder, hostname)
    if isinstance(plan.step, FileStep):
        staged = file_sha256(tmp / "stage" / "file")
        if step_fingerprint(plan.step, folder, src_sha256=staged) != plan.fingerprint:
            # Edited between planning and copying: caching these bytes under the old key would poison the cache.
            raise ConfigError(
                f"{plan.step.file.src} changed while the image was being baked",
                fix="bake again once the file is saved",
            )
    (tmp / "stage" / "step.sh").write_text(script)
    ctx.log(f"--- {name}")
    output: list[str] = []

    def log(line: str) -> None:
        output.append(line)
        ctx.log(line)

    run_in_chroot(
        lowers=lowers,
        upper=tmp / "upper",
        work=tmp / "work",
        merged=tmp / "merged",
        stage=tmp / "stage",
        command=["/bin/sh", "/run/amiforge/step.sh"],
        log=log,
        timeout=STEP_TIMEOUT,
        # Named by kind, never by its description: a shell step's starts with its script, and this name reaches
        # the debug log and error messages.
        what=f"layer {plan.index} ({plan.step.kind if plan.step is not None else 'generalise'} step)",
        drop_resolv_conf=plan.step is None,
    )
    for d in ("work", "merged", "stage"):
        shutil.rmtree(tmp / d)
    if plan.step is None:
        removed = [{"path": r.path, "kind": r.kind} for r in parse_generalised(output)]
        (tmp / GENERALISED_FILE).write_text(json.dumps(removed))
    size = publish_cache_entry(tmp, final, "upper")
    seconds = time.monotonic() - started
    ctx.phase_done(name, seconds, "miss")
    return final / "upper", False, seconds, size
