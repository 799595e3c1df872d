"""`amiforge doctor --aws --pass-role ARN --kms-key ARN`: the printed policy passes only those roles to EC2 and signs
only with those keys; without them the policy stays open there, and the output says so with the option that narrows
it (a warn line, and `policy_notes` in --json). Malformed ARNs are refused before AWS is asked."""

from __future__ import annotations

from typing import Any

import pytest
from conftest import REGION

from amiforge.providers.aws import doctor as aws_doctor
from tests.cli_harness import Cli

ROLE = "arn:aws:iam::111111111111:role/amiforge-builder"
KEY = f"arn:aws:kms:{REGION}:111111111111:key/00000000-0000-0000-0000-00000000test"


@pytest.fixture
def cli(doctor_cli: Cli) -> Cli:
    return doctor_cli


def _granting(doc: dict[str, Any], action: str) -> list[dict[str, Any]]:
    return [s for s in doc["policy"]["Statement"] if action in s["Action"]]


def test_roles_and_keys_given_narrow_the_policy(cli: Cli) -> None:
    doc = cli("doctor", "--aws", "--region", REGION, "--pass-role", ROLE, "--kms-key", KEY, "--json").json()
    assert doc["ok"] is True
    (passing,) = _granting(doc, "iam:PassRole")
    assert passing["Resource"] == [ROLE]
    (signing,) = _granting(doc, "kms:Sign")
    assert signing["Resource"] == [KEY]
    assert doc["policy_notes"] == []


def test_without_them_the_output_says_what_stays_open_and_how_to_narrow_it(cli: Cli) -> None:
    result = cli("doctor", "--aws", "--region", REGION)
    assert result.code == 0, result.out + result.err
    lines = [line for line in result.out.splitlines() if line.startswith("warn    IAM policy:")]
    assert len(lines) == 2
    assert "iam:PassRole is allowed for any role" in lines[0] and "fix: " in lines[0] and "--pass-role" in lines[0]
    assert "any KMS key" in lines[1] and "--kms-key" in lines[1]
    notes = cli("doctor", "--aws", "--region", REGION, "--json").json()["policy_notes"]
    assert [n["status"] for n in notes] == ["warn", "warn"]
    (passing,) = _granting(cli("doctor", "--aws", "--region", REGION, "--json").json(), "iam:PassRole")
    assert passing["Resource"] == "*"


@pytest.mark.parametrize(
    ("argv", "fragment"),
    [
        (("doctor", "--aws", "--pass-role", "amiforge-builder"), "is not an IAM role ARN"),
        (("doctor", "--aws", "--kms-key", "alias/amiforge-signing"), "is not a KMS key ARN"),
        (("doctor", "--pass-role", ROLE), "--pass-role and --kms-key go with --aws"),
    ],
)
def test_malformed_or_misplaced_arns_are_refused(
    cli: Cli, monkeypatch: pytest.MonkeyPatch, argv: tuple[str, ...], fragment: str
) -> None:
    def asked(*_: Any) -> None:
        raise AssertionError("AWS was asked before the arguments were checked")

    monkeypatch.setattr(aws_doctor, "_identity", asked)
    result = cli(*argv)
    assert result.code == 2 and fragment in result.err, result.err
