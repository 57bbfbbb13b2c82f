"""Sequential fine-tuning: train on each task in turn with the CLIP classification loss.

The loss is cross-entropy over ``exp(logit_scale) * cos(image, class prompt)`` for the current task's
classes (one prompt per class, the dataset's first template), as in the fine-tuning baselines of
ZSCL (Zheng et al. 2023). Which parameters train is a choice: the whole model, one tower, or named
parameters (any parameter whose name starts with one of the given prefixes).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from clipcl.config import ConfigError
from clipcl.losses import classification_loss, clip_logits
from clipcl.strategies.base import Strategy, StrategyConfig, class_text_features

PARTS = ("all", "image", "text")
LABEL_SPACES = ("task", "batch")
PEFT_KINDS = ("lora", "adapter")
"""Valid values of ``strategy.peft`` (the kinds of :func:`clipcl.adapt.inject`)."""


@dataclass
class FinetuneConfig(StrategyConfig):
    train: str = "all"
    """``all``, ``image``, ``text``, or comma-separated parameter-name prefixes of the backend
    (e.g. ``image_projection,text_projection``); ``clipcl list --parameters`` shows the names."""
    train_logit_scale: bool = False
    """Also train the temperature (CLIP fine-tuning usually keeps it fixed)."""
    label_smoothing: float = 0.0
    """Label smoothing of the cross-entropy."""
    peft: str | None = None
    """Parameter-efficient tuning instead of training the weights themselves: ``lora`` or ``adapter``
    (clipcl's own modules, :mod:`clipcl.adapt`), injected into the towers ``train`` names (``all``:
    both). Only the added parameters train; the original weights stay frozen."""
    peft_targets: list[str] | None = None
    """Module-name patterns to inject into (None: the backend's own defaults for the chosen towers,
    its ``ADAPTATION_TARGETS`` table, ``backend.adaptation_targets(kind, towers)``)."""
    lora_rank: int = 8
    """LoRA rank r."""
    lora_alpha: float = 16.0
    """LoRA scaling alpha (the update is multiplied by alpha / r)."""
    adapter_bottleneck: int = 64
    """Parallel adapters: width of the bottleneck."""
    adapter_scale: float = 0.1
    """Parallel adapters: the adapter's output is multiplied by this."""
    label_space: str = "task"
    """The classes on the text side of the cross-entropy: ``task`` (the task's classes; in an online
    stream, every class seen so far) or ``batch`` (only the classes present in the batch, as SIT does,
    Wang et al. 2024)."""

    def validate(self) -> None:
        if self.label_space not in LABEL_SPACES:
            raise ConfigError(f"strategy.label_space must be one of {', '.join(LABEL_SPACES)}, got {self.label_space!r}")
        if self.peft is not None:
            if self.peft not in PEFT_KINDS:
                raise ConfigError(f"strategy.peft must be one of {', '.join(PEFT_KINDS)} (or null), got {self.peft!r}")
            if self.train not in PARTS:
                raise ConfigError("strategy.train must be all, image or text when strategy.peft is set")
        super().validate()


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
            raise ConfigError(f"strategy.train: no parameter starts with {missing[0]!r}; top-level names: {examples}")
    scale_id = id(backend.logit_scale)
    chosen = {name: p for name, p in chosen.items() if id(p) != scale_id}
    if train_logit_scale:
        chosen["logit_scale"] = backend.logit_scale
    return chosen


def inject_peft(backend, config: FinetuneConfig) -> dict[str, torch.nn.Parameter]:
    """Put LoRA or adapters into the towers ``config.train`` names; return the new parameters by name."""
    from clipcl.adapt import added_parameters, default_targets, inject

    towers = {"all": ("image", "text"), "image": ("image",), "text": ("text",)}[config.train]
    targets = config.peft_targets or default_targets(backend, config.peft, towers)
    if config.peft == "lora":
        inject(backend, "lora", targets, rank=config.lora_rank, alpha=config.lora_alpha)
    else:
        inject(backend, "adapter", targets, bottleneck=config.adapter_bottleneck, scale=config.adapter_scale)
    added = {id(parameter) for parameter in added_parameters(backend)}
    chosen = {name: parameter for name, parameter in backend.named_parameters() if id(parameter) in added}
    if config.train_logit_scale:
        chosen["logit_scale"] = backend.logit_scale
    return chosen


class Finetune(Strategy):
    Config = FinetuneConfig
    needs_task_boundaries = False  # usable on online streams (the whole stream is one "task")

    def __init__(self, backend, config: FinetuneConfig) -> None:
        super().__init__(backend, config)
        if config.peft is not None:
            chosen = inject_peft(backend, config)
        else:
            chosen = select_parameters(backend, config.train, config.train_logit_scale)
        chosen_ids = {id(parameter) for parameter in chosen.values()}
        for parameter in backend.parameters():
            parameter.requires_grad_(id(parameter) in chosen_ids)
        self.text_trains = any(
            parameter.requires_grad for parameter in backend.text_tower.parameters()
        )
        self._frozen_text_features: torch.Tensor | None = None

    def before_task(self, task) -> None:
        self._cache_frozen_text_features(task)

    def _cache_frozen_text_features(self, task) -> None:
        # A frozen text tower gives the same class features at every step: compute them once per
        # task (and again when an online stream's classes grow).
        self._frozen_text_features = None
        if not self.text_trains:
            with torch.no_grad():
                self._frozen_text_features = class_text_features(self.backend, task.classes, ensemble=False)

    def on_new_classes(self, task) -> None:
        self._cache_frozen_text_features(task)

    def task_text_features(self, task) -> torch.Tensor:
        if self._frozen_text_features is not None:
            return self._frozen_text_features
        return class_text_features(self.backend, task.classes, ensemble=False)

    def batch_label_space(self, task, targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Text features of the classes present in ``targets`` only, and the targets re-indexed into them."""
        present = torch.unique(targets)  # sorted
        if self._frozen_text_features is not None:
            features = self._frozen_text_features[present]
        else:
            features = class_text_features(self.backend, [task.classes[int(i)] for i in present], ensemble=False)
        return features, torch.searchsorted(present, targets)

    def forward(self, batch, task):
        images, targets = batch["images"], batch["targets"]
        image_features = self.backend.encode_image(images)
        if self.config.label_space == "batch":
            text_features, targets = self.batch_label_space(task, targets)
        else:
            text_features = self.task_text_features(task)
        logits = clip_logits(image_features, text_features, self.backend.logit_scale)
        loss = classification_loss(logits, targets, self.config.label_smoothing)
        return {"loss": loss, "accuracy": (logits.argmax(dim=-1) == targets).float().mean().detach()}

    def after_task(self, task) -> None:
        self._frozen_text_features = None
