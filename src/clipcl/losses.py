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
