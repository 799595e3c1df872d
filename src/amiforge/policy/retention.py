"""How long versions are kept, and how they leave (the policy's `retention:`), by default and per image.

`amiforge retire` reads these rules (lifecycle/retire.py). They only ever *allow* a version to go: whatever uses a
version — a channel's current or previous version, a fleet, a rollout, an instance, a launch template, a parameter,
an account it is shared with — keeps it whatever the rules say (docs/architecture.md §15), and nothing here can
switch that off. A version no rule keeps is deprecated once it is `deprecate_after` old (at once when it is revoked,
failed, or past its `amiforge:expires` tag), deregistered once it has been deprecated for `grace`, and its snapshots
deleted `snapshot_grace` after that when `delete_snapshots` is on (until then `amiforge retire restore` can bring
it back).
"""

from __future__ import annotations

from datetime import timedelta
from typing import Annotated

from pydantic import BaseModel, Field, StrictBool, StrictInt

from amiforge.model import EXPIRES_TAG, IMAGE_NAME_PATTERN
from amiforge.policy.fields import STRICT, SoakDuration

__all__ = ["EXPIRES_TAG", "Retention", "RetentionOverrides", "RetentionRules"]


# An age or a wait: a duration, 0 allowed — the same values as a channel's soak.
Age = SoakDuration

TagKey = Annotated[str, Field(min_length=1, max_length=128)]
TagValue = Annotated[
    str,
    Field(max_length=256, json_schema_extra={"description": "the tag's value, or '*' for any value"}),
]


class RetentionRules(BaseModel):
    """The rules of one image (every field set)."""

    model_config = STRICT

    keep_last: StrictInt = Field(
        default=3, ge=0, le=10_000, description="keep the newest N versions that are not failed, revoked or expired"
    )
    keep_younger_than: Age = Field(
        default=timedelta(days=7),
        description="keep every version younger than this (the validation window)",
        json_schema_extra={"default": "7d"},
    )
    deprecate_after: Age = Field(
        default=timedelta(days=30),
        description="a version no rule keeps is deprecated once this old (revoked, failed and expired ones at once)",
        json_schema_extra={"default": "30d"},
    )
    grace: Age = Field(
        default=timedelta(days=7),
        description="how long a version stays deprecated before it is deregistered",
        json_schema_extra={"default": "7d"},
    )
    delete_snapshots: StrictBool = Field(
        default=True, description="delete an image's snapshots once it is deregistered (no other image using them)"
    )
    snapshot_grace: Age = Field(
        default=timedelta(days=7),
        description="how long a deregistered image's snapshots are kept first: the window in which `amiforge retire "
        "restore` can bring it back",
        json_schema_extra={"default": "7d"},
    )
    exclude_tags: dict[TagKey, TagValue] = Field(
        default_factory=dict,
        description="keep every version carrying one of these tags (a value of '*' matches any value)",
    )
    lift_protection: StrictBool = Field(
        default=True,
        description="lift an image's deregistration protection to deregister it (distribute protects every copy it "
        "makes); false: a protected image is kept, and the plan says so",
    )


class RetentionOverrides(BaseModel):
    """An image's own rules: what it leaves out is the default's."""

    model_config = STRICT

    keep_last: StrictInt | None = Field(default=None, ge=0, le=10_000)
    keep_younger_than: Age | None = None
    deprecate_after: Age | None = None
    grace: Age | None = None
    delete_snapshots: StrictBool | None = None
    snapshot_grace: Age | None = None
    exclude_tags: dict[TagKey, TagValue] | None = None
    lift_protection: StrictBool | None = None


class Retention(BaseModel):
    """`retention:` — the blast-radius cap, the default rules and each image's own."""

    model_config = STRICT

    max_deletions: StrictInt = Field(
        default=10,
        ge=0,
        le=100_000,
        description="at most this many images deregistered (or local images deleted) per run, per region; the "
        "rest wait for the next run",
    )
    default: RetentionRules = RetentionRules()
    images: dict[Annotated[str, Field(pattern=f"^{IMAGE_NAME_PATTERN}$")], RetentionOverrides] = {}

    def of(self, image: str) -> RetentionRules:
        own = self.images.get(image)
        if own is None:
            return self.default
        fields = RetentionOverrides.model_fields
        update = {name: getattr(own, name) for name in fields if getattr(own, name) is not None}
        return self.default.model_copy(update=update)
