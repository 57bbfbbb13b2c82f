"""Mod-X (Ni et al., ICML 2023, "Continual Vision-Language Representation Learning with Off-Diagonal
Information"; code: ZixuanNi/Mod-X): continual contrastive training on image-caption streams.

Each phase trains CLIP's contrastive loss on the phase's image-caption pairs while keeping the
current model's batch similarity matrices close to those of the model the phase started from (the
previous phase's model; the pretrained model in the first phase), image -> caption and caption ->
image. Before the comparison, *cognition align* replaces every row that the old model gets wrong
(its best match is not the row's own pair) by the current model's row, so old mistakes are not
taught::

    S = cos(image_i, caption_j) (current model),  S_old (the phase's teacher),  no temperature
    A = align(S_old, S),  A' = align(S_old^T, S^T)  (a wrong row of the teacher -> the student's row)
    loss = CLIP(exp(logit_scale) S) + alpha * (KL(softmax A || softmax S) + KL(softmax A' || softmax S^T)) / 2

with each KL summed over every row and entry. The defaults are the official code's
(``ModX_Training/continue_train_model.py`` and ``modx_5phase.sh`` @ a6a2f6c, docs/fidelity.md, C1);
where the code departs from the paper's description (whole rows rather than only the off-diagonal
entries; a sum that grows with the batch), the paper's reading is an option.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from clipcl.config import ConfigError
from clipcl.losses import clip_logits, cognition_align, positive_pairs, similarity_distillation
from clipcl.strategies.base import require_batch_kind
from clipcl.strategies.finetune import Finetune, FinetuneConfig
from clipcl.strategies.teacher import Teacher

LOGIT_SCALE_MAX = 4.6052  # ln 100, rounded as the official clamp writes it
DISTILL = ("whole_rows", "off_diagonal")
REDUCTIONS = ("sum", "batchmean")


@dataclass
class ModXConfig(FinetuneConfig):
    alpha: float = 20.0
    """Weight of the distillation term (``--alpha 20`` in every phase of ``modx_5phase.sh``; the
    script's argparse default is 0.1). Scaled for ``kl_reduction: sum`` at the official batch of 280:
    with ``batchmean`` the same strength is about ``alpha * batch``."""
    distill: str = "whole_rows"
    """``whole_rows``: each row's distribution over every entry, the matching pair's included (the
    official code: its ``off_dia_*`` matrices are the full matrices). ``off_diagonal``: each row's
    distribution over the other pairs only (the positives, all captions of the row's image, left
    out and the rest renormalised), the paper's "off-diagonal information"."""
    kl_reduction: str = "sum"
    """``sum`` over every row and entry (the official ``F.kl_div(..., reduction='sum')``: the term
    grows with the batch) or ``batchmean`` (the sum over the rows)."""
    distill_logits: bool = False
    """Soften the matrices with the logit scale before the softmax (each model's own
    ``exp(logit_scale)``, CLIP's logits). False: the raw cosines, as the official code (a near-uniform
    softmax, hence the large alpha and the summed KL)."""
    cognition_align: bool = True
    """Replace each teacher row whose best match is not a positive by the student's row (detached;
    such a row then adds nothing). The official code does this separately for the image -> caption
    rows and the caption -> image rows, each by its own argmax."""
    train_logit_scale: bool = True
    """The official optimiser is given ``model.parameters()``, the temperature included."""
    clamp_logit_scale: bool = True
    """After every optimiser step clamp the trained log-temperature to [0, ln 100] (the official code's
    ``clamp(logit_scale, 0, 4.6052)``, as CLIP's training)."""

    def validate(self) -> None:
        if self.alpha < 0:
            raise ConfigError(f"strategy.alpha must be >= 0, got {self.alpha}")
        if self.distill not in DISTILL:
            raise ConfigError(f"strategy.distill must be one of {', '.join(DISTILL)}, got {self.distill!r}")
        if self.kl_reduction not in REDUCTIONS:
            raise ConfigError(f"strategy.kl_reduction must be one of {', '.join(REDUCTIONS)}, "
                              f"got {self.kl_reduction!r}")
        if self.label_space != "task":
            raise ConfigError("strategy.label_space: mod_x trains on caption batches; only 'task' applies")
        super().validate()


def modx_distillation(student_images: torch.Tensor, student_texts: torch.Tensor, teacher_images: torch.Tensor,
                      teacher_texts: torch.Tensor, image_ids: torch.Tensor | None = None, *,
                      align: bool = True, off_diagonal: bool = False, reduction: str = "sum",
                      student_scale: float | torch.Tensor = 1.0, teacher_scale: float | torch.Tensor = 1.0
                      ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Mod-X's distillation term from normalised features: the mean of the image -> caption and the
    caption -> image KLs of the (scaled) similarity matrices, after cognition align. Returns the term
    and ``{"replaced_image_rows", "replaced_text_rows"}`` (bool per row)."""
    student = student_scale * student_images @ student_texts.t()
    teacher = teacher_scale * teacher_images @ teacher_texts.t()
    positives = positive_pairs(image_ids, student.shape[0], student.device)
    keep = ~positives if off_diagonal else None
    terms, replaced = [], {}
    for direction, (s, t) in {"image": (student, teacher), "text": (student.t(), teacher.t())}.items():
        rows = torch.zeros(s.shape[0], dtype=torch.bool, device=s.device)
        if align:
            t, rows = cognition_align(t, s, positives)  # positives is symmetric: the same for S^T
        terms.append(similarity_distillation(s, t, reduction, keep))
        replaced[f"replaced_{direction}_rows"] = rows
    return (terms[0] + terms[1]) / 2, replaced


class ModX(Finetune):
    Config = ModXConfig
    needs_task_boundaries = True  # the teacher is the model the phase started from
    batch_kinds = ("captions",)

    def __init__(self, backend, config: ModXConfig) -> None:
        super().__init__(backend, config)
        self._teacher: Teacher | None = None  # not a module: rebuilt from the current weights per phase

    def before_task(self, task) -> None:
        super().before_task(task)
        # The previous phase's final model, or in the first phase the model before training (the
        # official first phase loads the same checkpoint into both models).
        self._teacher = None
        self._teacher = Teacher(self.backend)

    def forward(self, batch, task):
        if self._teacher is None:
            raise RuntimeError("ModX.forward called before before_task")
        require_batch_kind(self, batch)
        config, ids = self.config, batch.get("image_ids")
        image_features, text_features, contrastive = self.caption_pass(batch)
        teacher_images = self._teacher.image_features(batch["images"])
        teacher_texts = self._teacher.caption_features(batch["captions"])
        scales = {}
        if config.distill_logits:
            scales = {"student_scale": self.backend.logit_scale.exp(), "teacher_scale": self._teacher.logit_scale.exp()}
        distill, replaced = modx_distillation(image_features, text_features, teacher_images, teacher_texts, ids,
                                              align=config.cognition_align, off_diagonal=config.distill == "off_diagonal",
                                              reduction=config.kl_reduction, **scales)
        logits = clip_logits(image_features, text_features, self.backend.logit_scale)
        return {"loss": contrastive + config.alpha * distill, "contrastive": contrastive.detach(),
                "distill": distill.detach(), "accuracy": self.caption_accuracy(logits, ids),
                "aligned_rows": replaced["replaced_image_rows"].float().mean()}

    @torch.no_grad()
    def after_step(self, step: int) -> None:
        super().after_step(step)
        scale = self.backend.logit_scale
        if self.config.clamp_logit_scale and scale.requires_grad:
            scale.clamp_(0.0, LOGIT_SCALE_MAX)

    def after_task(self, task) -> None:
        super().after_task(task)
        self._teacher = None
