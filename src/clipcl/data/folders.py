"""Your own data: ImageFolder trees and image-caption files.

- ``ImageFolderDataset``: ``root/train/<class>/...`` and ``root/test/<class>/...``, or just
  ``root/<class>/<image>`` (then a fixed per-class 80/20 split, seed 0); class names are the folder
  names with underscores as spaces. In a stream, name it ``imagefolder:/path/to/root``.
- ``CaptionDataset``: image-caption pairs from CSV (``image,caption`` or open_clip's
  ``filepath,title`` columns), JSONL (``{"image": ..., "caption": ...}``) or a Karpathy-style
  COCO / Flickr30k JSON (``{"images": [{"filename", "sentences": [{"raw"}], "split"}]}``). Paths are
  relative to the file's folder (or to ``image_root``).
"""

from __future__ import annotations

import csv
import hashlib
import json
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


class CaptionDataset:
    """Image-caption pairs, one row per caption; ``dataset[i]`` is ``(RGB PIL image, caption)``.

    ``captions[i]`` is row ``i``'s caption, ``image_paths[i]`` its image and ``image_ids[i]`` a
    number shared by all rows of the same image (0, 1, ... in order of first appearance). Image paths
    are relative to the caption file's folder unless ``image_root`` is given. For a Karpathy-style
    JSON, ``split`` keeps only images of that split (``"train"`` also takes COCO's ``"restval"``).
    Missing columns, keys or image files raise :class:`DataError` with one line.
    """

    def __init__(self, path: str | Path, image_root: str | Path | None = None, split: str | None = None) -> None:
        path = Path(path)
        if not path.is_file():
            raise DataError(f"caption file {path} does not exist")
        base = Path(image_root) if image_root else path.parent
        pairs = self._read(path, split)
        if not pairs:
            raise DataError(f"{path} holds no image-caption pairs" + (f" for split {split!r}" if split else ""))
        self.path = path
        self.image_paths = [base / image for image, _ in pairs]
        self.captions = [caption for _, caption in pairs]
        missing = next((image for image in self.image_paths if not image.is_file()), None)
        if missing is not None:
            raise DataError(f"{path}: image {missing} does not exist")
        first_seen: dict[Path, int] = {}
        self.image_ids = [first_seen.setdefault(image, len(first_seen)) for image in self.image_paths]

    @staticmethod
    def _read(path: Path, split: str | None) -> list[tuple[str, str]]:
        suffix = path.suffix.lower()
        if suffix in (".csv", ".tsv"):
            return _read_csv(path)
        if suffix == ".jsonl":
            return _read_jsonl(path)
        if suffix == ".json":
            return _read_karpathy(path, split)
        raise DataError(f"{path}: caption files must be .csv, .tsv, .jsonl or .json")

    def __len__(self) -> int:
        return len(self.captions)

    def __getitem__(self, index: int) -> tuple[Image.Image, str]:
        return open_image(self.image_paths[index]), self.captions[index]


CSV_COLUMNS = (("image", "caption"), ("filepath", "title"))


def read_caption_text(path: Path) -> str:
    """A caption file's text, or one line naming the file when it is not UTF-8."""
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError as error:
        raise DataError(f"caption file {path} is not UTF-8 text (byte {error.start})") from None


def _read_csv(path: Path) -> list[tuple[str, str]]:
    text = read_caption_text(path)
    header = text.splitlines()[0] if text else ""
    # open_clip writes tab-separated files, often named .csv: use a tab when the header has one.
    delimiter = "\t" if path.suffix.lower() == ".tsv" or ("\t" in header and "," not in header) else ","
    reader = csv.DictReader(text.splitlines(), delimiter=delimiter)
    fields = reader.fieldnames or []
    for image_key, caption_key in CSV_COLUMNS:
        if image_key in fields and caption_key in fields:
            break
    else:
        raise DataError(f"{path}: needs columns image,caption or filepath,title; found {', '.join(fields) or 'none'}")
    pairs = []
    for row in reader:
        image, caption = row.get(image_key), row.get(caption_key)
        if not image or caption is None:
            raise DataError(f"{path}: line {reader.line_num} lacks {image_key} or {caption_key}")
        pairs.append((image, caption))
    return pairs


def _read_jsonl(path: Path) -> list[tuple[str, str]]:
    pairs = []
    for number, line in enumerate(read_caption_text(path).splitlines(), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
            image, caption = row["image"], row["caption"]
        except (json.JSONDecodeError, KeyError, TypeError):
            raise DataError(f'{path}: line {number} is not {{"image": ..., "caption": ...}}') from None
        if not isinstance(image, str) or not isinstance(caption, str) or not image:
            raise DataError(f"{path}: line {number}: image and caption must be non-empty strings")
        pairs.append((image, caption))
    return pairs


def _read_karpathy(path: Path, split: str | None) -> list[tuple[str, str]]:
    """COCO / Flickr30k Karpathy JSON: ``{"images": [{"filename" or "file_path", optional "filepath"
    (COCO's sub-folder), "split", "sentences": [{"raw": ...}]}]}``."""
    wanted = None if split is None else ({split, "restval"} if split == "train" else {split})
    try:
        images = json.loads(read_caption_text(path))["images"]
        pairs = []
        for number, image in enumerate(images):
            if wanted is not None and image.get("split") not in wanted:
                continue
            name = image.get("filename") or image.get("file_path")
            if not name:
                raise DataError(f"{path}: images[{number}] has no filename or file_path")
            if image.get("filepath"):
                name = str(Path(image["filepath"]) / name)
            pairs.extend((name, sentence["raw"]) for sentence in image["sentences"])
        return pairs
    except (json.JSONDecodeError, KeyError, TypeError, AttributeError):
        raise DataError(f"{path}: not a Karpathy-style caption JSON (images[].filename, images[].sentences[].raw)"
                        ) from None
