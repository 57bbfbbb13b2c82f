"""Shared pieces of the multi-seed benchmark scripts: choices from the command line, mean ± std over
seeds, and writing the summary as JSON and Markdown after every run (so a partial benchmark is readable)."""

from __future__ import annotations

import argparse
import json
import math
from collections.abc import Iterable
from pathlib import Path

import numpy as np


def choices(parser: argparse.ArgumentParser, text: str, known: Iterable[str], what: str) -> list[str]:
    """The comma-separated names in ``text``; a name not in ``known`` stops with a one-line error."""
    known = list(known)
    names = [name for name in text.split(",") if name]
    for name in names:
        if name not in known:
            parser.error(f"unknown {what} {name!r}; choose from {', '.join(known)}")
    return names


def mean_and_std(values: Iterable[float | None]) -> dict[str, float] | None:
    """Mean and sample standard deviation (NaN for one value) of the finite values; None if there are none."""
    finite = [value for value in values if value is not None and not math.isnan(value)]
    if not finite:
        return None
    return {"mean": float(np.mean(finite)), "std": float(np.std(finite, ddof=1)) if len(finite) > 1 else float("nan"),
            "n": len(finite)}


def cell(entry: dict[str, float] | None) -> str:
    """``mean ± std`` for a Markdown table (``–`` when absent, the mean alone for one seed)."""
    if entry is None:
        return "–"
    if math.isnan(entry["std"]):
        return f"{entry['mean']:.1f}"
    return f"{entry['mean']:.1f} ± {entry['std']:.1f}"


def write_summary(path: str | Path, record: dict, markdown: str) -> None:
    """``record`` as JSON at ``path`` and ``markdown`` beside it (same name, ``.md``)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(record, indent=1))
    path.with_suffix(".md").write_text(markdown)


def write_json(path: str | Path | None, record: dict) -> None:
    """``record`` as indented JSON at ``path`` (nothing when ``path`` is None), its folder made."""
    if path is None:
        return
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(record, indent=2))


def machine() -> str:
    """The processor (or architecture) and the core count, for a results file."""
    import os
    import platform

    return f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores"
