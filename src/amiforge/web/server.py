"""`amiforge serve`: the web console, the JSON API, `/metrics` and `/healthz` (app.py) on one uvicorn server, and a
collector thread that reads the fleets into the registry every `collect_every` seconds (lifecycle/telemetry.py).

It listens on loopback unless told otherwise: another address needs TLS (a certificate and key) or an explicit
`--allow-remote`, since tokens and sessions would otherwise cross the network in the clear.
"""

from __future__ import annotations

import ipaddress
import logging
import socket
import threading
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit

from amiforge.errors import ConfigError
from amiforge.lifecycle.telemetry import collect
from amiforge.policy.document import Policy
from amiforge.settings import Settings
from amiforge.store.interface import Store
from amiforge.web.metrics import Metrics, PolicySource

logger = logging.getLogger(__name__)

DEFAULT_LISTEN = "127.0.0.1:9464"  # the port Prometheus's registry of exporters gives amiforge's kind of exporter

__all__ = ["DEFAULT_LISTEN", "Listen", "PolicySource", "Tls", "WebServer", "parse_listen", "serve"]


@dataclass(frozen=True)
class Tls:
    """A PEM certificate (chain) and its key: the server speaks HTTPS, and the session cookie is Secure."""

    certificate: Path
    key: Path


@dataclass(frozen=True)
class Listen:
    host: str
    port: int
    tls: bool = False

    @property
    def url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{'https' if self.tls else 'http'}://{host}:{self.port}"


def parse_listen(value: str, *, allow_remote: bool, tls: bool = False) -> Listen:
    """HOST:PORT; a host other than loopback only with TLS or `allow_remote`."""
    host, sep, port_text = value.rpartition(":")
    host = host.strip("[]")
    fix = f"e.g. --listen {DEFAULT_LISTEN}"
    if not sep or not host or not port_text.isdigit() or not 0 <= int(port_text) <= 65535:
        raise ConfigError(f"--listen {value!r} is not HOST:PORT", fix=fix)
    if not allow_remote and not tls and not is_loopback(host):
        raise ConfigError(
            f"--listen {value!r} is not a loopback address, and without TLS the tokens and sessions of whoever logs "
            "in would cross the network in the clear",
            fix="pass --tls-cert FILE --tls-key FILE, or listen on 127.0.0.1 behind a TLS proxy (--public-url "
            "https://…), or pass --allow-remote on a network you trust",
        )
    return Listen(host, int(port_text), tls)


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


class Collecting:
    """Reads the fleets into the registry every `every` seconds on a thread of its own until stopped."""

    def __init__(self, store: Store, settings: Settings, every: float) -> None:
        self.store, self.settings, self.every = store, settings, every
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="amiforge-collect", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=30)

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                for done in collect(self.store, self.settings):
                    if done.error:
                        logger.warning("collect %s: %s", done.target, done.error)
            except Exception as e:  # the server keeps serving what the registry holds; the next round tries again
                logger.warning("collecting failed: %s: %s", type(e).__name__, e)
            self._stop.wait(self.every)


class WebServer:
    """The app on a socket of its own: `run()` serves until `stop()` (or, in the main thread, Ctrl-C/SIGTERM)."""

    def __init__(
        self,
        listen: Listen,
        *,
        store: Store,
        settings: Settings,
        policy: Policy | PolicySource,
        console_lines: bool = True,
        tls: Tls | None = None,
        open_metrics: bool = False,
        public_url: str | None = None,
    ) -> None:
        import uvicorn  # the server and the app load only for `serve`

        from amiforge.web.app import create_app
        from amiforge.web.context import Context, Controllers

        metrics = Metrics(store, policy, console_lines=console_lines)
        origin = None if public_url is None else public_origin(public_url)
        secure = tls is not None or (origin is not None and origin.startswith("https://"))
        self.context = Context(store, settings, metrics, Controllers(store), secure_cookies=secure,
                               open_metrics=open_metrics, public_origin=origin)  # fmt: skip
        self.app = create_app(self.context)
        family = socket.AF_INET6 if ":" in listen.host else socket.AF_INET
        self._socket = socket.socket(family, socket.SOCK_STREAM)
        try:
            self._socket.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            self._socket.bind((listen.host, listen.port))
            self._socket.listen(128)
        except OSError as e:
            self._socket.close()
            raise ConfigError(
                f"cannot listen on {listen.host}:{listen.port}: {e.strerror or e}",
                fix="pick another port with --listen HOST:PORT (is another amiforge serve running?)",
            ) from e
        self.listen = Listen(listen.host, self._socket.getsockname()[1], tls is not None)  # the port given, if 0
        try:
            config = uvicorn.Config(
                self.app, log_level="warning", access_log=False, lifespan="off", server_header=False,
                proxy_headers=False, timeout_graceful_shutdown=5,
                ssl_certfile=str(tls.certificate) if tls else None, ssl_keyfile=str(tls.key) if tls else None,
            )  # fmt: skip
            if tls is not None:
                config.load()  # reads the certificate now: a bad file is a ConfigError, not a crash later
        except (OSError, ValueError) as e:
            self._socket.close()
            raise ConfigError(
                f"cannot use the TLS certificate {tls.certificate if tls else ''} and key: {e}",
                fix="pass a PEM certificate with --tls-cert and its unencrypted PEM key with --tls-key",
            ) from e
        self._server = uvicorn.Server(config)

    @property
    def url(self) -> str:
        return self.listen.url

    def run(self) -> None:
        try:
            self._server.run(sockets=[self._socket])
        finally:
            self._socket.close()

    def stop(self) -> None:
        self._server.should_exit = True


def public_origin(url: str) -> str:
    """scheme://host[:port] of `--public-url` (what a browser behind a proxy sends as its Origin)."""
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.netloc or parts.path not in ("", "/") or parts.query:
        example = "the scheme and host the browser opens, e.g. --public-url https://amiforge.example"
        raise ConfigError(f"--public-url {url!r} is not a site's address", fix=example)
    return f"{parts.scheme}://{parts.netloc.lower()}"


def serve(
    listen: Listen,
    *,
    store: Store,
    settings: Settings,
    policy: Policy | PolicySource,
    collect_every: float | None,
    ready: Callable[[str], None] = lambda _url: None,
    console_lines: bool = True,
    tls: Tls | None = None,
    open_metrics: bool = False,
    public_url: str | None = None,
) -> None:
    """Serve until interrupted (Ctrl-C, SIGTERM). `ready(url)` is called once the socket listens."""
    server = WebServer(listen, store=store, settings=settings, policy=policy, console_lines=console_lines, tls=tls,
                       open_metrics=open_metrics, public_url=public_url)  # fmt: skip
    collecting = Collecting(store, settings, collect_every) if collect_every else None
    try:
        if collecting is not None:
            collecting.start()
        ready(server.url)
        server.run()
    finally:
        if collecting is not None:
            collecting.stop()
