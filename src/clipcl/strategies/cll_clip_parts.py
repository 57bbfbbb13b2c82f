"""CLL-CLIP's pieces: its two losses, TEIR's row initialisation, token frequencies and AdamW groups.

Official code: yangbang18/CLFM @ 216e76c (``clfm/losses/CLLoss.py``, ``clfm/models/AdapterEncoder.py``,
``clfm/models/continual_learning/EmbeddingWrapper.py``, ``clfm/optimizers/AdamW.py``); docs/fidelity.md
(CLL-CLIP) gives each file and line.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from clipcl.losses import normalize, positive_pairs


def crosslingual_loss(student_texts: torch.Tensor, teacher_english: torch.Tensor) -> torch.Tensor:
    """Mean squared error between the student's embedding of a caption and the frozen teacher's
    embedding of its English source, both unnormalised (official CLLoss.py:114-141)."""
    return F.mse_loss(student_texts, teacher_english)


def crossmodal_loss(student_texts: torch.Tensor, teacher_images: torch.Tensor, temperature: torch.Tensor,
                    image_ids: torch.Tensor | None) -> torch.Tensor:
    """Symmetric InfoNCE between normalised student texts and teacher images, ``cos / temperature``;
    every caption of the same image is a positive, the target spread evenly over them
    (official CLLoss.py:143-186)."""
    logits = normalize(student_texts) @ normalize(teacher_images).t() / temperature
    positives = positive_pairs(image_ids, logits.shape[0], logits.device).to(logits.dtype)
    targets = positives / positives.sum(dim=-1, keepdim=True)
    return (F.cross_entropy(logits, targets) + F.cross_entropy(logits.t(), targets)) / 2


def new_rows(table: torch.Tensor, count: int, teir: bool, std: float) -> torch.Tensor:
    """``count`` new token-embedding rows: TEIR draws them from N(mean, std) with the mean and the
    standard deviation of the whole current table (two scalars, as AdapterEncoder.py:256-259); the
    baseline from N(0, ``std``) (methods.yaml:25, 0.02). Uses the global RNG (the engine seeds each task)."""
    table = table.detach().float()
    mean, deviation = (table.mean(), table.std()) if teir else (torch.tensor(0.0), torch.tensor(std))
    return torch.randn(count, table.shape[1]) * deviation + mean


def used_tokens(token_ids: list[list[int]], rows: int, special: set[int]) -> torch.Tensor:
    """``[rows]`` bool: the ids that occur in a language's training captions, special tokens excluded
    (EmbeddingWrapper.py:214-220 with ``exclude_special_tokens``)."""
    used = torch.zeros(rows, dtype=torch.bool)
    flat = sorted({identifier for ids in token_ids for identifier in ids} - special)
    if flat:
        used[torch.tensor(flat, dtype=torch.long)] = True
    return used


def teir_scales(used: torch.Tensor, frequency: torch.Tensor, special: set[int]) -> torch.Tensor:
    """TEIR's per-row scale ``used / frequency`` (``current_reciprocal``, EmbeddingWrapper.py:240-241),
    0 for special tokens (Framework.py:580-581): it scales both the row's gradient and its weight decay."""
    scales = used.float() / frequency.float()
    if special:
        scales[torch.tensor(sorted(special), dtype=torch.long)] = 0.0
    return scales


def parameter_groups(table_parameters: list[torch.nn.Parameter], table_scales: list[torch.Tensor] | None,
                     others: list[torch.nn.Parameter], weight_decay: float, epsilon: float) -> list[dict]:
    """CLL-CLIP's AdamW groups (the engine's :class:`clipcl.engine.optimizers.RowScaledAdamW` takes
    them): decay on the matrices, none on vectors and scalars (Framework.py:457-476, ``no_decay=[]``);
    with ``table_scales`` (TEIR) the table's rows are scaled, else they decay as any matrix (the
    baseline's plain AdamW decays rows the current language never uses)."""
    matrices = [parameter for parameter in others if parameter.dim() >= 2]
    vectors = [parameter for parameter in others if parameter.dim() < 2]
    groups = [{"params": vectors, "weight_decay": 0.0}] if vectors else []
    if matrices:
        groups.append({"params": matrices, "weight_decay": weight_decay})
    if table_scales is None:
        groups.append({"params": table_parameters, "weight_decay": weight_decay})
    else:
        groups.append({"params": table_parameters, "weight_decay": 0.0, "row_scales": table_scales,
                       "row_decay": weight_decay})
    for group in groups:
        group["eps"] = epsilon
    return groups


__all__ = ["crosslingual_loss", "crossmodal_loss", "new_rows", "parameter_groups",
           "teir_scales", "used_tokens"]
