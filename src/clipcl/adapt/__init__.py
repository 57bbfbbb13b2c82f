"""Adaptation modules, put into a model by one mechanism (:mod:`clipcl.adapt.inject`).

| kind | module | sites | options |
|---|---|---|---|
| ``lora`` | :mod:`~clipcl.adapt.lora` | name patterns (``backend.adaptation_targets("lora")``) | :class:`LoRAConfig` |
| ``adapter`` | :mod:`~clipcl.adapt.adapter` | name patterns (``backend.adaptation_targets("adapter")``; ``"adapter_sequential"`` for LifeLong-CLIP's placement) | :class:`AdapterConfig` |
| MoE experts and routers | :mod:`~clipcl.adapt.moe` | ``backend.adaptation_sites("moe")`` | arguments of :func:`inject_moe_adapters` |
| prompt tokens | :mod:`~clipcl.adapt.prompts` | ``backend.adaptation_sites("prompts")`` | :class:`PromptConfig` |
| per-task prompt tokens (CoLeCLIP) | :mod:`~clipcl.adapt.task_prompts` | ``backend.encode_image_with_task_prompts`` (width: ``backend.image_token_width``) | :class:`TaskPromptConfig` |
| grown token embeddings | :mod:`~clipcl.adapt.tokens` | ``backend.token_embedding_site()`` | :class:`TokenGrowthConfig` |

Every module keeps what it wraps as ``.base`` and starts out computing exactly what the model did
without it (zero-initialised last layers, no prompts, no added ids). Per-task prompts wrap nothing:
the backend runs them beside its unchanged image tower, whose class-token feature stays the zero-shot one. New parameters draw from torch's
global generator and take the wrapped module's dtype and device.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from torch import nn

from clipcl.adapt.adapter import ADAPTER, Adapter, AdapterConfig, ParallelAdapter, SequentialAdapter
from clipcl.adapt.inject import (
    AdaptationWrapper,
    added_parameters,
    attach,
    find_sites,
    inject_by_name,
    settings_from_options,
)
from clipcl.adapt.lora import LORA, LoRAConfig, LoRAConv1x1, LoRALinear, LoRAMultiheadAttention
from clipcl.adapt.moe import MoEAdapter, Router, active_router, inject_moe_adapters
from clipcl.adapt.prompts import PromptConfig, PromptTokens, inject_prompts
from clipcl.adapt.task_prompts import TaskPromptConfig, TaskPrompts, task_prompt_mask
from clipcl.adapt.tokens import ExpandableEmbedding, TokenGrowthConfig, grow_token_embedding
from clipcl.config.schema import ConfigError

NAMED_KINDS = {"lora": LORA, "adapter": ADAPTER}
"""The kinds :func:`inject` puts in by module name."""
KINDS = tuple(NAMED_KINDS)


def inject(model: nn.Module, kind: str, targets: str | Sequence[str], **options: Any) -> list[str]:
    """Wrap every sub-module of ``model`` whose name matches one of ``targets`` and return the names.

    ``kind`` is ``"lora"`` (options: the fields of :class:`LoRAConfig`) or ``"adapter"`` (the fields
    of :class:`AdapterConfig`). ``targets`` are ``fnmatch`` patterns over dotted module names (``*``
    also crosses dots). Only the wrapped modules are frozen. Raises ``ValueError`` (one line, naming
    candidate modules) for a bad kind, option, or target; the model is then left unchanged.
    """
    if kind not in NAMED_KINDS:
        raise ConfigError(f"inject: kind must be one of {', '.join(KINDS)}, got {kind!r}")
    spec = NAMED_KINDS[kind]
    return inject_by_name(model, spec, targets, settings_from_options(spec, options))


def default_targets(backend, kind: str = "lora", towers: Sequence[str] = ("image", "text")) -> list[str]:
    """The backend's own default patterns for ``kind`` in ``towers`` (``backend.adaptation_targets``)."""
    if kind not in NAMED_KINDS:
        raise ConfigError(f"default_targets: kind must be one of {', '.join(KINDS)}, got {kind!r}")
    return backend.adaptation_targets(kind, towers)


__all__ = [
    "KINDS",
    "AdaptationWrapper",
    "Adapter",
    "AdapterConfig",
    "ExpandableEmbedding",
    "LoRAConfig",
    "LoRAConv1x1",
    "LoRALinear",
    "LoRAMultiheadAttention",
    "MoEAdapter",
    "ParallelAdapter",
    "PromptConfig",
    "PromptTokens",
    "Router",
    "SequentialAdapter",
    "TaskPromptConfig",
    "TaskPrompts",
    "TokenGrowthConfig",
    "active_router",
    "added_parameters",
    "attach",
    "default_targets",
    "find_sites",
    "grow_token_embedding",
    "inject",
    "inject_moe_adapters",
    "inject_prompts",
    "task_prompt_mask",
]
