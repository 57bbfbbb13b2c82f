"""Your own data: ImageFolder trees and image-caption files.

- ``ImageFolderDataset``: ``root/<class>/<image>`` (or ``root/train/<class>/...`` and
  ``root/test/<class>/...``); class names are the folder names with underscores as spaces. In a
  stream, name it ``imagefolder:/path/to/root``.
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

from clipcl.data.base import ClassificationDataset, DataError

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff"}
DEFAULT_TEMPLATES = ["a photo of a {}.", "a photo of the {}."]


def open_image(path: Path) -> Image.Image:
    """Open an image as RGB, or fail with one line naming the file."""
    try:
        with Image.open(path) as image:
            return image.convert("RGB")
    except (UnidentifiedImageError, OSError, SyntaxError) as error:
        raise DataError(f"cannot read image {path}: {str(error).splitlines()[0] if str(error) else 'corrupt'}") from None


class ImageFolderDataset(ClassificationDataset):
    def __init__(self, root: str | Path, split: str, name: str | None = None,
                 templates: list[str] | None = None) -> None:
        root = Path(root)
        if (root / split).is_dir():
            root = root / split
        elif (root / "train").is_dir() or (root / "test").is_dir():
            raise DataError(f"{root} has train/ or test/ folders but no {split}/")
        if not root.is_dir():
            raise DataError(f"image folder {root} does not exist")
        folders = sorted(path for path in root.iterdir() if path.is_dir())
        if not folders:
            raise DataError(f"{root} holds no class folders (expected root/<class>/<image>)")
        self.classnames = [folder.name.replace("_", " ") for folder in folders]
        self.templates = list(templates or DEFAULT_TEMPLATES)
        self.name = name or f"imagefolder:{root}"
        self.split = split
        self.paths: list[Path] = []
        labels = []
        for label, folder in enumerate(folders):
            for path in sorted(folder.rglob("*")):
                if path.suffix.lower() in IMAGE_SUFFIXES:
                    self.paths.append(path)
                    labels.append(label)
        if not self.paths:
            raise DataError(f"{root} holds no images with suffixes {', '.join(sorted(IMAGE_SUFFIXES))}")
        self._labels = np.asarray(labels, dtype=np.int64)

    def __len__(self) -> int:
        return len(self.paths)

    @property
    def labels(self) -> np.ndarray:
        return self._labels

    def __getitem__(self, index: int) -> tuple[Image.Image, int]:
        return open_image(self.paths[index]), int(self._labels[index])

    def fingerprint(self) -> str:
        digest = hashlib.sha256("\n".join(str(path) for path in self.paths).encode()).hexdigest()[:16]
        return f"{super().fingerprint()}/files={digest}"


class CaptionDataset:
    """Image-caption pairs; ``dataset[i]`` is ``(RGB PIL image, caption)``."""

    def __init__(self, path: str | Path, image_root: str | Path | None = None, split: str | None = None) -> None:
        path = Path(path)
        if not path.exists():
            raise DataError(f"caption file {path} does not exist")
        base = Path(image_root) if image_root else path.parent
        pairs = self._read(path, split)
        if not pairs:
            raise DataError(f"{path} holds no image-caption pairs")
        self.image_paths = [base / image for image, _ in pairs]
        self.captions = [caption for _, caption in pairs]
        missing = next((p for p in self.image_paths if not p.exists()), None)
        if missing is not None:
            raise DataError(f"{path}: image {missing} does not exist")
        unique = {str(p): i for i, p in enumerate(dict.fromkeys(str(p) for p in self.image_paths))}
        self.image_ids = [unique[str(p)] for p in self.image_paths]

    @staticmethod
    def _read(path: Path, split: str | None) -> list[tuple[str, str]]:
        suffix = path.suffix.lower()
        if suffix in (".csv", ".tsv"):
            with path.open(newline="") as handle:
                reader = csv.DictReader(handle, delimiter="\t" if suffix == ".tsv" else ",")
                fields = reader.fieldnames or []
                for image_key, caption_key in (("image", "caption"), ("filepath", "title")):
                    if image_key in fields and caption_key in fields:
                        return [(row[image_key], row[caption_key]) for row in reader]
                raise DataError(f"{path}: needs columns image,caption or filepath,title; found {fields}")
        if suffix == ".jsonl":
            pairs = []
            for number, line in enumerate(path.read_text().splitlines(), start=1):
                if not line.strip():
                    continue
                try:
                    row = json.loads(line)
                    pairs.append((row["image"], row["caption"]))
                except (json.JSONDecodeError, KeyError, TypeError):
                    raise DataError(f"{path}: line {number} is not {{\"image\": ..., \"caption\": ...}}") from None
            return pairs
        if suffix == ".json":
            try:
                data = json.loads(path.read_text())
                pairs = []
                for image in data["images"]:
                    if split is not None and image.get("split") not in (split, None):
                        continue
                    name = image.get("filename") or image.get("file_path")
                    if "filepath" in image:
                        name = str(Path(image["filepath"]) / image["filename"])
                    pairs.extend((name, sentence["raw"]) for sentence in image["sentences"])
                return pairs
            except (json.JSONDecodeError, KeyError, TypeError):
                raise DataError(f"{path}: not a Karpathy-style caption JSON (images[].filename, sentences[].raw)") from None
        raise DataError(f"{path}: caption files must be .csv, .tsv, .jsonl or .json")

    def __len__(self) -> int:
        return len(self.captions)

    def __getitem__(self, index: int) -> tuple[Image.Image, str]:
        return open_image(self.image_paths[index]), self.captions[index]
