"""Image-caption pairs from webdataset ``.tar`` shards, read by random access.

A shard is a plain (uncompressed) tar; a sample is the members sharing a key (the member name up to
the first dot of its last path part, as webdataset groups them): an image (``jpg``, ``jpeg``, ``png``
or ``webp``) and a caption, the ``txt`` member's text or a ``json`` member's ``caption`` (else
``text``) field; a list of captions gives one row each, all of the same image. With a
``timestamp_key``, each sample's ``json`` member must hold that field (a number, or an ISO date read as
its year; TiC-DataComp keeps its metadata there), which becomes the image's ``timestamps`` entry. clipcl's samplers pick
rows by index, so the shards are not streamed: their members are indexed once with :mod:`tarfile`
(offset and size of each) and read by offset. Compressed shards (``.tar.gz``) cannot be read that way
and are refused.
"""

from __future__ import annotations

import io
import json
import tarfile
from pathlib import Path

from PIL import Image, UnidentifiedImageError

from clipcl.data.base import CONTENT_SAMPLE_FILES, DataError, files_stamp
from clipcl.data.captions import CaptionPairs, parse_timestamp, text_digest

IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp")


def shard_paths(pattern: str | Path) -> list[Path]:
    """The shards a pattern names: one ``.tar``, a brace pattern (``shard-{000000..000009}.tar``) or a
    folder (its ``.tar`` files, sorted). A missing shard is a DataError naming it."""
    from braceexpand import braceexpand

    text = str(pattern)
    if Path(text).is_dir():
        found = sorted(Path(text).glob("*.tar"))
        if not found:
            raise DataError(f"webdataset folder {text} holds no .tar shards")
        return found
    paths = [Path(name) for name in braceexpand(text)]
    for path in paths:
        if not path.name.endswith(".tar"):
            raise DataError(f"webdataset shard {path}: only uncompressed .tar shards can be read by offset")
        if not path.is_file():
            raise DataError(f"webdataset shard {path} does not exist")
    return paths


def _split_name(member: str) -> tuple[str, str]:
    folder, _, base = member.rpartition("/")
    stem, _, extension = base.partition(".")
    return (f"{folder}/{stem}" if folder else stem), extension.lower()


class WebDatasetShards(CaptionPairs):
    """Webdataset shards as a caption set: one row per caption, ``image_keys`` are ``shard:key``.

    A sample without a caption, with an empty one, or without an image raises :class:`DataError` with
    one line naming the shard and the sample's key when the shards are indexed; a corrupt image does
    so when its row is read.
    """

    def __init__(self, pattern: str | Path, name: str | None = None, timestamp_key: str | None = None,
                 keep=None) -> None:
        """``keep(image key)`` False: the sample is counted in ``skipped`` and neither read nor indexed
        (a streamed time step indexes only its held-out samples, :mod:`clipcl.data.shard_stream`)."""
        self.shards = shard_paths(pattern)
        self.keep, self.skipped = keep, 0
        self.name = name or str(pattern)
        self.timestamp_key = timestamp_key
        self.timestamps = [] if timestamp_key else None
        self.captions, self.image_ids, self.image_keys = [], [], []
        self.translations = {}
        self._members: list[tuple[int, int, int]] = []  # per image: shard index, data offset, size
        self._fingerprint: str | None = None
        self._stamp: str | None = None
        for shard_index, shard in enumerate(self.shards):
            self._index(shard_index, shard)
        if not self.captions:
            raise DataError(f"webdataset shards {self.name} hold no samples")

    def _index(self, shard_index: int, shard: Path) -> None:
        samples: dict[str, dict[str, tarfile.TarInfo]] = {}
        try:
            with tarfile.open(shard, mode="r:") as archive:
                for member in archive:
                    if not member.isfile():
                        continue
                    key, extension = _split_name(member.name)
                    samples.setdefault(key, {})[extension] = member
                for key, members in samples.items():
                    if self.keep is not None and not self.keep(f"{shard.name}:{key}"):
                        self.skipped += 1
                        continue
                    captions = self._captions(archive, shard, key, members)
                    if self.timestamp_key:
                        self.timestamps.append(self._timestamp(archive, shard, key, members))
                    image = next((members[ext] for ext in IMAGE_EXTENSIONS if ext in members), None)
                    if image is None:
                        raise DataError(f"webdataset shard {shard}: sample {key} has no image "
                                        f"({', '.join(IMAGE_EXTENSIONS)})")
                    image_id = len(self.image_keys)
                    self.image_keys.append(f"{shard.name}:{key}")
                    self._members.append((shard_index, image.offset_data, image.size))
                    self.captions.extend(captions)
                    self.image_ids.extend([image_id] * len(captions))
        except (tarfile.TarError, OSError) as error:
            raise DataError(f"webdataset shard {shard} is not a readable tar ({error})") from None

    @staticmethod
    def _captions(archive: tarfile.TarFile, shard: Path, key: str, members: dict[str, tarfile.TarInfo]) -> list[str]:
        where = f"webdataset shard {shard}: sample {key}"
        if "txt" in members:
            texts = [_read_text(archive, members["txt"], where)]
        elif "json" in members:
            try:
                record = json.loads(_read_text(archive, members["json"], where))
            except json.JSONDecodeError:
                raise DataError(f"{where}: its .json is not valid JSON") from None
            found = record.get("caption", record.get("text")) if isinstance(record, dict) else None
            if found is None:
                raise DataError(f"{where}: its .json has no caption or text field")
            texts = found if isinstance(found, list) else [found]
        else:
            raise DataError(f"{where} has no caption (.txt, or .json with caption or text)")
        if not texts or any(not isinstance(text, str) or not text.strip() for text in texts):
            raise DataError(f"{where} has an empty caption")
        return [text.strip() for text in texts]

    def _timestamp(self, archive: tarfile.TarFile, shard: Path, key: str, members: dict[str, tarfile.TarInfo]) -> float:
        where = f"webdataset shard {shard}: sample {key}"
        record = None
        if "json" in members:
            try:
                record = json.loads(_read_text(archive, members["json"], where))
            except json.JSONDecodeError:
                raise DataError(f"{where}: its .json is not valid JSON") from None
        if not isinstance(record, dict) or self.timestamp_key not in record:
            raise DataError(f"{where} has no timestamp (a .json member with a {self.timestamp_key!r} field; "
                            "time.timestamp_key names the field)")
        return parse_timestamp(record[self.timestamp_key], where)

    def _read_member(self, image_id: int) -> bytes:
        shard_index, offset, size = self._members[image_id]
        with open(self.shards[shard_index], "rb") as file:
            file.seek(offset)
            return file.read(size)

    def load_image(self, image_id: int) -> Image.Image:
        data = self._read_member(image_id)
        try:
            with Image.open(io.BytesIO(data)) as image:
                return image.convert("RGB")
        except (UnidentifiedImageError, OSError, SyntaxError) as error:
            key = self.image_keys[image_id].partition(":")[2]
            raise DataError(f"webdataset shard {self.shards[self._members[image_id][0]]}: sample {key}: cannot "
                            f"read its image ({str(error).splitlines()[0] if str(error) else 'corrupt'})") from None

    def _content_fingerprint(self) -> str:
        import hashlib

        import numpy as np

        # Every image's bytes up to CONTENT_SAMPLE_FILES of them, else an evenly spread fixed sample
        # (as a file tree's fingerprint); the shards' names are left out: renamed shards are the same data.
        digest = hashlib.sha256()
        count = self.num_images
        sample = range(count) if count <= CONTENT_SAMPLE_FILES else np.linspace(
            0, count - 1, CONTENT_SAMPLE_FILES).round().astype(np.int64).tolist()
        for image_id in sample:
            digest.update(hashlib.sha256(self._read_member(image_id)).digest())
        sizes = text_digest([str(size) for _, _, size in self._members])
        keys = text_digest([key.partition(":")[2] for key in self.image_keys])
        times = "" if self.timestamps is None else f"/times={text_digest([f'{t:g}' for t in self.timestamps])}"
        return (f"webdataset/n={len(self)}/images={digest.hexdigest()[:16]}/sizes={sizes}/keys={keys}/"
                f"captions={text_digest(self.captions)}/ids={text_digest([str(i) for i in self.image_ids])}{times}")

    def local_stamp(self) -> str:
        if self._stamp is None:
            self._stamp = files_stamp(self.shards)
        return self._stamp


def _read_text(archive: tarfile.TarFile, member: tarfile.TarInfo, where: str) -> str:
    try:
        return archive.extractfile(member).read().decode("utf-8")
    except UnicodeDecodeError:
        raise DataError(f"{where}: its .{member.name.rpartition('.')[2]} is not UTF-8 text") from None
