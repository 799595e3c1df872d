"""The AWS provider: EC2, EBS, SSM, STS and KMS through boto3 (docs/architecture.md §1, §2).

Only this package and `signing/kms.py` import boto3. Its modules: `errors` (the one table from AWS error codes to
amiforge errors), `clients` (sessions, role assumption, clients with standard retries, calls, paging, waiting out
eventual consistency) and `images` (source image resolution, owner-pinned, and the inventory of managed images).
"""
