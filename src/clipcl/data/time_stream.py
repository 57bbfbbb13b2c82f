"""Time-continual streams (``stream.protocol: time``): image-caption pairs in time steps, TiC-CLIP's.

Garg et al., "TiC-CLIP: Continual Training of CLIP Models" (ICLR 2024): web data arrives year after
year; at each time step a model trains under a fixed compute budget and is measured on every step's
held-out pairs by retrieval (the *dynamic* matrix: the diagonal is in-distribution, below it backward
transfer, above it forward transfer) and on fixed sets (the *static* tasks, ``stream.heldout``: caption
sets by retrieval, labelled datasets by zero-shot classification).

The steps come from one caption set whose images carry timestamps (``emoji``: the release year of
each emoji's Emoji version; webdataset shards: a ``json`` field, ``time.timestamp_key``; caption
files: a column, JSON-lines key or Karpathy image field of that name), cut by
``time.steps`` (inclusive ``[first, last]`` ranges; default one step per distinct timestamp), or from
several caption sets in time order, one step each (TiC-DataComp's one folder of shards per year). Sets
with their own split (``emoji``, ``tuxpaint``, ``openclipart``, a Karpathy JSON) keep it; files and
shards hold out 20% of images by a hash of the image's key, the same share emoji's split has. What each
step trains on (the mode, the replay buffer, the budget) is :mod:`clipcl.engine.time_steps`'.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from clipcl.data.base import DataError
from clipcl.data.caption_stream import CaptionHeldOut, CaptionStream, CaptionTask, cap_images

TIME_PROTOCOL = "time"
OWN_SPLIT = ("emoji", "tuxpaint", "openclipart")
"""Caption sets with a fixed train/test split of their own (besides Karpathy JSON files)."""


@dataclass
class TimeStep(CaptionTask):
    """One time step: its training and test pairs, and the timestamps it covers (None: unknown)."""

    first: float | None = None
    last: float | None = None


def held_out_by_key(key: str) -> bool:
    """The fixed 20% test share of a set without a split of its own, by a hash of the image's key."""
    return int.from_bytes(hashlib.blake2b(key.encode(), digest_size=8).digest(), "big") % 5 == 0


def _splits(name: str, root: str | None, timestamp_key: str, streaming: bool = False):
    """(train, test) of one caption set: its own split, else 20% of its images held out by key.
    ``streaming``: the set is webdataset shards whose training side is streamed, not indexed."""
    from clipcl.data.captions import load_caption_set

    if streaming:
        from clipcl.data.shard_stream import scan_step

        path = Path(name) if "{" in name or Path(name).exists() or not root else Path(root) / name
        test, train = scan_step(path if "{" not in name else name, held_out_by_key, timestamp_key, name)
        return train, test

    if name == "emoji":  # English names only: other locales' files take most of a minute to read
        from clipcl.data.emoji import load_emoji

        return load_emoji("train", root, translations=False), load_emoji("test", root, translations=False)
    if name in OWN_SPLIT or name.lower().endswith(".json"):
        return (load_caption_set(name, "train", root, timestamp_key),
                load_caption_set(name, "test", root, timestamp_key))
    pairs = load_caption_set(name, "all", root, timestamp_key)
    test = [held_out_by_key(key) for key in pairs.image_order()]
    return (pairs.select_images([p for p, held in enumerate(test) if not held]),
            pairs.select_images([p for p, held in enumerate(test) if held]))


def _timestamps(pairs, name: str, key: str) -> np.ndarray:
    if pairs.timestamps is None:
        raise DataError(f"caption set {name} has no timestamps: a time stream of one set cuts it by time "
                        f"(emoji; webdataset shards whose .json holds {key!r}; a caption file with a {key!r} "
                        "column, JSON-lines key or image field; time.timestamp_key names it), or give one "
                        "caption set per time step")
    return np.asarray(pairs.timestamps, dtype=np.float64)


def step_name(first: float, last: float) -> str:
    return f"{first:g}" if first == last else f"{first:g}-{last:g}"


def build_time_stream(config, time_config, seed: int) -> CaptionStream:
    """A :class:`CaptionStream` of :class:`TimeStep` tasks from a StreamConfig and a TimeConfig.

    ``train_samples_per_task`` / ``test_samples_per_task`` / ``heldout_samples`` cap images per step
    as for caption streams. A step without training or test images, timestamps out of order between
    the sets of a multi-set stream, or a set without timestamps is one DataError line.
    """
    from clipcl.data.captions import load_caption_set
    from clipcl.data.registry import is_classification_dataset, load_dataset
    from clipcl.data.streams import TEST_SUBSET_SEED, balanced_subset, heldout_set

    names = [config.datasets] if isinstance(config.datasets, str) else list(config.datasets)
    if len(set(names)) != len(names):
        raise DataError(f"a caption set appears twice in the time stream: {names}")
    key = time_config.timestamp_key
    steps: list[tuple[str, object, object, float | None, float | None]] = []
    if time_config.streaming and len(names) == 1:
        raise DataError("time.streaming streams each step from its own shards: give one set of webdataset "
                        "shards per time step in stream.datasets (TiC-DataComp's one folder per year)")
    if len(names) == 1:
        train, test = _splits(names[0], config.data_root, key)
        train_times, test_times = _timestamps(train, names[0], key), _timestamps(test, names[0], key)
        ranges = time_config.steps or [[value, value] for value in np.unique(np.concatenate([train_times, test_times]))]
        for first, last in ranges:
            name = step_name(first, last)
            chosen = [np.flatnonzero((times >= first) & (times <= last)) for times in (train_times, test_times)]
            for split, positions in zip(("training", "test"), chosen):
                if len(positions) == 0:
                    raise DataError(f"time step {name} of {names[0]} has no {split} images (timestamps "
                                    f"{train_times.min():g} to {train_times.max():g}); change time.steps")
            steps.append((name, train.select_images(chosen[0]), test.select_images(chosen[1]), first, last))
    else:
        if time_config.steps is not None:
            raise DataError("time.steps cuts one caption set by time; with several caption sets each set is "
                            "a time step (leave time.steps null)")
        previous = None
        for name in names:
            train, test = _splits(name, config.data_root, key, time_config.streaming)
            first = last = None
            # A streamed step's training side is not read: its timestamps are its test samples'.
            dated = [pairs.timestamps for pairs in (train, test) if getattr(pairs, "timestamps", None) is not None]
            times = np.asarray([value for values in dated for value in values], dtype=np.float64)
            if len(times):
                first, last = float(times.min()), float(times.max())
                if previous is not None and first < previous[1]:
                    raise DataError(f"timestamps out of order: time step {name} has samples from {first:g}, "
                                    f"before the latest of the step before it, {previous[0]} ({previous[1]:g})")
                previous = (name, last)
            steps.append((name, train, test, first, last))
    tasks = []
    for index, (name, train, test, first, last) in enumerate(steps):
        if not time_config.streaming:  # a streamed step is drawn by its budget, never capped
            train = cap_images(train, config.train_samples_per_task, seed + 1000 * index)
        test = cap_images(test, config.test_samples_per_task, TEST_SUBSET_SEED)
        if len(train) == 0 or len(test) == 0:
            raise DataError(f"time step {name} has no training or no test pairs")
        tasks.append(TimeStep(index, name, train, test, first=first, last=last))
    heldout = []
    for name in config.heldout:  # the static tasks
        if name in names:
            raise DataError(f"held-out caption set {name} is also in the stream")
        if is_classification_dataset(name):  # zero-shot classification, its own label space
            dataset = load_dataset(name, "test", root=config.data_root, download=config.download)
            heldout.append(heldout_set(balanced_subset(dataset, config.heldout_samples, TEST_SUBSET_SEED)))
        else:  # a caption set: retrieval
            pairs = load_caption_set(name, "test", root=config.data_root)
            heldout.append(CaptionHeldOut(name, cap_images(pairs, config.heldout_samples, TEST_SUBSET_SEED)))
    return CaptionStream(TIME_PROTOCOL, tasks, heldout)
