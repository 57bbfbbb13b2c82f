"""Named batch sources: data a method needs besides the experience's own batch.

A method declares its sources (``Strategy.sources()``: name -> spec); the engine builds each one from
the run's data settings (``stream.data_root``), loads it through DataLoader workers and puts what
it yields into every training batch under the source's name. So no method opens a dataset.

- :class:`ReferenceSpec`: a reference set, as ZSCL's: images from outside the stream drawn afresh
  for every step, plus reference texts (the class prompts of a dataset); or, with ``per_step=False``,
  just the dataset, for methods that encode it once (DDAS's pretraining-domain autoencoder).
- :class:`CaptionSpec`: image-caption pairs from a caption file (COCO / Flickr30k Karpathy JSON, CSV,
  TSV, JSONL), drawn for every step: what a method that continues CLIP's contrastive training needs.
- :class:`clipcl.data.memory.ReplaySpec`: a replay memory (built and fed by the engine, since
  which samples it holds depends on the stream).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from clipcl.data.base import ClassificationDataset, DataError, SubsetDataset

PREPROCESSING = ("train", "eval")
CURRENT_TASK = "current_task"
"""A reference set's ``dataset`` that means the training set of the task being trained (ZSCL's
``--ref-dataset`` set to the current dataset, as its LwF and LwF-VR scripts do); task streams only."""


@dataclass(frozen=True)
class ReferenceSpec:
    """A reference set a method declares."""

    dataset: str
    """Registry name of the images (its train split); any ``load_dataset`` name, or
    :data:`CURRENT_TASK` for the training images of the task being trained."""
    samples: int | None = None
    """Keep at most this many images (a fixed, seeded subset); None keeps all."""
    texts_dataset: str | None = None
    """Dataset whose class prompts (first template) are the reference texts (None: no texts)."""
    per_step: bool = True
    """Draw a batch of images for every training step (else the method only reads ``dataset``)."""
    batch_size: int | None = None
    """Images per step; None: as many as the step's own batch (per process)."""
    preprocess: str = "eval"
    """``eval`` (the backend's evaluation transform) or ``train`` (with its random augmentation)."""
    cache_mb: int = 0
    """With ``eval`` preprocessing, keep preprocessed images in memory up to this many MB (in each
    loader process: with DataLoader workers every worker keeps its own)."""


def reference_prompts(name: str, root: str | None = None) -> list[str]:
    """The first-template prompt of every class of dataset ``name``."""
    from clipcl.data.resources import classnames_and_templates

    try:
        classnames, templates = classnames_and_templates(name)
    except KeyError:
        from clipcl.data.registry import load_dataset

        dataset = load_dataset(name, "train", root=root)
        classnames, templates = dataset.classnames, dataset.templates
    if not classnames or not templates:
        raise DataError(f"reference texts: {name} has no class names or templates")
    return [templates[0].format(classname) for classname in classnames]


class _ReferenceDraws(Sampler[tuple[list[int], int]]):
    """Endless per-step draws: (dataset indices, augmentation seed), from one seeded generator.

    With at most as many images as the set holds, a step's images are distinct (a permutation's
    head); otherwise drawn with replacement.
    """

    def __init__(self, indices: torch.Tensor, count: int, seed: int, skip: int = 0) -> None:
        self.indices, self.count, self.skip = indices, count, skip
        self.generator = torch.Generator().manual_seed(seed)

    def __iter__(self):
        available = len(self.indices)
        drawn = 0
        while True:
            if self.count <= available:
                picks = torch.randperm(available, generator=self.generator)[: self.count]
            else:
                picks = torch.randint(0, available, (self.count,), generator=self.generator)
            augmentation_seed = int(torch.randint(0, 2**62, (1,), generator=self.generator).item())
            drawn += 1
            if drawn > self.skip:  # a resumed run draws the steps it already took, and drops them
                yield [int(self.indices[pick]) for pick in picks], augmentation_seed


class _ReferenceImages(Dataset):
    """One item per step: the stacked, preprocessed images of that step's draw."""

    def __init__(self, dataset: ClassificationDataset, transform, augmented: bool, cache_bytes: int) -> None:
        self.dataset, self.transform, self.augmented = dataset, transform, augmented
        self.cache: dict[int, torch.Tensor] = {}
        self.cache_bytes, self.cached_bytes = cache_bytes, 0

    def __len__(self) -> int:
        return len(self.dataset)

    def _preprocessed(self, index: int) -> torch.Tensor:
        cached = self.cache.get(index)
        if cached is not None:
            return cached
        image = self.transform(self.dataset[index][0])
        size = image.numel() * image.element_size()
        if self.cached_bytes + size <= self.cache_bytes:
            self.cache[index] = image
            self.cached_bytes += size
        return image

    def __getitem__(self, draw: tuple[list[int], int]) -> torch.Tensor:
        indices, augmentation_seed = draw
        if not self.augmented:
            return torch.stack([self._preprocessed(index) for index in indices])
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(augmentation_seed)  # the crops depend only on the draw
            return torch.stack([self.transform(self.dataset[index][0]) for index in indices])


class _PerStepSource:
    """What every per-step source shares: a started loader that gives one step's batch at a time."""

    kind = "source"
    _batches = None

    @property
    def started(self) -> bool:
        return self._batches is not None

    def _next(self):
        if self._batches is None:
            raise RuntimeError(f"{self.kind} {self.name} used before start()")
        return next(self._batches)

    def stop(self) -> None:
        self._batches = None


class ReferenceSource(_PerStepSource):
    """A built reference set: its images, its texts, and per-step batches once started."""

    kind = "reference source"

    def __init__(self, spec: ReferenceSpec, root: str | None, num_workers: int = 0) -> None:
        from clipcl.data.registry import load_dataset

        if spec.preprocess not in PREPROCESSING:
            raise DataError(f"reference preprocess must be one of {', '.join(PREPROCESSING)}, got {spec.preprocess!r}")
        self.spec, self.num_workers = spec, num_workers
        self.texts = reference_prompts(spec.texts_dataset, root) if spec.texts_dataset else []
        self._images: _ReferenceImages | None = None
        self._batches = None
        self.full_dataset = self.dataset = self.indices = None
        if not self.follows_task:
            self.use_dataset(load_dataset(spec.dataset, "train", root=root))

    @property
    def follows_task(self) -> bool:
        """Whether the images are the current task's training set (set by :meth:`use_dataset` per task)."""
        return self.spec.dataset == CURRENT_TASK

    def use_dataset(self, dataset: ClassificationDataset) -> None:
        """Draw from ``dataset`` (a seeded subset of ``spec.samples`` images when set)."""
        if len(dataset) == 0:
            raise DataError(f"reference dataset {getattr(dataset, 'name', self.spec.dataset)} has no images")
        spec = self.spec
        indices = torch.arange(len(dataset))
        if spec.samples is not None and spec.samples < len(dataset):
            chosen = torch.randperm(len(dataset), generator=torch.Generator().manual_seed(0))
            indices = chosen[: spec.samples].sort().values
        self.full_dataset = dataset
        self.indices = indices
        self.dataset = dataset if len(indices) == len(dataset) else SubsetDataset(dataset, indices.numpy())
        self._images = None  # the preprocessed-image cache belongs to the previous dataset

    @property
    def name(self) -> str:
        return self.spec.dataset

    def start(self, backend, seed: int, count: int, skip: int = 0) -> None:
        """Begin an experience's per-step draws: ``count`` images a step, from generator ``seed``,
        leaving out the first ``skip`` draws (those a resumed run already trained on)."""
        spec = self.spec
        if self.full_dataset is None:
            raise RuntimeError(f"reference source {spec.dataset}: use_dataset(task.train) before start()")
        augmented = spec.preprocess == "train"
        if self._images is None or self._images.augmented != augmented:
            transform = backend.train_preprocess if augmented else backend.preprocess
            self._images = _ReferenceImages(self.full_dataset, transform, augmented, spec.cache_mb * 2**20)
        draws = _ReferenceDraws(self.indices, spec.batch_size or count, seed, skip)
        # batch_size=None: each sampled draw is one item, already a whole step's batch.
        # An own generator: starting the loader must not draw from the global one (dropout's).
        loader = DataLoader(self._images, sampler=draws, batch_size=None, num_workers=self.num_workers,
                            generator=torch.Generator().manual_seed(seed))
        self._batches = iter(loader)

    def next_batch(self) -> dict[str, torch.Tensor]:
        return {"images": self._next()}


@dataclass(frozen=True)
class CaptionSpec:
    """Image-caption pairs a method declares, drawn afresh for every training step."""

    path: str
    """A caption file (``.json`` Karpathy/COCO/Flickr30k, ``.csv``, ``.tsv``, ``.jsonl``); a relative path
    that does not exist is looked up under ``stream.data_root``. Image paths are relative to the file."""
    split: str | None = None
    """Karpathy JSON only: keep the images of this split (``train`` also takes COCO's ``restval``)."""
    batch_size: int | None = None
    """Pairs per step; None: as many as the step's own batch (per process)."""
    preprocess: str = "train"
    """``train`` (the backend's training transform, seeded per draw) or ``eval``."""
    per_step: bool = True


class _CaptionPairs(Dataset):
    """One item per step: the preprocessed images, captions and image ids of that step's rows."""

    def __init__(self, dataset, transform, augmented: bool) -> None:
        self.dataset, self.transform, self.augmented = dataset, transform, augmented

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, draw: tuple[list[int], int]) -> dict:
        rows, augmentation_seed = draw
        pairs = [self.dataset[row] for row in rows]
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(augmentation_seed)  # augmentations depend only on the draw
            images = torch.stack([self.transform(image) for image, _ in pairs])
        return {"images": images, "captions": [caption for _, caption in pairs],
                "image_ids": torch.tensor([self.dataset.image_ids[row] for row in rows], dtype=torch.long)}


class CaptionSource(_PerStepSource):
    """A built caption source; per-step batches of ``images``, ``captions`` and ``image_ids`` (rows of
    the same image share an id, so a contrastive loss can treat all of an image's captions as positives)."""

    kind = "caption source"

    def __init__(self, spec: CaptionSpec, root: str | None, num_workers: int = 0) -> None:
        from pathlib import Path

        from clipcl.data.captions import CaptionDataset

        if spec.preprocess not in PREPROCESSING:
            raise DataError(f"caption preprocess must be one of {', '.join(PREPROCESSING)}, got {spec.preprocess!r}")
        path = Path(spec.path)
        if not path.exists() and not path.is_absolute() and root:
            path = Path(root) / path
        self.spec, self.num_workers = spec, num_workers
        self.dataset = CaptionDataset(path, split=spec.split)
        self._batches = None

    @property
    def name(self) -> str:
        return self.spec.path

    def start(self, backend, seed: int, count: int, skip: int = 0) -> None:
        augmented = self.spec.preprocess == "train"
        pairs = _CaptionPairs(self.dataset, backend.train_preprocess if augmented else backend.preprocess, augmented)
        draws = _ReferenceDraws(torch.arange(len(self.dataset)), self.spec.batch_size or count, seed, skip)
        self._batches = iter(DataLoader(pairs, sampler=draws, batch_size=None, num_workers=self.num_workers,
                                        generator=torch.Generator().manual_seed(seed)))

    def next_batch(self) -> dict:
        return self._next()
