"""The promotion policy: per channel, what a version must satisfy to be promoted into it, and the waivers.

- `fields`: the constrained scalars (channel names, severities, soaks, expiry times);
- `document`: the models, the checks across keys, `load_policy()` / `parse_policy()`, `default_policy()` and the
  JSON Schema;
- `gate`: `evaluate()`, the promotion gate itself, pure over the facts a caller gathers (`Candidate`);
- `severity`: which rating a CVE finding's severity is under the policy's `severity_source`.

Import the names from `amiforge.policy`; the modules are how the code is laid out, not part of the interface.
"""

from __future__ import annotations

from amiforge.policy.document import (
    MAX_POLICY_BYTES,
    ChannelPolicy,
    Policy,
    Waiver,
    default_policy,
    load_policy,
    parse_policy,
    policy_json_schema,
)
from amiforge.policy.gate import Candidate, GateDecision, evaluate
from amiforge.policy.severity import SeveritySource, rated, urgency_severity

__all__ = [
    "MAX_POLICY_BYTES",
    "Candidate",
    "ChannelPolicy",
    "GateDecision",
    "Policy",
    "SeveritySource",
    "Waiver",
    "default_policy",
    "evaluate",
    "load_policy",
    "parse_policy",
    "policy_json_schema",
    "rated",
    "urgency_severity",
]
