"""The AWS provider: EC2, EBS, SSM, STS and KMS through boto3 (docs/architecture.md §1, §2).

Only this package and `amiforge.awsapi` (clients with standard retries and logging, the one table from AWS error
codes to amiforge errors; KMS signing uses it too) import boto3. Here: `images` (source image resolution,
owner-pinned, and the inventory of managed images), `bake`, `snapshot` (scans read EBS snapshots), `distribute`,
`publish`, `fleet`/`asg_records`/`refresh` (Auto Scaling groups), `gc` and `iam` (the least-privilege policy).
"""
