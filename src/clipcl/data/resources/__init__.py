"""Class names and prompt templates, stored as JSON files next to this module."""

from __future__ import annotations

import json
from functools import cache
from pathlib import Path

_HERE = Path(__file__).parent


@cache
def _load(filename: str) -> dict:
    return json.loads((_HERE / filename).read_text())


def classnames_and_templates(dataset: str) -> tuple[list[str], list[str]]:
    """The class names and prompt templates (with ``{}``) of a dataset known to clipcl."""
    entry = _load("classnames.json")[dataset]
    templates = _load("templates.json")[entry.get("templates", dataset)]
    return list(entry["classnames"]), list(templates)


def templates_for(dataset: str) -> list[str]:
    """Prompt templates of a dataset (its own list if clipcl has one, else generic photo templates)."""
    templates = _load("templates.json")
    return list(templates.get(dataset, templates["photos"]))
