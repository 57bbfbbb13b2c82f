"""Markdown summaries and PNG plots of run directories.

``clipcl report RUN_DIR [RUN_DIR ...]`` writes, next to each run, a heatmap of the accuracy matrix and a
plot of each task's accuracy over the stream; with several runs it also prints a side-by-side
comparison table (and writes it with ``--output``).
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

COMPARISON_COLUMNS = [
    ("a_auc", "A_auc"),
    ("a_last", "A_last"),
    ("transfer", "Transfer"),
    ("avg", "Avg"),
    ("last", "Last"),
    ("bwt", "BWT"),
    ("forgetting", "Forgetting"),
    ("avg_incremental", "Avg inc."),
    ("heldout_zero_shot", "Held-out ZS"),
    ("heldout_last", "Held-out last"),
    ("heldout_retention", "Held-out retention"),
    ("i2t_r1_change", "I→T R@1 Δ"),
    ("t2i_r1_change", "T→I R@1 Δ"),
]


def _number(value: Any) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "–"
    return f"{value:.1f}"


def matrix_markdown(results: dict[str, Any]) -> str:
    accuracy = results["accuracy"]
    columns = accuracy["columns"]
    lines = ["| | " + " | ".join(columns) + " |", "|---" * (len(columns) + 1) + "|"]
    lines.append("| zero-shot | " + " | ".join(_number(v) for v in accuracy["zero_shot_row"]) + " |")
    for label, row in zip(accuracy["rows"], accuracy["matrix"]):
        lines.append(f"| {label} | " + " | ".join(_number(v) for v in row) + " |")
    return "\n".join(lines)


def online_summary_markdown(results: dict[str, Any]) -> str:
    """The summary.md of an online (Si-Blurry) run: the anytime curve and its metrics."""
    anytime, timing, params = results["anytime"], results["timing"], results["parameters"]
    stream = results["stream"]
    lines = [
        (f"# {results['name']} — online Si-Blurry stream ({stream['samples']} samples, "
         f"{stream['classes']} classes), seed {results['seed']}"),
        "",
        "Anytime accuracy (%): test images of every class seen so far, among those classes.",
        "",
        "| samples seen | " + " | ".join(str(n) for n in anytime["samples"]) + " |",
        "|---" * (len(anytime["samples"]) + 1) + "|",
        "| accuracy | " + " | ".join(_number(v) for v in anytime["accuracy"]) + " |",
        "",
        "| metric | value |",
        "|---|---|",
    ]
    lines += [f"| {key} | {_number(value)} |" for key, value in results["metrics"].items()]
    heldout = results.get("heldout", {})
    if heldout.get("datasets"):
        lines += ["", "| held-out dataset | zero-shot | after the stream |", "|---|---|---|"]
        for name, before, after in zip(heldout["datasets"], heldout["zero_shot"], heldout["after_stream"]):
            lines.append(f"| {name} | {_number(before)} | {_number(after)} |")
    lines += ["", f"Parameters: {params['trainable']:,} trainable of {params['total']:,}.",
              (f"Training: {timing['train_steps']} steps, {timing['train_seconds']:.1f} s; evaluation "
              f"{timing['eval_seconds']:.1f} s."), ""]
    return "\n".join(lines)


def run_summary_markdown(results: dict[str, Any]) -> str:
    """The summary.md of one run."""
    if results.get("protocol") == "si_blurry":
        return online_summary_markdown(results)
    metrics = results["metrics"]
    timing = results["timing"]
    params = results["parameters"]
    lines = [
        f"# {results['name']} — {results['protocol']} ({len(results['tasks'])} tasks), seed {results['seed']}",
        "",
        "Accuracy (%) of each task's test images, per image; rows are the model after training each task.",
        "",
        matrix_markdown(results),
        "",
        "| metric | value |",
        "|---|---|",
    ]
    for key, value in metrics.items():
        lines.append(f"| {key} | {_number(value)} |")
    heldout = results.get("heldout", {})
    if heldout.get("datasets"):
        lines += ["", "Held-out datasets (never trained on):", "",
                  "| dataset | zero-shot | after last task |", "|---|---|---|"]
        final = heldout["after_each_task"][-1]
        for name, before, after in zip(heldout["datasets"], heldout["zero_shot"], final):
            lines.append(f"| {name} | {_number(before)} | {_number(after)} |")
    lines += [
        "",
        f"Parameters: {params['trainable']:,} trainable of {params['total']:,}.",
        (f"Train seconds per task: {', '.join(f'{s:.1f}' for s in timing['train_seconds'])}; "
         f"eval seconds per row: {timing['zero_shot_eval_seconds']:.1f} (zero-shot), "
         f"{', '.join(f'{s:.1f}' for s in timing['eval_seconds'])}."),
        "",
    ]
    return "\n".join(lines)


def comparison_markdown(all_results: Sequence[dict[str, Any]]) -> str:
    """One row per run: the stream's headline metrics side by side."""
    present = [(key, title) for key, title in COMPARISON_COLUMNS
               if any(key in results["metrics"] for results in all_results)]
    lines = ["| run | protocol | " + " | ".join(title for _, title in present) + " |",
             "|---|---" + "|---" * len(present) + "|"]
    for results in all_results:
        cells = [_number(results["metrics"].get(key)) for key, _ in present]
        lines.append(f"| {results['name']} | {results['protocol']} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def load_results(run_dir: str | Path) -> dict[str, Any]:
    path = Path(run_dir) / "results.json"
    if not path.exists():
        raise FileNotFoundError(f"{path} does not exist (is {run_dir} a finished clipcl run directory?)")
    return json.loads(path.read_text())


def plot_run(results: dict[str, Any], directory: str | Path) -> list[Path]:
    """Write accuracy_matrix.png and task_accuracy.png into ``directory``; returns their paths."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    directory = Path(directory)
    if results.get("protocol") == "si_blurry":
        anytime = results["anytime"]
        figure, axes = plt.subplots(figsize=(7, 4))
        axes.plot(anytime["samples"], anytime["accuracy"], marker="o")
        axes.set_xlabel("stream samples seen")
        axes.set_ylabel("accuracy on seen classes (%)")
        axes.set_ylim(0, 100)
        axes.set_title(f"{results['name']}: anytime accuracy (A_auc {results['metrics']['a_auc']:.1f})")
        axes.grid(alpha=0.3)
        figure.tight_layout()
        path = directory / "anytime_accuracy.png"
        figure.savefig(path, dpi=110)
        plt.close(figure)
        return [path]
    accuracy = results["accuracy"]
    rows = ["zero-shot"] + accuracy["rows"]
    matrix = np.array([accuracy["zero_shot_row"]] + accuracy["matrix"], dtype=float)
    columns = accuracy["columns"]

    figure, axes = plt.subplots(figsize=(1.2 * len(columns) + 3, 0.5 * len(rows) + 2))
    image = axes.imshow(matrix, vmin=0, vmax=100, cmap="viridis")
    axes.set_xticks(range(len(columns)), columns, rotation=30, ha="right")
    axes.set_yticks(range(len(rows)), rows)
    for r in range(matrix.shape[0]):
        for c in range(matrix.shape[1]):
            axes.text(c, r, f"{matrix[r, c]:.1f}", ha="center", va="center",
                      color="white" if matrix[r, c] < 60 else "black", fontsize=8)
    axes.set_xlabel("evaluated on task")
    axes.set_title(f"{results['name']}: accuracy (%)")
    figure.colorbar(image, ax=axes, fraction=0.04)
    figure.tight_layout()
    heatmap = directory / "accuracy_matrix.png"
    figure.savefig(heatmap, dpi=110)
    plt.close(figure)

    figure, axes = plt.subplots(figsize=(7, 4))
    steps = range(len(rows))
    for column, name in enumerate(columns):
        axes.plot(steps, matrix[:, column], marker="o", label=name)
    axes.set_xticks(list(steps), ["zs"] + [str(i + 1) for i in range(len(accuracy["rows"]))])
    axes.set_xlabel("after training task (zs = zero-shot)")
    axes.set_ylabel("accuracy (%)")
    axes.set_ylim(0, 100)
    axes.set_title(f"{results['name']}: each task over the stream")
    axes.legend(fontsize=7)
    figure.tight_layout()
    curves = directory / "task_accuracy.png"
    figure.savefig(curves, dpi=110)
    plt.close(figure)
    return [heatmap, curves]
