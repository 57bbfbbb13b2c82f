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


def seen_average(matrix) -> float:
    """CoLeCLIP's seen-average: for each task d, the mean of acc[t, d] over t >= d (the lower triangle,
    diagonal included: every moment after task d was learnt); then the mean over d. The official
    ``tools/eval_metric.py:42-48`` (YukunLi99/CoLeCLIP @ c6f8d34) averages per column, then over columns."""
    array = as_matrix(matrix)
    return float(np.mean([array[d:, d].mean() for d in range(array.shape[0])]))


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


def english_forgetting(matrix, english: int = 0) -> float:
    """CLL-CLIP's Fen: the best score on the English column (``english``) of any model before the last,
    minus the last model's (official projects/cll_clip/scripts/gather.py:178-180: the maximum over every
    earlier row, not the first value). NaN with one row."""
    array = as_matrix(matrix)
    if array.shape[0] < 2:
        return float("nan")
    return float(array[:-1, english].max() - array[-1, english])


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


def updated_task_accuracies(matrix, task_sizes: Sequence[int] | None = None) -> list[float]:
    """UT_t of "Don't Stop Learning" (Ding et al. 2022): after each phase t, the accuracy over the test
    images of every phase seen so far (size-weighted mean of ``matrix[t, :t+1]``). In a
    class-incremental stream each of those entries is already scored over all classes seen so far,
    so UT_t is the accuracy on the updated task's seen classes."""
    array = as_matrix(matrix)
    size = array.shape[0]
    weights = np.ones(size) if task_sizes is None else np.asarray(task_sizes, dtype=np.float64)
    if len(weights) != size:
        raise ValueError(f"task_sizes has {len(weights)} entries for a {size}-task matrix")
    return [float(np.average(array[t, : t + 1], weights=weights[: t + 1])) for t in range(size)]


def dont_stop_learning(matrix, task_sizes: Sequence[int] | None, heldout_zero_shot: Sequence[float] | None,
                       heldout_last: Sequence[float]) -> dict[str, float]:
    """The metrics of Ding et al. (2022), from the accuracy matrix and the held-out accuracies.

    - ``ut_acc``: mean over phases of UT_t (:func:`updated_task_accuracies`); with one phase
      (one-session) it is simply the accuracy after training. ``ut_last``: UT after the last phase.
    - ``zs_acc``: mean accuracy on the held-out datasets (never trained on) after the last phase;
      ``zs_acc_zero_shot``: the same before any training (left out when ``heldout_zero_shot`` is None:
      the run did not measure before training).
    - ``a_acc``: (ut_acc + zs_acc) / 2.
    - ``bwt`` is :func:`backward_transfer` of the matrix (NaN with one phase).
    Without held-out datasets there is no ZS-Acc, and only the UT entries are returned.
    """
    per_phase = updated_task_accuracies(matrix, task_sizes)
    ut_acc = float(np.mean(per_phase))
    results = {"ut_acc": ut_acc, "ut_last": per_phase[-1]}
    if len(heldout_last):
        final = float(np.mean(heldout_last))
        results.update(zs_acc=final, a_acc=(ut_acc + final) / 2.0)
        if heldout_zero_shot is not None:
            results["zs_acc_zero_shot"] = float(np.mean(heldout_zero_shot))
    return results


def retrieval_change(before: dict[str, dict[str, float]], after: dict[str, dict[str, float]],
                     ks: Sequence[int] = (1,)) -> dict[str, float]:
    """Retrieval forgetting: final R@K minus zero-shot R@K, both directions, averaged over the sets.

    Keys ``i2t_r1_zero_shot``, ``i2t_r1_last``, ``i2t_r1_change`` and the same for ``t2i``.
    """
    results: dict[str, float] = {}
    names = [name for name in before if name in after]
    if not names:
        return results
    for direction, short in (("image_to_text", "i2t"), ("text_to_image", "t2i")):
        for k in ks:
            key = f"{direction}_R@{k}"
            start = float(np.mean([before[name][key] for name in names]))
            end = float(np.mean([after[name][key] for name in names]))
            results[f"{short}_r{k}_zero_shot"] = start
            results[f"{short}_r{k}_last"] = end
            results[f"{short}_r{k}_change"] = end - start
    return results


def dynamic_transfer(matrix) -> dict[str, float]:
    """TiC-CLIP's summary of the dynamic matrix (row: step trained, column: step evaluated): the mean
    of the diagonal (in-distribution), of the entries below it (backward transfer: older steps) and
    above it (forward transfer: steps not trained on yet; NaN with one step)."""
    values = as_matrix(matrix)
    below, above = np.tril_indices(len(values), -1), np.triu_indices(len(values), 1)
    return {"dynamic_in_distribution": float(np.mean(np.diag(values))),
            "dynamic_backward": float(np.mean(values[below])) if len(below[0]) else float("nan"),
            "dynamic_forward": float(np.mean(values[above])) if len(above[0]) else float("nan")}


def all_metrics(matrix, task_sizes: Sequence[int] | None = None, class_incremental: bool = False,
                open_domain: bool = False, languages: bool = False, time: bool = False) -> dict[str, float]:
    """Every matrix metric in one dict (keys: transfer, avg, last, bwt, forgetting[, avg_incremental]
    [, seen_avg with ``open_domain``][, CLL-CLIP's aa, f, fen with ``languages``: AA is Last, F is
    forgetting (gather.py:163-176 read the same entries), Fen :func:`english_forgetting`, English the first task]
    [, TiC-CLIP's :func:`dynamic_transfer` with ``time``])."""
    metrics = {
        "transfer": transfer(matrix),
        "avg": average(matrix),
        "last": last(matrix),
        "bwt": backward_transfer(matrix),
        "forgetting": forgetting(matrix),
    }
    if class_incremental:
        metrics["avg_incremental"] = average_incremental_accuracy(matrix, task_sizes)
    if open_domain:
        metrics["seen_avg"] = seen_average(matrix)
    if languages:
        metrics.update(aa=metrics["last"], f=metrics["forgetting"], fen=english_forgetting(matrix))
    if time:
        metrics.update(dynamic_transfer(matrix))
    return metrics


ALIGNMENT_TRACKED = ("modality_gap", "alignment", "uniformity_image", "uniformity_text")
"""Alignment measures whose change from the zero-shot row is summarised (:func:`alignment_change`)."""


def alignment_change(before: dict[str, dict[str, float]], after: dict[str, dict[str, float]]) -> dict[str, float]:
    """Alignment summary over the measured sets (means over the sets both rows measured): for each
    of :data:`ALIGNMENT_TRACKED`, ``<measure>_zero_shot``, ``<measure>_last`` and ``<measure>_change``;
    and the last row's rotation against the zero-shot model, ``<measure>_last`` for every
    ``vs_zero_shot/...`` measure. Sets are weighted equally."""
    results: dict[str, float] = {}
    names = sorted(after)
    for key in ALIGNMENT_TRACKED:
        last = [after[name][key] for name in names if after[name].get(key) is not None]
        if not last:
            continue
        results[f"{key}_last"] = float(np.mean(last))
        both = [name for name in names if name in before and before[name].get(key) is not None
                and after[name].get(key) is not None]
        if both:
            start = float(np.mean([before[name][key] for name in both]))
            end = float(np.mean([after[name][key] for name in both]))
            results[f"{key}_zero_shot"] = start
            results[f"{key}_change"] = end - start
    reference_keys = sorted({key for name in names for key in after[name] if key.startswith("vs_zero_shot/")})
    for key in reference_keys:
        values = [after[name][key] for name in names if key in after[name] and after[name][key] is not None]
        if values:
            results[f"{key.split('/', 1)[1]}_vs_zero_shot_last"] = float(np.mean(values))
    return results

