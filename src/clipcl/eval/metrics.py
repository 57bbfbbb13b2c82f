"""Continual-learning metrics as pure functions of the accuracy matrix.

``matrix[t][d]`` is the accuracy on task ``d`` after training task ``t`` (T rows x T columns, rows
"after training task t", columns "evaluated on task d"). The zero-shot row (before any training) is
passed separately where a metric needs it. No function modifies its input. Definitions are in
docs/metrics.md.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np


def as_matrix(matrix: Sequence[Sequence[float]]) -> np.ndarray:
    """A float copy of a square matrix; raises ValueError otherwise."""
    array = np.array(matrix, dtype=np.float64, copy=True)
    if array.ndim != 2 or array.shape[0] != array.shape[1] or array.shape[0] == 0:
        raise ValueError(f"expected a non-empty square T x T accuracy matrix, got shape {array.shape}")
    if not np.all(np.isfinite(array)):
        raise ValueError("the accuracy matrix holds a non-finite value")
    return array


def transfer(matrix) -> float:
    """ZSCL's Transfer: for each task d after the first, the mean of acc[t, d] over t < d; then the
    mean over d. Measures zero-shot ability on tasks not trained yet. NaN when T = 1."""
    array = as_matrix(matrix)
    size = array.shape[0]
    if size < 2:
        return float("nan")
    return float(np.mean([array[:d, d].mean() for d in range(1, size)]))


def average(matrix) -> float:
    """ZSCL's Avg: the mean of every entry of the T x T matrix (all tasks, all moments)."""
    return float(as_matrix(matrix).mean())


def last(matrix) -> float:
    """Last: the mean accuracy over all tasks after training the final task (the last row)."""
    return float(as_matrix(matrix)[-1].mean())


def backward_transfer(matrix) -> float:
    """BWT (Lopez-Paz & Ranzato 2017): mean over d < T of acc[T, d] - acc[d, d]. NaN when T = 1."""
    array = as_matrix(matrix)
    size = array.shape[0]
    if size < 2:
        return float("nan")
    return float(np.mean([array[-1, d] - array[d, d] for d in range(size - 1)]))


def forgetting(matrix) -> float:
    """Average forgetting (Chaudhry et al. 2018): mean over d < T of the best accuracy on d after
    it was learnt and before the end, minus the final accuracy on d. NaN when T = 1."""
    array = as_matrix(matrix)
    size = array.shape[0]
    if size < 2:
        return float("nan")
    return float(np.mean([array[d:size - 1, d].max() - array[-1, d] for d in range(size - 1)]))


def average_incremental_accuracy(matrix, task_sizes: Sequence[int] | None = None) -> float:
    """Class-incremental average incremental accuracy (Rebuffi et al. 2017): after each task t, the
    accuracy over the test images of all tasks seen so far, averaged over t.

    With ``task_sizes`` (test images per task) the accuracy after task t is weighted by task size,
    which equals the accuracy over the union of the seen tasks' test images; without, a plain mean.
    """
    array = as_matrix(matrix)
    size = array.shape[0]
    weights = np.ones(size) if task_sizes is None else np.asarray(task_sizes, dtype=np.float64)
    if len(weights) != size:
        raise ValueError(f"task_sizes has {len(weights)} entries for a {size}-task matrix")
    seen = [np.average(array[t, : t + 1], weights=weights[: t + 1]) for t in range(size)]
    return float(np.mean(seen))


def retention(zero_shot: Sequence[float], after: Sequence[float]) -> float:
    """Held-out zero-shot retention: final accuracy on never-trained datasets as a share (%) of the
    zero-shot accuracy on them, averaged over datasets. 100 means nothing lost."""
    before = np.asarray(zero_shot, dtype=np.float64)
    final = np.asarray(after, dtype=np.float64)
    if before.shape != final.shape or before.size == 0:
        return float("nan")
    with np.errstate(divide="ignore", invalid="ignore"):
        ratios = np.where(before > 0, 100.0 * final / before, np.nan)
    return float(np.nanmean(ratios)) if np.any(np.isfinite(ratios)) else float("nan")


def all_metrics(matrix, task_sizes: Sequence[int] | None = None, class_incremental: bool = False) -> dict[str, float]:
    """Every matrix metric in one dict (keys: transfer, avg, last, bwt, forgetting[, avg_incremental])."""
    metrics = {
        "transfer": transfer(matrix),
        "avg": average(matrix),
        "last": last(matrix),
        "bwt": backward_transfer(matrix),
        "forgetting": forgetting(matrix),
    }
    if class_incremental:
        metrics["avg_incremental"] = average_incremental_accuracy(matrix, task_sizes)
    return metrics
