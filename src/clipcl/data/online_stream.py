"""The data of an online run: the union of its datasets, their classes, the Si-Blurry arrival order.

The protocol of Moon et al. (ICCV 2023, Si-Blurry) as used by Wang et al. (2024, "CLIP model is an
Efficient Online Lifelong Learner"): the training images of one or more datasets arrive once, in the
order of a Si-Blurry stream (:mod:`clipcl.data.online`), in small batches. The learner is never told
where a task starts or ends; it only sees which classes have appeared so far (:class:`Arrivals`).
The engine trains on it (:mod:`clipcl.engine.online`).
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Any

import numpy as np

from clipcl.data.base import ClassificationDataset, DataError
from clipcl.data.streams import ClassText, HeldOut, Task, balanced_subset, heldout_set

ONLINE_PROTOCOL = "si_blurry"


class UnionDataset(ClassificationDataset):
    """Several datasets as one, with their labels mapped onto one shared label space."""

    def __init__(self, parts: list[tuple[ClassificationDataset, np.ndarray]], classnames: list[str], split: str):
        self.parts = [dataset for dataset, _ in parts]
        self.label_maps = [np.asarray(mapping, dtype=np.int64) for _, mapping in parts]
        self.offsets = np.cumsum([0] + [len(dataset) for dataset in self.parts])
        self.classnames = list(classnames)
        self.templates = []  # per class, in the stream's ClassText list
        self.name = "+".join(dataset.name for dataset in self.parts)
        self.split = split
        self._labels = np.concatenate([mapping[dataset.labels] for dataset, mapping in zip(self.parts, self.label_maps)]) \
            if self.parts else np.zeros(0, dtype=np.int64)

    def __len__(self) -> int:
        return int(self.offsets[-1])

    @property
    def labels(self) -> np.ndarray:
        return self._labels

    def __getitem__(self, index: int):
        part = int(np.searchsorted(self.offsets, index, side="right") - 1)
        image, _ = self.parts[part][index - int(self.offsets[part])]
        return image, int(self._labels[index])

    def fingerprint(self) -> str:
        inner = "|".join(dataset.fingerprint() for dataset in self.parts)
        return f"union/{self.split}/{hashlib.sha256(inner.encode()).hexdigest()[:16]}"

    def local_stamp(self) -> str:
        return "|".join(dataset.local_stamp() for dataset in self.parts)


@dataclass
class OnlineStream:
    """The data of an online run: the union train/test sets, their classes, the arrival order."""

    train: UnionDataset
    test: ClassificationDataset
    classes: list[ClassText]
    order: Any  # clipcl.data.online.SiBlurryStream
    heldout: list[HeldOut]


def build_online_stream(stream_config, seed: int) -> OnlineStream:
    """Load the datasets, merge their classes by name (as X-TAIL does) and draw the Si-Blurry order."""
    from clipcl.data.online import SiBlurryConfig, si_blurry_order
    from clipcl.data.registry import load_dataset, resolve_dataset_list

    config = stream_config
    names = resolve_dataset_list(config.datasets)
    if not names:
        raise DataError("stream.datasets is empty")

    def load(name: str, split: str) -> ClassificationDataset:
        return load_dataset(name, split, root=config.data_root, download=config.download)

    classes: list[ClassText] = []
    index_of_name: dict[str, int] = {}
    train_parts, test_parts = [], []
    for position, name in enumerate(names):
        train, test = load(name, "train"), load(name, "test")
        mapping = []
        for classname in train.classnames:
            if classname not in index_of_name:
                index_of_name[classname] = len(classes)
                classes.append(ClassText(classname, tuple(train.templates)))
            mapping.append(index_of_name[classname])
        mapping = np.asarray(mapping, dtype=np.int64)
        if config.train_samples_per_task is not None:
            train = balanced_subset(train, config.train_samples_per_task, seed + 1000 * position)
        train_parts.append((train, mapping))
        test_parts.append((test, mapping))
    train = UnionDataset(train_parts, [c.name for c in classes], "train")
    test = UnionDataset(test_parts, [c.name for c in classes], "test")
    from clipcl.data.streams import TEST_SUBSET_SEED

    test = balanced_subset(test, config.test_samples_per_task, TEST_SUBSET_SEED)
    order = si_blurry_order(train.labels, SiBlurryConfig(num_tasks=config.num_tasks,
                                                         disjoint_class_ratio=config.disjoint_class_ratio,
                                                         blurry_sample_ratio=config.blurry_sample_ratio, seed=seed))
    trained = set(names)
    heldout = []
    for name in resolve_dataset_list(config.heldout):
        if name in trained:
            raise DataError(f"held-out dataset {name} is also in the stream")
        heldout.append(heldout_set(balanced_subset(load(name, "test"), config.heldout_samples, TEST_SUBSET_SEED)))
    return OnlineStream(train, test, classes, order, heldout)


class Arrivals:
    """The label space as the learner sees it: classes in order of first arrival."""

    def __init__(self, stream: OnlineStream) -> None:
        self.stream = stream
        self.task = Task(index=0, name="online", train=stream.train, test=stream.test, classes=[], target_of_label={})
        self.seen_labels: list[int] = []

    def restore(self, labels: list[int]) -> None:
        """Replay the arrivals of a resumed run, in their original order."""
        self.add(labels)

    def add(self, labels) -> bool:
        """Register the labels of an incoming batch; True when a class appeared for the first time."""
        grew = False
        for label in labels:
            label = int(label)
            if label not in self.task.target_of_label:
                self.task.target_of_label[label] = len(self.task.classes)
                self.task.classes.append(self.stream.classes[label])
                self.task.dataset_labels.append(label)
                self.seen_labels.append(label)
                grew = True
        return grew
