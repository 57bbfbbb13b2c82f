"""Loss functions as pure functions of tensors. Strategies combine them; the loop backpropagates."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def normalize(features: torch.Tensor) -> torch.Tensor:
    """L2-normalise along the last dimension (CLIP compares directions, not lengths)."""
    return F.normalize(features, dim=-1)


def clip_logits(image_features: torch.Tensor, text_features: torch.Tensor, logit_scale: torch.Tensor) -> torch.Tensor:
    """``exp(logit_scale) * cos(image, text)`` for every image/text pair: [images, texts]."""
    return logit_scale.exp() * normalize(image_features) @ normalize(text_features).t()


def best_view_scores(views: torch.Tensor, texts: torch.Tensor, allowed: torch.Tensor
                     ) -> tuple[torch.Tensor, torch.Tensor]:
    """Per image and class, the best similarity over the image views allowed to score that class.

    ``views`` ``[N, V, D]``, ``texts`` ``[C, D]``, ``allowed`` ``[C, V]`` (bool) -> ``(scores [N, C],
    best view [N, C])``, in the inputs' dtype; a class with no allowed view scores -inf. The gradient
    reaches the winning view only, as a max does.
    """
    similarity = torch.einsum("nvd,cd->nvc", views, texts)
    similarity = similarity.masked_fill(~allowed.t().unsqueeze(0).to(similarity.device), float("-inf"))
    scores, best = similarity.max(dim=1)
    return scores, best


def classification_loss(logits: torch.Tensor, targets: torch.Tensor, label_smoothing: float = 0.0) -> torch.Tensor:
    """Cross-entropy of image-vs-class-prompt logits, optionally with label smoothing."""
    return F.cross_entropy(logits, targets, label_smoothing=label_smoothing)


def distillation_kl(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """KL(teacher || student) of temperature-softened distributions, scaled by T^2 (Hinton et al.)."""
    teacher = F.log_softmax(teacher_logits / temperature, dim=-1)
    student = F.log_softmax(student_logits / temperature, dim=-1)
    return F.kl_div(student, teacher, log_target=True, reduction="batchmean") * temperature**2


def two_way_distillation_kl(student_logits: torch.Tensor, teacher_logits: torch.Tensor,
                            temperature: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
    """Distillation of an image-vs-text logit matrix ``[images, texts]`` in both directions.

    Returns ``(image_to_text, text_to_image)``: :func:`distillation_kl` over the rows (each image's
    distribution over the texts) and over the columns (each text's distribution over the images).
    This is the pair of terms ZSCL (Zheng et al. 2023) adds for its reference data.
    """
    image_to_text = distillation_kl(student_logits, teacher_logits, temperature)
    text_to_image = distillation_kl(student_logits.t(), teacher_logits.t(), temperature)
    return image_to_text, text_to_image


def l2_drift(parameters: list[torch.Tensor], anchors: list[torch.Tensor]) -> torch.Tensor:
    """``sum_i ||theta_i - anchor_i||^2``: the squared distance of weights from fixed anchor weights.

    A plain sum over every element (no mean), as in ZSCL's code; the anchors get no gradient.
    """
    if len(parameters) != len(anchors):
        raise ValueError(f"{len(parameters)} parameters but {len(anchors)} anchors")
    total = torch.zeros((), device=parameters[0].device) if parameters else torch.zeros(())
    for parameter, anchor in zip(parameters, anchors):
        total = total + (parameter - anchor.detach()).pow(2).sum()
    return total


# --- image-caption batches ---------------------------------------------------------------------
def positive_pairs(image_ids: torch.Tensor | None, size: int, device: torch.device | None = None) -> torch.Tensor:
    """``[size, size]`` bool: entry (i, j) is True when image i and caption j show the same image (the
    same id); without ids, each image's own caption only (the identity)."""
    if image_ids is None:
        return torch.eye(size, dtype=torch.bool, device=device)
    image_ids = image_ids.reshape(-1)
    return image_ids[:, None] == image_ids[None, :]


def contrastive_loss(image_features: torch.Tensor, text_features: torch.Tensor, logit_scale: torch.Tensor,
                     image_ids: torch.Tensor | None = None) -> torch.Tensor:
    """CLIP's symmetric InfoNCE over a batch of (image, caption) pairs: the mean of the image -> caption
    and caption -> image cross-entropies of ``exp(logit_scale) * cos``.

    Rows with the same ``image_ids`` entry are the same image, so each of its captions is a positive:
    the target is then uniform over the positives. With no ids, or all ids distinct, this is CLIP's loss
    with ``arange`` targets exactly.
    """
    logits = clip_logits(image_features, text_features, logit_scale)
    size = logits.shape[0]
    if image_ids is None or torch.unique(image_ids).numel() == size:
        labels = torch.arange(size, device=logits.device)
        return (F.cross_entropy(logits, labels) + F.cross_entropy(logits.t(), labels)) / 2
    positives = positive_pairs(image_ids, size, logits.device).to(logits.dtype)
    targets = positives / positives.sum(dim=-1, keepdim=True)  # symmetric, so the same for both directions
    return (F.cross_entropy(logits, targets) + F.cross_entropy(logits.t(), targets)) / 2


def retrieval_hits(similarity: torch.Tensor, positives: torch.Tensor) -> torch.Tensor:
    """Bool per row: the row's highest entry is a positive (the row's "cognition" is right)."""
    best = similarity.argmax(dim=-1, keepdim=True)
    return positives.gather(1, best).squeeze(1)


def cognition_align(teacher: torch.Tensor, student: torch.Tensor, positives: torch.Tensor
                    ) -> tuple[torch.Tensor, torch.Tensor]:
    """Mod-X's cognition alignment of a teacher similarity matrix: each row whose highest entry is not a
    positive (the old model matches the image, or caption, to the wrong partner) is replaced by the
    student's own row, detached, so it adds nothing to a distillation term (KL(p || p) = 0, and its
    gradient is zero too). Returns ``(aligned teacher, replaced rows)``."""
    replaced = ~retrieval_hits(teacher, positives)
    return torch.where(replaced[:, None], student.detach(), teacher), replaced


def similarity_distillation(student: torch.Tensor, teacher: torch.Tensor, reduction: str = "sum",
                            keep: torch.Tensor | None = None) -> torch.Tensor:
    """``KL(softmax(teacher_row) || softmax(student_row))`` over the rows of two similarity matrices (the
    softmax is over each row, with no temperature: scale the inputs first for one).

    ``keep`` (bool, the matrices' shape) restricts each row's distribution to the kept entries
    (renormalised over them); a row with fewer than two kept entries adds nothing. ``reduction``:
    ``sum`` (over every row and entry) or ``batchmean`` (the sum over the number of rows)."""
    if reduction not in ("sum", "batchmean"):
        raise ValueError(f"reduction must be sum or batchmean, got {reduction!r}")
    rows = student.shape[0]
    if keep is None:
        total = F.kl_div(F.log_softmax(student, dim=-1), F.log_softmax(teacher, dim=-1), log_target=True,
                         reduction="sum")
    else:
        low = torch.finfo(student.dtype).min
        log_q = F.log_softmax(student.masked_fill(~keep, low), dim=-1)
        log_p = F.log_softmax(teacher.masked_fill(~keep, low), dim=-1)
        counted = keep & (keep.sum(dim=-1, keepdim=True) > 1)
        total = torch.where(counted, log_p.exp() * (log_p - log_q), torch.zeros_like(log_q)).sum()
    return total / rows if reduction == "batchmean" else total
