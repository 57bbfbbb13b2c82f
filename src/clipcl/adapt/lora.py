"""LoRA (Hu et al. 2021) for ``nn.Linear``, 1x1 ``nn.Conv2d`` and ``nn.MultiheadAttention``.

Every wrapper keeps the module it wraps as ``.base`` (frozen) and adds two factors, ``A``
(Kaiming-uniform like an ``nn.Linear`` weight) and ``B`` (zeros), so a fresh wrapper computes its
base's output *exactly*: ``y = base(x) + (alpha / rank) * B(A(dropout(x)))``.

- :class:`LoRALinear` -- on an ``nn.Linear``.
- :class:`LoRAConv1x1` -- on a 1x1 ``nn.Conv2d`` with ``groups=1`` (the pointwise convolutions of CNN
  towers); ``A`` uses the base convolution's stride.
- :class:`LoRAMultiheadAttention` -- on the q/k/v input projection and the output projection of an
  ``nn.MultiheadAttention`` (open_clip's transformers). The low-rank updates are added to the
  projection weights and the unchanged ``nn.MultiheadAttention.forward`` runs with those weights
  (``torch.func.functional_call``), so every argument (``attn_mask``, ``key_padding_mask``,
  ``need_weights``, ``batch_first``, ``is_causal``) and every code path -- the fused inference path
  included -- behaves as in the unwrapped module.

On exactness: torch's ``matmul`` chooses its kernel for a non-contiguous 3-d input by whether the
weight requires grad (it folds the batch into one ``mm`` only then), so *freezing* a weight that sees
such inputs (``nn.MultiheadAttention``'s projections do, on its unfused path) can change results in
the last bit, on some CPUs and not others. :class:`LoRAMultiheadAttention` therefore marks its merged
weights as requiring grad whenever its LoRA factors do, and with all four projections adapted (the
default) it reproduces the unwrapped module with trainable weights bit for bit, in training and in
inference. Projections left out of ``projections``, or an attention module frozen inside a
:class:`~clipcl.adapt.adapter.ParallelAdapter`, compute like frozen weights.

Two options reproduce LifeLong-CLIP's attention LoRA (SIT, Wang et al. 2024; ``models/clip/lora.py``
@ bf20b82): ``shared_qkv_down`` gives the query, key and value projections of one attention one down
factor ``A`` (their up factors ``B`` stay separate, stacked as one ``3d x r`` matrix), and
``qkv_init="xavier"`` initialises the query/key/value ``A`` and ``B`` Xavier-uniform, so their update is
*not* zero at initialisation. Every other projection (the output projection, any plain ``nn.Linear``
or convolution) keeps Kaiming ``A`` and zero ``B``, as the official code's output projection does.
Both work on an ``nn.MultiheadAttention`` and on sibling q/k/v ``nn.Linear`` projections (names in
``QKV_NAMES``). With the defaults the exactness above and the random draws are as before.

Options (``inject(model, "lora", targets, **options)``) are the fields of :class:`LoRAConfig`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from clipcl.adapt.inject import AdaptationWrapper, freeze_base
from clipcl.config.schema import ConfigError
from clipcl.models.base import Site

QKV_INITS = ("zero_b", "xavier")
"""Valid values of ``LoRAConfig.qkv_init``."""

QKV_NAMES = {"q_proj": "q", "k_proj": "k", "v_proj": "v", "query": "q", "key": "k", "value": "v"}
"""Attribute names of separate query/key/value ``nn.Linear`` projections (transformers' CLIP, BERT)."""


@dataclass(frozen=True)
class LoRAConfig:
    """The options of LoRA; values are checked on construction."""

    rank: int = 8
    """Rank r of the update."""
    alpha: float = 16.0
    """Scaling: the update is multiplied by alpha / r."""
    dropout: float = 0.0
    """Dropout on the input of the low-rank branch (not possible on attention, whose update is merged)."""
    projections: str = "qkvo"
    """Attention only: which of the query, key, value and output projections get an update."""
    shared_qkv_down: bool = False
    """One down factor A shared by the query, key and value projections of each attention (their up
    factors stay separate), as LifeLong-CLIP's LoRA has it. False: every projection has its own A."""
    qkv_init: str = "zero_b"
    """Initialisation of the query/key/value factors: ``zero_b`` (Hu et al.: Kaiming A, zero B, so the
    update starts at exactly zero) or ``xavier`` (LifeLong-CLIP: A and B Xavier-uniform, a non-zero
    update at initialisation). Other projections always use Kaiming A and zero B."""

    def __post_init__(self) -> None:
        _check_rank(self.rank, self.alpha)
        if self.qkv_init not in QKV_INITS:
            raise ConfigError(f"inject: qkv_init must be one of {', '.join(QKV_INITS)}, got {self.qkv_init!r}")
        if not isinstance(self.shared_qkv_down, bool):
            raise ConfigError(f"inject: shared_qkv_down must be true or false, got {self.shared_qkv_down!r}")
        projections = self.projections
        if not isinstance(projections, str) or not projections or set(projections) - set("qkvo"):
            raise ConfigError(f"inject: projections must be letters of 'qkvo', got {projections!r}")
        if not 0.0 <= float(self.dropout) <= 1.0:
            raise ConfigError(f"inject: dropout must be between 0 and 1, got {self.dropout!r}")


def _check_rank(rank: int, alpha: float) -> None:
    if not isinstance(rank, int) or isinstance(rank, bool) or rank < 1:
        raise ConfigError(f"LoRA rank must be a positive integer, got {rank!r}")
    if not math.isfinite(float(alpha)) or float(alpha) <= 0:
        raise ConfigError(f"LoRA alpha must be a positive number, got {alpha!r}")


def _lora_factors(rank: int, in_features: int, out_features: int, like: torch.Tensor
                  ) -> tuple[nn.Parameter, nn.Parameter]:
    """``(A, B)`` with A (rank x in) initialised like an ``nn.Linear`` weight and B (out x rank) zeros."""
    a = torch.empty(rank, in_features, dtype=like.dtype, device=like.device)
    nn.init.kaiming_uniform_(a, a=math.sqrt(5))
    b = torch.zeros(out_features, rank, dtype=like.dtype, device=like.device)
    return nn.Parameter(a), nn.Parameter(b)


def _xavier(rows: int, columns: int, like: torch.Tensor) -> torch.Tensor:
    """A ``rows x columns`` tensor drawn Xavier-uniform (bound sqrt(6 / (rows + columns)))."""
    tensor = torch.empty(rows, columns, dtype=like.dtype, device=like.device)
    nn.init.xavier_uniform_(tensor)
    return tensor


def _qkv_factors(rank: int, in_features: int, out_features: list[int], shared: bool, init: str,
                 like: torch.Tensor) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """Down and up factors of a group of query/key/value projections reading the same input.

    Returns one A per projection (the same tensor for all when ``shared``) and one B per projection.
    With ``xavier`` and ``shared``, the B's are the row blocks of one Xavier-drawn stacked matrix
    (``sum(out) x rank``), which is what LifeLong-CLIP initialises (its fused in-projection B is one
    ``3d x r`` parameter), so the bound depends on the stacked shape, not on one block's.
    """
    count = len(out_features)
    if init == "xavier":
        if shared:
            down = _xavier(rank, in_features, like)
            stacked = _xavier(sum(out_features), rank, like)
            return [down] * count, list(torch.split(stacked, out_features))
        downs, ups = [], []
        for width in out_features:
            downs.append(_xavier(rank, in_features, like))
            ups.append(_xavier(width, rank, like))
        return downs, ups
    if shared:
        down, _ = _lora_factors(rank, in_features, 1, like)
        return [down.data] * count, [torch.zeros(width, rank, dtype=like.dtype, device=like.device)
                                     for width in out_features]
    pairs = [_lora_factors(rank, in_features, width, like) for width in out_features]
    return [a.data for a, _ in pairs], [b.data for _, b in pairs]


class LoRALinear(AdaptationWrapper):
    """``y = base(x) + (alpha / rank) * B(A(dropout(x)))`` around a frozen ``nn.Linear``."""

    def __init__(self, base: nn.Linear, rank: int, alpha: float, dropout: float = 0.0,
                 factors: tuple[nn.Parameter, nn.Parameter] | None = None) -> None:
        """``factors``: a given ``(A, B)`` pair instead of fresh Kaiming/zero ones (``A`` may be shared
        with the sibling query/key/value projections, see :class:`LoRAConfig`)."""
        super().__init__()
        if not isinstance(base, nn.Linear):
            raise TypeError(f"LoRALinear wraps an nn.Linear, not a {type(base).__name__}")
        _check_rank(rank, alpha)
        self.base = base
        freeze_base(base)
        self.rank = rank
        self.alpha = float(alpha)
        self.scaling = self.alpha / rank
        if factors is None:
            self.lora_A, self.lora_B = _lora_factors(rank, base.in_features, base.out_features, base.weight)
        else:
            self.lora_A, self.lora_B = factors
            if tuple(self.lora_A.shape) != (rank, base.in_features) or tuple(self.lora_B.shape) != (base.out_features, rank):
                raise ConfigError("LoRALinear: the given factors do not fit the layer")
        self.lora_dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()

    def delta_weight(self) -> torch.Tensor:
        """The low-rank update of the weight, ``(alpha / rank) * B @ A``."""
        return self.scaling * (self.lora_B @ self.lora_A)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        update = F.linear(F.linear(self.lora_dropout(x), self.lora_A), self.lora_B)
        return self.base(x) + self.scaling * update

    def added_parameters(self) -> list[nn.Parameter]:
        return [self.lora_A, self.lora_B]

    def extra_repr(self) -> str:
        return f"rank={self.rank}, alpha={self.alpha:g}"


def _conv1x1_problem(conv: nn.Module) -> str | None:
    """Why LoRAConv1x1 cannot wrap ``conv`` (None when it can)."""
    if not isinstance(conv, nn.Conv2d):
        return f"is a {type(conv).__name__}, not an nn.Conv2d"
    if tuple(conv.kernel_size) != (1, 1):
        return f"has a {conv.kernel_size[0]}x{conv.kernel_size[1]} kernel; LoRA supports only 1x1 convolutions"
    if conv.groups != 1:
        return f"has groups={conv.groups}; LoRA supports only groups=1 (pointwise) convolutions"
    if conv.padding_mode != "zeros":
        return f"has padding_mode={conv.padding_mode!r}; LoRA supports only zero padding"
    return None


class LoRAConv1x1(AdaptationWrapper):
    """LoRA around a frozen 1x1 ``nn.Conv2d`` with ``groups=1``: ``A`` is a 1x1 convolution with the
    base's stride and padding, ``B`` a 1x1 convolution, both stored as matrices."""

    def __init__(self, base: nn.Conv2d, rank: int, alpha: float, dropout: float = 0.0) -> None:
        super().__init__()
        problem = _conv1x1_problem(base)
        if problem is not None:
            raise ConfigError(f"LoRAConv1x1: the convolution {problem}")
        _check_rank(rank, alpha)
        self.base = base
        freeze_base(base)
        self.rank = rank
        self.alpha = float(alpha)
        self.scaling = self.alpha / rank
        self.lora_A, self.lora_B = _lora_factors(rank, base.in_channels, base.out_channels, base.weight)
        self.lora_dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()

    def delta_weight(self) -> torch.Tensor:
        """The low-rank update of the convolution weight, shaped like it (out x in x 1 x 1)."""
        return (self.scaling * (self.lora_B @ self.lora_A))[:, :, None, None]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        hidden = F.conv2d(self.lora_dropout(x), self.lora_A[:, :, None, None], None, self.base.stride,
                          self.base.padding)
        update = F.conv2d(hidden, self.lora_B[:, :, None, None])
        return self.base(x) + self.scaling * update

    def added_parameters(self) -> list[nn.Parameter]:
        return [self.lora_A, self.lora_B]

    def extra_repr(self) -> str:
        return f"rank={self.rank}, alpha={self.alpha:g}"


class LoRAMultiheadAttention(AdaptationWrapper):
    """LoRA on the projections of a frozen ``nn.MultiheadAttention``.

    ``projections`` picks which of the query (``q``), key (``k``), value (``v``) and output (``o``)
    projections get their own rank-``rank`` update (default all four). The updates are added to the
    base weights and ``nn.MultiheadAttention.forward`` runs unchanged with them, so the wrapper takes
    exactly the base module's arguments and returns what it returns. Input dropout cannot be applied
    to a weight update, so there is no ``dropout`` here.

    ``shared_qkv_down`` and ``qkv_init`` are LifeLong-CLIP's options (see the module docstring and
    :class:`LoRAConfig`). With ``shared_qkv_down`` the factors are ``lora_A["qkv"]`` (``r x d``, one
    for all three) and ``lora_B["qkv"]`` (the chosen projections' up factors stacked, ``3d x r`` for
    all three), so the update of projection ``p`` is ``(alpha / r) * B_p @ A`` with ``B_p`` its block.
    """

    def __init__(self, base: nn.MultiheadAttention, rank: int, alpha: float, projections: str = "qkvo",
                 shared_qkv_down: bool = False, qkv_init: str = "zero_b") -> None:
        super().__init__()
        if not isinstance(base, nn.MultiheadAttention):
            raise TypeError(f"LoRAMultiheadAttention wraps an nn.MultiheadAttention, not a {type(base).__name__}")
        _check_rank(rank, alpha)
        chosen = "".join(dict.fromkeys(projections))
        if not chosen or set(chosen) - set("qkvo"):
            raise ConfigError(f"LoRA projections must be letters of 'qkvo', got {projections!r}")
        if qkv_init not in QKV_INITS:
            raise ConfigError(f"LoRA qkv_init must be one of {', '.join(QKV_INITS)}, got {qkv_init!r}")
        self.base = base
        freeze_base(base)
        self.rank = rank
        self.alpha = float(alpha)
        self.scaling = self.alpha / rank
        self.projections = "".join(letter for letter in "qkvo" if letter in chosen)
        self.qkv_init = qkv_init
        width = base.embed_dim
        in_widths = {"q": width, "k": base.kdim, "v": base.vdim, "o": width}
        like = base.out_proj.weight
        self.lora_A = nn.ParameterDict()
        self.lora_B = nn.ParameterDict()
        qkv = [letter for letter in self.projections if letter != "o"]
        self.shared_qkv = "".join(qkv) if shared_qkv_down and qkv else ""
        if self.shared_qkv:
            if len({in_widths[letter] for letter in qkv}) != 1:
                raise ConfigError("LoRA shared_qkv_down needs query, key and value inputs of one width; this "
                                  f"attention has kdim={base.kdim}, vdim={base.vdim}, embed_dim={width}")
            downs, ups = _qkv_factors(rank, width, [width] * len(qkv), True, qkv_init, like)
            self.lora_A["qkv"] = nn.Parameter(downs[0])
            self.lora_B["qkv"] = nn.Parameter(torch.cat(ups))
        elif qkv_init == "xavier":
            for letter in qkv:
                downs, ups = _qkv_factors(rank, in_widths[letter], [width], False, qkv_init, like)
                self.lora_A[letter], self.lora_B[letter] = nn.Parameter(downs[0]), nn.Parameter(ups[0])
        else:
            # The original draws, in the original order (q, k, v, then o): unchanged numbers.
            for letter in qkv:
                self.lora_A[letter], self.lora_B[letter] = _lora_factors(rank, in_widths[letter], width, like)
        if "o" in self.projections:
            self.lora_A["o"], self.lora_B["o"] = _lora_factors(rank, width, width, like)

    def _delta(self, letter: str) -> torch.Tensor:
        if letter in self.shared_qkv:
            width = self.base.embed_dim
            block = self.shared_qkv.index(letter)
            up = self.lora_B["qkv"][block * width: (block + 1) * width]
            return self.scaling * (up @ self.lora_A["qkv"])
        return self.scaling * (self.lora_B[letter] @ self.lora_A[letter])

    def merged_parameters(self) -> dict[str, torch.Tensor]:
        """The base's projection weights plus their LoRA updates, keyed by the base's parameter names."""
        base = self.base
        merged: dict[str, torch.Tensor] = {}
        qkv = [letter for letter in "qkv" if letter in self.projections]
        if qkv and base._qkv_same_embed_dim:
            width = base.embed_dim
            parts = [self._delta(letter) if letter in self.projections else
                     base.in_proj_weight.new_zeros(width, width) for letter in "qkv"]
            merged["in_proj_weight"] = base.in_proj_weight + torch.cat(parts)
        else:
            for letter in qkv:
                name = f"{letter}_proj_weight"
                merged[name] = getattr(base, name) + self._delta(letter)
        if "o" in self.projections:
            merged["out_proj.weight"] = base.out_proj.weight + self._delta("o")
        if not torch.is_grad_enabled():
            # A merged weight stands in for a parameter, so it requires grad exactly when one of its
            # sources does -- also under no_grad, where autograd would not mark it. torch's matmul
            # picks its kernel by the weight's requires_grad (it folds the batch of a transposed
            # input into one mm only then), and nn.MultiheadAttention's projections see transposed
            # inputs; this keeps the arithmetic identical to an unwrapped module with trainable weights.
            sources = [*self.lora_A.values(), *self.lora_B.values()]
            if any(parameter.requires_grad for parameter in sources):
                for tensor in merged.values():
                    tensor.requires_grad_(True)
        return merged

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        return torch.func.functional_call(self.base, self.merged_parameters(), args, kwargs)

    def added_parameters(self) -> list[nn.Parameter]:
        return [*self.lora_A.values(), *self.lora_B.values()]

    def extra_repr(self) -> str:
        shared = f", shared_qkv_down={self.shared_qkv!r}" if self.shared_qkv else ""
        init = f", qkv_init={self.qkv_init!r}" if self.qkv_init != "zero_b" else ""
        return f"rank={self.rank}, alpha={self.alpha:g}, projections={self.projections!r}{shared}{init}"


# --- the kind, for inject() ------------------------------------------------------------------------


class _LoRAKind:
    """How :func:`~clipcl.adapt.inject.inject_by_name` puts LoRA into a model."""

    name = "lora"
    config = LoRAConfig

    def problem(self, site: Site, settings: LoRAConfig) -> str | None:
        module = site.module
        if isinstance(module, AdaptationWrapper):
            return f"{site.name} already has a {type(module).__name__}; LoRA wraps a plain layer once"
        if isinstance(module, nn.MultiheadAttention):
            if settings.dropout > 0:
                return (f"{site.name} is an nn.MultiheadAttention, whose LoRA cannot apply input dropout; "
                        "use dropout=0")
            return None
        if isinstance(module, nn.Linear):
            return None
        if isinstance(module, nn.Conv2d):
            problem = _conv1x1_problem(module)
            return None if problem is None else f"{site.name} {problem}"
        return (f"{site.name} is a {type(module).__name__}; LoRA supports nn.Linear, nn.MultiheadAttention "
                "and 1x1 nn.Conv2d")

    def is_candidate(self, site: Site) -> bool:
        module = site.module
        if isinstance(module, AdaptationWrapper):
            return False
        return isinstance(module, (nn.Linear, nn.MultiheadAttention)) or (
            isinstance(module, nn.Conv2d) and _conv1x1_problem(module) is None)

    def wrap(self, module: nn.Module, settings: LoRAConfig) -> AdaptationWrapper:
        if isinstance(module, nn.MultiheadAttention):
            return LoRAMultiheadAttention(module, settings.rank, settings.alpha, projections=settings.projections,
                                          shared_qkv_down=settings.shared_qkv_down, qkv_init=settings.qkv_init)
        if isinstance(module, nn.Conv2d):
            return LoRAConv1x1(module, settings.rank, settings.alpha, settings.dropout)
        return LoRALinear(module, settings.rank, settings.alpha, settings.dropout)

    def wrap_sites(self, sites: list[Site], settings: LoRAConfig) -> list[AdaptationWrapper]:
        """Wrappers for all matched sites, in order. With the default options each site is wrapped on
        its own (the draws of before). Otherwise separate query/key/value ``nn.Linear`` siblings (one
        parent module, names in ``QKV_NAMES``) are wrapped as a group: one shared ``A`` with
        ``shared_qkv_down``, LifeLong-CLIP's Xavier factors with ``qkv_init="xavier"``."""
        if not settings.shared_qkv_down and settings.qkv_init == "zero_b":
            return [self.wrap(site.module, settings) for site in sites]
        groups: dict[int, list[int]] = {}
        for number, site in enumerate(sites):
            if isinstance(site.module, nn.Linear) and site.attribute in QKV_NAMES:
                groups.setdefault(id(site.parent), []).append(number)
        factors: dict[int, tuple[nn.Parameter, nn.Parameter]] = {}
        for members in groups.values():
            modules = [sites[number].module for number in members]
            in_widths = {module.in_features for module in modules}
            if settings.shared_qkv_down and len(in_widths) != 1:
                raise ConfigError(f"inject: shared_qkv_down needs the query/key/value projections of "
                                  f"{sites[members[0]].name.rsplit('.', 1)[0]} to read one width, got {sorted(in_widths)}")
            if settings.shared_qkv_down:
                downs, ups = _qkv_factors(settings.rank, modules[0].in_features,
                                          [module.out_features for module in modules], True, settings.qkv_init,
                                          modules[0].weight)
                shared_down = nn.Parameter(downs[0])
                for number, up in zip(members, ups):
                    factors[number] = (shared_down, nn.Parameter(up.clone()))
            else:
                for number, module in zip(members, modules):
                    downs, ups = _qkv_factors(settings.rank, module.in_features, [module.out_features], False,
                                              settings.qkv_init, module.weight)
                    factors[number] = (nn.Parameter(downs[0]), nn.Parameter(ups[0]))
        wrappers: list[AdaptationWrapper] = []
        for number, site in enumerate(sites):
            if number in factors:
                wrappers.append(LoRALinear(site.module, settings.rank, settings.alpha, settings.dropout,
                                           factors=factors[number]))
            else:
                wrappers.append(self.wrap(site.module, settings))
        return wrappers


LORA = _LoRAKind()
"""The LoRA kind for :func:`~clipcl.adapt.inject.inject_by_name`."""

__all__ = ["LORA", "LoRAConfig", "LoRAConv1x1", "LoRALinear", "LoRAMultiheadAttention"]
