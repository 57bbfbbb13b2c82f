"""WiSE-FT (Wortsman et al. CVPR 2022) applied after every task of a stream.

After fine-tuning on a task, the trained weights are interpolated with an anchor,
``theta <- (1 - alpha) * theta_anchor + alpha * theta_finetuned``, and the next task starts from the
interpolated weights. By default the anchor is the zero-shot model and ``alpha = 0.5``, the WiSE-FT
paper's usual middle point. ZSCL's continual WiSE-FT baseline instead interpolates with the
weights the task started from (the previous task's merged model) at ``alpha = 0.8``
(``scripts/WiSE_finetune.sh``): ``anchor: task_start`` with ``alpha: 0.8`` (docs/fidelity.md, A5).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from clipcl.config import ConfigError
from clipcl.strategies.finetune import Finetune, FinetuneConfig

ANCHORS = ("zero_shot", "task_start")


@dataclass
class WiseFTConfig(FinetuneConfig):
    alpha: float = 0.5
    """Weight of the fine-tuned model in the interpolation (0 = the anchor, 1 = plain fine-tuning)."""
    anchor: str = "zero_shot"
    """What the fine-tuned weights are interpolated with: ``zero_shot`` (the pretrained model, as
    WiSE-FT) or ``task_start`` (the weights the task started from, as ZSCL's WiSE-FT baseline)."""

    def validate(self) -> None:
        if not 0.0 <= self.alpha <= 1.0:
            raise ConfigError(f"strategy.alpha must be in [0, 1], got {self.alpha}")
        if self.anchor not in ANCHORS:
            raise ConfigError(f"strategy.anchor must be one of {', '.join(ANCHORS)}, got {self.anchor!r}")
        super().validate()


class WiseFT(Finetune):
    Config = WiseFTConfig
    needs_task_boundaries = True  # interpolates with the zero-shot weights after each task

    def __init__(self, backend, config: WiseFTConfig) -> None:
        super().__init__(backend, config)
        # The zero-shot weights of the trained parameters, taken at construction, i.e. before any
        # training or checkpoint loading. Kept outside the state dict: they are the pretrained model.
        self._anchor = self._trained_weights() if config.anchor == "zero_shot" else {}

    def _trained_weights(self) -> dict[str, torch.Tensor]:
        return {name: parameter.detach().clone()
                for name, parameter in self.backend.named_parameters() if parameter.requires_grad}

    def before_task(self, task) -> None:
        super().before_task(task)
        if self.config.anchor == "task_start":
            # A resumed run restarts the task from its checkpoint at the task's start: the same weights.
            self._anchor = self._trained_weights()

    @torch.no_grad()
    def after_task(self, task) -> None:
        super().after_task(task)
        alpha = self.config.alpha
        for name, parameter in self.backend.named_parameters():
            if name in self._anchor:
                parameter.mul_(alpha).add_(self._anchor[name].to(parameter.device), alpha=1.0 - alpha)
