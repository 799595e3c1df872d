"""The `amiforge` command: the typer app, its command groups, and the ONE place errors become exit codes.

Exit codes (docs/architecture.md §6): 0 ok · 2 bad input · 3 not found / state · 4 gate failed · 5 infrastructure ·
10 a plan with changes (`retire`, `drift`) · 130 interrupted. No traceback reaches a user unless --debug (or
AMIFORGE_DEBUG=1).
"""

from __future__ import annotations

import functools
import importlib
import logging
import os
import signal
import sys
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import typer
from rich.markup import escape

# typer (<0.30, pinned) vendors click as typer._click; its groups are TyperGroup, its usage errors UsageError.
from typer import _click as click
from typer._click.exceptions import UsageError
from typer._click.globals import get_current_context
from typer.core import TyperCommand, TyperGroup

from amiforge import __version__
from amiforge.cli import logs
from amiforge.cli.common import DebugOption, LogFileOption, VerboseOption
from amiforge.cli.output import emit_json, err_console
from amiforge.errors import AmiforgeError

logger = logging.getLogger(__name__)

INTERRUPTED = "interrupted: cleanups ran; a version being baked is marked failed"


@dataclass(frozen=True)
class Entry:
    """A top-level command: the module that defines it, the name there (a function, or a typer.Typer for a group
    of subcommands), and the one line `amiforge --help` shows for it without importing the module."""

    module: str
    attr: str
    help: str


# Every top-level command, in the order `amiforge --help` lists them. A command's module (and what it imports:
# the lifecycle, providers, scanners, boto3) is imported only when that command runs or shows its own help, so
# `--help` and the read-only commands start fast. tests/unit/test_startup.py checks each line against the
# command's real help, so this table cannot drift from the modules.
COMMANDS: dict[str, Entry] = {
    "bake": Entry(
        "amiforge.cli.bake_cmd", "bake", "Bake NAME@N from a recipe, then boot-test it (exit 4 if a check fails)."
    ),
    "test": Entry(
        "amiforge.cli.bake_cmd", "test", "Boot a version again on a fresh overlay and record a new boot report."
    ),
    "demo": Entry(
        "amiforge.cli.channel_cmd",
        "demo",
        "The main job on the local provider: pipeline run examples/web --promote dev, then a summary.",
    ),
    "scan": Entry(
        "amiforge.cli.scan_cmd",
        "scan_command",
        "SBOM, CVEs, secrets and residue of a version, read from its artifact without booting it (exit 4 if the "
        "findings fail the entry channel's gate).",
    ),
    "sbom": Entry(
        "amiforge.cli.scan_cmd",
        "sbom_command",
        "Write out the SBOM recorded by the version's latest scan (JSON either way).",
    ),
    "sign": Entry(
        "amiforge.cli.sign_cmd",
        "sign_command",
        "Sign the version's manifest (DSSE envelope, in-toto statement, SLSA provenance).",
    ),
    "verify": Entry(
        "amiforge.cli.sign_cmd",
        "verify_command",
        "Check the signature against the artifact's bytes as they are now (exit 4 on any mismatch).",
    ),
    "promote": Entry(
        "amiforge.cli.channel_cmd",
        "promote_command",
        "Move a channel to the version if every gate of the policy passes; else exit 4 listing every unmet gate.",
    ),
    "channels": Entry(
        "amiforge.cli.channel_cmd",
        "channels_command",
        "Each channel's current version and the previous one (the rollback image), with any flags.",
    ),
    "revoke": Entry(
        "amiforge.cli.channel_cmd",
        "revoke_command",
        "Revoke a version: never promoted or verified again; channels holding it, and its descendants, are flagged.",
    ),
    "distribute": Entry(
        "amiforge.cli.distribute_cmd",
        "distribute_command",
        "Copy a signed version to the recipe's regions (each under its KMS key) and share it; rerun to resume.",
    ),
    "gc": Entry(
        "amiforge.cli.distribute_cmd",
        "gc_command",
        "Find what finished runs left behind — temporary directories on this machine; on AWS, resources tagged "
        "amiforge:managed whose run the registry knows is over (never a registered image) — and remove them with "
        "--apply. Exit 4 when the plan exceeds --max.",
    ),
    "retire": Entry(
        "amiforge.cli.retire_cmd",
        "retire_app",
        "Plan the way out of versions no retention rule keeps and nothing uses — deprecate, then after the grace "
        "period deregister and delete their snapshots — and take it with --apply. Exit 10 when the plan has changes.",
    ),
    "drift": Entry(
        "amiforge.cli.drift_cmd",
        "drift_command",
        "Machines (local guests, EC2 instances, Auto Scaling group members) running a version in no channel, revoked, "
        "behind its channel, or unknown to the registry (unmanaged), or an image the Allowed AMIs setting would "
        "refuse. Exit 10 when any machine drifted.",
    ),
    "report": Entry("amiforge.cli.report_cmd", "app", "Reports on the registry's images: storage cost, missing tags."),
    "cache": Entry(
        "amiforge.cli.retire_cmd", "cache_app", "The bake cache on this machine (base file systems, step layers)."
    ),
    "rollback": Entry(
        "amiforge.cli.rollout_cmd",
        "rollback_command",
        "Put the whole target back on the previous version (one wave, through the same gates).",
    ),
    "incident": Entry(
        "amiforge.cli.rollout_cmd",
        "incident_command",
        "Where a version ran lately: its rollouts and members, the timeline, and the commands to undo it.",
    ),
    "events": Entry(
        "amiforge.cli.events_cmd",
        "events",
        "The audit log, the newest 50 events unless --limit or --all: append-only, each event carrying the hash of "
        "the one before.",
    ),
    "doctor": Entry(
        "amiforge.cli.doctor_cmd",
        "doctor",
        "Check this machine: tools (and the apt line for the missing ones), root, KVM, registry location.",
    ),
    "recipe": Entry("amiforge.cli.recipe_cmd", "app", "Check recipes and print their schema."),
    "images": Entry("amiforge.cli.images_cmd", "app", "Versions in the registry."),
    "vulndb": Entry(
        "amiforge.cli.scan_cmd",
        "app",
        "The vulnerability data: osv.dev's Debian advisories, the Debian Security Tracker, CVSS from CVE records.",
    ),
    "rescan": Entry(
        "amiforge.cli.scan_cmd",
        "rescan_command",
        "Re-match channels' versions against today's vulnerability data (no image is read); exit 4 when a channel "
        "now holds a version its gate refuses.",
    ),
    "keys": Entry("amiforge.cli.sign_cmd", "app", "Signing keys (Ed25519 key files) the registry trusts."),
    "pipeline": Entry("amiforge.cli.channel_cmd", "pipeline_app", "The whole pipeline in one command."),
    "import": Entry("amiforge.cli.distribute_cmd", "import_app", "Adopt images baked by other tools."),
    "fleet": Entry(
        "amiforge.cli.fleet_cmd",
        "app",
        "Local fleets: sets of long-running QEMU guests booted from one version (they outlive the command).",
    ),
    "rollout": Entry("amiforge.cli.rollout_cmd", "app", "Canary waves with SLO gates and automatic rollback."),
    "serve": Entry(
        "amiforge.cli.serve_cmd",
        "serve_command",
        "Serve the web console, the JSON API (/api/v1), /metrics and /healthz on 127.0.0.1:9464.",
    ),
    "tokens": Entry("amiforge.cli.tokens_cmd", "app", "Tokens of the web console and API (read, operate, admin)."),
    "export": Entry(
        "amiforge.cli.export_cmd",
        "app",
        "Monitoring configuration from the policy's SLOs: Prometheus rules, Alertmanager routing, Grafana dashboards.",
    ),
    "logs": Entry(
        "amiforge.cli.logs_cmd",
        "logs_command",
        "Console lines of boot tests and fleet members as JSON lines with ECS fields (for Filebeat, Vector, the "
        "CloudWatch agent).",
    ),
    "metrics": Entry(
        "amiforge.cli.metrics_cmd",
        "metrics_command",
        "M1–M6 per version and target (boot success, time to ready, replacements, agent coverage, open CVEs, "
        "rollback rate) with each SLO's error budget left.",
    ),
}


def _global_options(
    verbose: int = VerboseOption, log_file: str | None = LogFileOption, debug: bool = DebugOption
) -> None:
    """Never called: its signature is where typer makes the options every command takes (see _with_globals)."""


def _with_globals(command: click.Command) -> click.Command:
    """`command` (and every subcommand under it) also taking -v/--verbose, --log-file and --debug, so
    `amiforge bake R -v` works as well as `amiforge -v bake R`."""
    probe = typer.Typer(add_completion=False)
    probe.command()(_global_options)
    command.params.extend(typer.main.get_command(probe).params)
    if isinstance(command, TyperGroup):
        for sub in command.commands.values():
            _with_globals(sub)
    elif command.callback is not None:
        command.callback = _announced(command.callback)
    return command


def _announced(callback: Callable[..., Any]) -> Callable[..., Any]:
    """`callback`, first logging (DEBUG) which command runs: its path only, never its arguments."""

    @functools.wraps(callback)
    def run(*args: Any, **kwargs: Any) -> Any:
        logger.debug("amiforge %s: %s", __version__, get_current_context().command_path)
        return callback(*args, **kwargs)

    return run


def load_command(name: str) -> click.Command:
    """The real click command for the top-level command `name`, importing its module."""
    entry = COMMANDS[name]
    target = getattr(importlib.import_module(entry.module), entry.attr)
    if isinstance(target, typer.Typer):
        command: click.Command = typer.main.get_group(target)
        command.name = name
    else:
        single = typer.Typer(add_completion=False)
        single.command(name)(target)
        command = typer.main.get_command(single)
    return _with_globals(command)


class LazyGroup(TyperGroup):
    """The root group: lists every command from COMMANDS, and imports a command's module only to run it (or to
    show that command's own help)."""

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self._loaded: dict[str, click.Command] = {}

    def list_commands(self, ctx: click.Context) -> list[str]:
        return [*COMMANDS, *(name for name in self.commands if name not in COMMANDS)]

    def get_command(self, ctx: click.Context, cmd_name: str) -> click.Command | None:
        # For listings (help, completion): the loaded command if there is one, else a summary that imports nothing.
        if cmd_name in self.commands:
            return self.commands[cmd_name]
        if cmd_name in self._loaded:
            return self._loaded[cmd_name]
        entry = COMMANDS.get(cmd_name)
        return None if entry is None else TyperCommand(cmd_name, help=entry.help)

    def resolve_command(
        self, ctx: click.Context, args: list[str]
    ) -> tuple[str | None, click.Command | None, list[str]]:
        name = args[0] if args else ""
        if name in COMMANDS and name not in self.commands:
            if name not in self._loaded:
                started = time.perf_counter()
                self._loaded[name] = load_command(name)
                logger.debug("loaded command %s in %.3fs", name, time.perf_counter() - started)
            return name, self._loaded[name], args[1:]
        try:
            return super().resolve_command(ctx, args)
        except UsageError as e:
            from difflib import get_close_matches

            matches = get_close_matches(name, self.list_commands(ctx)) if name else []
            if matches and "Did you mean" not in e.message:
                e.message = f"{e.message.rstrip('.')}. Did you mean {', '.join(repr(m) for m in matches)}?"
            raise


app = typer.Typer(
    name="amiforge",
    cls=LazyGroup,
    help="The whole life of golden machine images: bake, boot-test, register, distribute, roll out, retire.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)


def _version(value: bool) -> None:
    if value:
        typer.echo(f"amiforge {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    debug: bool = typer.Option(False, "--debug", help="Show tracebacks for errors."),
    verbose: int = VerboseOption,
    log_file: str | None = LogFileOption,
    version: bool = typer.Option(False, "--version", callback=_version, is_eager=True, help="Print the version."),
) -> None:
    # --debug is read by main() from the arguments, before any command runs; -v and --log-file act through their
    # callbacks (common.py), on the root as on every command.
    del debug, verbose, log_file, version


def _debug(argv: list[str]) -> bool:
    return "--debug" in argv or os.environ.get("AMIFORGE_DEBUG") == "1"


def main(argv: list[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    started = time.monotonic()
    logs.begin()
    try:
        code = _main(args)
        logger.debug("exit code %d after %.1fs", code, time.monotonic() - started)
        return code
    finally:
        logs.end()


def _failed(e: BaseException) -> None:
    """The error with its traceback, into the log file only (the terminal shows a traceback only with --debug)."""
    logger.error("failed: %s: %s", type(e).__name__, e, exc_info=e, extra={logs.FILE_ONLY: True})


def _main(args: list[str]) -> int:
    as_json = "--json" in args
    command = typer.main.get_command(app)
    try:
        rc = command.main(args=args, prog_name="amiforge", standalone_mode=False)
        # Outside standalone mode typer *returns* the code of a typer.Exit instead of raising it, and it
        # turns Ctrl-C into Exit(130) itself; the commands return None.
        code = rc if isinstance(rc, int) and not isinstance(rc, bool) else 0
        if code == 130:
            err_console.print(INTERRUPTED)
        return code
    except AmiforgeError as e:
        _failed(e)
        if _debug(args):
            traceback.print_exc()
        if as_json:
            emit_json(e.as_dict() | _notes(e))
        else:
            # Diagnostics quote user input (recipe values, paths, tool output): never read them as markup.
            err_console.print(f"[bold red]error:[/] {escape(e.diagnostics())}", markup=True, soft_wrap=True)
            _print_notes(e)
        return e.exit_code
    except typer.Exit as e:
        return int(e.exit_code)
    except (typer.Abort, KeyboardInterrupt) as e:
        _failed(e)
        err_console.print(INTERRUPTED)
        _print_notes(e)
        return 130
    except typer.TyperException as e:  # bad arguments: typer's own usage message
        code = int(getattr(e, "exit_code", 2)) or 2
        if as_json:
            emit_json({"error": "usage", "message": e.format_message(), "exit_code": code})
        else:
            show = getattr(e, "show", None)
            if callable(show):
                show()
            else:
                err_console.print(f"error: {escape(e.format_message())}")
        return code
    except OSError as e:  # the machine, not amiforge: a full disk, a missing directory, a permission
        _failed(e)
        if _debug(args):
            traceback.print_exc()
        where = f" ({e.filename})" if e.filename else ""
        message = f"{e.strerror or e}{where}"
        fix = "check free space (df -h), the path and its permissions; a retry may help once it is fixed"
        if as_json:
            emit_json({"error": "infra", "message": message, "fix": fix, "exit_code": 5} | _notes(e))
        err_console.print(f"[bold red]error:[/] {escape(message)}\n  fix: {fix}")
        _print_notes(e)
        return 5
    except Exception as e:  # a bug: say so plainly, keep the traceback for --debug
        _failed(e)
        if _debug(args):
            traceback.print_exc()
        message = f"{type(e).__name__}: {e}"
        hint = "this is a bug in amiforge; run again with --debug for the traceback and report it"
        if as_json:
            emit_json({"error": "internal", "message": message, "fix": hint, "exit_code": 70} | _notes(e))
        err_console.print(f"[bold red]internal error:[/] {escape(message)}\n  {hint}")
        _print_notes(e)
        return 70


def _notes(e: BaseException) -> dict[str, object]:
    """Notes a run added to the error: what its failed cleanups left behind, and how to remove it."""
    notes = getattr(e, "__notes__", None)
    return {"notes": list(notes)} if notes else {}


def _print_notes(e: BaseException) -> None:
    for note in getattr(e, "__notes__", None) or ():
        err_console.print(f"  {escape(note)}", soft_wrap=True)


def _interrupt(signum: int, _frame: object) -> None:
    # SIGTERM (a supervisor, `kill`) and SIGHUP (the terminal went away) unwind like Ctrl-C, so every cleanup
    # runs and a version being baked is marked failed; by default Python would just die and leave temp dirs.
    raise KeyboardInterrupt(signal.Signals(signum).name)


def run() -> None:
    for sig in (signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, _interrupt)
    sys.exit(main())
