"""Experience replay (ER) with a reservoir memory (Chaudhry et al. 2019).

The method declares a replay memory of ``memory_size`` samples (``clipcl.data.memory``); the engine
keeps it and adds to every incoming batch as many samples drawn uniformly from it (fewer while it is
smaller), then offers the incoming samples to it by reservoir sampling (Vitter 1985): the n-th
sample seen replaces a random slot with probability ``memory_size / n``, so the memory is always a
uniform sample of the stream so far. The loss is fine-tuning's over the incoming and replayed
samples together, on the current label space (every class seen so far, in an online stream) plus
the classes of replayed samples it lacks (earlier tasks, in a task stream). ``memory_size: 0`` is
plain fine-tuning. ``memory: class_balanced`` keeps classes equal instead (GDumb's balancer).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from clipcl.config import ConfigError
from clipcl.data.memory import KINDS as MEMORY_KINDS
from clipcl.data.memory import ReplaySpec
from clipcl.losses import classification_loss, clip_logits
from clipcl.strategies.base import require_batch_kind
from clipcl.strategies.finetune import Finetune, FinetuneConfig


@dataclass
class ERConfig(FinetuneConfig):
    memory_size: int = 500
    """Samples kept in the rehearsal memory (0: no memory, plain fine-tuning)."""
    memory: str = "reservoir"
    """``reservoir`` (a uniform sample of the stream), ``class_balanced``, or a budget split over
    experiences: ``budget_equal`` or ``budget_exponential`` (TiC-CLIP's replay buffers)."""

    def validate(self) -> None:
        if self.memory_size < 0:
            raise ConfigError(f"strategy.memory_size must be >= 0, got {self.memory_size}")
        if self.memory not in MEMORY_KINDS:
            raise ConfigError(f"strategy.memory must be one of {', '.join(MEMORY_KINDS)}, got {self.memory!r}")
        if self.label_space != "task":
            raise ConfigError("strategy.label_space: er trains on the current label space; only 'task' is supported")
        super().validate()


class ExperienceReplay(Finetune):
    batch_kinds = ("labels",)  # no caption path
    Config = ERConfig
    needs_task_boundaries = False

    def __init__(self, backend, config: ERConfig) -> None:
        super().__init__(backend, config)

    def sources(self) -> dict:
        return {"replay": ReplaySpec(capacity=self.config.memory_size, kind=self.config.memory)}

    def forward(self, batch, task):
        require_batch_kind(self, batch)
        replay = batch.get("replay")
        images, targets = batch["images"], batch["targets"]
        text_features = self.task_text_features(task)
        if replay is not None and len(replay["classes"]):
            classes = list(task.classes)
            position = {class_text: index for index, class_text in enumerate(classes)}
            extra = [class_text for class_text in dict.fromkeys(replay["classes"]) if class_text not in position]
            for class_text in extra:
                position[class_text] = len(position)
            if extra:  # classes of earlier tasks that the current label space lacks
                text_features = torch.cat([text_features, self.training_text_features(extra)])
            replay_targets = torch.tensor([position[class_text] for class_text in replay["classes"]],
                                          dtype=torch.long, device=targets.device)
            images = torch.cat([images, replay["images"].to(images.dtype)])
            targets = torch.cat([targets, replay_targets])
        logits = clip_logits(self.backend.encode_image(images), text_features, self.backend.logit_scale)
        loss = classification_loss(logits, targets, self.config.label_smoothing)
        return {"loss": loss, "accuracy": (logits.argmax(dim=-1) == targets).float().mean().detach()}
