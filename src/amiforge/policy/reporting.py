"""What `amiforge report` reads: the policy's `tags:` (the tags every image must carry, and which tags name an
owner and a cost center) and the storage price table (`--prices FILE`, else the built-in one)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

from pydantic import BaseModel, Field

from amiforge.policy.fields import STRICT
from amiforge.policy.retention import TagKey
from amiforge.yamlfile import YamlKind, parse_mapping, read_text, validate_mapping

__all__ = ["DEFAULT_PRICES", "Prices", "TagRules", "load_prices"]

Price = Annotated[float, Field(ge=0, le=1000)]


class TagRules(BaseModel):
    """`tags:` — the tags every version and every image resource must carry, and the tags cost is grouped by."""

    model_config = STRICT

    required: tuple[TagKey, ...] = Field(default=(), description="tags every version and image resource must carry")
    owner: TagKey = Field(default="owner", description="the tag naming who owns an image")
    cost_center: TagKey = Field(default="cost-center", description="the tag naming the cost center an image bills")


class Prices(BaseModel):
    """Storage prices per GB-month: by region, else the default."""

    model_config = STRICT

    currency: Annotated[str, Field(pattern=r"^[A-Z]{3}$")] = "USD"
    default: Price = Field(description="per GB-month where no region's own price is given")
    regions: dict[Annotated[str, Field(min_length=1, max_length=64)], Price] = {}
    source: str = Field(default="", description="where the prices come from, shown with the report")

    def of(self, region: str) -> tuple[float, bool]:
        """(price per GB-month, whether the region has its own price)."""
        own = self.regions.get(region)
        return (own, True) if own is not None else (self.default, False)


# EBS snapshot storage, standard tier, in US East (N. Virginia), as AWS publishes it; other regions differ (give
# them with --prices). The local image store costs nothing amiforge could know.
DEFAULT_PRICES = Prices(
    currency="USD",
    default=0.05,
    regions={"us-east-1": 0.05, "local": 0.0},
    source="EBS snapshots, standard tier, us-east-1 (https://aws.amazon.com/ebs/pricing/); other AWS regions at "
    "that price unless --prices gives theirs",
)

_KIND = YamlKind(
    noun="price table",
    model=Prices,
    schema_hint="keys: currency (e.g. USD), default (per GB-month), regions (region: price), source",
    max_bytes=64 * 1024,
    missing_fix="write one: {{currency: USD, default: 0.05, regions: {{eu-west-1: 0.055}}}}",
    default_name="prices.yaml",
)


def load_prices(path: Path) -> Prices:
    text = read_text(path, _KIND)
    parsed = parse_mapping(text, path, _KIND, top_keys="currency:, default:, regions:, source:",
                           empty_fix="give at least default:", mapping_fix="give at least default:")  # fmt: skip
    return validate_mapping(Prices, parsed, path, _KIND)
