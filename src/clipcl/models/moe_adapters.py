"""Mixture-of-experts adapters (Yu et al., CVPR 2024, "Boosting Continual Learning of Vision-Language
Models via Mixture-of-Experts Adapters"), written for clipcl.

Each adapted block gets ``E`` experts -- ``up(dropout(relu(down(x))))`` with a bottleneck of 64, ``up``
initialised to zero, the mixture's output scaled by 0.1 -- and one or more routers. A router reads one
vector per sample (the first token of a transformer block's input; the spatial mean of a convolutional
block's input), scores the experts with noisy top-k gating (Shazeer et al. 2017: Gaussian noise whose
scale is ``softplus(x W_noise) + 0.01``, only while training), keeps the k best, and the block's output
gains the softmax-weighted sum of those k experts. Routing is per sample, so an image's output never
depends on which other images share its batch.

Where the mixture sits, per kind of block (:func:`moe_sites`):

- open_clip ``ResidualAttentionBlock`` and transformers ``CLIPEncoderLayer``: beside the MLP. Like the
  official code (AdaptFormer's placement) the experts read the residual stream *before* the MLP's
  layer norm; a forward pre-hook on that norm hands it over. Their output joins the MLP's output.
- BERT layers (the starter's MiniLM text tower): BERT normalises after the residual sum inside its
  feed-forward module, so there is no pre-norm stream to read; the mixture sits beside the whole
  layer (input: the layer's input; output added to the layer's output).
- EfficientNet MBConv blocks with an identity skip (the starter's image tower): beside the block,
  along the channel dimension (the experts are 1x1 convolutions, applied as linear maps on each
  pixel's channel vector); blocks that change resolution or width get none.

Other block types fail with a one-line error naming the type.

A fresh mixture adds exact zeros (``up`` is zero), so the adapted model computes the frozen model's
outputs bit for bit; with no active router (``active_router = None``) the mixture is skipped entirely,
which is how the strategy runs the zero-shot model without a copy.
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from clipcl.models.peft import PeftWrapper, _first_input, _freeze

LAYOUTS = ("bld", "lbd", "bchw")
"""Token layouts of a block's input: batch-first sequence, sequence-first sequence, or feature map."""


class Expert(nn.Module):
    """One adapter: ``up(dropout(relu(down(x))))`` on the last dimension; ``up`` starts at zero."""

    def __init__(self, width: int, bottleneck: int, dropout: float, like: torch.Tensor | None) -> None:
        super().__init__()
        factory = {} if like is None else {"dtype": like.dtype, "device": like.device}
        self.down = nn.Linear(width, bottleneck, **factory)
        self.up = nn.Linear(bottleneck, width, **factory)
        nn.init.zeros_(self.up.weight)
        nn.init.zeros_(self.up.bias)
        self.dropout = dropout

    def forward(self, x: torch.Tensor, training: bool) -> torch.Tensor:
        hidden = F.dropout(F.relu(self.down(x)), self.dropout, training=training and self.dropout > 0)
        return self.up(hidden)


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


class MoEAdapter(PeftWrapper):
    """A frozen block (or MLP) plus a mixture of expert adapters chosen per sample by a router."""

    def __init__(self, base: nn.Module, width: int, layout: str, num_experts: int, top_k: int,
                 bottleneck: int = 64, scale: float = 0.1, dropout: float = 0.1,
                 input_from: nn.Module | None = None) -> None:
        super().__init__()
        if layout not in LAYOUTS:
            raise ValueError(f"MoEAdapter layout must be one of {', '.join(LAYOUTS)}, got {layout!r}")
        if not 1 <= top_k <= num_experts:
            raise ValueError(f"MoE adapters need 1 <= top_k <= num_experts, got top_k={top_k}, num_experts={num_experts}")
        self.base = base
        _freeze(base)
        like = next(base.parameters(), None)
        self.width, self.layout, self.top_k, self.scale = width, layout, top_k, float(scale)
        self.experts = nn.ModuleList(Expert(width, bottleneck, dropout, like) for _ in range(num_experts))
        self.routers = nn.ModuleList()
        # How often each expert was chosen while training the current task (reset by the strategy).
        self.register_buffer("selection_counts", torch.zeros(num_experts, dtype=torch.long), persistent=False)
        # Experts frozen after earlier tasks; persistent so a resumed run knows them.
        self.register_buffer("frozen", torch.zeros(num_experts, dtype=torch.bool))
        self.active_router: int | None = None
        self.training_mode = False  # router noise and adapter dropout; set by the strategy
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
        like = next(self.base.parameters(), None)
        self.routers.append(Router(self.width, self.num_experts, like))
        return len(self.routers) - 1

    def route_tokens(self, x: torch.Tensor) -> torch.Tensor:
        """The one vector per sample that the router reads."""
        if self.layout == "bld":
            return x[:, 0]
        if self.layout == "lbd":
            return x[0]
        return x.mean(dim=(2, 3))

    def _apply_expert(self, expert: Expert, x: torch.Tensor) -> torch.Tensor:
        if self.layout == "bchw":
            return expert(x.permute(0, 2, 3, 1), self.training_mode).permute(0, 3, 1, 2)
        return expert(x, self.training_mode)

    def mixture(self, x: torch.Tensor) -> torch.Tensor:
        router = self.routers[self.active_router]
        indices, weights = router(self.route_tokens(x), self.top_k, noisy=self.training_mode)
        if self.training_mode:
            self.selection_counts += torch.bincount(indices.reshape(-1), minlength=self.num_experts).to(
                self.selection_counts.device)
        batch_dim = 1 if self.layout == "lbd" else 0
        output = torch.zeros_like(x)
        # Each expert runs once, on the samples that chose it; a sample's result uses only its own rows.
        for expert_index in indices.unique().tolist():
            chosen = indices == expert_index
            samples = chosen.any(dim=-1).nonzero().squeeze(-1)
            weight = (weights * chosen).sum(dim=-1)[samples].to(x.dtype)
            inputs = x.index_select(batch_dim, samples)
            shape = [1] * x.dim()
            shape[batch_dim] = -1
            update = self._apply_expert(self.experts[expert_index], inputs) * weight.view(shape)
            output.index_add_(batch_dim, samples, update)
        return self.scale * output

    def forward(self, *args, **kwargs):
        x = _first_input(args, kwargs)
        source, self._captured = (self._captured if self._captured is not None else x), None
        output = self.base(*args, **kwargs)
        if self.active_router is None:
            return output
        update = self.mixture(source)
        if isinstance(output, torch.Tensor):
            return output + update
        if isinstance(output, tuple) and output and isinstance(output[0], torch.Tensor):
            return (output[0] + update, *output[1:])
        raise TypeError(f"MoEAdapter: the wrapped {type(self.base).__name__} returned a {type(output).__name__}")

    def added_parameters(self) -> list[nn.Parameter]:
        return list(self.experts.parameters()) + list(self.routers.parameters())

    def extra_repr(self) -> str:
        return (f"width={self.width}, layout={self.layout}, experts={self.num_experts}, top_k={self.top_k}, "
                f"routers={len(self.routers)}, scale={self.scale:g}")


# --- where the mixtures go -----------------------------------------------------------------------------


@dataclass
class Site:
    """One place to put a mixture: ``parent.<attribute>`` is wrapped."""

    tower: str
    parent: nn.Module
    attribute: str
    width: int
    layout: str
    input_from: nn.Module | None


def _stride_one(stride) -> bool:
    values = stride if isinstance(stride, (list, tuple)) else [stride]
    return all(value == 1 for value in values)


def _parents(root: nn.Module) -> dict[int, tuple[nn.Module, str]]:
    found = {}
    for module in root.modules():
        for attribute, child in module._modules.items():
            if child is not None:
                found.setdefault(id(child), (module, attribute))
    return found


def moe_sites(backend, towers: tuple[str, ...]) -> list[Site]:
    """The blocks of ``towers`` that get a mixture, with their widths and token layouts."""
    parents = _parents(backend)
    sites = []
    for tower in towers:
        blocks = backend.image_blocks() if tower == "image" else backend.text_blocks()
        sequence_layout = backend.block_token_layout(tower)
        for block in blocks:
            if hasattr(block, "mlp") and (hasattr(block, "ln_2") or hasattr(block, "layer_norm2")):
                # open_clip ResidualAttentionBlock / transformers CLIPEncoderLayer
                norm = block.ln_2 if hasattr(block, "ln_2") else block.layer_norm2
                linears = [m for m in block.mlp.modules() if isinstance(m, nn.Linear)]
                sites.append(Site(tower, block, "mlp", linears[0].in_features, sequence_layout, norm))
            elif hasattr(block, "attention") and hasattr(block, "intermediate") and hasattr(block, "output"):
                parent, attribute = parents[id(block)]  # a BERT layer: beside the whole layer
                sites.append(Site(tower, parent, attribute, block.output.dense.out_features, "bld", None))
            elif hasattr(block, "_block_args") and hasattr(block, "_project_conv"):
                arguments = block._block_args  # EfficientNet MBConv: only blocks with an identity skip
                if (getattr(block, "id_skip", False) and _stride_one(arguments.stride)
                        and arguments.input_filters == arguments.output_filters):
                    parent, attribute = parents[id(block)]
                    sites.append(Site(tower, parent, attribute, arguments.output_filters, "bchw", None))
            else:
                raise ValueError(f"moe_adapters: the {tower} tower's {type(block).__name__} blocks are not supported "
                                 "(supported: open_clip and transformers CLIP transformer blocks, BERT layers, "
                                 "EfficientNet MBConv blocks)")
    if not sites:
        raise ValueError(f"moe_adapters: no block of the {'/'.join(towers)} tower(s) can take a mixture")
    return sites


def inject_moe_adapters(backend, towers: tuple[str, ...], num_experts: int, top_k: int, bottleneck: int = 64,
                        scale: float = 0.1, dropout: float = 0.1) -> list[MoEAdapter]:
    """Wrap every site of ``towers`` with a :class:`MoEAdapter` (no routers yet); returns them in order."""
    layers = []
    for site in moe_sites(backend, towers):
        base = getattr(site.parent, site.attribute)  # also a ModuleList's item: its name is its index
        layer = MoEAdapter(base, site.width, site.layout, num_experts, top_k, bottleneck, scale, dropout,
                           input_from=site.input_from)
        layer.tower = site.tower
        setattr(site.parent, site.attribute, layer)
        layers.append(layer)
    return layers


@contextmanager
def active_router(layers: list[MoEAdapter], router: int | None, training: bool = False):
    """Run the layers with ``router`` (None: mixtures off, the frozen model) and noise/dropout on or off."""
    previous = [(layer.active_router, layer.training_mode) for layer in layers]
    try:
        for layer in layers:
            layer.active_router, layer.training_mode = router, training
        yield
    finally:
        for layer, (router_before, training_before) in zip(layers, previous):
            layer.active_router, layer.training_mode = router_before, training_before
