"""Streams: class splits, label spaces per protocol, determinism, subsets."""

import numpy as np

from clipcl.data.streams import Stream, balanced_subset, class_incremental_tasks, domain_tasks
from clipcl.data.synthetic import load_synthetic


def pair(name):
    return load_synthetic(name, "train"), load_synthetic(name, "test")


def test_class_incremental_split_is_seeded_and_covers_all_classes():
    train, test = pair("synthetic-0")
    tasks = class_incremental_tasks(train, test, 3, class_order_seed=7)
    again = class_incremental_tasks(train, test, 3, class_order_seed=7)
    other = class_incremental_tasks(train, test, 3, class_order_seed=8)
    assert [t.dataset_labels for t in tasks] == [t.dataset_labels for t in again]
    assert [t.dataset_labels for t in tasks] != [t.dataset_labels for t in other]
    assert sorted(label for t in tasks for label in t.dataset_labels) == list(range(6))
    for task in tasks:
        assert set(np.unique(task.train.labels)) == set(task.dataset_labels)
        assert set(np.unique(task.test.labels)) == set(task.dataset_labels)


def test_class_incremental_label_space_grows_with_seen_classes():
    train, test = pair("synthetic-0")
    tasks = class_incremental_tasks(train, test, 3, class_order_seed=0)
    stream = Stream("class_incremental", tasks)
    assert not stream.task_id_at_test
    classes, target_of = stream.eval_label_space(after_task=0, eval_task=0)
    assert [c.name for c in classes] == [c.name for c in tasks[0].classes]
    classes, target_of = stream.eval_label_space(after_task=2, eval_task=1)
    assert len(classes) == 6
    for label in tasks[1].dataset_labels:
        assert classes[target_of[label]].name == train.classnames[label]
    # A future task is classified among the classes up to it.
    classes, _ = stream.eval_label_space(after_task=-1, eval_task=1)
    assert len(classes) == len(tasks[0].classes) + len(tasks[1].classes)


def test_multi_domain_and_xtail_label_spaces():
    tasks = domain_tasks([pair("synthetic-0"), pair("synthetic-1")])
    mtil = Stream("multi_domain", tasks)
    assert mtil.task_id_at_test
    classes, target_of = mtil.eval_label_space(1, 0)
    assert [c.name for c in classes] == tasks[0].train.classnames
    xtail = Stream("xtail", tasks)
    classes, target_of = xtail.eval_label_space(0, 1)
    assert len(classes) == 12
    for label, index in target_of.items():
        assert classes[index].name == tasks[1].train.classnames[label]


def test_xtail_merges_classes_with_the_same_name():
    first, second = pair("synthetic-0"), pair("synthetic-1")
    for dataset in second:
        dataset.classnames = list(first[0].classnames)
        dataset.name = "synthetic-copy"
    stream = Stream("xtail", domain_tasks([first, second]))
    classes, target_of = stream.eval_label_space(0, 1)
    assert len(classes) == 6 and target_of == {label: label for label in range(6)}


def test_balanced_subset():
    train = load_synthetic("synthetic-0", "train")
    subset = balanced_subset(train, 13, seed=3)
    counts = np.bincount(subset.labels, minlength=6)
    assert len(subset) == 13 and counts.max() - counts.min() <= 1
    assert np.array_equal(balanced_subset(train, 13, seed=3).labels, subset.labels)
    assert balanced_subset(train, None, seed=0) is train
