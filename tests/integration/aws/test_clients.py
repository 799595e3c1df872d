"""AwsSession, call() and paginate() on moto: retry configuration, user agent, assumed roles, page sizes."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from conftest import REGION, Aws

from amiforge import __version__
from amiforge.awsapi.clients import AwsSession, call, paginate
from amiforge.errors import ConfigError, NotFound
from amiforge.providers.aws.provider import AwsProvider
from amiforge.settings import Settings
from amiforge.signing.kms import session_for

OTHER = "210987654321"


def test_clients_use_standard_retries_and_our_user_agent(aws: Aws) -> None:
    ec2: Any = aws.ec2()
    assert ec2.meta.config.retries == {"mode": "standard", "total_max_attempts": 10}
    assert f"amiforge/{__version__}" in ec2.meta.config.user_agent_extra
    assert aws.session.client("ec2") is ec2  # one client per (service, region, account)
    assert aws.session.client("ec2", "us-east-1") is not ec2


def test_call_translates_and_names_the_iam_action(aws: Aws) -> None:
    with pytest.raises(NotFound, match="ec2:DescribeImages on ami-0123456789abcdef0") as caught:
        call(aws.ec2(), "DescribeImages", "ami-0123456789abcdef0", ImageIds=["ami-0123456789abcdef0"])
    assert caught.value.__cause__ is not None  # raised from the botocore error


def test_assumed_role_acts_as_the_other_account(aws: Aws) -> None:
    arn = f"arn:aws:iam::{OTHER}:role/amiforge"
    session = AwsSession(REGION, role_arns={OTHER: arn}, run_id="run 42/x", boto_session=aws.session.boto_session)
    assert session.role_session_name == "amiforge-run-42-x"
    sts = session.client("sts", account=OTHER)
    identity = call(sts, "GetCallerIdentity", "caller")
    assert identity["Account"] == OTHER and "amiforge-run-42-x" in identity["Arn"]
    assert session.client("sts", account=OTHER) is sts  # credentials still fresh: same client
    with pytest.raises(ConfigError, match="no role"):
        session.client("ec2", account="999999999999")
    with pytest.raises(ConfigError, match="not an IAM role ARN"):
        AwsSession(REGION, role_arns={OTHER: "arn:aws:iam::111111111111:role/x"})


def test_paginate_clamps_page_size_to_the_operation(aws: Aws) -> None:
    ssm = aws.session.client("ssm")
    for i in range(23):
        ssm.put_parameter(Name=f"/amiforge/p{i:02}", Value="v", Type="String")
    aws.calls.reset()
    names = [p["Name"] for p in paginate(ssm, "GetParametersByPath", "Parameters", "/amiforge", Path="/amiforge")]
    assert sorted(names) == [f"/amiforge/p{i:02}" for i in range(23)]
    assert aws.calls["ssm.GetParametersByPath"] == 3  # SSM pages hold at most 10, not 1000


def test_paginate_translates_errors(aws: Aws) -> None:
    with pytest.raises(ConfigError, match="ec2:DescribeImages"):
        list(paginate(aws.ec2(), "DescribeImages", "Images", "images", Owners=["self"], MaxResults=0, page_size=None))


def test_sessions_from_the_settings(aws: Aws, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The settings' profile, roles and attempts per call make the session, the same for the AWS provider and for
    KMS signing (both are made by AwsSession.from_settings)."""
    config = tmp_path / "aws-config"
    config.write_text("[profile amiforge-test]\naws_access_key_id = AKIAPROFILE00000TEST\naws_secret_access_key = x\n")
    monkeypatch.setenv("AWS_CONFIG_FILE", str(config))
    arn = f"arn:aws:iam::{OTHER}:role/amiforge"
    settings = Settings(data_dir=tmp_path, aws_profile="amiforge-test", aws_roles={OTHER: arn}, aws_max_attempts=4)
    made = {
        "from_settings": AwsSession.from_settings(settings, "us-east-1"),
        "provider": AwsProvider(settings).session("us-east-1"),
        "kms signing": session_for(settings, "us-east-1"),
    }
    for how, session in made.items():
        assert session.region == "us-east-1", how
        assert session.boto_session.profile_name == "amiforge-test", how
        assert session.client("ec2").meta.config.retries == {"mode": "standard", "total_max_attempts": 4}, how
        assert session.as_account(OTHER).client("sts") is not None, how  # the role is known (assumed on first use)
        with pytest.raises(ConfigError, match="no role"):
            session.as_account("999999999999")
