"""Bottleneck adapters: the one adapter, and the parallel adapter that sets it beside a module.

- :class:`Adapter` -- ``up(dropout(relu(down(x))))`` on the last dimension, ``down`` initialised like
  an ``nn.Linear``, ``up`` to zeros. It is also what each expert of a mixture is
  (:mod:`clipcl.adapt.moe`).
- :class:`ParallelAdapter` -- ``y = base(x) + scale * adapter(x)`` around any module whose input and
  output widths are known (an MLP block, a transformer layer; He et al. 2022 found the MLP best).
  A fresh one adds exact zeros, so it computes its base's output bit for bit.
- :class:`SequentialAdapter` -- ``f = base(x); y = f + scale * adapter(f)`` after a frozen module, on
  its output, with the adapter's own residual. This is LifeLong-CLIP's placement (SIT, Wang et al.
  2024; ``models/clip/model.py:257-281`` and ``models/clip/adapter.py:49-69`` @ bf20b82): in each
  residual block *one* adapter module is applied to the attention output and again to the MLP
  output, before the block's residual adds. ``placement="sequential"`` with ``shared_per_block``
  builds exactly that (one :class:`Adapter` shared by the wrapped modules of each block); the
  backends' ``adapter_sequential`` targets name each block's attention and MLP.

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


PLACEMENTS = ("parallel", "sequential")
"""Valid values of ``AdapterConfig.placement``."""


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
    placement: str = "parallel"
    """``parallel`` (:class:`ParallelAdapter`, beside the module, reading its input) or ``sequential``
    (:class:`SequentialAdapter`, after the module, reading its output; widths are the output's)."""
    shared_per_block: bool = False
    """Sequential only: the wrapped modules of one block (the same numbered item of a layer list,
    e.g. ``resblocks.3.attn`` and ``resblocks.3.mlp``) share one adapter, as LifeLong-CLIP's do."""
    zero_down_bias: bool = False
    """Start the down projection's bias at zero (LifeLong-CLIP) instead of ``nn.Linear``'s init."""

    def __post_init__(self) -> None:
        if self.placement not in PLACEMENTS:
            raise ConfigError(f"inject: placement must be one of {', '.join(PLACEMENTS)}, got {self.placement!r}")
        if self.shared_per_block and self.placement != "sequential":
            raise ConfigError("inject: shared_per_block needs placement='sequential'")
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
                 like: torch.Tensor | None = None, zero_down_bias: bool = False) -> None:
        super().__init__()
        self._add_layers(in_features, out_features, bottleneck, dropout, like, zero_down_bias)

    def _add_layers(self, in_features: int, out_features: int, bottleneck: int, dropout: float,
                    like: torch.Tensor | None, zero_down_bias: bool = False) -> None:
        _check_widths(type(self).__name__, in_features=in_features, out_features=out_features,
                      bottleneck=bottleneck)
        self.in_features, self.out_features, self.bottleneck = in_features, out_features, bottleneck
        factory = {} if like is None else {"dtype": like.dtype, "device": like.device}
        self.down = nn.Linear(in_features, bottleneck, **factory)
        self.up = nn.Linear(bottleneck, out_features, **factory)
        nn.init.zeros_(self.up.weight)
        nn.init.zeros_(self.up.bias)
        if zero_down_bias:  # after the draws, so the weights are those of the default init
            nn.init.zeros_(self.down.bias)
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


class SequentialAdapter(AdaptationWrapper):
    """``f = base(x); y = f + scale * up(dropout(relu(down(f))))`` after a frozen module.

    The adapter reads the module's output (the first element of a tuple output, attention layers)
    and adds to it: its own residual, inside whatever residual the block adds around the module.
    ``adapter`` may be one :class:`Adapter` shared by several wrappers (each call draws its own
    dropout); it is then registered under each of them, and parameters are listed once.
    A fresh adapter adds exact zeros (``up`` starts at zero).
    """

    def __init__(self, base: nn.Module, adapter: Adapter, scale: float = 0.1) -> None:
        super().__init__()
        self.base = base
        freeze_base(base)
        self.adapter = adapter
        self.scale = float(scale)

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        output = self.base(*args, **kwargs)
        features = output[0] if isinstance(output, tuple) else output
        return add_to_output(output, self.scale * self.adapter(features), "SequentialAdapter", self.base)

    def added_parameters(self) -> list[nn.Parameter]:
        adapter = self.adapter
        return [adapter.down.weight, adapter.down.bias, adapter.up.weight, adapter.up.bias]

    def extra_repr(self) -> str:
        return f"scale={self.scale:g}"


def block_of(name: str) -> str:
    """The block a module belongs to: its name up to the last numbered component
    (``model.visual.transformer.resblocks.3.attn`` -> ``model.visual.transformer.resblocks.3``); the
    whole name when there is none."""
    parts = name.split(".")
    numbered = [index for index, part in enumerate(parts) if part.isdigit()]
    return ".".join(parts[: numbered[-1] + 1]) if numbered else name


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
        if settings.out_features is not None and (settings.in_features is not None or settings.placement == "sequential"):
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

    def wrap_sites(self, sites: list[Site], settings: AdapterConfig) -> list[AdaptationWrapper]:
        """Parallel: each site on its own (:meth:`wrap`). Sequential: an adapter on each module's output
        width, one per block when ``shared_per_block`` (the modules of a block must agree on the width)."""
        if settings.placement == "parallel":
            wrappers = []
            for site in sites:
                wrapper = self.wrap(site.module, settings)
                if settings.zero_down_bias:
                    nn.init.zeros_(wrapper.down.bias)
                wrappers.append(wrapper)
            return wrappers
        shared: dict[str, Adapter] = {}
        wrappers = []
        for site in sites:
            width = settings.out_features if settings.out_features is not None else (_widths(site.module) or (0, 0))[1]
            key = block_of(site.name) if settings.shared_per_block else site.name
            adapter = shared.get(key)
            if adapter is None:
                adapter = Adapter(width, width, settings.bottleneck, settings.dropout, first_parameter(site.module),
                                  zero_down_bias=settings.zero_down_bias)
                shared[key] = adapter
            elif adapter.out_features != width:
                raise ConfigError(f"inject: {site.name} outputs width {width}, but the adapter it shares in block "
                                  f"{key} has width {adapter.out_features}")
            wrappers.append(SequentialAdapter(site.module, adapter, settings.scale))
        return wrappers


ADAPTER = _AdapterKind()
"""The parallel-adapter kind for :func:`~clipcl.adapt.inject.inject_by_name`."""

__all__ = ["ADAPTER", "PLACEMENTS", "Adapter", "AdapterConfig", "ParallelAdapter", "SequentialAdapter", "block_of"]
