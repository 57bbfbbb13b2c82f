"""Emoji as a dated, multilingual image-caption set: rendered glyphs, not photos.

Three Debian packages hold real data about every emoji:

- ``unicode-data``: ``/usr/share/unicode/emoji/emoji-test.txt`` lists every fully-qualified emoji with
  the Unicode Emoji version that introduced it (``E0.6``, 2010 ... ``E15.0``, 2022), its group and
  subgroup;
- ``unicode-cldr-core``: ``/usr/share/unicode/cldr/common/annotations{,Derived}/<locale>.xml`` give its
  short name (``type="tts"``) and keywords in 100+ locales, written by people for each language;
- ``fonts-noto-color-emoji``: ``NotoColorEmoji.ttf``, which Pillow renders (a bitmap font drawn at
  109 px; sequences joined by ZWJ need Pillow's raqm layout, which its wheels ship).

:class:`EmojiNames` is one row per emoji that has an English name: the caption is the English name
(``caption: name``) or the name and keywords (``caption: keywords``), ``translations`` hold every
other locale's name, ``versions`` the Emoji version per row and ``timestamps`` its release year
(:data:`RELEASE_YEARS`; TiC-CLIP's time steps read them). The split is fixed: 20% of emoji, by a hash of the code points, are test.
Glyphs are rendered on first read and cached as PNG under ``cache_dir``.
"""

from __future__ import annotations

import hashlib
import re
from functools import lru_cache
from pathlib import Path
from xml.etree import ElementTree

from PIL import Image, ImageDraw, ImageFont

from clipcl.data.base import DataError, files_fingerprint, files_stamp
from clipcl.data.captions import CaptionPairs, text_digest

DEBIAN = {"emoji_test": Path("/usr/share/unicode/emoji/emoji-test.txt"),
          "cldr": Path("/usr/share/unicode/cldr/common"),
          "font": Path("/usr/share/fonts/truetype/noto/NotoColorEmoji.ttf")}
DEBIAN_PACKAGES = "unicode-data unicode-cldr-core fonts-noto-color-emoji"
LINE = re.compile(r"^([0-9A-F ]+?)\s*;\s*fully-qualified\s*#\s*\S+\s+E(\d+\.\d+)\s+(.*)$")
VARIATION_SELECTOR = "\ufe0f"
GLYPH_SIZE = 109  # the only size of NotoColorEmoji's bitmaps
CAPTIONS = ("name", "keywords")
RELEASE_YEARS = {0.6: 2010, 0.7: 2014, 1.0: 2015, 2.0: 2015, 3.0: 2016, 4.0: 2016, 5.0: 2017, 11.0: 2018, 12.0: 2019,
                 12.1: 2019, 13.0: 2020, 13.1: 2020, 14.0: 2021, 15.0: 2022, 15.1: 2023, 16.0: 2024}
"""The year each Emoji version was released (E0.6 and E0.7 are the emoji of Unicode 6.0, 2010, and 7.0,
2014, numbered so by emoji-test.txt; later versions are Unicode's Emoji releases): the time streams'
timestamps (``timestamps``, one per emoji)."""


def read_emoji_test(path: Path) -> list[tuple[str, float, str, str]]:
    """Fully-qualified emoji of ``emoji-test.txt``: (emoji, version, test-file name, group)."""
    if not path.is_file():
        raise DataError(f"emoji: {path} does not exist (Debian: apt-get install {DEBIAN_PACKAGES})")
    found, group = [], ""
    for line in path.read_text(encoding="utf-8").splitlines():
        if line.startswith("# group:"):
            group = line.split(":", 1)[1].strip()
        match = LINE.match(line)
        if match:
            emoji = "".join(chr(int(code, 16)) for code in match.group(1).split())
            found.append((emoji, float(match.group(2)), match.group(3).strip(), group))
    if not found:
        raise DataError(f"emoji: {path} lists no fully-qualified emoji")
    return found


@lru_cache(maxsize=512)  # both splits read every locale; files do not change within a process
def read_annotations(cldr: Path, locale: str) -> dict[str, tuple[str, list[str]]]:
    """``{emoji without U+FE0F: (name, keywords)}`` of one locale (annotations and annotationsDerived)."""
    names: dict[str, str] = {}
    keywords: dict[str, list[str]] = {}
    for folder in ("annotations", "annotationsDerived"):
        path = cldr / folder / f"{locale}.xml"
        if not path.is_file():
            continue
        try:
            root = ElementTree.parse(path).getroot()
        except ElementTree.ParseError as error:
            raise DataError(f"emoji: {path} is not CLDR XML ({error})") from None
        for annotation in root.iter("annotation"):
            point, text = annotation.get("cp", ""), (annotation.text or "").strip()
            if not point or not text or text == "↑↑↑":  # CLDR's "inherit" marker
                continue
            point = point.replace(VARIATION_SELECTOR, "")
            if annotation.get("type") == "tts":
                names[point] = text
            else:
                keywords[point] = [word.strip() for word in text.split("|") if word.strip()]
    return {point: (name, keywords.get(point, [])) for point, name in names.items()}


def locales(cldr: Path) -> list[str]:
    return sorted(path.stem for path in (cldr / "annotations").glob("*.xml") if path.stem != "root")


def in_test_split(emoji: str) -> bool:
    return int.from_bytes(hashlib.blake2b(emoji.encode(), digest_size=8).digest(), "big") % 5 == 0


class EmojiNames(CaptionPairs):
    """One row per emoji with an English name; glyphs rendered from ``font`` (None: Pillow's default
    font, which draws boxes: for tests of the mechanics only)."""

    def __init__(self, emoji_test: str | Path = DEBIAN["emoji_test"], cldr: str | Path = DEBIAN["cldr"],
                 font: str | Path | None = DEBIAN["font"], split: str = "all", image_size: int = 224,
                 caption: str = "name", cache_dir: str | Path | None = None, translations: bool = True) -> None:
        if split not in ("train", "test", "all"):
            raise DataError(f"emoji: split must be train, test or all, got {split!r}")
        if caption not in CAPTIONS:
            raise DataError(f"emoji: caption must be one of {', '.join(CAPTIONS)}, got {caption!r}")
        self.emoji_test, self.cldr = Path(emoji_test), Path(cldr)
        self.font_path = None if font is None else Path(font)
        if self.font_path is not None and not self.font_path.is_file():
            raise DataError(f"emoji: font {self.font_path} does not exist (Debian: fonts-noto-color-emoji)")
        self.name, self.split, self.image_size = f"emoji[{split}]", split, image_size
        english = read_annotations(self.cldr, "en")
        if not english:
            raise DataError(f"emoji: no English CLDR names under {self.cldr} (annotations/en.xml)")
        rows = [(emoji, version, group) for emoji, version, _, group in read_emoji_test(self.emoji_test)
                if emoji.replace(VARIATION_SELECTOR, "") in english
                and (split == "all" or in_test_split(emoji) == (split == "test"))]
        if not rows:
            raise DataError(f"emoji: no named emoji in the {split} split")
        self.emoji = [emoji for emoji, _, _ in rows]
        self.versions = [version for _, version, _ in rows]
        unknown = sorted({version for version in self.versions if version not in RELEASE_YEARS})
        if unknown:
            raise DataError(f"emoji: {self.emoji_test} has Emoji version E{unknown[0]}, whose release year clipcl "
                            "does not know (clipcl.data.emoji.RELEASE_YEARS)")
        self.timestamps = [float(RELEASE_YEARS[version]) for version in self.versions]
        self.groups = [group for _, _, group in rows]
        keys = [emoji.replace(VARIATION_SELECTOR, "") for emoji in self.emoji]
        self.captions = [english[key][0] if caption == "name" else ", ".join([english[key][0], *english[key][1]])
                         for key in keys]
        self.keywords = [english[key][1] for key in keys]
        self.image_ids = list(range(len(rows)))
        self.image_keys = ["-".join(f"{ord(character):x}" for character in emoji) for emoji in self.emoji]
        self.categories = self.groups
        self.translations = {}
        for locale in locales(self.cldr) if translations else []:  # time streams read English only
            if locale == "en":
                continue
            named = read_annotations(self.cldr, locale)
            texts = [named[key][0] if key in named else None for key in keys]
            if any(text is not None for text in texts):
                self.translations[locale] = texts
        root = Path(cache_dir) if cache_dir else Path.home() / ".cache" / "clipcl" / "cache"
        self.cache = root / f"emoji-{image_size}-{'noto' if font else 'default'}"

    def _render(self, emoji: str) -> Image.Image:
        from clipcl.data.drawings import fit_on_white

        font = (ImageFont.truetype(str(self.font_path), GLYPH_SIZE) if self.font_path is not None
                else ImageFont.load_default(size=GLYPH_SIZE))
        canvas = Image.new("RGBA", (GLYPH_SIZE * 4, GLYPH_SIZE * 2), (255, 255, 255, 0))
        ImageDraw.Draw(canvas).text((GLYPH_SIZE // 4, GLYPH_SIZE // 4), emoji, font=font,
                                    embedded_color=self.font_path is not None, fill=(0, 0, 0, 255))
        box = canvas.getbbox()
        if box is None:
            raise DataError(f"emoji: {self.font_path or 'the default font'} draws nothing for {emoji!r}")
        return fit_on_white(canvas.crop(box), self.image_size)

    def load_image(self, image_id: int) -> Image.Image:
        path = self.cache / f"{self.image_keys[image_id]}.png"
        if path.is_file():
            with Image.open(path) as cached:
                return cached.convert("RGB")
        image = self._render(self.emoji[image_id])
        path.parent.mkdir(parents=True, exist_ok=True)
        partial = path.with_suffix(".part.png")
        image.save(partial)
        partial.replace(path)  # never a half-written glyph in the cache
        return image

    def _content_fingerprint(self) -> str:
        font = "default" if self.font_path is None else files_fingerprint([self.font_path], self.font_path.parent)
        translated = [f"{locale}\t{text}" for locale in sorted(self.translations)
                      for text in self.translations[locale] if text is not None]
        return (f"emoji/{self.split}/size={self.image_size}/n={len(self)}/font={font}/"
                f"captions={text_digest(self.captions)}/translations={text_digest(translated)}/"
                f"years={text_digest([f'{year:g}' for year in self.timestamps])}")

    def local_stamp(self) -> str:
        return files_stamp([self.emoji_test, *(path for path in [self.font_path] if path is not None)])


def load_emoji(split: str, root: str | None = None, translations: bool = True) -> EmojiNames:
    """The emoji set: ``<root>/emoji`` (``emoji-test.txt``, ``cldr/annotations``, optionally
    ``NotoColorEmoji.ttf``) when it exists, else the Debian files. ``translations`` False reads the
    English names only (every other locale's file is skipped: a second, not 40)."""
    folder = Path(root) / "emoji" if root else None
    if folder is not None and (folder / "emoji-test.txt").is_file():
        font = folder / "NotoColorEmoji.ttf"
        return EmojiNames(folder / "emoji-test.txt", folder / "cldr", font if font.is_file() else DEBIAN["font"], split,
                          translations=translations)
    return EmojiNames(split=split, translations=translations)


__all__ = ["DEBIAN", "EmojiNames", "load_emoji", "read_annotations", "read_emoji_test"]
