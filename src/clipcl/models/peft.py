"""Parameter-efficient tuning modules written for clipcl: LoRA and parallel adapters.

Every wrapper keeps the module it wraps as ``.base`` (frozen) and adds a few parameters whose
initial values leave the output *exactly* unchanged (the second LoRA factor and the adapter's up
projection start at zero), so a model with fresh LoRA/adapters computes the same embeddings bit
for bit as the model without them.

- :class:`LoRALinear` -- ``y = base(x) + (alpha / rank) * B(A(dropout(x)))`` on an ``nn.Linear``
  (LoRA, Hu et al. 2021: ``A`` Kaiming-uniform like an ``nn.Linear`` weight, ``B`` zeros).
- :class:`LoRAConv1x1` -- the same on a 1x1 ``nn.Conv2d`` with ``groups=1`` (the pointwise convolutions
  of CNN towers); ``A`` uses the base convolution's stride.
- :class:`LoRAMultiheadAttention` -- LoRA on the q/k/v input projection and the output projection of
  an ``nn.MultiheadAttention`` (open_clip's transformers). The low-rank updates are added to the
  projection weights and the unchanged ``nn.MultiheadAttention.forward`` runs with those weights
  (``torch.func.functional_call``), so every argument (``attn_mask``, ``key_padding_mask``,
  ``need_weights``, ``batch_first``, ``is_causal``) and every code path -- the fused inference path
  included -- behaves as in the unwrapped module.
- :class:`ParallelAdapter` -- ``y = base(x) + scale * up(dropout(relu(down(x))))`` around any module
  whose input and output widths are known (an MLP block, a transformer layer); ``up`` starts at zero.

:func:`inject` puts them into a model by dotted module name (``fnmatch`` patterns);
:data:`DEFAULT_LORA_TARGETS` and :data:`DEFAULT_ADAPTER_TARGETS` give sensible patterns for each
backend family, relative to the :class:`~clipcl.models.base.Backend` itself. Names are the
*original* module names: once a module is wrapped its parameters live under ``<name>.base``, but
patterns and the names :func:`inject` returns keep referring to ``<name>``.

Wrappers forward attribute reads they do not know to the wrapped module, so code that inspects
the wrapped layer (open_clip reads ``mlp.c_fc.weight.dtype``) keeps working.

On exactness: torch's ``matmul`` chooses its kernel for a non-contiguous 3-d input by whether the
weight requires grad, so *freezing* a weight that sees such inputs (``nn.MultiheadAttention``'s
projections do) can change results in the last bit. :class:`LoRAMultiheadAttention` therefore
marks its merged weights as requiring grad whenever its LoRA factors do, and with all four
projections adapted (the default) it reproduces the unwrapped module with trainable weights bit
for bit, in training and in inference (checked on CPU and CUDA, with and without bf16 autocast).
Projections left out of ``projections``, or an attention module frozen inside a
:class:`ParallelAdapter`, compute like frozen weights.
"""

from __future__ import annotations

import fnmatch
import math
import re
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from clipcl.models import TowerView

KINDS = ("lora", "adapter")
LORA_OPTIONS: dict[str, Any] = {"rank": 8, "alpha": 16.0, "dropout": 0.0, "projections": "qkvo"}
"""Options of ``inject(..., kind="lora")`` and their defaults (``projections`` only concerns attention)."""
ADAPTER_OPTIONS: dict[str, Any] = {"bottleneck": 64, "scale": 0.1, "dropout": 0.0,
                                   "in_features": None, "out_features": None}
"""Options of ``inject(..., kind="adapter")`` and their defaults (widths are inferred when None)."""

_STARTER_LAST_BLOCKS = "_image.classifier._blocks.1[1-5]"

DEFAULT_LORA_TARGETS: dict[str, dict[str, tuple[str, ...]]] = {
    # open_clip ViT CLIP: LoRA on every block's nn.MultiheadAttention (q, k, v and output projections).
    # ``model.text.*`` covers CustomTextCLIP models whose text tower is an open_clip transformer.
    "open_clip": {
        "image": ("model.visual.transformer.resblocks.*.attn",),
        "text": ("model.transformer.resblocks.*.attn", "model.text.transformer.resblocks.*.attn"),
    },
    # transformers CLIPModel / SiglipModel: the four attention projections of every encoder layer.
    "hf": {
        "image": ("model.vision_model.encoder.layers.*.self_attn.[qkv]_proj",
                  "model.vision_model.encoder.layers.*.self_attn.out_proj"),
        "text": ("model.text_model.encoder.layers.*.self_attn.[qkv]_proj",
                 "model.text_model.encoder.layers.*.self_attn.out_proj"),
    },
    # The offline starter. Text: MiniLM's (BERT) attention projections. Image: EfficientNet-Lite0
    # has no attention, so LoRA goes on the pointwise (1x1) expand/project convolutions of the last
    # five MBConv blocks (the two last stages, 192 and 320 channels), the 1x1 head convolution and
    # the ImageNet classifier ``_fc``. The ConSE image embedding is a function of the class
    # probabilities, so adaptation must reach the logits; the late, low-resolution layers carry the
    # semantic features and are cheap to adapt, while the early layers (generic edges and textures)
    # are left alone. Depthwise convolutions have too few weights per channel for a low-rank update.
    "starter": {
        "image": (f"{_STARTER_LAST_BLOCKS}._expand_conv", f"{_STARTER_LAST_BLOCKS}._project_conv",
                  "_image.classifier._conv_head", "_image.classifier._fc"),
        "text": ("_text.encoder.encoder.layer.*.attention.self.query",
                 "_text.encoder.encoder.layer.*.attention.self.key",
                 "_text.encoder.encoder.layer.*.attention.self.value",
                 "_text.encoder.encoder.layer.*.attention.output.dense"),
    },
}
"""LoRA target patterns per backend family and tower, over module names of the Backend."""

DEFAULT_ADAPTER_TARGETS: dict[str, dict[str, tuple[str, ...]]] = {
    # Parallel adapters beside each transformer block's MLP (the placement He et al. 2022 found best).
    "open_clip": {
        "image": ("model.visual.transformer.resblocks.*.mlp",),
        "text": ("model.transformer.resblocks.*.mlp", "model.text.transformer.resblocks.*.mlp"),
    },
    "hf": {
        "image": ("model.vision_model.encoder.layers.*.mlp",),
        "text": ("model.text_model.encoder.layers.*.mlp",),
    },
    # BERT splits its feed-forward part over two modules (the second also adds the residual and
    # normalises), so the starter's text adapters sit beside whole layers. The image tower's blocks
    # are convolutional (no feature-last width), so its adapter sits beside the classifier ``_fc``.
    "starter": {
        "image": ("_image.classifier._fc",),
        "text": ("_text.encoder.encoder.layer.[0-9]", "_text.encoder.encoder.layer.[0-9][0-9]"),
    },
}
"""Parallel-adapter target patterns per backend family and tower, over module names of the Backend."""


# --- the wrappers ------------------------------------------------------------------------------------


class PeftWrapper(nn.Module):
    """Base class of the wrappers: holds ``base`` and forwards unknown attribute reads to it."""

    def __getattr__(self, name: str) -> Any:
        try:
            return super().__getattr__(name)
        except AttributeError:
            modules = self.__dict__.get("_modules")
            base = modules.get("base") if modules is not None else None
            if base is None or name.startswith("__"):
                raise
            return getattr(base, name)

    def added_parameters(self) -> list[nn.Parameter]:
        """The parameters this wrapper added (not those of ``base``)."""
        raise NotImplementedError


def _check_rank(rank: int, alpha: float) -> None:
    if not isinstance(rank, int) or isinstance(rank, bool) or rank < 1:
        raise ValueError(f"LoRA rank must be a positive integer, got {rank!r}")
    if not math.isfinite(float(alpha)) or float(alpha) <= 0:
        raise ValueError(f"LoRA alpha must be a positive number, got {alpha!r}")


def _lora_factors(rank: int, in_features: int, out_features: int, like: torch.Tensor
                  ) -> tuple[nn.Parameter, nn.Parameter]:
    """``(A, B)`` with A (rank x in) initialised like an ``nn.Linear`` weight and B (out x rank) zeros."""
    a = torch.empty(rank, in_features, dtype=like.dtype, device=like.device)
    nn.init.kaiming_uniform_(a, a=math.sqrt(5))
    b = torch.zeros(out_features, rank, dtype=like.dtype, device=like.device)
    return nn.Parameter(a), nn.Parameter(b)


def _freeze(module: nn.Module) -> None:
    """Freeze a module's own parameters, leaving those of wrappers nested inside it trainable."""
    keep = {id(parameter) for parameter in peft_parameters(module)}
    for parameter in module.parameters():
        if id(parameter) not in keep:
            parameter.requires_grad_(False)


class LoRALinear(PeftWrapper):
    """``y = base(x) + (alpha / rank) * B(A(dropout(x)))`` around a frozen ``nn.Linear``."""

    def __init__(self, base: nn.Linear, rank: int, alpha: float, dropout: float = 0.0) -> None:
        super().__init__()
        if not isinstance(base, nn.Linear):
            raise TypeError(f"LoRALinear wraps an nn.Linear, not a {type(base).__name__}")
        _check_rank(rank, alpha)
        self.base = base
        _freeze(base)
        self.rank = rank
        self.alpha = float(alpha)
        self.scaling = self.alpha / rank
        self.lora_A, self.lora_B = _lora_factors(rank, base.in_features, base.out_features, base.weight)
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


class LoRAConv1x1(PeftWrapper):
    """LoRA around a frozen 1x1 ``nn.Conv2d`` with ``groups=1``: ``A`` is a 1x1 convolution with the
    base's stride and padding, ``B`` a 1x1 convolution, both stored as matrices."""

    def __init__(self, base: nn.Conv2d, rank: int, alpha: float, dropout: float = 0.0) -> None:
        super().__init__()
        problem = _conv1x1_problem(base)
        if problem is not None:
            raise ValueError(f"LoRAConv1x1: the convolution {problem}")
        _check_rank(rank, alpha)
        self.base = base
        _freeze(base)
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


class LoRAMultiheadAttention(PeftWrapper):
    """LoRA on the projections of a frozen ``nn.MultiheadAttention``.

    ``projections`` picks which of the query (``q``), key (``k``), value (``v``) and output (``o``)
    projections get their own rank-``rank`` update (default all four). The updates are added to the
    base weights and ``nn.MultiheadAttention.forward`` runs unchanged with them, so the wrapper takes
    exactly the base module's arguments and returns what it returns. Input dropout cannot be applied
    to a weight update, so there is no ``dropout`` here.
    """

    def __init__(self, base: nn.MultiheadAttention, rank: int, alpha: float, projections: str = "qkvo") -> None:
        super().__init__()
        if not isinstance(base, nn.MultiheadAttention):
            raise TypeError(f"LoRAMultiheadAttention wraps an nn.MultiheadAttention, not a {type(base).__name__}")
        _check_rank(rank, alpha)
        chosen = "".join(dict.fromkeys(projections))
        if not chosen or set(chosen) - set("qkvo"):
            raise ValueError(f"LoRA projections must be letters of 'qkvo', got {projections!r}")
        self.base = base
        _freeze(base)
        self.rank = rank
        self.alpha = float(alpha)
        self.scaling = self.alpha / rank
        self.projections = "".join(letter for letter in "qkvo" if letter in chosen)
        width = base.embed_dim
        in_widths = {"q": width, "k": base.kdim, "v": base.vdim, "o": width}
        like = base.out_proj.weight
        self.lora_A = nn.ParameterDict()
        self.lora_B = nn.ParameterDict()
        for letter in self.projections:
            self.lora_A[letter], self.lora_B[letter] = _lora_factors(rank, in_widths[letter], width, like)

    def _delta(self, letter: str) -> torch.Tensor:
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
        return f"rank={self.rank}, alpha={self.alpha:g}, projections={self.projections!r}"


def _first_input(args: tuple, kwargs: dict[str, Any]) -> torch.Tensor:
    if args:
        return args[0]
    for name in ("hidden_states", "x", "input", "query"):
        if name in kwargs:
            return kwargs[name]
    raise TypeError("ParallelAdapter: the wrapped module was called without a positional input or "
                    "a hidden_states/x/input/query keyword")


class ParallelAdapter(PeftWrapper):
    """``y = base(x) + scale * up(dropout(relu(down(x))))`` beside a frozen module.

    ``x`` is the module's first input (positional, or the keyword ``hidden_states``); widths refer
    to its last dimension. When the module returns a tuple (attention layers), the adapter's output
    is added to its first element. ``down`` is initialised like an ``nn.Linear``, ``up`` to zeros.
    Parameters of LoRA/adapters already inside ``base`` stay trainable.
    """

    def __init__(self, base: nn.Module, in_features: int, out_features: int, bottleneck: int = 64,
                 scale: float = 0.1, dropout: float = 0.0) -> None:
        super().__init__()
        for label, value in (("in_features", in_features), ("out_features", out_features),
                             ("bottleneck", bottleneck)):
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"ParallelAdapter {label} must be a positive integer, got {value!r}")
        self.base = base
        _freeze(base)
        self.in_features, self.out_features, self.bottleneck = in_features, out_features, bottleneck
        self.scale = float(scale)
        reference = next(base.parameters(), None)
        factory = {} if reference is None else {"dtype": reference.dtype, "device": reference.device}
        self.down = nn.Linear(in_features, bottleneck, **factory)
        self.up = nn.Linear(bottleneck, out_features, **factory)
        nn.init.zeros_(self.up.weight)
        nn.init.zeros_(self.up.bias)
        self.adapter_dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        x = _first_input(args, kwargs)
        output = self.base(*args, **kwargs)
        update = self.scale * self.up(self.adapter_dropout(F.relu(self.down(x))))
        if isinstance(output, torch.Tensor):
            return output + update
        if isinstance(output, tuple) and output and isinstance(output[0], torch.Tensor):
            return (output[0] + update, *output[1:])
        raise TypeError(f"ParallelAdapter: the wrapped {type(self.base).__name__} returned a "
                        f"{type(output).__name__}, not a tensor or a tuple starting with one")

    def added_parameters(self) -> list[nn.Parameter]:
        return [self.down.weight, self.down.bias, self.up.weight, self.up.bias]

    def extra_repr(self) -> str:
        return f"in={self.in_features}, out={self.out_features}, bottleneck={self.bottleneck}, scale={self.scale:g}"


# --- injection ---------------------------------------------------------------------------------------


def _walk(module: nn.Module, prefix: str = "", seen: set[int] | None = None
          ) -> Iterator[tuple[str, nn.Module, str, nn.Module]]:
    """``(name, parent, attribute, module)`` for every sub-module, in ``named_modules`` order.

    Names are the original ones: a wrapper is listed under the name of the module it wraps (the
    outermost wrapper when there are several), the modules inside it under that module's names,
    and the wrapper's own layers are skipped.
    """
    seen = {id(module)} if seen is None else seen
    for attribute, child in module._modules.items():
        if child is None or id(child) in seen:
            continue
        seen.add(id(child))
        name = f"{prefix}.{attribute}" if prefix else attribute
        yield name, module, attribute, child
        inner = child
        while isinstance(inner, PeftWrapper):
            inner = inner.base
        yield from _walk(inner, name, seen)


def _lora_problem(name: str, parent: nn.Module, module: nn.Module) -> str | None:
    if isinstance(module, PeftWrapper):
        return f"{name} already has a {type(module).__name__}; LoRA wraps a plain layer once"
    if isinstance(parent, nn.MultiheadAttention):
        return (f"{name} is a projection inside an nn.MultiheadAttention, which uses its weight directly; "
                "target the attention module itself")
    if isinstance(module, (nn.Linear, nn.MultiheadAttention)):
        return None
    if isinstance(module, nn.Conv2d):
        problem = _conv1x1_problem(module)
        return None if problem is None else f"{name} {problem}"
    return (f"{name} is a {type(module).__name__}; LoRA supports nn.Linear, nn.MultiheadAttention "
            "and 1x1 nn.Conv2d")


def _adapter_widths(module: nn.Module) -> tuple[int, int] | None:
    if isinstance(module, PeftWrapper):
        return _adapter_widths(module.base)
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


def _adapter_problem(name: str, parent: nn.Module, module: nn.Module, options: Mapping[str, Any]) -> str | None:
    if isinstance(parent, nn.MultiheadAttention):
        return f"{name} is a projection inside an nn.MultiheadAttention, which uses its weight directly"
    if options["in_features"] is not None and options["out_features"] is not None:
        return None
    if _adapter_widths(module) is None:
        return (f"{name} is a {type(module).__name__} whose feature widths cannot be inferred "
                "(no nn.Linear inside); pass in_features= and out_features=")
    return None


def _match_problem(kind: str, name: str, parent: nn.Module, module: nn.Module,
                   settings: Mapping[str, Any]) -> str | None:
    """Why a matched module cannot be wrapped with ``kind`` (None when it can)."""
    if isinstance(parent, TowerView):
        return (f"{name} is a direct member of a TowerView, which only refers to modules; "
                "inject into the backend (or its model) instead")
    if kind == "adapter":
        return _adapter_problem(name, parent, module, settings)
    problem = _lora_problem(name, parent, module)
    if problem is None and isinstance(module, nn.MultiheadAttention) and settings["dropout"] > 0:
        problem = f"{name} is an nn.MultiheadAttention, whose LoRA cannot apply input dropout; use dropout=0"
    return problem


def _is_candidate(kind: str, parent: nn.Module, module: nn.Module) -> bool:
    if isinstance(parent, nn.MultiheadAttention):
        return False
    if kind == "lora":
        if isinstance(module, PeftWrapper):
            return False
        return isinstance(module, (nn.Linear, nn.MultiheadAttention)) or (
            isinstance(module, nn.Conv2d) and _conv1x1_problem(module) is None)
    if isinstance(module, (nn.Linear, nn.MultiheadAttention, PeftWrapper)):
        return True
    return any(isinstance(child, nn.Linear) for child in module.children())


def _candidates(entries: Sequence[tuple[str, nn.Module, str, nn.Module]], kind: str, limit: int = 8) -> str:
    """Candidate names for ``kind`` with layer indices replaced by ``*``, deduplicated."""
    patterns: dict[str, None] = {}
    for name, parent, _, module in entries:
        if _is_candidate(kind, parent, module):
            patterns[re.sub(r"(?<=\.)\d+(?=\.|$)", "*", name)] = None
    names = list(patterns)
    if not names:
        return "none"
    shown = ", ".join(names[:limit])
    return shown + (f" (+{len(names) - limit} more)" if len(names) > limit else "")


def _options(kind: str, options: Mapping[str, Any]) -> dict[str, Any]:
    defaults = LORA_OPTIONS if kind == "lora" else ADAPTER_OPTIONS
    unknown = sorted(set(options) - set(defaults))
    if unknown:
        raise ValueError(f"inject: unknown option(s) {', '.join(unknown)} for kind {kind!r}; "
                         f"known: {', '.join(defaults)}")
    settings = {**defaults, **options}
    # Check the values here, so that a bad one fails before any module is wrapped (or frozen).
    if kind == "lora":
        _check_rank(settings["rank"], settings["alpha"])
        projections = settings["projections"]
        if not isinstance(projections, str) or not projections or set(projections) - set("qkvo"):
            raise ValueError(f"inject: projections must be letters of 'qkvo', got {projections!r}")
    else:
        for key in ("bottleneck", "in_features", "out_features"):
            value = settings[key]
            if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value < 1):
                raise ValueError(f"inject: {key} must be a positive integer, got {value!r}")
    if not 0.0 <= float(settings["dropout"]) <= 1.0:
        raise ValueError(f"inject: dropout must be between 0 and 1, got {settings['dropout']!r}")
    return settings


def _wrap(kind: str, module: nn.Module, options: Mapping[str, Any]) -> PeftWrapper:
    if kind == "lora":
        rank, alpha, dropout = options["rank"], options["alpha"], options["dropout"]
        if isinstance(module, nn.MultiheadAttention):
            return LoRAMultiheadAttention(module, rank, alpha, projections=options["projections"])
        if isinstance(module, nn.Conv2d):
            return LoRAConv1x1(module, rank, alpha, dropout)
        return LoRALinear(module, rank, alpha, dropout)
    widths = _adapter_widths(module) or (None, None)
    in_features = options["in_features"] if options["in_features"] is not None else widths[0]
    out_features = options["out_features"] if options["out_features"] is not None else widths[1]
    return ParallelAdapter(module, in_features, out_features, bottleneck=options["bottleneck"],
                           scale=options["scale"], dropout=options["dropout"])


def inject(model: nn.Module, kind: str, targets: str | Sequence[str], **options: Any) -> list[str]:
    """Wrap every sub-module of ``model`` whose name matches one of ``targets`` and return the names.

    ``kind`` is ``"lora"`` (options: ``rank``, ``alpha``, ``dropout``, ``projections``; see
    :data:`LORA_OPTIONS`) or ``"adapter"`` (options: ``bottleneck``, ``scale``, ``dropout``,
    ``in_features``, ``out_features``; see :data:`ADAPTER_OPTIONS`). ``targets`` are ``fnmatch``
    patterns over dotted module names (``*`` also crosses dots; ``"*.attn"``, ``"*.[qkv]_proj"``).
    New parameters take the global torch random generator (seed it for reproducible ``A``/``down``)
    and the wrapped modules' dtype and device. Only the wrapped modules are frozen.

    Raises ``ValueError`` (one line, naming candidate modules) when nothing matches, when a matched
    module cannot be wrapped, is already wrapped, or contains another match; the model is then left
    unchanged.
    """
    if kind not in KINDS:
        raise ValueError(f"inject: kind must be one of {', '.join(KINDS)}, got {kind!r}")
    patterns = [targets] if isinstance(targets, str) else list(targets)
    if not patterns or not all(isinstance(pattern, str) and pattern for pattern in patterns):
        raise ValueError(f"inject: targets must be non-empty name patterns, got {targets!r}")
    settings = _options(kind, options)
    entries = list(_walk(model))
    matched = [entry for entry in entries if any(fnmatch.fnmatchcase(entry[0], p) for p in patterns)]
    if not matched:
        raise ValueError(f"inject: no module of {type(model).__name__} matches {patterns}; "
                         f"candidates for {kind}: {_candidates(entries, kind)}")
    for name, parent, _, module in matched:
        problem = _match_problem(kind, name, parent, module, settings)
        if problem is not None:
            raise ValueError(f"inject: {problem} (candidates for {kind}: {_candidates(entries, kind)})")
    names = [entry[0] for entry in matched]
    for name in names:
        inner = [other for other in names if other.startswith(name + ".")]
        if inner:
            raise ValueError(f"inject: targets match both {name} and {inner[0]} inside it; make the patterns "
                             "select one of them")
    wrappers = [(parent, attribute, _wrap(kind, module, settings)) for _, parent, attribute, module in matched]
    for parent, attribute, wrapper in wrappers:
        setattr(parent, attribute, wrapper)
    return names


def default_targets(family: str | nn.Module, kind: str = "lora",
                    towers: Sequence[str] = ("image", "text")) -> list[str]:
    """The default patterns of :data:`DEFAULT_LORA_TARGETS` / :data:`DEFAULT_ADAPTER_TARGETS` for a
    backend family (``"open_clip"``, ``"hf"``, ``"starter"``, or a Backend) and some of its towers."""
    if kind not in KINDS:
        raise ValueError(f"default_targets: kind must be one of {', '.join(KINDS)}, got {kind!r}")
    name = family if isinstance(family, str) else getattr(family, "backend_name", type(family).__name__)
    table = DEFAULT_LORA_TARGETS if kind == "lora" else DEFAULT_ADAPTER_TARGETS
    if name not in table:
        raise ValueError(f"default_targets: no defaults for backend {name!r}; known: {', '.join(table)}")
    unknown = [tower for tower in towers if tower not in table[name]]
    if unknown or isinstance(towers, str):
        raise ValueError(f"default_targets: towers must be a list of 'image'/'text', got {towers!r}")
    return [pattern for tower in towers for pattern in table[name][tower]]


# --- parameters --------------------------------------------------------------------------------------


def peft_parameters(model: nn.Module) -> list[nn.Parameter]:
    """The parameters added by LoRA/adapter wrappers anywhere in ``model`` (each once, model order)."""
    seen: set[int] = set()
    parameters = []
    for module in model.modules():
        if isinstance(module, PeftWrapper):
            for parameter in module.added_parameters():
                if id(parameter) not in seen:
                    seen.add(id(parameter))
                    parameters.append(parameter)
    return parameters


def mark_only_peft_trainable(model: nn.Module) -> list[str]:
    """Set ``requires_grad`` on the added parameters only; returns the names of the trainable ones."""
    keep = {id(parameter) for parameter in peft_parameters(model)}
    trainable = []
    for name, parameter in model.named_parameters():
        parameter.requires_grad_(id(parameter) in keep)
        if id(parameter) in keep:
            trainable.append(name)
    return trainable


def peft_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The added parameters under their ``model.state_dict()`` names (detached, storage shared)."""
    keep = {id(parameter) for parameter in peft_parameters(model)}
    return {name: parameter.detach() for name, parameter in model.named_parameters() if id(parameter) in keep}


def load_peft_state_dict(model: nn.Module, state: Mapping[str, torch.Tensor]) -> None:
    """Load what :func:`peft_state_dict` returned into a model injected the same way.

    Raises ``ValueError`` when the names differ (a different injection) and leaves the model as it was.
    """
    expected = peft_state_dict(model)
    missing, unexpected = sorted(set(expected) - set(state)), sorted(set(state) - set(expected))
    if missing or unexpected:
        detail = "; ".join(part for part in (f"missing {', '.join(missing[:3])}" if missing else "",
                                             f"unexpected {', '.join(unexpected[:3])}" if unexpected else "")
                           if part)
        raise ValueError(f"load_peft_state_dict: the state does not fit this model's LoRA/adapters ({detail})")
    for name, tensor in expected.items():
        if tuple(state[name].shape) != tuple(tensor.shape):
            raise ValueError(f"load_peft_state_dict: {name} has shape {tuple(state[name].shape)}, "
                             f"the model's has {tuple(tensor.shape)}")
    with torch.no_grad():
        for name, tensor in expected.items():
            tensor.copy_(state[name])


__all__ = [
    "ADAPTER_OPTIONS",
    "DEFAULT_ADAPTER_TARGETS",
    "DEFAULT_LORA_TARGETS",
    "LORA_OPTIONS",
    "LoRAConv1x1",
    "LoRALinear",
    "LoRAMultiheadAttention",
    "ParallelAdapter",
    "PeftWrapper",
    "default_targets",
    "inject",
    "load_peft_state_dict",
    "mark_only_peft_trainable",
    "peft_parameters",
    "peft_state_dict",
]
