"""The alignment measures on hand-built embeddings whose answers are known."""

import math

import pytest
import torch

from clipcl.eval.alignment import (
    alignment,
    alignment_summary,
    inter_modal_deviation,
    modality_gap,
    rotation_angles,
    similarity_correlation,
    uniformity,
)

# float64 throughout: a few operations of rounding 2**-53 each, then degrees (x57): 1e-9 is generous.
TOLERANCE = 1e-9


def rotated(features: torch.Tensor, degrees: float, plane: tuple[int, int] = (0, 1)) -> torch.Tensor:
    """``features`` rotated by ``degrees`` in the plane of two coordinate axes."""
    angle = math.radians(degrees)
    rotation = torch.eye(features.shape[1], dtype=torch.float64)
    a, b = plane
    rotation[a, a] = rotation[b, b] = math.cos(angle)
    rotation[a, b], rotation[b, a] = -math.sin(angle), math.sin(angle)
    return features @ rotation.t()


def in_plane(count: int, dim: int = 4) -> torch.Tensor:
    """Unit vectors in the plane of the first two axes (so a rotation in that plane turns each by its angle)."""
    angles = torch.linspace(0, 2 * math.pi, count + 1, dtype=torch.float64)[:-1]
    features = torch.zeros(count, dim, dtype=torch.float64)
    features[:, 0], features[:, 1] = angles.cos(), angles.sin()
    return features


def test_rotation_by_a_known_angle_and_the_deviation_between_modalities():
    images, texts = in_plane(6), in_plane(6)
    angles = rotation_angles(images, rotated(images, 30.0))
    assert torch.allclose(angles, torch.full((6,), 30.0, dtype=torch.float64), atol=TOLERANCE, rtol=0)
    # Small angles stay exact (arccos of a cosine this close to 1 would lose about half the digits).
    assert rotation_angles(images, rotated(images, 0.01)).sub(0.01).abs().max() < 1e-11
    # Near 180 degrees too (where arccos is as ill-conditioned as near 0).
    assert rotation_angles(images, rotated(images, 179.5)).sub(179.5).abs().max() < 1e-9
    text_angles = rotation_angles(texts, rotated(texts, 10.0))
    pairs = torch.arange(6)
    assert inter_modal_deviation(angles, text_angles, pairs, pairs) == pytest.approx(20.0, abs=TOLERANCE)
    summary = alignment_summary(rotated(images, 30.0), rotated(texts, 10.0), pairs, pairs, reference=(images, texts))
    assert summary["rotation_image_deg"] == pytest.approx(30.0, abs=TOLERANCE)
    assert summary["rotation_text_deg"] == pytest.approx(10.0, abs=TOLERANCE)
    assert summary["inter_modal_deviation_deg"] == pytest.approx(20.0, abs=TOLERANCE)
    # A rotation of the whole set keeps every intra-modal similarity: correlation 1.
    assert summary["similarity_correlation_image"] == pytest.approx(1.0, abs=TOLERANCE)


def test_similarity_correlation_drops_when_rows_move_independently():
    generator = torch.Generator().manual_seed(0)
    reference = torch.randn(50, 8, generator=generator, dtype=torch.float64)
    shuffled = reference[torch.randperm(50, generator=generator)]
    assert similarity_correlation(reference, shuffled) < 0.5
    assert similarity_correlation(reference[:2], shuffled[:2]) is None  # one pair: no correlation


def test_modality_gap_of_a_known_centroid_shift():
    # Images at +e0 ± e1 (normalised), texts at -e0 ± e1: centroids (c, 0) and (-c, 0), c = 1/sqrt(2).
    images = torch.tensor([[1.0, 1.0, 0.0], [1.0, -1.0, 0.0]], dtype=torch.float64) / math.sqrt(2)
    texts = torch.tensor([[-1.0, 1.0, 0.0], [-1.0, -1.0, 0.0]], dtype=torch.float64) / math.sqrt(2)
    pairs = torch.arange(2)
    assert modality_gap(images, texts, pairs, pairs) == pytest.approx(math.sqrt(2), abs=TOLERANCE)
    assert modality_gap(images, images, pairs, pairs) == pytest.approx(0.0, abs=TOLERANCE)


def test_alignment_and_uniformity_of_known_sets():
    images = in_plane(4)
    pairs = torch.arange(4)
    assert alignment(images, images, pairs, pairs) == pytest.approx(0.0, abs=TOLERANCE)
    angle = math.radians(40.0)
    assert alignment(images, rotated(images, 40.0), pairs, pairs) == pytest.approx(2 - 2 * math.cos(angle),
                                                                                   abs=TOLERANCE)
    antipodal = torch.tensor([[1.0, 0.0], [-1.0, 0.0]], dtype=torch.float64)
    assert uniformity(antipodal) == pytest.approx(-2.0 * 4.0, abs=TOLERANCE)  # log exp(-t * 4), t = 2
    assert uniformity(torch.ones(3, 2, dtype=torch.float64)) == pytest.approx(0.0, abs=TOLERANCE)
    assert uniformity(antipodal[:1]) is None
    # A large t: exp(-4000) underflows float64, the log-sum-exp does not.
    assert uniformity(antipodal, t=1000.0) == pytest.approx(-4000.0, abs=TOLERANCE)


def test_caption_pairs_and_class_pairs_are_both_accepted():
    generator = torch.Generator().manual_seed(1)
    images = torch.randn(4, 8, generator=generator)
    captions = torch.randn(8, 8, generator=generator)
    # Two captions per image.
    caption_summary = alignment_summary(images, captions, torch.arange(4).repeat_interleave(2), torch.arange(8))
    classes = torch.randn(2, 8, generator=generator)
    # Each image paired with its class prompt; two classes.
    class_summary = alignment_summary(images, classes, torch.arange(4), torch.tensor([0, 1, 1, 0]))
    for summary in (caption_summary, class_summary):
        assert set(summary) == {"modality_gap", "alignment", "uniformity_image", "uniformity_text"}
        assert all(math.isfinite(value) for value in summary.values())


def test_bad_shapes_are_one_clear_line():
    images = torch.randn(3, 4)
    with pytest.raises(ValueError, match="equal-length"):
        alignment(images, images, torch.arange(3), torch.arange(2))
    with pytest.raises(ValueError, match="text rows"):
        modality_gap(images, images[:2], torch.arange(3), torch.arange(3))
    with pytest.raises(ValueError, match="same shape"):
        rotation_angles(images, images[:2])
    with pytest.raises(ValueError, match=r"\[rows, dim\]"):
        uniformity(torch.randn(4))
