"""What each training micro-batch holds: the experience's samples and the replayed ones.

Batches are planned in the main process and loaded by DataLoader workers. A plan is a list of items
``(experience, index, augmentation seed, draw, part)``: ``part`` 0 is the experience's own sample,
1 a sample replayed from the memory. Planning owns the replay memory: for every *global* batch (the
batch over all processes) it first draws the replayed references, then offers the batch to the
memory, so every process holds the same memory and a rerun makes the same draws. Each process then
takes its block of both parts. Because planning depends on nothing the model does, a resumed run
rebuilds the memory exactly by planning again from the start without loading any image.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

import numpy as np
import torch
from torch.utils.data import Dataset, Sampler

from clipcl.config.schema import ConfigError
from clipcl.data.memory import ReservoirMemory
from clipcl.data.streams import draw_seed

Item = tuple[int, int, int, int, int]  # (experience, index, augmentation seed, draw, part)
REPLAY_DRAWS = 1 << 40  # draw numbers of replayed samples start here, apart from the stream's own
# View v > 0 of a sample (online re-augmentation) adds v * VIEW_DRAWS to its draw. (Draw numbers are
# hashed into the augmentation seed, clipcl.data.streams.draw_seed, so any offset separates them.)
VIEW_DRAWS = 0x9E3779B1


class GlobalBatchSampler(Sampler[list[tuple[int, int]]]):
    """Seeded shuffled global batches; each process takes an equal, contiguous slice of each one.

    With the same seed, the union over processes of step ``k``'s slices is exactly the batch one
    process would see at step ``k``. Process ``r`` gets the ``r``-th block, which is also the ``r``-th
    micro-batch a single process would see with ``grad_accumulation = world_size`` and a batch
    ``world_size`` times smaller: the two runs then compute bitwise the same gradients
    (``a/2 + b/2 == (a + b)/2`` in floating point), which is what the data-parallel test checks.
    ``limit`` stops after that many micro-batches (the ones the schedule will use).
    """

    def __init__(self, size: int, batch_size: int, epochs: int, seed: int, rank: int, world_size: int,
                 limit: int | None = None):
        if batch_size % world_size:
            raise ConfigError(f"train.batch_size ({batch_size}) must be divisible by train.devices ({world_size})")
        self.size, self.batch_size, self.epochs = size, batch_size, epochs
        self.seed, self.rank, self.world_size = seed, rank, world_size
        # Drop the ragged last batch so every step has the same size on every process; a task
        # smaller than one batch trains on one batch of all its images (cut to a multiple of world).
        self.batches_per_epoch = max(1, size // batch_size)
        self.limit = limit

    def __len__(self) -> int:
        total = self.batches_per_epoch * self.epochs
        return total if self.limit is None else min(total, self.limit)

    @property
    def per_process_batch(self) -> int:
        return min(self.batch_size, self.size) // self.world_size

    def global_batches(self) -> Iterator[list[tuple[int, int]]]:
        """Every global batch as (dataset index, draw number) pairs; the draw seeds augmentation."""
        generator = np.random.default_rng(self.seed)
        for epoch in range(self.epochs):
            order = generator.permutation(self.size)
            for batch in range(self.batches_per_epoch):
                start = batch * self.batch_size
                indices = order[start: start + self.batch_size]
                yield [(int(index), epoch * self.size + start + position) for position, index in enumerate(indices)]

    def own_block(self, items: list) -> list:
        share = len(items) // self.world_size
        return items[self.rank * share: (self.rank + 1) * share]

    def __iter__(self):
        for number, batch in enumerate(self.global_batches()):
            if number >= len(self):
                return
            yield self.own_block(batch)


class OnlineChunks:
    """An online stream's arrival order in chunks of ``batch_size`` (the last may be shorter).

    Each process takes an equal, contiguous block of a chunk, as for task streams, so the gradient
    average over processes is the mean over the chunk. Under data parallel a ragged last chunk
    leaves its last ``len % devices`` samples untrained (they still count as seen); a chunk smaller
    than the number of processes trains nobody. The draw number is the sample's stream position.
    """

    def __init__(self, order: np.ndarray, batch_size: int, rank: int, world_size: int) -> None:
        self.order, self.batch_size, self.rank, self.world_size = order, batch_size, rank, world_size

    def __len__(self) -> int:
        return (len(self.order) + self.batch_size - 1) // self.batch_size

    def global_batches(self) -> Iterator[list[tuple[int, int]]]:
        for start in range(0, len(self.order), self.batch_size):
            yield [(int(self.order[position]), position)
                   for position in range(start, min(start + self.batch_size, len(self.order)))]

    def own_block(self, items: list) -> list:
        share = len(items) // self.world_size
        return items[self.rank * share: (self.rank + 1) * share]


class PlanSampler(Sampler[list[Item]]):
    """Plans of one experience's micro-batches, with replay when a memory is given.

    ``skip`` plans the first ``skip`` micro-batches (so the memory sees them) without yielding them:
    the resume of an interrupted online stream.

    ``views`` > 1 yields each micro-batch's plan that many times in a row, view ``v`` with its draw
    numbers moved by ``v * VIEW_DRAWS``: the same samples (and replayed samples) with a fresh,
    seeded augmentation each (online re-augmentation; view 0 is the plan of ``views`` = 1).
    """

    def __init__(self, batches, experience: int, augmentation_seed: int, labels: np.ndarray,
                 memory: ReservoirMemory | None = None, skip: int = 0, views: int = 1) -> None:
        self.batches, self.experience, self.seed = batches, experience, augmentation_seed
        self.labels, self.memory, self.skip, self.views = labels, memory, skip, views

    def __len__(self) -> int:
        return max(0, len(self.batches) - self.skip) * self.views

    def __iter__(self) -> Iterator[list[Item]]:
        experience, seed, memory = self.experience, self.seed, self.memory
        for number, batch in enumerate(self.batches.global_batches()):
            if number >= len(self.batches):
                return
            replayed = []
            if memory is not None:
                replayed = memory.sample(len(batch))
                memory.add([(experience, index) for index, _ in batch], [int(self.labels[index]) for index, _ in batch])
            if number < self.skip:
                continue
            own = [(experience, index, seed, draw, 0) for index, draw in self.batches.own_block(batch)]
            replay = [(source, index, seed, REPLAY_DRAWS + number * self.batches.batch_size + position, 1)
                      for position, (source, index) in enumerate(replayed)]
            plan = own + self.batches.own_block(replay)
            for view in range(self.views):
                yield [(source, index, seed, draw + view * VIEW_DRAWS, part)
                       for source, index, seed, draw, part in plan]


class StreamImages(Dataset):
    """The training sets of a stream's experiences through the training transform.

    An item's augmentation is seeded by (augmentation seed, draw), so it depends only on the item's
    place in the stream, not on which process or worker loads it.
    """

    def __init__(self, datasets: dict[int, object], transform: Callable) -> None:
        self.datasets, self.transform = datasets, transform

    def __len__(self) -> int:
        return sum(len(dataset) for dataset in self.datasets.values())

    def __getitem__(self, item: Item) -> tuple[torch.Tensor, int, int, int, int]:
        experience, index, seed, draw, part = item
        image, label = self.datasets[experience][index]
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(draw_seed(seed, draw))
            pixels = self.transform(image)
        return pixels, int(label), experience, int(index), part


def collate_plan(items: list[tuple[torch.Tensor, int, int, int, int]]) -> dict:
    """A micro-batch dict: the experience's ``images``/``labels``/``indices`` and, if any, ``replay``."""
    parts = {0: [], 1: []}
    for item in items:
        parts[item[4]].append(item)

    def stack(chosen: list) -> dict:
        if not chosen:
            return {"images": torch.zeros(0), "labels": torch.zeros(0, dtype=torch.long),
                    "indices": torch.zeros(0, dtype=torch.long), "experiences": torch.zeros(0, dtype=torch.long)}
        return {"images": torch.stack([pixels for pixels, *_ in chosen]),
                "labels": torch.tensor([label for _, label, *_ in chosen], dtype=torch.long),
                "experiences": torch.tensor([experience for _, _, experience, *_ in chosen], dtype=torch.long),
                "indices": torch.tensor([index for _, _, _, index, _ in chosen], dtype=torch.long)}

    batch = stack(parts[0])
    batch["replay"] = stack(parts[1])
    return batch


class CaptionStreamImages(Dataset):
    """The training pairs of a caption stream's phases through the training transform: an item is
    (pixels, caption, image id, experience, English source caption or None), its augmentation seeded
    as :class:`StreamImages` does. The English source is a language stream's (``pairs.english``)."""

    def __init__(self, datasets: dict[int, object], transform: Callable, load_pixels: bool = True,
                 distinct_ids: bool = False) -> None:
        self.datasets, self.transform, self.load_pixels = datasets, transform, load_pixels
        """``load_pixels`` False: items carry an empty pixel tensor and no image is read (a method that
        trains on precomputed image features, CLL-CLIP)."""
        self.id_offset = 1 << 32 if distinct_ids else 0
        """With ``distinct_ids`` (a batch mixing experiences: time streams) an image id is
        ``experience * 2**32 + id``, so images of two experiences are never taken for one."""

    def __len__(self) -> int:
        return sum(len(dataset) for dataset in self.datasets.values())

    def __getitem__(self, item: Item) -> tuple[torch.Tensor, str, int, int, str | None]:
        experience, row, seed, draw, _ = item
        pairs = self.datasets[experience]
        english = getattr(pairs, "english", None)
        english = None if english is None else english[row]
        image_id = experience * self.id_offset + int(pairs.image_ids[row])
        if not self.load_pixels:
            return torch.empty(0), pairs.captions[row], image_id, experience, english
        image, caption = pairs[row]
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(draw_seed(seed, draw))
            pixels = self.transform(image)
        return pixels, caption, image_id, experience, english


def collate_captions(items: list[tuple]) -> dict:
    """A caption micro-batch dict: ``images``, ``captions`` and ``image_ids`` (rows of one image share
    an id, so a contrastive loss can count every caption of an image as a positive); a language
    stream's batch also has ``english_captions``, each caption's English source."""
    batch = {"images": torch.stack([item[0] for item in items]),
             "captions": [item[1] for item in items],
             "image_ids": torch.tensor([item[2] for item in items], dtype=torch.long)}
    english = [item[4] if len(item) > 4 else None for item in items]
    if any(source is not None for source in english):
        batch["english_captions"] = english
    return batch
