"""amiforge serve [--listen 127.0.0.1:9464] [--collect-every 15s] [--tls-cert F --tls-key F] [--open-metrics] …"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import typer
from rich.markup import escape

from amiforge.cli.common import open_registry
from amiforge.cli.output import err_console
from amiforge.durations import parse_duration
from amiforge.errors import ConfigError


def serve_command(
    listen: str = typer.Option("127.0.0.1:9464", "--listen", help="HOST:PORT to listen on (loopback by default)."),
    allow_remote: bool = typer.Option(
        False, "--allow-remote", help="Allow a non-loopback address without TLS (tokens then cross it in the clear)."
    ),
    tls_cert: Path | None = typer.Option(None, "--tls-cert", help="Serve HTTPS with this PEM certificate (chain)."),
    tls_key: Path | None = typer.Option(None, "--tls-key", help="The certificate's unencrypted PEM key."),
    collect_every: str = typer.Option(
        "15s", "--collect-every", help="How often to read the fleets into the registry; 0: never (only serve)."
    ),
    public_url: str | None = typer.Option(
        None, "--public-url", help="The URL browsers open, behind a TLS proxy (e.g. https://amiforge.example)."
    ),
    open_metrics: bool = typer.Option(
        False, "--open-metrics", help="Serve /metrics without a token (for a Prometheus that sends none)."
    ),
    without_console_lines: bool = typer.Option(
        False,
        "--without-console-lines",
        help="Leave failed boots' last console lines out of /metrics (what guests print reaches whoever reads it).",
    ),
) -> None:
    """Serve the web console, the JSON API (/api/v1), /metrics and /healthz on 127.0.0.1:9464.

    Every page and route needs a token; at the first start, an admin token is made and printed once. The fleets are
    read into the registry every 15 s; serving goes on until Ctrl-C."""
    from amiforge.lifecycle.promote import policy_of
    from amiforge.lifecycle.tokens import first_token
    from amiforge.web.server import PolicySource, Tls, parse_listen, serve

    if (tls_cert is None) != (tls_key is None):
        raise ConfigError("--tls-cert and --tls-key go together", fix="pass both, or neither")
    tls = Tls(tls_cert, tls_key) if tls_cert is not None and tls_key is not None else None
    where = parse_listen(listen, allow_remote=allow_remote, tls=tls is not None)
    every = parse_duration(collect_every, what="--collect-every", allow_zero=True)
    settings, store = open_registry()
    policy = PolicySource(settings, policy_of)  # read again when the file changes

    def ready(url: str) -> None:
        # Listening: only now is a first admin token made (a failed start leaves none that nobody saw).
        created = first_token(store=store, settings=settings)
        err_console.print(
            f"serving the console on {escape(url)}/ and metrics on {escape(url)}/metrics (Ctrl-C to stop)"
        )
        if created is None:
            err_console.print("log in with a token; `amiforge tokens create NAME --role read` makes one")
        elif sys.stderr.isatty():
            err_console.print(f"log in with this admin token (shown once; `amiforge tokens` manages them): "
                              f"{created.secret}", markup=False)  # fmt: skip
        else:  # a service's log is kept: the secret goes to a file only its owner reads
            path = settings.data_dir / "first-admin-token"
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW, 0o600)
            with os.fdopen(fd, "w") as out:
                out.write(created.secret + "\n")
            err_console.print(f"an admin token was made; its secret is in {escape(str(path))} (mode 0600): log in "
                              "with it, then delete the file")  # fmt: skip

    try:
        serve(where, store=store, settings=settings, policy=policy, collect_every=every or None, ready=ready,
              console_lines=not without_console_lines, tls=tls, open_metrics=open_metrics,
              public_url=public_url)  # fmt: skip
    except KeyboardInterrupt:
        err_console.print("stopped")
