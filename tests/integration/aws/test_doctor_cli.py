"""`amiforge doctor --aws [--recipe FILE]` through the CLI, in-process under moto: each check one line with its fix,
the same checks in --json as one document, exit 5 when a check fails (the machine doctor's contract), the home region
and why it is that one, and the arguments refused before AWS is asked."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from conftest import ACCOUNT, REGION, Aws

from tests.cli_harness import Cli

DISABLED = "ap-east-1"


@pytest.fixture
def cli(aws: Aws, doctor_cli: Cli) -> Cli:
    """doctor's CLI under moto (conftest.doctor_cli), and the recipe's source image."""
    ec2 = aws.ec2(REGION)
    instance = ec2.run_instances(ImageId="ami-12345678", MinCount=1, MaxCount=1)["Instances"][0]["InstanceId"]
    ec2.create_image(InstanceId=instance, Name="debian-12-20240501")
    return doctor_cli


def recipe(tmp_path: Path, distribution: str = "{}") -> str:
    path = tmp_path / "recipe.yaml"
    path.write_text(
        "name: web\n"
        f"provider: {{type: aws, region: {REGION}, source: {{owners: ['{ACCOUNT}'], name: debian-12-*}}, "
        f"instance_profile: amiforge-builder, distribution: {distribution}}}\n"
    )
    return str(path)


def test_a_ready_account_exits_0_with_one_line_per_check(cli: Cli, tmp_path: Path) -> None:
    result = cli("doctor", "--aws", "--recipe", recipe(tmp_path))
    assert result.code == 0, result.out + result.err
    assert f"(account {ACCOUNT})" in result.out and "day-one checks (recipe web):" in result.out
    assert re.search(rf"^ok\s+region enabled {REGION}: bake region: enabled", result.out, re.M)
    assert re.search(
        rf"^ok\s+SSM reachability {REGION}: subnet subnet-\w+ routes to internet gateway", result.out, re.M
    )
    assert re.search(r"^skipped\s+public AMIs quota: the recipe does not share the image publicly$", result.out, re.M)


def test_a_failed_check_is_its_line_with_the_fix_and_exit_5(cli: Cli, tmp_path: Path) -> None:
    path = recipe(tmp_path, f"{{regions: [{{region: {DISABLED}}}]}}")
    result = cli("doctor", "--aws", "--recipe", path)
    assert result.code == 5
    line = next(line for line in result.out.splitlines() if line.startswith("fail"))
    assert line.startswith(f"fail    region enabled {DISABLED}: distribution region: an opt-in region")
    assert f"  fix: enable {DISABLED} in the account settings" in line
    assert f"skipped concurrent AMI copies {DISABLED}: {DISABLED} is not enabled for the account" in result.out
    assert f"error: 1 day-one check failed: region enabled ({DISABLED})" in result.err
    assert "Traceback" not in result.err


def test_json_is_one_document_with_every_check(cli: Cli, tmp_path: Path) -> None:
    path = recipe(tmp_path, f"{{regions: [{{region: {DISABLED}}}], public: true}}")
    result = cli("doctor", "--aws", "--recipe", path, "--json")
    assert result.code == 5
    doc = result.json()
    assert doc["ok"] is False and doc["error"]["exit_code"] == 5 and doc["account"] == ACCOUNT
    assert doc["region"] == REGION  # no --region: the recipe's region is the home region
    checks = {(c["name"], c["region"]): c for c in doc["checks"]}
    assert checks[("region enabled", DISABLED)]["status"] == "fail"
    assert checks[("image block public access", REGION)]["status"] == "fail"  # new accounts block public sharing
    assert checks[("image block public access", REGION)]["fix"] == (
        f"aws ec2 disable-image-block-public-access --region {REGION}"
    )
    assert set(checks[("public AMIs quota", REGION)]) == {"name", "status", "detail", "fix", "region"}


def test_without_a_recipe_the_home_region_is_checked(cli: Cli) -> None:
    doc = cli("doctor", "--aws", "--region", REGION, "--json").json()
    assert doc["ok"] is True and doc["region"] == REGION and doc["region_from"] == "asked for (--region)"
    assert {c["status"] for c in doc["checks"] if c["region"] is None} == {"skipped"}


def test_without_region_or_recipe_the_configured_region_then_us_east_1(
    cli: Cli, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The AWS provider picks the home region, not the service layer, and says which it took."""
    result = cli("doctor", "--aws")  # conftest configures AWS_DEFAULT_REGION
    assert f"home region {REGION}, the AWS configuration's region; no --recipe" in result.out, result.out
    monkeypatch.delenv("AWS_DEFAULT_REGION")
    doc = cli("doctor", "--aws", "--json").json()
    assert doc["region"] == "us-east-1" and doc["region_from"] == "no region configured, so us-east-1"


@pytest.mark.parametrize(
    ("argv", "fragment"),
    [
        (("doctor", "--recipe", "recipe.yaml"), "--recipe goes with --aws"),
        (("doctor", "--aws", "--recipe", "local.yaml"), "doctor --aws checks aws recipes"),
        (("doctor", "--aws", "--recipe", "missing.yaml"), "missing.yaml"),
    ],
)
def test_arguments_are_refused_before_aws_is_asked(
    cli: Cli, tmp_path: Path, argv: tuple[str, ...], fragment: str
) -> None:
    recipe(tmp_path)
    (tmp_path / "local.yaml").write_text("name: web\nprovider: {type: local}\n")
    result = cli(*argv)
    assert result.code == 2 and fragment in result.err, result.err
