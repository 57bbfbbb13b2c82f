"""The classification datasets of the CLIP / MTIL papers, through torchvision's loaders.

Each is wrapped as a :class:`ClassificationDataset` returning ``(RGB PIL image, int)``, with labels
readable without decoding images. Data lives under ``root`` in torchvision's layout; it is
downloaded only with ``download=True``. Offline and absent, loading fails with one line naming the
folder and what to do. Datasets that ship without a test split (Caltech101, SUN397, EuroSAT) get a
fixed, seeded, per-class 80/20 split.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from clipcl.data.base import ClassificationDataset, DataError
from clipcl.data.resources import classnames_and_templates, templates_for

# name -> (torchvision class name, folder under root that torchvision uses, how it is split):
# "flag" means a ``train=True/False`` argument; a pair gives the ``split=`` values for our train and
# test; None means the dataset has no official split (we make one, see NO_TEST_SPLIT).
TORCHVISION_DATASETS: dict[str, tuple[str, str, str | tuple[str, str] | None]] = {
    "cifar10": ("CIFAR10", "cifar-10-batches-py", "flag"),
    "cifar100": ("CIFAR100", "cifar-100-python", "flag"),
    "mnist": ("MNIST", "MNIST", "flag"),
    "dtd": ("DTD", "dtd", ("train", "test")),
    "eurosat": ("EuroSAT", "eurosat", None),
    "flowers102": ("Flowers102", "flowers-102", ("train", "test")),
    "food101": ("Food101", "food-101", ("train", "test")),
    "oxford_pet": ("OxfordIIITPet", "oxford-iiit-pet", ("trainval", "test")),
    "stanford_cars": ("StanfordCars", "stanford_cars", ("train", "test")),
    "sun397": ("SUN397", "SUN397", None),
    "caltech101": ("Caltech101", "caltech101", None),
    "aircraft": ("FGVCAircraft", "fgvc-aircraft-2013b", ("trainval", "test")),
}

NO_TEST_SPLIT = {name for name, (_, _, split) in TORCHVISION_DATASETS.items() if split is None}


def _construct(name: str, split: str, root: str, download: bool) -> Any:
    import torchvision.datasets as tv

    class_name, _, split_style = TORCHVISION_DATASETS[name]
    arguments: dict[str, Any] = {"download": download}
    if split_style == "flag":
        arguments["train"] = split == "train"
    elif split_style is not None:
        arguments["split"] = split_style[0] if split == "train" else split_style[1]
    if name == "caltech101":
        arguments["target_type"] = "category"
    return getattr(tv, class_name)(root, **arguments)


def _labels_of(dataset: Any) -> np.ndarray:
    for attribute in ("targets", "_labels", "y", "labels"):
        if hasattr(dataset, attribute):
            return np.asarray(getattr(dataset, attribute), dtype=np.int64)
    if hasattr(dataset, "_samples"):  # StanfordCars
        return np.asarray([label for _, label in dataset._samples], dtype=np.int64)
    raise DataError(f"cannot read labels of {type(dataset).__name__}")


def _clean(name: str) -> str:
    return re.sub(r"\s+", " ", name.replace("_", " ")).strip()


class TorchvisionDataset(ClassificationDataset):
    """A torchvision classification dataset with clipcl's names, templates and (optional) split."""

    def __init__(self, name: str, split: str, base: Any, indices: np.ndarray | None,
                 classnames: list[str], templates: list[str]) -> None:
        self.name, self.split = name, split
        self.base = base
        all_labels = _labels_of(base)
        self.indices = np.arange(len(all_labels)) if indices is None else indices
        self._labels = all_labels[self.indices]
        self.classnames, self.templates = classnames, templates
        self.check_labels()

    def __len__(self) -> int:
        return len(self.indices)

    @property
    def labels(self) -> np.ndarray:
        return self._labels

    def __getitem__(self, index: int) -> tuple[Image.Image, int]:
        image, _ = self.base[int(self.indices[index])]
        if not isinstance(image, Image.Image):
            image = Image.fromarray(np.asarray(image))
        return image.convert("RGB"), int(self._labels[index])


def load_torchvision(name: str, split: str, root: Path, download: bool) -> TorchvisionDataset:
    folder = root / TORCHVISION_DATASETS[name][1]
    try:
        base = _construct(name, split, str(root), download)
    except (RuntimeError, FileNotFoundError) as error:
        text = str(error).splitlines()[0] if str(error) else type(error).__name__
        if download:
            raise DataError(f"{name}: download into {root} failed ({text}); some datasets must be fetched by "
                            f"hand, see docs/datasets.md") from None
        raise DataError(f"{name} not found under {folder} ({text}); set stream.download=true on a machine with "
                        f"internet, or place the files there (see docs/datasets.md)") from None
    indices = None
    if name in NO_TEST_SPLIT:
        from clipcl.data.offline import OFFLINE_SPLIT_SEED, OFFLINE_TEST_FRACTION, _stratified_split

        train, test = _stratified_split(_labels_of(base), OFFLINE_TEST_FRACTION, OFFLINE_SPLIT_SEED)
        indices = train if split == "train" else test
    classnames, templates = _names_for(name, base)
    return TorchvisionDataset(name, split, base, indices, classnames, templates)


def _names_for(name: str, base: Any) -> tuple[list[str], list[str]]:
    """Curated class names where clipcl has them; otherwise torchvision's, cleaned."""
    try:
        return classnames_and_templates(name)
    except KeyError:
        pass
    categories: list[str] = list(getattr(base, "classes", None) or getattr(base, "categories", []))
    if not categories:
        raise DataError(f"{name}: no class names known")
    return [_clean(category) for category in categories], templates_for(name)


__all__: list[Callable | str] = ["TORCHVISION_DATASETS", "TorchvisionDataset", "load_torchvision"]
