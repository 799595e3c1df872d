"""Layer planning (content-addressed keys), the script each step kind becomes, and the layer cache's
hit/miss/failure handling (with the chroot runner replaced: no mounts here)."""

from __future__ import annotations

import os
import shlex
import stat
import subprocess
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TypeVar

import pytest
import yaml

from amiforge.errors import ConfigError, InfraError
from amiforge.model import RemovedFile
from amiforge.providers.guest import GENERALISE, parse_generalised, step_script
from amiforge.providers.interface import Cleanups, PhaseUpdate, RunContext
from amiforge.providers.local import layers
from amiforge.providers.local.layers import LayerPlan, ensure_layer, generalised_files, plan_layers
from amiforge.recipe import (
    FileStep,
    PackagesStep,
    Recipe,
    ServiceStep,
    ShellStep,
    UserStep,
    load_recipe,
)

BASE = "0" * 63 + "1"
S = TypeVar("S", PackagesStep, FileStep, ShellStep, ServiceStep, UserStep)

STEPS = """\
steps:
  - packages: [nginx, curl]
  - file: {src: files/index.html, dest: /var/www/html/index.html, mode: "0640", group: www-data}
  - shell: |
      echo "web tier" > /etc/motd
  - service: {enable: [nginx], disable: [apt-daily.timer]}
  - user: {name: deploy, groups: [sudo, adm], ssh_authorized_keys: ["ssh-ed25519 AAAATEST deploy@test"]}
"""


def _recipe(tmp_path: Path, steps: str = STEPS, index: bytes = b"<h1>web tier</h1>\n") -> Recipe:
    folder = tmp_path / "recipe"
    (folder / "files").mkdir(parents=True, exist_ok=True)
    (folder / "files" / "index.html").write_bytes(index)
    path = folder / "recipe.yaml"
    path.write_text("name: web\n" + steps)
    return load_recipe(path)


def _steps_yaml(*steps: dict[str, object]) -> str:
    return yaml.safe_dump({"steps": list(steps)})


def _keys(recipe: Recipe, base: str = BASE, hostname: str = "web") -> list[str]:
    return [p.key for p in plan_layers(base, recipe.steps, recipe.folder, hostname)]


# --- plan_layers --------------------------------------------------------------------------------------------


def test_plan_is_one_layer_per_step_then_generalise(tmp_path: Path) -> None:
    recipe = _recipe(tmp_path)

    plans = plan_layers(BASE, recipe.steps, recipe.folder, "web")

    assert [p.index for p in plans] == [1, 2, 3, 4, 5, 6]
    assert [p.step for p in plans[:-1]] == list(recipe.steps)
    assert plans[-1] == LayerPlan(6, plans[-1].key, "generalise", None)
    assert [p.description for p in plans[:-1]] == [
        "packages: nginx curl",
        "file files/index.html -> /var/www/html/index.html",
        'shell: echo "web tier" > /etc/motd',
        "service: enable nginx; disable apt-daily.timer",
        "user: deploy",
    ]
    keys = [p.key for p in plans]
    assert len(set(keys)) == len(keys)
    assert all(len(k) == 64 and int(k, 16) >= 0 for k in keys)


def test_keys_are_stable_for_the_same_input(tmp_path: Path) -> None:
    first = _keys(_recipe(tmp_path))
    # Reloaded from the same file, and from an identical recipe in another folder.
    assert _keys(_recipe(tmp_path)) == first
    assert _keys(_recipe(tmp_path / "elsewhere")) == first


def test_an_empty_recipe_is_only_generalisation(tmp_path: Path) -> None:
    plans = plan_layers(BASE, [], tmp_path, "web")
    assert len(plans) == 1
    assert (plans[0].index, plans[0].description, plans[0].step) == (1, "generalise", None)


# Each edit changes exactly one step of STEPS (by position).
EDITS = [
    (0, "packages: [nginx, curl]", "packages: [nginx, wget]"),
    (1, 'mode: "0640"', 'mode: "0644"'),
    (2, 'echo "web tier"', 'echo "api tier"'),
    (3, "disable: [apt-daily.timer]", "disable: [apt-daily-upgrade.timer]"),
    (4, "groups: [sudo, adm]", "groups: [sudo]"),
]


@pytest.mark.parametrize(("position", "old", "new"), EDITS, ids=[str(e[0]) for e in EDITS])
def test_editing_a_step_rebuilds_from_that_step_on(tmp_path: Path, position: int, old: str, new: str) -> None:
    before = _keys(_recipe(tmp_path / "a"))
    assert old in STEPS
    after = _keys(_recipe(tmp_path / "b", STEPS.replace(old, new)))

    assert after[:position] == before[:position]  # the unchanged prefix is served from the cache
    for i in range(position, len(before)):  # this layer, every later one and generalisation
        assert after[i] != before[i], f"layer {i + 1} should have a new key"


def test_changing_a_copied_files_bytes_changes_the_file_step(tmp_path: Path) -> None:
    recipe = _recipe(tmp_path)
    before = _keys(recipe)

    (recipe.folder / "files" / "index.html").write_bytes(b"<h1>web tier v2</h1>\n")
    after = _keys(recipe)

    assert after[0] == before[0]
    assert all(a != b for a, b in zip(after[1:], before[1:], strict=True))


def test_base_and_hostname_are_part_of_the_keys(tmp_path: Path) -> None:
    recipe = _recipe(tmp_path)
    keys = _keys(recipe)

    other_base = _keys(recipe, base="0" * 63 + "2")
    assert all(a != b for a, b in zip(other_base, keys, strict=True))

    # The hostname only enters generalisation (it writes /etc/hostname).
    renamed = _keys(recipe, hostname="api")
    assert renamed[:-1] == keys[:-1]
    assert renamed[-1] != keys[-1]


def test_reordering_steps_changes_the_keys(tmp_path: Path) -> None:
    lines = STEPS.splitlines(keepends=True)
    # Swap the packages and the file step.
    swapped = lines[0] + lines[2] + lines[1] + "".join(lines[3:])
    a, b = _keys(_recipe(tmp_path / "a")), _keys(_recipe(tmp_path / "b", swapped))
    assert a[0] != b[0] and a[1] != b[1]


# --- _step_script -------------------------------------------------------------------------------------------


def _step(recipe: Recipe, cls: type[S]) -> S:
    return next(s for s in recipe.steps if isinstance(s, cls))


def _fake_bin(tmp_path: Path, behaviour: dict[str, str]) -> tuple[dict[str, str], Path]:
    """A PATH of fake commands that log their argv (one `[arg]` per argument) and then run `behaviour`."""
    bindir = tmp_path / "fakebin"
    bindir.mkdir(parents=True)
    log = tmp_path / "calls.log"
    for name, body in behaviour.items():
        script = bindir / name
        script.write_text(
            '#!/bin/sh\n{ printf \'[%s]\' "${0##*/}"; for a in "$@"; do printf \'[%s]\' "$a"; done; echo; }'
            f" >> {shlex.quote(str(log))}\n{body}\n"
        )
        script.chmod(0o755)
    env = {**os.environ, "PATH": f"{bindir}:/usr/bin:/bin"}
    return env, log


def _run(script: str, env: dict[str, str], cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["/bin/sh", "-c", script], env=env, cwd=cwd, capture_output=True, text=True, timeout=10, check=False
    )


def _calls(log: Path) -> list[list[str]]:
    if not log.exists():
        return []
    return [line[1:-1].split("][") for line in log.read_text().splitlines()]


def test_packages_script_installs_and_refreshes_lists_only_when_stale(tmp_path: Path) -> None:
    recipe = _recipe(tmp_path)
    stage = tmp_path / "stage"
    stage.mkdir()
    script = step_script(_step(recipe, PackagesStep), stage, recipe.folder, "web")
    install = [
        "apt-get", "install", "-y", "-q", "--no-install-recommends",
        "-o", "Dpkg::Options::=--force-confdef", "-o", "Dpkg::Options::=--force-confold",
        "nginx", "curl",
    ]  # fmt: skip

    # The lists are fresh: one install, no update.
    env, log = _fake_bin(tmp_path / "fresh", {"apt-get": "exit 0"})
    assert _run(script, env, tmp_path).returncode == 0
    assert _calls(log) == [install, ["apt-get", "clean"]]

    # The first install fails (stale lists): update, then install again.
    env, log = _fake_bin(
        tmp_path / "stale",
        {"apt-get": f'[ "$1" = install ] && [ ! -e {tmp_path}/updated ] && exit 100; '
         f'[ "$1" = update ] && touch {tmp_path}/updated; exit 0'},
    )  # fmt: skip
    assert _run(script, env, tmp_path).returncode == 0
    assert _calls(log) == [install, ["apt-get", "update", "-q"], install, ["apt-get", "clean"]]

    # Failing even after the update fails the step.
    env, log = _fake_bin(tmp_path / "broken", {"apt-get": '[ "$1" = install ] && exit 100; exit 0'})
    assert _run(script, env, tmp_path).returncode != 0
    assert [c[1] for c in _calls(log)] == ["install", "update", "install"]


def test_file_script_stages_the_source_and_quotes_the_destination(tmp_path: Path) -> None:
    hostile = "/srv/it's $(touch pwned) `touch pwned2`; rm -rf x/a b.html"
    spec = {
        "src": "files/index.html",
        "dest": hostile,
        "mode": "0600",
        "owner": "deploy",
        "group": "www-data",
    }
    content = bytes(range(256)) * 4
    recipe = _recipe(tmp_path, _steps_yaml({"file": spec}), index=content)
    step = recipe.steps[0]
    assert isinstance(step, FileStep) and step.file.dest == hostile
    stage = tmp_path / "stage"
    stage.mkdir()

    script = step_script(step, stage, recipe.folder, "web")

    assert (stage / "file").read_bytes() == content  # copied into the stage, seen as /run/amiforge/file
    env, log = _fake_bin(tmp_path, {"install": "exit 0"})
    work = tmp_path / "work"
    work.mkdir()
    result = _run(script, env, work)
    assert result.returncode == 0, result.stderr
    assert _calls(log) == [
        ["install", "-D", "-m", "0600", "-o", "deploy", "-g", "www-data", "/run/amiforge/file", hostile]
    ]
    assert list(work.iterdir()) == []  # nothing in dest was executed


def test_file_script_fails_if_the_source_vanished(tmp_path: Path) -> None:
    recipe = _recipe(tmp_path)
    (recipe.folder / "files" / "index.html").unlink()
    stage = tmp_path / "stage"
    stage.mkdir()
    with pytest.raises(ConfigError, match=r"index\.html"):  # a clear message naming the file, not a traceback
        step_script(_step(recipe, FileStep), stage, recipe.folder, "web")


def test_shell_script_text_goes_to_a_file_not_the_command_line(tmp_path: Path) -> None:
    text = "set -u\necho \"it's $HOME\" '; rm -rf /' `id`\nexit 7\n"
    recipe = _recipe(tmp_path, _steps_yaml({"shell": text}))
    step = recipe.steps[0]
    assert isinstance(step, ShellStep) and step.shell == text
    stage = tmp_path / "stage"
    stage.mkdir()

    script = step_script(step, stage, recipe.folder, "web")

    assert (stage / "user.sh").read_text() == text
    assert script == "set -e\ncd /root\n/bin/sh -e /run/amiforge/user.sh\n"


def test_service_script_enables_and_disables_exact_unit_names(tmp_path: Path) -> None:
    recipe = _recipe(
        tmp_path,
        "steps:\n  - service: {enable: [nginx, 'getty@ttyS0.service'], "
        "disable: ['dev-disk-by\\x2dlabel-data.mount']}\n",
    )
    step = recipe.steps[0]
    assert isinstance(step, ServiceStep)
    assert step.service.disable == ["dev-disk-by\\x2dlabel-data.mount"]

    script = step_script(step, tmp_path, recipe.folder, "web")
    env, log = _fake_bin(tmp_path, {"systemctl": "exit 0"})
    assert _run(script, env, tmp_path).returncode == 0

    assert _calls(log) == [
        ["systemctl", "enable", "nginx", "getty@ttyS0.service"],
        ["systemctl", "disable", "dev-disk-by\\x2dlabel-data.mount"],
    ]


def test_service_script_stops_at_the_first_failure(tmp_path: Path) -> None:
    recipe = _recipe(tmp_path)
    script = step_script(_step(recipe, ServiceStep), tmp_path, recipe.folder, "web")
    env, log = _fake_bin(tmp_path, {"systemctl": "exit 1"})
    assert _run(script, env, tmp_path).returncode != 0
    assert _calls(log) == [["systemctl", "enable", "nginx"]]


def test_user_script_creates_the_user_and_installs_keys_from_the_stage(tmp_path: Path) -> None:
    recipe = _recipe(tmp_path)
    stage = tmp_path / "stage"
    stage.mkdir()
    step = _step(recipe, UserStep)

    script = step_script(step, stage, recipe.folder, "web")

    assert (stage / "authorized_keys").read_text() == "ssh-ed25519 AAAATEST deploy@test\n"
    assert "AAAATEST" not in script  # keys travel as a file
    env, log = _fake_bin(
        tmp_path,
        {
            "id": "exit 1",  # no such user yet
            "useradd": "exit 0",
            "getent": "echo 'deploy:x:1000:1000::/home/deploy:/bin/bash'",
            "install": "exit 0",
        },
    )
    result = _run(script, env, tmp_path)
    assert result.returncode == 0, result.stderr
    assert _calls(log) == [
        ["id", "-u", "deploy"],
        ["useradd", "--create-home", "--shell", "/bin/bash", "--groups", "sudo,adm", "deploy"],
        ["getent", "passwd", "deploy"],
        ["install", "-d", "-m", "0700", "-o", "deploy", "-g", "deploy", "/home/deploy/.ssh"],
        ["getent", "passwd", "deploy"],
        [
            "install", "-m", "0600", "-o", "deploy", "-g", "deploy",
            "/run/amiforge/authorized_keys", "/home/deploy/.ssh/authorized_keys",
        ],
    ]  # fmt: skip


def test_user_script_leaves_an_existing_user_alone(tmp_path: Path) -> None:
    recipe = _recipe(tmp_path, "steps:\n  - user: {name: deploy}\n")
    step = recipe.steps[0]
    stage = tmp_path / "stage"
    stage.mkdir()

    script = step_script(step, stage, recipe.folder, "web")

    assert not (stage / "authorized_keys").exists()
    env, log = _fake_bin(tmp_path, {"id": "echo 1000", "useradd": "exit 0"})
    assert _run(script, env, tmp_path).returncode == 0
    assert _calls(log) == [["id", "-u", "deploy"]]


def test_generalise_script_sets_the_hostname_variable(tmp_path: Path) -> None:
    script = step_script(None, tmp_path, tmp_path, "web-tier")
    assert script == "AMIFORGE_HOSTNAME=web-tier\n" + GENERALISE
    hostile = step_script(None, tmp_path, tmp_path, "x; touch pwned")
    assert hostile.startswith("AMIFORGE_HOSTNAME='x; touch pwned'\n")
    for secret in ("/etc/ssh/ssh_host_*_key", "/etc/machine-id", "/root/.ssh/id_*", "/var/lib/cloud"):
        assert secret in GENERALISE
    assert list(tmp_path.iterdir()) == []  # generalisation stages nothing


# --- ensure_layer: the cache, with the chroot runner faked --------------------------------------------------


class _Progress:
    def __init__(self) -> None:
        self.updates: list[PhaseUpdate] = []

    def __call__(self, update: PhaseUpdate) -> None:
        self.updates.append(update)


def _ctx(stack: Cleanups, progress: _Progress, log: list[str]) -> RunContext:
    return RunContext(run_id="TEST-0001", cleanup=stack, log=log.append, progress=progress)


def test_ensure_layer_hit_runs_nothing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    recipe = _recipe(tmp_path)
    plan = plan_layers(BASE, recipe.steps, recipe.folder, "web")[0]
    cached = tmp_path / "cache" / "layers" / plan.key
    (cached / "upper").mkdir(parents=True)
    (cached / "size").write_text("4096")

    def forbidden(**_kwargs: object) -> None:
        raise AssertionError("a cached layer must not be rebuilt")

    monkeypatch.setattr(layers, "run_in_chroot", forbidden)
    progress, log = _Progress(), list[str]()
    with Cleanups() as stack:
        upper, hit, _seconds, size = ensure_layer(
            plan, [tmp_path / "base"], tmp_path / "cache", recipe.folder, "web", _ctx(stack, progress, log)
        )
    assert (upper, hit, size) == (cached / "upper", True, 4096)
    assert [(u.name, u.state, u.detail) for u in progress.updates] == [("layer 1: packages: nginx curl", "done", "hit")]


def test_ensure_layer_miss_builds_then_moves_into_place(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    recipe = _recipe(tmp_path)
    plan = plan_layers(BASE, recipe.steps, recipe.folder, "web")[1]  # the file step
    seen: dict[str, object] = {}

    def fake_chroot(*, lowers: Sequence[Path], upper: Path, stage: Path, command: list[str], **kw: object) -> None:
        seen.update(lowers=list(lowers), command=command, script=(stage / "step.sh").read_text(), kw=kw)
        seen["staged"] = (stage / "file").read_bytes()
        (upper / "var" / "www").mkdir(parents=True)
        (upper / "var" / "www" / "index.html").write_bytes(b"x" * 5000)

    monkeypatch.setattr(layers, "run_in_chroot", fake_chroot)
    progress, log = _Progress(), list[str]()
    lowers = [tmp_path / "base", tmp_path / "l1"]
    with Cleanups() as stack:
        upper, hit, _seconds, size = ensure_layer(
            plan, lowers, tmp_path / "cache", recipe.folder, "web", _ctx(stack, progress, log)
        )

    final = tmp_path / "cache" / "layers" / plan.key
    assert (upper, hit) == (final / "upper", False)
    assert (upper / "var" / "www" / "index.html").read_bytes() == b"x" * 5000
    assert size >= 5000 and int((final / "size").read_text()) == size
    assert sorted(p.name for p in final.iterdir()) == ["size", "upper"]  # work/merged/stage removed
    assert sorted(p.name for p in final.parent.iterdir()) == [plan.key]  # no temporary dir left
    assert seen["lowers"] == lowers
    assert seen["command"] == ["/bin/sh", "/run/amiforge/step.sh"]
    assert seen["staged"] == b"<h1>web tier</h1>\n"
    assert "install -D -m 0640 -o root -g www-data /run/amiforge/file /var/www/html/index.html" in str(seen["script"])
    assert log == ["--- layer 2: file files/index.html -> /var/www/html/index.html"]
    assert [(u.state, u.detail) for u in progress.updates] == [("start", "miss"), ("done", "miss")]


def test_a_failed_step_leaves_no_layer_behind(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    recipe = _recipe(tmp_path)
    plan = plan_layers(BASE, recipe.steps, recipe.folder, "web")[2]

    def failing(*, upper: Path, **_kw: object) -> None:
        (upper / "half-written").write_text("partial")
        raise InfraError("layer 3 failed (exit 1)")

    monkeypatch.setattr(layers, "run_in_chroot", failing)
    cache = tmp_path / "cache"
    with pytest.raises(InfraError, match="layer 3 failed"), Cleanups() as stack:
        ensure_layer(plan, [tmp_path / "base"], cache, recipe.folder, "web", _ctx(stack, _Progress(), []))

    assert not (cache / "layers" / plan.key).exists()
    assert list((cache / "layers").iterdir()) == []  # the temporary build dir went with the cleanup stack


def test_stage_is_not_world_writable(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # The stage holds build inputs (authorized keys, scripts run as root): only its owner may change them.
    recipe = _recipe(tmp_path)
    plan = plan_layers(BASE, recipe.steps, recipe.folder, "web")[4]
    modes: list[int] = []

    def fake_chroot(*, stage: Path, **_kw: object) -> None:
        modes.append(stat.S_IMODE(stage.parent.stat().st_mode))

    monkeypatch.setattr(layers, "run_in_chroot", fake_chroot)
    with Cleanups() as stack:
        ensure_layer(plan, [tmp_path / "base"], tmp_path / "cache", recipe.folder, "web", _ctx(stack, _Progress(), []))
    assert modes and modes[0] & 0o022 == 0


def test_a_file_edited_between_planning_and_copying_is_refused_not_cached(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:

    from amiforge.providers.interface import RunContext
    from amiforge.providers.local import layers

    recipe = _recipe(tmp_path)
    plans = plan_layers("b" * 64, recipe.steps, recipe.folder, "web")
    file_plan = next(p for p in plans if isinstance(p.step, FileStep))
    (recipe.folder / "files" / "index.html").write_text("edited after planning\n")
    monkeypatch.setattr(layers, "run_in_chroot", lambda **_: pytest.fail("must not run the step"))
    with Cleanups() as stack, pytest.raises(ConfigError, match="changed while"):
        ensure_layer(file_plan, [tmp_path], tmp_path / "cache", recipe.folder, "web", RunContext("TEST", stack))
    assert not (tmp_path / "cache" / "layers" / file_plan.key).exists()


def test_generalisation_reports_what_it_removed_and_a_cache_hit_reports_it_again(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    recipe = _recipe(tmp_path)
    plan = plan_layers(BASE, recipe.steps, recipe.folder, "web")[-1]
    assert plan.step is None  # the last layer is generalisation
    assert 'report "ssh key" /root/.ssh/id_*' in _step_script_of(plan, tmp_path)

    def fake_chroot(*, log: Callable[[str], None], **_kw: object) -> None:
        # What GENERALISE prints before it deletes, mixed with ordinary output (and a marker without a tab).
        for line in (
            "removed stuff",
            "AMIFORGE-GENERALISED ssh key\t/root/.ssh/id_rsa",
            "AMIFORGE-GENERALISED aws credentials\t/root/.aws/credentials",
            "AMIFORGE-GENERALISED junk",
        ):
            log(line)  # fmt: skip

    monkeypatch.setattr(layers, "run_in_chroot", fake_chroot)
    log: list[str] = []
    with Cleanups() as stack:
        upper, hit, _s, _size = ensure_layer(plan, [tmp_path / "base"], tmp_path / "cache", recipe.folder, "web",
                                             _ctx(stack, _Progress(), log))  # fmt: skip
    expected = (RemovedFile("/root/.aws/credentials", "aws credentials"), RemovedFile("/root/.ssh/id_rsa", "ssh key"))
    assert not hit and generalised_files(upper) == expected
    assert "AMIFORGE-GENERALISED ssh key\t/root/.ssh/id_rsa" in log  # the build log keeps the lines too
    with Cleanups() as stack:
        again, hit, _s, _size = ensure_layer(plan, [tmp_path / "base"], tmp_path / "cache", recipe.folder, "web",
                                             _ctx(stack, _Progress(), []))  # fmt: skip
    assert hit and generalised_files(again) == expected


def _step_script_of(plan: LayerPlan, tmp_path: Path) -> str:
    stage = tmp_path / "stage-for-script"
    stage.mkdir(exist_ok=True)
    return step_script(plan.step, stage, tmp_path, "web")


def test_parse_generalised_keeps_path_and_kind_once_each() -> None:
    lines = [
        "AMIFORGE-GENERALISED shell history\t/root/.bash_history",
        "AMIFORGE-GENERALISED shell history\t/root/.bash_history",
        "  AMIFORGE-GENERALISED ssh key\t/not/at/line/start",
        "AMIFORGE-GENERALISED netrc\t",
    ]
    assert parse_generalised(lines) == (RemovedFile("/root/.bash_history", "shell history"),)


def test_a_shell_steps_script_never_reaches_the_debug_log(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from amiforge.cli import logs
    from amiforge.providers.local import tools

    recipe = _recipe(tmp_path, _steps_yaml({"shell": "export API_TOKEN=TEST-0001-DO-NOT-LOG && true"}))
    plan = plan_layers(BASE, recipe.steps, recipe.folder, "web")[0]

    def chroot_running_a_real_tool(*, what: str, **_kw: object) -> None:
        tools.run(["true"], what=what)  # the host-tool runner logs what it runs at DEBUG

    monkeypatch.setattr(layers, "run_in_chroot", chroot_running_a_real_tool)
    log_file = tmp_path / "bake.log"
    logs.configure(2, log_file)
    try:
        progress = _Progress()
        with Cleanups() as stack:
            ensure_layer(plan, [tmp_path / "base"], tmp_path / "cache", recipe.folder, "web", _ctx(stack, progress, []))
    finally:
        logs.end()
    text = log_file.read_text()
    assert "layer 1 (shell step)" in text  # the run was logged…
    assert "DO-NOT-LOG" not in text and "API_TOKEN" not in text  # …without its script
    assert "API_TOKEN" in progress.updates[0].name  # the person watching the bake still sees which step runs
