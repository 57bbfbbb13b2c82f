"""Labelled image datasets as clipcl sees them.

Every dataset, whatever its source, is a :class:`ClassificationDataset`: ``dataset[i]`` returns
``(PIL.Image in RGB, int label)``, and the dataset carries its ``classnames`` (index = label),
the prompt ``templates`` used to turn a class name into text, its ``name`` and ``split``.
Preprocessing is applied later by the stream (it belongs to the model, not the data).
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Sequence
from pathlib import Path

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
        """A short string that changes when the dataset's content changes: its pixels (or, for large
        file trees, each file's relative path and size plus the bytes of a fixed sample of files) and
        its labels. It does not depend on where the data sits, so a run folder moved to another
        machine with the same data resumes. Feature-cache keys and resume checks use it."""
        digest = hashlib.sha256(np.ascontiguousarray(self.labels).tobytes()).hexdigest()[:16]
        return f"{self.name}/{self.split}/n={len(self)}/labels={digest}"

    def local_stamp(self) -> str:
        """What only this machine can see: for file-backed data, a digest of every file's mtime, size
        and inode, so an edited file outside the fingerprint's content sample is still a cache miss.
        Feature-cache keys add it; resume checks do not (it changes when data is copied)."""
        return ""

    def check_labels(self) -> None:
        """Fail with one line when labels and class names disagree."""
        labels = self.labels
        if len(labels) and (labels.min() < 0 or labels.max() >= len(self.classnames)):
            raise DataError(
                f"{self.name}/{self.split}: labels span {int(labels.min())}..{int(labels.max())} but "
                f"{len(self.classnames)} class names were given"
            )


CONTENT_SAMPLE_FILES = 1024
"""Files whose bytes a file-tree fingerprint hashes: all of them up to this many, else an evenly spread
fixed sample of this many (a million-image tree then costs a stat per file and 1,024 reads)."""


def files_fingerprint(paths: Sequence[Path], root: Path | None = None) -> str:
    """A digest of a list of image files that follows their content: every file's path (relative to
    ``root``, so the digest does not depend on where the tree sits) and size, and the sha256 of the
    bytes of every file of :data:`CONTENT_SAMPLE_FILES` evenly spread ones. Swapping two folders'
    files under the same names changes it."""
    digest = hashlib.sha256()
    for path in paths:
        name = path.relative_to(root) if root is not None and path.is_relative_to(root) else Path(path.name)
        digest.update(f"{name.as_posix()}|{path.stat().st_size}\n".encode())
    count = len(paths)
    sample = range(count) if count <= CONTENT_SAMPLE_FILES else np.linspace(
        0, count - 1, CONTENT_SAMPLE_FILES).round().astype(np.int64).tolist()
    for index in sample:
        content = hashlib.sha256()
        with open(paths[index], "rb") as file:
            for chunk in iter(lambda file=file: file.read(1 << 20), b""):
                content.update(chunk)
        digest.update(content.digest())
    return digest.hexdigest()[:16]


def files_stamp(paths: Sequence[Path]) -> str:
    """A digest of every file's mtime, ctime, size and inode (see :meth:`ClassificationDataset.local_stamp`)."""
    digest = hashlib.sha256()
    for path in paths:
        status = os.stat(path)
        # ctime too: an edit whose mtime was set back (touch -r, some copy tools) still changes it.
        digest.update(f"{status.st_mtime_ns}|{status.st_ctime_ns}|{status.st_size}|{status.st_ino}\n".encode())
    return digest.hexdigest()[:16]


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
        # Read-only views: the fingerprint is computed once (every cache lookup asks, and hashing
        # the pixels each time cost a row 20 ms on Fashion-MNIST), so the data must not change.
        self.images = np.asarray(images, dtype=np.uint8).view()
        self.images.flags.writeable = False
        self._labels = np.asarray(labels, dtype=np.int64).view()
        self._labels.flags.writeable = False
        self._fingerprint: str | None = None
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
        if self._fingerprint is None:
            digest = hashlib.sha256(np.ascontiguousarray(self.images)).hexdigest()[:16]
            self._fingerprint = f"{super().fingerprint()}/pixels={digest}"
        return self._fingerprint


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

    def local_stamp(self) -> str:
        return self.base.local_stamp()
