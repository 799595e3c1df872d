"""`amiforge doctor --aws`: who amiforge is on AWS, which regions it can use, and the least-privilege IAM policy
that every amiforge operation needs — printed from the declarations in iam.py, so it never drifts from the code."""

from __future__ import annotations

from amiforge.awsapi.clients import AwsSession, call
from amiforge.providers.aws.iam import OPERATIONS, policy_document
from amiforge.providers.interface import AccountReport


def aws_report(session: AwsSession, *, parameter_prefix: str = "/amiforge") -> AccountReport:
    """Credentials (STS GetCallerIdentity), enabled regions (EC2 DescribeRegions), and the IAM policy."""
    sts = session.client("sts")
    identity = call(sts, "GetCallerIdentity", "the caller")
    ec2 = session.client("ec2")
    regions = call(ec2, "DescribeRegions", "regions", AllRegions=False)
    names = tuple(sorted(r["RegionName"] for r in regions.get("Regions", [])))
    return AccountReport(
        account=str(identity["Account"]),
        arn=str(identity["Arn"]),
        region=session.region,
        regions=names,
        policy=policy_document(OPERATIONS, parameter_prefix=parameter_prefix),
    )
