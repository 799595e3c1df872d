"""Logging: where records go (-v, -vv, --log-file), what never goes there (secrets, other libraries' DEBUG output),
and that AWS calls are logged with their operation, region, request id, status and attempts.

AWS runs under moto in-process (no network). The worst case is set up on purpose: botocore's own loggers at DEBUG,
which log whole requests (signed headers, the session token, KMS messages) — none of it may reach the file.
"""

from __future__ import annotations

import base64
import hashlib
import json
import logging
import os
import stat
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import boto3
import pytest
from botocore.awsrequest import AWSResponse
from moto import mock_aws

from amiforge.awsapi.clients import AwsSession
from amiforge.cli import logs
from amiforge.errors import ConfigError
from amiforge.signing.kms import KmsSigner
from tests.cli_harness import Cli, isolate, make_cli

REGION = "eu-west-1"
OTHER_ACCOUNT = "111111111111"
SECRET_KEY = "secret-access-key-DO-NOT-LOG-7f3a"
SESSION_TOKEN = "session-token-DO-NOT-LOG-91c2"
KMS_MESSAGE = b"kms-message-DO-NOT-LOG-5d0e"


@pytest.fixture(autouse=True)
def _clean_logging() -> Iterator[None]:
    yield
    logs.end()
    for name in ("botocore", "boto3", "urllib3"):
        logging.getLogger(name).setLevel(logging.NOTSET)


@pytest.fixture
def aws_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    for name, value in {
        "MOTO_EC2_LOAD_DEFAULT_AMIS": "false",
        "AWS_DEFAULT_REGION": REGION,
        "AWS_ACCESS_KEY_ID": "AKIAAMIFORGETEST0001",
        "AWS_SECRET_ACCESS_KEY": SECRET_KEY,
        "AWS_SESSION_TOKEN": SESSION_TOKEN,
        "AWS_CONFIG_FILE": str(tmp_path / "no-config"),
        "AWS_SHARED_CREDENTIALS_FILE": str(tmp_path / "no-credentials"),
    }.items():
        monkeypatch.setenv(name, value)
    for name in ("AWS_PROFILE", "AWS_ENDPOINT_URL"):
        monkeypatch.delenv(name, raising=False)


class _Raw:
    """The body of an injected answer, as urllib3 would hand it to botocore."""

    def __init__(self, body: bytes) -> None:
        self._body = body

    def stream(self, **_: Any) -> Iterator[bytes]:
        yield self._body


def _throttle_first(events: Any, operation: str) -> None:
    """Answer the first `operation` request with a KMS throttling error (botocore then retries it)."""
    done: list[bool] = []

    def before_send(request: Any, event_name: str, **_: Any) -> AWSResponse | None:
        if done or not event_name.endswith("." + operation):
            return None
        done.append(True)
        body = json.dumps({"__type": "ThrottlingException", "message": "slow down"}).encode()
        request.url = "https://amiforge-injected-fault.invalid/"  # so moto leaves it alone (see moto_emulation.py)
        headers = {"Content-Type": "application/x-amz-json-1.1", "x-amzn-RequestId": "injected-request-id"}
        return AWSResponse(request.url, 400, headers, _Raw(body))

    events.register_first("before-send", before_send)


def test_aws_calls_are_logged_with_operation_region_request_id_and_attempts_but_never_a_secret(
    aws_env: None, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from botocore.retries import standard

    monkeypatch.setattr(standard.ExponentialBackoff, "delay_amount", lambda self, context: 0.0)
    log_file = tmp_path / "amiforge.log"
    logs.configure(2, log_file)
    # The worst case: botocore logging whole requests and responses at DEBUG. They must not reach the file.
    logging.getLogger("botocore").setLevel(logging.DEBUG)
    with mock_aws():
        boto = boto3.Session(region_name=REGION)
        _throttle_first(boto.events, "DescribeKey")
        session = AwsSession(
            REGION,
            boto_session=boto,
            role_arns={OTHER_ACCOUNT: f"arn:aws:iam::{OTHER_ACCOUNT}:role/amiforge"},
            run_id="log-test",
        )
        kms = session.client("kms")
        key = kms.create_key(KeySpec="ECC_NIST_P256", KeyUsage="SIGN_VERIFY")["KeyMetadata"]["Arn"]
        signer = KmsSigner(key, REGION, session=session)
        signer.sign(KMS_MESSAGE)
        # An assumed role: its credentials come from STS inside AwsSession, and its clients log too.
        ec2 = session.as_account(OTHER_ACCOUNT).client("ec2")
        ec2.describe_images(Owners=["self"])
        assumed = session._credentials[OTHER_ACCOUNT]
    logs.end()

    text = log_file.read_text()
    assert stat.S_IMODE(log_file.stat().st_mode) == 0o600
    for secret in (
        SECRET_KEY,
        SESSION_TOKEN,
        assumed.secret_key,
        assumed.token,
        KMS_MESSAGE.decode(),
        base64.b64encode(hashlib.sha256(KMS_MESSAGE).digest()).decode(),  # what Sign really sent: the digest
    ):
        assert secret not in text
    assert "botocore" not in text  # none of its DEBUG records

    lines = text.splitlines()
    sign = next(line for line in lines if " kms Sign " in line)
    assert f"{REGION}: HTTP 200" in sign and "1 attempt" in sign
    assert "request id -" not in sign and "request id " in sign
    retried = next(line for line in lines if "retrying" in line)
    assert "aws kms DescribeKey" in retried and "attempt 2 of 8" in retried and "ThrottlingException" in retried
    described = next(line for line in lines if " kms DescribeKey " in line and "HTTP 200" in line)
    assert "2 attempts" in described and " INFO " in described
    assert any(" sts AssumeRole " in line and "HTTP 200" in line for line in lines)
    assert any(f"aws ec2 DescribeImages {REGION} as {OTHER_ACCOUNT}: HTTP 200" in line for line in lines)
    # Timestamped (UTC) lines with the level and the logger.
    assert all(line[:4].isdigit() and "Z " in line[:30] for line in lines)


def test_an_aws_error_answer_is_logged_with_its_code(aws_env: None, tmp_path: Path) -> None:
    log_file = tmp_path / "amiforge.log"
    logs.configure(0, log_file)
    with mock_aws():
        ec2 = AwsSession(REGION).client("ec2")
        with pytest.raises(Exception, match="InvalidAMIID"):
            ec2.describe_images(ImageIds=["ami-12345678"])
    logs.end()
    line = next(line for line in log_file.read_text().splitlines() if "DescribeImages" in line)
    assert f"aws ec2 DescribeImages {REGION}: HTTP 400 InvalidAMIID.NotFound, request id " in line


def test_levels_default_warnings_v_info_vv_debug(capsys: pytest.CaptureFixture[str]) -> None:
    log = logging.getLogger("amiforge.test")
    for verbosity, shown in ((0, {"warning"}), (1, {"warning", "info"}), (2, {"warning", "info", "debug"})):
        logs.configure(verbosity)
        capsys.readouterr()
        log.debug("d-line")
        log.info("i-line")
        log.warning("w-line")
        out, err = capsys.readouterr()
        assert out == ""
        seen = {level for level in ("debug", "info", "warning") if f"{level[0]}-line" in err}
        assert seen == shown, verbosity
    logs.configure(1)
    capsys.readouterr()
    log.info("plain")
    assert capsys.readouterr().err == "info: plain\n"


def test_other_libraries_only_at_warning_and_file_only_records_stay_off_the_terminal(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    log_file = tmp_path / "x.log"
    logs.configure(2, log_file)
    other = logging.getLogger("somelib")
    other.setLevel(logging.DEBUG)
    other.debug("library debug")
    other.warning("library warning")
    logging.getLogger("amiforge.test").error("traceback here", extra={logs.FILE_ONLY: True})
    logs.end()
    err = capsys.readouterr().err
    text = log_file.read_text()
    assert "library debug" not in err + text
    assert "library warning" in err and "library warning" in text
    assert "traceback here" in text and "traceback here" not in err
    other.setLevel(logging.NOTSET)


def test_redaction_of_what_a_message_might_quote() -> None:
    assert "s3cret" not in logs.redact("postgresql+psycopg://amiforge:s3cret@db.internal/amiforge")
    assert "abcdefghijkl" not in logs.redact('curl -H "Authorization: Bearer abcdefghijkl"')
    assert "hunter2" not in logs.redact("password=hunter2")
    assert "wJalrXUtnFEMI" not in logs.redact("key wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY here")
    # Digests, ids and paths are what logs are for: left alone.
    for kept in ("sha256 " + "ab" * 32, "da39a3ee5e6b4b0d3255bfef95601890afd80709", "/home/User/projects/amiforge/x"):
        assert logs.redact(kept) == kept


@pytest.mark.parametrize(
    ("text", "secret"),
    [
        ("Authorization: Basic dXNlcjpwYXNzd29yZA==", "dXNlcjpwYXNzd29yZA"),
        ("authorization=AWS4-HMAC-SHA256 Credential=TEST0001/20261206", "TEST0001"),
        ("export SECRET=TESTwJalrXUtnFEMIK7MDENGbPxRfiCYEXAMPLEKE", "TESTwJalr"),
        ("aws_secret_key=TESTwJalrXUtnFEMIK7MDENGbPxRfiCYEXAMPLEKE", "TESTwJalr"),
        ("store postgresql+psycopg://amiforge:pa/ss:w@rd@db.internal:5432/amiforge", "pa/ss"),
        (
            "-----BEGIN OPENSSH PRIVATE KEY-----\nTESTb3BlbnNzaC1rZXktdjEAAAA\n-----END OPENSSH PRIVATE KEY-----",
            "TESTb3Blbn",
        ),
        ("token: TEST-0001-tok", "TEST-0001-tok"),
        ('{"api_key": "TEST-0001-key"}', "TEST-0001-key"),
        ("DB_PASS=TEST-hunter2", "TEST-hunter2"),
        ("client_secret: TEST-0001-cs", "TEST-0001-cs"),
    ],
)
def test_redaction_table(text: str, secret: str) -> None:
    assert secret not in logs.redact(text)
    assert logs.REDACTED in logs.redact(text)


def test_what_logs_are_for_is_not_redacted() -> None:
    for kept in (
        "rollout 3 wave 2: token r3-w1-0 replaces g-12345678",
        "ami-0000000000test01 in eu-west-1",
        "arn:aws:iam::123456789012:role/amiforge",
        "postgresql+psycopg://amiforge@db.internal:5432/amiforge",
    ):
        assert logs.redact(kept) == kept  # a bare word "token" is not a key, a URL without a password has none


def test_a_log_file_is_never_reached_through_a_symlink(tmp_path: Path) -> None:
    target = tmp_path / "elsewhere.log"
    target.write_text("")
    link = tmp_path / "run.log"
    link.symlink_to(target)
    with pytest.raises(ConfigError, match="symbolic link"):
        logs.open_log_file(link)
    assert target.read_text() == ""


def test_an_existing_log_file_of_ours_becomes_0600(tmp_path: Path) -> None:
    path = tmp_path / "run.log"
    path.write_text("earlier\n")
    path.chmod(0o644)
    logs.open_log_file(path).close()
    assert path.stat().st_mode & 0o777 == 0o600
    assert path.read_text() == "earlier\n"  # appended to, never truncated


# --- from the command line -----------------------------------------------------------------------------------


@pytest.fixture
def cli(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> Cli:
    isolate(tmp_path, monkeypatch)
    return make_cli(monkeypatch, capsys)


def test_v_and_log_file_work_on_the_root_and_on_the_command_and_json_stays_one_document(
    cli: Cli, tmp_path: Path
) -> None:
    log_file = tmp_path / "run.log"
    for argv in (
        ("-vv", "--log-file", str(log_file), "keys", "list", "--json"),
        ("keys", "list", "--json", "-v", "-v", "--log-file", str(log_file)),
        ("keys", "-vv", "list", "--json", f"--log-file={log_file}"),
    ):
        result = cli(*argv)
        assert result.code == 0, result
        assert json.loads(result.out) == []  # stdout: exactly one JSON document, no log line
        assert "debug [amiforge." in result.err  # -vv: DEBUG on stderr
    text = log_file.read_text()
    assert stat.S_IMODE(log_file.stat().st_mode) == 0o600
    assert text.count("amiforge keys list") == 3 and "exit code 0" in text


def test_the_log_file_gets_debug_without_v_and_the_terminal_stays_quiet(cli: Cli, tmp_path: Path) -> None:
    log_file = tmp_path / "run.log"
    result = cli("images", "list", "--json", "--log-file", str(log_file))
    assert result.code == 0 and json.loads(result.out) == [] and result.err == ""
    assert " DEBUG " in log_file.read_text()


def test_a_failure_goes_into_the_log_file_with_its_traceback(cli: Cli, tmp_path: Path) -> None:
    log_file = tmp_path / "run.log"
    result = cli("images", "show", "nosuch@1", "--log-file", str(log_file))
    assert result.code == 3
    assert "Traceback" not in result.err
    text = log_file.read_text()
    assert "ERROR" in text and "NotFound" in text and "Traceback" in text


@pytest.mark.parametrize("where", ["missing-dir/x.log", "a-dir", "fifo", ""])
def test_a_bad_log_file_is_a_clear_error_not_a_traceback(cli: Cli, tmp_path: Path, where: str) -> None:
    (tmp_path / "a-dir").mkdir()
    os.mkfifo(tmp_path / "fifo")
    path = str(tmp_path / where) if where else ""
    result = cli("keys", "list", "--log-file", path)
    assert result.code == 2, result
    assert "--log-file" in result.err and "fix:" in result.err and "Traceback" not in result.err
    as_json = cli("--log-file", path, "keys", "list", "--json")
    assert as_json.code == 2
    error = json.loads(as_json.out)
    assert error["error"] == "config" and "--log-file" in error["message"] and error["fix"]


def test_a_real_process_keeps_logs_off_stdout(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("AMIFORGE_", "AWS_"))}
    env["AMIFORGE_DATA_DIR"] = str(tmp_path / "data")
    log_file = tmp_path / "p.log"
    run = subprocess.run(
        [sys.executable, "-m", "amiforge", "-vv", "images", "list", "--json", "--log-file", str(log_file)],
        capture_output=True,
        text=True,
        env=env,
        cwd=tmp_path,
        timeout=120,
        check=False,
    )
    assert run.returncode == 0, run.stderr
    assert json.loads(run.stdout) == []
    assert "debug [amiforge" in run.stderr
    assert "exit code 0" in log_file.read_text()


def test_a_runs_phases_are_logged_at_info_but_never_a_shell_steps_script(tmp_path: Path) -> None:
    from typing import cast

    from amiforge.lifecycle.runs import run_context
    from amiforge.providers.interface import PhaseUpdate
    from amiforge.store.interface import Store

    log_file = tmp_path / "run.log"
    logs.configure(1, log_file)
    seen: list[PhaseUpdate] = []
    # No leftovers, so the store is never asked for anything.
    with run_context(cast(Store, None), actor="t", ref="web@1", progress=seen.append, log=lambda _l: None) as ctx:
        ctx.progress(PhaseUpdate("layer 3: shell: export TOKEN=abc123-DO-NOT-LOG", "start", "miss"))
        ctx.phase_done("layer 3: shell: export TOKEN=abc123-DO-NOT-LOG", 1.25, "miss")
        ctx.cleanup.callback(lambda: None)
    logs.end()
    text = log_file.read_text()
    assert len(seen) == 2 and "TOKEN" in seen[0].name  # the progress display still gets the real name
    assert "DO-NOT-LOG" not in text
    assert "(web@1): layer 3: shell step done: miss (1.2s)" in text
    assert "started" in text and "cleanup: removing" in text
