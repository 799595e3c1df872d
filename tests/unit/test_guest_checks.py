"""Boot-test checks: the in-guest script and the framed results it prints on the console (run for real with
/bin/sh: that is the host/guest contract), and the host-side HTTP and TCP port checks against real sockets."""

from __future__ import annotations

import base64
import http.server
import socket
import subprocess
import threading
import time
import types
from collections.abc import Generator, Iterator
from pathlib import Path

import pytest

from amiforge.model import CheckResult
from amiforge.providers.guest import RESULT_RE, GuestCheck, guest_results, guest_script
from amiforge.providers.local import qemu
from amiforge.providers.local.qemu import free_port, http_check, tcp_check


def _frame(i: int, rc: int, out: str) -> str:
    return f"AMIFORGE-RESULT {i} {rc} {base64.b64encode(out.encode()).decode()}"


UNIT = GuestCheck("unit nginx", "unit", "systemctl is-active nginx")
CONFIG = GuestCheck("command nginx -t", "command", "nginx -t")
VERSION = GuestCheck("command nginx -v", "command", "nginx -v", expect_output="nginx/1.22")


# --- parsing framed results ---------------------------------------------------------------------------------


def test_results_are_matched_to_checks_by_index_among_console_noise() -> None:
    lines = [
        "[    0.000000] Linux version 6.1.0-test",
        "Welcome to Debian GNU/Linux 12 (bookworm)!",
        "AMIFORGE-READY 7.21",
        "",
        # Out of order, and the second with terminal escape codes before the marker on the same line.
        _frame(2, 0, "nginx version: nginx/1.22.1\n"),
        "\x1b[0;1;32m[  OK  ]\x1b[0m Started nginx.service\x1b[0m" + _frame(0, 0, "active\n"),
        "[   12.000000] random: crng init done",
        _frame(1, 0, "nginx: configuration file /etc/nginx/nginx.conf test is successful\n"),
        "AMIFORGE-CHECKS-DONE",
    ]

    results = guest_results([UNIT, CONFIG, VERSION], lines)

    assert results == [
        CheckResult("unit nginx", "unit", True, "exit 0: active"),
        CheckResult(
            "command nginx -t",
            "command",
            True,
            "exit 0: nginx: configuration file /etc/nginx/nginx.conf test is successful",
        ),
        CheckResult("command nginx -v", "command", True, "exit 0: nginx version: nginx/1.22.1"),
    ]


def test_a_missing_result_is_a_failure() -> None:
    results = guest_results([UNIT, CONFIG], [_frame(0, 0, "active")])

    assert results[0].passed
    assert results[1] == CheckResult("command nginx -t", "command", False, "no result came back from the guest")


def test_no_results_at_all_fails_every_check() -> None:
    results = guest_results([UNIT, CONFIG], ["AMIFORGE-READY 3.0", "login:"])
    assert [(r.name, r.passed) for r in results] == [("unit nginx", False), ("command nginx -t", False)]


def test_wrong_exit_code_fails_with_the_output() -> None:
    results = guest_results([UNIT], [_frame(0, 3, "inactive\n")])
    assert results == [CheckResult("unit nginx", "unit", False, "exit 3, expected 0: inactive")]


def test_expected_nonzero_exit_passes() -> None:
    check = GuestCheck("command test -e /etc/shadow-", "command", "test -e /etc/shadow-", expect_exit=1)
    assert guest_results([check], [_frame(0, 1, "")]) == [CheckResult(check.name, "command", True, "exit 1")]
    assert guest_results([check], [_frame(0, 0, "")]) == [
        CheckResult(check.name, "command", False, "exit 0, expected 1")
    ]


def test_expected_output_missing_fails_and_both_problems_are_listed() -> None:
    results = guest_results([VERSION], [_frame(0, 0, "nginx version: nginx/1.18.0")])
    assert results == [
        CheckResult("command nginx -v", "command", False, "output lacks 'nginx/1.22': nginx version: nginx/1.18.0")
    ]

    results = guest_results([VERSION], [_frame(0, 127, "sh: 1: nginx: not found")])
    assert not results[0].passed
    assert results[0].detail == "exit 127, expected 0; output lacks 'nginx/1.22': sh: 1: nginx: not found"


def test_multi_line_output_is_folded_into_the_detail() -> None:
    results = guest_results([CONFIG], [_frame(0, 0, "line one\nline two\n\n")])
    assert results[0].detail == "exit 0: line one | line two"


def test_garbled_base64_is_reported_not_raised() -> None:
    # "abcde" is not valid base64 (bad padding): the check fails instead of crashing the boot test.
    results = guest_results([VERSION], ["AMIFORGE-RESULT 0 0 abcde"])
    assert results[0].passed is False
    assert "garbled" in results[0].detail


# --- the real guest script under /bin/sh --------------------------------------------------------------------


def _run_script(checks: list[GuestCheck], tmp_path: Path) -> list[str]:
    script = tmp_path / "checks.sh"
    script.write_text(guest_script(checks))
    proc = subprocess.run(
        ["/bin/sh", str(script)],
        stdin=subprocess.DEVNULL,
        capture_output=True,
        timeout=30,
        check=True,
        cwd=tmp_path,
    )
    assert proc.stderr == b""
    return proc.stdout.decode().splitlines()


def test_guest_script_output_parses_back_to_the_real_outcomes(tmp_path: Path) -> None:
    checks = [
        GuestCheck("command true", "command", "true"),
        GuestCheck("command exit 3", "command", "exit 3"),
        GuestCheck("command echo hello", "command", "echo hello", expect_output="hello"),
        GuestCheck("stderr", "command", "echo oops >&2; exit 2", expect_exit=2, expect_output="oops"),
        GuestCheck("missing output", "command", "echo hello", expect_output="goodbye"),
        GuestCheck("stdin is closed", "command", "cat; echo eof", expect_output="eof"),
    ]

    lines = _run_script(checks, tmp_path)
    results = guest_results(checks, lines)

    assert sum(1 for line in lines if RESULT_RE.search(line)) == len(checks)
    assert results == [
        CheckResult("command true", "command", True, "exit 0"),
        CheckResult("command exit 3", "command", False, "exit 3, expected 0"),
        CheckResult("command echo hello", "command", True, "exit 0: hello"),
        CheckResult("stderr", "command", True, "exit 2: oops"),
        CheckResult("missing output", "command", False, "output lacks 'goodbye': hello"),
        CheckResult("stdin is closed", "command", True, "exit 0: eof"),
    ]


def test_guest_script_keeps_hostile_check_text_intact(tmp_path: Path) -> None:
    # Quotes, $, backticks and ; in the check's text are the check's business, not the script's.
    marker = tmp_path / "pwned"
    tricky = "printf '%s\\n' \"it's\" '$HOME' '`x`' 'a;b'"
    checks = [
        GuestCheck("tricky", "command", tricky, expect_output="it's\n$HOME\n`x`\na;b"),
        GuestCheck("quote break", "command", f"echo '\"; touch {marker}; echo \"'"),
    ]

    results = guest_results(checks, _run_script(checks, tmp_path))

    assert results[0].passed, results[0].detail
    assert results[1].passed
    assert results[1].detail == f'exit 0: "; touch {marker}; echo "'
    assert not marker.exists()


def test_guest_script_caps_the_output_it_sends_back(tmp_path: Path) -> None:
    checks = [GuestCheck("chatty", "command", "yes 0123456789 | head -n 2000; echo THE-END", expect_output="")]
    lines = _run_script(checks, tmp_path)
    match = next(m for m in map(RESULT_RE.search, lines) if m)
    assert len(base64.b64decode(match.group(3))) == 4000
    results = guest_results(checks, lines)
    assert results[0].passed
    assert "THE-END" not in results[0].detail
    assert len(results[0].detail) <= len("exit 0: ") + 300


# --- host-side port checks ----------------------------------------------------------------------------------


@pytest.fixture(autouse=True)
def quick_retries(monkeypatch: pytest.MonkeyPatch) -> None:
    """The port checks retry every 0.5 s; poll every 0.05 s here so the deadline tests stay fast. The retry
    logic itself (deadline, last error) is unchanged."""
    real_sleep = time.sleep
    shim = types.SimpleNamespace(monotonic=time.monotonic, sleep=lambda s: real_sleep(min(s, 0.05)))
    monkeypatch.setattr(qemu, "time", shim)


class _Handler(http.server.BaseHTTPRequestHandler):
    def do_GET(self) -> None:
        status, body = {"/": (200, b"<h1>web tier</h1>"), "/health": (204, b"")}.get(self.path, (404, b"not here"))
        self.send_response(status)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if body:
            self.wfile.write(body)

    def log_message(self, format: str, *args: object) -> None:
        pass


def _serve(server: http.server.ThreadingHTTPServer) -> Generator[int, None, None]:
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    try:
        yield server.server_address[1]
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=5)


@pytest.fixture(scope="module")
def web() -> Iterator[int]:
    yield from _serve(http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Handler))


def test_http_check_passes_on_status_and_body(web: int) -> None:
    ok, detail = http_check(web, "/", 200, "web tier", time.monotonic() + 5)
    assert (ok, detail) == (True, "status 200, 17 bytes")


def test_http_check_without_body_expectation(web: int) -> None:
    assert http_check(web, "/health", 204, None, time.monotonic() + 5) == (True, "status 204, 0 bytes")


def test_http_check_wrong_status_fails_at_once(web: int) -> None:
    started = time.monotonic()
    ok, detail = http_check(web, "/nope", 200, None, started + 30)
    assert (ok, detail) == (False, "status 404, expected 200")
    assert time.monotonic() - started < 5  # a real answer is final; no retrying until the deadline


def test_http_check_missing_body_substring_fails(web: int) -> None:
    ok, detail = http_check(web, "/", 200, "api tier", time.monotonic() + 5)
    assert (ok, detail) == (False, "body lacks 'api tier'")
    ok, detail = http_check(web, "/nope", 200, "api tier", time.monotonic() + 5)
    assert (ok, detail) == (False, "status 404, expected 200; body lacks 'api tier'")


def test_http_check_with_nothing_listening_fails_after_the_deadline() -> None:
    port = free_port()
    started = time.monotonic()
    ok, detail = http_check(port, "/", 200, None, started + 0.2)
    elapsed = time.monotonic() - started
    assert ok is False
    assert detail.startswith("no HTTP answer: ConnectionRefusedError")
    assert 0.2 <= elapsed < 3.0  # retried until the deadline, then gave up


def test_http_check_retries_until_the_service_starts_listening() -> None:
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Handler, bind_and_activate=False)
    server.server_bind()  # the port is ours but refuses connections until listen()
    port = server.server_address[1]
    timer = threading.Timer(0.25, server.server_activate)
    timer.start()
    try:
        gen = _serve(server)
        next(gen)
        ok, detail = http_check(port, "/", 200, "web tier", time.monotonic() + 5)
        assert (ok, detail) == (True, "status 200, 17 bytes")
    finally:
        timer.join()
        gen.close()


def test_tcp_check_open_port() -> None:
    # A listener that never says anything (like most servers before the client speaks) is open.
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen(4)
        port = listener.getsockname()[1]
        assert tcp_check(port, time.monotonic() + 5) == (True, "port open")


def test_tcp_check_closed_port_fails_after_the_deadline() -> None:
    port = free_port()
    started = time.monotonic()
    ok, detail = tcp_check(port, started + 0.2)
    assert ok is False
    assert detail.startswith("port closed: ConnectionRefusedError")
    assert 0.2 <= time.monotonic() - started < 3.0


def test_tcp_check_treats_accept_then_close_as_closed() -> None:
    # What slirp does when nothing listens in the guest: the host side connects, then gets EOF at once.
    listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    listener.bind(("127.0.0.1", 0))
    listener.listen(8)
    port = listener.getsockname()[1]
    stop = threading.Event()

    def accept_and_close() -> None:
        listener.settimeout(0.05)
        while not stop.is_set():
            try:
                conn, _ = listener.accept()
            except TimeoutError:
                continue
            conn.close()

    thread = threading.Thread(target=accept_and_close, daemon=True)
    thread.start()
    try:
        ok, detail = tcp_check(port, time.monotonic() + 0.2)
    finally:
        stop.set()
        thread.join(timeout=5)
        listener.close()
    assert (ok, detail) == (False, "port closed: ConnectionResetError: closed by the guest")
