"""Learning without Forgetting (Li & Hoiem, ECCV 2016 / TPAMI 2017) for CLIP.

LwF keeps a frozen copy of the model as it was when the task started (after the previous task; the
pretrained model for the first task) and adds to the task loss a distillation term that keeps the
new model's predictions close to the old model's on the current task's images. With CLIP the
"heads" are class prompts, so the predictions are image-vs-text logits. By default
(``distill_classes: seen``) they are taken over **every class seen so far**, the earlier tasks' and
the current one's, as in Ding et al.'s LwF baseline (CL-CLIP ``methods/lwf.py``, its ``lwf_mask``)
and as LwF's old-task heads; the cross-entropy stays over the current task's classes::

    loss = CE(logits_current, targets) + alpha * T^2 * KL(softmax(teacher_seen / T) || softmax(logits_seen / T))

``distill_classes: task`` distils over the current task's classes only (the form clipcl used before;
the same in one session and on online streams, where there are no earlier tasks). Which parameters
train is chosen as in ``finetune``.

On an image-caption stream (``stream.protocol: captions``) the task loss is CLIP's contrastive loss
and the distilled logits are the batch's image-vs-caption matrix, in both directions (clipcl's own
form: Li & Hoiem have no captions).

Online variant (Si-Blurry streams have no task boundaries): the whole stream is one task, so the
teacher starts as the model before the stream, and ``teacher_refresh_every`` optimiser steps it is
replaced by a copy of the current model; the distillation covers every class seen so far.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from clipcl.config import ConfigError
from clipcl.losses import (
    classification_loss,
    clip_logits,
    distillation_kl,
    normalize,
    two_way_distillation_kl,
)
from clipcl.strategies.base import require_batch_kind
from clipcl.strategies.finetune import Finetune, FinetuneConfig
from clipcl.strategies.teacher import Teacher


@dataclass
class LwFConfig(FinetuneConfig):
    alpha: float = 1.0
    """Weight of the distillation term (Li & Hoiem's loss balance lambda_o = 1)."""
    temperature: float = 2.0
    """Softening temperature T (Li & Hoiem use T = 2, after Hinton et al.). The KL is multiplied by
    T^2 (Hinton et al.; ZSCL's code does the same), which the LwF paper does not do: at T = 2 this
    term is 4x the paper's for the same alpha."""
    teacher_refresh_every: int | None = None
    """Online streams: replace the teacher by the current model every this many optimiser steps
    (None: keep the model from the start of the task, i.e. of the whole stream)."""
    text_to_image: bool = False
    """Also distil the transposed logits (each class prompt's distribution over the batch's images),
    as ZSCL's re-implementation of LwF does (its ``--image_loss --text_loss``). Off in the paper."""
    distill_classes: str = "seen"
    """``seen``: distil over the logits of every class seen so far (Ding et al.'s LwF); ``task``: over
    the current task's classes only."""

    def validate(self) -> None:
        if self.alpha < 0:
            raise ConfigError(f"strategy.alpha must be >= 0, got {self.alpha}")
        if self.temperature <= 0:
            raise ConfigError(f"strategy.temperature must be > 0, got {self.temperature}")
        if self.teacher_refresh_every is not None and self.teacher_refresh_every < 1:
            raise ConfigError(f"strategy.teacher_refresh_every must be >= 1 (or null), got {self.teacher_refresh_every}")
        if self.distill_classes not in ("seen", "task"):
            raise ConfigError(f"strategy.distill_classes must be seen or task, got {self.distill_classes!r}")
        if self.label_space != "task":
            raise ConfigError("strategy.label_space: lwf distils over the task's classes; only 'task' is supported")
        super().validate()


class LwF(Finetune):
    Config = LwFConfig

    def __init__(self, backend, config: LwFConfig) -> None:
        super().__init__(backend, config)
        # Not a module attribute: the teacher is rebuilt from the current weights in before_task.
        self._teacher: Teacher | None = None
        self._teacher_text: torch.Tensor | None = None
        self._task = None
        self._seen: list = []  # classes of the finished tasks, in first-seen order
        self._old_classes: list = []  # this task's distilled classes that are not its own
        self._frozen_old_text: torch.Tensor | None = None

    def restore_structure(self, completed) -> None:
        super().restore_structure(completed)
        self._seen = list(dict.fromkeys(class_text for task in completed for class_text in task.classes))

    def before_task(self, task) -> None:
        super().before_task(task)
        self._teacher = self._teacher_text = None  # free the old copy before making the new one
        self._teacher = Teacher(self.backend)
        current = set(task.classes)
        self._old_classes = ([c for c in self._seen if c not in current]
                             if self.config.distill_classes == "seen" else [])
        # The teacher's features of every distilled class: the old ones first, then the task's.
        self._teacher_text = self._teacher.class_features(self._old_classes + list(task.classes), self.config.template)
        self._frozen_old_text = None
        if self._old_classes and not self.text_trains:
            with torch.no_grad():  # a frozen text tower: the old classes' features are fixed
                self._frozen_old_text = self.training_text_features(self._old_classes)
        self._task = task

    def on_new_classes(self, task) -> None:
        super().on_new_classes(task)
        if self._teacher is not None:
            self._teacher_text = self._teacher.class_features(self._old_classes + list(task.classes), self.config.template)

    def after_step(self, step: int) -> None:
        super().after_step(step)
        every = self.config.teacher_refresh_every
        if every is not None and self._teacher is not None and (step + 1) % every == 0 and self._task is not None:
            self._teacher = None
            self._teacher = Teacher(self.backend)
            self._teacher_text = self._teacher.class_features(self._old_classes + list(self._task.classes), self.config.template)

    def online_state(self) -> dict[str, torch.Tensor]:
        # A refreshed teacher is the model of some earlier step, which no checkpoint holds otherwise.
        if self.config.teacher_refresh_every is None or self._teacher is None:
            return {}
        return {f"teacher.{name}": tensor for name, tensor in self._teacher.backend.state_dict().items()}

    def load_online_state(self, tensors: dict[str, torch.Tensor]) -> None:
        if not tensors or self._teacher is None:
            return
        self._teacher.backend.load_state_dict({name[len("teacher."):]: tensor for name, tensor in tensors.items()})
        if self._task is not None:
            self._teacher_text = self._teacher.class_features(self._old_classes + list(self._task.classes), self.config.template)

    def caption_forward(self, batch):
        """An image-caption batch (clipcl's own contrastive LwF): CLIP's contrastive loss plus the
        distillation of the teacher's batch image-vs-caption logits (each model's own logit scale),
        both directions summed, at temperature T with the T^2 factor, as over class prompts."""
        image_features, text_features, contrastive = self.caption_pass(batch)
        logits = clip_logits(image_features, text_features, self.backend.logit_scale)
        images = batch["images"]
        teacher_logits = self._teacher.logits(self._teacher.image_features(images),
                                              self._teacher.caption_features(batch["captions"]))
        image_to_text, text_to_image = two_way_distillation_kl(logits, teacher_logits, self.config.temperature)
        distill = image_to_text + text_to_image
        return {"loss": contrastive + self.config.alpha * distill, "ce": contrastive.detach(),
                "distill": distill.detach(), "accuracy": self.caption_accuracy(logits, batch.get("image_ids"))}

    def forward(self, batch, task):
        if self._teacher is None:
            raise RuntimeError("LwF.forward called before before_task")
        if require_batch_kind(self, batch) == "captions":
            return self.caption_forward(batch)
        images, targets = batch["images"], batch["targets"]
        image_features = normalize(self.backend.encode_image(images))
        task_text = self.task_text_features(task)
        logits = clip_logits(image_features, task_text, self.backend.logit_scale)
        ce = classification_loss(logits, targets, self.config.label_smoothing)
        distilled = logits
        if self._old_classes:
            old_text = self._frozen_old_text
            if old_text is None:
                old_text = self.training_text_features(self._old_classes)
            distilled = clip_logits(image_features, torch.cat([old_text, task_text]), self.backend.logit_scale)
        teacher_logits = self._teacher.logits(self._teacher.image_features(images), self._teacher_text)
        distill = distillation_kl(distilled, teacher_logits, self.config.temperature)
        if self.config.text_to_image:
            distill = distill + distillation_kl(distilled.t(), teacher_logits.t(), self.config.temperature)
        loss = ce + self.config.alpha * distill
        return {"loss": loss, "ce": ce.detach(), "distill": distill.detach(),
                "accuracy": (logits.argmax(dim=-1) == targets).float().mean().detach()}

    def after_task(self, task) -> None:
        super().after_task(task)
        self._seen = list(dict.fromkeys([*self._seen, *task.classes]))
        self._teacher = self._teacher_text = self._task = self._frozen_old_text = None
        self._old_classes = []
