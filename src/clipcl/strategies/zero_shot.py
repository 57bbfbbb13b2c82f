"""Zero-shot CLIP (the "Continual-CLIP" baseline, Thengane et al. 2022): never trains.

Every task is solved by comparing image features with the class prompts' text features. It is the
reference row of every table: what the pretrained model already knows.
"""

from __future__ import annotations

from dataclasses import dataclass

from clipcl.strategies.base import Strategy, StrategyConfig


@dataclass
class ZeroShotConfig(StrategyConfig):
    """Zero-shot has no options."""


class ZeroShot(Strategy):
    Config = ZeroShotConfig
    needs_task_boundaries = False
    batch_kinds = ("labels", "captions")  # it never trains, so any stream can be measured with it

    def __init__(self, backend, config: ZeroShotConfig) -> None:
        super().__init__(backend, config)
        for parameter in self.backend.parameters():
            parameter.requires_grad_(False)
