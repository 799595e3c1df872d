"""The stand-in for IAM's policy evaluation refuses what IAM refuses: a request no statement's action, resource or
condition admits, a condition key the request lacks, a tag key a ForAllValues list forbids — and it refuses to guess
about policy grammar it does not model."""

from __future__ import annotations

from typing import Any

import pytest
from iam_evaluation import ContextValue, Request, UnknownPolicyGrammar, refusal

MANAGED = {"StringEquals": {"aws:ResourceTag/amiforge:managed": "true"}}
IMAGE = "arn:aws:ec2:eu-west-1::image/ami-0000000000test01"


def policy(*statements: dict[str, Any]) -> dict[str, Any]:
    return {"Version": "2012-10-17", "Statement": list(statements)}


def allow(action: str | list[str], resource: str | list[str] = "*", condition: Any = None) -> dict[str, Any]:
    statement: dict[str, Any] = {"Sid": "S", "Effect": "Allow", "Action": action, "Resource": resource}
    if condition is not None:
        statement["Condition"] = condition
    return statement


def test_the_action_must_be_granted() -> None:
    doc = policy(allow(["ec2:DescribeImages"]))
    assert refusal(doc, Request("ec2:DescribeImages", "*")) is None
    assert refusal(doc, Request("ec2:describeimages", "*")) is None  # action names are case-insensitive
    assert refusal(doc, Request("ec2:DeregisterImage", IMAGE)) == "no statement grants ec2:DeregisterImage"


def test_a_resource_tag_condition_needs_the_tag_with_its_value() -> None:
    doc = policy(allow("ec2:DeregisterImage", condition=MANAGED))
    assert refusal(doc, Request("ec2:DeregisterImage", IMAGE, {"aws:ResourceTag/amiforge:managed": "true"})) is None
    assert refusal(doc, Request("ec2:DeregisterImage", IMAGE, {"aws:ResourceTag/amiforge:managed": "TRUE"}))
    assert refusal(doc, Request("ec2:DeregisterImage", IMAGE, {})) is not None  # untagged: the key is missing
    # Condition key names are case-insensitive.
    assert refusal(doc, Request("ec2:DeregisterImage", IMAGE, {"aws:resourcetag/amiforge:managed": "true"})) is None


def test_resources_match_segment_by_segment_with_wildcards() -> None:
    doc = policy(allow("ssm:SendCommand", ["arn:aws:ssm:*::document/AWS-RunShellScript"]))
    ok = "arn:aws:ssm:eu-west-1::document/AWS-RunShellScript"
    assert refusal(doc, Request("ssm:SendCommand", ok)) is None
    assert refusal(doc, Request("ssm:SendCommand", "arn:aws:ssm:eu-west-1::document/AWS-RunPowerShellScript"))
    assert refusal(doc, Request("ssm:SendCommand", "arn:aws:ssm:eu-west-1:111111111111:document/AWS-RunShellScript"))
    assert refusal(doc, Request("ssm:SendCommand", "*")) is not None  # an unknown resource is not "*"


def test_every_operator_and_key_must_hold_any_value_may_match() -> None:
    grants = {"Bool": {"kms:GrantIsForAWSResource": True}, "StringLike": {"kms:ViaService": "ec2.*.amazonaws.com"}}
    doc = policy(allow("kms:CreateGrant", condition=grants))
    via_ec2: dict[str, ContextValue] = {
        "kms:ViaService": "ec2.eu-west-1.amazonaws.com",
        "kms:GrantIsForAWSResource": True,
    }
    assert refusal(doc, Request("kms:CreateGrant", "*", via_ec2)) is None
    assert refusal(doc, Request("kms:CreateGrant", "*", {**via_ec2, "kms:GrantIsForAWSResource": False}))
    assert refusal(doc, Request("kms:CreateGrant", "*", {**via_ec2, "kms:ViaService": "ebs.eu-west-1.amazonaws.com"}))
    assert refusal(doc, Request("kms:CreateGrant", "*", {"kms:GrantIsForAWSResource": True}))  # called directly
    create = policy(allow("ec2:CreateTags", condition={"StringEquals": {"ec2:CreateAction": ["RunInstances", "X"]}}))
    assert refusal(create, Request("ec2:CreateTags", "*", {"ec2:CreateAction": "RunInstances"})) is None
    assert refusal(create, Request("ec2:CreateTags", IMAGE, {})) is not None  # tagging an existing resource


def test_a_negated_operator_holds_when_the_key_is_missing() -> None:
    """IAM User Guide, "Condition operators": a key absent from the request context matches nothing, so StringEquals
    on it is false and StringNotEquals (the key must *not* match) is true."""
    not_x = policy(allow("ec2:RunInstances", condition={"StringNotEquals": {"aws:ResourceTag/team": "x"}}))
    assert refusal(not_x, Request("ec2:RunInstances", "*", {})) is None
    assert refusal(not_x, Request("ec2:RunInstances", "*", {"aws:ResourceTag/team": "y"})) is None
    assert refusal(not_x, Request("ec2:RunInstances", "*", {"aws:ResourceTag/team": "x"})) is not None
    is_x = policy(allow("ec2:RunInstances", condition={"StringEquals": {"aws:ResourceTag/team": "x"}}))
    assert refusal(is_x, Request("ec2:RunInstances", "*", {})) is not None


def test_for_all_values_over_the_request_tag_keys() -> None:
    others = policy(allow("ec2:CreateTags", condition={"ForAllValues:StringNotEquals": {"aws:TagKeys": ["m"]}}))
    assert refusal(others, Request("ec2:CreateTags", "*", {"aws:TagKeys": ["a", "b"]})) is None
    assert refusal(others, Request("ec2:CreateTags", "*", {"aws:TagKeys": ["a", "m"]})) is not None
    only = policy(allow("ec2:CreateTags", condition={"ForAllValues:StringEquals": {"aws:TagKeys": ["m"]}}))
    assert refusal(only, Request("ec2:CreateTags", "*", {"aws:TagKeys": ["m"]})) is None
    assert refusal(only, Request("ec2:CreateTags", "*", {"aws:TagKeys": ["m", "x"]})) is not None
    anyof = policy(allow("ec2:CreateTags", condition={"ForAnyValue:StringEquals": {"aws:TagKeys": ["m"]}}))
    assert refusal(anyof, Request("ec2:CreateTags", "*", {"aws:TagKeys": []})) is not None


@pytest.mark.parametrize(
    "statement",
    [
        {"Effect": "Deny", "Action": "ec2:RunInstances", "Resource": "*"},
        {"Effect": "Allow", "Action": "ec2:*", "Resource": "*"},
        {"Effect": "Allow", "NotAction": "iam:*", "Resource": "*"},
        {"Effect": "Allow", "Action": "ec2:RunInstances", "Resource": "*", "Condition": {"IpAddress": {}}},
        {"Effect": "Allow", "Action": "ec2:RunInstances", "Resource": "*", "Condition": {"StringEqualsIfExists": {}}},
    ],
)
def test_grammar_it_does_not_model_is_refused_not_guessed(statement: dict[str, Any]) -> None:
    with pytest.raises(UnknownPolicyGrammar):
        refusal(policy(statement), Request("ec2:RunInstances", "*"))
