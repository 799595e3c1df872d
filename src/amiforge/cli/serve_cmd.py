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
from amiforge.settings import Settings
from amiforge.store.interface import Store


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
    from amiforge.web.server import PolicySource, Tls, is_loopback, parse_listen, serve

    if (tls_cert is None) != (tls_key is None):
        raise ConfigError("--tls-cert and --tls-key go together", fix="pass both, or neither")
    tls = Tls(tls_cert, tls_key) if tls_cert is not None and tls_key is not None else None
    where = parse_listen(listen, allow_remote=allow_remote, tls=tls is not None)
    if open_metrics and (public_url is not None or not is_loopback(where.host)):
        # Behind a proxy on this machine every request comes from loopback: /metrics would be open to the world.
        raise ConfigError(
            "--open-metrics serves /metrics without a token: only on loopback, and not behind a proxy",
            fix="drop --open-metrics and give Prometheus a read token (amiforge tokens create)",
        )
    every = parse_duration(collect_every, what="--collect-every", allow_zero=True)
    settings, store = open_registry()
    policy = PolicySource(settings, policy_of)  # read again when the file changes

    def ready(url: str) -> None:
        err_console.print(
            f"serving the console on {escape(url)}/ and metrics on {escape(url)}/metrics (Ctrl-C to stop)"
        )
        # Listening: only now is a first admin token made (a failed start leaves none that nobody saw).
        if sys.stderr.isatty():
            created = first_token(store=store, settings=settings)
            if created is not None:
                err_console.print(f"log in with this admin token (shown once; `amiforge tokens` manages them): "
                                  f"{created.secret}", markup=False)  # fmt: skip
                return
        elif (path := _first_token_file(store, settings)) is not None:
            err_console.print(f"an admin token was made; its secret is in {escape(str(path))} (mode 0600): log in "
                              "with it, then delete the file")  # fmt: skip
            return
        err_console.print("log in with a token; `amiforge tokens create NAME --role read` makes one")

    try:
        serve(where, store=store, settings=settings, policy=policy, collect_every=every or None, ready=ready,
              console_lines=not without_console_lines, tls=tls, open_metrics=open_metrics,
              public_url=public_url)  # fmt: skip
    except KeyboardInterrupt:
        err_console.print("stopped")


def _first_token_file(store: Store, settings: Settings) -> Path | None:
    """A service's log is kept: the first admin token goes to a file only its owner reads, made afresh (never one
    that was there: another user could have planted it readable, or as a link). The file is made before the token,
    and the token is revoked if the file cannot be written, so no secret exists that nobody can read."""
    from amiforge.lifecycle.tokens import first_token, revoke_token

    if store.tokens():
        return None
    path = settings.data_dir / "first-admin-token"
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
    except OSError as e:
        raise ConfigError(
            f"cannot make {path} for the first admin token: {e.strerror or e}",
            fix=f"remove {path} if it is left from an earlier start, or make a token: amiforge tokens create NAME "
            "--role admin",
        ) from e
    with os.fdopen(fd, "w") as out:
        created = first_token(store=store, settings=settings)
        if created is None:  # another `serve` made it meanwhile
            out.close()
            path.unlink(missing_ok=True)
            return None
        try:
            out.write(created.secret + "\n")
            out.flush()
        except OSError:
            revoke_token(created.token.name, store=store, settings=settings)
            raise
    return path
