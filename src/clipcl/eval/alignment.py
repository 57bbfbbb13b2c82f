"""Image-text alignment measures: pure functions of embeddings (definitions in docs/metrics.md).

A *paired set* is image embeddings ``[N, d]``, text embeddings ``[M, d]`` and its positive pairs as
two index tensors of equal length P: pair ``p`` is image ``image_index[p]`` with text
``text_index[p]``. A caption set has one pair per caption (several captions may share an image); a
labelled set has one pair per image, with its class prompt (the M text rows are the classes), so
class prompts stand in for captions.

- :func:`modality_gap`: the distance between the image and the text centroids over the pairs
  (Liang et al., NeurIPS 2022, "Mind the Gap").
- :func:`alignment` and :func:`uniformity`: Wang & Isola (ICML 2020).
- :func:`rotation_angles`, :func:`inter_modal_deviation`, :func:`similarity_correlation`: Mod-X's
  "spatial disorder" (Ni et al., ICML 2023) made measurable. The paper describes the disorder (each
  modality's space rotates, and the two rotate by different amounts) but released no code for
  measuring it; these definitions are clipcl's own.

Every function normalises its inputs and computes in float64.
"""

from __future__ import annotations

import math

import torch

BASE_KEYS = ("modality_gap", "alignment", "uniformity_image", "uniformity_text")
"""What :func:`alignment_summary` gives without a reference."""
REFERENCE_KEYS = ("rotation_image_deg", "rotation_text_deg", "inter_modal_deviation_deg",
                  "similarity_correlation_image", "similarity_correlation_text")
"""What it adds when given a reference model's embeddings of the same set."""


def _unit(features: torch.Tensor, name: str) -> torch.Tensor:
    if features.dim() != 2 or features.shape[0] == 0:
        raise ValueError(f"{name} must be a non-empty [rows, dim] tensor, got shape {tuple(features.shape)}")
    return torch.nn.functional.normalize(features.detach().double().cpu(), dim=-1)


def _pairs(images: torch.Tensor, texts: torch.Tensor, image_index, text_index) -> tuple[torch.Tensor, torch.Tensor]:
    image_index = torch.as_tensor(image_index, dtype=torch.long).cpu()
    text_index = torch.as_tensor(text_index, dtype=torch.long).cpu()
    if image_index.dim() != 1 or image_index.shape != text_index.shape or len(image_index) == 0:
        raise ValueError(f"image_index and text_index must be equal-length, non-empty 1-d index tensors, got "
                         f"shapes {tuple(image_index.shape)} and {tuple(text_index.shape)}")
    if int(image_index.min()) < 0 or int(image_index.max()) >= len(images):
        raise ValueError(f"image_index must lie in [0, {len(images)}), the image rows")
    if int(text_index.min()) < 0 or int(text_index.max()) >= len(texts):
        raise ValueError(f"text_index must lie in [0, {len(texts)}), the text rows")
    return image_index, text_index


def modality_gap(images: torch.Tensor, texts: torch.Tensor, image_index, text_index) -> float:
    """``‖mean_p x_{i(p)} − mean_p y_{t(p)}‖₂``: the distance between the centroids of the paired image
    and text embeddings, each pair counted once (an image with five captions counts five times, a
    class prompt once per image of the class). In [0, 2]; 0 when the two centroids coincide."""
    images, texts = _unit(images, "images"), _unit(texts, "texts")
    image_index, text_index = _pairs(images, texts, image_index, text_index)
    return float((images[image_index].mean(dim=0) - texts[text_index].mean(dim=0)).norm())


def alignment(images: torch.Tensor, texts: torch.Tensor, image_index, text_index, alpha: float = 2.0) -> float:
    """``mean_p ‖x_{i(p)} − y_{t(p)}‖₂^alpha`` over the positive pairs (Wang & Isola; alpha = 2 is
    ``2 − 2 cos``). In [0, 2^alpha]; lower is better aligned."""
    images, texts = _unit(images, "images"), _unit(texts, "texts")
    image_index, text_index = _pairs(images, texts, image_index, text_index)
    return float((images[image_index] - texts[text_index]).norm(dim=-1).pow(alpha).mean())


def uniformity(features: torch.Tensor, t: float = 2.0) -> float | None:
    """``log mean_{i<j} exp(−t ‖x_i − x_j‖²)`` over the distinct rows' pairs (Wang & Isola, t = 2).
    In [−4t, 0]; lower is more uniform on the sphere. None with fewer than two rows (a labelled set
    with one class). A log-sum-exp keeps it finite for well-spread sets."""
    features = _unit(features, "features")
    count = len(features)
    if count < 2:
        return None
    # ‖x_i − x_j‖² = 2 − 2 x_i·x_j for unit vectors.
    squared = (2.0 - 2.0 * features @ features.t()).clamp_min(0.0)
    upper = torch.triu_indices(count, count, offset=1)
    exponents = -t * squared[upper[0], upper[1]]
    return float(torch.logsumexp(exponents, dim=0) - math.log(exponents.numel()))


def rotation_angles(reference: torch.Tensor, current: torch.Tensor) -> torch.Tensor:
    """Per row, the angle in degrees between a sample's embedding under a reference model and now.

    ``2·atan2(‖a − b‖, ‖a + b‖)`` for unit a, b: the same angle as ``arccos(a·b)``, but well
    conditioned near 0° and 180°, where arccos loses half the digits (a 0.01° rotation has
    ``cos`` = 1 − 1.5e-8)."""
    reference, current = _unit(reference, "reference"), _unit(current, "current")
    if reference.shape != current.shape:
        raise ValueError(f"reference and current must have the same shape, got {tuple(reference.shape)} and "
                         f"{tuple(current.shape)}")
    return torch.rad2deg(2.0 * torch.atan2((reference - current).norm(dim=-1), (reference + current).norm(dim=-1)))


def inter_modal_deviation(image_angles: torch.Tensor, text_angles: torch.Tensor, image_index, text_index) -> float:
    """``mean_p |θ_image(i(p)) − θ_text(t(p))|``: how differently the two members of a pair rotated."""
    image_index = torch.as_tensor(image_index, dtype=torch.long).cpu()
    text_index = torch.as_tensor(text_index, dtype=torch.long).cpu()
    return float((image_angles[image_index] - text_angles[text_index]).abs().mean())


def similarity_correlation(reference: torch.Tensor, current: torch.Tensor) -> float | None:
    """Pearson correlation between the off-diagonal entries of the reference and the current
    intra-modal cosine-similarity matrices: 1 when the set's geometry is kept (any common rotation
    of the whole space keeps it), lower as it is disordered. None with fewer than three rows or when
    either matrix is constant off the diagonal."""
    reference, current = _unit(reference, "reference"), _unit(current, "current")
    if reference.shape[0] != current.shape[0]:
        raise ValueError(f"reference and current must have the same rows, got {len(reference)} and {len(current)}")
    count = len(reference)
    if count < 3:
        return None
    upper = torch.triu_indices(count, count, offset=1)
    before = (reference @ reference.t())[upper[0], upper[1]]
    after = (current @ current.t())[upper[0], upper[1]]
    before, after = before - before.mean(), after - after.mean()
    scale = before.norm() * after.norm()
    # Constant similarities (all rows equal, or two rows) have no correlation to speak of.
    if float(scale) <= 1e-12 * max(1, before.numel()):
        return None
    return float((before @ after) / scale)


def alignment_summary(images: torch.Tensor, texts: torch.Tensor, image_index, text_index,
                      reference: tuple[torch.Tensor, torch.Tensor] | None = None) -> dict[str, float | None]:
    """The measures of one paired set under one model: :data:`BASE_KEYS`, and with ``reference``
    (the same set's (images, texts) under a reference model) :data:`REFERENCE_KEYS` too."""
    image_index, text_index = _pairs(_unit(images, "images"), _unit(texts, "texts"), image_index, text_index)
    summary: dict[str, float | None] = {
        "modality_gap": modality_gap(images, texts, image_index, text_index),
        "alignment": alignment(images, texts, image_index, text_index),
        "uniformity_image": uniformity(images),
        "uniformity_text": uniformity(texts),
    }
    if reference is not None:
        reference_images, reference_texts = reference
        image_angles = rotation_angles(reference_images, images)
        text_angles = rotation_angles(reference_texts, texts)
        summary.update({
            "rotation_image_deg": float(image_angles.mean()),
            "rotation_text_deg": float(text_angles.mean()),
            "inter_modal_deviation_deg": inter_modal_deviation(image_angles, text_angles, image_index, text_index),
            "similarity_correlation_image": similarity_correlation(reference_images, images),
            "similarity_correlation_text": similarity_correlation(reference_texts, texts),
        })
    return summary


__all__ = ["BASE_KEYS", "REFERENCE_KEYS", "alignment", "alignment_summary", "inter_modal_deviation", "modality_gap",
           "rotation_angles", "similarity_correlation", "uniformity"]
