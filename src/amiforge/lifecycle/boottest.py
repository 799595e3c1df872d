"""boottest: boot a version on a throw-away copy, check it, record the report, and gate on it.

Passing moves the version to `tested`; failing moves it to `failed` and raises GateFailed listing every
failed check (the report is recorded either way).
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from pydantic import TypeAdapter, ValidationError

from amiforge.errors import GateFailed, GateFailure, InfraError, NotFound
from amiforge.lifecycle.runs import run_context
from amiforge.lifecycle.telemetry import record_boot_test
from amiforge.model import Artifact, BootReport, ImageVersion, Leftover, Status, require_status
from amiforge.providers import provider_for
from amiforge.providers.interface import PhaseUpdate, Release
from amiforge.recipe import Checks
from amiforge.recipe import Provider as ProviderSpec
from amiforge.settings import Settings
from amiforge.store.interface import Store

logger = logging.getLogger(__name__)

TESTABLE = (Status.BUILT, Status.TESTED, Status.FAILED)


@dataclass(frozen=True)
class TestOutcome:
    version: ImageVersion
    report: BootReport
    orphaned: tuple[Leftover, ...] = ()  # what the test's failed cleanups left behind


_PROVIDER_SPEC: TypeAdapter[ProviderSpec] = TypeAdapter(ProviderSpec)


def checks_of(version: ImageVersion) -> Checks:
    """The checks of the recipe as it was baked (not as the file reads today)."""
    try:
        return Checks.model_validate(baked_value(version, "checks", {}))
    except ValidationError as e:
        raise _damaged_recipe(version, f"its checks do not validate ({e.error_count()} problem(s))") from e


def machine_release(version: ImageVersion, artifact: Artifact | None = None) -> Release:
    """What a machine of `version` is told it runs (/etc/amiforge/release); `artifact`: the copy it boots (None
    while it is being baked). Made before anything is launched: a registry value that cannot go into the file
    stops the operation here."""
    try:
        return Release(
            image=version.name,
            version=version.ref,
            recipe_digest=version.recipe_digest,
            built_at=version.created_at,
            digest=artifact.digest if artifact is not None else None,
        )
    except ValueError as e:
        raise InfraError(
            f"the registry's record of {version.ref} (versions row id={version.id}) cannot tell a machine what it "
            f"runs: {e}",
            fix="restore the registry from a backup; amiforge writes only values of that shape",
        ) from e


def provider_spec_of(version: ImageVersion) -> ProviderSpec:
    """The recipe's provider block as it was baked (region, placement, distribution, publication)."""
    try:
        return _PROVIDER_SPEC.validate_python(baked_value(version, "provider", {"type": "local"}))
    except ValidationError as e:
        raise _damaged_recipe(version, f"its provider block does not validate ({e.error_count()} problem(s))") from e


def baked_value(version: ImageVersion, key: str, default: object) -> Any:
    """One top-level value of the recipe kept with the version (as it was baked); InfraError if that is damaged."""
    try:
        return json.loads(version.recipe or "{}").get(key, default)
    except (ValueError, AttributeError, RecursionError) as e:
        raise _damaged_recipe(version, "it is not a JSON object") from e


def _damaged_recipe(version: ImageVersion, why: str) -> InfraError:
    """The recipe kept with a version was written by amiforge after validation: if it no longer reads, the registry
    was changed outside amiforge (or by an amiforge whose recipe format this one does not know)."""
    return InfraError(
        f"the recipe {version.ref} was baked from (versions row id={version.id}) cannot be read: {why}",
        fix="restore the registry from a backup, or use the amiforge that baked it",
    )


def _not_testable_fix(version: ImageVersion) -> str:
    if version.status is Status.BAKING:
        return "wait for its bake to finish (or, if that bake died, bake the recipe again)"
    if version.status in (Status.SCANNED, Status.SIGNED):
        return f"{version.ref} passed its boot test already; `amiforge images show {version.ref}` shows the report"
    return f"bake a new version of the recipe: amiforge bake {version.recipe_path}"


def _discard(_line: str) -> None:
    pass  # a boot test keeps its report, not a build log


def boot_test(
    ref: str,
    *,
    store: Store,
    settings: Settings,
    progress: Callable[[PhaseUpdate], None] = lambda _u: None,
) -> TestOutcome:
    version = store.get_version(ref)
    require_status(version, TESTABLE, doing="boot-tested", fix=_not_testable_fix(version))
    artifacts = [a for a in store.artifacts(version.id) if a.provider == version.provider]
    if not artifacts:
        raise NotFound(
            f"{version.ref} has no artifact to boot (the bake failed before the disk was made)",
            fix=f"bake the recipe again: amiforge bake {version.recipe_path}",
        )
    provider = provider_for(version.provider, settings)
    actor = settings.actor
    release = machine_release(version, artifacts[0])
    with run_context(store, actor=actor, ref=version.ref, progress=progress, log=_discard, release=release) as ctx:
        report = provider.boot_test(artifacts[0], checks_of(version), ctx, provider_spec_of(version))
        run_id = ctx.run_id
    leftovers = tuple(ctx.cleanup.leftovers)
    report = store.add_boot_report(version.id, report)
    record_boot_test(store, version.id, report, run_id)
    failed = [c for c in report.checks if not c.passed]
    logger.info(
        "boot test %s: %s (time to ready %s, accel %s); failed checks: %s",
        version.ref,
        "passed" if report.passed else "failed",
        report.time_to_ready,
        report.accel,
        [c.name for c in failed] or "none",
    )
    # A scan made before the boot test read the same immutable bytes: once the test passes, it stands.
    earlier_scan = store.latest_scan(version.id) if report.passed else None
    store.append_event(
        "test.passed" if report.passed else "test.failed",
        actor=actor,
        ref=version.ref,
        data={
            "run": run_id,
            "report": report.id,
            "time_to_ready": report.time_to_ready,
            "accel": report.accel,
            "failed": [c.name for c in failed],
            **({"scan": earlier_scan.id} if earlier_scan is not None else {}),
        },
    )
    current = store.get_version(version.ref)
    target = Status.TESTED if report.passed else Status.FAILED
    if current.status != target or target == Status.TESTED:
        current = store.transition(current.id, target, expect=current.status)
    if earlier_scan is not None:
        current = store.transition(current.id, Status.SCANNED, expect=Status.TESTED)
    if not report.passed:
        error = GateFailed(
            "boot test",
            [GateFailure(c.name, c.detail) for c in failed],
            fix=f"see the console log: amiforge images show {version.ref} --console",
        )
        for leftover in leftovers:
            error.add_note(leftover.describe())
        raise error
    return TestOutcome(current, report, leftovers)
