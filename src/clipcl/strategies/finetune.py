"""Sequential fine-tuning: train on each task in turn with the CLIP classification loss.

The loss is cross-entropy over ``exp(logit_scale) * cos(image, class prompt)`` for the current task's
classes (one prompt per class, the dataset's first template), as in the fine-tuning baselines of
ZSCL (Zheng et al. 2023). Which parameters train is a choice: the whole model, one tower, or named
parameters (any parameter whose name starts with one of the given prefixes).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from clipcl.losses import classification_loss, clip_logits
from clipcl.strategies.base import Strategy, StrategyConfig, class_text_features

PARTS = ("all", "image", "text")


@dataclass
class FinetuneConfig(StrategyConfig):
    train: str = "all"
    """``all``, ``image``, ``text``, or comma-separated parameter-name prefixes of the backend
    (e.g. ``image_projection,text_projection``); ``clipcl list --parameters`` shows the names."""
    train_logit_scale: bool = False
    """Also train the temperature (CLIP fine-tuning usually keeps it fixed)."""
    label_smoothing: float = 0.0
    """Label smoothing of the cross-entropy."""


def select_parameters(backend, train: str, train_logit_scale: bool) -> dict[str, torch.nn.Parameter]:
    """The backend parameters a fine-tuning choice trains, by name. Raises ValueError on a bad choice."""
    named = dict(backend.named_parameters())
    if train == "all":
        chosen = dict(named)
    elif train in ("image", "text"):
        tower = backend.image_tower if train == "image" else backend.text_tower
        tower_ids = {id(parameter) for parameter in tower.parameters()}
        chosen = {name: p for name, p in named.items() if id(p) in tower_ids}
    else:
        prefixes = [prefix.strip() for prefix in train.split(",") if prefix.strip()]
        chosen = {name: p for name, p in named.items() if any(name.startswith(prefix) for prefix in prefixes)}
        missing = [prefix for prefix in prefixes if not any(name.startswith(prefix) for name in named)]
        if missing:
            examples = ", ".join(sorted({name.split(".")[0] for name in named}))
            raise ValueError(f"strategy.train: no parameter starts with {missing[0]!r}; top-level names: {examples}")
    scale_id = id(backend.logit_scale)
    chosen = {name: p for name, p in chosen.items() if id(p) != scale_id}
    if train_logit_scale:
        chosen["logit_scale"] = backend.logit_scale
    return chosen


class Finetune(Strategy):
    Config = FinetuneConfig

    def __init__(self, backend, config: FinetuneConfig) -> None:
        super().__init__(backend, config)
        chosen = select_parameters(backend, config.train, config.train_logit_scale)
        chosen_ids = {id(parameter) for parameter in chosen.values()}
        for parameter in backend.parameters():
            parameter.requires_grad_(id(parameter) in chosen_ids)
        self.text_trains = any(
            parameter.requires_grad for parameter in backend.text_tower.parameters()
        )
        self._frozen_text_features: torch.Tensor | None = None

    def before_task(self, task) -> None:
        # A frozen text tower gives the same class features at every step: compute them once.
        self._frozen_text_features = None
        if not self.text_trains:
            with torch.no_grad():
                self._frozen_text_features = class_text_features(self.backend, task.classes, ensemble=False)

    def task_text_features(self, task) -> torch.Tensor:
        if self._frozen_text_features is not None:
            return self._frozen_text_features
        return class_text_features(self.backend, task.classes, ensemble=False)

    def forward(self, images, targets, task):
        image_features = self.backend.encode_image(images)
        logits = clip_logits(image_features, self.task_text_features(task), self.backend.logit_scale)
        loss = classification_loss(logits, targets, self.config.label_smoothing)
        return {"loss": loss, "accuracy": (logits.argmax(dim=-1) == targets).float().mean().detach()}

    def after_task(self, task) -> None:
        self._frozen_text_features = None
