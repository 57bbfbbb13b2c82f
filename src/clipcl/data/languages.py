"""Language streams (``stream.protocol: languages``): one image-caption set, one language per task.

CLL-CLIP's protocol (Yang et al., AAAI 2024): the same images are captioned in a sequence of
languages; a method trains on one language after another and, after each, every language is measured
by image-text retrieval on the set's test images in that language (the matrix's lower triangle is what
AA, F and Fen read; the upper triangle is zero-shot transfer to languages not learned yet).

A task is a :class:`LanguagePairs` view: the rows of the set that have a caption in the task's
language, with that caption, and beside each the English caption it translates (``english``, what
CLL-CLIP's teacher encodes), or None where the set has no such pairing (XM3600 captions are written
per language, not translated). The split is the set's own (Tux Paint: by stamp), the same for every
language. Caption sets: ``tuxpaint`` (translations in the stamps' ``.txt`` files) or the multilingual
files of :mod:`clipcl.data.multilingual_files` (XM3600, CLFM's per-language COCO/XM3600 JSON, COCO-36
triplets).
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Sequence

from PIL import Image

from clipcl.data.base import DataError
from clipcl.data.caption_stream import CaptionStream, CaptionTask, cap_images
from clipcl.data.captions import CaptionPairs, text_digest

LANGUAGE_PROTOCOL = "languages"
BASE_LANGUAGE = "en"
"""The language of a set's own captions (Tux Paint's first line, COCO's captions)."""
OFFICIAL_ORDER = ("en", "it", "de", "fil", "tr", "uk", "nl", "bn", "he", "fi", "sv", "quz", "fa", "mi", "fr", "el",
                  "zh", "id", "sw", "no", "hi", "da", "te", "th", "pt", "ru", "ro", "pl", "hr", "es", "vi", "ar",
                  "cs", "ko", "ja", "hu")
"""CLL-CLIP's XM3600 order (official configs/__init__.py:49, scripts/run_cl.sh:45: seed 222, English first)."""
LANGUAGE_CODE = re.compile(r"^[a-z]{2,3}([_-][A-Za-z0-9]{2,8})*(@[a-z]+)?$")


class LanguagePairs(CaptionPairs):
    """The rows of ``base`` captioned in ``language``: ``captions`` in that language, ``english`` the
    English caption of each row (None where unknown), images renumbered 0.. in order of appearance."""

    def __init__(self, base: CaptionPairs, language: str, rows: Sequence[tuple[int, str, str | None]]) -> None:
        """``rows``: (base image id, caption in ``language``, English caption or None)."""
        self.base, self.language = base, language
        self.name = f"{base.name}[{language}]"
        renumbered: dict[int, int] = {}
        self.image_ids = [renumbered.setdefault(image, len(renumbered)) for image, _, _ in rows]
        self.base_images = list(renumbered)
        self.captions = [caption for _, caption, _ in rows]
        self.english = [english for _, _, english in rows]
        self.image_keys = [base.image_keys[image] for image in self.base_images]
        self.categories = None if base.categories is None else [base.categories[image] for image in self.base_images]
        self.translations = {}

    def load_image(self, image_id: int) -> Image.Image:
        return self.base.load_image(self.base_images[image_id])

    def select_images(self, positions: Sequence[int]) -> LanguagePairs:
        chosen = [int(position) for position in positions]
        rows_of = self.image_rows()
        rows = [(self.base_images[position], self.captions[row], self.english[row])
                for position in chosen for row in rows_of[position]]
        return LanguagePairs(self.base, self.language, rows)

    def _content_fingerprint(self) -> str:
        chosen = hashlib.sha256(json.dumps(self.base_images).encode()).hexdigest()[:16]
        return (f"{self.base.fingerprint()}/language={self.language}/images={chosen}/"
                f"captions={text_digest(self.captions)}")

    def local_stamp(self) -> str:
        return self.base.local_stamp()


def translated_rows(pairs: CaptionPairs, language: str) -> list[tuple[int, str, str | None]]:
    """(image id, caption, English caption) of every row of a row-aligned set (``pairs.translations``)
    that has a caption in ``language``; English is the set's own caption."""
    if language == BASE_LANGUAGE:
        return [(image, caption, caption) for image, caption in zip(pairs.image_ids, pairs.captions)]
    texts = pairs.translations.get(language)
    if texts is None:
        return []
    return [(image, text, english) for image, text, english in zip(pairs.image_ids, texts, pairs.captions)
            if text is not None]


def in_language(pairs: CaptionPairs, language: str) -> LanguagePairs:
    """``pairs`` captioned in ``language`` (a set with its own per-language rows provides ``language_rows``)."""
    rows = pairs.language_rows(language) if hasattr(pairs, "language_rows") else translated_rows(pairs, language)
    if not rows:
        raise DataError(f"{pairs.name} has no captions in language {language!r} "
                        f"(it has: {', '.join(available_languages(pairs)) or 'none'})")
    return LanguagePairs(pairs, language, rows)


def available_languages(pairs: CaptionPairs) -> list[str]:
    """The languages ``pairs`` has captions in."""
    if hasattr(pairs, "languages"):
        return list(pairs.languages)
    return [BASE_LANGUAGE, *sorted(language for language in pairs.translations if language != BASE_LANGUAGE)]


def caption_counts(pairs: CaptionPairs) -> dict[str, int]:
    """How many rows each language has captions for."""
    if hasattr(pairs, "language_rows"):
        return {language: len(pairs.language_rows(language)) for language in available_languages(pairs)}
    counts = {language: sum(text is not None for text in texts) for language, texts in pairs.translations.items()}
    return {BASE_LANGUAGE: len(pairs.captions), **counts}


def default_languages(pairs: CaptionPairs, min_share: float) -> list[str]:
    """English, then the languages of CLL-CLIP's order that ``pairs`` captions at least ``min_share`` of
    English's rows (Tux Paint names Chinese ``zh_CN`` / ``zh_TW`` and Filipino not at all, so those are
    absent unless named in ``stream.languages``)."""
    counts = caption_counts(pairs)
    enough = {language for language, count in counts.items() if count >= min_share * counts.get(BASE_LANGUAGE, 0)}
    return [language for language in OFFICIAL_ORDER if language in enough]


def check_languages(languages: Sequence[str], pairs: CaptionPairs) -> None:
    """One line for a malformed, repeated or absent language code."""
    for language in languages:
        if not isinstance(language, str) or not LANGUAGE_CODE.match(language):
            raise DataError(f"stream.languages: {language!r} is not a language code (such as en, de, pt_BR)")
    repeated = sorted({language for language in languages if list(languages).count(language) > 1})
    if repeated:
        raise DataError(f"stream.languages names {', '.join(repeated)} twice")
    known = set(available_languages(pairs))
    unknown = [language for language in languages if language not in known]
    if unknown:
        raise DataError(f"{pairs.name} has no captions in {', '.join(unknown)} (it has: {', '.join(sorted(known))})")


def build_language_stream(config, seed: int) -> CaptionStream:
    """A :class:`CaptionStream` (protocol ``languages``) from a :class:`clipcl.config.StreamConfig`:
    ``datasets`` names one multilingual caption set, ``languages`` the order (default
    :func:`default_languages`). Caps count images, as for caption streams; every language's test set
    is the same images' captions in that language (the test cap picks images once, by a fixed seed)."""
    from clipcl.data.multilingual_files import load_multilingual_set
    from clipcl.data.streams import TEST_SUBSET_SEED

    names = [config.datasets] if isinstance(config.datasets, str) else list(config.datasets)
    if len(names) != 1:
        raise DataError(f"stream.protocol=languages takes one caption set in stream.datasets, got {len(names)}")
    if config.heldout:
        raise DataError("stream.protocol=languages has no held-out sets: every language is measured after every task")
    train_set = load_multilingual_set(names[0], "train", config.data_root)
    test_set = load_multilingual_set(names[0], "test", config.data_root)
    languages = list(config.languages) if config.languages is not None else default_languages(
        train_set, config.min_translation_share)
    if not languages:
        raise DataError(f"{train_set.name}: no language captions {config.min_translation_share:.0%} of the "
                        "images; name them in stream.languages")
    check_languages(languages, train_set)
    check_languages(languages, test_set)
    tested_images = cap_images(in_language(test_set, languages[0]), config.test_samples_per_task,
                               TEST_SUBSET_SEED).base_images
    tasks = []
    for index, language in enumerate(languages):
        train = cap_images(in_language(train_set, language), config.train_samples_per_task, seed + 1000 * index)
        test = in_language(test_set, language)
        keep = set(tested_images)
        test = test.select_images([position for position, image in enumerate(test.base_images) if image in keep])
        if len(train) == 0 or len(test) == 0:
            raise DataError(f"language {language} has no training or no test captions in {train_set.name}")
        task = CaptionTask(index, language, train, test)
        task.language = language
        tasks.append(task)
    stream = CaptionStream(LANGUAGE_PROTOCOL, tasks)
    stream.languages = languages
    return stream


__all__ = ["BASE_LANGUAGE", "LANGUAGE_PROTOCOL", "OFFICIAL_ORDER", "LanguagePairs", "available_languages",
           "build_language_stream", "caption_counts", "check_languages", "default_languages", "in_language",
           "translated_rows"]
