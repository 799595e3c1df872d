"""`amiforge doctor --aws`: who amiforge is on AWS, which regions it can use, and the least-privilege IAM policy
that every amiforge operation needs — printed from the declarations in iam.py, so it never drifts from the code."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from amiforge.awsapi.clients import AwsSession, call
from amiforge.providers.aws.iam import OPERATIONS, policy_document


@dataclass(frozen=True)
class AwsReport:
    account: str
    arn: str
    region: str
    regions: tuple[str, ...]  # enabled for this account
    policy: dict[str, Any]


def aws_report(session: AwsSession, *, parameter_prefix: str = "/amiforge") -> AwsReport:
    """Credentials (STS GetCallerIdentity), enabled regions (EC2 DescribeRegions), and the IAM policy."""
    sts = session.client("sts")
    identity = call(sts, "GetCallerIdentity", "the caller")
    ec2 = session.client("ec2")
    regions = call(ec2, "DescribeRegions", "regions", AllRegions=False)
    names = tuple(sorted(r["RegionName"] for r in regions.get("Regions", [])))
    return AwsReport(
        account=str(identity["Account"]),
        arn=str(identity["Arn"]),
        region=session.region,
        regions=names,
        policy=policy_document(OPERATIONS, parameter_prefix=parameter_prefix),
    )
