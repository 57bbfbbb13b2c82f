"""Mixture-of-experts adapters (Yu et al., CVPR 2024, "Boosting Continual Learning of Vision-Language
Models via Mixture-of-Experts Adapters"), written for clipcl.

Each adapted block gets ``E`` experts -- each an :class:`~clipcl.adapt.adapter.Adapter`
``up(dropout(relu(down(x))))`` with a bottleneck of 64, ``up`` initialised to zero, the mixture's output
scaled by 0.1 -- and one or more routers. A router reads one vector per sample: the first token of the
tensor the mixture reads. In a CLIP transformer block that tensor is the residual stream after
attention, ``x + attn(ln_1(x))``, i.e. the input of the MLP's layer norm (captured by a pre-hook),
not the block's input; the official code routes on the same vector (it adds attention to the stream,
then takes the stream's first token: ``mtil/clip/model.py:465,474`` @ 4572d97). In a convolutional
block it is the
spatial mean of the block's input. The router scores the experts with
noisy top-k gating (Shazeer et al. 2017: Gaussian noise whose scale is ``softplus(x W_noise) + 0.01``,
only while training), keeps the k best, and the block's output gains the softmax-weighted sum of those
k experts. Routing is per sample, so an image's output never depends on which other images share its
batch.

Where the mixtures sit is each backend's choice (``backend.adaptation_sites("moe", towers)``): beside
the MLP of a CLIP transformer block, reading the residual stream *before* the MLP's layer norm (the
official code's AdaptFormer placement; a forward pre-hook on that norm hands it over); beside a whole
BERT layer; beside an EfficientNet MBConv block with an identity skip, along the channel dimension
(the experts are applied as linear maps on each pixel's channel vector).

A fresh mixture adds exact zeros (``up`` is zero), so the adapted model computes the model it wraps
bit for bit -- the same model, with the same ``requires_grad`` flags: torch may pick other matmul
kernels for frozen weights than for trainable ones, and the strategy freezes the backbone. With no
active router (``active_router = None``) the mixture is skipped entirely, which is how the strategy
runs the zero-shot model without a copy.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from clipcl.adapt.adapter import Adapter
from clipcl.adapt.inject import (
    AdaptationWrapper,
    add_to_output,
    attach,
    first_input,
    first_parameter,
    freeze_base,
)
from clipcl.config.schema import ConfigError

LAYOUTS = ("bld", "lbd", "bchw")
"""Token layouts of a block's input: batch-first sequence, sequence-first sequence, or feature map."""


class Router(nn.Module):
    """Noisy top-k gate: ``W_gate`` and ``W_noise``, both zero at the start (as the official code)."""

    def __init__(self, width: int, num_experts: int, like: torch.Tensor | None) -> None:
        super().__init__()
        factory = {} if like is None else {"dtype": like.dtype, "device": like.device}
        self.gate = nn.Linear(width, num_experts, bias=False, **factory)
        self.noise = nn.Linear(width, num_experts, bias=False, **factory)
        nn.init.zeros_(self.gate.weight)
        nn.init.zeros_(self.noise.weight)

    def forward(self, tokens: torch.Tensor, top_k: int, noisy: bool) -> tuple[torch.Tensor, torch.Tensor]:
        """``(indices, weights)``, each ``[B, k]``: the chosen experts and their softmax weights."""
        logits = self.gate(tokens)
        if noisy:
            logits = logits + torch.randn_like(logits) * (F.softplus(self.noise(tokens)) + 1e-2)
        values, indices = logits.float().topk(top_k, dim=-1)
        return indices, torch.softmax(values, dim=-1)


class MoEAdapter(AdaptationWrapper):
    """A frozen block (or MLP) plus a mixture of expert adapters chosen per sample by a router."""

    def __init__(self, base: nn.Module, width: int, layout: str, num_experts: int, top_k: int,
                 bottleneck: int = 64, scale: float = 0.1, dropout: float = 0.1,
                 input_from: nn.Module | None = None) -> None:
        super().__init__()
        if layout not in LAYOUTS:
            raise ConfigError(f"MoEAdapter layout must be one of {', '.join(LAYOUTS)}, got {layout!r}")
        if not 1 <= top_k <= num_experts:
            raise ConfigError(f"MoE adapters need 1 <= top_k <= num_experts, got top_k={top_k}, num_experts={num_experts}")
        self.base = base
        freeze_base(base)
        like = first_parameter(base)
        self.width, self.layout, self.top_k, self.scale = width, layout, top_k, float(scale)
        self.experts = nn.ModuleList(Adapter(width, width, bottleneck, dropout, like) for _ in range(num_experts))
        self.routers = nn.ModuleList()
        # How often each expert was chosen while training the current task (reset by the strategy).
        self.register_buffer("selection_counts", torch.zeros(num_experts, dtype=torch.long), persistent=False)
        # Experts frozen after earlier tasks; persistent so a resumed run knows them.
        self.register_buffer("frozen", torch.zeros(num_experts, dtype=torch.bool))
        self.active_router: int | None = None
        self.training_mode = False  # router noise and adapter dropout; set by the strategy
        self.sync_free: bool | None = None  # None: dense mixing on a GPU in evaluation (see _sync_free)
        self._captured: torch.Tensor | None = None
        self._hook = None
        if input_from is not None:
            # The pre-norm residual stream reaches the MLP only through the norm; keep the norm's input.
            self._hook = input_from.register_forward_pre_hook(self._capture)

    def _capture(self, module: nn.Module, args: tuple) -> None:
        self._captured = args[0] if args else None

    @property
    def num_experts(self) -> int:
        return len(self.experts)

    def add_router(self) -> int:
        like = first_parameter(self.base)
        self.routers.append(Router(self.width, self.num_experts, like))
        return len(self.routers) - 1

    def route_tokens(self, x: torch.Tensor) -> torch.Tensor:
        """The one vector per sample that the router reads, from ``x``, the tensor the mixture reads (for
        a CLIP block the captured post-attention residual stream, not the block's input): its first
        token (``bld``/``lbd``) or, for a feature map (``bchw``), its spatial mean."""
        if self.layout == "bld":
            return x[:, 0]
        if self.layout == "lbd":
            return x[0]
        return x.mean(dim=(2, 3))

    def _apply_expert(self, expert: Adapter, x: torch.Tensor) -> torch.Tensor:
        if self.layout == "bchw":
            return expert(x.permute(0, 2, 3, 1), self.training_mode).permute(0, 3, 1, 2)
        return expert(x, self.training_mode)

    def _sync_free(self, x: torch.Tensor) -> bool:
        """Whether to mix densely: ``sync_free`` when set, else on a GPU without gradients (evaluation).
        Training keeps the gathered form: there an unchosen expert must get no gradient (None, which
        AdamW skips), not a zero one (which it would decay)."""
        if self.sync_free is not None:
            return self.sync_free
        return x.is_cuda and not torch.is_grad_enabled()

    def mixture(self, x: torch.Tensor) -> torch.Tensor:
        router = self.routers[self.active_router]
        indices, weights = router(self.route_tokens(x), self.top_k, noisy=self.training_mode)
        if self.training_mode:
            self.selection_counts += torch.bincount(indices.reshape(-1), minlength=self.num_experts).to(
                self.selection_counts.device)
        batch_dim = 1 if self.layout == "lbd" else 0
        output = torch.zeros_like(x)
        shape = [1] * x.dim()
        shape[batch_dim] = -1
        if self._sync_free(x):
            # Every expert on every sample, weighted by its gate weight (zero where not chosen): no
            # host synchronisation, at num_experts / top_k times the (small) adapter compute.
            for expert_index, expert in enumerate(self.experts):
                weight = (weights * (indices == expert_index)).sum(dim=-1).to(x.dtype)
                output = output + self._apply_expert(expert, x) * weight.view(shape)
            return self.scale * output
        # Each expert runs once, on the samples that chose it; a sample's result uses only its own rows.
        for expert_index in indices.unique().tolist():
            chosen = indices == expert_index
            samples = chosen.any(dim=-1).nonzero().squeeze(-1)
            weight = (weights * chosen).sum(dim=-1)[samples].to(x.dtype)
            inputs = x.index_select(batch_dim, samples)
            update = self._apply_expert(self.experts[expert_index], inputs) * weight.view(shape)
            output.index_add_(batch_dim, samples, update)
        return self.scale * output

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        x = first_input(args, kwargs, "MoEAdapter")
        source, self._captured = (self._captured if self._captured is not None else x), None
        output = self.base(*args, **kwargs)
        if self.active_router is None:
            return output
        return add_to_output(output, self.mixture(source), "MoEAdapter", self.base)

    def added_parameters(self) -> list[nn.Parameter]:
        return list(self.experts.parameters()) + list(self.routers.parameters())

    def extra_repr(self) -> str:
        return (f"width={self.width}, layout={self.layout}, experts={self.num_experts}, top_k={self.top_k}, "
                f"routers={len(self.routers)}, scale={self.scale:g}")


def inject_moe_adapters(backend, towers: Sequence[str], num_experts: int, top_k: int, bottleneck: int = 64,
                        scale: float = 0.1, dropout: float = 0.1) -> list[MoEAdapter]:
    """Wrap every site the backend declares for ``moe`` in ``towers`` with a :class:`MoEAdapter`
    (no routers yet); returns them in order. Each layer's ``tower`` names its tower.

    ``num_experts`` experts per block, ``top_k`` of them per sample; each expert an
    :class:`~clipcl.adapt.adapter.Adapter` with a ``bottleneck``-wide hidden layer and ``dropout``
    while training; the mixture's output is multiplied by ``scale``. Parameters draw from torch's
    global generator, site by site (each expert's ``down`` weight, then its bias).
    """
    layers = []
    for site in backend.adaptation_sites("moe", tuple(towers)):
        layer = MoEAdapter(site.module, site.width, site.layout, num_experts, top_k, bottleneck, scale, dropout,
                           input_from=site.input_from)
        layer.tower = site.tower
        attach(site, layer)
        layers.append(layer)
    return layers


@contextmanager
def active_router(layers: Sequence[MoEAdapter], router: int | None, training: bool = False) -> Iterator[None]:
    """Run the layers with ``router`` (None: mixtures off, the frozen model) and noise/dropout on or off."""
    previous = [(layer.active_router, layer.training_mode) for layer in layers]
    try:
        for layer in layers:
            layer.active_router, layer.training_mode = router, training
        yield
    finally:
        for layer, (router_before, training_before) in zip(layers, previous):
            layer.active_router, layer.training_mode = router_before, training_before
