"""Image-caption streams (``stream.protocol: captions``): phases of image-caption pairs.

Each phase is a caption set (:func:`clipcl.data.captions.load_caption_set`: ``tuxpaint``,
``openclipart``, a COCO/Flickr30k Karpathy JSON, CSV/TSV/JSONL, webdataset shards), or, with a single
set, one of ``num_tasks`` contiguous slices of it by image (Mod-X: five contiguous fifths of Flickr30k).
Models train on a phase with CLIP's symmetric contrastive loss, every caption of an image a positive;
each phase is measured by image-text retrieval on its own test images (the phase's slice of the test
split), so the stream's "accuracy" matrix is retrieval recall and forgetting reads as for class
streams. Held-out caption sets (``stream.heldout``) are never trained on: old-domain retention.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from clipcl.data.base import DataError

CAPTION_PROTOCOL = "captions"
CAPTION_PROTOCOLS = ("captions", "languages", "time")
"""Protocols whose tasks are image-caption pairs measured by retrieval (languages: clipcl.data.languages,
time: clipcl.data.time_stream)."""
MATRIX_MEASURE = "mean R@1"
"""What a caption stream's matrix holds: the mean of image->text and text->image R@1 (in %)."""


@dataclass
class CaptionTask:
    """One phase: training pairs and test pairs. ``classes`` is empty: there are no labels."""

    index: int
    name: str
    train: object
    """A :class:`~clipcl.data.captions.CaptionPairs` (one row per caption)."""
    test: object
    classes: list = field(default_factory=list)
    target_of_label: dict = field(default_factory=dict)


@dataclass
class CaptionHeldOut:
    """A caption set measured by retrieval and never trained on."""

    name: str
    test: object


@dataclass
class CaptionStream:
    protocol: str
    tasks: list[CaptionTask]
    heldout: list[CaptionHeldOut] = field(default_factory=list)
    task_id_at_test: bool = False


def contiguous_slices(pairs, count: int, name: str) -> list:
    """``pairs`` cut into ``count`` contiguous slices by image (sizes differ by at most one image)."""
    if count > pairs.num_images:
        raise DataError(f"{name} has {pairs.num_images} images; it cannot be cut into {count} phases")
    return [pairs.select_images(positions) for positions in np.array_split(np.arange(pairs.num_images), count)]


def cap_images(pairs, limit: int | None, seed: int):
    """At most ``limit`` images of ``pairs`` (all their captions), a seeded choice in their order."""
    if limit is None or limit >= pairs.num_images:
        return pairs
    chosen = np.sort(np.random.default_rng(seed).permutation(pairs.num_images)[:limit])
    return pairs.select_images(chosen)


def build_caption_stream(config, seed: int) -> CaptionStream:
    """A :class:`CaptionStream` from a :class:`clipcl.config.StreamConfig` (``protocol: captions``).

    ``train_samples_per_task`` / ``test_samples_per_task`` / ``heldout_samples`` cap *images* (with all
    their captions); the training cap is seeded by the run seed, the test caps by a fixed seed, so
    every run measures the same test images.
    """
    from clipcl.data.captions import load_caption_set
    from clipcl.data.streams import TEST_SUBSET_SEED

    names = [config.datasets] if isinstance(config.datasets, str) else list(config.datasets)
    if not names:
        raise DataError("stream.datasets is empty")
    if len(set(names)) != len(names):
        raise DataError(f"a caption set appears twice in the stream: {names}")

    def load(name: str, split: str):
        return load_caption_set(name, split, root=config.data_root)

    if len(names) == 1:
        train_slices = contiguous_slices(load(names[0], "train"), config.num_tasks, f"{names[0]} (train)")
        test_slices = contiguous_slices(load(names[0], "test"), config.num_tasks, f"{names[0]} (test)")
        phase_names = [f"{names[0]}[{index + 1}/{config.num_tasks}]" for index in range(config.num_tasks)]
    else:
        train_slices = [load(name, "train") for name in names]
        test_slices = [load(name, "test") for name in names]
        phase_names = names
    tasks = []
    for index, (name, train, test) in enumerate(zip(phase_names, train_slices, test_slices)):
        train = cap_images(train, config.train_samples_per_task, seed + 1000 * index)
        test = cap_images(test, config.test_samples_per_task, TEST_SUBSET_SEED)
        if len(train) == 0 or len(test) == 0:
            raise DataError(f"phase {name} has no training or no test pairs")
        tasks.append(CaptionTask(index, name, train, test))
    heldout = []
    for name in config.heldout:
        if name in names:
            raise DataError(f"held-out caption set {name} is also in the stream")
        heldout.append(CaptionHeldOut(name, cap_images(load(name, "test"), config.heldout_samples, TEST_SUBSET_SEED)))
    return CaptionStream(CAPTION_PROTOCOL, tasks, heldout)
