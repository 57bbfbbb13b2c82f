"""Streams of tasks: the offline task protocols.

A :class:`Stream` is a list of :class:`Task` objects plus the rule that says, for an accuracy-matrix
entry (after training task ``t``, evaluated on task ``d``), which label space the test images of
task ``d`` are classified into:

- ``class_incremental``: one dataset, classes split into T tasks in a seeded order. No task id at test:
  task ``d``'s images are classified among the classes of tasks ``0 .. max(t, d)`` (all classes seen so
  far; for a future task ``d > t`` the classes up to ``d``, which measures transfer to unseen classes).
- ``multi_domain`` (MTIL, Zheng et al. ICCV 2023): one dataset per task; the task id is known at test,
  so task ``d`` is classified among its own dataset's classes.
- ``xtail`` (X-TAIL): the same sequence, but no domain id at test: every image is classified among the
  union of the class names of *all* domains, seen and unseen. Classes with the same name in two domains
  (e.g. the digits of MNIST and of sklearn's digits) are one label, so naming the class right counts.
- ``open_domain_til`` and ``open_domain_cil`` (CoLeCLIP's ODCL-TIL / ODCL-CIL): the same sequence.
  TIL: task id known, own classes. CIL: no task id; a seen task is classified among the de-duplicated
  union of the classes of the tasks seen so far, an unseen one among its own classes. A class name
  shared by several tasks is one class prompted with their pooled templates, in both. See
  :mod:`clipcl.data.open_domain`.

Everything is deterministic given the seed.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import torch
from torch.utils.data import Dataset

from clipcl.data.base import ClassificationDataset, DataError, SubsetDataset

OPEN_DOMAIN_PROTOCOLS = ("open_domain_til", "open_domain_cil")
PROTOCOLS = ("class_incremental", "multi_domain", "xtail", *OPEN_DOMAIN_PROTOCOLS)
TASK_ID_AT_TEST = ("multi_domain", "open_domain_til")
"""The protocols whose evaluation is told which task an image comes from."""

# Test subsets are drawn with this fixed seed, whatever the run seed, so every method and every seed
# is measured on the same test images.
TEST_SUBSET_SEED = 1234


@dataclass(frozen=True)
class ClassText:
    """A class as the text tower sees it: a name and the templates that turn it into prompts."""

    name: str
    templates: tuple[str, ...]

    def prompts(self) -> list[str]:
        return [template.format(self.name) for template in self.templates]


@dataclass
class Task:
    """One step of a stream: training data, test data and the task's own classes."""

    index: int
    name: str
    train: ClassificationDataset
    test: ClassificationDataset
    classes: list[ClassText]
    """The task's own label space, in the order of training targets."""
    target_of_label: dict[int, int]
    """Dataset label -> index into ``classes``."""
    dataset_labels: list[int] = field(default_factory=list)
    """The dataset labels that belong to this task."""

    def training_view(self, transform: Callable, augmentation_seed: int | None = None) -> LabelledView:
        return LabelledView(self.train, transform, self.target_of_label, augmentation_seed)


@dataclass
class HeldOut:
    """A dataset never trained on, evaluated with its own label space (zero-shot retention)."""

    name: str
    test: ClassificationDataset
    classes: list[ClassText]
    target_of_label: dict[int, int]


def draw_seed(augmentation_seed: int, draw: int) -> int:
    """The seed of one sample's augmentation: a 32-bit digest of (run seed, draw number).

    torch's CPU generator keeps only the low 32 bits of a seed, so offsets such as the replayed
    samples' draw numbers (``2**40`` and up) would otherwise repeat the stream's own augmentations.
    A digest makes every (seed, draw) pair give an unrelated seed.
    """
    digest = hashlib.blake2b(f"{int(augmentation_seed)}/{int(draw)}".encode(), digest_size=4).digest()
    return int.from_bytes(digest, "little")


class LabelledView(Dataset):
    """A dataset seen through a transform and a label map: items are (tensor, target index).

    Items may also be requested as ``(index, draw)`` pairs: the random augmentation of that draw is
    then seeded from ``(augmentation_seed, draw)``, so augmentations depend only on an image's place
    in the training stream, not on which process or worker loads it, and data-parallel and
    single-process runs see identical crops.
    """

    def __init__(self, dataset: ClassificationDataset, transform: Callable, target_of_label: dict[int, int],
                 augmentation_seed: int | None = None):
        self.dataset = dataset
        self.transform = transform
        self.target_of_label = target_of_label
        self.augmentation_seed = augmentation_seed

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, item: int | tuple[int, int]) -> tuple[torch.Tensor, int]:
        if isinstance(item, tuple):
            index, draw = item
            image, label = self.dataset[index]
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(draw_seed(self.augmentation_seed or 0, draw))
                pixels = self.transform(image)
            return pixels, self.target_of_label[int(label)]
        image, label = self.dataset[item]
        return self.transform(image), self.target_of_label[int(label)]

    def targets(self) -> np.ndarray:
        return np.array([self.target_of_label[int(label)] for label in self.dataset.labels], dtype=np.int64)


@dataclass
class Stream:
    """A protocol over a list of tasks, plus held-out datasets."""

    protocol: str
    tasks: list[Task]
    heldout: list[HeldOut] = field(default_factory=list)
    template_owners: dict[str, str] = field(default_factory=dict)
    """Open-domain protocols: shared class names prompted by one task's templates alone (name -> task
    name; empty: every shared name pools its templates; see clipcl.data.open_domain)."""

    @property
    def task_id_at_test(self) -> bool:
        """Whether evaluation may tell the model which task an image comes from."""
        return self.protocol in TASK_ID_AT_TEST

    def eval_label_space(self, after_task: int, eval_task: int) -> tuple[list[ClassText], dict[int, int]]:
        """Label space and dataset-label -> index map for entry (after ``after_task``, on ``eval_task``).

        ``after_task`` is -1 for the zero-shot row (before any training).
        """
        task = self.tasks[eval_task]
        if self.protocol in OPEN_DOMAIN_PROTOCOLS:
            from clipcl.data.open_domain import open_domain_label_space

            return open_domain_label_space(self.tasks, self.protocol, after_task, eval_task,
                                           self.template_owners)
        if self.protocol == "multi_domain":
            return task.classes, task.target_of_label
        if self.protocol == "class_incremental":
            last = max(after_task, eval_task)
            classes: list[ClassText] = []
            for earlier in self.tasks[: last + 1]:
                classes.extend(earlier.classes)
            offset = sum(len(earlier.classes) for earlier in self.tasks[:eval_task])
            return classes, {label: offset + index for label, index in task.target_of_label.items()}
        if self.protocol == "xtail":
            classes, index_of_name = self._union_label_space()
            return classes, {label: index_of_name[task.classes[index].name]
                             for label, index in task.target_of_label.items()}
        raise ValueError(f"unknown protocol {self.protocol!r}")

    def own_label_space(self, task_index: int) -> list[ClassText]:
        """Task ``task_index``'s own classes (in target order) as evaluation prompts them: under the
        open-domain protocols a class shared with other tasks carries the pooled templates; otherwise
        ``task.classes``."""
        if self.protocol in OPEN_DOMAIN_PROTOCOLS:
            from clipcl.data.open_domain import own_classes, pooled_classes

            return own_classes(self.tasks, task_index, pooled_classes(self.tasks, self.template_owners))
        return self.tasks[task_index].classes

    def evaluation_classes(self) -> list[ClassText]:
        """Every distinct class any label space of this stream's tasks can hold, in first-seen order
        (the canonical list the shared text cache encodes once per row; held-out sets not included)."""
        if self.protocol in OPEN_DOMAIN_PROTOCOLS:
            from clipcl.data.open_domain import pooled_classes

            return list(pooled_classes(self.tasks, self.template_owners).values())
        return list(dict.fromkeys(class_text for task in self.tasks for class_text in task.classes))

    def tasks_containing(self, class_name: str) -> list[int]:
        """Indices of the tasks whose own classes include ``class_name`` (exact name), in stream order:
        for a class of an open-domain label space, the tasks it was (or will be) learnt in."""
        return [task.index for task in self.tasks if any(c.name == class_name for c in task.classes)]

    def _union_label_space(self) -> tuple[list[ClassText], dict[str, int]]:
        classes: list[ClassText] = []
        index_of_name: dict[str, int] = {}
        for task in self.tasks:
            for class_text in task.classes:
                if class_text.name not in index_of_name:
                    index_of_name[class_text.name] = len(classes)
                    classes.append(class_text)
        return classes, index_of_name


# --- building ------------------------------------------------------------------------------------


def balanced_subset(dataset: ClassificationDataset, limit: int | None, seed: int) -> ClassificationDataset:
    """At most ``limit`` items, as equal per class as possible, chosen with ``seed``; order kept."""
    if limit is None or limit >= len(dataset):
        return dataset
    if limit <= 0:
        raise DataError(f"{dataset.name}: a subset size must be positive, got {limit}")
    rng = np.random.default_rng(seed)
    labels = dataset.labels
    per_class = {label: rng.permutation(np.flatnonzero(labels == label)) for label in np.unique(labels)}
    chosen: list[int] = []
    # Round-robin over classes so every class gets its share before any gets more.
    depth = 0
    while len(chosen) < limit:
        added = False
        for label in sorted(per_class):
            indices = per_class[label]
            if depth < len(indices) and len(chosen) < limit:
                chosen.append(int(indices[depth]))
                added = True
        if not added:
            break
        depth += 1
    return SubsetDataset(dataset, np.sort(np.array(chosen, dtype=np.int64)))


def _classes_of(dataset: ClassificationDataset, labels: list[int]) -> list[ClassText]:
    templates = tuple(dataset.templates)
    return [ClassText(dataset.classnames[label], templates) for label in labels]


def _restrict(dataset: ClassificationDataset, labels: list[int]) -> ClassificationDataset:
    keep = np.flatnonzero(np.isin(dataset.labels, labels))
    return SubsetDataset(dataset, keep)


def class_incremental_tasks(
    train: ClassificationDataset,
    test: ClassificationDataset,
    num_tasks: int,
    class_order_seed: int,
) -> list[Task]:
    """Split one dataset's classes into ``num_tasks`` tasks in a seeded class order."""
    num_classes = len(train.classnames)
    if not 1 <= num_tasks <= num_classes:
        raise DataError(f"{train.name} has {num_classes} classes; num_tasks must be in 1..{num_classes}")
    order = np.random.default_rng(class_order_seed).permutation(num_classes)
    tasks = []
    for index, chunk in enumerate(np.array_split(order, num_tasks)):
        labels = [int(label) for label in chunk]
        tasks.append(
            Task(
                index=index,
                name=f"{train.name}[{','.join(str(label) for label in labels)}]",
                train=_restrict(train, labels),
                test=_restrict(test, labels),
                classes=_classes_of(train, labels),
                target_of_label={label: position for position, label in enumerate(labels)},
                dataset_labels=labels,
            )
        )
    return tasks


def domain_tasks(datasets: list[tuple[ClassificationDataset, ClassificationDataset]]) -> list[Task]:
    """One task per (train, test) dataset pair, all classes of each dataset."""
    tasks = []
    names = [train.name for train, _ in datasets]
    if len(set(names)) != len(names):
        raise DataError(f"a dataset appears twice in the stream: {names}")
    for index, (train, test) in enumerate(datasets):
        labels = list(range(len(train.classnames)))
        tasks.append(
            Task(
                index=index,
                name=train.name,
                train=train,
                test=test,
                classes=_classes_of(train, labels),
                target_of_label={label: label for label in labels},
                dataset_labels=labels,
            )
        )
    return tasks


def heldout_set(dataset: ClassificationDataset) -> HeldOut:
    labels = list(range(len(dataset.classnames)))
    return HeldOut(dataset.name, dataset, _classes_of(dataset, labels), {label: label for label in labels})


def build_stream(stream_config, seed: int) -> Stream:
    """Build a :class:`Stream` from a :class:`clipcl.config.StreamConfig`, loading real data."""
    from clipcl.data.registry import load_dataset, resolve_dataset_list

    config = stream_config
    if config.protocol not in PROTOCOLS:
        raise DataError(f"unknown protocol {config.protocol!r}; choose one of {', '.join(PROTOCOLS)} or si_blurry "
                        "(online)")
    names = resolve_dataset_list(config.datasets)
    if not names:
        raise DataError("stream.datasets is empty")

    def load(name: str, split: str) -> ClassificationDataset:
        return load_dataset(name, split, root=config.data_root, download=config.download)

    def cap_test(dataset: ClassificationDataset, limit: int | None) -> ClassificationDataset:
        return balanced_subset(dataset, limit, TEST_SUBSET_SEED)

    if config.protocol == "class_incremental":
        if len(names) != 1:
            raise DataError(f"class_incremental takes one dataset, got {len(names)}: {names}")
        train, test = load(names[0], "train"), load(names[0], "test")
        order_seed = seed if config.class_order_seed is None else config.class_order_seed
        tasks = class_incremental_tasks(train, test, config.num_tasks, order_seed)
    else:
        tasks = domain_tasks([(load(name, "train"), load(name, "test")) for name in names])
    for task in tasks:
        task.train = balanced_subset(task.train, config.train_samples_per_task, seed + 1000 * task.index)
        task.test = cap_test(task.test, config.test_samples_per_task)
        if len(task.train) == 0 or len(task.test) == 0:
            raise DataError(f"task {task.name} has no training or no test images")

    trained = set(names)
    heldout = []
    for name in resolve_dataset_list(config.heldout):
        if name in trained:
            raise DataError(f"held-out dataset {name} is also in the stream")
        heldout.append(heldout_set(cap_test(load(name, "test"), config.heldout_samples)))
    owners = {}
    if config.official_template_owners:
        from clipcl.data.open_domain import TEMPLATE_OWNER

        owners = dict(TEMPLATE_OWNER)
    return Stream(config.protocol, tasks, heldout, owners)
