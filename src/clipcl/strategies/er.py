"""Experience replay (ER) with a reservoir memory, for online streams (Chaudhry et al. 2019).

The memory keeps at most ``memory_size`` training samples (as indices into the training set). Every
incoming batch is trained together with as many samples drawn uniformly from the memory (fewer while
the memory is smaller), then the incoming samples enter the memory by reservoir sampling (Vitter
1985): the n-th sample seen replaces a random slot with probability ``memory_size / n``, so the memory
is always a uniform sample of the stream so far. The loss is fine-tuning's, over every class seen so
far. ``memory_size: 0`` is plain online fine-tuning.

Draws use the generator the online loop passes (seeded by the run), so runs repeat exactly.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from clipcl.config import ConfigError
from clipcl.strategies.finetune import Finetune, FinetuneConfig


@dataclass
class ERConfig(FinetuneConfig):
    memory_size: int = 500
    """Samples kept in the rehearsal memory (0: no memory, plain online fine-tuning)."""

    def validate(self) -> None:
        if self.memory_size < 0:
            raise ConfigError(f"strategy.memory_size must be >= 0, got {self.memory_size}")
        super().validate()


class ExperienceReplay(Finetune):
    Config = ERConfig
    needs_task_boundaries = False

    def __init__(self, backend, config: ERConfig) -> None:
        super().__init__(backend, config)
        self.memory: list[int] = []
        self.seen = 0  # samples observed so far (the reservoir's n)
        self._generator: torch.Generator | None = None

    def replay_indices(self, count: int, generator: torch.Generator) -> list[int]:
        self._generator = generator
        if not self.memory or count <= 0:
            return []
        picks = torch.randperm(len(self.memory), generator=generator)[: min(count, len(self.memory))]
        return [self.memory[int(pick)] for pick in picks]

    def observe(self, indices, labels) -> None:
        capacity = self.config.memory_size
        generator = self._generator or torch.Generator().manual_seed(0)
        for index in indices:
            self.seen += 1
            if len(self.memory) < capacity:
                self.memory.append(int(index))
                continue
            if capacity == 0:
                continue
            slot = int(torch.randint(0, self.seen, (1,), generator=generator))
            if slot < capacity:
                self.memory[slot] = int(index)
