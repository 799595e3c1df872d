"""The recipe as a whole: the root model `Recipe`, reading it from a YAML file, and its JSON Schema.

`load_recipe()` reports every problem at once, each with file, line, field and fix; the YAML-with-line-numbers
machinery it shares with policies and strategies lives in `amiforge.yamlfile`, and this module only says what
is recipe-specific (its noun, its size cap, the union tags its parts insert into error locations). A loaded
recipe remembers the file it came from, so its file sources resolve against that folder.
"""

from __future__ import annotations

from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field, PrivateAttr, field_validator

from amiforge.errors import ConfigError
from amiforge.model import EXPIRES_TAG, expiry_time
from amiforge.recipe.checks import Checks
from amiforge.recipe.fields import SCHEMA_HINT, RecipeName, TagKey, TagValue
from amiforge.recipe.provider_specs import PROVIDER_TAGS, Base, LocalProvider, Provider
from amiforge.recipe.steps import STEP_TAGS, Step
from amiforge.yamlfile import YamlKind, fail, parse_mapping, read_text, short, validate_mapping

__all__ = ["MAX_RECIPE_BYTES", "Recipe", "load_recipe", "parse_recipe", "recipe_json_schema"]

# A recipe is a few KB; anything far bigger is a mistake (or an attack on the parser), not a recipe.
MAX_RECIPE_BYTES = 1024 * 1024


class Recipe(BaseModel):
    """A validated recipe. `load_recipe()` also records which file it came from (`source_path`, `folder`)."""

    model_config = ConfigDict(extra="forbid", frozen=True, title="amiforge recipe")

    name: RecipeName
    description: str | None = None
    base: Base = Field(default_factory=Base)
    provider: Provider = Field(default_factory=LocalProvider)
    steps: list[Step] = Field(default_factory=list, description="ordered; each step is one cache layer")
    checks: Checks = Field(default_factory=Checks)
    tags: dict[TagKey, TagValue] = Field(default_factory=dict)

    @field_validator("tags")
    @classmethod
    def _expiry_readable(cls, tags: dict[str, str]) -> dict[str, str]:
        text = tags.get(EXPIRES_TAG)
        if text is not None:
            try:
                expiry_time(text)
            except ValueError:
                raise fail(
                    f"{EXPIRES_TAG} is {short(text)}, not a date or a time",
                    "write a date (2027-01-31: the image may be retired after that day, UTC) or a time "
                    "(2027-01-31T12:00:00Z)",
                    key=EXPIRES_TAG,
                ) from None
        return tags

    # Not part of the schema: where the recipe was read from, so file sources resolve against its folder.
    _source_path: Path | None = PrivateAttr(default=None)

    @property
    def source_path(self) -> Path:
        if self._source_path is None:
            raise ConfigError(
                f"recipe {self.name!r} was not loaded from a file, so its file sources cannot be resolved",
                fix="load it with load_recipe(path), or call .bound_to(path)",
            )
        return self._source_path

    @property
    def folder(self) -> Path:
        return self.source_path.parent

    def bound_to(self, path: Path) -> Recipe:
        """A copy that knows it lives at `path` (no re-validation of file sources)."""
        copy = self.model_copy()
        copy._source_path = path.absolute()
        return copy


# ----------------------------------------------------------------------------------------------------------
# Loading: YAML text → node tree (for lines) → data → pydantic, every problem collected into one ConfigError.

_KIND = YamlKind(
    noun="recipe",
    model=Recipe,
    schema_hint=SCHEMA_HINT,
    max_bytes=MAX_RECIPE_BYTES,
    missing_fix="check the path; recipes are YAML files such as examples/web/recipe.yaml",
    default_name="recipe.yaml",
    tagged={**STEP_TAGS, **PROVIDER_TAGS},
)


def load_recipe(path: Path) -> Recipe:
    """Read, validate and return the recipe at `path`; raise ConfigError listing every problem found."""
    return parse_recipe(read_text(path, _KIND), path)


def parse_recipe(text: str, path: Path) -> Recipe:
    """Validate recipe YAML `text` as if read from `path` (file sources resolve against `path`'s folder)."""
    parsed = parse_mapping(
        text,
        path,
        _KIND,
        top_keys="name:, steps:, …",
        empty_fix="start from examples/web/recipe.yaml; at least 'name:' is required",
        mapping_fix="write the recipe as 'key: value' lines at the top level, from 'name: …'",
    )
    recipe = validate_mapping(Recipe, parsed, path, _KIND, context={"folder": path.absolute().parent})
    return recipe.bound_to(path)


def recipe_json_schema() -> dict[str, object]:
    """JSON Schema (draft 2020-12) of a recipe file, for editors and `amiforge recipe schema`."""
    schema: dict[str, object] = Recipe.model_json_schema(mode="validation")
    return {"$schema": "https://json-schema.org/draft/2020-12/schema", **schema, "title": "amiforge recipe"}
