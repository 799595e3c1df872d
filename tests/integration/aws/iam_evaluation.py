"""What IAM would answer: one request (an action on a resource, with its request context) evaluated against an
identity-based policy, as the IAM User Guide's policy evaluation logic describes it for a single Allow-only policy.

moto enforces no IAM, so the sync test (test_iam.py) asks this instead: the call recorder (iam_runners.py) turns
each call an operation makes into the `Request`s IAM authorises for it, and `refusal(policy, request)` says why the
operation's generated policy would deny one (None: allowed). It models exactly the policy grammar iam.py generates
and refuses anything else (a Deny, an action wildcard, a condition operator it does not know), so a change to the
generator cannot slip past it unevaluated:

- **Action**: exact names (IAM compares them case-insensitively).
- **Resource**: "*" or ARNs with `*` and `?` wildcards, matched segment by segment (partition, service, region,
  account, resource), as the Resource element's documentation describes.
- **Condition**: every operator of a statement and every key of an operator must hold (AND); a key with several
  values holds if any value matches (OR). Condition key names are case-insensitive, values case-sensitive.
  `StringEquals`, `StringLike` and `Bool` on a single-valued key fail when the request has no such key (no
  `…IfExists`), and the negated `StringNotEquals` then holds ("IAM JSON policy elements: Condition operators", IAM
  User Guide: a key absent from the request context does not match, so a condition that the key *not* match is
  true); `ForAllValues:` holds when every value of a multivalued key (aws:TagKeys) matches — also when
  the request has none — and `ForAnyValue:` when at least one does.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from fnmatch import fnmatchcase
from typing import Any

ContextValue = str | bool | Sequence[str]

_SINGLE = ("StringEquals", "StringNotEquals", "StringLike", "Bool")
_SETS = ("ForAllValues", "ForAnyValue")


class UnknownPolicyGrammar(Exception):
    """The policy uses something this evaluator does not model: it must be taught, never guess."""


@dataclass(frozen=True)
class Request:
    """One authorisation IAM makes: `action` on `resource` (an ARN, or "*" for actions without resource-level
    permissions), with the request context's keys. `what` says in words what it is, for a refusal's message."""

    action: str
    resource: str
    context: Mapping[str, ContextValue] = field(default_factory=dict)
    what: str = ""

    def __str__(self) -> str:
        return f"{self.action} on {self.resource}" + (f" ({self.what})" if self.what else "")


def refusal(policy: Mapping[str, Any], request: Request) -> str | None:
    """Why `policy` does not allow `request` (None when a statement allows it)."""
    candidates = []
    for statement in policy["Statement"]:
        if statement.get("Effect") != "Allow" or "NotAction" in statement or "NotResource" in statement:
            raise UnknownPolicyGrammar(f"only Allow statements with Action and Resource are modelled: {statement}")
        actions = _listed(statement["Action"])
        if any("*" in a or "?" in a for a in actions):
            raise UnknownPolicyGrammar(f"action wildcards are not modelled: {actions}")
        if request.action.lower() not in {a.lower() for a in actions}:
            continue
        candidates.append(statement.get("Sid", "?"))
        if not any(_resource_matches(pattern, request.resource) for pattern in _listed(statement["Resource"])):
            continue
        if _condition_holds(statement.get("Condition", {}), request.context):
            return None
    if not candidates:
        return f"no statement grants {request.action}"
    granted = f"{', '.join(candidates)} grant{'s' if len(candidates) == 1 else ''} {request.action}"
    return f"{granted}, but not on this resource with this request's context (tags, condition keys)"


def _listed(value: str | Sequence[str]) -> list[str]:
    return [value] if isinstance(value, str) else list(value)


def _resource_matches(pattern: str, resource: str) -> bool:
    if pattern == "*":
        return True
    wanted, got = pattern.split(":", 5), resource.split(":", 5)
    if len(wanted) != 6 or len(got) != 6:
        return False
    return all(fnmatchcase(g, w) for w, g in zip(wanted, got, strict=True))


def _condition_holds(condition: Mapping[str, Mapping[str, Any]], context: Mapping[str, ContextValue]) -> bool:
    keys = {k.lower(): v for k, v in context.items()}
    for operator, tests in condition.items():
        qualifier, _, base = operator.rpartition(":")
        if base not in _SINGLE or (qualifier and qualifier not in _SETS):
            raise UnknownPolicyGrammar(f"condition operator {operator} is not modelled")
        for key, wanted in tests.items():
            if not _holds(qualifier, base, keys.get(key.lower()), _listed(wanted) if not isinstance(wanted, bool)
                          else [wanted]):  # fmt: skip
                return False
    return True


def _holds(qualifier: str, base: str, value: ContextValue | None, wanted: Sequence[Any]) -> bool:
    if qualifier:
        values = [] if value is None else _listed(value) if not isinstance(value, bool) else [str(value)]
        matches = [any(_matches(base, v, w) for w in wanted) for v in values]
        if base == "StringNotEquals":  # "not equal to any": every listed value must differ
            matches = [all(_matches(base, v, w) for w in wanted) for v in values]
        return all(matches) if qualifier == "ForAllValues" else any(matches)
    if value is None:
        return base == "StringNotEquals"  # a missing key matches nothing: only a negated operator holds
    if not isinstance(value, str | bool):
        return False  # a single-valued operator on a multivalued key
    if base == "StringNotEquals":
        return all(_matches(base, value, w) for w in wanted)
    return any(_matches(base, value, w) for w in wanted)


def _matches(base: str, value: str | bool, wanted: Any) -> bool:
    if base == "Bool":
        return str(value).lower() == str(wanted).lower()
    text = str(value)
    if base == "StringEquals":
        return text == str(wanted)
    if base == "StringNotEquals":
        return text != str(wanted)
    return fnmatchcase(text, str(wanted))  # StringLike: * and ?
