"""Si-Blurry online streams (clipcl.data.online): coverage, N and M, determinism, anytime metrics."""

import subprocess
import sys

import numpy as np
import pytest

from clipcl.data.online import (
    SiBlurryConfig,
    SiBlurryStream,
    a_last,
    anytime_accuracy_area,
    anytime_accuracy_auc,
    seen_classes_at,
    si_blurry_order,
)

NUM_CLASSES, PER_CLASS = 20, 30


def make_labels(num_classes=NUM_CLASSES, per_class=PER_CLASS, shuffle_seed=123):
    """Balanced labels in a shuffled dataset order (as CIFAR stores them)."""
    labels = np.repeat(np.arange(num_classes), per_class)
    return np.random.default_rng(shuffle_seed).permutation(labels)


def stream_of(**config):
    return si_blurry_order(make_labels(), SiBlurryConfig(**config))


def task_of_sample(stream):
    """Hidden task of each dataset index."""
    tasks = np.empty(len(stream), dtype=np.int64)
    tasks[stream.order] = stream.task_of_position
    return tasks


@pytest.mark.parametrize("config", [
    {}, {"num_tasks": 3, "disjoint_class_ratio": 0.3, "blurry_sample_ratio": 0.4, "seed": 5},
    {"num_tasks": 7, "disjoint_class_ratio": 1.0, "blurry_sample_ratio": 0.0}, {"num_tasks": 1},
])
def test_every_sample_arrives_exactly_once(config):
    labels = make_labels()
    stream = si_blurry_order(labels, SiBlurryConfig(**config))
    assert stream.order.dtype == np.int64
    np.testing.assert_array_equal(np.sort(stream.order), np.arange(len(labels)))
    np.testing.assert_array_equal(stream.labels_in_order, labels[stream.order])
    # The hidden task index is non-decreasing and the boundaries are where it steps.
    assert len(stream.task_of_position) == len(labels)
    assert np.all(np.diff(stream.task_of_position) >= 0)
    assert stream.num_tasks == SiBlurryConfig(**config).num_tasks
    assert sum(stream.task_sizes) == len(labels)
    for task, start in enumerate(stream.task_boundaries):
        positions = stream.positions_of_task(task)
        assert np.all(stream.task_of_position[positions] == task)
        if len(positions):
            assert positions[0] == start
    # Every class is either disjoint or blurry, and first appears in exactly one task.
    assert sorted(stream.disjoint_classes + stream.blurry_classes) == list(range(NUM_CLASSES))
    listed = [c for classes in stream.classes_of_task for c in classes]
    assert sorted(listed) == list(range(NUM_CLASSES))


def test_disjoint_classes_stay_inside_their_own_task():
    stream = stream_of(num_tasks=5, disjoint_class_ratio=0.5, blurry_sample_ratio=0.3, seed=2)
    assert len(stream.disjoint_classes) == 10
    for cls in stream.disjoint_classes:
        home = stream.home_task_of_class[cls]
        positions = np.flatnonzero(stream.labels_in_order == cls)
        assert len(positions) == PER_CLASS
        assert np.all(stream.task_of_position[positions] == home)
        assert stream.first_seen_position(cls) >= stream.task_boundaries[home]
        assert cls in stream.classes_of_task[home]


def test_blurry_share_outside_own_task_is_m():
    # The moved count is floor(M * n_blurry): the share is M up to that flooring, i.e. within
    # 1 / n_blurry (300 blurry samples here), and exactly floor(M * n_blurry) / n_blurry.
    for ratio in (0.1, 0.25, 0.33, 1.0):
        stream = stream_of(num_tasks=5, disjoint_class_ratio=0.5, blurry_sample_ratio=ratio, seed=4)
        tasks = task_of_sample(stream)
        labels = make_labels()
        blurry = np.isin(labels, stream.blurry_classes)
        home = np.array([stream.home_task_of_class[int(c)] for c in labels])
        outside = int(np.sum(blurry & (tasks != home)))
        n_blurry = int(blurry.sum())
        assert n_blurry == 10 * PER_CLASS
        assert outside == int(np.floor(ratio * n_blurry + 1e-9))
        assert abs(outside / n_blurry - ratio) < 1.0 / n_blurry
        # Disjoint samples never move.
        assert np.all(tasks[~blurry] == home[~blurry])


def test_blurring_spreads_classes_over_tasks_both_ways():
    stream = stream_of(num_tasks=5, disjoint_class_ratio=0.5, blurry_sample_ratio=0.2, seed=0)
    tasks = task_of_sample(stream)
    labels = make_labels()
    spans = {c: set(tasks[labels == c].tolist()) for c in stream.blurry_classes}
    assert max(len(s) for s in spans.values()) > 1
    home = np.array([stream.home_task_of_class[int(c)] for c in labels])
    blurry = np.isin(labels, stream.blurry_classes)
    assert np.any(blurry & (tasks < home)) and np.any(blurry & (tasks > home))
    # A blurry class can first show up before its own task: classes_of_task follows the arrivals.
    early = [c for c in stream.blurry_classes
             if stream.first_seen_position(c) < stream.task_boundaries[stream.home_task_of_class[c]]]
    assert early
    for c in early:
        first_task = int(stream.task_of_position[stream.first_seen_position(c)])
        assert c in stream.classes_of_task[first_task]


def test_same_seed_same_stream_and_other_seed_other_task_sizes():
    first = stream_of(seed=11)
    again = stream_of(seed=11)
    other = stream_of(seed=12)
    np.testing.assert_array_equal(first.order, again.order)
    np.testing.assert_array_equal(first.task_of_position, again.task_of_position)
    assert first.classes_of_task == again.classes_of_task
    assert first.task_sizes != other.task_sizes
    assert not np.array_equal(first.order, other.order)


def test_task_sizes_are_uneven():
    sizes = [tuple(stream_of(seed=seed).task_sizes) for seed in range(4)]
    assert any(len(set(s)) > 1 for s in sizes)
    assert len(set(sizes)) > 1


def test_all_disjoint_no_blur_is_plain_class_incremental():
    labels = make_labels()
    stream = si_blurry_order(labels, SiBlurryConfig(num_tasks=4, disjoint_class_ratio=1.0,
                                                    blurry_sample_ratio=0.0, seed=3))
    assert stream.blurry_classes == []
    assert stream.disjoint_classes == list(range(NUM_CLASSES))
    for task in range(4):
        positions = stream.positions_of_task(task)
        present = sorted(set(stream.labels_in_order[positions].tolist()))
        assert present == stream.classes_of_task[task]
        assert len(positions) == PER_CLASS * len(stream.classes_of_task[task])
        assert all(stream.home_task_of_class[c] == task for c in present)
    # With M > 0 but no blurry class, nothing moves either.
    blurred = si_blurry_order(labels, SiBlurryConfig(num_tasks=4, disjoint_class_ratio=1.0,
                                                     blurry_sample_ratio=0.5, seed=3))
    assert blurred.classes_of_task == stream.classes_of_task


def test_no_disjoint_classes():
    stream = stream_of(num_tasks=5, disjoint_class_ratio=0.0, blurry_sample_ratio=0.1, seed=1)
    assert stream.disjoint_classes == []
    assert stream.blurry_classes == list(range(NUM_CLASSES))
    tasks = task_of_sample(stream)
    home = np.array([stream.home_task_of_class[int(c)] for c in make_labels()])
    assert int(np.sum(tasks != home)) == NUM_CLASSES * PER_CLASS // 10


def test_one_task_keeps_every_sample_in_it():
    stream = stream_of(num_tasks=1, blurry_sample_ratio=0.5)
    assert stream.task_sizes == [NUM_CLASSES * PER_CLASS]
    assert list(stream.task_boundaries) == [0]
    assert stream.classes_of_task == [list(range(NUM_CLASSES))]


@pytest.mark.parametrize("ratio, expected", [(0.29, 29), (0.5, 50), (0.999, 99), (1.0, 100)])
def test_disjoint_count_is_floor_of_n_times_classes(ratio, expected):
    labels = np.arange(100)
    stream = si_blurry_order(labels, SiBlurryConfig(num_tasks=5, disjoint_class_ratio=ratio))
    assert len(stream.disjoint_classes) == expected


@pytest.mark.parametrize("config", [
    {"num_tasks": 0}, {"num_tasks": -2}, {"num_tasks": 2.5}, {"num_tasks": True},
    {"disjoint_class_ratio": -0.1}, {"disjoint_class_ratio": 1.5}, {"disjoint_class_ratio": float("nan")},
    {"disjoint_class_ratio": "0.5"}, {"blurry_sample_ratio": 1.01}, {"blurry_sample_ratio": -1e-3},
    {"seed": -1}, {"seed": 0.5},
])
def test_bad_config_raises(config):
    with pytest.raises(ValueError) as error:
        SiBlurryConfig(**config)
    assert "\n" not in str(error.value)
    assert next(iter(config)) in str(error.value)


@pytest.mark.parametrize("labels", [np.zeros((2, 3), dtype=np.int64), np.array([0.0, 1.0]),
                                    np.array([], dtype=np.int64), np.array([0, -1])])
def test_bad_labels_raise(labels):
    with pytest.raises(ValueError):
        si_blurry_order(labels, SiBlurryConfig())


def test_anytime_metrics_on_a_hand_computed_curve():
    samples, accuracy = [1000, 2000, 3000, 4000], [80.0, 60.0, 50.0, 70.0]
    # Official A_auc: the mean of the evaluated points.
    assert anytime_accuracy_auc(samples, accuracy) == pytest.approx(65.0)
    # Trapezoid area / span: (70 + 55 + 60) * 1000 / 3000.
    assert anytime_accuracy_area(samples, accuracy) == pytest.approx(185.0 / 3.0)
    assert a_last(accuracy) == 70.0
    # Uneven spacing separates the two: mean 70/3; area (15 * 100 + 30 * 200) / 300 = 25.
    assert anytime_accuracy_auc([100, 200, 400], [10, 20, 40]) == pytest.approx(70.0 / 3.0)
    assert anytime_accuracy_area([100, 200, 400], [10, 20, 40]) == pytest.approx(25.0)
    assert anytime_accuracy_area([500], [42.0]) == 42.0
    for bad in (([1, 2], [1.0]), ([], []), ([2, 1], [1.0, 2.0]), ([1, 1], [1.0, 2.0])):
        with pytest.raises(ValueError):
            anytime_accuracy_auc(*bad)
    with pytest.raises(ValueError):
        a_last([])


def hand_built_stream():
    # Dataset labels by index; arrival order 2,0,3,4,1,5 gives labels 1,3,1,2,3,2.
    labels = np.array([3, 3, 1, 1, 2, 2])
    return SiBlurryStream.from_arrivals(labels, order=[2, 0, 3, 4, 1, 5], task_of_position=[0, 0, 0, 1, 1, 1],
                                        num_tasks=2, home_task_of_class={1: 0, 3: 0, 2: 1}, disjoint_classes=[2])


def test_seen_classes_on_a_hand_built_stream():
    stream = hand_built_stream()
    assert list(stream.labels_in_order) == [1, 3, 1, 2, 3, 2]
    assert [stream.first_seen_position(c) for c in (1, 3, 2)] == [0, 1, 3]
    assert list(stream.task_boundaries) == [0, 3]
    assert stream.classes_of_task == [[1, 3], [2]]
    assert stream.blurry_classes == [1, 3] and stream.disjoint_classes == [2]
    assert seen_classes_at(stream, -1) == []
    assert seen_classes_at(stream, 0) == [1]
    assert seen_classes_at(stream, 1) == [1, 3]
    assert seen_classes_at(stream, 2) == [1, 3]
    assert seen_classes_at(stream, 3) == [1, 3, 2]
    assert seen_classes_at(stream, 100) == [1, 3, 2]
    with pytest.raises(ValueError):
        stream.first_seen_position(4)


def test_from_arrivals_rejects_inconsistent_input():
    labels = np.array([3, 3, 1, 1, 2, 2])
    home = {1: 0, 3: 0, 2: 1}
    with pytest.raises(ValueError):  # index 0 twice, 5 missing
        SiBlurryStream.from_arrivals(labels, [2, 0, 3, 4, 1, 0], [0, 0, 0, 1, 1, 1], 2, home)
    with pytest.raises(ValueError):  # tasks go back
        SiBlurryStream.from_arrivals(labels, [2, 0, 3, 4, 1, 5], [0, 1, 0, 1, 1, 1], 2, home)
    with pytest.raises(ValueError):  # a class without a home task
        SiBlurryStream.from_arrivals(labels, [2, 0, 3, 4, 1, 5], [0, 0, 0, 1, 1, 1], 2, {1: 0, 3: 0})


def test_seen_classes_match_the_arrivals_of_a_drawn_stream():
    stream = stream_of(seed=7)
    for position in (0, 5, 37, 150, 299, len(stream) - 1):
        seen = seen_classes_at(stream, position)
        assert set(seen) == set(stream.labels_in_order[: position + 1].tolist())
        firsts = [stream.first_seen_position(c) for c in seen]
        assert firsts == sorted(firsts)
    assert seen_classes_at(stream, len(stream) - 1) == stream.class_arrival_order


def test_module_imports_without_torch_vision_or_open_clip():
    code = ("import sys, clipcl.data.online; "
            "print(sorted(m for m in ('torch', 'torchvision', 'open_clip') if m in sys.modules))")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True)
    assert result.stdout.strip() == "[]"


def test_a_config_changed_after_creation_is_checked_again():
    config = SiBlurryConfig()
    config.blurry_sample_ratio = 2.0
    with pytest.raises(ValueError, match="blurry_sample_ratio"):
        si_blurry_order(make_labels(), config)
    with pytest.raises(TypeError):
        si_blurry_order(make_labels(), {"num_tasks": 5})
