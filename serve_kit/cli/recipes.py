"""`serve-kit recipes`: list and show the packaged optimize recipes."""

from __future__ import annotations

import typer
import yaml
from rich.table import Table

from ..recipes import load_recipe, recipe_names
from . import app
from ._common import emit_json, out, state

recipes_app = typer.Typer(help="List and show packaged optimize recipes.", no_args_is_help=True)
app.add_typer(recipes_app, name="recipes")


@recipes_app.command("list")
def list_() -> None:
    """List the packaged recipes."""
    items = [load_recipe(n) for n in recipe_names()]
    if state.json:
        emit_json([{"name": r.name, "description": r.description, "targets": [t.name for t in r.targets]}
                   for r in items])
        return
    table = Table(title="recipes (serve-kit optimize --recipe NAME)")
    table.add_column("name", style="bold")
    table.add_column("description")
    table.add_column("targets")
    for r in items:
        table.add_row(r.name, r.description, ", ".join(t.name for t in r.targets))
    out.print(table)


@recipes_app.command("show")
def show(name: str = typer.Argument(..., help="Recipe name or path.")) -> None:
    """Print a recipe as YAML (a starting point for your own)."""
    r = load_recipe(name)
    data = r.model_dump(mode="json", exclude_defaults=True)
    if state.json:
        emit_json(data)
    else:
        out.print(yaml.safe_dump(data, sort_keys=False), end="")
