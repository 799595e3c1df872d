"""`amiforge serve`: a small threaded HTTP server for Prometheus (`/metrics`) and health checks (`/healthz`), and a
collector thread that reads the fleets into the registry every `collect_every` seconds (lifecycle/telemetry.py).

Each scrape renders the registry's telemetry afresh through `lifecycle.exporter.TelemetryCollector` (amiforge's
families only: no process metrics of this server mixed into the contract). It listens on loopback unless told
otherwise: what it shows names images, versions and fleets, and it has no authentication yet.
"""

from __future__ import annotations

import ipaddress
import json
import logging
import socket
import threading
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from socketserver import ThreadingMixIn
from typing import TYPE_CHECKING, Any
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server

from amiforge.errors import ConfigError
from amiforge.lifecycle.exporter import TelemetryCollector
from amiforge.lifecycle.exposition import CONTENT_TYPE
from amiforge.lifecycle.telemetry import collect
from amiforge.policy.document import Policy
from amiforge.settings import Settings
from amiforge.store.interface import Store

if TYPE_CHECKING:
    from _typeshed.wsgi import StartResponse, WSGIEnvironment

logger = logging.getLogger(__name__)

DEFAULT_LISTEN = "127.0.0.1:9464"  # the port Prometheus's registry of exporters gives amiforge's kind of exporter


@dataclass(frozen=True)
class Listen:
    host: str
    port: int

    @property
    def url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}"


def parse_listen(value: str, *, allow_remote: bool) -> Listen:
    """HOST:PORT; a host other than loopback only with `allow_remote` (there is no TLS or authentication yet)."""
    host, sep, port_text = value.rpartition(":")
    host = host.strip("[]")
    fix = f"e.g. --listen {DEFAULT_LISTEN}"
    if not sep or not host or not port_text.isdigit() or not 0 <= int(port_text) <= 65535:
        raise ConfigError(f"--listen {value!r} is not HOST:PORT", fix=fix)
    if not allow_remote and not _loopback(host):
        raise ConfigError(
            f"--listen {value!r} is not a loopback address; /metrics names images, versions and fleets to anyone "
            "who can reach it, and has no authentication",
            fix="listen on 127.0.0.1 and let Prometheus reach it through a proxy, or pass --allow-remote on a "
            "network you trust",
        )
    return Listen(host, int(port_text))


def _loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


class PolicySource:
    """The policy as its file says now: read again when the file changes (a new SLO threshold is a new histogram
    bucket, which the rules regenerated from it need), the previous one kept while an edit does not validate."""

    def __init__(self, settings: Settings, load: Callable[[Settings], Policy]) -> None:
        self.settings, self._load = settings, load
        self._key: int | None = None
        self._policy = load(settings)
        self._key = self._stamp()

    def _stamp(self) -> int | None:
        path = self.settings.policy
        try:
            return path.stat().st_mtime_ns if path is not None else None
        except OSError:
            return self._key

    def get(self) -> Policy:
        stamp = self._stamp()
        if stamp != self._key:
            self._key = stamp
            try:
                self._policy = self._load(self.settings)
            except ConfigError as e:
                logger.warning("the policy no longer validates; /metrics keeps the previous one: %s", e.message)
        return self._policy


class App:
    """The WSGI application: /metrics, /healthz; anything else 404, anything but GET/HEAD 405."""

    def __init__(self, store: Store, policy: Policy | PolicySource, *, console_lines: bool = True) -> None:
        self.store = store
        self.policy = policy
        self.console_lines = console_lines
        self._lock = threading.Lock()
        self.collector = TelemetryCollector(store, self._current_policy(), console_lines=console_lines)

    def _current_policy(self) -> Policy:
        return self.policy.get() if isinstance(self.policy, PolicySource) else self.policy

    def _refresh(self) -> TelemetryCollector:
        """The collector for the policy as it is now (its buckets follow the SLO thresholds)."""
        policy = self._current_policy()
        with self._lock:
            if policy is not self.collector.policy:
                self.collector = TelemetryCollector(self.store, policy, console_lines=self.console_lines)
            return self.collector

    def __call__(self, environ: WSGIEnvironment, start_response: StartResponse) -> Iterable[bytes]:
        path = environ.get("PATH_INFO", "")
        method = environ.get("REQUEST_METHOD", "GET")
        if path not in ("/metrics", "/healthz"):
            return _reply(start_response, "404 Not Found", b"not found: try /metrics or /healthz\n", "text/plain")
        if method not in ("GET", "HEAD"):
            allow = [("Allow", "GET, HEAD")]
            return _reply(start_response, "405 Method Not Allowed", b"GET or HEAD only\n", "text/plain", allow)
        head = method == "HEAD"
        if path == "/healthz":
            status, body = self._health()
            return _reply(start_response, status, json.dumps(body).encode() + b"\n", "application/json", head=head)
        try:
            output = self._refresh().render()
        except Exception as e:  # a broken registry: Prometheus records the failed scrape; the log says why
            logger.error("/metrics failed: %s: %s", type(e).__name__, e)
            return _reply(
                start_response, "500 Internal Server Error", b"the registry could not be read\n", "text/plain"
            )
        # The text format every Prometheus reads (2.x included); the names need none of 1.0.0's UTF-8 escaping.
        return _reply(start_response, "200 OK", output, CONTENT_TYPE, head=head)

    def _health(self) -> tuple[str, dict[str, Any]]:
        try:
            self.store.count_versions()
        except Exception as e:
            return "503 Service Unavailable", {"status": "unavailable", "error": f"{type(e).__name__}: {e}"}
        return "200 OK", {"status": "ok"}


def _reply(
    start_response: StartResponse,
    status: str,
    body: bytes,
    content_type: str,
    extra: list[tuple[str, str]] | None = None,
    *,
    head: bool = False,
) -> list[bytes]:
    headers = [("Content-Type", content_type), ("Content-Length", str(len(body))),
               ("X-Content-Type-Options", "nosniff"), ("Cache-Control", "no-store"), *(extra or [])]  # fmt: skip
    start_response(status, headers)
    return [] if head else [body]


class _Server(ThreadingMixIn, WSGIServer):
    daemon_threads = True
    allow_reuse_address = True


class _Server6(_Server):
    address_family = socket.AF_INET6


class _QuietHandler(WSGIRequestHandler):
    def log_message(self, format: str, *args: Any) -> None:
        logger.debug("%s %s", self.address_string(), format % args)


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


def serve(
    listen: Listen,
    *,
    store: Store,
    settings: Settings,
    policy: Policy | PolicySource,
    collect_every: float | None,
    ready: Callable[[str], None] = lambda _url: None,
    console_lines: bool = True,
) -> None:
    """Serve until interrupted (Ctrl-C, SIGTERM). `ready(url)` is called once the socket listens."""
    server_class = _Server6 if ":" in listen.host else _Server
    try:
        app = App(store, policy, console_lines=console_lines)
        server = make_server(listen.host, listen.port, app, server_class=server_class, handler_class=_QuietHandler)
    except OSError as e:
        raise ConfigError(
            f"cannot listen on {listen.host}:{listen.port}: {e.strerror or e}",
            fix="pick another port with --listen HOST:PORT (is another amiforge serve running?)",
        ) from e
    collecting = Collecting(store, settings, collect_every) if collect_every else None
    try:
        if collecting is not None:
            collecting.start()
        ready(Listen(listen.host, server.server_port).url)  # the port the system gave, if asked for 0
        server.serve_forever(poll_interval=0.5)
    finally:
        if collecting is not None:
            collecting.stop()
        server.server_close()
