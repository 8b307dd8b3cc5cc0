"""Recipes: complete, runnable optimize jobs shipped as package data (`serve-kit recipes list`)."""

from __future__ import annotations

from importlib import resources
from pathlib import Path

from ..config import Recipe, load_yaml, parse_model
from ..errors import InputError


def _files() -> dict[str, object]:
    root = resources.files(__name__)
    return {p.name[:-5]: p for p in root.iterdir() if p.name.endswith(".yaml")}


def recipe_names() -> list[str]:
    return sorted(_files())


def load_recipe(name_or_path: str) -> Recipe:
    """A packaged recipe by name, or a recipe YAML file by path."""
    files = _files()
    if name_or_path in files:
        with resources.as_file(files[name_or_path]) as p:
            return parse_model(Recipe, load_yaml(Path(p)), f"recipe {name_or_path}")
    p = Path(name_or_path)
    if p.suffix in (".yaml", ".yml") and p.exists():
        return parse_model(Recipe, load_yaml(p), str(p))
    raise InputError("unknown recipe", value=name_or_path, origin="--recipe",
                     hint="recipes: " + ", ".join(recipe_names()) + " (or a path to a recipe .yaml)")
