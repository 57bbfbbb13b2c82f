"""CoLeCLIP's per-task prompt tokens run through a ViT image tower (open_clip and transformers CLIP).

``encode_image_with_task_prompts(images, prompts, per_task)`` returns ``[N, 1 + T, D]``: at index 0
the class-token feature, at ``1 + t`` task ``t``'s prompt output (projected, unnormalised; a group of
``per_task > 1`` tokens is averaged after the projection, as CoLeCLIP.py:327 does). What the official
code does (model/backbone/clip.py) and how it is done here:

- The prompts enter before the pre-norm (clip.py:329 concatenates them, clip.py:332 applies
  ``ln_pre``), after the position embedding, so they carry none (clip.py:323).
- In every block a prompt of task ``j`` attends to the prompts of tasks ``0..j`` and to all of the
  tower's tokens, the class token included; the class and patch tokens attend to no prompt
  (the mask of clip.py:225-231; :func:`~clipcl.adapt.task_prompts.task_prompt_mask`).
- The outputs of the prompts and the class token go through the final norm and the projection
  (clip.py:346-349).

**Index 0 is bit-identical to ``encode_image`` by construction.** The official code runs one masked
attention over ``[prompts, class, patches]``; since the class and patch tokens attend to no prompt,
their values are mathematically those of the plain tower, but a longer sequence changes the shapes
the kernels see (and so their blocking and rounding), so they would not be equal bit for bit. Here
the tower runs *unchanged*: ``backend.encode_image(images)`` is called as it is, and index 0 is its
result. Forward pre-hooks on the blocks only read each block's input (the class and patch tokens
entering that block). The prompts are then computed beside it, from those inputs, with each
block's own modules: queries from the pre-normed prompts, keys and values from the pre-normed
``[prompts, class, patches]`` of that block, the mask above, the block's output projection,
residual, MLP; then the tower's final norm and projection. Nothing the tower computes depends on
the prompts, so perturbing them cannot move index 0; the prompts' own outputs equal the official
full-sequence computation up to rounding.

That the block inputs are all the prompts need rests on what the towers do between blocks, checked
against open_clip 3.3 ``Transformer.forward`` and transformers 5 ``CLIPEncoder.forward``: nothing
(a plain loop over the blocks; open_clip transposes only when built sequence-first, which
:func:`open_clip_task_features` refuses; gradient checkpointing re-runs a block in backward, after
the hooks are removed). open_clip's patch dropout, when active in training, happens before the
first block, so the prompts see the patches the tower kept.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from clipcl.adapt.task_prompts import task_prompt_mask
from clipcl.config import ConfigError


def check_prompts(prompts: torch.Tensor, per_task: int, width: int, where: str) -> int:
    """The number of tasks in ``prompts`` ``[T * per_task, width]``; one clear error otherwise."""
    if isinstance(per_task, bool) or not isinstance(per_task, int) or per_task < 1:
        raise ConfigError(f"task prompts: per_task must be a positive integer, got {per_task!r}")
    if prompts.ndim != 2 or prompts.shape[1] != width or prompts.shape[0] % per_task:
        raise ConfigError(f"task prompts: {where} takes prompts of shape [tasks * {per_task}, {width}], "
                          f"got {tuple(prompts.shape)}")
    return prompts.shape[0] // per_task


def run_capturing_inputs(blocks: Sequence[nn.Module], run: Callable[[], torch.Tensor]
                         ) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """``run()`` unchanged, and the first input of each of ``blocks`` as it was called."""
    seen: dict[int, torch.Tensor] = {}

    def make_hook(index: int) -> Callable[..., None]:
        def hook(_module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
            seen.setdefault(index, args[0] if args else kwargs["hidden_states"])
        return hook

    handles = [block.register_forward_pre_hook(make_hook(index), with_kwargs=True)
               for index, block in enumerate(blocks)]
    try:
        output = run()
    finally:
        for handle in handles:
            handle.remove()
    if len(seen) != len(blocks):
        raise RuntimeError(f"task prompts: only {len(seen)} of the tower's {len(blocks)} blocks ran")
    return output, [seen[index] for index in range(len(blocks))]


def _group_mean(outputs: torch.Tensor, per_task: int) -> torch.Tensor:
    """``[N, T * per_task, D] -> [N, T, D]``: each task's tokens averaged (CoLeCLIP.py:327)."""
    if per_task == 1:
        return outputs
    return outputs.reshape(outputs.shape[0], -1, per_task, outputs.shape[-1]).mean(dim=2)


def _start(prompts: torch.Tensor, batch: int, like: torch.Tensor) -> torch.Tensor:
    return prompts.to(like.dtype).unsqueeze(0).expand(batch, -1, -1)


# --- open_clip ---------------------------------------------------------------------------------------


def _check_open_clip_tower(visual: nn.Module) -> None:
    from open_clip.transformer import ResidualAttentionBlock

    name = type(visual).__name__
    if not (hasattr(visual, "class_embedding") and hasattr(getattr(visual, "transformer", None), "resblocks")):
        raise ConfigError(f"task prompts: the open_clip image tower {name} is not a ViT with a class token "
                          "(supported: open_clip VisionTransformer)")
    if getattr(visual, "attn_pool", None) is not None or getattr(visual, "pool_type", "tok") != "tok":
        raise ConfigError(f"task prompts: the open_clip {name} pools with an attention pooler or over the patches; "
                          "supported: the class-token pooling of CLIP ViTs (pool_type 'tok', no attn_pool)")
    if not getattr(visual.transformer, "batch_first", True):
        raise ConfigError(f"task prompts: the open_clip {name} runs its blocks sequence-first; supported: batch-first")
    for block in visual.transformer.resblocks:
        if type(block) is not ResidualAttentionBlock or hasattr(block, "ln_1_kv"):
            raise ConfigError(f"task prompts: the open_clip {name} has {type(block).__name__} blocks; "
                              "supported: open_clip's ResidualAttentionBlock")


def open_clip_task_features(visual: nn.Module, encode_image: Callable[[torch.Tensor], torch.Tensor],
                            images: torch.Tensor, prompts: torch.Tensor, per_task: int) -> torch.Tensor:
    """``[N, 1 + T, D]`` for an open_clip ``VisionTransformer`` (see the module docstring)."""
    _check_open_clip_tower(visual)
    num_tasks = check_prompts(prompts, per_task, int(visual.class_embedding.shape[-1]), "the open_clip ViT")
    blocks = list(visual.transformer.resblocks)
    class_feature, inputs = run_capturing_inputs(blocks, lambda: encode_image(images))
    if num_tasks == 0:
        return class_feature.unsqueeze(1)
    # The pre-norm, as the official code applies it to the prompts (a wrapper that inserts generic
    # prompt tokens is skipped: those belong to the tower's sequence, which the hooks already read).
    ln_pre = visual.ln_pre
    ln_pre = getattr(ln_pre, "base", ln_pre) if hasattr(ln_pre, "insert") else ln_pre
    tokens = ln_pre(_start(prompts, images.shape[0], inputs[0]))
    mask = task_prompt_mask(num_tasks, per_task, inputs[0].shape[1], dtype=tokens.dtype, device=tokens.device)
    for block, sequence in zip(blocks, inputs):
        normed = block.ln_1(tokens)
        keys = torch.cat([normed, block.ln_1(sequence)], dim=1)
        tokens = tokens + block.ls_1(block.attention(q_x=normed, k_x=keys, v_x=keys, attn_mask=mask))
        tokens = tokens + block.ls_2(block.mlp(block.ln_2(tokens)))
    tokens = visual.ln_post(tokens)
    if visual.proj is not None:
        tokens = tokens @ visual.proj
    return torch.cat([class_feature.unsqueeze(1), _group_mean(tokens, per_task).to(class_feature.dtype)], dim=1)


# --- transformers CLIP -------------------------------------------------------------------------------


def _check_hf_tower(vision: nn.Module, model_type: str) -> list[nn.Module]:
    layers = list(getattr(getattr(vision, "encoder", None), "layers", []))
    if not hasattr(vision, "pre_layrnorm") or not layers:
        raise ConfigError(f"task prompts: the {model_type} image tower {type(vision).__name__} has no class token "
                          "(SigLIP pools with an attention head); supported: CLIP vision towers")
    parts = ("layer_norm1", "layer_norm2", "mlp", "self_attn")
    projections = ("q_proj", "k_proj", "v_proj", "out_proj")
    for layer in layers:
        if not all(hasattr(layer, part) for part in parts) or \
                not all(hasattr(layer.self_attn, part) for part in projections):
            raise ConfigError(f"task prompts: the {model_type} image tower has {type(layer).__name__} layers; "
                              "supported: CLIP encoder layers")
    return layers


def _hf_prompt_attention(attention: nn.Module, queries: torch.Tensor, keys: torch.Tensor,
                         mask: torch.Tensor) -> torch.Tensor:
    """CLIPAttention's computation with queries from the prompts only (its own projections and scale)."""
    batch, length, width = queries.shape
    heads = attention.num_heads

    def split(values: torch.Tensor) -> torch.Tensor:
        return values.view(batch, values.shape[1], heads, -1).transpose(1, 2)

    output = F.scaled_dot_product_attention(
        split(attention.q_proj(queries)), split(attention.k_proj(keys)), split(attention.v_proj(keys)),
        attn_mask=mask, dropout_p=float(attention.dropout) if attention.training else 0.0, scale=attention.scale)
    return attention.out_proj(output.transpose(1, 2).reshape(batch, length, width))


def hf_task_features(model: nn.Module, model_type: str, encode_image: Callable[[torch.Tensor], torch.Tensor],
                     images: torch.Tensor, prompts: torch.Tensor, per_task: int) -> torch.Tensor:
    """``[N, 1 + T, D]`` for a transformers ``CLIPModel`` (see the module docstring)."""
    vision = model.vision_model
    layers = _check_hf_tower(vision, model_type)
    num_tasks = check_prompts(prompts, per_task, int(vision.config.hidden_size), f"the {model_type} vision tower")
    class_feature, inputs = run_capturing_inputs(layers, lambda: encode_image(images))
    if num_tasks == 0:
        return class_feature.unsqueeze(1)
    pre_norm = vision.pre_layrnorm
    pre_norm = getattr(pre_norm, "base", pre_norm) if hasattr(pre_norm, "insert") else pre_norm
    tokens = pre_norm(_start(prompts, images.shape[0], inputs[0]))
    mask = task_prompt_mask(num_tasks, per_task, inputs[0].shape[1], dtype=tokens.dtype, device=tokens.device)
    for layer, sequence in zip(layers, inputs):
        normed = layer.layer_norm1(tokens)
        keys = torch.cat([normed, layer.layer_norm1(sequence)], dim=1)
        tokens = tokens + _hf_prompt_attention(layer.self_attn, normed, keys, mask)
        tokens = tokens + layer.mlp(layer.layer_norm2(tokens))
    tokens = vision.post_layernorm(tokens)
    projection = getattr(model, "visual_projection", None)
    if projection is not None:
        tokens = projection(tokens)
    return torch.cat([class_feature.unsqueeze(1), _group_mean(tokens, per_task).to(class_feature.dtype)], dim=1)


__all__ = ["check_prompts", "hf_task_features", "open_clip_task_features", "run_capturing_inputs"]
