"""Online lifelong learning: one Si-Blurry stream, learnt once, evaluated at any time.

The protocol of Moon et al. (ICCV 2023, Si-Blurry) as used by Wang et al. (2024, "CLIP model is an
Efficient Online Lifelong Learner"): the training images of one or more datasets arrive once, in the
order of a Si-Blurry stream (:mod:`clipcl.data.online`), in small batches. The learner is never told
where a task starts or ends; it only sees which classes have appeared so far. Each incoming batch
(plus whatever a strategy replays from its memory) is used for ``train.online_iter`` optimiser steps.
Every ``eval.eval_period`` samples, and at the end, the model is evaluated on the test images of every
class seen so far, classified among those classes: the anytime accuracy curve, its area A_auc and its
last point A_last. Held-out datasets give zero-shot retention before and after the stream.

A run directory holds ``config.yaml``, ``results.json`` (with the curve), ``summary.md``,
``anytime_accuracy.png`` and the final checkpoint. A stream is not resumed half-way: an interrupted
online run starts again from the beginning when rerun (its files are written atomically, so nothing
half-written is left); a finished one returns its stored results.
"""

from __future__ import annotations

import hashlib
import time
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from clipcl.data.base import ClassificationDataset, DataError, SubsetDataset
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


class _Arrivals:
    """The label space as the learner sees it: classes in order of first arrival."""

    def __init__(self, stream: OnlineStream) -> None:
        self.stream = stream
        self.task = Task(index=0, name="online", train=stream.train, test=stream.test, classes=[], target_of_label={})
        self.seen_labels: list[int] = []

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


def anytime_accuracy(strategy, stream: OnlineStream, arrivals: _Arrivals, runtime, batch_size: int, cache) -> float:
    """Accuracy (%) on the test images of every class seen so far, among those classes."""
    from clipcl.eval.evaluator import count_correct

    seen = np.asarray(arrivals.seen_labels, dtype=np.int64)
    indices = np.flatnonzero(np.isin(stream.test.labels, seen))
    if not len(indices):
        return float("nan")
    subset = SubsetDataset(stream.test, indices)
    correct, total = count_correct(strategy, subset, list(arrivals.task.classes), dict(arrivals.task.target_of_label),
                                   None, runtime, batch_size, cache, False)
    return 100.0 * correct / total


def heldout_accuracies(strategy, stream: OnlineStream, runtime, batch_size: int, cache) -> list[float]:
    from clipcl.eval.evaluator import count_correct

    values = []
    for held in stream.heldout:
        correct, total = count_correct(strategy, held.test, held.classes, held.target_of_label, None, runtime,
                                       batch_size, cache, False)
        values.append(100.0 * correct / total)
    return values


def train_online(strategy, stream: OnlineStream, config, runtime, cache, show_progress: bool = True) -> dict[str, Any]:
    """Consume the stream once; return the anytime curve, timings and losses."""
    from clipcl.data.streams import LabelledView

    train_config, eval_config = config.train, config.eval
    if runtime.world_size > 1:
        raise DataError("online runs use one process (train.devices=1)")
    arrivals = _Arrivals(stream)
    order = np.asarray(stream.order.order, dtype=np.int64)
    view = LabelledView(stream.train, strategy.backend.train_preprocess, {}, augmentation_seed=config.seed)
    strategy.before_task(arrivals.task)
    parameters = strategy.trainable_parameters()
    optimizer = torch.optim.AdamW(parameters, lr=train_config.lr, weight_decay=train_config.weight_decay) \
        if parameters else None
    runtime.start_task()
    generator = torch.Generator().manual_seed(config.seed)

    curve_samples: list[int] = []
    curve_accuracy: list[float] = []
    periodic: list[bool] = []  # evaluations due to eval_period (A_auc's points) vs the end of the stream
    train_seconds = 0.0
    eval_seconds = 0.0
    steps, examples = 0, 0
    losses: list[float] = []
    next_eval = eval_config.eval_period
    progress = tqdm(total=len(order), desc="online stream", unit="img", disable=not show_progress,
                    leave=False, dynamic_ncols=True)
    for start in range(0, len(order), train_config.batch_size):
        positions = np.arange(start, min(start + train_config.batch_size, len(order)))
        indices = order[positions]
        started = time.perf_counter()
        if arrivals.add(stream.train.labels[indices]):
            strategy.on_new_classes(arrivals.task)
        view.target_of_label = arrivals.task.target_of_label
        if optimizer is not None:
            replayed = strategy.replay_indices(len(indices), generator)
            batch_indices = [int(index) for index in indices] + [int(index) for index in replayed]
            # Each image's augmentation is seeded by its batch's place in the stream and its place in the batch.
            items = [view[(index, start * 7919 + offset)] for offset, index in enumerate(batch_indices)]
        strategy.observe(indices, stream.train.labels[indices])
        if optimizer is not None:
            images = torch.stack([pixels for pixels, _ in items]).to(runtime.device)
            targets = torch.tensor([target for _, target in items], device=runtime.device)
            strategy.train()
            for _ in range(train_config.online_iter):
                optimizer.zero_grad(set_to_none=True)
                with runtime.autocast():
                    outputs = strategy(images, targets, arrivals.task)
                loss = outputs["loss"]
                if not torch.isfinite(loss):
                    raise FloatingPointError(f"loss became {loss.item()} after {start} samples")
                runtime.backward(loss)
                runtime.step(optimizer, parameters, train_config.max_grad_norm)
                strategy.after_step(steps)
                steps += 1
                examples += len(images)
                losses.append(float(loss.detach()))
            strategy.eval()
        train_seconds += time.perf_counter() - started
        seen = int(positions[-1]) + 1
        progress.update(len(positions))
        if seen >= next_eval or seen == len(order):
            started = time.perf_counter()
            periodic.append(seen >= next_eval)
            curve_samples.append(seen)
            curve_accuracy.append(anytime_accuracy(strategy, stream, arrivals, runtime, eval_config.batch_size, cache))
            eval_seconds += time.perf_counter() - started
            progress.set_postfix(accuracy=f"{curve_accuracy[-1]:.1f}")
            while next_eval <= seen:
                next_eval += eval_config.eval_period
    progress.close()
    strategy.after_task(arrivals.task)
    return {"samples": curve_samples, "accuracy": curve_accuracy, "periodic": periodic,
            "train_seconds": train_seconds,
            "eval_seconds": eval_seconds, "steps": steps, "examples": examples,
            "losses_first_last": [losses[0], losses[-1]] if losses else [None, None],
            "classes_seen": [stream.classes[label].name for label in arrivals.seen_labels]}


def run_online(config, runtime, directory, show_progress: bool) -> dict[str, Any]:
    """The whole online run (called by :func:`clipcl.run.run_experiment` for ``si_blurry`` streams)."""
    from clipcl.checkpoint import (
        atomic_write_json,
        atomic_write_text,
        fingerprint_digest,
        save_checkpoint,
        snapshot_state,
    )
    from clipcl.config import config_fingerprint, to_dict
    from clipcl.data.online import a_last, anytime_accuracy_auc
    from clipcl.eval.cache import FeatureCache, default_cache_dir
    from clipcl.eval.metrics import retention
    from clipcl.models import build_backend
    from clipcl.run import parameter_counts, seed_everything, versions
    from clipcl.strategies import build_strategy

    seed_everything(config.seed)
    backend = build_backend(config.model).to(runtime.device)
    stream = build_online_stream(config.stream, config.seed)
    strategy = build_strategy(backend, config.strategy).to(runtime.device)
    strategy.eval()
    reference = snapshot_state(strategy)
    cache_dir = config.eval.cache_dir if config.eval.cache_dir is not None else default_cache_dir()
    cache = FeatureCache(cache_dir or None, enabled=config.eval.feature_cache)

    heldout_before = heldout_accuracies(strategy, stream, runtime, config.eval.batch_size, cache)
    outcome = train_online(strategy, stream, config, runtime, cache, show_progress)
    heldout_after = heldout_accuracies(strategy, stream, runtime, config.eval.batch_size, cache)
    fingerprint = config_fingerprint(config)
    save_checkpoint(directory.checkpoint(0), strategy, reference, fingerprint, 0)

    # A_auc as the official Si-Blurry code computes it: the mean of the evaluations every eval_period
    # samples (an end-of-stream evaluation that is not one of them only gives A_last).
    points = [(n, value) for n, value, due in zip(outcome["samples"], outcome["accuracy"], outcome["periodic"]) if due]
    points = points or list(zip(outcome["samples"], outcome["accuracy"]))
    metrics = {"a_auc": anytime_accuracy_auc([n for n, _ in points], [value for _, value in points]),
               "a_last": a_last(outcome["accuracy"])}
    if stream.heldout:
        metrics.update(heldout_zero_shot=float(np.mean(heldout_before)), heldout_last=float(np.mean(heldout_after)),
                       heldout_retention=retention(heldout_before, heldout_after))
    # Stream images per second of training (each incoming image once, whatever online_iter and replay).
    metrics["train_samples_per_second"] = (len(stream.train) / outcome["train_seconds"]
                                           if outcome["steps"] and outcome["train_seconds"] > 0 else float("nan"))
    results = {
        "name": config.label,
        "strategy": config.strategy.get("name"),
        "protocol": ONLINE_PROTOCOL,
        "config_digest": fingerprint_digest(fingerprint),
        "seed": config.seed,
        "anytime": {"samples": outcome["samples"], "accuracy": outcome["accuracy"], "periodic": outcome["periodic"],
                    "unit": "percent", "eval_period": config.eval.eval_period},
        "stream": {"samples": len(stream.train), "classes": len(stream.classes),
                   "disjoint_classes": [stream.classes[c].name for c in stream.order.disjoint_classes],
                   "blurry_classes": [stream.classes[c].name for c in stream.order.blurry_classes],
                   "hidden_task_boundaries": [int(b) for b in stream.order.task_boundaries],
                   "arrival_order_of_classes": outcome["classes_seen"]},
        "heldout": {"datasets": [held.name for held in stream.heldout], "zero_shot": heldout_before,
                    "after_stream": heldout_after},
        "metrics": metrics,
        "timing": {"train_seconds": outcome["train_seconds"], "eval_seconds": outcome["eval_seconds"],
                   "train_steps": outcome["steps"], "train_examples": outcome["examples"]},
        "losses_first_last": outcome["losses_first_last"],
        "parameters": parameter_counts(strategy),
        "config": to_dict(config),
        "versions": versions(),
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "host": {"device": str(runtime.device)},
    }
    atomic_write_json(directory.results, results)
    from clipcl.report import run_summary_markdown

    atomic_write_text(directory.summary, run_summary_markdown(results))
    return results


__all__ = ["ONLINE_PROTOCOL", "OnlineStream", "UnionDataset", "build_online_stream", "run_online", "train_online"]
