"""Learnable prompt tokens in an image tower's token sequence (visual prompt tuning, as CoLeCLIP uses).

``count`` learnt vectors are inserted into the sequence of patch tokens before the tower's
transformer runs, after its leading class token, so the tower still pools where it did; they carry
no position embedding (they are added after it). Where the sequence can be reached is the backend's
knowledge: ``backend.adaptation_sites("prompts", ("image",))`` names the module that first sees the
whole sequence (open_clip's ``ln_pre``, transformers' ``pre_layrnorm``), its width, its layout and how
many leading tokens to keep in front. :class:`PromptTokens` wraps that module.

With ``count = 0``, or with ``enabled = False``, the wrapper calls its module on the unchanged input,
so the tower computes exactly what it did without prompts.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from clipcl.adapt.inject import AdaptationWrapper, attach, first_parameter, freeze_base
from clipcl.config.schema import ConfigError


@dataclass(frozen=True)
class PromptConfig:
    """The options of prompt tokens; values are checked on construction."""

    count: int = 4
    """Prompt tokens inserted into each image's sequence (0: none, the tower is unchanged)."""
    init_std: float = 0.02
    """Prompts start as Gaussian draws with this standard deviation (torch's global generator)."""

    def __post_init__(self) -> None:
        if not isinstance(self.count, int) or isinstance(self.count, bool) or self.count < 0:
            raise ConfigError(f"prompts: count must be a non-negative integer, got {self.count!r}")
        if not self.init_std >= 0:
            raise ConfigError(f"prompts: init_std must be >= 0, got {self.init_std!r}")


class PromptTokens(AdaptationWrapper):
    """Insert ``prompts`` ``[count, width]`` into the sequence ``base`` receives, after ``keep_first``
    leading tokens; ``layout`` is ``bld`` (batch first) or ``lbd`` (sequence first)."""

    def __init__(self, base: nn.Module, width: int, config: PromptConfig, keep_first: int = 0,
                 layout: str = "bld") -> None:
        super().__init__()
        if layout not in ("bld", "lbd"):
            raise ValueError(f"PromptTokens layout must be bld or lbd, got {layout!r}")
        self.base = base
        freeze_base(base)
        like = first_parameter(base)
        factory = {} if like is None else {"dtype": like.dtype, "device": like.device}
        self.prompts = nn.Parameter(torch.randn(config.count, width, **factory) * config.init_std)
        self.keep_first, self.layout = keep_first, layout
        #: Off: the sequence passes unchanged (the zero-shot tower, without a copy).
        self.enabled = True

    @property
    def count(self) -> int:
        return self.prompts.shape[0]

    def insert(self, sequence: torch.Tensor) -> torch.Tensor:
        """``sequence`` with the prompts after its first ``keep_first`` tokens (every sample the same)."""
        dim = 1 if self.layout == "bld" else 0
        batch = sequence.shape[1 - dim]
        prompts = self.prompts.to(sequence.dtype)
        prompts = prompts.unsqueeze(0).expand(batch, -1, -1) if dim == 1 else prompts.unsqueeze(1).expand(-1, batch, -1)
        head, tail = sequence.narrow(dim, 0, self.keep_first), sequence.narrow(dim, self.keep_first,
                                                                              sequence.shape[dim] - self.keep_first)
        return torch.cat([head, prompts, tail], dim=dim)

    def forward(self, sequence: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
        if self.enabled and self.count > 0:
            sequence = self.insert(sequence)
        return self.base(sequence, *args, **kwargs)

    def added_parameters(self) -> list[nn.Parameter]:
        return [self.prompts]

    def extra_repr(self) -> str:
        return f"count={self.count}, keep_first={self.keep_first}, layout={self.layout}"


def inject_prompts(backend, config: PromptConfig, tower: str = "image") -> PromptTokens:
    """Put :class:`PromptTokens` where ``backend`` declares its ``tower``'s token sequence; returns it."""
    sites = backend.adaptation_sites("prompts", (tower,))
    if len(sites) != 1:
        raise ConfigError(f"prompts: {type(backend).__name__} declares {len(sites)} prompt sites for the "
                         f"{tower} tower; expected one")
    site = sites[0]
    if isinstance(site.module, PromptTokens):
        raise ConfigError(f"prompts: {site.name} already has prompt tokens")
    wrapper = PromptTokens(site.module, site.width, config, keep_first=site.keep_first, layout=site.layout)
    attach(site, wrapper)
    return wrapper


__all__ = ["PromptConfig", "PromptTokens", "inject_prompts"]
