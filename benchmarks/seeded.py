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


def differences(before, after, path: str = "") -> list[str]:
    """Every place where two JSON-like records differ (exact equality; NaN equals NaN)."""
    if isinstance(before, dict) and isinstance(after, dict):
        found = [f"{path}/{key}: only in one" for key in sorted(set(before) ^ set(after))]
        for key in sorted(set(before) & set(after)):
            found += differences(before[key], after[key], f"{path}/{key}")
        return found
    if isinstance(before, list) and isinstance(after, list) and len(before) == len(after):
        return [line for index, (b, a) in enumerate(zip(before, after)) for line in differences(b, a, f"{path}[{index}]")]
    same = before == after or (isinstance(before, float) and isinstance(after, float)
                               and math.isnan(before) and math.isnan(after))
    return [] if same else [f"{path}: {before!r} != {after!r}"]


def capture_or_compare(description: str, capture) -> None:
    """The command line of an "unchanged" script: ``--out FILE`` runs ``capture(FILE)``; ``--compare A B``
    lists every difference between two captures and exits 1 when there is one."""
    import sys

    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--out")
    parser.add_argument("--compare", nargs=2)
    arguments = parser.parse_args()
    if arguments.compare:
        before, after = (json.loads(Path(path).read_text()) for path in arguments.compare)
        found = differences(before, after)
        print("\n".join(found) if found else f"identical: {len(before)} runs, every kept number equal")
        sys.exit(1 if found else 0)
    if not arguments.out:
        parser.error("give --out FILE (capture) or --compare A B")
    capture(arguments.out)


def machine() -> str:
    """The processor (or architecture) and the core count, for a results file."""
    import os
    import platform

    return f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores"
