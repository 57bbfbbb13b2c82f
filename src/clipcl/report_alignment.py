"""The alignment part of a run's report: a Markdown table and ``alignment.png`` (docs/metrics.md)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from clipcl.atomic_files import save_figure

PLOTTED = (
    ("modality_gap", "modality gap (centroid distance)"),
    ("alignment", "alignment (mean squared pair distance)"),
    ("vs_zero_shot/rotation_image_deg", "image rotation vs zero-shot (deg)"),
    ("vs_zero_shot/similarity_correlation_image", "image similarity correlation vs zero-shot"),
)
"""The measures ``alignment.png`` shows, one panel each, with their axis labels."""

TABLED = ("modality_gap", "alignment", "uniformity_image", "uniformity_text", "vs_zero_shot/rotation_image_deg",
          "vs_zero_shot/rotation_text_deg", "vs_zero_shot/inter_modal_deviation_deg",
          "vs_previous/rotation_image_deg")
"""The measures the summary's table lists for the last row."""


def alignment_rows(results: dict[str, Any]) -> tuple[list[str], list[dict[str, dict[str, float]]]]:
    """Row labels (``zs``, 1, 2, ...) and each row's measures by set; empty when none were measured."""
    alignment = results.get("alignment") or {}
    rows = alignment.get("after_each_task") or []
    if not rows or not any(rows):
        return [], []
    labels, measured = [], []
    if alignment.get("zero_shot"):
        labels.append("zs")
        measured.append(alignment["zero_shot"])
    labels += [str(index + 1) for index in range(len(rows))]
    measured += rows
    return labels, measured


def _number(value: Any) -> str:
    return "–" if value is None else f"{value:.3f}"


def alignment_markdown(results: dict[str, Any]) -> str:
    """A table of the last row's alignment measures per set (and the zero-shot modality gap), or ''."""
    labels, measured = alignment_rows(results)
    if not measured:
        return ""
    first, last = measured[0], measured[-1]
    heading = ("Image-text alignment after the last task (definitions: docs/metrics.md; the zero-shot modality "
               "gap in brackets):")
    lines = [heading, "", "| set | " + " | ".join(TABLED) + " |", "|---|" + "---|" * len(TABLED)]
    for name in sorted(last):
        cells = [_number(last[name].get(key)) for key in TABLED]
        if labels[0] == "zs" and "modality_gap" in first.get(name, {}):
            cells[0] += f" ({_number(first[name]['modality_gap'])})"
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def plot_alignment(results: dict[str, Any], directory: str | Path) -> list[Path]:
    """``alignment.png``: each measure of :data:`PLOTTED` per set over the stream; [] when none."""
    labels, measured = alignment_rows(results)
    if not measured:
        return []
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = sorted({name for row in measured for name in row})
    figure, grid = plt.subplots(2, 2, figsize=(11, 7))
    for axes, (key, title) in zip(grid.flat, PLOTTED):
        for name in names:
            values = [row.get(name, {}).get(key) for row in measured]
            axes.plot(range(len(labels)), [float("nan") if value is None else value for value in values],
                      marker="o", label=name)
        axes.set_xticks(range(len(labels)), labels)
        axes.set_title(title, fontsize=9)
        axes.grid(alpha=0.3)
    grid.flat[0].legend(fontsize=6)
    figure.suptitle(f"{results['name']}: image-text alignment after each task (zs = zero-shot)", fontsize=10)
    figure.tight_layout()
    path = Path(directory) / "alignment.png"
    save_figure(figure, path)
    return [path]
