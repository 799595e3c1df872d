"""What the registry and the layer cache key on: the digest of a whole recipe and the fingerprint of one step.

Both hash canonical JSON of the validated models plus the bytes every file step copies, so an edited source file
changes the key even when the recipe text does not. Bump `FINGERPRINT_VERSION` when the meaning of a step
changes, so old cache layers stop matching.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

from amiforge.recipe.document import Recipe
from amiforge.recipe.steps import FileStep, Step, source_sha256

__all__ = ["FINGERPRINT_VERSION", "recipe_digest", "step_fingerprint"]

FINGERPRINT_VERSION = 1


def _canonical(value: object) -> bytes:
    return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode()


def step_fingerprint(step: Step, folder: Path, *, src_sha256: str | None = None) -> str:
    """sha256 hex of one step's definition plus the bytes it copies (file steps); layer cache keys use it.

    `src_sha256`: the digest of the bytes actually staged for a file step, to check they are the ones the key was
    made from."""
    payload: dict[str, object] = {
        "v": FINGERPRINT_VERSION,
        "kind": step.kind,
        "step": step.model_dump(mode="json"),
    }
    if isinstance(step, FileStep):
        payload["src_sha256"] = src_sha256 if src_sha256 is not None else source_sha256(folder, step.file.src)
    return hashlib.sha256(_canonical(payload)).hexdigest()


def recipe_digest(recipe: Recipe) -> str:
    """sha256 hex of the validated recipe (canonical JSON) plus the sha256 of every file it copies."""
    files: dict[str, str] = {}
    for step in recipe.steps:
        if isinstance(step, FileStep):
            files[step.file.src] = source_sha256(recipe.folder, step.file.src)
    return hashlib.sha256(_canonical({"recipe": recipe.model_dump(mode="json"), "files": files})).hexdigest()
