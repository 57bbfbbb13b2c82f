"""Multilingual caption files in the layouts CLL-CLIP's data come in, as one caption set per split.

:func:`load_multilingual_set` takes:

- ``tuxpaint``: Tux Paint's stamps, whose translations are row-aligned with the English description
  (:class:`clipcl.data.drawings.TuxPaintStamps`); ``emoji``: CLDR's emoji names in 100+ locales,
  rendered glyphs (:class:`clipcl.data.emoji.EmojiNames`);
- an XM3600 folder or its ``captions.jsonl`` (Thapliyal et al. 2022, as Google ships it): one JSON line
  per image, ``{"image/key": K, "<lang>": {"caption": [...], ...}, ...}``, images ``images/K.jpg``. XM3600
  is a test set; its ``train`` / ``test`` here are a fixed split by image key (20% test, the rule of
  the Debian drawing sets), so it can also run as a stream. Its captions are written per language, so
  no caption has an English source (``english`` is None);
- a folder in CLFM's annotation layout (``data/annotations/{coco/translated,xm3600}``):
  ``<lang>/<split>.json``, a list of ``{"image": path, "caption": [...], "image_id": ...}``, images under
  ``images/`` beside the language folders when present, else the folder itself. Caption ``i`` of an
  image in a language is paired with English caption ``i`` of that image when both lists have the
  same length (COCO-36's machine translations are), else left unpaired;
- a folder holding COCO-36 training triplets (CLFM's ``coco_vision-en-<lang>.tsv[.gz]``, lines
  ``image path \\t English caption \\t caption``): the ``train`` split comes from them, ``test`` from the
  annotation layout beside them.

Every problem (a missing file or image, an empty caption, a line that is not JSON) is one DataError line.
"""

from __future__ import annotations

import gzip
import json
from pathlib import Path

from PIL import Image

from clipcl.data.base import DataError, files_fingerprint, files_stamp
from clipcl.data.captions import CaptionPairs, load_caption_set, text_digest
from clipcl.data.folders import open_image

BASE_LANGUAGE = "en"
TRIPLET_PREFIX = "coco_vision-en-"


class MultilingualCaptions(CaptionPairs):
    """Images with their own captions per language: ``language_rows(language)`` lists (image id,
    caption, English caption or None); ``captions`` / ``image_ids`` are the English rows (or the first
    language's, without English)."""

    def __init__(self, name: str, image_paths: list[Path], rows: dict[str, list[tuple[int, str, str | None]]],
                 base: Path) -> None:
        if not rows or not any(rows.values()):
            raise DataError(f"{name} holds no captions")
        self.name, self.paths, self._rows, self._base = name, image_paths, rows, base
        self.languages = [BASE_LANGUAGE, *sorted(set(rows) - {BASE_LANGUAGE})] if BASE_LANGUAGE in rows else sorted(rows)
        shown = rows[self.languages[0]]
        self.image_ids = [image for image, _, _ in shown]
        self.captions = [caption for _, caption, _ in shown]
        self.image_keys = [path.relative_to(base).as_posix() if path.is_relative_to(base) else path.as_posix()
                           for path in image_paths]
        self.translations = {}
        missing = next((path for path in image_paths if not path.is_file()), None)
        if missing is not None:
            raise DataError(f"{name}: image {missing} does not exist")

    def language_rows(self, language: str) -> list[tuple[int, str, str | None]]:
        return list(self._rows.get(language, []))

    def load_image(self, image_id: int) -> Image.Image:
        return open_image(self.paths[image_id])

    def _content_fingerprint(self) -> str:
        texts = [f"{language}\t{caption}" for language in self.languages for _, caption, _ in self._rows[language]]
        return f"multilingual/n={len(self.paths)}/files={files_fingerprint(self.paths, self._base)}/" \
               f"captions={text_digest(texts)}"

    def local_stamp(self) -> str:
        return files_stamp(self.paths)


class _Images:
    """Image paths numbered in order of first appearance."""

    def __init__(self) -> None:
        self.paths: list[Path] = []
        self.index: dict[Path, int] = {}

    def id(self, path: Path) -> int:
        if path not in self.index:
            self.index[path] = len(self.paths)
            self.paths.append(path)
        return self.index[path]


def _caption(text, where: str) -> str:
    if not isinstance(text, str) or not text.strip():
        raise DataError(f"{where}: empty caption")
    return text.strip()


def read_xm3600(path: Path, split: str) -> MultilingualCaptions:
    """XM3600's ``captions.jsonl`` (``path`` the file or its folder); images ``images/<key>.jpg``."""
    from clipcl.data.drawings import keep_split

    file = path / "captions.jsonl" if path.is_dir() else path
    if not file.is_file():
        raise DataError(f"XM3600: {file} does not exist")
    folder, images = file.parent, _Images()
    rows: dict[str, list[tuple[int, str, str | None]]] = {}
    for number, line in enumerate(file.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
            key = record["image/key"]
        except (json.JSONDecodeError, KeyError, TypeError):
            raise DataError(f"{file}:{number}: not an XM3600 line (JSON with image/key)") from None
        if not keep_split(str(key), split):
            continue
        image = images.id(folder / "images" / f"{key}.jpg")
        for language, entry in record.items():
            if language == "image/key" or not isinstance(entry, dict):
                continue
            for caption in entry.get("caption", []):
                rows.setdefault(language, []).append((image, _caption(caption, f"{file}:{number} ({language})"), None))
    return MultilingualCaptions(f"{file}[{split}]", images.paths, rows, folder)


def _annotation_items(file: Path) -> list[dict]:
    try:
        items = json.loads(file.read_text(encoding="utf-8"))
    except json.JSONDecodeError as error:
        raise DataError(f"{file}: not JSON ({error.msg} at line {error.lineno})") from None
    if not isinstance(items, list) or not all(isinstance(item, dict) and "image" in item and "caption" in item
                                              for item in items):
        raise DataError(f"{file}: not CLFM annotations (a list of {{image, caption}})")
    return items


def image_folder(folder: Path) -> Path:
    return folder / "images" if (folder / "images").is_dir() else folder


def read_annotations(folder: Path, split: str) -> MultilingualCaptions:
    """CLFM's ``<lang>/<split>.json`` layout under ``folder``."""
    files = sorted(folder.glob(f"*/{split}.json"))
    if not files:
        raise DataError(f"{folder}: no <language>/{split}.json annotation files")
    root, images = image_folder(folder), _Images()
    captions: dict[str, dict[int, list[str]]] = {}
    for file in files:
        language = file.parent.name
        for position, item in enumerate(_annotation_items(file)):
            image = images.id(root / str(item["image"]))
            texts = item["caption"] if isinstance(item["caption"], list) else [item["caption"]]
            captions.setdefault(language, {}).setdefault(image, []).extend(
                _caption(text, f"{file} item {position} ({language})") for text in texts)
    english = captions.get(BASE_LANGUAGE, {})
    rows = {}
    for language, by_image in captions.items():
        rows[language] = []
        for image, texts in by_image.items():
            sources = english.get(image)
            paired = sources if sources is not None and len(sources) == len(texts) else [None] * len(texts)
            rows[language].extend((image, text, source) for text, source in zip(texts, paired))
    return MultilingualCaptions(f"{folder}[{split}]", images.paths, rows, root)


def read_triplets(folder: Path) -> MultilingualCaptions:
    """COCO-36 training triplets ``coco_vision-en-<lang>.tsv[.gz]`` under ``folder``."""
    files = sorted([*folder.glob(f"{TRIPLET_PREFIX}*.tsv"), *folder.glob(f"{TRIPLET_PREFIX}*.tsv.gz")])
    root, images = image_folder(folder), _Images()
    rows: dict[str, list[tuple[int, str, str | None]]] = {}
    for file in files:
        language = file.name[len(TRIPLET_PREFIX):].split(".")[0]
        opener = gzip.open if file.suffix == ".gz" else open
        with opener(file, "rt", encoding="utf-8") as handle:
            for number, line in enumerate(handle, 1):
                fields = line.rstrip("\n").split("\t")
                if len(fields) != 3:
                    raise DataError(f"{file}:{number}: expected image path, English caption and caption (3 tab-separated fields)")
                image = images.id(root / fields[0])
                english = _caption(fields[1], f"{file}:{number} (en)")
                rows.setdefault(language, []).append((image, _caption(fields[2], f"{file}:{number} ({language})"), english))
    if not rows:
        raise DataError(f"{folder}: no {TRIPLET_PREFIX}<language>.tsv[.gz] triplet files")
    if BASE_LANGUAGE not in rows:  # English trains on the English side of the first language's triplets
        rows[BASE_LANGUAGE] = [(image, english, english) for image, _, english in rows[min(rows)]]
    return MultilingualCaptions(f"{folder}[train]", images.paths, rows, root)


def load_multilingual_set(name: str, split: str, root: str | None = None) -> CaptionPairs:
    """A multilingual caption set by name (see the module docstring); ``split`` is ``train`` or ``test``."""
    if name in ("tuxpaint", "emoji"):
        return load_caption_set(name, split, root)
    path = Path(name)
    if not path.exists() and not path.is_absolute() and root:
        path = Path(root) / path
    if path.name == "captions.jsonl" or (path / "captions.jsonl").is_file():
        return read_xm3600(path, split)
    if path.is_dir():
        if split == "train" and any(path.glob(f"{TRIPLET_PREFIX}*.tsv*")):
            return read_triplets(path)
        return read_annotations(path, split)
    raise DataError(f"unknown multilingual caption set {name!r}: use tuxpaint, an XM3600 folder (captions.jsonl, "
                    "images/), or a folder of <language>/<split>.json annotations or coco_vision-en-<lang>.tsv triplets")


__all__ = ["MultilingualCaptions", "load_multilingual_set", "read_annotations", "read_triplets", "read_xm3600"]
