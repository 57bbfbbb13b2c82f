"""SIT: symmetric image-text tuning for online lifelong learning (Wang et al. 2024, "CLIP model is an
Efficient Online Lifelong Learner"; code: Debatrix/LifeLong-CLIP).

Parameter-efficient tuning (LoRA by default, or parallel adapters) of the image and the text tower
together, with the text side of the cross-entropy restricted to the classes present in the current
batch instead of every class seen so far. The paper's argument: with all seen classes on the text
side, every batch pushes the text embeddings of absent classes away from images they never get to
pull back, an asymmetry that fine-tuning both towers turns into forgetting.

SIT is ``finetune`` with ``peft: lora`` and ``label_space: batch``; setting ``label_space: task``
gives the "all seen classes" variant of the paper's ablation, and ``train: image`` / ``text`` tunes
one tower.
"""

from __future__ import annotations

from dataclasses import dataclass

from clipcl.strategies.finetune import Finetune, FinetuneConfig


@dataclass
class SITConfig(FinetuneConfig):
    peft: str | None = "lora"
    """Parameter-efficient tuning of both towers (``lora`` or ``adapter``)."""
    label_space: str = "batch"
    """``batch``: only the batch's classes on the text side (SIT); ``task``: every class seen so far."""


class SIT(Finetune):
    Config = SITConfig
    needs_task_boundaries = False
