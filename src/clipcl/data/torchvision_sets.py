"""The classification datasets of the CLIP / MTIL papers, through torchvision's loaders.

Each is wrapped as a :class:`ClassificationDataset` returning ``(RGB PIL image, int)``, with labels
read from torchvision's index (``targets`` / ``_labels`` / ``y`` / ``_samples``) without decoding
images. Data lives under ``root`` in torchvision's layout; it is downloaded only with
``download=True``. Offline and absent, loading fails with one line naming the folder and what to do.

Splits: the official train / test split where the dataset has one (``trainval`` for Oxford Pets and
FGVC-Aircraft, partition 1 for DTD). Caltech101, SUN397 and EuroSAT ship without one; they get a
fixed per-class 80/20 split (seed 0, the same rule as the offline sets).

Class names: the CLIP paper's curated names from ``resources/classnames.json`` where clipcl ships
them (checked against the dataset's own list at load time). SUN397, Stanford Cars and FGVC-Aircraft
take their names from the dataset's own files (``ClassName.txt``, ``cars_meta.mat``,
``variants.txt``), cleaned; those cleaned names are the ones the CLIP paper uses.
"""

from __future__ import annotations

import hashlib
import re
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from clipcl.data.base import ClassificationDataset, DataError, files_fingerprint, files_stamp
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

# Class names read from the dataset's own files at load time (cleaned), not shipped in classnames.json.
NAMES_FROM_DATASET = {"sun397", "stanford_cars", "aircraft"}

# Curated names that are the dataset's own names, cleaned: checked name by name at load time.
# (For the others, e.g. EuroSAT or MNIST, CLIP rewrote the names; only the count is checked.)
SAME_AS_DATASET = {"cifar10", "cifar100", "dtd", "food101", "oxford_pet"}

# Datasets torchvision can no longer download.
NO_DOWNLOAD = {"stanford_cars": "its original download address is gone"}


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
    if name == "aircraft":
        arguments["annotation_level"] = "variant"
    return getattr(tv, class_name)(root, **arguments)


def _labels_of(dataset: Any) -> np.ndarray:
    for attribute in ("targets", "_labels", "y"):
        if hasattr(dataset, attribute):
            return np.asarray(getattr(dataset, attribute), dtype=np.int64)
    if hasattr(dataset, "_samples"):  # StanfordCars: (path, label) pairs
        return np.asarray([label for _, label in dataset._samples], dtype=np.int64)
    raise DataError(f"cannot read labels of torchvision's {type(dataset).__name__} without decoding images")


def clean_classname(name: str, slash_is_space: bool = False) -> str:
    """``apple_pie`` -> ``apple pie``; with ``slash_is_space``, ``bakery/shop`` -> ``bakery shop``."""
    if slash_is_space:
        name = name.replace("/", " ")
    return re.sub(r"\s+", " ", name.replace("_", " ")).strip()


def _normalised(name: str) -> str:
    return clean_classname(name, slash_is_space=True).lower()


class TorchvisionDataset(ClassificationDataset):
    """A torchvision classification dataset with clipcl's names, templates and (optional) split."""

    def __init__(self, name: str, split: str, base: Any, indices: np.ndarray | None,
                 classnames: list[str], templates: list[str]) -> None:
        self.name, self.split = name, split
        self.base = base
        all_labels = _labels_of(base)
        self.indices = np.arange(len(all_labels)) if indices is None else np.asarray(indices, dtype=np.int64)
        self._labels = all_labels[self.indices]
        self.classnames, self.templates = list(classnames), list(templates)
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


    def fingerprint(self) -> str:
        # Computed once per dataset object (every cache lookup asks; a large tree costs a stat per
        # file): a run reads its data as it was when the run started.
        if getattr(self, "_fingerprint", None) is None:
            self._fingerprint = self._content_fingerprint()
        return self._fingerprint

    def _content_fingerprint(self) -> str:
        # The base fingerprint has the name, split and labels; add what the images are: the pixel
        # array where torchvision holds one in memory (MNIST, CIFAR...), else the files behind them.
        subset = hashlib.sha256(self.indices.tobytes()).hexdigest()[:16]
        pixels = getattr(self.base, "data", None)
        if pixels is not None and hasattr(pixels, "shape"):
            array = np.ascontiguousarray(pixels.numpy() if hasattr(pixels, "numpy") else pixels)
            content = f"pixels={hashlib.sha256(array.tobytes()).hexdigest()[:16]}"
        else:
            paths = _image_paths(self.base)
            if paths is not None:
                content = f"files={files_fingerprint(paths, Path(self.base.root))}"
            else:  # a layout clipcl does not know: the decoded pixels of a fixed sample of images
                digest = hashlib.sha256()
                for index in np.linspace(0, len(self.indices) - 1, min(64, len(self.indices))).round().astype(int):
                    image, _ = self[int(index)]
                    digest.update(image.tobytes())
                content = f"sampled_pixels={digest.hexdigest()[:16]}"
        return f"{super().fingerprint()}/subset={subset}/{content}"

    def local_stamp(self) -> str:
        if getattr(self, "_stamp", None) is None:
            paths = _image_paths(self.base)
            self._stamp = files_stamp(paths) if paths is not None else ""
        return self._stamp


def expected_folder(name: str, root: str | Path) -> Path:
    """The folder under ``root`` where torchvision looks for dataset ``name``."""
    return Path(root) / TORCHVISION_DATASETS[name][1]


def load_torchvision(name: str, split: str, root: str | Path, download: bool) -> TorchvisionDataset:
    root = Path(root)
    folder = expected_folder(name, root)
    try:
        base = _construct(name, split, str(root), download)
    except ImportError as error:  # e.g. scipy for Flowers102 / Stanford Cars
        raise DataError(f"{name} needs {error.name or 'a missing package'}: pip install it") from None
    except (RuntimeError, OSError, ValueError) as error:
        # torchvision says RuntimeError("Dataset not found ..."); failed downloads raise URLError
        # (an OSError) or RuntimeError; Stanford Cars refuses to download with ValueError.
        if name in NO_DOWNLOAD and download:
            raise DataError(f"{name} cannot be downloaded ({NO_DOWNLOAD[name]}): place the files under {folder} "
                            "by hand (see docs/datasets.md)") from None
        if download:
            raise DataError(f"{name}: download into {folder} failed ({_first_line(error)}); place the files "
                            "there by hand (see docs/datasets.md)") from None
        hint = "" if "dataset not found" in str(error).lower() else f" ({_first_line(error)})"
        how = "place the files there" if name in NO_DOWNLOAD else (
            "set stream.download=true on a machine with internet, or place the files there")
        raise DataError(f"{name} not found under {folder}{hint}: {how} (see docs/datasets.md)") from None
    indices = fixed_split(base, split) if name in NO_TEST_SPLIT else None
    classnames, templates = names_for(name, base)
    return TorchvisionDataset(name, split, base, indices, classnames, templates)


def _sample_paths(base: Any) -> list[str] | None:
    """Each sample's file path, where torchvision keeps them (SUN397 lists files in directory order)."""
    if hasattr(base, "_image_files"):
        return [str(path) for path in base._image_files]
    if hasattr(base, "samples"):  # ImageFolder (EuroSAT)
        return [str(path) for path, _ in base.samples]
    return None


def _image_paths(base: Any) -> list[Path] | None:
    """Every sample's image file, for fingerprints: :func:`_sample_paths` plus the layouts of the
    Oxford pets (``_images``), Stanford Cars (``_samples``) and Caltech101 (built from its index)."""
    paths = _sample_paths(base)
    if paths is None and hasattr(base, "_images"):
        paths = [str(path) for path in base._images]
    if paths is None and hasattr(base, "_samples"):
        paths = [str(path) for path, _ in base._samples]
    if paths is None and all(hasattr(base, key) for key in ("categories", "index", "y")):
        paths = [str(Path(base.root) / "101_ObjectCategories" / base.categories[label] / f"image_{number:04d}.jpg")
                 for label, number in zip(base.y, base.index)]
    return None if paths is None else [Path(path) for path in paths]


def fixed_split(base: Any, split: str) -> np.ndarray:
    """Indices of clipcl's fixed per-class 80/20 split (seed 0) of a dataset without a test split.

    Samples are put in file-path order first, so the split does not depend on the order in which the
    file system lists them. The returned indices are in that order.
    """
    from clipcl.data.offline import OFFLINE_SPLIT_SEED, OFFLINE_TEST_FRACTION, _stratified_split

    labels = _labels_of(base)
    paths = _sample_paths(base)
    order = np.arange(len(labels)) if paths is None else np.asarray(sorted(range(len(labels)), key=paths.__getitem__),
                                                                     dtype=np.int64)
    train, test = _stratified_split(labels[order], OFFLINE_TEST_FRACTION, OFFLINE_SPLIT_SEED)
    return order[train if split == "train" else test]


def _dataset_classnames(base: Any) -> list[str]:
    return [str(name) for name in (getattr(base, "classes", None) or getattr(base, "categories", None) or [])]


def names_for(name: str, base: Any) -> tuple[list[str], list[str]]:
    """Class names and templates for a loaded torchvision dataset (see the module docstring)."""
    own = _dataset_classnames(base)
    if name in NAMES_FROM_DATASET:
        if not own:
            raise DataError(f"{name}: the dataset files list no class names")
        return [clean_classname(category, slash_is_space=name == "sun397") for category in own], templates_for(name)
    classnames, templates = classnames_and_templates(name)
    if own and len(own) != len(classnames):
        raise DataError(f"{name}: the data under its folder has {len(own)} classes but clipcl's class names "
                        f"list {len(classnames)}; the files are not the expected {name} release")
    if own and name in SAME_AS_DATASET:
        for index, (mine, theirs) in enumerate(zip(classnames, own)):
            if _normalised(mine) != _normalised(theirs):
                raise DataError(f"{name}: class {index} is {theirs!r} in the data but {mine!r} in clipcl's class "
                                "names; the files are not the expected release")
    return classnames, templates


def _first_line(error: BaseException) -> str:
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__


__all__ = ["NAMES_FROM_DATASET", "NO_TEST_SPLIT", "TORCHVISION_DATASETS", "TorchvisionDataset", "clean_classname",
           "expected_folder", "fixed_split", "load_torchvision", "names_for"]
