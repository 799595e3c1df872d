"""The one way amiforge talks to AWS APIs, shared by the AWS provider and KMS signing: how clients are made
(retry mode, user agent, assumed roles, pagination, waits) and the one table that turns every AWS error into an
amiforge error. Only this package and `providers/aws` import boto3 (an import-linter contract in pyproject.toml)."""
