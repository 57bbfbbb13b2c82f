"""Tux Paint's stamps as a labelled dataset: the class of a stamp is its category folder.

Drawings, not photos (flat colours, outlines, on white), from Debian's ``tuxpaint-stamps-default``.
The stamps, their images, the render cache and the fixed train/test split are those of the caption
set :class:`clipcl.data.drawings.TuxPaintStamps` (test: blake2b of the stamp's relative path without
suffix is 0 modulo 5, about 20%, whatever the run seed); this module only puts labels on them.

**Which folder level.** The class is the *top-level* folder under the stamps root (``animals``,
``food``, ``vehicles``, ...). The second level is too fine and uneven for classes: most of its folders
hold under 10 stamps, some are drawing styles rather than contents (``town/cartoon``,
``people/cartoon``), and ``symbols/alphabets`` alone holds 158 sign-language letters. In the Debian
package the top level gives 16 categories of 3 to 249 stamps; those with fewer than
:data:`MIN_STAMPS_PER_CATEGORY` stamps (counted over both splits, so train and test have the same
classes) are dropped, which leaves 11.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
from PIL import Image

from clipcl.data.base import ClassificationDataset, DataError, files_fingerprint, files_stamp
from clipcl.data.drawings import DEBIAN_ROOTS, TuxPaintStamps, in_test_split

MIN_STAMPS_PER_CATEGORY = 20
"""A category with fewer stamps (train and test together) is dropped: at 20% test it would have about
three test images or fewer (Debian's ``hobbies`` 17, ``sports`` 13, ``military`` 11, ``medical`` 6,
``naturalforces`` 3)."""

CATEGORY_NAMES: dict[str, str] = {
    "animals": "animals",
    "cartoon": "cartoon characters",
    "clothes": "clothes",
    "food": "food",
    "hobbies": "hobbies",
    "household": "household objects",
    "medical": "medical things",
    "military": "military things",
    "naturalforces": "forces of nature",
    "people": "people",
    "plants": "plants",
    "seasonal": "holidays and seasons",
    "space": "outer space",
    "sports": "sports",
    "symbols": "symbols",
    "town": "towns and buildings",
    "vehicles": "vehicles",
}
"""Category folder -> class name in readable English, written to follow the templates' ``of {}``
(plural or mass nouns: "a drawing of vehicles."). A folder not listed keeps its name, ``_`` as spaces."""

TEMPLATES_KEY = "tuxpaint_stamps"
"""The entry of ``resources/templates.json``: drawing prompts ("a drawing of {}."), not photo ones."""


def class_name(category: str) -> str:
    """The readable class name of a category folder."""
    return CATEGORY_NAMES.get(category, category.replace("_", " "))


class TuxPaintCategories(ClassificationDataset):
    """Tux Paint stamps labelled by their top-level category folder (see the module docstring).

    ``categories`` holds the kept folder names (index = label, sorted), ``classnames`` their readable
    names, ``dropped`` the folders under :data:`MIN_STAMPS_PER_CATEGORY` (folder -> stamps). Images are
    RGB, fitted into a white ``image_size`` square.
    """

    def __init__(self, root: str | Path = DEBIAN_ROOTS["tuxpaint"], split: str = "train", image_size: int = 224,
                 cache_dir: str | Path | None = None, min_stamps: int = MIN_STAMPS_PER_CATEGORY) -> None:
        from clipcl.data.resources import templates_for

        if split not in ("train", "test"):
            raise DataError(f"split must be one of train, test, got {split!r}")
        stamps = TuxPaintStamps(root, "all", image_size, cache_dir)
        counts: dict[str, int] = {}
        for category in stamps.categories:
            counts[category] = counts.get(category, 0) + 1
        self.categories = sorted(category for category, count in counts.items() if count >= min_stamps)
        self.dropped = {category: count for category, count in sorted(counts.items()) if count < min_stamps}
        if len(self.categories) < 2:
            raise DataError(f"tuxpaint_stamps: under {stamps.root}, {len(self.categories)} categories have at least "
                            f"{min_stamps} stamps; a classification dataset needs two or more")
        label_of = {category: label for label, category in enumerate(self.categories)}
        self._stamps = stamps
        self._rows = [row for row, (key, category) in enumerate(zip(stamps.image_keys, stamps.categories))
                      if category in label_of and in_test_split(Path(key).with_suffix("").as_posix()) == (split == "test")]
        labels = [label_of[stamps.categories[row]] for row in self._rows]
        self._labels = np.asarray(labels, dtype=np.int64).view()
        self._labels.flags.writeable = False
        self.classnames = [class_name(category) for category in self.categories]
        self.templates = templates_for(TEMPLATES_KEY)
        self.name, self.split, self.root = "tuxpaint_stamps", split, stamps.root
        self._fingerprint: str | None = None
        if not self._rows:
            raise DataError(f"tuxpaint_stamps: no {split} stamps under {stamps.root}")

    def __len__(self) -> int:
        return len(self._rows)

    @property
    def labels(self) -> np.ndarray:
        return self._labels

    @property
    def paths(self) -> list[Path]:
        """Each item's image file."""
        return [self._stamps.paths[row] for row in self._rows]

    def __getitem__(self, index: int) -> tuple[Image.Image, int]:
        return self._stamps.load_image(self._stamps.image_ids[self._rows[index]]), int(self._labels[index])

    def fingerprint(self) -> str:
        # The files (paths relative to the root, sizes, bytes), the labels and the class names.
        if self._fingerprint is None:
            names = hashlib.sha256("\n".join(self.classnames).encode()).hexdigest()[:16]
            self._fingerprint = (f"{super().fingerprint()}/size={self._stamps.image_size}/"
                                 f"files={files_fingerprint(self.paths, self.root)}/classes={names}")
        return self._fingerprint

    def local_stamp(self) -> str:
        return files_stamp(self.paths)
