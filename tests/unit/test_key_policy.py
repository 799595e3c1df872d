"""key_policy.key_access: what a KMS key policy lets the receivers of a shared encrypted image do, read statically —
allowed only when nothing is left to chance, refused when no statement allows (or a Deny certainly refuses), and
conditional for everything a static read cannot decide; and the helpers doctor and distribute share (the receivers of
a share as audiences, what a refusal lacks, the policy change that fixes it)."""

from __future__ import annotations

from typing import Any

import pytest

from amiforge.providers.aws.key_policy import (
    SHARE_ACTIONS,
    Audience,
    audiences,
    grant_fix,
    key_access,
    parse_policy,
    refusals,
)

OWNER = "123456789012"
RECEIVER = "111122223333"
OTHER = "444455556666"
KEY = f"arn:aws:kms:eu-west-1:{OWNER}:key/0000-test"
ORG = Audience(org_id="o-abcdefghij")
ACCOUNT = Audience(account=RECEIVER)
ALL = ["kms:DescribeKey", "kms:CreateGrant", "kms:Decrypt", "kms:GenerateDataKey*", "kms:ReEncrypt*"]
OWNER_STATEMENT = {
    "Effect": "Allow",
    "Principal": {"AWS": f"arn:aws:iam::{OWNER}:root"},
    "Action": "kms:*",
    "Resource": "*",
}


def policy(*statements: dict[str, Any]) -> dict[str, Any]:
    return {"Version": "2012-10-17", "Statement": [OWNER_STATEMENT, *statements]}


def allow(principal: Any, actions: Any = ALL, condition: dict[str, Any] | None = None, **extra: Any) -> dict[str, Any]:
    statement = {"Effect": "Allow", "Principal": principal, "Action": actions, "Resource": "*", **extra}
    if condition is not None:
        statement["Condition"] = condition
    return statement


def root(account: str) -> dict[str, str]:
    return {"AWS": f"arn:aws:iam::{account}:root"}


def access(document: dict[str, Any], audience: Audience = ACCOUNT) -> Any:
    return key_access(document, audience, key_arn=KEY, region="eu-west-1")


def test_the_owners_statement_alone_lets_no_receiver_use_the_key() -> None:
    result = access(policy())
    assert result.verdict == "refused" and result.missing == SHARE_ACTIONS


@pytest.mark.parametrize(
    "principal",
    [root(RECEIVER), {"AWS": RECEIVER}, {"AWS": [f"arn:aws:iam::{OTHER}:root", RECEIVER]}, "*", {"AWS": "*"}],
)
def test_the_receivers_root_or_everyone_is_allowed(principal: Any) -> None:
    assert access(policy(allow(principal))).verdict == "allowed"


def test_wildcard_actions_match_and_a_missing_action_is_named() -> None:
    assert access(policy(allow(root(RECEIVER), "kms:*"))).verdict == "allowed"
    result = access(policy(allow(root(RECEIVER), ["kms:Describe*", "kms:Decrypt", "kms:GenerateDataKey*"])))
    assert result.verdict == "refused" and result.missing == ("kms:CreateGrant", "kms:ReEncryptFrom", "kms:ReEncryptTo")


def test_another_account_is_not_the_receiver() -> None:
    assert access(policy(allow(root(OTHER)))).verdict == "refused"


def test_a_single_role_of_the_receiver_is_conditional() -> None:
    result = access(policy(allow({"AWS": f"arn:aws:iam::{RECEIVER}:role/launcher"})))
    assert result.verdict == "conditional" and result.why == (f"only role/launcher of {RECEIVER} is named",)


def test_grant_is_for_aws_resource_holds_for_create_grant_only() -> None:
    """The EBS guide's least-privilege shape: CreateGrant only for grants EC2 makes on the receiver's behalf."""
    uses = ["kms:DescribeKey", "kms:Decrypt", "kms:GenerateDataKey*", "kms:ReEncrypt*"]
    grants = {"Bool": {"kms:GrantIsForAWSResource": "true"}}
    assert access(policy(allow(root(RECEIVER), uses), allow(root(RECEIVER), "kms:CreateGrant", grants))).verdict == (
        "allowed"
    )
    # The same condition on every action: the key is absent from a Decrypt request, so the statement does not apply.
    result = access(policy(allow(root(RECEIVER), ALL, grants)))
    assert result.verdict == "refused" and "kms:CreateGrant" not in result.missing and "kms:Decrypt" in result.missing
    # ...unless the condition says IfExists.
    assert access(policy(allow(root(RECEIVER), ALL, {"BoolIfExists": grants["Bool"]}))).verdict == "allowed"


@pytest.mark.parametrize(
    ("condition", "verdict"),
    [
        ({"StringEquals": {"kms:ViaService": "ec2.eu-west-1.amazonaws.com"}}, "allowed"),
        ({"StringLike": {"kms:ViaService": "ec2.*.amazonaws.com"}}, "allowed"),
        ({"StringEquals": {"kms:ViaService": "ec2.us-east-1.amazonaws.com"}}, "refused"),
        ({"StringEquals": {"kms:CallerAccount": RECEIVER}}, "allowed"),
        ({"StringEquals": {"KMS:CALLERACCOUNT": [OTHER, RECEIVER]}}, "allowed"),  # keys are case-insensitive
        ({"StringEquals": {"kms:CallerAccount": OTHER}}, "refused"),
        ({"StringNotEquals": {"aws:PrincipalAccount": OTHER}}, "allowed"),
        ({"IpAddress": {"aws:SourceIp": "203.0.113.0/24"}}, "conditional"),
        ({"StringEquals": {"aws:PrincipalOrgID": "o-abcdefghij"}}, "conditional"),  # one account: its org is unknown
    ],
)
def test_conditions_decided_from_who_asks_and_how_ec2_uses_the_key(condition: dict[str, Any], verdict: str) -> None:
    assert access(policy(allow("*", ALL, condition))).verdict == verdict


def test_an_organization_share_is_decided_by_its_org_id() -> None:
    org_only = {"StringEquals": {"aws:PrincipalOrgID": "o-abcdefghij"}}
    assert access(policy(allow("*", ALL, org_only)), ORG).verdict == "allowed"
    other_org = {"StringEquals": {"aws:PrincipalOrgID": "o-zzzzzzzzzz"}}
    assert access(policy(allow("*", ALL, other_org)), ORG).verdict == "refused"
    named = access(policy(allow(root(RECEIVER))), ORG)
    assert named.verdict == "conditional" and "single accounts" in named.why[0]
    # The owner's own statements (its root, its roles) are no one else's: they leave an organization share refused.
    owners_role = allow({"AWS": f"arn:aws:iam::{OWNER}:role/admin"})
    assert access(policy(owners_role), ORG).verdict == "refused"


def test_an_unconditional_deny_refuses_and_a_conditional_one_is_undecided() -> None:
    deny: dict[str, Any] = {"Effect": "Deny", "Principal": "*", "Action": "kms:Decrypt", "Resource": "*"}
    result = access(policy(allow(root(RECEIVER)), deny))
    assert result.verdict == "refused" and result.denied == ("kms:Decrypt",) and result.missing == ()
    deny["Condition"] = {"Bool": {"aws:SecureTransport": "false"}}
    assert access(policy(allow(root(RECEIVER)), deny)).verdict == "conditional"
    deny["Condition"] = {"StringNotEquals": {"kms:CallerAccount": [OWNER, RECEIVER]}}
    assert access(policy(allow(root(RECEIVER)), deny)).verdict == "allowed"  # the Deny spares the receiver


def test_not_action_not_principal_and_not_resource() -> None:
    everything_but_decrypt = {
        "Effect": "Allow",
        "Principal": root(RECEIVER),
        "NotAction": "kms:Decrypt",
        "Resource": "*",
    }
    result = access(policy(everything_but_decrypt))
    assert result.verdict == "refused" and result.missing == ("kms:Decrypt",)
    not_principal = {"Effect": "Allow", "NotPrincipal": root(OTHER), "Action": ALL, "Resource": "*"}
    assert access(policy(not_principal)).verdict == "conditional"
    not_resource = {
        "Effect": "Allow",
        "Principal": root(RECEIVER),
        "Action": ALL,
        "NotResource": "arn:aws:kms:*:*:key/x",
    }
    assert access(policy(not_resource)).verdict == "conditional"


def test_a_resource_other_than_the_key_does_not_apply() -> None:
    elsewhere = allow(root(RECEIVER), ALL, Resource=f"arn:aws:kms:eu-west-1:{OWNER}:key/another")
    assert access(policy(elsewhere)).verdict == "refused"
    assert access(policy(allow(root(RECEIVER), ALL, Resource=KEY))).verdict == "allowed"


def test_a_single_statement_object_and_malformed_documents() -> None:
    assert access({"Statement": allow(root(RECEIVER))}).verdict == "allowed"
    assert parse_policy('{"Statement": []}') == {"Statement": []}
    for text in ("[]", '{"Version": "2012-10-17"}', "not json"):
        with pytest.raises(ValueError):
            parse_policy(text)


def test_audiences_of_accounts_organizations_and_ous() -> None:
    org = "arn:aws:organizations::999988887777:organization/o-abcdefghij"
    ou = "arn:aws:organizations::999988887777:ou/o-abcdefghij/ou-ab12-cdefgh12"
    assert audiences([RECEIVER], [org], [ou]) == [
        Audience(account=RECEIVER),
        Audience(org_id="o-abcdefghij"),
        Audience(org_id="o-abcdefghij", ou_id="ou-ab12-cdefgh12"),  # an OU share is one of its organization too
    ]


def test_refusals_say_what_each_refused_audience_lacks_and_the_fix_names_them() -> None:
    deny = {"Effect": "Deny", "Principal": root(OTHER), "Action": "kms:Decrypt", "Resource": "*"}
    document = policy(allow(root(RECEIVER)), allow(root(OTHER)), deny)
    verdicts = [key_access(document, Audience(account=a), key_arn=KEY, region="eu-west-1") for a in (RECEIVER, OTHER)]
    verdicts.append(key_access(policy(), Audience(account="555566667777"), key_arn=KEY, region="eu-west-1"))
    assert refusals(verdicts) == (
        f"{OTHER} is denied kms:Decrypt; 555566667777 is not allowed {', '.join(SHARE_ACTIONS)}"
    )
    fix = grant_fix(verdicts)
    assert f"arn:aws:iam::{OTHER}:root, arn:aws:iam::555566667777:root" in fix and RECEIVER not in fix
    assert refusals(verdicts[:1]) is None  # the receiver alone is allowed
