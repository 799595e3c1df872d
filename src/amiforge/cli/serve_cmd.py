"""amiforge serve [--listen 127.0.0.1:9464] [--collect-every 15s] [--without-console-lines]."""

from __future__ import annotations

import typer
from rich.markup import escape

from amiforge.cli.common import open_registry
from amiforge.cli.output import err_console
from amiforge.durations import parse_duration


def serve_command(
    listen: str = typer.Option("127.0.0.1:9464", "--listen", help="HOST:PORT to listen on (loopback by default)."),
    allow_remote: bool = typer.Option(
        False, "--allow-remote", help="Allow a non-loopback address (there is no TLS or authentication yet)."
    ),
    collect_every: str = typer.Option(
        "15s", "--collect-every", help="How often to read the fleets into the registry; 0: never (only serve)."
    ),
    without_console_lines: bool = typer.Option(
        False,
        "--without-console-lines",
        help="Leave failed boots' last console lines out of /metrics (what guests print reaches whoever reads it).",
    ),
) -> None:
    """Serve Prometheus metrics (/metrics) and /healthz on 127.0.0.1:9464, reading the fleets every 15 s.

    /metrics exposes M1–M6 per version and target; serving goes on until Ctrl-C."""
    from amiforge.lifecycle.promote import policy_of
    from amiforge.web.server import PolicySource, parse_listen, serve

    where = parse_listen(listen, allow_remote=allow_remote)
    every = parse_duration(collect_every, what="--collect-every", allow_zero=True)
    settings, store = open_registry()
    policy = PolicySource(settings, policy_of)  # read again when the file changes

    def ready(url: str) -> None:
        err_console.print(f"serving {escape(url)}/metrics and {escape(url)}/healthz (Ctrl-C to stop)")

    try:
        serve(where, store=store, settings=settings, policy=policy, collect_every=every or None, ready=ready,
              console_lines=not without_console_lines)  # fmt: skip
    except KeyboardInterrupt:
        err_console.print("stopped")
