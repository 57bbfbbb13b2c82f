"""Labelled image datasets as clipcl sees them.

Every dataset, whatever its source, is a :class:`ClassificationDataset`: ``dataset[i]`` returns
``(PIL.Image in RGB, int label)``, and the dataset carries its ``classnames`` (index = label),
the prompt ``templates`` used to turn a class name into text, its ``name`` and ``split``.
Preprocessing is applied later by the stream (it belongs to the model, not the data).
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence

import numpy as np
from PIL import Image
from torch.utils.data import Dataset

from clipcl.errors import UserError


class DataError(UserError, RuntimeError):
    """Bad or missing data. The message is one line that says what to do."""


class ClassificationDataset(Dataset):
    """Base class: images with integer labels, class names and prompt templates."""

    name: str = ""
    split: str = ""
    classnames: list[str]
    templates: list[str]

    def __len__(self) -> int:
        raise NotImplementedError

    def __getitem__(self, index: int) -> tuple[Image.Image, int]:
        raise NotImplementedError

    @property
    def labels(self) -> np.ndarray:
        """All labels as an int64 array, without decoding images."""
        raise NotImplementedError

    def fingerprint(self) -> str:
        """A short string that changes when the dataset's content would change (cache keys)."""
        digest = hashlib.sha256(np.ascontiguousarray(self.labels).tobytes()).hexdigest()[:16]
        return f"{self.name}/{self.split}/n={len(self)}/labels={digest}"

    def check_labels(self) -> None:
        """Fail with one line when labels and class names disagree."""
        labels = self.labels
        if len(labels) and (labels.min() < 0 or labels.max() >= len(self.classnames)):
            raise DataError(
                f"{self.name}/{self.split}: labels span {int(labels.min())}..{int(labels.max())} but "
                f"{len(self.classnames)} class names were given"
            )


class ArrayImageDataset(ClassificationDataset):
    """Images held in memory as a uint8 array ``[N, H, W]`` (grey) or ``[N, H, W, 3]`` (RGB)."""

    def __init__(
        self,
        images: np.ndarray,
        labels: np.ndarray,
        classnames: Sequence[str],
        templates: Sequence[str],
        name: str,
        split: str,
    ) -> None:
        if len(images) != len(labels):
            raise DataError(f"{name}/{split}: {len(images)} images but {len(labels)} labels")
        self.images = np.asarray(images, dtype=np.uint8)
        self._labels = np.asarray(labels, dtype=np.int64)
        self.classnames = list(classnames)
        self.templates = list(templates)
        self.name = name
        self.split = split
        self.check_labels()

    def __len__(self) -> int:
        return len(self._labels)

    @property
    def labels(self) -> np.ndarray:
        return self._labels

    def __getitem__(self, index: int) -> tuple[Image.Image, int]:
        image = Image.fromarray(self.images[index])
        return image.convert("RGB"), int(self._labels[index])

    def fingerprint(self) -> str:
        # Hash pixels too: two in-memory arrays with equal labels are not the same data.
        digest = hashlib.sha256(self.images.tobytes()).hexdigest()[:16]
        return f"{super().fingerprint()}/pixels={digest}"


class SubsetDataset(ClassificationDataset):
    """A fixed subset of another dataset, by index; keeps names, templates and class names."""

    def __init__(self, base: ClassificationDataset, indices: Sequence[int]) -> None:
        self.base = base
        self.indices = np.asarray(indices, dtype=np.int64)
        self.classnames = base.classnames
        self.templates = base.templates
        self.name = base.name
        self.split = base.split

    def __len__(self) -> int:
        return len(self.indices)

    @property
    def labels(self) -> np.ndarray:
        return self.base.labels[self.indices]

    def __getitem__(self, index: int) -> tuple[Image.Image, int]:
        return self.base[int(self.indices[index])]

    def fingerprint(self) -> str:
        digest = hashlib.sha256(self.indices.tobytes()).hexdigest()[:16]
        return f"{self.base.fingerprint()}/subset={digest}"
