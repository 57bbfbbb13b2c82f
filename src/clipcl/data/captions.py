"""Image-caption sets: one row per caption, ``pairs[row]`` is ``(RGB PIL image, caption)``.

Every caption set is a :class:`CaptionPairs`: ``captions`` (one per row), ``image_ids`` (one per row,
shared by the rows of one image, numbered 0, 1, ... in order of first appearance), ``num_images``,
``fingerprint()`` / ``local_stamp()`` (as a classification dataset's) and ``select_images()`` (a view
on some images, for contiguous phases and caps). The sets:

- :class:`CaptionDataset`: caption files, CSV / TSV / JSONL or a Karpathy-style COCO / Flickr30k JSON.
- :class:`clipcl.data.caption_shards.WebDatasetShards`: webdataset ``.tar`` shards, read by offset.
- :class:`clipcl.data.drawings.TuxPaintStamps` and :class:`clipcl.data.drawings.OpenClipart`: two
  captioned sets of drawings (not photos) that Debian ships.

:func:`load_caption_set` builds any of them from a name.
"""

from __future__ import annotations

import csv
import hashlib
import json
import math
import re
from collections.abc import Sequence
from pathlib import Path

from PIL import Image

from clipcl.data.base import DataError, files_fingerprint, files_stamp
from clipcl.data.folders import open_image

SPLITS = ("train", "test", "all")
CAPTION_FILE_SUFFIXES = (".json", ".jsonl", ".csv", ".tsv")


def text_digest(texts: Sequence[str]) -> str:
    """A short digest of a list of strings (captions, keys)."""
    return hashlib.sha256(json.dumps(list(texts)).encode()).hexdigest()[:16]


class CaptionPairs:
    """Base class of every caption set: rows of ``(RGB PIL image, caption)``.

    A subclass sets ``name``, ``captions``, ``image_ids`` (0.. in order of first appearance) and
    ``image_keys`` (one stable name per image, in image-id order: a relative path or a shard key), and
    implements :meth:`load_image` and :meth:`_content_fingerprint`. Optional per-image ``categories``
    and per-row ``translations`` (language code -> caption or None per row) travel into views.
    """

    name: str = ""
    captions: list[str]
    image_ids: list[int]
    image_keys: list[str]
    categories: list[str] | None = None
    translations: dict[str, list[str | None]]
    timestamps: list[float] | None = None
    """Per image (image-id order), when the set has them: when it was made (a year, for time streams)."""

    def __len__(self) -> int:
        return len(self.captions)

    def __getitem__(self, row: int) -> tuple[Image.Image, str]:
        return self.load_image(self.image_ids[row]), self.captions[row]

    @property
    def num_images(self) -> int:
        """How many distinct images the rows show."""
        return len(self.image_keys)

    def load_image(self, image_id: int) -> Image.Image:
        """Image ``image_id`` as an RGB PIL image (a bad file raises :class:`DataError` naming it)."""
        raise NotImplementedError

    def image_order(self) -> list[str]:
        """The images' keys in image-id order: positions for :meth:`select_images` index this list, so
        a contiguous range of positions is a contiguous slice of the set."""
        return list(self.image_keys)

    def image_rows(self) -> list[list[int]]:
        """For each image (by id), the rows that show it."""
        rows: list[list[int]] = [[] for _ in range(self.num_images)]
        for row, image_id in enumerate(self.image_ids):
            rows[image_id].append(row)
        return rows

    def select_images(self, positions: Sequence[int]) -> CaptionPairs:
        """A view holding every row of the chosen images (positions into :meth:`image_order`), the images
        renumbered 0.. in the order given; it has this interface too."""
        return SelectedImages(self, positions)

    def fingerprint(self) -> str:
        """A short digest of the content (image bytes, or a fixed sample of them for large sets, and
        the captions); computed once per object, since a run reads its data as it was when it started."""
        if getattr(self, "_fingerprint", None) is None:
            self._fingerprint = self._content_fingerprint()
        return self._fingerprint

    def _content_fingerprint(self) -> str:
        raise NotImplementedError

    def local_stamp(self) -> str:
        """A cheap digest of the files' sizes and mtimes (see ``ClassificationDataset.local_stamp``)."""
        return ""


class SelectedImages(CaptionPairs):
    """Some images of another caption set with all their rows; image ids renumbered 0.."""

    def __init__(self, base: CaptionPairs, positions: Sequence[int]) -> None:
        chosen = [int(position) for position in positions]
        if len(set(chosen)) != len(chosen):
            raise DataError(f"{base.name}: select_images got a position twice")
        if any(not 0 <= position < base.num_images for position in chosen):
            raise DataError(f"{base.name}: select_images positions must lie in 0..{base.num_images - 1}")
        self.base, self.positions = base, chosen
        self.name = base.name
        rows_of = base.image_rows()
        self.rows = [row for position in chosen for row in rows_of[position]]
        new_id = {position: index for index, position in enumerate(chosen)}
        self.captions = [base.captions[row] for row in self.rows]
        self.image_ids = [new_id[base.image_ids[row]] for row in self.rows]
        self.image_keys = [base.image_keys[position] for position in chosen]
        self.categories = None if base.categories is None else [base.categories[p] for p in chosen]
        self.timestamps = None if base.timestamps is None else [base.timestamps[p] for p in chosen]
        self.translations = {language: [texts[row] for row in self.rows]
                             for language, texts in base.translations.items()}

    def load_image(self, image_id: int) -> Image.Image:
        return self.base.load_image(self.positions[image_id])

    def _content_fingerprint(self) -> str:
        chosen = hashlib.sha256(json.dumps(self.positions).encode()).hexdigest()[:16]
        return f"{self.base.fingerprint()}/images={chosen}"

    def local_stamp(self) -> str:
        return self.base.local_stamp()


class CaptionDataset(CaptionPairs):
    """Image-caption pairs, one row per caption; ``dataset[i]`` is ``(RGB PIL image, caption)``.

    ``captions[i]`` is row ``i``'s caption, ``image_paths[i]`` its image and ``image_ids[i]`` a
    number shared by all rows of the same image (0, 1, ... in order of first appearance). Image paths
    are relative to the caption file's folder unless ``image_root`` is given. For a Karpathy-style
    JSON, ``split`` keeps only images of that split (``"train"`` also takes COCO's ``"restval"``).
    Missing columns, keys or image files raise :class:`DataError` with one line.
    """

    def __init__(self, path: str | Path, image_root: str | Path | None = None, split: str | None = None,
                 timestamp_key: str | None = None) -> None:
        path = Path(path)
        if not path.is_file():
            raise DataError(f"caption file {path} does not exist")
        base = Path(image_root) if image_root else path.parent
        rows = self._read(path, split, timestamp_key)
        if not rows:
            raise DataError(f"{path} holds no image-caption pairs" + (f" for split {split!r}" if split else ""))
        self.path = path
        self.image_paths = [base / row[0] for row in rows]
        self.captions = [row[1] for row in rows]
        missing = next((image for image in self.image_paths if not image.is_file()), None)
        if missing is not None:
            raise DataError(f"{path}: image {missing} does not exist")
        first_seen: dict[Path, int] = {}
        self.image_ids = [first_seen.setdefault(image, len(first_seen)) for image in self.image_paths]
        self.unique_paths = list(first_seen)
        self.timestamps = _image_timestamps(path, timestamp_key, rows, self.image_ids, len(first_seen))
        self.image_keys = [_relative_name(image, base) for image in self.unique_paths]
        self.name = str(path)
        self.translations = {}
        self._fingerprint: str | None = None
        self._stamp: str | None = None

    @staticmethod
    def _read(path: Path, split: str | None, timestamp_key: str | None) -> list[Row]:
        suffix = path.suffix.lower()
        if suffix in (".csv", ".tsv"):
            return _read_csv(path, timestamp_key)
        if suffix == ".jsonl":
            return _read_jsonl(path, timestamp_key)
        if suffix == ".json":
            return _read_karpathy(path, split, timestamp_key)
        raise DataError(f"{path}: caption files must be .csv, .tsv, .jsonl or .json")

    def __getitem__(self, index: int) -> tuple[Image.Image, str]:
        return open_image(self.image_paths[index]), self.captions[index]

    def load_image(self, image_id: int) -> Image.Image:
        return open_image(self.unique_paths[image_id])

    def _content_fingerprint(self) -> str:
        # Paths relative to the caption file's folder: a moved tree is the same data.
        files = files_fingerprint(self.unique_paths, self.path.parent)
        # repr, every digit: dates such as 20140301 and 20140305 must not read as one.
        times = "" if self.timestamps is None else f"/times={text_digest([repr(t) for t in self.timestamps])}"
        return f"captions/n={len(self)}/files={files}/captions={text_digest(self.captions)}/" \
               f"ids={text_digest([str(i) for i in self.image_ids])}{times}"

    def local_stamp(self) -> str:
        if self._stamp is None:
            self._stamp = files_stamp([self.path, *self.unique_paths])
        return self._stamp


def _relative_name(path: Path, base: Path) -> str:
    return path.relative_to(base).as_posix() if path.is_relative_to(base) else path.as_posix()


CSV_COLUMNS = (("image", "caption"), ("filepath", "title"))
Row = tuple[str, str, object, str]
"""One caption file row: image path, caption, its raw timestamp (None: the row has none) and where it
is in the file (``line 3``, ``images[2]``), for error lines."""


def parse_timestamp(value, where: str) -> float:
    """A timestamp as a number: a number as it is, ``"2014"`` or an ISO date (``2014-06-01``, with or
    without a time) as its year. Anything else is a DataError naming ``where``."""
    if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value):
        return float(value)
    if isinstance(value, str):
        match = re.fullmatch(r"\s*(\d{4})(-\d{2}(-\d{2}([T ].*)?)?)?\s*", value)
        if match:
            return float(match.group(1))
        try:
            number = float(value)
        except ValueError:
            number = math.nan
        if math.isfinite(number):  # "nan" and "inf" read as floats, but date nothing
            return number
    raise DataError(f"{where}: timestamp {value!r} is neither a number nor an ISO date")


def _image_timestamps(path: Path, key: str | None, rows: list[Row], image_ids: list[int],
                      count: int) -> list[float] | None:
    """Per image, the timestamp its rows carry under ``key``; None when no row has that field. A row
    without it, while others have it, or two rows of one image that disagree, is one DataError line."""
    if key is None or all(raw is None for _, _, raw, _ in rows):
        return None
    timestamps: list[float | None] = [None] * count
    for (image, _, raw, where), image_id in zip(rows, image_ids):
        if raw is None:
            raise DataError(f"{path}: {where} ({image}) has no {key!r}, which other rows have")
        value = parse_timestamp(raw, f"{path}: {where} ({image})")
        if timestamps[image_id] is not None and timestamps[image_id] != value:
            raise DataError(f"{path}: {where}: image {image} has two timestamps "
                            f"({timestamps[image_id]:.15g} and {value:.15g})")
        timestamps[image_id] = value
    return timestamps


def _raw_timestamp(row: dict, key: str | None):
    """The row's value under ``key``; None when it has none (absent, null, or blank text)."""
    value = row.get(key) if key else None
    if isinstance(value, str):
        value = value.strip() or None
    return value


def read_caption_text(path: Path) -> str:
    """A caption file's text, or one line naming the file when it is not UTF-8."""
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError as error:
        raise DataError(f"caption file {path} is not UTF-8 text (byte {error.start})") from None


def _read_csv(path: Path, timestamp_key: str | None = None) -> list[Row]:
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
        if not caption.strip():
            raise DataError(f"{path}: line {reader.line_num} ({image}) has an empty caption")
        pairs.append((image, caption, _raw_timestamp(row, timestamp_key), f"line {reader.line_num}"))
    return pairs


def _read_jsonl(path: Path, timestamp_key: str | None = None) -> list[Row]:
    pairs = []
    for number, line in enumerate(read_caption_text(path).splitlines(), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
            image, caption = row["image"], row["caption"]
        except (json.JSONDecodeError, KeyError, TypeError):
            raise DataError(f'{path}: line {number} is not {{"image": ..., "caption": ...}}') from None
        if not isinstance(image, str) or not isinstance(caption, str) or not image or not caption.strip():
            raise DataError(f"{path}: line {number}: image and caption must be non-empty strings")
        pairs.append((image, caption, _raw_timestamp(row, timestamp_key), f"line {number}"))
    return pairs


def _read_karpathy(path: Path, split: str | None, timestamp_key: str | None = None) -> list[Row]:
    """COCO / Flickr30k Karpathy JSON: ``{"images": [{"filename" or "file_path", optional "filepath"
    (COCO's sub-folder), "split", "sentences": [{"raw": ...}]}]}``; a timestamp is a field of the image."""
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
            for sentence_number, sentence in enumerate(image["sentences"]):
                if not isinstance(sentence["raw"], str) or not sentence["raw"].strip():
                    raise DataError(f"{path}: images[{number}] ({name}) sentences[{sentence_number}] is an "
                                    "empty caption")
                pairs.append((name, sentence["raw"], _raw_timestamp(image, timestamp_key), f"images[{number}]"))
        return pairs
    except (json.JSONDecodeError, KeyError, TypeError, AttributeError):
        raise DataError(f"{path}: not a Karpathy-style caption JSON (images[].filename, images[].sentences[].raw)"
                        ) from None


def load_caption_set(name: str, split: str = "all", root: str | None = None,
                     timestamp_key: str | None = None) -> CaptionPairs:
    """A caption set by name: ``tuxpaint``, ``openclipart``, ``emoji`` (:mod:`clipcl.data.emoji`), a
    caption file or webdataset shards.

    ``tuxpaint`` / ``openclipart`` read ``<root>/tuxpaint`` / ``<root>/openclipart`` when ``root`` is given
    and they exist, else the Debian locations; their ``split`` is ``train``, ``test`` or ``all`` (a fixed
    image-level split). A ``.json`` Karpathy file keeps the images of ``split`` (``all``: every image);
    ``.csv`` / ``.tsv`` / ``.jsonl`` files and webdataset shards (``x.tar``, ``x-{000..009}.tar`` or a
    folder of ``.tar``) have no splits and ignore it. A relative path that does not exist is looked up
    under ``root``. ``timestamp_key``: the field holding each image's timestamp (a column of a caption
    file, a key of its JSON lines or images, a field of the shards' ``json``); caption files without it have none.
    """
    from clipcl.data.drawings import OpenClipart, TuxPaintStamps, debian_drawings_root

    if split not in SPLITS:
        raise DataError(f"caption set {name}: split must be one of {', '.join(SPLITS)}, got {split!r}")
    if name == "emoji":
        from clipcl.data.emoji import load_emoji

        return load_emoji(split, root)
    if name in ("tuxpaint", "openclipart"):
        found = debian_drawings_root(name, root)
        return TuxPaintStamps(found, split) if name == "tuxpaint" else OpenClipart(found, split)
    path = Path(name)
    if not path.exists() and not path.is_absolute() and root and "{" not in name:
        path = Path(root) / path
    lowered = name.lower()
    if lowered.endswith(CAPTION_FILE_SUFFIXES):
        return CaptionDataset(path, split=None if split == "all" or not lowered.endswith(".json") else split,
                              timestamp_key=timestamp_key)
    if lowered.endswith(".tar") or path.is_dir():
        from clipcl.data.caption_shards import WebDatasetShards

        return WebDatasetShards(path if "{" not in name else name, timestamp_key=timestamp_key)
    raise DataError(f"unknown caption set {name!r}: use tuxpaint, openclipart, a caption file "
                    f"({', '.join(CAPTION_FILE_SUFFIXES)}) or webdataset shards (.tar, a brace pattern "
                    "such as shard-{000000..000009}.tar, or a folder of .tar)")
