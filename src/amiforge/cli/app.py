"""The `amiforge` command: the typer app, its command groups, and the ONE place errors become exit codes.

Exit codes (DESIGN §6): 0 ok · 2 bad input · 3 not found / state · 4 gate failed · 5 infrastructure ·
130 interrupted. No traceback reaches a user unless --debug (or AMIFORGE_DEBUG=1).
"""

from __future__ import annotations

import os
import signal
import sys
import traceback

import typer
from rich.markup import escape

from amiforge import __version__
from amiforge.cli import (
    bake_cmd,
    channel_cmd,
    distribute_cmd,
    doctor_cmd,
    events_cmd,
    fleet_cmd,
    images_cmd,
    recipe_cmd,
    rollout_cmd,
    scan_cmd,
    sign_cmd,
)
from amiforge.cli.output import emit_json, err_console
from amiforge.errors import AmiforgeError

INTERRUPTED = "interrupted: cleanups ran; a version being baked is marked failed"

app = typer.Typer(
    name="amiforge",
    help="The whole life of golden machine images: bake, boot-test, register, distribute, roll out, retire.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
app.add_typer(recipe_cmd.app, name="recipe")
app.add_typer(images_cmd.app, name="images")
app.command("bake")(bake_cmd.bake)
app.command("test")(bake_cmd.test)
app.command("demo")(channel_cmd.demo)
app.command("scan")(scan_cmd.scan_command)
app.command("sbom")(scan_cmd.sbom_command)
app.add_typer(scan_cmd.app, name="vulndb")
app.add_typer(sign_cmd.app, name="keys")
app.command("sign")(sign_cmd.sign_command)
app.command("verify")(sign_cmd.verify_command)
app.command("promote")(channel_cmd.promote_command)
app.command("channels")(channel_cmd.channels_command)
app.command("revoke")(channel_cmd.revoke_command)
app.add_typer(channel_cmd.pipeline_app, name="pipeline")
app.command("distribute")(distribute_cmd.distribute_command)
app.add_typer(distribute_cmd.import_app, name="import")
app.command("gc")(distribute_cmd.gc_command)
app.add_typer(fleet_cmd.app, name="fleet")
app.add_typer(rollout_cmd.app, name="rollout")
app.command("rollback")(rollout_cmd.rollback_command)
app.command("incident")(rollout_cmd.incident_command)
app.command("events")(events_cmd.events)
app.command("doctor")(doctor_cmd.doctor)


def _version(value: bool) -> None:
    if value:
        typer.echo(f"amiforge {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    debug: bool = typer.Option(False, "--debug", help="Show tracebacks for errors."),
    version: bool = typer.Option(False, "--version", callback=_version, is_eager=True, help="Print the version."),
) -> None:
    # --debug is read by main() from the arguments, before any command runs; nothing to do here.
    del debug, version


def _debug(argv: list[str]) -> bool:
    return "--debug" in argv or os.environ.get("AMIFORGE_DEBUG") == "1"


def main(argv: list[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
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
