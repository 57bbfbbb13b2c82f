"""Your own data: ImageFolder trees.

- ``ImageFolderDataset``: ``root/train/<class>/...`` and ``root/test/<class>/...``, or just
  ``root/<class>/<image>`` (then a fixed per-class 80/20 split, seed 0); class names are the folder
  names with underscores as spaces. In a stream, name it ``imagefolder:/path/to/root``.

Image-caption files (``CaptionDataset``) live in :mod:`clipcl.data.captions`.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

from clipcl.data.base import ClassificationDataset, DataError, files_fingerprint, files_stamp

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff"}
DEFAULT_TEMPLATES = ["a photo of a {}.", "a photo of the {}."]


def open_image(path: Path) -> Image.Image:
    """Open an image as RGB, or fail with one line naming the file."""
    try:
        with Image.open(path) as image:
            return image.convert("RGB")
    except (UnidentifiedImageError, OSError, SyntaxError) as error:
        raise DataError(f"cannot read image {path}: {str(error).splitlines()[0] if str(error) else 'corrupt'}") from None


def _class_folders(folder: Path) -> list[str]:
    return sorted(path.name for path in folder.iterdir() if path.is_dir() and not path.name.startswith("."))


class ImageFolderDataset(ClassificationDataset):
    """``root/<class>/<image>``, or ``root/train/<class>/...`` and ``root/test/<class>/...``.

    Class names are the folder names with underscores as spaces; labels follow the sorted folder
    names, taken over both split folders so a label means the same class in train and test. Without
    split folders the images get a fixed per-class 80/20 split (seed 0), so train and test never share
    an image. Images are decoded only when read; a corrupt file raises :class:`DataError` naming it.
    """

    def __init__(self, root: str | Path, split: str, name: str | None = None,
                 templates: list[str] | None = None) -> None:
        top = Path(root)
        if not top.is_dir():
            raise DataError(f"image folder {top} does not exist (expected {top}/<class>/<image>)")
        has_split_folders = (top / "train").is_dir() or (top / "test").is_dir()
        if has_split_folders:
            if not (top / split).is_dir():
                raise DataError(f"{top} has train/ or test/ folders but no {split}/")
            folder = top / split
            names = sorted({name for part in ("train", "test") if (top / part).is_dir()
                            for name in _class_folders(top / part)})
        else:
            folder = top
            names = _class_folders(top)
        if not names:
            raise DataError(f"{folder} holds no class folders (expected {folder}/<class>/<image>)")
        self.classnames = [class_name.replace("_", " ") for class_name in names]
        self.templates = list(templates or DEFAULT_TEMPLATES)
        self.name = name or f"imagefolder:{top}"
        self.split = split
        paths: list[Path] = []
        labels: list[int] = []
        for label, class_name in enumerate(names):
            class_folder = folder / class_name
            if not class_folder.is_dir():
                continue  # a class only the other split has: it keeps its label there
            found = [path for path in sorted(class_folder.rglob("*"))
                     if path.suffix.lower() in IMAGE_SUFFIXES and not path.name.startswith(".")]
            if not found:
                raise DataError(f"class folder {class_folder} holds no images with suffixes "
                                f"{', '.join(sorted(IMAGE_SUFFIXES))}")
            paths.extend(found)
            labels.extend([label] * len(found))
        all_labels = np.asarray(labels, dtype=np.int64)
        if not has_split_folders:
            from clipcl.data.offline import OFFLINE_SPLIT_SEED, OFFLINE_TEST_FRACTION, _stratified_split

            train, test = _stratified_split(all_labels, OFFLINE_TEST_FRACTION, OFFLINE_SPLIT_SEED)
            chosen = train if split == "train" else test
            paths = [paths[index] for index in chosen]
            all_labels = all_labels[chosen]
        self.root = top
        self._fingerprint: str | None = None
        self._stamp: str | None = None
        self.paths = paths
        self._labels = all_labels

    def __len__(self) -> int:
        return len(self.paths)

    @property
    def labels(self) -> np.ndarray:
        return self._labels

    def __getitem__(self, index: int) -> tuple[Image.Image, int]:
        return open_image(self.paths[index]), int(self._labels[index])

    def fingerprint(self) -> str:
        # Computed once per dataset object (a run reads its data as it was when the run started):
        # every cache lookup asks, and a large tree costs a stat per file.
        if self._fingerprint is None:
            self._fingerprint = self._content_fingerprint()
        return self._fingerprint

    def _content_fingerprint(self) -> str:
        # Not the name: it holds the tree's absolute path, and a moved tree is the same data.
        labels = hashlib.sha256(np.ascontiguousarray(self._labels).tobytes()).hexdigest()[:16]
        classes = hashlib.sha256("\n".join(self.classnames).encode()).hexdigest()[:16]
        return (f"imagefolder/{self.split}/n={len(self)}/labels={labels}/classes={classes}/"
                f"files={files_fingerprint(self.paths, self.root)}")

    def local_stamp(self) -> str:
        if self._stamp is None:
            self._stamp = files_stamp(self.paths)
        return self._stamp
