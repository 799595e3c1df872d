"""amiforge logs [--version REF] [--target T] [--since 24h] [--follow] [--text]."""

from __future__ import annotations

import json
import sys
from datetime import timedelta

import typer

from amiforge.cli.common import open_registry
from amiforge.durations import parse_duration


def logs_command(
    version: str | None = typer.Option(None, "--version", help="Only this version's boots (NAME@N or digest prefix)."),
    target: str | None = typer.Option(None, "--target", help="Only boot-test, or one fleet: local:NAME."),
    since: str = typer.Option("24h", "--since", help="Lines written within this long (e.g. 1h, 7d)."),
    follow: bool = typer.Option(False, "--follow", "-f", help="Keep printing new lines as they are written."),
    text: bool = typer.Option(False, "--text", help="Plain lines for a terminal instead of JSON."),
) -> None:
    """Console lines of boot tests and fleet members as JSON lines with ECS fields (for Filebeat, Vector, the
    CloudWatch agent).

    Each line carries @timestamp, message, host.name and cloud.instance.id (the instance), and labels.image,
    labels.version, labels.target. Output is JSON lines unless --text."""
    seconds = parse_duration(since, what="--since")
    settings, store = open_registry()
    from amiforge.lifecycle.logs import console_lines

    lines = console_lines(store=store, settings=settings, ref=version, target=target,
                          since=timedelta(seconds=seconds), follow=follow)  # fmt: skip
    try:
        for line in lines:
            if text:
                sys.stdout.write(f"{line.at:%Y-%m-%dT%H:%M:%S}Z {line.target} {line.instance} {line.version} | "
                                 f"{line.message}\n")  # fmt: skip
            else:
                sys.stdout.write(json.dumps(line.ecs(), ensure_ascii=False) + "\n")
            if follow:
                sys.stdout.flush()
    except KeyboardInterrupt:
        pass
    except BrokenPipeError:  # `amiforge logs | head`: the reader has all it wanted
        sys.stderr.close()
