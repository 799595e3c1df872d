"""LocalProvider: the Provider protocol on this machine (mmdebstrap + overlay layers + QEMU)."""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Collection, Mapping, Sequence
from contextlib import AbstractContextManager
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import ClassVar

from amiforge.errors import ConfigError, InfraError, NotFound
from amiforge.inputs import file_sha256
from amiforge.model import Artifact, BootReport, CheckResult, LayerRecord, Leftover
from amiforge.providers import guest as in_guest
from amiforge.providers.interface import (
    BakeResult,
    CacheEntry,
    CachePlan,
    Fleet,
    FleetDetail,
    GcPlan,
    GcResult,
    HostReport,
    ImageView,
    PhaseUpdate,
    RegionSurvey,
    Release,
    Removal,
    RunContext,
    RunningSurvey,
    RunState,
    Stored,
)
from amiforge.providers.local import qemu
from amiforge.providers.local.base import BaseSpec, ensure_base
from amiforge.providers.local.cache_gc import apply_cache_gc, plan_cache_gc
from amiforge.providers.local.disk import build_disk, cached_image
from amiforge.providers.local.fleet import create_fleet, destroy_fleet, list_fleets, open_fleet
from amiforge.providers.local.inspect import open_image
from amiforge.providers.local.layers import ensure_layer, generalised_files, plan_layers
from amiforge.providers.local.leftovers import apply_local_gc, plan_local_gc
from amiforge.providers.local.retire import (
    delete_binned,
    deprecate_local,
    remove_image,
    restore_image,
    running_local,
    stored_local,
    survey_local,
)
from amiforge.providers.local.tools import require, temporary_dir, tool_report
from amiforge.recipe import Checks, Recipe
from amiforge.recipe import Provider as ProviderSpec
from amiforge.settings import Settings

# Time a port check keeps retrying a refused connection after the in-guest checks are done.
PORT_GRACE = 15.0


# A guest that printed nothing at all in this long never started (the kernel's first line comes in seconds): the
# boot test boots it once more instead of judging the image. A shorter wait may end before the first line.
SILENT_AFTER = 30.0


class LocalProvider:
    name: ClassVar[str] = "local"

    def __init__(self, settings: Settings) -> None:
        self.settings = settings

    # --- bake -----------------------------------------------------------------------------------------------

    def preflight(self, recipe: Recipe) -> None:
        if recipe.provider.type != "local":
            raise ConfigError(
                f"recipe {recipe.name!r} is for provider {recipe.provider.type!r}, not 'local'",
                fix="set `provider: {type: local}` or use the provider the recipe names",
            )
        for tool in ("mmdebstrap", "unshare", "mkfs.ext4", "qemu-img", "busybox"):
            require(tool)

    def bake(self, recipe: Recipe, ctx: RunContext) -> BakeResult:
        self.preflight(recipe)
        cache = self.settings.cache_dir
        spec = BaseSpec(
            recipe.base.suite,
            self.settings.mirror,
            self.settings.security_mirror,
            tuple(recipe.base.packages),
        )
        started = time.monotonic()
        ctx.progress(PhaseUpdate("base", "start", f"debian {spec.suite}"))
        base_key, base_dir, hit, base_size = ensure_base(spec, cache, ctx)
        base_seconds = time.monotonic() - started
        ctx.phase_done("base", base_seconds, "hit" if hit else "miss")
        records = [
            LayerRecord(0, base_key, f"base: debian {spec.suite} minbase", hit, round(base_seconds, 3), base_size)
        ]
        lowers = [base_dir]
        plans = plan_layers(base_key, recipe.steps, recipe.folder, recipe.name)
        for plan in plans:
            upper, hit, seconds, size = ensure_layer(plan, lowers, cache, recipe.folder, recipe.name, ctx)
            lowers.append(upper)
            records.append(LayerRecord(plan.index, plan.key, plan.description, hit, round(seconds, 3), size))
        store_dir = self.settings.regions_dir / self.settings.region / recipe.name
        top = plans[-1].key
        started = time.monotonic()
        image = cached_image(cache, top, ctx.log)
        if image is None or image.qcow2.parent != store_dir:
            image = build_disk(lowers, top, cache, store_dir, ctx)
        else:
            ctx.phase_done("disk", time.monotonic() - started, "hit (bytes verified)")
        generalised = generalised_files(lowers[-1])  # the last layer is always generalisation
        return BakeResult(image.artifact(self.settings.region), tuple(records), generalised)

    # --- boot test ------------------------------------------------------------------------------------------

    def boot_test(self, artifact: Artifact, checks: Checks, ctx: RunContext, spec: ProviderSpec) -> BootReport:
        require("qemu-system-x86_64")
        if artifact.kernel is None or artifact.initrd is None:
            raise ConfigError(f"artifact {artifact.location} has no kernel/initrd; it is not a local image")
        workdir = temporary_dir(ctx.cleanup, "amiforge-boot-")
        accel, why = qemu.choose_accel(self.settings, Path(artifact.kernel), workdir)
        ctx.log(f"accelerator: {accel} ({why})")

        guest_checks = in_guest.guest_checks(checks)
        ports = sorted({h.port for h in checks.http} | {t.port for t in checks.tcp})
        forwards = {p: qemu.free_port() for p in ports}
        guest_spec = qemu.GuestSpec(
            disk=Path(artifact.location),
            kernel=Path(artifact.kernel),
            initrd=Path(artifact.initrd),
            workdir=workdir,
            accel=accel,
            memory_mb=self.settings.guest_memory_mb,
            cpus=self.settings.guest_cpus,
            forwards=forwards,
            checks_script=in_guest.guest_script(guest_checks),
            release=in_guest.release_file(ctx.release) if ctx.release is not None else None,
            name=f"amiforge-{ctx.run_id}",
        )
        started_at = datetime.now(UTC)
        t0 = time.monotonic()
        ctx.progress(PhaseUpdate("boot", "start", accel))
        results: list[CheckResult] = []
        ready_at: float | None = None
        with contextlib.ExitStack() as stack:
            for attempt in (1, 2):
                guest = stack.enter_context(qemu.Guest(guest_spec))
                ready = guest.wait_for(in_guest.READY_LINE_RE, checks.ready_within)
                silent = not guest.console().strip() and checks.ready_within >= SILENT_AFTER
                if ready is not None or not guest.running() or not silent:
                    break
                # QEMU ran for the whole wait and printed nothing, not even the kernel's first line: the virtual
                # machine never started, which says nothing about the image. Once more; then an error, no verdict.
                guest.stop()
                ctx.log(f"QEMU printed nothing in {checks.ready_within:.0f}s (attempt {attempt})")
            else:
                raise InfraError(
                    f"QEMU printed nothing on the console in {checks.ready_within:.0f}s, twice: the virtual machine "
                    "did not start, so the image was not tested",
                    retryable=True,
                    fix="run the boot test again (amiforge test NAME@N); amiforge doctor checks QEMU on this host",
                )
            if ready is None:
                state = "QEMU exited" if not guest.running() else f"not ready within {checks.ready_within:.0f}s"
                results.append(CheckResult("ready", "ready", False, state))
            else:
                ready_at = round(ready[0], 3)
                results.append(CheckResult("ready", "ready", True, f"ready after {ready_at:.1f}s"))
                ctx.phase_done("boot", ready_at, f"ready ({accel})")
                guest.wait_for(in_guest.DONE_MARK, qemu.CHECKS_GRACE + in_guest.COMMAND_TIMEOUT * len(guest_checks))
                results += in_guest.guest_results(guest_checks, guest.lines())
                deadline = time.monotonic() + PORT_GRACE
                for h in checks.http:
                    ok, detail = qemu.http_check(forwards[h.port], h.path, h.expect_status, h.expect_body, deadline)
                    results.append(CheckResult(f"http :{h.port}{h.path}", "http", ok, detail))
                for t in checks.tcp:
                    ok, detail = qemu.tcp_check(forwards[t.port], deadline)
                    results.append(CheckResult(f"tcp :{t.port}", "tcp", ok, detail))
            console = guest.console()
        if ready is None:
            ctx.progress(PhaseUpdate("boot", "failed", results[0].detail))
        return BootReport(
            time_to_ready=ready_at,
            checks=tuple(results),
            console=console,
            accel=accel,
            started_at=started_at,
            duration=round(time.monotonic() - t0, 3),
        )

    # --- doctor (HostChecker) --------------------------------------------------------------------------------

    def host_report(self) -> HostReport:
        usable, why = qemu.kvm_report(self.settings.cache_dir)
        return HostReport(tool_report(), usable, why)

    # --- fleets ---------------------------------------------------------------------------------------------

    def fleet(self, name: str) -> Fleet:
        """A local fleet made by `amiforge fleet create` (the rollout target `local:NAME`); NotFound if none."""
        return open_fleet(self.settings, name)

    def fleet_region(self, name: str) -> str:
        """Local fleets run the artifacts of this machine's region."""
        return self.settings.region

    # --- FleetKeeper: local fleets outlive the command that made them ---------------------------------------

    def create_fleet(
        self,
        name: str,
        size: int,
        artifact: Artifact,
        release: Release,
        checks: Checks,
        *,
        progress: Callable[[PhaseUpdate], None],
    ) -> FleetDetail:
        return create_fleet(self.settings, name, size, artifact, release, checks, progress=progress).detail()

    def fleet_detail(self, name: str) -> FleetDetail:
        return open_fleet(self.settings, name).detail()

    def fleet_names(self) -> list[str]:
        return list_fleets(self.settings)

    def destroy_fleet(self, name: str) -> list[str]:
        return destroy_fleet(self.settings, name)

    # --- gc (Collector): temporary directories runs left behind ---------------------------------------------

    def plan_gc(
        self,
        region: str,
        *,
        registered: Collection[str],
        run_state: Callable[[str], RunState],
        recorded: Sequence[tuple[str | None, Leftover]],
        min_age: timedelta,
        now: datetime,
    ) -> GcPlan:
        # Artifacts live in the image store, never in the temporary places gc looks at.
        del region, registered
        return plan_local_gc(self.settings, recorded=recorded, run_state=run_state, min_age=min_age, now=now)

    def apply_gc(self, plan: GcPlan, *, max_deletions: int) -> GcResult:
        return apply_local_gc(self.settings, plan, max_deletions=max_deletions)

    # --- retire (Retirer): what uses a local image, and removing one ----------------------------------------

    def survey(self, region: str, artifacts: Collection[Artifact]) -> RegionSurvey:
        return survey_local(self.settings, region, artifacts)

    def deprecate(self, artifact: Artifact, at: datetime) -> tuple[str, ...]:
        return deprecate_local(self.settings, artifact, at)

    def deregister(self, artifact: Artifact) -> tuple[Removal, str]:
        return ("removed" if remove_image(self.settings, artifact) else "gone"), ""

    def delete_snapshots(self, region: str, snapshots: Sequence[str]) -> list[str]:
        return delete_binned(self.settings, region, snapshots)

    def restore(self, artifact: Artifact) -> None:
        restore_image(self.settings, artifact)

    def stored(self, region: str, artifacts: Collection[Artifact]) -> Mapping[str, Stored]:
        del region
        return stored_local(self.settings, artifacts)

    def running(self, regions: Collection[str]) -> RunningSurvey:
        del regions  # this machine's fleets are all in the local region
        return running_local(self.settings, self.settings.region)

    # --- cache gc (CacheKeeper) ------------------------------------------------------------------------------

    def plan_cache_gc(self, keep: Collection[str], *, min_age: timedelta, now: datetime) -> CachePlan:
        return plan_cache_gc(self.settings.cache_dir, keep, min_age=min_age, now=now)

    def apply_cache_gc(self, plan: CachePlan) -> list[CacheEntry]:
        return apply_cache_gc(plan)

    # --- inspection -----------------------------------------------------------------------------------------

    def inspect(self, artifact: Artifact) -> AbstractContextManager[ImageView]:
        return open_image(artifact, self.settings.cache_dir / "scratch")

    def current_digest(self, artifact: Artifact) -> str:
        """sha256 of the artifact's disk image as it is now (a signature must still match it)."""
        disk = Path(artifact.location)
        if not disk.is_file():
            raise NotFound(f"the artifact's disk {disk} is missing from the local image store")
        return file_sha256(disk)
