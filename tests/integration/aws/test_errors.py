"""The one table from AWS error codes to amiforge errors (awsapi/errors.py)."""

from __future__ import annotations

import pytest
from botocore.exceptions import ClientError, EndpointConnectionError, NoCredentialsError, ParamValidationError
from conftest import Aws

from amiforge.awsapi.clients import call
from amiforge.awsapi.errors import AWS_ERRORS, rule_for, translate
from amiforge.errors import AmiforgeError, ConfigError, InfraError, NotFound, PartlyDone, StateError
from amiforge.providers.aws.ssh import new_key_pair


def _client_error(code: str, message: str = "whatever AWS says") -> ClientError:
    return ClientError({"Error": {"Code": code, "Message": message}}, "DescribeImages")


@pytest.mark.parametrize(
    ("code", "family", "exit_code", "retryable"),
    [
        ("InvalidAMIID.NotFound", NotFound, 3, None),
        ("InvalidAMIID.Unavailable", NotFound, 3, None),
        ("InvalidSnapshot.NotFound", NotFound, 3, None),
        ("InvalidInstanceID.NotFound", NotFound, 3, None),
        ("ParameterNotFound", NotFound, 3, None),
        ("NotFoundException", NotFound, 3, None),
        ("UnauthorizedOperation", ConfigError, 2, None),
        ("AccessDenied", ConfigError, 2, None),
        ("AccessDeniedException", ConfigError, 2, None),
        ("InvalidParameterValue", ConfigError, 2, None),
        ("InvalidAMIID.Malformed", ConfigError, 2, None),
        ("DisabledException", ConfigError, 2, None),
        ("InvalidAMIName.Duplicate", StateError, 3, None),
        ("InvalidKeyPair.Duplicate", StateError, 3, None),
        ("InvalidKeyPair.NotFound", NotFound, 3, None),
        ("RequestLimitExceeded", InfraError, 5, True),
        ("Throttling", InfraError, 5, True),
        ("ThrottlingException", InfraError, 5, True),
        ("ServiceUnavailable", InfraError, 5, True),
        ("InternalError", InfraError, 5, True),
        ("KMSInternalException", InfraError, 5, True),
        ("ResourceLimitExceeded", InfraError, 5, False),
        ("SomethingAwsInventedTomorrow", InfraError, 5, False),
    ],
)
def test_codes_map_to_families(code: str, family: type[AmiforgeError], exit_code: int, retryable: bool | None) -> None:
    error = translate(_client_error(code), "ec2:DescribeImages", "image ami-1")
    assert type(error) is family
    assert error.exit_code == exit_code
    assert code in error.message and "ec2:DescribeImages" in error.message and "ami-1" in error.message
    if retryable is not None:
        assert isinstance(error, InfraError) and error.retryable is retryable


def test_unknown_code_is_named_and_not_retryable() -> None:
    error = translate(_client_error("Brand.NewCode"), "ec2:CreateImage", "instance i-1")
    assert isinstance(error, InfraError) and not error.retryable
    assert "Brand.NewCode" in error.message and error.fix and "Brand.NewCode" in error.fix


def test_permission_errors_name_the_iam_action() -> None:
    for code in ("UnauthorizedOperation", "AccessDenied", "AccessDeniedException"):
        error = translate(_client_error(code), "ec2:DescribeImages", "images")
        assert error.fix is not None and "ec2:DescribeImages" in error.fix


def test_message_text_never_decides() -> None:
    """The same code with any message maps the same; a scary message with an unknown code stays unknown."""
    a = translate(_client_error("InvalidAMIID.NotFound", "throttled? access denied?"), "ec2:X", "r")
    b = translate(_client_error("Weird", "InvalidAMIID.NotFound RequestLimitExceeded AccessDenied"), "ec2:X", "r")
    assert isinstance(a, NotFound)
    assert type(b) is InfraError and not b.retryable


def test_exact_codes_win_over_wildcards_and_order_holds() -> None:
    assert rule_for("InvalidAMIID.Unavailable") is AWS_ERRORS["InvalidAMIID.Unavailable"]
    assert rule_for("InvalidAMIID.Malformed") is AWS_ERRORS["InvalidAMIID.Malformed"]
    assert rule_for("InvalidVpcID.NotFound") is AWS_ERRORS["*.NotFound"]
    assert rule_for("AccessDeniedForDependency") is AWS_ERRORS["AccessDenied*"]
    assert rule_for("accessdenied") is None  # codes are case-sensitive
    assert rule_for("") is None


def test_botocore_errors() -> None:
    creds = translate(NoCredentialsError(), "ec2:DescribeImages", "images")
    assert isinstance(creds, ConfigError)
    network = translate(EndpointConnectionError(endpoint_url="https://ec2"), "ec2:DescribeImages", "images")
    assert isinstance(network, InfraError) and network.retryable
    other = translate(ParamValidationError(report="bad"), "ec2:DescribeImages", "images")
    assert isinstance(other, InfraError) and not other.retryable and "ParamValidationError" in other.message


def test_every_rule_builds_an_error() -> None:
    for code in AWS_ERRORS:
        error = translate(_client_error(code.replace("*", "X")), "ec2:Op", "r")
        assert isinstance(error, AmiforgeError) and error.fix


def test_key_pair_codes_as_ec2_answers_them(aws: Aws) -> None:
    """The SSH communicator's key pair calls: importing a name twice, describing a name that is not there (moto
    answers EC2's codes). Each has its own row, whose fix is about key pairs, not the generic wildcard's."""
    ec2 = aws.ec2()
    key = new_key_pair("amiforge-run-1-builder")[1].encode()
    call(ec2, "ImportKeyPair", "amiforge-run-1-builder", KeyName="amiforge-run-1-builder", PublicKeyMaterial=key)
    with pytest.raises(StateError) as duplicate:
        call(ec2, "ImportKeyPair", "amiforge-run-1-builder", KeyName="amiforge-run-1-builder", PublicKeyMaterial=key)
    assert "InvalidKeyPair.Duplicate" in duplicate.value.message and "ec2:ImportKeyPair" in duplicate.value.message
    assert duplicate.value.fix is not None and "delete-key-pair" in duplicate.value.fix
    with pytest.raises(NotFound) as missing:
        call(ec2, "DescribeKeyPairs", "amiforge-run-2-builder", KeyNames=["amiforge-run-2-builder"])
    assert "InvalidKeyPair.NotFound" in missing.value.message
    assert rule_for("InvalidKeyPair.NotFound") is AWS_ERRORS["InvalidKeyPair.NotFound"] is not AWS_ERRORS["*.NotFound"]
    assert missing.value.fix is not None and "key pair" in missing.value.fix


def test_partly_done_is_reported_as_the_failure_it_carries() -> None:
    """A caller that does not unwrap PartlyDone (only promote records its `done`) still reports the failure itself."""
    failure = NotFound("launch template web-fleet does not exist in us-east-1", fix="create it")
    wrapped = PartlyDone(failure, [{"region": "eu-west-1", "image_id": "ami-0000000000test01"}])
    assert (wrapped.exit_code, wrapped.http_status, wrapped.kind) == (3, 404, "not_found")
    assert wrapped.diagnostics() == failure.diagnostics() and wrapped.as_dict() == failure.as_dict()
    assert wrapped.error is failure and wrapped.done == ({"region": "eu-west-1", "image_id": "ami-0000000000test01"},)
