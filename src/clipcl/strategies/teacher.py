"""Frozen teachers for distillation methods (LwF, VR-LwF, ZSCL).

A :class:`Teacher` is a frozen copy of a backend: evaluation mode, no gradients, and deliberately
*not* an ``nn.Module``, so a strategy that keeps one in an attribute does not register it. The copy
therefore stays out of ``state_dict()`` (checkpoints hold only the student's changed weights),
out of ``parameters()`` (the optimizer and the parameter counts never see it) and out of
``train()`` / ``eval()`` / ``.to()`` on the strategy (the strategy moves it explicitly with
:meth:`Teacher.to`).

Because it is never saved, a teacher must be rebuilt identically when a run resumes:

- a teacher of "the model as it was at the start of the task" is built in ``before_task`` from the
  current weights, which on resume are the weights loaded from the last checkpoint;
- the zero-shot teacher is copied when the strategy is constructed, which happens before any
  training or checkpoint loading, so it always holds the pretrained weights.
"""

from __future__ import annotations

import copy
from typing import TYPE_CHECKING

import torch

from clipcl.losses import clip_logits, normalize
from clipcl.strategies.base import class_text_features

if TYPE_CHECKING:
    from clipcl.data.streams import ClassText
    from clipcl.models.base import Backend

# Plain (non-tensor) attributes a copy can share with the original instead of duplicating them.
_SHARED_ATTRIBUTES = ("tokenizer", "preprocess", "train_preprocess")


def frozen_copy(backend: Backend) -> Backend:
    """A deep copy of ``backend`` in eval mode with every parameter frozen and no gradients.

    The tokenizer and the preprocessing transforms are shared with the original, not copied.
    """
    memo = {id(value): value for name in _SHARED_ATTRIBUTES
            if (value := backend.__dict__.get(name)) is not None}
    frozen = copy.deepcopy(backend, memo)
    frozen.eval()
    for parameter in frozen.parameters():
        parameter.requires_grad_(False)
        parameter.grad = None
    return frozen


class Teacher:
    """A frozen copy of a backend that computes normalised features and logits without gradients."""

    def __init__(self, backend: Backend) -> None:
        self.backend = frozen_copy(backend)

    def to(self, device: torch.device | str) -> Teacher:
        """Move the copy to ``device`` (a no-op when it is already there); returns ``self``."""
        if self.backend.device != torch.device(device):
            self.backend.to(device)
        return self

    @property
    def device(self) -> torch.device:
        return self.backend.device

    @property
    def logit_scale(self) -> torch.Tensor:
        """The teacher's own log-temperature (use ``.exp()``)."""
        return self.backend.logit_scale.detach()

    @torch.no_grad()
    def image_features(self, images: torch.Tensor) -> torch.Tensor:
        return normalize(self.backend.encode_image(images.to(self.device)))

    @torch.no_grad()
    def token_features(self, tokens: torch.Tensor) -> torch.Tensor:
        """Normalised text features of already tokenized texts ``[N, context_length]``."""
        return normalize(self.backend.encode_text(tokens.to(self.device)))

    @torch.no_grad()
    def caption_features(self, captions: list[str]) -> torch.Tensor:
        """Normalised text features of free-text captions."""
        return normalize(self.backend.encode_texts(list(captions)))

    @torch.no_grad()
    def class_features(self, classes: list[ClassText], template: str | None = None) -> torch.Tensor:
        """Normalised text features of each class's prompt as the training losses use it: ``template``
        when given (the student's ``strategy.template``), else each class's first template."""
        return class_text_features(self.backend, classes, ensemble=False, template=template)

    @torch.no_grad()
    def logits(self, image_features: torch.Tensor, text_features: torch.Tensor) -> torch.Tensor:
        """``exp(teacher logit_scale) * cos`` for every image/text pair."""
        return clip_logits(image_features, text_features, self.logit_scale)
