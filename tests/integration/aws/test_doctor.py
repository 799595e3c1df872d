"""doctor --aws under moto: identity, regions, and a policy whose actions cover what the report itself calls."""

from __future__ import annotations

from collections import Counter

from moto import mock_aws

from amiforge.awsapi.clients import AwsSession
from amiforge.providers.aws.doctor import aws_report
from amiforge.providers.aws.iam import actions_for


def test_report_names_the_account_regions_and_a_policy_that_covers_its_own_calls() -> None:
    with mock_aws():
        session = AwsSession("eu-west-1")
        called: Counter[str] = Counter()
        for service in ("sts", "ec2"):
            client = session.client(service)
            client.meta.events.register(
                "before-call.*.*",
                lambda model, **_: called.update([f"{model.service_model.signing_name}:{model.name}"]),
            )
        report = aws_report(session)
    assert report.account.isdigit() and len(report.account) == 12
    assert report.arn.startswith("arn:aws:")
    assert report.region == "eu-west-1" and "eu-west-1" in report.regions and "us-east-1" in report.regions
    assert set(called) == {"sts:GetCallerIdentity", "ec2:DescribeRegions"}
    assert set(called) <= actions_for(["doctor"])
    statements = report.policy["Statement"]
    granted = {a for s in statements for a in ([s["Action"]] if isinstance(s["Action"], str) else s["Action"])}
    assert actions_for(["distribute", "publish", "sign-kms"]) <= granted
    assert report.policy["Version"] == "2012-10-17"
