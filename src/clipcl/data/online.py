"""Si-Blurry online streams and the anytime metrics measured on them.

Si-Blurry ("stochastic incremental blurry" task boundaries) is the online scenario of Moon et al.
(ICCV 2023, MVP; github.com/moonjunyyy/Si-Blurry), also used by Wang et al. (2024, "CLIP model is an
Efficient Online Lifelong Learner"; github.com/Debatrix/LifeLong-CLIP, whose sampler has the same
logic). The training set arrives once, as a sequence of hidden tasks of random size. A share N of the
classes is *disjoint*: every sample of such a class arrives within one task. The other classes are
*blurry*: a share M of their samples is scattered over the stream, so those classes leak across task
boundaries. The learner never sees the boundaries; it only knows which classes it has met so far.

What the official sampler does
------------------------------
``utils/online_sampler.py`` (``OnlineSampler``), in the random "N and M vary over tasks" branch. That
branch is the one both papers' scripts run: LifeLong-CLIP passes ``--rnd_NM`` through to it, and in the
Si-Blurry repository the trainer's positional arguments put ``selection_size`` (default 1, truthy) in
the flag's slot, so it is taken there too. N and M are integer percentages. Its steps:

1. ``C`` is the number of classes of the dataset (``dataset.classes``). The disjoint count is
   ``C * N // 100`` rounded down to a multiple of the number of tasks ``T``; the blurry count is the rest,
   also rounded down to a multiple of ``T``. Classes left over by that second rounding are in neither
   group, and their samples never enter the stream.
2. One seeded permutation of the class ids; its first classes are the disjoint ones, the next ones the
   blurry ones.
3. Each group is cut into ``T`` consecutive runs at ``T - 1`` cut points drawn uniformly, with
   replacement, from ``0 .. count - 1`` and sorted. So tasks get uneven numbers of classes, a task may
   get none, and the last task always gets at least one (when the group is not empty).
4. Every sample goes to the task of its class (disjoint or blurry), in dataset index order.
5. Blurring: a budget ``B = (number of blurry-class samples) * M // 100`` is cut into ``T`` random
   quotas (same cut-point rule). Task ``i`` hands over the *first* ``quota_i`` of its blurry-class
   samples in dataset index order (fewer if it has fewer). The handed-over samples are pooled, shuffled,
   and dealt back: task ``i`` receives the next ``quota_i`` of the pool. A pooled sample can therefore land
   back in its own task, and a task's size is (up to the capping) unchanged by the blurring.
6. Within each task, the task's samples are put in a seeded random order. The trainer runs the tasks
   one after the other, so the stream is their concatenation (its data loader restarts at every task, so
   a batch never straddles a boundary).

All randomness comes from one ``torch.Generator`` seeded with the run seed.

The official training loop evaluates whenever the count of samples seen first exceeds the next
multiple of ``eval_period`` (``samples_cnt > num_eval``; ``num_eval`` then grows by one period), on
the test images of the classes exposed so far, classified among them. **A_auc is** ``np.mean`` **of
those periodic accuracies**: a plain mean of the evaluated points, not a trapezoid area. The evaluation
at the end of each task is kept apart; A_last is the one after the last task, and it is not part of the
A_auc mean unless a periodic evaluation falls there too. Accuracies are fractions in the code and
percentages in the papers.

How this module differs
-----------------------
- **Every sample exactly once.** N is a fraction in ``[0, 1]``; the disjoint count is
  ``floor(N * C)`` and *all* other classes are blurry. Nothing is rounded to a multiple of ``T``, so no
  class is dropped. This gives the same counts whenever ``floor(N * C)`` and ``C - floor(N * C)`` are
  multiples of ``T`` (CIFAR-100 and 200-class sets with N = 50 %, T = 5 or 10, as in both papers).
- **Classes** are the distinct values of ``labels`` (classes with no training sample play no part);
  the official sampler permutes ``range(len(dataset.classes))``.
- **The blurred samples are drawn at random**, uniformly among all blurry-class samples, not taken as
  the first ones of each task in dataset index order (in a class-sorted dataset that official rule hands
  over whole classes rather than a sample of them).
- **M is the share of blurry-class samples that arrive outside their class's own task**, exactly
  ``floor(M * n_blurry)`` of them: each chosen sample goes to one of the *other* ``T - 1`` tasks, drawn
  uniformly. In the official pool-and-deal scheme a pooled sample falls back into its own task with
  probability about ``quota_i / B``, so the share actually outside is below M (about
  ``M * (1 - sum_i (quota_i / B) ** 2)``, at most ``M * (1 - 1/T)``), and the tasks' sizes are set by
  the class split alone. Here the blurring also changes the tasks' sizes a little. With
  ``T = 1`` no sample can leave its task and M has no effect.
- **Random numbers** come from ``numpy.random.default_rng(seed)``, so a seed gives a different (equally
  distributed, in the class split) stream than the official code with the same seed.
- The within-task shuffle and the concatenation of tasks are as in the official sampler. How the stream
  is cut into batches (the official loader never mixes two tasks in one batch) is the consumer's business
  (:mod:`clipcl.engine.online` batches the concatenated order).
- :func:`anytime_accuracy_auc` is the official plain mean of the evaluated points; its inputs are
  whatever points the caller evaluated (a final end-of-stream point included, if the caller adds one).
  :func:`anytime_accuracy_area` is the trapezoid area divided by the span of samples, for comparison.

Pure numpy; importing this module loads neither torch, torchvision nor open_clip.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from numbers import Integral, Real

import numpy as np

from clipcl.config.schema import ConfigError

# Guards floor(ratio * count) against float noise such as 0.29 * 100 = 28.999999999999996.
_FLOOR_SLACK = 1e-9


def _is_int(value) -> bool:
    return isinstance(value, Integral) and not isinstance(value, bool)


def _floor_share(ratio: float, count: int) -> int:
    return min(count, math.floor(ratio * count + _FLOOR_SLACK))


@dataclass
class SiBlurryConfig:
    """The knobs of a Si-Blurry stream: hidden task count, N and M (as fractions) and the seed."""

    num_tasks: int = 5
    """How many hidden tasks the stream is made of."""
    disjoint_class_ratio: float = 0.5
    """N: share of the classes (0..1) whose samples all arrive within one task."""
    blurry_sample_ratio: float = 0.1
    """M: share (0..1) of the blurry classes' samples that arrive in a task other than their class's."""
    seed: int = 0
    """Seed of every random choice (class split, task sizes, blurring, within-task order)."""

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        """Raise ValueError, with a one-line message, if a field is out of range."""
        if not _is_int(self.num_tasks) or self.num_tasks < 1:
            raise ConfigError(f"num_tasks must be an integer >= 1, got {self.num_tasks!r}")
        for name in ("disjoint_class_ratio", "blurry_sample_ratio"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, Real) or not 0.0 <= float(value) <= 1.0:
                raise ConfigError(f"{name} must be a number in [0, 1], got {value!r}")
        if not _is_int(self.seed) or self.seed < 0:
            raise ConfigError(f"seed must be an integer >= 0, got {self.seed!r}")


def _frozen_int_array(values) -> np.ndarray:
    array = np.array(values, dtype=np.int64)
    array.setflags(write=False)
    return array


@dataclass(frozen=True, eq=False)
class SiBlurryStream:
    """One Si-Blurry arrival order and its hidden task structure.

    Only ``order`` (and the labels of the samples it names) is meant for the learner; everything about
    tasks is for analysis. Build one with :func:`si_blurry_order`, or by hand with :meth:`from_arrivals`.
    """

    order: np.ndarray
    """Dataset indices in arrival order; every sample exactly once (int64)."""
    task_of_position: np.ndarray
    """Hidden task of each position of ``order`` (non-decreasing, int64)."""
    task_boundaries: np.ndarray
    """Position where each task starts (int64, one per task; an empty task starts where the next does)."""
    disjoint_classes: list[int]
    """Classes whose samples all arrive within their own task (sorted)."""
    blurry_classes: list[int]
    """Classes part of whose samples arrive in other tasks (sorted)."""
    classes_of_task: list[list[int]]
    """For each task, the classes whose first sample arrives in it (sorted)."""
    home_task_of_class: dict[int, int]
    """The task each class was assigned to by the class split."""
    labels_in_order: np.ndarray
    """Label of the sample at each position (int64)."""
    class_arrival_order: list[int]
    """All classes, in the order their first sample arrives."""
    first_position_of_class: dict[int, int] = field(repr=False)
    """Position of each class's first sample."""

    @classmethod
    def from_arrivals(cls, labels, order, task_of_position, num_tasks: int,
                      home_task_of_class: Mapping[int, int], disjoint_classes: Sequence[int] = ()) -> SiBlurryStream:
        """Derive the task and class bookkeeping of a given arrival order.

        ``labels`` are the dataset's labels (indexed by dataset index), ``order`` the arrival order and
        ``task_of_position`` the hidden task of each position. Classes not in ``disjoint_classes`` are
        blurry.
        """
        labels = _as_labels(labels)
        order = np.asarray(order)
        task_of_position = np.asarray(task_of_position)
        if order.ndim != 1 or len(order) != len(labels) or (len(order) and not np.issubdtype(order.dtype, np.integer)):
            raise ValueError("order must be a 1-D integer array with one entry per sample")
        if not np.array_equal(np.sort(order), np.arange(len(labels))):
            raise ValueError("order must contain every sample index exactly once")
        if task_of_position.shape != order.shape:
            raise ValueError("task_of_position must have one entry per position of order")
        if not _is_int(num_tasks) or num_tasks < 1:
            raise ValueError(f"num_tasks must be an integer >= 1, got {num_tasks!r}")
        if len(task_of_position) and (task_of_position.min() < 0 or task_of_position.max() >= num_tasks
                                      or np.any(np.diff(task_of_position) < 0)):
            raise ValueError("task_of_position must be non-decreasing and within 0 .. num_tasks - 1")

        labels_in_order = labels[order]
        classes, first_positions = np.unique(labels_in_order, return_index=True)
        class_list = [int(c) for c in classes]
        home = {int(c): int(t) for c, t in home_task_of_class.items()}
        if set(home) != set(class_list) or any(not 0 <= t < num_tasks for t in home.values()):
            raise ValueError("home_task_of_class must give a task in 0 .. num_tasks - 1 for every class")
        disjoint = sorted({int(c) for c in disjoint_classes})
        if not set(disjoint) <= set(class_list):
            raise ValueError("disjoint_classes names a class that has no sample")
        blurry = sorted(set(class_list) - set(disjoint))

        boundaries = np.searchsorted(task_of_position, np.arange(num_tasks), side="left")
        first_task = task_of_position[first_positions] if len(order) else np.zeros(0, dtype=np.int64)
        classes_of_task = [sorted(int(c) for c in classes[first_task == t]) for t in range(num_tasks)]
        by_arrival = np.argsort(first_positions, kind="stable")
        return cls(
            order=_frozen_int_array(order),
            task_of_position=_frozen_int_array(task_of_position),
            task_boundaries=_frozen_int_array(boundaries),
            disjoint_classes=disjoint,
            blurry_classes=blurry,
            classes_of_task=classes_of_task,
            home_task_of_class=dict(sorted(home.items())),
            labels_in_order=_frozen_int_array(labels_in_order),
            class_arrival_order=[int(classes[i]) for i in by_arrival],
            first_position_of_class={int(c): int(p) for c, p in zip(classes, first_positions)},
        )

    def __len__(self) -> int:
        return len(self.order)

    @property
    def num_tasks(self) -> int:
        return len(self.task_boundaries)

    @property
    def task_sizes(self) -> list[int]:
        """Number of samples in each hidden task."""
        ends = list(self.task_boundaries[1:]) + [len(self.order)]
        return [int(end - start) for start, end in zip(self.task_boundaries, ends)]

    def first_seen_position(self, cls: int) -> int:
        """Position in ``order`` of the first sample of class ``cls``."""
        try:
            return self.first_position_of_class[int(cls)]
        except KeyError:
            raise ValueError(f"class {cls!r} has no sample in the stream") from None

    def positions_of_task(self, task: int) -> np.ndarray:
        """Positions of ``order`` that belong to hidden task ``task``."""
        if not 0 <= task < self.num_tasks:
            raise ValueError(f"task must be in 0 .. {self.num_tasks - 1}, got {task!r}")
        end = self.task_boundaries[task + 1] if task + 1 < self.num_tasks else len(self.order)
        return np.arange(self.task_boundaries[task], end, dtype=np.int64)


def _as_labels(labels) -> np.ndarray:
    array = np.asarray(labels)
    if array.ndim != 1:
        raise ValueError(f"labels must be a 1-D array, got shape {array.shape}")
    if len(array) == 0:
        raise ValueError("labels is empty: a stream needs at least one sample")
    if not np.issubdtype(array.dtype, np.integer):
        raise ValueError(f"labels must be integers, got dtype {array.dtype}")
    if array.min() < 0:
        raise ValueError("labels must be >= 0")
    return array.astype(np.int64, copy=False)


def _random_split_sizes(rng: np.random.Generator, count: int, parts: int) -> np.ndarray:
    """Split ``count`` items into ``parts`` consecutive runs of random, uneven size (some may be 0).

    As in the official sampler: ``parts - 1`` cut points uniform over ``0 .. count - 1``, with
    replacement, sorted. The last run is never empty when ``count > 0``.
    """
    if count == 0:
        return np.zeros(parts, dtype=np.int64)
    cuts = np.sort(rng.integers(0, count, size=parts - 1))
    return np.diff(np.concatenate([[0], cuts, [count]])).astype(np.int64)


def si_blurry_order(labels: np.ndarray, config: SiBlurryConfig) -> SiBlurryStream:
    """Draw the Si-Blurry arrival order of a training set with these ``labels`` (see the module notes)."""
    labels = _as_labels(labels)
    if not isinstance(config, SiBlurryConfig):
        raise TypeError(f"config must be a SiBlurryConfig, got {type(config).__name__}")
    config.validate()  # again: the dataclass is mutable, a field may have changed since it was made
    rng = np.random.default_rng(config.seed)
    num_tasks = config.num_tasks

    classes, class_of_sample = np.unique(labels, return_inverse=True)
    shuffled = rng.permutation(len(classes))  # positions into ``classes``
    num_disjoint = _floor_share(config.disjoint_class_ratio, len(classes))
    disjoint_ids, blurry_ids = shuffled[:num_disjoint], shuffled[num_disjoint:]

    # The home task of every class: each group is cut into random runs along the shuffled order.
    home_of_class = np.empty(len(classes), dtype=np.int64)
    for group in (disjoint_ids, blurry_ids):
        sizes = _random_split_sizes(rng, len(group), num_tasks)
        home_of_class[group] = np.repeat(np.arange(num_tasks), sizes)
    task_of_sample = home_of_class[class_of_sample]

    # Blurring: a fixed number of blurry-class samples, chosen uniformly, each moved to another task.
    is_blurry_class = np.zeros(len(classes), dtype=bool)
    is_blurry_class[blurry_ids] = True
    blurry_samples = np.flatnonzero(is_blurry_class[class_of_sample])
    num_moved = _floor_share(config.blurry_sample_ratio, len(blurry_samples)) if num_tasks > 1 else 0
    if num_moved:
        moved = np.sort(rng.choice(blurry_samples, size=num_moved, replace=False))
        # Draw among the T - 1 other tasks: shift draws at or past the home task up by one.
        draw = rng.integers(0, num_tasks - 1, size=num_moved)
        task_of_sample[moved] = draw + (draw >= task_of_sample[moved])

    # Tasks in sequence; within a task, a seeded shuffle of its samples (taken in index order first).
    pieces = [rng.permutation(np.flatnonzero(task_of_sample == task)) for task in range(num_tasks)]
    order = np.concatenate(pieces).astype(np.int64)
    task_of_position = np.repeat(np.arange(num_tasks), [len(piece) for piece in pieces])
    return SiBlurryStream.from_arrivals(
        labels, order, task_of_position, num_tasks,
        home_task_of_class={int(classes[i]): int(home_of_class[i]) for i in range(len(classes))},
        disjoint_classes=[int(classes[i]) for i in disjoint_ids])


def seen_classes_at(stream: SiBlurryStream, position: int) -> list[int]:
    """Classes whose first sample is at ``position`` or earlier, in order of first arrival.

    This is the label space of an anytime evaluation made after ``position + 1`` samples (so after
    ``k`` samples, ask for ``k - 1``). A negative position gives no class.
    """
    if not _is_int(position):
        raise ValueError(f"position must be an integer, got {position!r}")
    first = [stream.first_position_of_class[c] for c in stream.class_arrival_order]
    count = int(np.searchsorted(np.asarray(first, dtype=np.int64), position, side="right"))
    return list(stream.class_arrival_order[:count])


def _curve(sample_counts: Sequence[int], accuracies: Sequence[float]) -> tuple[np.ndarray, np.ndarray]:
    samples = np.asarray(sample_counts, dtype=np.float64)
    values = np.asarray(accuracies, dtype=np.float64)
    if samples.ndim != 1 or values.ndim != 1 or len(samples) != len(values):
        raise ValueError("sample_counts and accuracies must be 1-D and of the same length")
    if len(values) == 0:
        raise ValueError("the accuracy curve is empty")
    if np.any(np.diff(samples) <= 0):
        raise ValueError("sample_counts must be strictly increasing")
    return samples, values


def anytime_accuracy_auc(sample_counts: Sequence[int], accuracies: Sequence[float]) -> float:
    """A_auc as the official Si-Blurry / LifeLong-CLIP code computes it: the plain mean of the
    accuracies evaluated along the stream (one every ``eval_period`` samples there).

    ``sample_counts`` (samples seen at each evaluation) are only checked, not used as weights: for
    evenly spaced evaluations the mean is the area under the step curve divided by the span. Same unit
    as ``accuracies`` (percent in clipcl).
    """
    _, values = _curve(sample_counts, accuracies)
    return float(np.mean(values))


def anytime_accuracy_area(sample_counts: Sequence[int], accuracies: Sequence[float]) -> float:
    """Area under the accuracy-vs-samples-seen curve (trapezoid rule) divided by the span of samples
    between the first and the last evaluation. One point gives that point. Not the official A_auc
    (see :func:`anytime_accuracy_auc`); it weights unevenly spaced evaluations by the gap around them.
    """
    samples, values = _curve(sample_counts, accuracies)
    if len(values) == 1:
        return float(values[0])
    area = float(np.sum((values[1:] + values[:-1]) * np.diff(samples)) / 2.0)
    return area / float(samples[-1] - samples[0])


def a_last(accuracies: Sequence[float]) -> float:
    """A_last: the accuracy of the last evaluation (after the whole stream)."""
    values = np.asarray(accuracies, dtype=np.float64)
    if values.ndim != 1 or len(values) == 0:
        raise ValueError("the accuracy curve is empty")
    return float(values[-1])


__all__ = [
    "SiBlurryConfig",
    "SiBlurryStream",
    "a_last",
    "anytime_accuracy_area",
    "anytime_accuracy_auc",
    "seen_classes_at",
    "si_blurry_order",
]
