"""Per-task prompts for the starter's CNN image tower: **clipcl's adaptation, not CoLeCLIP's**.

CoLeCLIP puts one prompt token per task into a ViT's token sequence (:mod:`clipcl.models.task_prompt_towers`).
EfficientNet-Lite0 has no token sequence, so the starter gets an analogue with the same contract
(``encode_image_with_task_prompts(images, prompts, per_task) -> [N, 1 + T, D]``, index 0 the untouched
zero-shot feature):

- Each prompt vector ``q`` (1280-d, the channels of the final feature map) is a query that
  attention-pools the final feature map ``f`` (``[1280, h, w]``, 3x3 at the starter's 112 px;
  7x7 at 224 px): weights ``softmax_p(q . f_p / sqrt(1280))`` over the ``h * w`` positions, keys and
  values the feature map itself.
- The pooled 1280-d vector then goes through the starter's own head exactly as the global average
  does: EfficientNet's classifier ``_fc`` -> softened top-k ImageNet probabilities -> mean of the
  class-prompt embeddings -> the image projection.
- Prompts do not see each other (a CNN has no sequence to attend in); earlier tasks' queries are
  frozen by :class:`~clipcl.adapt.TaskPrompts` as in the ViTs. A group of ``per_task`` queries is
  averaged after the head.

**A zero query starts exactly at the zero-shot feature, bit for bit, by construction.** Softmax of
zero scores is uniform, so the pooled vector is mathematically the average; to make it the *same
bits*, it is computed as the classifier's own pooling output (read by a forward hook, the tensor the
zero-shot path used) plus ``sum_p (w_p - u_p) f_p``, where ``u`` is the softmax of zeros from the same
kernel. With ``q = 0`` the scores are zeros, so ``w = u`` exactly, the correction is exactly zero (for a
finite feature map) and the sum is the average itself; the head then runs on an equal tensor of the
same shape. Any other query gives the attention-pooled vector up to rounding (the average plus the
correction). Use ``TaskPromptConfig(init_high=0)`` for zero queries; CoLeCLIP's uniform(0, 0.01)
start is close to uniform weights but not equal.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from clipcl.models.task_prompt_towers import check_prompts


def starter_task_features(tower: nn.Module, images: torch.Tensor, prompts: torch.Tensor,
                          per_task: int) -> torch.Tensor:
    """``[N, 1 + T, D]`` for the starter's :class:`~clipcl.models.starter.ConSEImageTower` (module docstring)."""
    classifier = tower.classifier
    width = int(classifier._fc.in_features)
    num_tasks = check_prompts(prompts, per_task, width, "the starter's EfficientNet")
    captured: dict[str, torch.Tensor] = {}

    def keep(_module: nn.Module, args: tuple[torch.Tensor, ...], output: torch.Tensor) -> None:
        captured.setdefault("map", args[0])
        captured.setdefault("average", output)

    handle = classifier._avg_pooling.register_forward_hook(keep)
    try:
        zero_shot = tower(images)
    finally:
        handle.remove()
    if "map" not in captured:
        raise RuntimeError("task prompts: the starter's EfficientNet did not pool through _avg_pooling")
    if num_tasks == 0:
        return zero_shot.unsqueeze(1)
    features = captured["map"].flatten(2)  # [N, C, positions]
    average = captured["average"].flatten(1)  # [N, C], the zero-shot path's pooled vector itself
    scores = torch.einsum("ncp,qc->nqp", features, prompts.to(features.dtype)) / math.sqrt(width)
    correction = torch.einsum("nqp,ncp->nqc", scores.softmax(dim=-1) - torch.zeros_like(scores).softmax(dim=-1),
                              features)
    outputs = []
    for index in range(prompts.shape[0]):
        # One query at a time: the head then sees [N, C] as on the zero-shot path (same shapes, same kernels).
        pooled = average + correction[:, index]
        logits = classifier._fc(classifier._dropout(pooled))
        outputs.append(tower.projection(tower.embedding_from_logits(logits)))
    tokens = torch.stack(outputs, dim=1)
    if per_task > 1:
        tokens = tokens.reshape(tokens.shape[0], num_tasks, per_task, -1).mean(dim=2)
    return torch.cat([zero_shot.unsqueeze(1), tokens.to(zero_shot.dtype)], dim=1)


__all__ = ["starter_task_features"]
