"""Start-up: what `amiforge` imports before it does anything. Structural checks only (which modules get imported,
which commands the lazy root group lists), never timings: bench/startup_bench.py measures those.

- importing the CLI, and `amiforge --help`, import no command module, and none of boto3, alembic, cyclonedx,
  SQLAlchemy, pydantic or the lifecycle;
- read-only commands on a registry at the newest schema import neither alembic nor boto3 nor the scanners;
- the table of commands in cli/app.py says what each command's own help says (so `--help` cannot drift);
- every command takes -v/--verbose and --log-file.
"""

from __future__ import annotations

import importlib
import json
import os
import pkgutil
import re
import subprocess
import sys
from pathlib import Path

import pytest
import sqlalchemy as sa

import amiforge.cli
from amiforge.cli import app as app_module
from amiforge.store import sql
from amiforge.store.engine import migration_head, schema_is_current

# Never imported by `import amiforge.cli.app` or `amiforge --help`.
HEAVY = (
    "boto3",
    "botocore",
    "alembic",
    "cyclonedx",
    "sqlalchemy",
    "pydantic",
    "pydantic_settings",
    "cryptography",
    "detect_secrets",
    "amiforge.lifecycle",
    "amiforge.providers",
    "amiforge.scanners",
    "amiforge.store",
    "amiforge.settings",
)
# Never imported by a read-only command on a registry at the newest schema.
NOT_FOR_READS = (
    "boto3",
    "botocore",
    "alembic",
    "cyclonedx",
    "detect_secrets",
    "amiforge.lifecycle",
    "amiforge.scanners",
)


def _env(tmp_path: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("AMIFORGE_", "AWS_"))}
    env["AMIFORGE_DATA_DIR"] = str(tmp_path / "data")
    return env


def _imported_by(code: str, tmp_path: Path) -> tuple[set[str], str]:
    """The top-level packages (and amiforge subpackages) a fresh interpreter has imported after running `code`, and
    what `code` printed on stdout."""
    probe = (
        "import sys, json\n"
        f"{code}\n"
        "names = {m.split('.')[0] for m in sys.modules} | {'.'.join(m.split('.')[:2]) for m in sys.modules}\n"
        "sys.stderr.write('\\nMODULES ' + json.dumps(sorted(names)) + '\\n')\n"
    )
    run = subprocess.run(
        [sys.executable, "-c", probe],
        capture_output=True,
        text=True,
        env=_env(tmp_path),
        cwd=tmp_path,
        timeout=120,
        check=False,
    )
    marker = run.stderr.rsplit("\nMODULES ", 1)
    assert len(marker) == 2, run.stderr
    return set(json.loads(marker[1])), run.stdout


def test_importing_the_cli_imports_no_command_and_nothing_heavy(tmp_path: Path) -> None:
    modules, _ = _imported_by("import amiforge.cli.app", tmp_path)
    assert modules.isdisjoint(HEAVY), sorted(modules & set(HEAVY))
    command_modules = {entry.module.rsplit(".", 1)[1] for entry in app_module.COMMANDS.values()}
    assert not {f"amiforge.cli.{m}" for m in command_modules} & modules


def test_help_lists_every_command_without_importing_one(tmp_path: Path) -> None:
    code = (
        "import os; os.environ['COLUMNS'] = '250'\n"
        "from amiforge.cli.app import main\n"
        "code = main(['--help'])\n"
        "assert code == 0, code\n"
    )
    modules, out = _imported_by(code, tmp_path)
    assert modules.isdisjoint(HEAVY), sorted(modules & set(HEAVY))
    listed = re.findall(r"^│ (\S+) ", out, re.MULTILINE)
    assert [n for n in listed if not n.startswith("-")] == list(app_module.COMMANDS)
    for name, entry in app_module.COMMANDS.items():
        assert " ".join(entry.help.split()[:6]) in " ".join(out.split()), name
    for option in ("--verbose", "-v", "--log-file", "--debug", "--version"):
        assert option in out


@pytest.mark.parametrize("argv", [["keys", "list", "--json"], ["images", "list", "--json"], ["events", "--json"]])
def test_read_only_commands_on_a_current_registry_import_no_alembic_boto3_or_scanners(
    tmp_path: Path, argv: list[str]
) -> None:
    code = f"from amiforge.cli.app import main\nraise SystemExit(main({argv!r}))\n"
    first = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, env=_env(tmp_path), timeout=120, check=False
    )
    assert first.returncode == 0, first.stderr  # a new registry: created and migrated (alembic runs)
    modules, out = _imported_by(f"from amiforge.cli.app import main\nassert main({argv!r}) == 0", tmp_path)
    json.loads(out)
    assert modules.isdisjoint(NOT_FOR_READS), sorted(modules & set(NOT_FOR_READS))


def test_the_command_table_matches_each_commands_own_help() -> None:
    def first_paragraph(text: str) -> str:
        return " ".join(text.strip().split("\n\n")[0].split())

    for name, entry in app_module.COMMANDS.items():
        command = app_module.load_command(name)
        real = command.short_help or command.help or ""
        assert first_paragraph(real) == first_paragraph(entry.help), name


def test_every_command_module_is_in_the_table() -> None:
    modules = {info.name for info in pkgutil.iter_modules(amiforge.cli.__path__, "amiforge.cli.")}
    in_table = {entry.module for entry in app_module.COMMANDS.values()}
    assert {m for m in modules if m.endswith("_cmd")} == in_table
    for entry in app_module.COMMANDS.values():
        assert hasattr(importlib.import_module(entry.module), entry.attr), entry


def test_every_command_takes_verbose_and_log_file() -> None:
    def walk(command: object, path: str) -> None:
        opts = {opt for param in getattr(command, "params", []) for opt in getattr(param, "opts", [])}
        assert {"--verbose", "-v", "--log-file"} <= opts, path
        for name, sub in getattr(command, "commands", {}).items():
            walk(sub, f"{path} {name}")

    for name in app_module.COMMANDS:
        walk(app_module.load_command(name), name)


def test_the_migration_head_read_from_the_scripts_is_alembics() -> None:
    assert migration_head() == sql.head_revision()


def test_the_schema_check_says_current_only_at_the_newest_revision(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'registry.db'}"
    engine = sql.create_store_engine(url)
    try:
        assert not schema_is_current(engine)  # no schema at all
        sql.migrate(engine)
        assert schema_is_current(engine)
        with engine.begin() as conn:
            conn.execute(sa.text("UPDATE alembic_version SET version_num = '0001'"))
        assert not schema_is_current(engine)  # behind: open_store migrates
    finally:
        engine.dispose()
