"""Retention rules the retirement tests share."""

from __future__ import annotations

from amiforge.policy.retention import Retention

# Every version may go at once, unless something uses it (or is its channel's, or is being baked).
EAGER = Retention.model_validate(
    {
        "default": {
            "keep_last": 0,
            "keep_younger_than": "0s",
            "deprecate_after": "0s",
            "grace": "0s",
            "snapshot_grace": "0s",
        }
    }
)
