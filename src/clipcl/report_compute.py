"""Accuracy (or retrieval) against compute: ``samples_seen.png``, one curve per run.

TiC-CLIP's question of any method: how much does it measure per unit of compute? A task run's curve
has a point after each task at the training samples seen so far (``compute.samples_seen_cumulative``):
the mean over the tasks seen so far of that row of the matrix (time streams: the steps up to now),
with the zero-shot row's first task at 0 samples when it was measured. An online run's curve is its
anytime accuracy at the training samples seen by each evaluation (``anytime.samples_trained``).
Runs from before compute accounting (no ``compute`` section) are left out of the plot.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np


def samples_seen_curve(results: dict[str, Any]) -> tuple[list[float], list[float]] | None:
    """(training samples seen, measure) points of one run, or None when it recorded no compute."""
    if results.get("protocol") == "si_blurry":
        trained = (results.get("anytime") or {}).get("samples_trained")
        if not trained:
            return None
        return [float(value) for value in trained], [float(value) for value in results["anytime"]["accuracy"]]
    compute = results.get("compute") or {}
    cumulative = compute.get("samples_seen_cumulative")
    if not cumulative:
        return None
    accuracy = results["accuracy"]
    matrix = np.array(accuracy["matrix"], dtype=float)
    samples = [float(value) for value in cumulative]
    measure = [float(np.nanmean(matrix[row, : row + 1])) for row in range(len(samples))]
    if accuracy.get("zero_shot_row") is not None:
        samples.insert(0, 0.0)
        measure.insert(0, float(accuracy["zero_shot_row"][0]))
    return samples, measure


def measure_name(all_results: list[dict[str, Any]]) -> str:
    protocols = {results.get("protocol") for results in all_results}
    if protocols <= {"captions", "time"}:
        return "mean R@1 over the steps so far (%)"
    if protocols == {"languages"}:
        return "r_mean over the languages so far (%)"
    if protocols == {"si_blurry"}:
        return "anytime accuracy (%)"
    return "accuracy over the tasks so far (%)"


def plot_samples_seen(all_results: list[dict[str, Any]], path: Path) -> Path | None:
    """Write the plot to ``path`` (atomically); None when no run has compute."""
    curves = [(results.get("name", "run"), samples_seen_curve(results)) for results in all_results]
    curves = [(name, *curve, None) for name, curve in curves if curve is not None]
    if not curves:
        return None
    draw_samples_seen(curves, path, measure_name(all_results), "measure against compute", full_scale=True)
    return path


def draw_samples_seen(curves, path: Path, measure: str, title: str, full_scale: bool = False) -> None:
    """One line per ``(label, samples, values, spread)`` against training samples seen, with a band of
    ± ``spread`` where it is given (None: no band); ``full_scale``: the y axis spans 0-100."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from clipcl.atomic_files import save_figure

    figure, axes = plt.subplots(figsize=(7, 4))
    for label, samples, values, spread in curves:
        (line,) = axes.plot(samples, values, marker="o", label=label)
        if spread is not None:
            values, spread = np.asarray(values, dtype=float), np.asarray(spread, dtype=float)
            axes.fill_between(samples, values - spread, values + spread, color=line.get_color(), alpha=0.15)
    axes.set_xlabel("training samples seen (replayed ones included)")
    axes.set_ylabel(measure)
    if full_scale:
        axes.set_ylim(0, 100)
    axes.set_title(title)
    axes.grid(alpha=0.3)
    axes.legend(fontsize=7)
    figure.tight_layout()
    save_figure(figure, path)
