"""Markdown summaries and PNG plots of run directories.

``clipcl report RUN_DIR [RUN_DIR ...]`` writes, next to each run, a heatmap of the accuracy matrix and a
plot of each task's accuracy over the stream; with several runs it also prints a side-by-side
comparison table (and writes it with ``--output``) and ``samples_seen_comparison.png``, every run's
measure against the training samples it has seen (:mod:`clipcl.report_compute`). :func:`load_results` checks that a results.json
holds what the summary and plots read, so that a damaged or foreign file fails with one line.

A task run's ``accuracy.zero_shot_row`` may be null (a run with ``eval.zero_shot_row: false``): the
summary then shows no zero-shot row and the plots start after the first task.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from clipcl.atomic_files import save_figure

COMPARISON_COLUMNS = [
    ("a_auc", "A_auc"),
    ("a_last", "A_last"),
    ("transfer", "Transfer"),
    ("avg", "Avg"),
    ("last", "Last"),
    ("bwt", "BWT"),
    ("forgetting", "Forgetting"),
    ("avg_incremental", "Avg inc."),
    ("seen_avg", "Seen avg"),
    ("dynamic_in_distribution", "Dyn. ID"),
    ("dynamic_backward", "Dyn. backward"),
    ("dynamic_forward", "Dyn. forward"),
    ("heldout_zero_shot", "Held-out ZS"),
    ("heldout_last", "Held-out last"),
    ("heldout_retention", "Held-out retention"),
    ("i2t_r1_change", "I→T R@1 Δ"),
    ("modality_gap_change", "Gap Δ"),
    ("rotation_image_deg_vs_zero_shot_last", "Image rot.° vs ZS"),
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
    if accuracy.get("zero_shot_row") is not None:
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
        # zero_shot is None when the run measured nothing before training (eval.zero_shot_row: false).
        before_stream = heldout.get("zero_shot") or [None] * len(heldout["datasets"])
        for name, before, after in zip(heldout["datasets"], before_stream, heldout["after_stream"]):
            lines.append(f"| {name} | {_number(before)} | {_number(after)} |")
    lines += ["", f"Parameters: {params['trainable']:,} trainable of {params['total']:,}.",
              (f"Training: {timing['train_steps']} steps, {_number(timing['train_seconds'])} s; evaluation "
              f"{_number(timing['eval_seconds'])} s."), ""]
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
        ("Mean R@1 (%) of image->text and text->image retrieval on each phase's test pairs; rows are the model "
         "after training each phase." if results.get("protocol") == "captions" else
         "The dynamic matrix: mean R@1 (%) of image->text and text->image retrieval on each time step's held-out "
         "pairs; rows are the model after training each step (TiC-CLIP)." if results.get("protocol") == "time" else
         "r_mean (%): the mean of R@1, R@5 and R@10, image->text and text->image, on the test images captioned "
         "in each language; rows are the model after training each language." if results.get("protocol") == "languages" else
         "Accuracy (%) of each task's test images, per image; rows are the model after training each task."),
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
        # Without a zero-shot row there may be no zero-shot held-out accuracies either.
        before_training = heldout.get("zero_shot") or [None] * len(heldout["datasets"])
        for name, before, after in zip(heldout["datasets"], before_training, final):
            lines.append(f"| {name} | {_number(before)} | {_number(after)} |")
    from clipcl.report_alignment import alignment_markdown

    alignment = alignment_markdown(results)
    if alignment:
        lines += ["", alignment]
    zero_shot_seconds = ""
    if accuracy_has_zero_shot_row(results) and timing.get("zero_shot_eval_seconds") is not None:
        zero_shot_seconds = f"{_number(timing['zero_shot_eval_seconds'])} (zero-shot), "
    lines += [
        "",
        f"Parameters: {params['trainable']:,} trainable of {params['total']:,}.",
        (f"Train seconds per task: {', '.join(_number(s) for s in timing['train_seconds'])}; "
         f"eval seconds per row: {zero_shot_seconds}{', '.join(_number(s) for s in timing['eval_seconds'])}."),
        "",
    ]
    return "\n".join(lines)


def accuracy_has_zero_shot_row(results: dict[str, Any]) -> bool:
    return results["accuracy"].get("zero_shot_row") is not None


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


class ResultsError(ValueError):
    """A results.json that cannot be summarised; the message is one line that names the file."""


# What the summary and plots read from each kind of run, as dotted keys and what each must be.
TASK_RUN_FIELDS = {
    "name": "any", "protocol": "text", "seed": "any", "tasks": "a list",
    "accuracy": "an object", "accuracy.columns": "a list of text", "accuracy.rows": "a list",
    "accuracy.matrix": "a list", "metrics": "an object",
    "parameters.trainable": "a number", "parameters.total": "a number",
    "timing.train_seconds": "a list of numbers", "timing.eval_seconds": "a list of numbers",
}
ONLINE_RUN_FIELDS = {
    "name": "any", "protocol": "text", "seed": "any",
    "anytime.samples": "a list of numbers", "anytime.accuracy": "a list of numbers",
    "stream.samples": "any", "stream.classes": "any", "metrics": "an object",
    "parameters.trainable": "a number", "parameters.total": "a number",
    "timing.train_steps": "any", "timing.train_seconds": "a number", "timing.eval_seconds": "a number",
}


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)  # JSON true is not a number


def _is_number_or_null(value: Any) -> bool:
    return value is None or _is_number(value)  # null (and NaN) read as "no measurement" ("–")


KIND_CHECKS = {
    "any": lambda value: True,
    "text": lambda value: isinstance(value, str),
    "a number": _is_number,
    "a list": lambda value: isinstance(value, list),
    "a list of numbers": lambda value: isinstance(value, list) and all(_is_number_or_null(v) for v in value),
    "a list of text": lambda value: isinstance(value, list) and all(isinstance(v, str) for v in value),
    "an object": lambda value: isinstance(value, dict),
}


def _describe(value: Any) -> str:
    if value is None or isinstance(value, bool):
        return json.dumps(value)
    return {str: "text", list: "a list", dict: "an object"}.get(type(value), "a number")


def _check_fields(results: dict[str, Any], fields: dict[str, str], path: Path) -> None:
    """Each dotted key is there and holds the kind of value named for it."""
    for key, kind in fields.items():
        value: Any = results
        for part in key.split("."):
            if not isinstance(value, dict) or part not in value:
                raise ResultsError(f"{path} lacks '{key}'")
            value = value[part]
        if not KIND_CHECKS[kind](value):
            raise ResultsError(f"{path}: '{key}' is {_describe(value)}, not {kind}")


def _check_task_run(results: dict[str, Any], path: Path) -> None:
    """The accuracy matrix matches its labels, and held-out rows are there when datasets are."""
    accuracy = results["accuracy"]
    columns, rows = len(accuracy["columns"]), len(accuracy["rows"])
    matrix = accuracy["matrix"]
    if not rows or not columns:
        raise ResultsError(f"{path}: 'accuracy.matrix' is empty (no tasks in 'accuracy.rows' or 'accuracy.columns')")
    if len(matrix) != rows:
        raise ResultsError(f"{path}: 'accuracy.matrix' has {len(matrix)} rows for {rows} labels in 'accuracy.rows'")
    for number, row in enumerate(matrix, start=1):
        if not KIND_CHECKS["a list of numbers"](row) or len(row) != columns:
            raise ResultsError(f"{path}: row {number} of 'accuracy.matrix' is not a list of {columns} numbers "
                               "(one per entry of 'accuracy.columns')")
    zero_shot_row = accuracy.get("zero_shot_row")
    if zero_shot_row is not None and (not KIND_CHECKS["a list of numbers"](zero_shot_row)
                                      or len(zero_shot_row) != columns):
        raise ResultsError(f"{path}: 'accuracy.zero_shot_row' is neither null nor a list of {columns} numbers")
    heldout = _checked_metrics_and_heldout(results, path)
    if heldout.get("datasets"):
        after_each_task = heldout.get("after_each_task")
        if not isinstance(after_each_task, list) or not after_each_task:
            raise ResultsError(f"{path} lists held-out datasets but lacks 'heldout.after_each_task'")
        if not KIND_CHECKS["a list of numbers"](after_each_task[-1]):
            raise ResultsError(f"{path}: the last row of 'heldout.after_each_task' is not a list of numbers")
        if heldout.get("zero_shot") is not None and not KIND_CHECKS["a list of numbers"](heldout["zero_shot"]):
            raise ResultsError(f"{path}: 'heldout.zero_shot' is neither null nor a list of numbers")


def _checked_metrics_and_heldout(results: dict[str, Any], path: Path) -> dict[str, Any]:
    """Check that every metric is a number (or null) and that 'heldout' is an object; return it."""
    for key, value in results["metrics"].items():
        if not _is_number_or_null(value):
            raise ResultsError(f"{path}: 'metrics.{key}' is {_describe(value)}, not a number")
    heldout = results.get("heldout") or {}
    if not isinstance(heldout, dict):
        raise ResultsError(f"{path}: 'heldout' is {_describe(heldout)}, not an object")
    return heldout


def _check_online_run(results: dict[str, Any], path: Path) -> None:
    anytime = results["anytime"]
    if len(anytime["samples"]) != len(anytime["accuracy"]):
        raise ResultsError(f"{path}: 'anytime.samples' and 'anytime.accuracy' differ in length")
    heldout = _checked_metrics_and_heldout(results, path)
    if heldout.get("datasets"):
        if not KIND_CHECKS["a list of numbers"](heldout.get("after_stream")):
            raise ResultsError(f"{path} lists held-out datasets but 'heldout.after_stream' is not a list of numbers")
        if heldout.get("zero_shot") is not None and not KIND_CHECKS["a list of numbers"](heldout["zero_shot"]):
            raise ResultsError(f"{path}: 'heldout.zero_shot' is neither null nor a list of numbers")


def load_results(run_dir: str | Path) -> dict[str, Any]:
    """The results.json of a finished run, checked to hold what the summary and plots read.

    Raises :class:`ResultsError` (one line, naming the file and the missing or wrong key) otherwise.
    """
    path = Path(run_dir) / "results.json"
    if not path.exists():
        if (Path(run_dir) / "progress.json").exists():
            raise ResultsError(f"{path} does not exist: {run_dir} holds an unfinished run (run it again to finish it)")
        raise ResultsError(f"{path} does not exist (is {run_dir} a finished clipcl run directory?)")
    try:
        text = path.read_bytes().decode("utf-8")
    except UnicodeDecodeError as error:
        raise ResultsError(f"{path} is not UTF-8 text (byte {error.start})") from None
    except OSError as error:
        raise ResultsError(f"cannot read {path}: {error.strerror or error}") from None
    try:
        results = json.loads(text)
    except json.JSONDecodeError as error:
        raise ResultsError(f"{path} is not valid JSON: {error.msg} (line {error.lineno}, column {error.colno})") from None
    if not isinstance(results, dict):
        raise ResultsError(f"{path} holds {_describe(results)}, not a JSON object of run results")
    if not results:
        raise ResultsError(f"{path} is an empty JSON object, not the results of a run")
    if results.get("protocol") == "si_blurry":
        _check_fields(results, ONLINE_RUN_FIELDS, path)
        _check_online_run(results, path)
    else:
        _check_fields(results, TASK_RUN_FIELDS, path)
        _check_task_run(results, path)
    return results


def plot_run(results: dict[str, Any], directory: str | Path) -> list[Path]:
    """Write accuracy_matrix.png and task_accuracy.png (online runs: anytime_accuracy.png), and
    alignment.png when the run measured alignment, into ``directory``, each atomically; returns their paths."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    directory = Path(directory)
    if results.get("protocol") == "si_blurry":
        anytime = results["anytime"]
        figure, axes = plt.subplots(figsize=(7, 4))
        axes.plot(anytime["samples"], np.array(anytime["accuracy"], dtype=float), marker="o")
        axes.set_xlabel("stream samples seen")
        axes.set_ylabel("accuracy on seen classes (%)")
        axes.set_ylim(0, 100)
        axes.set_title(f"{results['name']}: anytime accuracy (A_auc {_number(results['metrics'].get('a_auc'))})")
        axes.grid(alpha=0.3)
        figure.tight_layout()
        path = directory / "anytime_accuracy.png"
        save_figure(figure, path)
        from clipcl.report_compute import plot_samples_seen

        against_compute = plot_samples_seen([results], directory / "samples_seen.png")
        return [path, *([against_compute] if against_compute else [])]
    accuracy = results["accuracy"]
    has_zero_shot_row = accuracy_has_zero_shot_row(results)
    rows = (["zero-shot"] if has_zero_shot_row else []) + accuracy["rows"]
    # dtype=float reads null cells as NaN, which the plots leave blank.
    matrix = np.array(([accuracy["zero_shot_row"]] if has_zero_shot_row else []) + accuracy["matrix"], dtype=float)
    columns = accuracy["columns"]

    figure, axes = plt.subplots(figsize=(1.2 * len(columns) + 3, 0.5 * len(rows) + 2))
    image = axes.imshow(matrix, vmin=0, vmax=100, cmap="viridis")
    axes.set_xticks(range(len(columns)), columns, rotation=30, ha="right")
    axes.set_yticks(range(len(rows)), rows)
    for r in range(matrix.shape[0]):
        for c in range(matrix.shape[1]):
            axes.text(c, r, _number(float(matrix[r, c])), ha="center", va="center",
                      color="white" if matrix[r, c] < 60 else "black", fontsize=8)
    axes.set_xlabel("evaluated on task")
    measure = {"captions": "mean R@1 (%)", "time": "mean R@1 (%)", "languages": "r_mean (%)"}.get(
        results.get("protocol"), "accuracy (%)")
    axes.set_title(f"{results['name']}: {measure}")
    figure.colorbar(image, ax=axes, fraction=0.04)
    figure.tight_layout()
    heatmap = directory / "accuracy_matrix.png"
    save_figure(figure, heatmap)

    figure, axes = plt.subplots(figsize=(7, 4))
    steps = range(len(rows))
    for column, name in enumerate(columns):
        axes.plot(steps, matrix[:, column], marker="o", label=name)
    task_ticks = [str(i + 1) for i in range(len(accuracy["rows"]))]
    axes.set_xticks(list(steps), (["zs"] if has_zero_shot_row else []) + task_ticks)
    axes.set_xlabel("after training task (zs = zero-shot)" if has_zero_shot_row else "after training task")
    axes.set_ylabel(measure)
    axes.set_ylim(0, 100)
    axes.set_title(f"{results['name']}: each task over the stream")
    axes.legend(fontsize=7)
    figure.tight_layout()
    curves = directory / "task_accuracy.png"
    save_figure(figure, curves)
    from clipcl.report_alignment import plot_alignment
    from clipcl.report_compute import plot_samples_seen

    against_compute = plot_samples_seen([results], directory / "samples_seen.png")
    return [heatmap, curves, *plot_alignment(results, directory),
            *([against_compute] if against_compute else [])]
