"""What a KMS key policy lets the receivers of a shared, encrypted image do with the key — read statically.

`doctor --aws` uses this to tell, before a distribution, whether the accounts (or the organization) an encrypted image
is shared with may use its key. AWS decides at request time from the key policy *and* the caller's IAM policies, grants
and request context; a read of the key policy alone can therefore say three things, and no more:

- **allowed**: an Allow statement covers the receiver for every action, with no condition this module cannot decide,
  and no Deny statement might apply. (The receiver's own IAM policies must still allow the actions: not visible here.)
- **refused**: no Allow statement covers some action for the receiver, or a Deny certainly does.
- **conditional**: it depends on something a static read cannot know — a condition key whose value is only known at
  request time (`aws:PrincipalOrgID` for a single account, `aws:SourceIp`, …), a statement naming only some roles of
  the account, a `NotPrincipal`. Never reported as allowed.

Conditions decided here (their values follow from who asks and how EBS uses the key): `kms:CallerAccount` and
`aws:PrincipalAccount` (the receiving account), `aws:PrincipalOrgID` (for an organization or OU share, its
organization), `kms:ViaService` (EC2 in the key's region) and `kms:GrantIsForAWSResource` (true for the grants EC2
creates when it launches from the image; absent, so false, for other actions). Keys are case-insensitive, as in IAM.
"""

from __future__ import annotations

import fnmatch
import json
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal

__all__ = [
    "SHARE_ACTIONS",
    "Audience",
    "KeyAccess",
    "Verdict",
    "audiences",
    "grant_fix",
    "key_access",
    "parse_policy",
    "refusals",
]

Verdict = Literal["allowed", "conditional", "refused"]

# What a receiving account must be allowed on the key to launch from (or copy) an image whose snapshots it encrypts:
# the Amazon EBS User Guide, "Share the KMS key used to encrypt a shared Amazon EBS snapshot". kms:ReEncrypt there is
# the two IAM actions ReEncryptFrom and ReEncryptTo.
SHARE_ACTIONS: tuple[str, ...] = (
    "kms:DescribeKey",
    "kms:CreateGrant",
    "kms:Decrypt",
    "kms:GenerateDataKey",
    "kms:GenerateDataKeyWithoutPlaintext",
    "kms:ReEncryptFrom",
    "kms:ReEncryptTo",
)

_ROOT_RE = re.compile(r"arn:aws[a-z-]*:iam::([0-9]{12}):root")
_ORG_RE = re.compile(r"arn:aws[a-z-]*:organizations::[0-9]{12}:organization/(o-[a-z0-9]+)")
_OU_RE = re.compile(r"arn:aws[a-z-]*:organizations::[0-9]{12}:ou/(o-[a-z0-9]+)/(ou-[0-9a-z]+-[a-z0-9]+)")
_PRINCIPAL_ARN_RE = re.compile(r"arn:aws[a-z-]*:(?:iam|sts)::([0-9]{12}):(.+)")

# A tri-state: True (certainly), False (certainly not), None (cannot tell from the policy alone).
_Maybe = bool | None


@dataclass(frozen=True)
class Audience:
    """Who receives the image: one account, or the accounts of an organization (or of one OU in it)."""

    account: str | None = None
    org_id: str | None = None  # o-…, for an organization or OU share
    ou_id: str | None = None  # ou-…, for an OU share

    @property
    def label(self) -> str:
        if self.account is not None:
            return self.account
        return f"OU {self.ou_id}" if self.ou_id else f"organization {self.org_id}"


@dataclass(frozen=True)
class KeyAccess:
    """The verdict for one audience; `missing`: actions no statement allows; `denied`: actions a Deny certainly
    refuses; `why`: what made the verdict conditional (condition keys, principal-specific statements)."""

    audience: Audience
    verdict: Verdict
    missing: tuple[str, ...] = ()
    denied: tuple[str, ...] = ()
    why: tuple[str, ...] = ()


def audiences(
    accounts: Iterable[str] = (), organizations: Iterable[str] = (), organizational_units: Iterable[str] = ()
) -> list[Audience]:
    """The receivers of a share: account ids, organization ARNs and OU ARNs (an OU share is also one of its
    organization, which `aws:PrincipalOrgID` conditions test)."""
    found = [Audience(account=a) for a in accounts]
    for arn in organizations:
        org = _ORG_RE.fullmatch(arn)
        found.append(Audience(org_id=org.group(1) if org else arn))
    for arn in organizational_units:
        ou = _OU_RE.fullmatch(arn)
        found.append(Audience(org_id=ou.group(1), ou_id=ou.group(2)) if ou else Audience(ou_id=arn))
    return found


def refusals(verdicts: Iterable[KeyAccess]) -> str | None:
    """What the refused verdicts lack, one clause per audience ("111122223333 is not allowed kms:Decrypt; …"), or None
    when none is refused."""
    parts: list[str] = []
    for v in verdicts:
        if v.verdict != "refused":
            continue
        if v.missing:
            parts.append(f"{v.audience.label} is not allowed {', '.join(v.missing)}")
        if v.denied:
            parts.append(f"{v.audience.label} is denied {', '.join(v.denied)}")
    return "; ".join(parts) or None


def grant_fix(verdicts: Iterable[KeyAccess]) -> str:
    """The key policy change that lets the refused audiences use the key."""
    principals = ", ".join(
        f"arn:aws:iam::{v.audience.account}:root" if v.audience.account else v.audience.label
        for v in verdicts
        if v.verdict == "refused"
    )
    return (
        f"add a key policy statement allowing {principals} {', '.join(SHARE_ACTIONS)} (kms:CreateGrant may carry the "
        "condition kms:GrantIsForAWSResource=true), and remove any Deny that matches them"
    )


def parse_policy(text: str) -> Mapping[str, Any]:
    """The policy document GetKeyPolicy returned; ValueError if it is not a JSON object with a Statement."""
    document = json.loads(text)
    if not isinstance(document, dict) or "Statement" not in document:
        raise ValueError("not a policy document (no Statement)")
    return document


def key_access(
    policy: Mapping[str, Any],
    audience: Audience,
    *,
    key_arn: str,
    region: str,
    actions: Sequence[str] = SHARE_ACTIONS,
) -> KeyAccess:
    """What `policy` (of the key `key_arn` in `region`) lets `audience` do with the key, for each of `actions`."""
    statements = _statements(policy)
    missing: list[str] = []
    denied: list[str] = []
    why: set[str] = set()
    conditional = False
    for action in actions:
        allows = [_applies(s, audience, action, key_arn, region, why) for s in statements if _effect(s) == "Allow"]
        denies = [_applies(s, audience, action, key_arn, region, why) for s in statements if _effect(s) == "Deny"]
        if True in denies:
            denied.append(action)
        elif True in allows and None not in denies:
            continue
        elif True in allows or None in allows:
            conditional = True
        else:
            missing.append(action)
    if missing or denied:
        return KeyAccess(audience, "refused", tuple(missing), tuple(denied), tuple(sorted(why)))
    if conditional:
        return KeyAccess(audience, "conditional", why=tuple(sorted(why)))
    return KeyAccess(audience, "allowed")


def _statements(policy: Mapping[str, Any]) -> list[Mapping[str, Any]]:
    raw = policy.get("Statement", [])
    items = raw if isinstance(raw, list) else [raw]
    return [s for s in items if isinstance(s, Mapping)]


def _effect(statement: Mapping[str, Any]) -> str:
    return str(statement.get("Effect", ""))


def _strings(value: Any) -> list[str]:
    if isinstance(value, str):
        return [value]
    if isinstance(value, Iterable) and not isinstance(value, Mapping):
        return [str(v) for v in value]
    return [str(value)]


def _applies(
    statement: Mapping[str, Any], audience: Audience, action: str, key_arn: str, region: str, why: set[str]
) -> _Maybe:
    """Whether `statement` covers `audience` doing `action` on the key: the AND of principal, action, resource and
    conditions. When that is None, what made it so is added to `why`."""
    reasons: set[str] = set()
    parts = [
        _action_matches(statement, action),
        _resource_matches(statement, key_arn, reasons),
        _principal_matches(statement, audience, _owner(key_arn), reasons),
    ]
    if False in parts:
        return False
    parts.append(_conditions_hold(statement.get("Condition"), audience, action, region, reasons))
    if False in parts:
        return False
    if None in parts:
        why |= reasons
        return None
    return True


def _matches_any(value: str, patterns: Iterable[str]) -> bool:
    # IAM action and resource patterns: * and ? wildcards; actions are case-insensitive.
    return any(fnmatch.fnmatchcase(value.lower(), p.lower()) for p in patterns)


def _action_matches(statement: Mapping[str, Any], action: str) -> bool:
    if "Action" in statement:
        return _matches_any(action, _strings(statement["Action"]))
    if "NotAction" in statement:
        return not _matches_any(action, _strings(statement["NotAction"]))
    return False


def _resource_matches(statement: Mapping[str, Any], key_arn: str, why: set[str]) -> _Maybe:
    if "Resource" in statement:
        return _matches_any(key_arn, _strings(statement["Resource"]))
    if "NotResource" in statement:
        why.add("a NotResource statement")
        return None
    return False


def _owner(key_arn: str) -> str | None:
    """The account a key ARN names (arn:aws:kms:REGION:ACCOUNT:key/ID)."""
    parts = key_arn.split(":")
    return parts[4] if len(parts) > 5 and parts[2] == "kms" else None


def _principal_matches(statement: Mapping[str, Any], audience: Audience, owner: str | None, why: set[str]) -> _Maybe:
    if "NotPrincipal" in statement:
        why.add("a NotPrincipal statement")
        return None
    principal = statement.get("Principal")
    if principal == "*":
        return True
    if not isinstance(principal, Mapping):
        return False
    answer: _Maybe = False
    for value in _strings(principal.get("AWS", [])):
        if value == "*":
            return True
        account = value if re.fullmatch(r"[0-9]{12}", value) else None
        root = _ROOT_RE.fullmatch(value)
        if root:
            account = root.group(1)
        if account is not None:
            if audience.account == account:
                return True
            if audience.account is None and account != owner:
                # An organization share: naming some accounts covers those, not the organization.
                why.add(f"the key names single accounts ({account}), not the whole organization")
                answer = None
            continue
        named = _PRINCIPAL_ARN_RE.fullmatch(value)
        if named and (named.group(1) == audience.account or (audience.account is None and named.group(1) != owner)):
            # Only that role or user: whoever launches in the receiving account may be someone else.
            why.add(f"only {named.group(2)} of {named.group(1)} is named")
            answer = None
    return answer


def _context(audience: Audience, action: str, region: str) -> dict[str, str]:
    """Condition keys whose values follow from who receives the image and how EC2 uses the key (lower-case)."""
    context = {"kms:viaservice": f"ec2.{region}.amazonaws.com"}
    if audience.account is not None:
        context["kms:calleraccount"] = audience.account
        context["aws:principalaccount"] = audience.account
    if audience.org_id is not None:
        context["aws:principalorgid"] = audience.org_id
    if action == "kms:CreateGrant":
        context["kms:grantisforawsresource"] = "true"
    return context


# Keys the context above may hold; absent from the context for this request means absent at AWS too.
_DECIDABLE_ABSENT = {"kms:grantisforawsresource"}


def _conditions_hold(condition: Any, audience: Audience, action: str, region: str, why: set[str]) -> _Maybe:
    if condition is None:
        return True
    if not isinstance(condition, Mapping):
        why.add("a malformed Condition")
        return None
    context = _context(audience, action, region)
    answer: _Maybe = True
    for operator, tests in condition.items():
        if not isinstance(tests, Mapping):
            why.add(f"a malformed {operator} condition")
            answer = None
            continue
        for key, expected in tests.items():
            held = _condition(str(operator), str(key).lower(), _strings(expected), context)
            if held is False:
                return False
            if held is None:
                why.add(f"condition {operator} {key}")
                answer = None
    return answer


def _condition(operator: str, key: str, expected: list[str], context: Mapping[str, str]) -> _Maybe:
    base = operator.split(":", 1)[1] if operator.startswith(("ForAnyValue:", "ForAllValues:")) else operator
    if_exists = base.endswith("IfExists")
    base = base.removesuffix("IfExists")
    value = context.get(key)
    if value is None:
        if key in _DECIDABLE_ABSENT:
            # The key is absent from this request: every operator but the IfExists and Null forms is false.
            return True if if_exists else (None if base == "Null" else False)
        return None
    if base in ("StringEquals", "ArnEquals"):
        return value in expected
    if base == "StringEqualsIgnoreCase":
        return value.lower() in {e.lower() for e in expected}
    if base in ("StringLike", "ArnLike"):
        return any(fnmatch.fnmatchcase(value, e) for e in expected)
    if base == "StringNotEquals":
        return value not in expected
    if base == "StringNotLike":
        return not any(fnmatch.fnmatchcase(value, e) for e in expected)
    if base == "Bool":
        return value.lower() in {e.lower() for e in expected}
    return None
