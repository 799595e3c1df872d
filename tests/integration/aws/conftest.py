"""Fixtures for the AWS provider under moto (in-process): fake credentials, no default AMI catalogue, moto with
paging and fast tag lookups emulated, an AwsSession whose boto3 session counts API calls, and the same with faults.

See moto_emulation.py for what is emulated and why, and /work/shared/notes/moto.md for what moto does.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import boto3
import pytest
from doctor_emulation import DoctorEmulation, internet_for_default_vpc
from moto import mock_aws
from moto_emulation import ApiCalls, FaultInjector, PagingEmulation, fast_tag_lookup, no_backoff

from amiforge.awsapi.clients import AwsSession
from tests.cli_harness import Cli, make_cli

REGION = "eu-west-1"
ACCOUNT = "123456789012"  # moto's default account


@pytest.fixture(autouse=True)
def aws_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """Fake credentials and region; no real AWS configuration can leak in; no 1,301 default AMIs per region."""
    for name, value in {
        "MOTO_EC2_LOAD_DEFAULT_AMIS": "false",
        "AWS_DEFAULT_REGION": REGION,
        "AWS_ACCESS_KEY_ID": "testing",
        "AWS_SECRET_ACCESS_KEY": "testing",
        "AWS_SESSION_TOKEN": "testing",
        "AWS_CONFIG_FILE": str(tmp_path / "no-config"),
        "AWS_SHARED_CREDENTIALS_FILE": str(tmp_path / "no-credentials"),
    }.items():
        monkeypatch.setenv(name, value)
    monkeypatch.delenv("AWS_PROFILE", raising=False)


@pytest.fixture
def paging(monkeypatch: pytest.MonkeyPatch) -> PagingEmulation:
    emulation = PagingEmulation()
    emulation.install(monkeypatch)
    return emulation


@pytest.fixture
def moto(monkeypatch: pytest.MonkeyPatch, paging: PagingEmulation) -> Iterator[PagingEmulation]:
    """moto for every AWS call, with EC2 paging emulated; yields the paging knob."""
    fast_tag_lookup(monkeypatch)
    with mock_aws():
        yield paging


@dataclass
class Aws:
    session: AwsSession
    calls: ApiCalls
    paging: PagingEmulation
    faults: FaultInjector | None = None

    def ec2(self, region: str = REGION) -> Any:
        """A boto3 EC2 client: untyped (boto3 ships no types), as AwsSession.client says."""
        return self.session.client("ec2", region)


def _aws(paging: PagingEmulation, faults: FaultInjector | None) -> Aws:
    boto = boto3.Session(region_name=REGION)
    calls = ApiCalls()
    calls.install(boto.events)
    if faults is not None:
        faults.install(boto.events)
    # Handlers are on the boto3 session before any client exists, so every client made from it carries them.
    return Aws(AwsSession(REGION, boto_session=boto, run_id="test", max_attempts=10), calls, paging, faults)


@pytest.fixture
def aws(moto: PagingEmulation) -> Aws:
    """An AwsSession on moto that counts API calls."""
    return _aws(moto, None)


@pytest.fixture
def faulty(moto: PagingEmulation, monkeypatch: pytest.MonkeyPatch) -> Aws:
    """The same, with 30 % of sends throttled (seeded) and NotFound for the first read of a just-created image.

    Backoff delays are zeroed so retries do not sleep; the retry path itself is botocore's own."""
    no_backoff(monkeypatch)
    return _aws(moto, FaultInjector(rate=0.3))


@pytest.fixture
def doctor_cli(
    aws: Aws, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> Iterator[Cli]:
    """The CLI with a private data dir and no AMIFORGE_* settings of the caller, under moto with doctor's emulations
    and the default VPC as AWS makes it (with its internet gateway)."""
    for name in list(os.environ):
        if name.startswith("AMIFORGE_"):
            monkeypatch.delenv(name)
    monkeypatch.setenv("AMIFORGE_DATA_DIR", str(tmp_path / "data"))
    monkeypatch.chdir(tmp_path)
    DoctorEmulation(monkeypatch)
    internet_for_default_vpc(aws.ec2(REGION))
    yield make_cli(monkeypatch, capsys)
    os.environ.pop("AMIFORGE_DEBUG", None)
