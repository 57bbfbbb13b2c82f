"""CoLeCLIP's pieces that need no model state: the per-task text LoRA, the vocabulary's momentum
update, and stage 2's negative class labels (:mod:`clipcl.strategies.coleclip` uses them).

File and line references are to the official code, YukunLi99/CoLeCLIP @ c6f8d34 (docs/fidelity.md,
Part D).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from clipcl.adapt.inject import AdaptationWrapper, find_sites, inject_by_name
from clipcl.adapt.lora import LORA, QKV_NAMES, LoRAConfig
from clipcl.config import ConfigError
from clipcl.losses import normalize


class TextLoRA:
    """Rank-``rank`` LoRA on the chosen query/key/value projections of every text block, put in for
    one task and taken out after it, so the text tower is again exactly the frozen zero-shot one.

    The sites are the backend's own text LoRA targets (``backend.adaptation_targets("lora",
    ("text",))``) less the output projections: an ``nn.MultiheadAttention`` (open_clip) gets the
    ``projections`` letters, separate ``nn.Linear`` projections (transformers' ``q_proj``/``k_proj``/
    ``v_proj``, the starter's ``query``/``key``/``value``) are wrapped when their letter is chosen.
    The update is ``B @ A`` (scale 1: alpha = rank), A Kaiming-uniform and B zero, as the official
    ``KVLoRA`` starts (model/pet/lora.py:73-77).
    """

    def __init__(self, backend: nn.Module, rank: int, projections: str) -> None:
        self.backend, self.rank, self.projections = backend, rank, projections
        self._attached: list[tuple[nn.Module, str]] = []

    @property
    def active(self) -> bool:
        return bool(self._attached)

    def _sites(self) -> list:
        chosen = []
        for site in find_sites(self.backend, self.backend.adaptation_targets("lora", ("text",))):
            module, letter = site.module, QKV_NAMES.get(site.attribute)
            # An attention module takes the letters as an option; a separate projection is its letter.
            separate = isinstance(module, nn.Linear) and letter is not None and letter in self.projections
            if isinstance(module, nn.MultiheadAttention) or separate:
                chosen.append(site)
        return chosen

    def attach(self) -> list[nn.Parameter]:
        """Fresh LoRA factors (drawn from torch's global generator); returns them."""
        if self.active:
            raise RuntimeError("the text LoRA is already attached")
        sites = self._sites()
        if not sites:
            raise ConfigError(f"coleclip: {type(self.backend).__name__} has no text query/key/value projections "
                              "for LoRA")
        settings = LoRAConfig(rank=self.rank, alpha=float(self.rank), projections=self.projections)
        inject_by_name(self.backend, LORA, [site.name for site in sites], settings)
        self._attached = [(site.parent, site.attribute) for site in sites]
        return [parameter for parent, attribute in self._attached
                for parameter in getattr(parent, attribute).added_parameters()]

    def detach(self) -> None:
        """Put every wrapped projection back (the LoRA factors are discarded)."""
        for parent, attribute in self._attached:
            wrapper = getattr(parent, attribute)
            assert isinstance(wrapper, AdaptationWrapper)
            setattr(parent, attribute, wrapper.base)
        self._attached = []


def momentum_update(stored: torch.Tensor, text: torch.Tensor, momentum: float) -> torch.Tensor:
    """The stored class embeddings after one step: ``normalize(momentum * text + (1 - momentum) *
    normalize(stored))``, where ``text`` is the step's (normalised) text feature of each class
    (official: method/CoLeCLIP.py:224,231-235)."""
    return normalize(momentum * text + (1.0 - momentum) * normalize(stored))


def negative_label_mask(view_logits: torch.Tensor, current: int, task_columns: list[list[int]], quantile: float,
                        logit_scale: torch.Tensor) -> torch.Tensor:
    """Stage 2's mask of unsuitable negative labels: 0 where a column may act as a negative for a
    sample, -inf where it may not (official: method/CoLeCLIP.py:262-285).

    ``view_logits`` ``[N, current + K]``: the task-prompt logits of the current task's classes, then of
    the earlier tasks' classes the current task lacks. For each earlier task, ``task_columns`` lists
    the columns of its classes among those. A sample's negative energy of a label set is
    ``logsumexp(logits over the set) / logit_scale``; the gap is the current set's minus the earlier
    task's. That task's columns stay suitable for the samples whose gap is above
    ``max(quantile of the batch's gaps, 0)``, and are masked for the others. An earlier task with no
    column left (all its classes are in the current task) is skipped.
    """
    with torch.no_grad():
        logits = view_logits.detach()
        current_energy = torch.logsumexp(logits[:, :current], dim=-1) / logit_scale
        mask = torch.zeros_like(logits)
        for columns in task_columns:
            if not columns:
                continue
            gap = current_energy - torch.logsumexp(logits[:, columns], dim=-1) / logit_scale
            threshold = torch.clamp(torch.quantile(gap, quantile), min=0.0)
            unsuitable = ~(gap > threshold)
            index = torch.tensor(columns, device=logits.device)
            rows = unsuitable.nonzero().squeeze(-1)
            mask[rows.unsqueeze(-1), index.unsqueeze(0)] = float("-inf")
    return mask


def stage_two_loss(view_logits: torch.Tensor, class_logits: torch.Tensor, targets: torch.Tensor, current: int,
                   mask: torch.Tensor) -> torch.Tensor:
    """Stage 2's cross-entropy (official: method/CoLeCLIP.py:287-310). Samples whose target already
    has the highest task-prompt logit among all ``current + K`` labels train on the current classes
    only; the others on every label, with ``mask`` added. Each is the mean of the task-prompt and the
    class-token cross-entropies; the sum over the batch is divided by its size."""
    with torch.no_grad():
        rows = torch.arange(len(targets), device=targets.device)
        wrong = ~(view_logits[rows, targets] >= view_logits.max(dim=-1).values)
    view_masked, class_masked = view_logits + mask, class_logits + mask
    loss = (F.cross_entropy(view_masked[wrong], targets[wrong], reduction="sum")
            + F.cross_entropy(class_masked[wrong], targets[wrong], reduction="sum")) / 2
    right = ~wrong
    loss = loss + (F.cross_entropy(view_logits[right][:, :current], targets[right], reduction="sum")
                   + F.cross_entropy(class_logits[right][:, :current], targets[right], reduction="sum")) / 2
    return loss / len(targets)


__all__ = ["TextLoRA", "momentum_update", "negative_label_mask", "stage_two_loss"]
