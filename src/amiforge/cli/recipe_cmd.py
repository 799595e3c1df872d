"""amiforge recipe validate|schema."""

from __future__ import annotations

import json
from pathlib import Path

import typer
from rich.markup import escape

from amiforge.cli.common import JsonOption
from amiforge.cli.output import console, emit_json
from amiforge.recipe import load_recipe, recipe_digest, recipe_json_schema

app = typer.Typer(help="Check recipes and print their schema.", no_args_is_help=True)


@app.command("validate")
def validate(
    file: Path = typer.Argument(..., help="The recipe YAML file."),
    as_json: bool = JsonOption,
) -> None:
    """Validate a recipe: every problem at once, with file, line, field and fix (exit 2)."""
    recipe = load_recipe(file)
    summary = {
        "ok": True,
        "file": str(file),
        "name": recipe.name,
        "provider": recipe.provider.type,
        "steps": [s.describe() for s in recipe.steps],
        "recipe_digest": recipe_digest(recipe),
    }
    if as_json:
        emit_json(summary)
        return
    shown = escape(str(file))
    console.print(f"[green]ok[/] {shown}: recipe [bold]{escape(recipe.name)}[/], {len(recipe.steps)} step(s)")
    for i, step in enumerate(recipe.steps, start=1):
        console.print(f"  {i}. {step.describe()}", markup=False)


@app.command("schema")
def schema(as_json: bool = JsonOption) -> None:
    """Print the recipe JSON Schema (it is JSON either way)."""
    del as_json
    typer.echo(json.dumps(recipe_json_schema(), indent=2))
