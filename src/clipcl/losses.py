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
