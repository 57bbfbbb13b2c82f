"""WiSE-FT (Wortsman et al. CVPR 2022) applied after every task of a stream.

After fine-tuning on a task, the trained weights are interpolated with the zero-shot weights,
``theta <- (1 - alpha) * theta_zero_shot + alpha * theta_finetuned``, and the next task starts from
the interpolated weights. ``alpha = 0.5`` is the WiSE-FT paper's usual middle point. This is not
ZSCL's continual WiSE-FT baseline, which interpolates with the *previous task's* weights at
``alpha = 0.8`` (ZSCL ``scripts/WiSE_finetune.sh``; docs/fidelity.md, A5).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from clipcl.config import ConfigError
from clipcl.strategies.finetune import Finetune, FinetuneConfig


@dataclass
class WiseFTConfig(FinetuneConfig):
    alpha: float = 0.5
    """Weight of the fine-tuned model in the interpolation (0 = zero-shot, 1 = plain fine-tuning)."""

    def validate(self) -> None:
        if not 0.0 <= self.alpha <= 1.0:
            raise ConfigError(f"strategy.alpha must be in [0, 1], got {self.alpha}")
        super().validate()


class WiseFT(Finetune):
    Config = WiseFTConfig
    needs_task_boundaries = True  # interpolates with the zero-shot weights after each task

    def __init__(self, backend, config: WiseFTConfig) -> None:
        super().__init__(backend, config)
        # The zero-shot weights of the trained parameters, taken at construction, i.e. before any
        # training or checkpoint loading. Kept outside the state dict: they are the pretrained model.
        self._zero_shot = {
            name: parameter.detach().clone()
            for name, parameter in backend.named_parameters()
            if parameter.requires_grad
        }

    @torch.no_grad()
    def after_task(self, task) -> None:
        super().after_task(task)
        alpha = self.config.alpha
        for name, parameter in self.backend.named_parameters():
            if name in self._zero_shot:
                parameter.mul_(alpha).add_(self._zero_shot[name].to(parameter.device), alpha=1.0 - alpha)
