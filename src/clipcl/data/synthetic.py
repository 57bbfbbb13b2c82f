"""Small synthetic image datasets for fast tests of mechanics (never for accuracy claims).

``synthetic-<domain>`` is a 6-class dataset of 32x32 RGB images: each class is a coloured square at a
class-specific position on a noisy background, so a tiny model can learn it in a few steps. Different
domains use different colours and class names. 60 training and 30 test images per class by default.
"""

from __future__ import annotations

import re

import numpy as np

from clipcl.data.base import ArrayImageDataset, DataError

SYNTHETIC_PATTERN = re.compile(r"^synthetic-(\d+)$")
NUM_CLASSES = 6
SIZE = 32


def load_synthetic(name: str, split: str, train_per_class: int = 60, test_per_class: int = 30) -> ArrayImageDataset:
    match = SYNTHETIC_PATTERN.match(name)
    if not match:
        raise DataError(f"synthetic dataset names look like synthetic-0, synthetic-1, ...; got {name!r}")
    domain = int(match.group(1))
    per_class = train_per_class if split == "train" else test_per_class
    rng = np.random.default_rng(10_000 * domain + (0 if split == "train" else 1))
    palette = np.random.default_rng(domain).integers(64, 256, size=(NUM_CLASSES, 3))
    images = rng.integers(0, 64, size=(NUM_CLASSES * per_class, SIZE, SIZE, 3)).astype(np.uint8)
    labels = np.repeat(np.arange(NUM_CLASSES), per_class)
    for index, label in enumerate(labels):
        row = 4 + 8 * (label // 3) + int(rng.integers(0, 3))
        column = 4 + 8 * (label % 3) + int(rng.integers(0, 3))
        images[index, row: row + 8, column: column + 8] = palette[label]
    classnames = [f"shape {domain}-{label}" for label in range(NUM_CLASSES)]
    return ArrayImageDataset(images, labels, classnames, ["a photo of a {}.", "a picture of a {}."], name, split)
