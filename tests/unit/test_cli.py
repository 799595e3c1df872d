"""The `amiforge` command in-process: exit codes (docs/architecture.md §6), JSON documents, and what a person reads.

Every test runs `amiforge.cli.app.main(argv)` against a private data dir (a real SQLite registry), with the
rich consoles swapped for wide in-memory ones. Nothing here bakes or boots: the registry is seeded directly
through the store, and host tools are faked where a command would look for them.
"""

from __future__ import annotations

import itertools
import os
import re
from collections.abc import Callable, Collection, Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa

import amiforge
import amiforge.cli
from amiforge.cli import images_cmd
from amiforge.model import Artifact, BootReport, CheckResult, LayerRecord, Status
from amiforge.providers.local import qemu, tools
from amiforge.recipe import load_recipe, recipe_digest
from amiforge.settings import load_settings
from amiforge.store.schema import events_table
from amiforge.store.sql import GENESIS_HASH, SqlStore, open_store
from tests.cli_harness import Cli, make_cli

HEX64 = re.compile(r"[0-9a-f]{64}")
D1 = "0" * 63 + "1"
D2 = "0" * 63 + "2"
D3 = "0" * 63 + "3"
STARTED = datetime(2025, 3, 1, 12, 0, 0, tzinfo=UTC)
CONSOLE_LOG = "[    0.000000] Linux version 6.1\nAMIFORGE-READY 12.5\n"

VALID = """\
name: web
description: test web tier
provider: {type: local}
steps:
  - packages: [nginx]
  - file: {src: files/index.html, dest: /var/www/html/index.html, mode: "0644"}
  - shell: echo "web tier" > /etc/motd
checks:
  ready_within: 90s
  units: [nginx]
tags: {team: web}
"""

# Three problems, on lines 1, 8 and 12: a bad name, an unquoted mode (YAML reads 644 as a number) and a
# port out of range.
INVALID = """\
name: Web_Tier
provider: {type: local}
steps:
  - packages: [nginx]
  - file:
      src: files/index.html
      dest: /var/www/html/index.html
      mode: 644
checks:
  ready_within: 90s
  http:
    - port: 70000
"""
INVALID_PROBLEMS = [("name", 1), ("steps[1].file.mode", 8), ("checks.http[0].port", 12)]


@pytest.fixture
def data_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    """A private data dir; no AMIFORGE_* setting and no amiforge.toml from the surroundings."""
    for key in list(os.environ):
        if key.startswith("AMIFORGE_"):
            monkeypatch.delenv(key)
    data = tmp_path / "data"
    monkeypatch.setenv("AMIFORGE_DATA_DIR", str(data))
    monkeypatch.setenv("AMIFORGE_ACTOR", "tester@unit")
    monkeypatch.chdir(tmp_path)
    yield data
    os.environ.pop("AMIFORGE_DEBUG", None)  # `amiforge --debug` sets it in the (test) process


@pytest.fixture
def cli(data_dir: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> Cli:
    return make_cli(monkeypatch, capsys)


def _store() -> SqlStore:
    return open_store(load_settings().registry_url)


def _write_recipe(folder: Path, text: str = VALID) -> Path:
    (folder / "files").mkdir(parents=True, exist_ok=True)
    (folder / "files" / "index.html").write_text("<h1>web tier</h1>\n")
    path = folder / "recipe.yaml"
    path.write_text(text)
    return path


def _built(store: SqlStore, name: str, digest: str, *, parent: str | None = None, recipe: str = "{}") -> int:
    v = store.create_version(
        name=name,
        recipe_digest="a" * 64,
        recipe_path=f"/recipes/{name}/recipe.yaml",
        provider="local",
        tags={"team": name},
        parent=parent,
        recipe=recipe,
    )
    store.transition(v.id, Status.BUILT, expect=Status.BAKING, digest=digest, size_bytes=3 * 1024 * 1024)
    return v.id


@pytest.fixture
def seeded(data_dir: Path) -> Path:
    """web@1 (tested: artifact, 2 layers, a boot report), api@1 (built), web@2 (built, child of web@1);
    4 events: seq 1, 2 about web@1, 3 about api@1, 4 about web@2."""
    with _store() as store:
        web1 = _built(store, "web", D1)
        store.transition(web1, Status.TESTED, expect=Status.BUILT)
        store.add_artifact(
            web1,
            Artifact(
                provider="local",
                region="local",
                location=str(data_dir / "regions/local/web" / f"{D1}.qcow2"),
                digest=D1,
                size_bytes=3 * 1024 * 1024,
                kernel="vmlinuz-6.1.0-30-cloud-amd64",
                initrd="initrd.img",
            ),
        )
        store.record_layers(
            web1,
            [
                LayerRecord(0, "b" * 64, "base: debian bookworm minbase", True, 0.5, 100_000_000),
                # Brackets as a shell step would have them: text, not console markup.
                LayerRecord(1, "c" * 64, "shell: echo [/x] [red]hi > /etc/motd", False, 3.25, 2048),
            ],
        )
        store.add_boot_report(
            web1,
            BootReport(
                time_to_ready=12.5,
                checks=(
                    CheckResult("unit nginx", "unit", True, "active"),
                    CheckResult("command grep", "command", True, "matched [/y] in output"),
                ),
                console=CONSOLE_LOG,
                accel="tcg",
                started_at=STARTED,
                duration=20.0,
            ),
        )
        _built(store, "api", D2)
        _built(store, "web", D3, parent="web@1")
        store.append_event("bake.built", actor="tester@unit", ref="web@1", data={"digest": D1})
        store.append_event("test.passed", actor="tester@unit", ref="web@1", data={"failed": []})
        store.append_event("bake.built", actor="tester@unit", ref="api@1", data={"digest": D2})
        store.append_event("bake.built", actor="tester@unit", ref="web@2", data={"digest": D3})
    return data_dir


# --- recipe validate | schema ---------------------------------------------------------------------------


def test_validate_valid_recipe_json(cli: Cli, tmp_path: Path) -> None:
    path = _write_recipe(tmp_path / "web")
    r = cli("recipe", "validate", str(path), "--json")
    assert r.code == 0, r.err
    doc = r.json()
    assert doc["ok"] is True
    assert doc["name"] == "web"
    assert doc["provider"] == "local"
    assert doc["file"] == str(path)
    assert doc["steps"] == [
        "packages: nginx",
        "file files/index.html -> /var/www/html/index.html",
        'shell: echo "web tier" > /etc/motd',
    ]
    assert HEX64.fullmatch(doc["recipe_digest"])
    assert doc["recipe_digest"] == recipe_digest(load_recipe(path))
    # The digest covers the bytes of the files the recipe copies.
    (tmp_path / "web" / "files" / "index.html").write_text("<h1>changed</h1>\n")
    again = cli("recipe", "validate", str(path), "--json").json()
    assert HEX64.fullmatch(again["recipe_digest"])
    assert again["recipe_digest"] != doc["recipe_digest"]


def test_validate_valid_recipe_text(cli: Cli, tmp_path: Path) -> None:
    text = VALID.replace('echo "web tier" > /etc/motd', "sed -i 's/[a-z]/X/' /etc/[/x]motd")
    path = _write_recipe(tmp_path / "web", text)
    r = cli("recipe", "validate", str(path))
    assert r.code == 0, r.err
    assert f"ok {path}: recipe web, 3 step(s)" in r.out
    assert "  1. packages: nginx" in r.out
    # Brackets in a step are the user's text: printed as written, never read as console markup.
    assert "  3. shell: sed -i 's/[a-z]/X/' /etc/[/x]motd" in r.out


def test_validate_reports_every_problem_json(cli: Cli, tmp_path: Path) -> None:
    path = _write_recipe(tmp_path / "web", INVALID)
    r = cli("recipe", "validate", str(path), "--json")
    assert r.code == 2
    doc = r.json()
    assert doc["error"] == "config"
    assert doc["exit_code"] == 2
    assert doc["message"] == f"recipe {path} is invalid: 3 problem(s)"
    assert [(p["field"], p["line"]) for p in doc["problems"]] == INVALID_PROBLEMS
    assert {p["file"] for p in doc["problems"]} == {str(path)}
    assert all(p["fix"] for p in doc["problems"])
    by_field = {p["field"]: p for p in doc["problems"]}
    assert "Web_Tier" in by_field["name"]["message"]
    assert "quote it" in by_field["steps[1].file.mode"]["fix"]
    assert "70000" in by_field["checks.http[0].port"]["message"]
    assert "Traceback" not in r.err


def test_validate_reports_every_problem_text(cli: Cli, tmp_path: Path) -> None:
    path = _write_recipe(tmp_path / "web", INVALID)
    r = cli("recipe", "validate", str(path))
    assert r.code == 2
    assert r.out == ""
    assert f"error: recipe {path} is invalid: 3 problem(s)" in r.err
    for field, line in INVALID_PROBLEMS:
        assert f"{path}:{line}: {field}: " in r.err
    assert "Traceback" not in r.err


def test_validate_error_quoting_markup_is_printed_verbatim(cli: Cli, tmp_path: Path) -> None:
    # A value like "[/x]" in an error message used to crash the error handler itself (rich MarkupError).
    path = _write_recipe(tmp_path / "web", 'name: "[/x]"\n')
    r = cli("recipe", "validate", str(path))
    assert r.code == 2
    assert "'[/x]' is not a valid recipe name" in r.err
    assert "Traceback" not in r.err


def test_validate_missing_file(cli: Cli, tmp_path: Path) -> None:
    r = cli("recipe", "validate", str(tmp_path / "nope.yaml"), "--json")
    assert r.code == 2
    doc = r.json()
    assert doc["error"] == "config"
    assert doc["message"] == f"recipe file not found: {tmp_path / 'nope.yaml'}"


@pytest.mark.parametrize("argv", [("recipe", "schema"), ("recipe", "schema", "--json")])
def test_recipe_schema(cli: Cli, argv: tuple[str, ...]) -> None:
    r = cli(*argv)
    assert r.code == 0, r.err
    schema = r.json()
    assert schema["$schema"] == "https://json-schema.org/draft/2020-12/schema"
    assert schema["title"] == "amiforge recipe"
    assert schema["properties"]["name"]["type"] == "string"
    assert schema["properties"]["name"]["pattern"] == "^[a-z0-9][a-z0-9-]{0,62}$"
    assert schema["required"] == ["name"]
    assert {"base", "provider", "steps", "checks", "tags"} <= set(schema["properties"])


# --- usage errors, version ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (("nope",), "No such command 'nope'"),
        (("images", "show"), "Missing argument"),
        (("recipe", "validate"), "Missing argument"),
        (("images", "list", "--bogus"), "No such option"),
        (("events", "--limit", "0"), "--limit"),
    ],
)
def test_usage_errors_exit_2(cli: Cli, argv: tuple[str, ...], message: str) -> None:
    r = cli(*argv)
    assert r.code == 2
    assert message in r.err
    assert "Traceback" not in r.err + r.out


def test_usage_error_as_json(cli: Cli) -> None:
    r = cli("images", "show", "--json")
    assert r.code == 2
    assert r.json() == {"error": "usage", "exit_code": 2, "message": "Missing argument 'ref'."}


@pytest.mark.parametrize("argv", [(), ("images",), ("recipe",)])
def test_group_without_command_shows_help_and_exits_2(cli: Cli, argv: tuple[str, ...]) -> None:
    r = cli(*argv)
    assert r.code == 2
    assert "Usage: amiforge" in r.out + r.err
    assert "Traceback" not in r.out + r.err


def test_version(cli: Cli) -> None:
    r = cli("--version")
    assert r.code == 0
    assert r.out == f"amiforge {amiforge.__version__}\n"
    assert amiforge.__version__ == "0.1.0"


def test_invalid_settings_are_a_config_error(cli: Cli, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("AMIFORGE_GUEST_MEMORY_MB", "1")
    r = cli("images", "list", "--json")
    assert r.code == 2
    doc = r.json()
    assert doc["error"] == "config"
    assert doc["message"] == "invalid amiforge settings"
    assert [(p["field"], p["file"]) for p in doc["problems"]] == [
        ("guest_memory_mb", "environment variable AMIFORGE_GUEST_MEMORY_MB")
    ]


# --- images list | show ---------------------------------------------------------------------------------


def test_images_list_empty(cli: Cli) -> None:
    r = cli("images", "list", "--json")
    assert r.code == 0, r.err
    assert r.json() == []
    text = cli("images", "list")
    assert text.code == 0
    assert "no versions yet" in text.out


def test_images_list_json(cli: Cli, seeded: Path) -> None:
    r = cli("images", "list", "--json")
    assert r.code == 0, r.err
    rows = r.json()
    assert [row["ref"] for row in rows] == ["web@2", "api@1", "web@1"]  # newest first
    newest = rows[0]
    assert set(newest) == {
        "ref",
        "name",
        "number",
        "status",
        "digest",
        "size_bytes",
        "parent",
        "recipe_digest",
        "created_at",
    }
    assert newest["name"] == "web"
    assert newest["number"] == 2
    assert newest["status"] == "built"
    assert newest["digest"] == D3
    assert newest["parent"] == "web@1"
    assert newest["size_bytes"] == 3 * 1024 * 1024
    assert datetime.fromisoformat(newest["created_at"]).tzinfo is not None
    assert (rows[2]["status"], rows[2]["digest"], rows[2]["parent"]) == ("tested", D1, None)


def test_images_list_name_filter(cli: Cli, seeded: Path) -> None:
    assert [row["ref"] for row in cli("images", "list", "--name", "web", "--json").json()] == ["web@2", "web@1"]
    assert [row["ref"] for row in cli("images", "list", "--name", "api", "--json").json()] == ["api@1"]
    assert cli("images", "list", "--name", "db", "--json").json() == []


def test_images_list_text(cli: Cli, seeded: Path) -> None:
    r = cli("images", "list")
    assert r.code == 0, r.err
    rows = [[cell.strip() for cell in line.split("│")] for line in r.out.splitlines() if "│" in line]
    assert [row[:5] for row in rows] == [
        ["web@2", "built", D3[:16], "3.0 MiB", "web@1"],
        ["api@1", "built", D2[:16], "3.0 MiB", "-"],
        ["web@1", "tested", D1[:16], "3.0 MiB", "-"],
    ]
    assert all(re.fullmatch(r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d", row[5]) for row in rows)


def test_images_show_json(cli: Cli, seeded: Path) -> None:
    r = cli("images", "show", "web@1", "--json")
    assert r.code == 0, r.err
    doc = r.json()
    assert set(doc) == {
        "version", "artifacts", "layers", "boot_reports", "events", "scan", "signatures", "channels", "generalised",
        "orphaned", "ancestry", "children", "running", "operations", "older_events", "more_ancestors", "recipe",
        "log",
    }  # fmt: skip
    assert (doc["ancestry"], doc["children"], doc["running"], doc["recipe"], doc["log"]) == ([], ["web@2"], [], None,
                                                                                           None)  # fmt: skip
    assert (doc["scan"], doc["signatures"], doc["channels"]) == (None, [], [])  # not scanned, signed or promoted
    version = doc["version"]
    assert (version["ref"], version["status"], version["digest"]) == ("web@1", "tested", D1)
    assert version["tags"] == {"team": "web"}
    assert "log" not in version
    assert "recipe" not in version
    [artifact] = doc["artifacts"]
    assert artifact["digest"] == D1
    assert artifact["location"].endswith(f"regions/local/web/{D1}.qcow2")
    assert artifact["kernel"] == "vmlinuz-6.1.0-30-cloud-amd64"
    assert [(layer["index"], layer["hit"]) for layer in doc["layers"]] == [(0, True), (1, False)]
    assert doc["layers"][1]["description"] == "shell: echo [/x] [red]hi > /etc/motd"
    [report] = doc["boot_reports"]
    assert report["console"] is None  # only with --console
    assert report["passed"] is True
    assert report["time_to_ready"] == 12.5
    assert [c["name"] for c in report["checks"]] == ["unit nginx", "command grep"]
    assert datetime.fromisoformat(report["started_at"]) == STARTED
    assert [(e["seq"], e["kind"]) for e in doc["events"]] == [(1, "bake.built"), (2, "test.passed")]


def test_images_show_console_and_log_flags(cli: Cli, seeded: Path) -> None:
    doc = cli("images", "show", "web@1", "--console", "--log", "--json").json()
    assert doc["boot_reports"][0]["console"] == CONSOLE_LOG
    assert doc["log"] == ""


def test_images_show_by_digest(cli: Cli, seeded: Path) -> None:
    assert cli("images", "show", D3, "--json").json()["version"]["ref"] == "web@2"
    assert cli("images", "show", f"sha256:{D2}", "--json").json()["version"]["ref"] == "api@1"
    ambiguous = cli("images", "show", D1[:12], "--json")
    assert ambiguous.code == 2
    doc = ambiguous.json()
    assert doc["error"] == "config"
    assert sorted(p["message"].split()[0] for p in doc["problems"]) == ["api@1", "web@1", "web@2"]


def test_images_show_text(cli: Cli, seeded: Path) -> None:
    r = cli("images", "show", "web@1")
    assert r.code == 0, r.err
    assert f"web@1 tested  sha256:{D1[:16]}  3.0 MiB" in r.out
    assert "  recipe   /recipes/web/recipe.yaml" in r.out
    assert "  tags     team=web" in r.out
    assert "boot test passed: time-to-ready 12.5s (tcg)" in r.out
    # Layer descriptions and check details are data: shown as written, not eaten as markup.
    assert "shell: echo [/x] [red]hi > /etc/motd" in r.out
    assert "matched [/y] in output" in r.out
    assert "AMIFORGE-READY" not in r.out
    assert "AMIFORGE-READY 12.5" in cli("images", "show", "web@1", "--console").out


def test_images_show_not_found(cli: Cli, seeded: Path) -> None:
    r = cli("images", "show", "web@99", "--json")
    assert r.code == 3
    doc = r.json()
    assert doc["error"] == "not_found"
    assert doc["message"] == "no image version web@99"
    assert doc["exit_code"] == 3
    text = cli("images", "show", "web@99")
    assert text.code == 3
    assert "error: no image version web@99" in text.err
    assert "amiforge images list" in text.err
    assert "Traceback" not in text.err


def test_images_show_bad_ref(cli: Cli) -> None:
    r = cli("images", "show", "bad ref!", "--json")
    assert r.code == 2
    doc = r.json()
    assert doc["error"] == "config"
    assert doc["message"] == "'bad ref!' is not a version reference"
    text = cli("images", "show", "bad ref!")
    assert text.code == 2
    assert "is not a version reference" in text.err
    assert "Traceback" not in text.err


# --- events ---------------------------------------------------------------------------------------------


def test_events_json(cli: Cli, seeded: Path) -> None:
    r = cli("events", "--json")
    assert r.code == 0, r.err
    items = r.json()
    assert [(e["seq"], e["kind"], e["ref"]) for e in items] == [
        (1, "bake.built", "web@1"),
        (2, "test.passed", "web@1"),
        (3, "bake.built", "api@1"),
        (4, "bake.built", "web@2"),
    ]
    assert items[0]["data"] == {"digest": D1}
    assert items[0]["actor"] == "tester@unit"
    assert items[0]["prev_hash"] == GENESIS_HASH
    for before, after in itertools.pairwise(items):
        assert HEX64.fullmatch(after["hash"])
        assert after["prev_hash"] == before["hash"]


def test_events_filters(cli: Cli, seeded: Path) -> None:
    assert [e["seq"] for e in cli("events", "web@1", "--json").json()] == [1, 2]
    assert [e["seq"] for e in cli("events", "api@1", "--json").json()] == [3]
    assert [e["seq"] for e in cli("events", D3, "--json").json()] == [4]  # a digest resolves to web@2
    assert [e["seq"] for e in cli("events", "--limit", "2", "--json").json()] == [3, 4]
    missing = cli("events", "web@99", "--json")
    assert missing.code == 3
    assert missing.json()["error"] == "not_found"


def test_events_text(cli: Cli, seeded: Path) -> None:
    r = cli("events", "web@2")
    assert r.code == 0, r.err
    header, _rule, line = r.out.splitlines()
    assert header.split("┃")[0].strip() == "seq" and line.split()[0] == "4"
    assert "bake.built" in line
    assert "tester@unit" in line
    assert f'{{"digest": "{D3}"}}' in line


def test_events_verify_intact(cli: Cli, seeded: Path) -> None:
    r = cli("events", "--verify", "--json")
    assert r.code == 0, r.err
    assert r.json() == {"ok": True, "events": 4}
    text = cli("events", "--verify")
    assert "the chain of 4 event(s) is intact" in text.out


def test_events_verify_detects_tampering(cli: Cli, seeded: Path) -> None:
    with _store() as store, store.engine.begin() as conn:
        conn.execute(events_table.update().where(events_table.c.seq == 2).values(data={"failed": ["x"]}))
    r = cli("events", "--verify", "--json")
    assert r.code == 4
    doc = r.json()
    assert doc["error"] == "gate"
    assert doc["gate"] == "event chain"
    assert doc["exit_code"] == 4
    [failure] = doc["failures"]
    assert failure["detail"].startswith("seq 2: hash mismatch")
    text = cli("events", "--verify")
    assert text.code == 4
    assert "event chain gate failed: 1 item(s)" in text.err
    assert "seq 2: hash mismatch" in text.err
    assert "restore it from a backup" in text.err
    assert "Traceback" not in text.err


def test_events_verify_detects_deleted_newest(cli: Cli, seeded: Path) -> None:
    with _store() as store, store.engine.begin() as conn:
        conn.execute(sa.delete(events_table).where(events_table.c.seq == 4))
    r = cli("events", "--verify", "--json")
    assert r.code == 4
    [failure] = r.json()["failures"]
    assert failure["detail"].startswith("head mismatch: the head records seq 4")


# --- test, bake -----------------------------------------------------------------------------------------


def test_test_refuses_a_version_still_baking(cli: Cli, data_dir: Path) -> None:
    with _store() as store:
        store.create_version(
            name="web", recipe_digest="a" * 64, recipe_path="/r.yaml", provider="local", tags={}, parent=None
        )
    r = cli("test", "web@1", "--json")
    assert r.code == 3  # a version in the wrong state for a command: exit 3, like every other command
    doc = r.json()
    assert doc["error"] == "state"
    assert doc["message"] == "web@1 is baking; only built, tested or failed versions can be boot-tested"
    text = cli("test", "web@1")
    assert text.code == 3
    assert "web@1 is baking" in text.err
    with _store() as store:
        assert store.get_version("web@1").status == Status.BAKING  # untouched
        assert store.events() == []


def test_test_unknown_version(cli: Cli) -> None:
    r = cli("test", "web@1", "--json")
    assert r.code == 3
    assert r.json()["error"] == "not_found"


def _no_tools(monkeypatch: pytest.MonkeyPatch, tmp_path: Path, missing: set[str] | None) -> None:
    """PATH is an empty dir; `tools.which` finds nothing (missing=None) or all but `missing`."""
    empty = tmp_path / "empty-bin"
    empty.mkdir()
    monkeypatch.setenv("PATH", str(empty))
    monkeypatch.setattr(tools, "which", lambda tool: None if missing is None or tool in missing else f"/usr/bin/{tool}")


def test_bake_without_tools_is_infra_error(cli: Cli, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = _write_recipe(tmp_path / "web")
    _no_tools(monkeypatch, tmp_path, None)
    r = cli("bake", str(path), "--json")
    assert r.code == 5
    doc = r.json()
    assert doc["error"] == "infra"
    assert doc["exit_code"] == 5
    assert doc["message"] == "required tool 'mmdebstrap' is not installed"
    assert doc["fix"].startswith("apt-get install mmdebstrap ")
    assert doc["retryable"] is False
    # The preflight runs before the version is registered: nothing half-made is left behind.
    assert cli("images", "list", "--json").json() == []
    assert cli("events", "--json").json() == []


def test_bake_names_the_missing_tool_and_its_package(cli: Cli, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = _write_recipe(tmp_path / "web")
    _no_tools(monkeypatch, tmp_path, {"qemu-img"})
    r = cli("bake", str(path))
    assert r.code == 5
    assert "error: required tool 'qemu-img' is not installed" in r.err
    assert "fix: apt-get install qemu-utils " in r.err
    assert "Traceback" not in r.err
    doc = cli("bake", str(path), "--json").json()
    assert (doc["error"], doc["fix"].split()[:3]) == ("infra", ["apt-get", "install", "qemu-utils"])


def test_bake_invalid_recipe_is_config_error(cli: Cli, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = _write_recipe(tmp_path / "web", INVALID)
    _no_tools(monkeypatch, tmp_path, None)  # validation comes first, before any tool is looked for
    r = cli("bake", str(path), "--json")
    assert r.code == 2
    assert [p["field"] for p in r.json()["problems"]] == [f for f, _ in INVALID_PROBLEMS]


# --- unexpected errors, interrupts ----------------------------------------------------------------------


def _raiser(exc: BaseException) -> Callable[[], Any]:
    def boom() -> Any:
        raise exc

    return boom


def test_unexpected_exception_exit_70_without_traceback(cli: Cli, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(images_cmd, "open_registry", _raiser(RuntimeError("boom [/x]")))
    r = cli("images", "list")
    assert r.code == 70
    assert "internal error: RuntimeError: boom [/x]" in r.err
    assert "--debug" in r.err
    assert "Traceback" not in r.err
    assert r.out == ""


def test_unexpected_exception_with_debug_shows_traceback(cli: Cli, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(images_cmd, "open_registry", _raiser(RuntimeError("boom")))
    r = cli("--debug", "images", "list")
    assert r.code == 70
    assert "Traceback (most recent call last)" in r.err
    assert "RuntimeError: boom" in r.err
    assert "internal error" in r.err


def test_debug_after_the_command_works_as_before_it(cli: Cli) -> None:
    for argv in (("images", "show", "web@99", "--debug"), ("keys", "list", "--json", "--debug")):
        r = cli(*argv)
        assert r.code != 2, r.err  # not a usage error: every command takes --debug
    r = cli("images", "show", "web@99", "--debug")
    assert r.code == 3 and "Traceback (most recent call last)" in r.err


def test_debug_env_shows_traceback_for_amiforge_errors(cli: Cli, monkeypatch: pytest.MonkeyPatch) -> None:
    assert "Traceback" not in cli("images", "show", "web@99").err
    monkeypatch.setenv("AMIFORGE_DEBUG", "1")
    r = cli("images", "show", "web@99")
    assert r.code == 3
    assert "Traceback (most recent call last)" in r.err
    assert "NotFound: no image version web@99" in r.err


def test_keyboard_interrupt_exits_130(cli: Cli, monkeypatch: pytest.MonkeyPatch) -> None:
    # typer turns Ctrl-C into Exit(130) and *returns* it outside standalone mode; this used to exit 0.
    monkeypatch.setattr(images_cmd, "open_registry", _raiser(KeyboardInterrupt()))
    r = cli("images", "list", "--json")
    assert r.code == 130
    assert "interrupted" in r.err
    assert "Traceback" not in r.err


# --- doctor ---------------------------------------------------------------------------------------------

DOCTOR_KEYS = {"python", "root", "tools", "missing_packages", "kvm", "data_dir", "registry", "ok", "error"}


@pytest.fixture
def host(monkeypatch: pytest.MonkeyPatch) -> Callable[..., list[tuple[Path, Path, Path]]]:
    """Fake the host doctor inspects: which tools exist, root or not; records kvm_probe calls."""
    probes: list[tuple[Path, Path, Path]] = []

    def setup(missing: Collection[str] = (), root: bool = True, kvm: tuple[bool, str] = (False, "")) -> Any:
        monkeypatch.setattr(tools, "which", lambda tool: None if tool in missing else f"/usr/bin/{tool}")
        monkeypatch.setattr(os, "geteuid", lambda: 0 if root else 1000)

        def probe(kernel: Path, workdir: Path, cache_file: Path) -> tuple[bool, str]:
            probes.append((kernel, workdir, cache_file))
            return kvm

        monkeypatch.setattr(qemu, "kvm_probe", probe)
        return probes

    return setup


def test_doctor_json_ready_machine(cli: Cli, host: Callable[..., Any], data_dir: Path) -> None:
    probes = host()
    r = cli("doctor", "--json")
    assert r.code == 0, r.err
    doc = r.json()
    assert set(doc) == DOCTOR_KEYS
    assert doc["ok"] is True
    assert doc["error"] is None
    assert doc["root"] is True
    assert doc["missing_packages"] == []
    assert {t["tool"]: t["package"] for t in doc["tools"]} == dict(tools.TOOLS)
    assert all(t["path"] == f"/usr/bin/{t['tool']}" for t in doc["tools"])
    assert doc["kvm"]["usable"] is False
    assert doc["kvm"]["why"].startswith("not probed yet")
    assert probes == []  # no kernel in the data dir: nothing is booted
    assert doc["data_dir"] == str(data_dir)
    assert doc["registry"] == f"sqlite:///{data_dir / 'registry.db'}"


def test_doctor_json_missing_tools_is_one_document(cli: Cli, host: Callable[..., Any]) -> None:
    host(missing={"busybox", "cpio"})
    r = cli("doctor", "--json")
    assert r.code == 5
    doc = r.json()  # one JSON document, not the report followed by the error
    assert set(doc) == DOCTOR_KEYS
    assert doc["ok"] is False
    assert doc["missing_packages"] == ["busybox-static", "cpio"]
    assert [t["tool"] for t in doc["tools"] if t["path"] is None] == ["busybox", "cpio"]
    assert doc["error"]["error"] == "infra"
    assert doc["error"]["exit_code"] == 5
    assert doc["error"]["fix"] == "apt-get install busybox-static cpio"


def test_doctor_not_root(cli: Cli, host: Callable[..., Any]) -> None:
    host(root=False)
    r = cli("doctor", "--json")
    assert r.code == 5
    doc = r.json()
    assert doc["root"] is False
    assert doc["error"]["fix"] == "run amiforge as root"


def test_doctor_text(cli: Cli, host: Callable[..., Any]) -> None:
    host(missing={"qemu-img"})
    r = cli("doctor")
    assert r.code == 5
    assert re.search(r"missing\s+qemu-img\s+apt-get install qemu-utils", r.out)
    assert re.search(r"ok\s+mmdebstrap\s+/usr/bin/mmdebstrap", r.out)
    assert "error: this machine cannot bake local images yet" in r.err
    assert "fix: apt-get install qemu-utils" in r.err
    assert "Traceback" not in r.err


def test_doctor_probes_the_newest_cached_kernel(cli: Cli, host: Callable[..., Any], data_dir: Path) -> None:
    probes = host(kvm=(True, "kvm guest answered in 0.8s"))
    boot = data_dir / "cache" / "base" / "k1" / "rootfs" / "boot"
    boot.mkdir(parents=True)
    for name in ("vmlinuz-6.1.0-29-cloud-amd64", "vmlinuz-6.1.0-30-cloud-amd64"):
        (boot / name).write_bytes(b"not a kernel")
    doc = cli("doctor", "--json").json()
    assert doc["kvm"] == {"usable": True, "why": "kvm guest answered in 0.8s"}
    [(kernel, _workdir, cache_file)] = probes
    assert kernel == boot / "vmlinuz-6.1.0-30-cloud-amd64"
    assert cache_file == data_dir / "cache" / "kvm-probe.json"


def test_doctor_never_prints_the_store_password(
    cli: Cli, host: Callable[..., Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    host()
    monkeypatch.setenv("AMIFORGE_STORE_URL", "postgresql+psycopg://amiforge:s3cret@db.example:5432/registry")
    r = cli("doctor", "--json")
    assert r.code == 0, r.err
    assert r.json()["registry"] == "postgresql+psycopg://amiforge:***@db.example:5432/registry"
    assert "s3cret" not in r.out + r.err


def test_an_os_error_is_the_machine_not_a_bug_exit_5(cli: Cli, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(images_cmd, "open_registry", _raiser(OSError(28, "No space left on device", "/data/x")))
    r = cli("images", "list")
    assert r.code == 5
    assert "No space left on device (/data/x)" in r.err and "df -h" in r.err
    assert "Traceback" not in r.err and "internal error" not in r.err
    j = cli("images", "list", "--json")
    assert j.code == 5 and j.json()["error"] == "infra"
