"""Bottleneck adapters: the one adapter, and the parallel adapter that sets it beside a module.

- :class:`Adapter` -- ``up(dropout(relu(down(x))))`` on the last dimension, ``down`` initialised like
  an ``nn.Linear``, ``up`` to zeros. It is also what each expert of a mixture is
  (:mod:`clipcl.adapt.moe`).
- :class:`ParallelAdapter` -- ``y = base(x) + scale * adapter(x)`` around any module whose input and
  output widths are known (an MLP block, a transformer layer; He et al. 2022 found the MLP best).
  A fresh one adds exact zeros, so it computes its base's output bit for bit.

Options (``inject(model, "adapter", targets, **options)``) are the fields of :class:`AdapterConfig`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from clipcl.adapt.inject import AdaptationWrapper, add_to_output, first_input, first_parameter, freeze_base
from clipcl.config.schema import ConfigError
from clipcl.models.base import Site


def _check_widths(who: str, **widths: int | None) -> None:
    for label, value in widths.items():
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise ConfigError(f"{who} {label} must be a positive integer, got {value!r}")


@dataclass(frozen=True)
class AdapterConfig:
    """The options of a parallel adapter; values are checked on construction."""

    bottleneck: int = 64
    """Width of the bottleneck."""
    scale: float = 0.1
    """The adapter's output is multiplied by this."""
    dropout: float = 0.0
    """Dropout after the bottleneck's activation, while training."""
    in_features: int | None = None
    """Width of the wrapped module's input (None: inferred from its first ``nn.Linear``)."""
    out_features: int | None = None
    """Width of its output (None: inferred from its last ``nn.Linear``)."""

    def __post_init__(self) -> None:
        for key in ("bottleneck", "in_features", "out_features"):
            value = getattr(self, key)
            if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value < 1):
                raise ConfigError(f"inject: {key} must be a positive integer, got {value!r}")
        if not 0.0 <= float(self.dropout) <= 1.0:
            raise ConfigError(f"inject: dropout must be between 0 and 1, got {self.dropout!r}")


class Adapter(nn.Module):
    """``up(dropout(relu(down(x))))`` on the last dimension; ``up`` starts at zero, so the output does.

    New parameters take ``like``'s dtype and device (default float32 on the CPU) and draw from
    torch's global generator: ``down``'s weight, then its bias (then ``up``'s, which are zeroed).
    """

    def __init__(self, in_features: int, out_features: int, bottleneck: int = 64, dropout: float = 0.0,
                 like: torch.Tensor | None = None) -> None:
        super().__init__()
        self._add_layers(in_features, out_features, bottleneck, dropout, like)

    def _add_layers(self, in_features: int, out_features: int, bottleneck: int, dropout: float,
                    like: torch.Tensor | None) -> None:
        _check_widths(type(self).__name__, in_features=in_features, out_features=out_features,
                      bottleneck=bottleneck)
        self.in_features, self.out_features, self.bottleneck = in_features, out_features, bottleneck
        factory = {} if like is None else {"dtype": like.dtype, "device": like.device}
        self.down = nn.Linear(in_features, bottleneck, **factory)
        self.up = nn.Linear(bottleneck, out_features, **factory)
        nn.init.zeros_(self.up.weight)
        nn.init.zeros_(self.up.bias)
        # A rate, not an nn.Dropout: a mixture turns dropout on and off itself (its experts run while
        # the backbone around them stays in eval mode).
        self.adapter_dropout = float(dropout)

    def branch(self, x: torch.Tensor, training: bool | None = None) -> torch.Tensor:
        """The adapter's output; dropout applies when ``training`` (default: ``self.training``)."""
        training = self.training if training is None else training
        hidden = F.dropout(F.relu(self.down(x)), self.adapter_dropout,
                           training=training and self.adapter_dropout > 0)
        return self.up(hidden)

    def forward(self, x: torch.Tensor, training: bool | None = None) -> torch.Tensor:
        return self.branch(x, training)

    def extra_repr(self) -> str:
        return f"in={self.in_features}, out={self.out_features}, bottleneck={self.bottleneck}"


class ParallelAdapter(AdaptationWrapper, Adapter):
    """``y = base(x) + scale * up(dropout(relu(down(x))))`` beside a frozen module.

    ``x`` is the module's first input (positional, or the keyword ``hidden_states``); widths refer
    to its last dimension. When the module returns a tuple (attention layers), the adapter's output
    is added to its first element. Parameters of LoRA/adapters already inside ``base`` stay trainable.
    """

    def __init__(self, base: nn.Module, in_features: int, out_features: int, bottleneck: int = 64,
                 scale: float = 0.1, dropout: float = 0.0) -> None:
        _check_widths("ParallelAdapter", in_features=in_features, out_features=out_features, bottleneck=bottleneck)
        # nn.Module's set-up only, not Adapter.__init__: ``base`` is registered before ``down`` and
        # ``up``, so parameter and state_dict order stay what they were before the adapter moved here.
        nn.Module.__init__(self)
        self.base = base
        freeze_base(base)
        self.scale = float(scale)
        self._add_layers(in_features, out_features, bottleneck, dropout, first_parameter(base))

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        x = first_input(args, kwargs, "ParallelAdapter")
        output = self.base(*args, **kwargs)
        return add_to_output(output, self.scale * self.branch(x), "ParallelAdapter", self.base)

    def added_parameters(self) -> list[nn.Parameter]:
        return [self.down.weight, self.down.bias, self.up.weight, self.up.bias]

    def extra_repr(self) -> str:
        return f"in={self.in_features}, out={self.out_features}, bottleneck={self.bottleneck}, scale={self.scale:g}"


# --- the kind, for inject() ------------------------------------------------------------------------


def _widths(module: nn.Module) -> tuple[int, int] | None:
    if isinstance(module, AdaptationWrapper):
        return _widths(module.base)
    if isinstance(module, nn.Linear):
        return module.in_features, module.out_features
    if isinstance(module, nn.MultiheadAttention):
        return module.embed_dim, module.embed_dim
    if isinstance(module, nn.modules.conv._ConvNd):
        return None
    linears = [child for child in module.modules() if isinstance(child, nn.Linear)]
    if not linears:
        return None
    return linears[0].in_features, linears[-1].out_features


class _AdapterKind:
    """How :func:`~clipcl.adapt.inject.inject_by_name` puts parallel adapters into a model."""

    name = "adapter"
    config = AdapterConfig

    def problem(self, site: Site, settings: AdapterConfig) -> str | None:
        if settings.in_features is not None and settings.out_features is not None:
            return None
        if _widths(site.module) is None:
            return (f"{site.name} is a {type(site.module).__name__} whose feature widths cannot be inferred "
                    "(no nn.Linear inside); pass in_features= and out_features=")
        return None

    def is_candidate(self, site: Site) -> bool:
        module = site.module
        if isinstance(module, (nn.Linear, nn.MultiheadAttention, AdaptationWrapper)):
            return True
        return any(isinstance(child, nn.Linear) for child in module.children())

    def wrap(self, module: nn.Module, settings: AdapterConfig) -> AdaptationWrapper:
        widths = _widths(module) or (None, None)
        in_features = settings.in_features if settings.in_features is not None else widths[0]
        out_features = settings.out_features if settings.out_features is not None else widths[1]
        return ParallelAdapter(module, in_features, out_features, bottleneck=settings.bottleneck,
                               scale=settings.scale, dropout=settings.dropout)


ADAPTER = _AdapterKind()
"""The parallel-adapter kind for :func:`~clipcl.adapt.inject.inject_by_name`."""

__all__ = ["ADAPTER", "Adapter", "AdapterConfig", "ParallelAdapter"]
