"""bake and boottest over a fake provider and a real SQLite registry: states, records, events, cleanups."""

from __future__ import annotations

import textwrap
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import ClassVar

import pytest

import amiforge.lifecycle.bake as bake_module
import amiforge.lifecycle.boottest as boottest_module
import amiforge.providers
from amiforge.errors import ConfigError, GateFailed, InfraError, NotFound, StateError
from amiforge.lifecycle.bake import BakeOutcome, bake
from amiforge.lifecycle.boottest import boot_test, machine_release
from amiforge.model import Artifact, BootReport, CheckResult, LayerRecord, Status
from amiforge.providers.interface import BakeResult, ImageView, PhaseUpdate, Provider, Release, RunContext
from amiforge.recipe import Checks, Recipe, load_recipe
from amiforge.settings import Settings
from amiforge.store.sql import SqlStore, open_store

DIGEST_1 = "0" * 63 + "1"
DIGEST_2 = "0" * 63 + "2"
ACTOR = "TEST-0001@test"

RECIPE = textwrap.dedent(
    """\
    name: web
    steps:
      - packages: [nginx]
      - shell: echo hi > /etc/motd
    checks:
      ready_within: 30s
      units: [nginx]
      http:
        - {port: 80, expect_body: "web tier"}
    tags: {team: web}
    """
)


def _report(*checks: CheckResult) -> BootReport:
    return BootReport(
        time_to_ready=4.5,
        checks=checks,
        console="AMIFORGE-READY 4.5\nAMIFORGE-CHECKS-DONE",
        accel="tcg",
        started_at=datetime(2025, 1, 2, 3, 4, 5, tzinfo=UTC),
        duration=9.25,
    )


PASSING = _report(
    CheckResult("ready", "ready", True, "ready after 4.5s"),
    CheckResult("unit nginx", "unit", True, "exit 0: active"),
)
FAILING = _report(
    CheckResult("ready", "ready", True, "ready after 4.5s"),
    CheckResult("unit nginx", "unit", False, "exit 3, expected 0: inactive"),
    CheckResult("http :80/", "http", False, "body lacks 'web tier'"),
)


@dataclass
class Script:
    """What the fake provider does, and what it saw. Shared by every instance the factory makes."""

    tmp: Path
    bake_error: BaseException | None = None
    bake_cleanup: Callable[[], None] | None = None
    report: BootReport = PASSING
    boot_error: BaseException | None = None
    digest: str = DIGEST_1
    cleanups_run: list[str] = field(default_factory=list)
    baked: list[str] = field(default_factory=list)
    booted: list[tuple[Artifact, Checks]] = field(default_factory=list)
    releases: list[Release | None] = field(default_factory=list)  # what each bake and boot test was told it makes
    instances: int = 0


class FakeProvider:
    name: ClassVar[str] = "local"

    def __init__(self, settings: Settings, script: Script) -> None:
        self.settings = settings
        self.script = script
        script.instances += 1

    def preflight(self, recipe: Recipe) -> None:
        if recipe.provider.type != "local":
            raise ConfigError("not local")

    def bake(self, recipe: Recipe, ctx: RunContext) -> BakeResult:
        s = self.script
        s.baked.append(recipe.name)
        s.releases.append(ctx.release)
        scratch = s.tmp / f"scratch-{ctx.run_id}"
        scratch.mkdir()
        ctx.cleanup.callback(lambda: s.cleanups_run.append(f"rm {scratch.name}"))
        ctx.cleanup.callback(scratch.rmdir)
        if s.bake_cleanup is not None:
            ctx.cleanup.callback(s.bake_cleanup)
        ctx.log("layer 1: packages: nginx")
        ctx.progress(PhaseUpdate("layer 1", "start", "miss"))
        ctx.phase_done("layer 1", 1.23456, "miss")
        if s.bake_error is not None:
            ctx.log("E: the step failed")
            raise s.bake_error
        ctx.log("disk: done")
        artifact = Artifact(
            provider="local",
            region="local",
            location=str(s.tmp / f"{s.digest}.qcow2"),
            digest=s.digest,
            size_bytes=123456,
            kernel=str(s.tmp / f"{s.digest}.vmlinuz"),
            initrd=str(s.tmp / f"{s.digest}.initrd"),
        )
        layers = (
            LayerRecord(0, "0" * 63 + "a", "base: debian bookworm minbase", True, 0.01, 0),
            LayerRecord(1, "0" * 63 + "b", "packages: nginx", False, 1.235, 4096),
        )
        return BakeResult(artifact, layers)

    def boot_test(self, artifact: Artifact, checks: Checks, ctx: RunContext, spec: object) -> BootReport:
        s = self.script
        s.booted.append((artifact, checks))
        s.releases.append(ctx.release)
        ctx.cleanup.callback(lambda: s.cleanups_run.append("stop guest"))
        if s.boot_error is not None:
            raise s.boot_error
        return s.report

    @contextmanager
    def inspect(self, artifact: Artifact) -> Iterator[ImageView]:
        """An empty root filesystem; no disk bytes (nothing here scans)."""
        root = self.script.tmp / f"root-{artifact.digest}"
        root.mkdir(exist_ok=True)
        yield ImageView(root, None)

    def current_digest(self, artifact: Artifact) -> str:
        """The fake's disks are content-addressed: the file name is the digest of what is there now."""
        return Path(artifact.location).name.removesuffix(".qcow2")


@pytest.fixture
def script(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Script:
    s = Script(tmp=tmp_path)

    def factory(settings: Settings) -> Provider:
        return FakeProvider(settings, s)

    # The lifecycle verbs look providers up through amiforge.providers.provider_for, which reads this.
    monkeypatch.setattr(amiforge.providers, "PROVIDERS", {"local": factory})
    for module in (bake_module, boottest_module):
        assert not hasattr(module, "PROVIDERS"), f"{module.__name__} binds PROVIDERS by name: patch it too"
    return s


@pytest.fixture
def settings(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Settings:
    monkeypatch.delenv("AMIFORGE_CONFIG", raising=False)
    monkeypatch.chdir(tmp_path)  # no amiforge.toml here
    return Settings(data_dir=tmp_path / "data", actor=ACTOR)


@pytest.fixture
def store(tmp_path: Path) -> Iterator[SqlStore]:
    with open_store(f"sqlite:///{tmp_path}/r.db") as s:
        yield s


@pytest.fixture
def recipe_path(tmp_path: Path) -> Path:
    path = tmp_path / "recipe" / "recipe.yaml"
    path.parent.mkdir()
    path.write_text(RECIPE)
    return path


def _bake(
    path: Path,
    *,
    store: SqlStore,
    settings: Settings,
    test: bool = True,
    progress: Callable[[PhaseUpdate], None] = lambda _u: None,
) -> BakeOutcome:
    return bake(load_recipe(path), store=store, settings=settings, test=test, progress=progress)


def _kinds(store: SqlStore, ref: str | None = None) -> list[str]:
    return [e.kind for e in store.events(ref)]


# --- bake ---------------------------------------------------------------------------------------------------


def test_successful_bake_is_built_then_tested_and_fully_recorded(
    script: Script, settings: Settings, store: SqlStore, recipe_path: Path
) -> None:
    updates: list[PhaseUpdate] = []

    outcome = _bake(recipe_path, store=store, settings=settings, progress=updates.append)

    v = outcome.version
    assert (v.ref, v.status, v.digest, v.size_bytes, v.parent) == (
        "web@1",
        Status.TESTED,
        DIGEST_1,
        123456,
        None,
    )
    assert v.tags == {"team": "web"}
    assert v.recipe_path == str(recipe_path)
    assert outcome.phases == {"layer 1": 1.235}
    assert outcome.report is not None and outcome.report.passed and outcome.report.id is not None
    assert [layer.index for layer in outcome.layers] == [0, 1]

    stored = store.get_version("web@1")
    assert stored.status is Status.TESTED
    assert stored.log == "layer 1: packages: nginx\ndisk: done"
    [artifact] = store.artifacts(stored.id)
    assert (artifact.digest, artifact.location) == (DIGEST_1, str(script.tmp / f"{DIGEST_1}.qcow2"))
    assert store.layers(stored.id) == list(outcome.layers)
    [report] = store.boot_reports(stored.id)
    assert report.checks == PASSING.checks and report.accel == "tcg" and report.time_to_ready == 4.5

    # The boot test booted the stored artifact with the checks of the recipe as baked.
    [(booted, checks)] = script.booted
    assert booted == artifact
    assert checks.units == ["nginx"] and checks.ready_within == 30.0
    assert [(h.port, h.expect_body) for h in checks.http] == [(80, "web tier")]
    # What the machine is told it is: the version as the registry has it; the digest once the artifact exists.
    baking = Release("web", "web@1", stored.recipe_digest, stored.created_at)
    assert script.releases == [baking, replace(baking, digest=DIGEST_1)]
    assert stored.created_at.tzinfo is not None

    events = store.events("web@1")
    assert [e.kind for e in events] == ["bake.started", "bake.built", "test.passed"]
    assert all(e.actor == ACTOR for e in events)
    started, built, passed = events
    assert built.data["run"] == started.data["run"]
    assert (built.data["digest"], built.data["layers"], built.data["layers_hit"]) == (DIGEST_1, 2, 1)
    assert passed.data["report"] == report.id and passed.data["failed"] == []
    assert store.verify_events() == []

    # Every cleanup ran (the scratch dir is gone), once per run context.
    assert script.cleanups_run == [f"rm scratch-{started.data['run']}", "stop guest"]
    assert not any(p.name.startswith("scratch-") for p in script.tmp.iterdir())
    assert PhaseUpdate("layer 1", "start", "miss") in updates


def test_a_registry_value_no_release_file_could_hold_stops_before_a_launch(
    script: Script, settings: Settings, store: SqlStore, recipe_path: Path
) -> None:
    version = _bake(recipe_path, store=store, settings=settings).version
    with pytest.raises(InfraError, match=r"web@1 \(versions row id=\d+\) cannot tell a machine what it runs"):
        machine_release(replace(version, recipe_digest="$(reboot)"))


def test_bake_without_test_stays_built(script: Script, settings: Settings, store: SqlStore, recipe_path: Path) -> None:
    outcome = _bake(recipe_path, store=store, settings=settings, test=False)

    assert outcome.version.status is Status.BUILT and outcome.report is None
    assert script.booted == []
    assert _kinds(store) == ["bake.started", "bake.built"]


def test_second_bake_has_the_last_built_version_as_parent(
    script: Script, settings: Settings, store: SqlStore, recipe_path: Path
) -> None:
    first = _bake(recipe_path, store=store, settings=settings).version
    script.digest = DIGEST_2
    second = _bake(recipe_path, store=store, settings=settings).version

    assert (first.ref, first.parent) == ("web@1", None)
    assert (second.ref, second.parent) == ("web@2", "web@1")

    # A failed bake is nobody's parent: web@4 descends from web@2, not web@3.
    script.bake_error = InfraError("mmdebstrap failed")
    with pytest.raises(InfraError):
        _bake(recipe_path, store=store, settings=settings)
    script.bake_error = None
    fourth = _bake(recipe_path, store=store, settings=settings, test=False).version
    assert (fourth.ref, fourth.parent) == ("web@4", "web@2")
    assert store.verify_events() == []


def test_provider_failure_leaves_a_failed_version_with_its_log(
    script: Script, settings: Settings, store: SqlStore, recipe_path: Path
) -> None:
    error = InfraError("layer 2: shell failed (exit 1)", retryable=False)
    script.bake_error = error

    with pytest.raises(InfraError) as raised:
        _bake(recipe_path, store=store, settings=settings)

    assert raised.value is error
    v = store.get_version("web@1")
    assert v.status is Status.FAILED
    assert v.digest is None
    assert v.log == "layer 1: packages: nginx\nE: the step failed"
    assert store.artifacts(v.id) == [] and store.layers(v.id) == [] and store.boot_reports(v.id) == []
    assert _kinds(store) == ["bake.started", "bake.failed"]
    failed = store.events("web@1")[-1]
    assert failed.data["error"] == "InfraError: layer 2: shell failed (exit 1)"
    assert failed.data["run"] == store.events("web@1")[0].data["run"]
    assert len(script.cleanups_run) == 1 and script.cleanups_run[0].startswith("rm scratch-")
    assert not any(p.name.startswith("scratch-") for p in script.tmp.iterdir())
    assert script.booted == []  # no boot test of a failed bake
    assert store.verify_events() == []


def test_ctrl_c_during_the_bake_fails_the_version_and_is_re_raised(
    script: Script, settings: Settings, store: SqlStore, recipe_path: Path
) -> None:
    script.bake_error = KeyboardInterrupt()

    with pytest.raises(KeyboardInterrupt):
        _bake(recipe_path, store=store, settings=settings)

    v = store.get_version("web@1")
    assert v.status is Status.FAILED
    assert v.log == "layer 1: packages: nginx\nE: the step failed"
    assert _kinds(store) == ["bake.started", "bake.failed"]
    assert store.events()[-1].data["error"] == "KeyboardInterrupt: "
    assert len(script.cleanups_run) == 1
    assert not any(p.name.startswith("scratch-") for p in script.tmp.iterdir())


def test_a_failing_cleanup_is_recorded_and_never_hides_the_error(
    script: Script, settings: Settings, store: SqlStore, recipe_path: Path
) -> None:
    error = InfraError("mkfs.ext4 failed (exit 1)")
    script.bake_error = error

    def leaky() -> None:
        raise OSError(16, "Device or resource busy", "/var/cache/amiforge/mnt")

    script.bake_cleanup = leaky

    with pytest.raises(InfraError) as raised:
        _bake(recipe_path, store=store, settings=settings)

    assert raised.value is error  # unchanged, not the cleanup's OSError
    assert store.get_version("web@1").status is Status.FAILED
    assert _kinds(store) == ["bake.started", "bake.failed", "orphaned"]
    orphaned = store.events()[-1]
    assert orphaned.ref == "web@1" and orphaned.actor == ACTOR
    assert orphaned.data["run"] == store.events()[0].data["run"]
    assert str(orphaned.data["error"]).endswith(
        "OSError: [Errno 16] Device or resource busy: '/var/cache/amiforge/mnt'"
    )
    # The cleanups registered before the failing one still ran.
    assert len(script.cleanups_run) == 1
    assert not any(p.name.startswith("scratch-") for p in script.tmp.iterdir())
    assert store.verify_events() == []


def test_a_failing_cleanup_after_a_good_bake_is_recorded_and_the_bake_stands(
    script: Script, settings: Settings, store: SqlStore, recipe_path: Path
) -> None:
    def leaky() -> None:
        raise RuntimeError("could not stop helper")

    script.bake_cleanup = leaky

    outcome = _bake(recipe_path, store=store, settings=settings, test=False)

    assert outcome.version.status is Status.BUILT
    assert _kinds(store) == ["bake.started", "bake.built", "orphaned"]
    assert str(store.events()[-1].data["error"]).endswith("RuntimeError: could not stop helper")


def test_a_store_failure_after_the_provider_finished_still_fails_the_version(
    script: Script,
    settings: Settings,
    store: SqlStore,
    recipe_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # The provider made the image, then recording it failed (or Ctrl-C arrived): the version must not be
    # left `baking` forever.
    error = InfraError("registry error while trying to record an artifact", retryable=True)

    def broken(version_id: int, artifact: Artifact) -> Artifact:
        raise error

    monkeypatch.setattr(store, "add_artifact", broken)

    with pytest.raises(InfraError) as raised:
        _bake(recipe_path, store=store, settings=settings)

    assert raised.value is error
    v = store.get_version("web@1")
    assert v.status is Status.FAILED
    assert v.log == "layer 1: packages: nginx\ndisk: done"  # kept, and written once
    assert store.artifacts(v.id) == []
    assert _kinds(store) == ["bake.started", "bake.failed"]
    assert store.events()[-1].data["error"] == f"InfraError: {error.message}"


def test_bake_whose_boot_test_fails_raises_the_gate(
    script: Script, settings: Settings, store: SqlStore, recipe_path: Path
) -> None:
    script.report = FAILING

    with pytest.raises(GateFailed) as raised:
        _bake(recipe_path, store=store, settings=settings)

    assert [f.name for f in raised.value.failures] == ["unit nginx", "http :80/"]
    v = store.get_version("web@1")
    assert v.status is Status.FAILED and v.digest == DIGEST_1  # built, then failed its test
    assert _kinds(store) == ["bake.started", "bake.built", "test.failed"]


# --- boot test ----------------------------------------------------------------------------------------------


def _built(script: Script, settings: Settings, store: SqlStore, recipe_path: Path) -> str:
    return _bake(recipe_path, store=store, settings=settings, test=False).version.ref


def test_failed_check_raises_gate_failed_and_records_the_report(
    script: Script, settings: Settings, store: SqlStore, recipe_path: Path
) -> None:
    ref = _built(script, settings, store, recipe_path)
    script.report = FAILING

    with pytest.raises(GateFailed) as raised:
        boot_test(ref, store=store, settings=settings)

    gate = raised.value
    assert gate.exit_code == 4 and gate.gate == "boot test"
    assert [(f.name, f.detail) for f in gate.failures] == [
        ("unit nginx", "exit 3, expected 0: inactive"),
        ("http :80/", "body lacks 'web tier'"),
    ]
    assert "unit nginx" in gate.diagnostics() and f"amiforge images show {ref} --console" in gate.diagnostics()
    v = store.get_version(ref)
    assert v.status is Status.FAILED
    [report] = store.boot_reports(v.id)
    assert report.passed is False and report.checks == FAILING.checks
    failed = store.events(ref)[-1]
    assert failed.kind == "test.failed"
    assert failed.data["failed"] == ["unit nginx", "http :80/"] and failed.data["report"] == report.id
    assert script.cleanups_run[-1] == "stop guest"
    assert store.verify_events() == []


def test_retesting_a_failed_version_that_now_passes_makes_it_tested(
    script: Script, settings: Settings, store: SqlStore, recipe_path: Path
) -> None:
    ref = _built(script, settings, store, recipe_path)
    script.report = FAILING
    with pytest.raises(GateFailed):
        boot_test(ref, store=store, settings=settings)
    # A second failure keeps it failed (failed -> failed is no transition) and still raises.
    with pytest.raises(GateFailed):
        boot_test(ref, store=store, settings=settings)
    assert store.get_version(ref).status is Status.FAILED

    script.report = PASSING
    outcome = boot_test(ref, store=store, settings=settings)

    assert outcome.version.status is Status.TESTED
    assert store.get_version(ref).status is Status.TESTED
    assert [r.passed for r in store.boot_reports(outcome.version.id)] == [False, False, True]
    assert _kinds(store, ref) == ["bake.started", "bake.built", "test.failed", "test.failed", "test.passed"]

    # And a tested version may be tested again.
    again = boot_test(ref, store=store, settings=settings)
    assert again.version.status is Status.TESTED
    assert store.verify_events() == []
    # Each boot test is a boot of the target `boot-test` (telemetry's M1 and M2), counted in the totals too.
    boots = store.boots_in_window(datetime(2000, 1, 1, tzinfo=UTC), datetime.now(UTC) + timedelta(days=1))
    assert [(b.target, b.outcome) for b in boots] == [("boot-test", "failed")] * 2 + [("boot-test", "ready")] * 2
    assert len({b.instance for b in boots}) == 4  # one per run
    [totals] = store.boot_totals()
    assert (totals.target, totals.ready, totals.failed) == ("boot-test", 2, 2)


def test_boot_test_of_a_baking_version_is_a_state_error(script: Script, settings: Settings, store: SqlStore) -> None:
    v = store.create_version(
        name="web",
        recipe_digest=DIGEST_1,
        recipe_path="recipe.yaml",
        provider="local",
        tags={},
        parent=None,
        recipe="{}",
    )

    with pytest.raises(StateError) as raised:
        boot_test(v.ref, store=store, settings=settings)

    assert raised.value.exit_code == 3
    assert "web@1 is baking" in raised.value.message
    assert store.get_version(v.ref).status is Status.BAKING
    assert script.instances == 0 and store.events() == []


def test_boot_test_of_a_version_without_artifact_is_not_found(
    script: Script, settings: Settings, store: SqlStore, recipe_path: Path
) -> None:
    script.bake_error = InfraError("mmdebstrap failed")
    with pytest.raises(InfraError):
        _bake(recipe_path, store=store, settings=settings)

    with pytest.raises(NotFound, match="no artifact"):
        boot_test("web@1", store=store, settings=settings)
    assert script.booted == []


def test_boot_test_provider_error_leaves_the_state_alone(
    script: Script, settings: Settings, store: SqlStore, recipe_path: Path
) -> None:
    ref = _built(script, settings, store, recipe_path)
    error = InfraError("QEMU exited unexpectedly")
    script.boot_error = error

    with pytest.raises(InfraError) as raised:
        boot_test(ref, store=store, settings=settings)

    assert raised.value is error
    assert store.get_version(ref).status is Status.BUILT
    assert store.boot_reports(store.get_version(ref).id) == []
    assert script.cleanups_run[-1] == "stop guest"  # the guest was stopped anyway
    assert _kinds(store) == ["bake.started", "bake.built"]


def test_boot_test_uses_the_checks_as_baked_not_as_the_file_reads_now(
    script: Script, settings: Settings, store: SqlStore, recipe_path: Path
) -> None:
    ref = _built(script, settings, store, recipe_path)
    recipe_path.write_text(RECIPE.replace("units: [nginx]", "units: [nginx, php-fpm]"))

    boot_test(ref, store=store, settings=settings)

    [(_, checks)] = script.booted
    assert checks.units == ["nginx"]


def test_bake_for_a_provider_that_is_not_available_is_a_config_error(
    script: Script, settings: Settings, store: SqlStore, tmp_path: Path
) -> None:
    # `type: aws` is a valid recipe, but no aws provider is installed: a ConfigError, never a KeyError.
    path = tmp_path / "aws.yaml"
    path.write_text(
        "name: web\nprovider:\n  type: aws\n  region: eu-west-1\n"
        "  source: {owners: [amazon], name: debian-12-amd64-*}\n"
    )

    with pytest.raises(ConfigError) as raised:
        _bake(path, store=store, settings=settings)

    assert raised.value.exit_code == 2
    assert "aws" in raised.value.message and raised.value.fix is not None and "local" in raised.value.fix
    assert store.list_versions() == [] and store.events() == []
    assert script.instances == 0
