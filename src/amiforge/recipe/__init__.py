"""The recipe file (docs/architecture.md §7): what to bake, where, and how to tell the result boots.

Everything about the recipe lives in this package, and nothing here touches a provider, the store or the network:

- `fields`: the constrained scalars (names, packages, units, tags, modes, paths) the models share;
- `provider_specs`: the base layer and the `provider:` section (local, or AWS with its source, distribution and
  publishing);
- `steps`: the five step kinds and the file sources they copy, confined to the recipe's folder;
- `checks`: the boot-test gate (`checks:`);
- `document`: the root model `Recipe`, `load_recipe()` (every problem at once, with file, line, field and fix)
  and the JSON Schema;
- `digests`: the recipe digest and step fingerprints the registry and the layer cache are keyed on.

Import the names from `amiforge.recipe`; the modules are how the code is laid out, not part of the interface.
Durations in a recipe read the one grammar of `amiforge.durations`.
"""

from __future__ import annotations

from amiforge.recipe.checks import Checks, CommandCheck, HttpCheck, TcpCheck
from amiforge.recipe.digests import recipe_digest, step_fingerprint
from amiforge.recipe.document import MAX_RECIPE_BYTES, Recipe, load_recipe, parse_recipe, recipe_json_schema
from amiforge.recipe.provider_specs import AwsProvider, Base, LocalProvider, OwnersSource, Provider, Source, SsmSource
from amiforge.recipe.steps import (
    FileSpec,
    FileStep,
    PackagesStep,
    ServiceSpec,
    ServiceStep,
    ShellStep,
    Step,
    UserSpec,
    UserStep,
    source_sha256,
    stage_source,
)

__all__ = [
    "MAX_RECIPE_BYTES",
    "AwsProvider",
    "Base",
    "Checks",
    "CommandCheck",
    "FileSpec",
    "FileStep",
    "HttpCheck",
    "LocalProvider",
    "OwnersSource",
    "PackagesStep",
    "Provider",
    "Recipe",
    "ServiceSpec",
    "ServiceStep",
    "ShellStep",
    "Source",
    "SsmSource",
    "Step",
    "TcpCheck",
    "UserSpec",
    "UserStep",
    "load_recipe",
    "parse_recipe",
    "recipe_digest",
    "recipe_json_schema",
    "source_sha256",
    "stage_source",
    "step_fingerprint",
]
