"""Image-text retrieval recall (R@K, both directions) on a captioned set.

Definitions (as in the CLIP and "Don't Stop Learning" evaluations):

- image -> text R@K: the share of images for which at least one of their own captions is among the K
  captions most similar to the image;
- text -> image R@K: the share of captions whose own image is among the K images most similar to it.

Similarities are cosine similarities of normalised features; every image and every caption is
encoded on its own (per-item, batch-independent), and ties are broken by index, the same way on every
batch layout. Captioned sets come from real caption files (:class:`clipcl.data.captions.CaptionDataset`,
COCO / Flickr30k Karpathy JSON, CSV, JSONL) or, offline, from :func:`templated_captions`, which writes
captions from class labels. Templated captions are not real captions: many images share one, so
text -> image recall is bounded by the number of images per caption. Say so wherever they are used.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from PIL import Image

from clipcl.data.base import ClassificationDataset
from clipcl.data.streams import balanced_subset

RECALL_KS = (1, 5, 10)


@dataclass
class CaptionedImages:
    """Unique images, captions, and for each caption the index of its image."""

    images: list[Image.Image]
    captions: list[str]
    caption_image: list[int]
    name: str = "captions"
    language: str | None = None
    """The captions' language, when known (a language stream's task): it picks their tokenization."""
    image_keys: list[str] | None = None
    """A stable name per image (its set and key), for reusing image features across sets that show
    the same images (a language stream's tasks); None: never reused."""


def from_caption_dataset(dataset, name: str = "captions") -> CaptionedImages:
    """Group a :class:`~clipcl.data.captions.CaptionDataset` (one row per caption) by image."""
    first_row: dict[int, int] = {}
    for row, image_id in enumerate(dataset.image_ids):
        first_row.setdefault(image_id, row)
    order = sorted(first_row)
    position = {image_id: index for index, image_id in enumerate(order)}
    images = [dataset[first_row[image_id]][0] for image_id in order]
    root = dataset
    while getattr(root, "base", None) is not None:
        root = root.base
    keys = getattr(dataset, "image_keys", None)
    image_keys = None if keys is None else [f"{root.name}|{keys[image_id]}" for image_id in order]
    return CaptionedImages(images, list(dataset.captions), [position[i] for i in dataset.image_ids], name,
                           getattr(dataset, "language", None), image_keys)


def templated_captions(dataset: ClassificationDataset, images: int, templates: Sequence[str] | None = None,
                       seed: int = 0) -> CaptionedImages:
    """A captioned set written from labels: ``images`` class-balanced images of ``dataset``, each with
    one caption per template (default: the dataset's own templates). Templated, not real, captions."""
    subset = balanced_subset(dataset, images, seed)
    templates = list(templates or dataset.templates)
    pictures, captions, owner = [], [], []
    for index in range(len(subset)):
        image, label = subset[index]
        pictures.append(image)
        for template in templates:
            captions.append(template.format(dataset.classnames[label]))
            owner.append(index)
    return CaptionedImages(pictures, captions, owner, f"{dataset.name}-templated")


def recall_at_k(similarity: torch.Tensor, caption_image: Sequence[int], ks: Sequence[int] = RECALL_KS
                ) -> dict[str, float]:
    """R@K in both directions (in %) from an [images, captions] similarity matrix."""
    similarity = similarity.double().cpu()
    owner = torch.as_tensor(list(caption_image), dtype=torch.long)
    num_images, num_captions = similarity.shape
    results: dict[str, float] = {}
    # Stable ranking: sort by similarity, ties by index (argsort of -sim with stable=True).
    image_rank = torch.argsort(-similarity, dim=1, stable=True)          # captions per image
    text_rank = torch.argsort(-similarity.t(), dim=1, stable=True)       # images per caption
    own = torch.zeros(num_images, num_captions, dtype=torch.bool)
    own[owner, torch.arange(num_captions)] = True
    for k in ks:
        top_captions = image_rank[:, : min(k, num_captions)]
        image_hits = own.gather(1, top_captions).any(dim=1)
        results[f"image_to_text_R@{k}"] = 100.0 * image_hits.double().mean().item()
        top_images = text_rank[:, : min(k, num_images)]
        text_hits = (top_images == owner.unsqueeze(1)).any(dim=1)
        results[f"text_to_image_R@{k}"] = 100.0 * text_hits.double().mean().item()
    return results


@torch.no_grad()
def evaluate_retrieval(strategy, captioned: CaptionedImages, batch_size: int = 128,
                       ks: Sequence[int] = RECALL_KS) -> dict[str, float]:
    """Encode every image and caption with ``strategy`` (no task id) and return R@K both ways."""
    return retrieval_with_features(strategy, captioned, batch_size, ks)[0]


@torch.no_grad()
def retrieval_with_features(strategy, captioned: CaptionedImages, batch_size: int = 128,
                            ks: Sequence[int] = RECALL_KS, image_memo: dict | None = None
                            ) -> tuple[dict[str, float], torch.Tensor, torch.Tensor]:
    """R@K both ways, and the normalised image and caption features it was computed from.

    ``image_memo`` (a dict the caller keeps) holds image features by the strategy's image cache key
    (which digests the image tower's weights, so a changed tower misses) and the image's key: sets
    showing the same images (one per language) encode each image once. A reused feature was computed
    in another batch, so it may differ from a recomputed one in the last bits of float32.
    """
    strategy.eval()
    backend = strategy.backend
    device = backend.device
    cache_key = strategy.image_cache_key(None) if image_memo is not None and captioned.image_keys else None
    if cache_key is not None:
        missing = [position for position, key in enumerate(captioned.image_keys) if (cache_key, key) not in image_memo]
        for start in range(0, len(missing), batch_size):
            chunk = missing[start: start + batch_size]
            pixels = torch.stack([backend.preprocess(captioned.images[position]) for position in chunk])
            for position, feature in zip(chunk, strategy.encode_images(pixels.to(device), None).float()):
                image_memo[(cache_key, captioned.image_keys[position])] = feature
        image_features = [torch.stack([image_memo[(cache_key, key)] for key in captioned.image_keys])]
    else:
        image_features = []
        for start in range(0, len(captioned.images), batch_size):
            pixels = torch.stack([backend.preprocess(image) for image in captioned.images[start: start + batch_size]])
            image_features.append(strategy.encode_images(pixels.to(device), None).float())
    text_features = []
    for start in range(0, len(captioned.captions), batch_size):
        encoded = strategy.encode_captions(captioned.captions[start: start + batch_size], captioned.language).float()
        text_features.append(torch.nn.functional.normalize(encoded, dim=-1))
    images, texts = torch.cat(image_features), torch.cat(text_features)
    return recall_at_k(images @ texts.t(), captioned.caption_image, ks), images, texts


CAPTION_SUFFIXES = (".json", ".jsonl", ".csv", ".tsv")
RETRIEVAL_SEED = 4321  # which images a templated set keeps; fixed, so every run measures the same set


def load_captioned(spec: str, images: int | None = None, root: str | None = None) -> CaptionedImages:
    """A retrieval set from ``eval.retrieval``: a caption file, or a dataset name to template.

    A caption file (``.json`` / ``.jsonl`` / ``.csv`` / ``.tsv``) is read with
    :class:`~clipcl.data.captions.CaptionDataset`, all of it. A dataset name loads that dataset's test
    split and writes one caption per template for at most ``images`` class-balanced images.
    """
    from clipcl.data.base import DataError

    if spec.lower().endswith(CAPTION_SUFFIXES):
        from clipcl.data.captions import CaptionDataset

        return from_caption_dataset(CaptionDataset(spec), name=spec)
    from clipcl.data.registry import load_dataset

    try:
        dataset = load_dataset(spec, "test", root)
    except DataError as error:
        raise DataError(f"eval.retrieval: {error}") from None
    return templated_captions(dataset, images if images is not None else len(dataset), seed=RETRIEVAL_SEED)


__all__ = [
    "CaptionedImages",
    "evaluate_retrieval",
    "from_caption_dataset",
    "load_captioned",
    "recall_at_k",
    "retrieval_with_features",
    "templated_captions",
]
