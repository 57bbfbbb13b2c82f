"""The open_clip backend: any open_clip architecture, by name or by a JSON model config file.

``model.name`` is one of

- a built-in architecture name (``ViT-B-16``; ``clipcl list --open-clip-models`` lists them);
- a path to a JSON model config (``{"embed_dim": ..., "vision_cfg": ..., "text_cfg": ...}``, the
  format of open_clip's own ``model_configs``). It is registered with open_clip
  (``open_clip.add_model_config``) and then built by its file stem through the same
  ``create_model_and_transforms`` path as a built-in name;
- a directory holding an ``open_clip_config.json`` and weights (open_clip's ``local-dir:`` format,
  as pushed to the hub); ``model.pretrained`` is then not used.

``model.pretrained`` is a tag (``openai``, ``laion2b_s34b_b88k``; downloads once) or a local checkpoint
file: ``.safetensors``, or a ``.pt``/``.pth``/``.bin`` state dict, read with ``weights_only=True``
(open_clip 3 does so by default; we pass it explicitly so a pickle never runs code).
"""

from __future__ import annotations

import hashlib
import json
import pickle
import re
from collections.abc import Sequence
from difflib import get_close_matches
from pathlib import Path
from typing import Any, ClassVar

import open_clip
import torch
from torch import nn

from clipcl.config import ConfigError
from clipcl.models import TowerView, find_blocks
from clipcl.models.base import Backend, Site, is_bert_layer, whole_layer_site

CHECKPOINT_SUFFIXES = (".safetensors", ".pt", ".pth", ".bin", ".ckpt")
_CONFIG_KEYS = ("embed_dim", "vision_cfg", "text_cfg")
# Names of top-level parameters of open_clip models that belong to neither tower.
_SHARED_PARAMETERS = ("logit_scale", "logit_bias")

# JSON config files this process registered with open_clip: stem -> (path, size, mtime). A file is
# registered again only when it changed or another file with the same stem was registered since,
# so the newest registration of a stem always wins (open_clip rescans its paths in order).
_registered: dict[str, tuple[str, int, int]] = {}


def _stat_key(path: Path) -> tuple[str, int, int]:
    stat = path.stat()
    return str(path), stat.st_size, stat.st_mtime_ns


def register_config_file(path: str | Path) -> str:
    """Register a JSON model config with open_clip; returns the architecture name (the file stem).

    Raises ``FileNotFoundError`` for a missing file and :class:`ConfigError` for a file that is
    not an open_clip model config or whose stem would shadow a built-in architecture.
    """
    path = Path(path).expanduser().resolve()
    if not path.is_file():
        raise FileNotFoundError(f"model.name: open_clip model config file {path} does not exist")
    try:
        data = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise ConfigError(f"model.name: {path} is not valid JSON ({error})") from None
    if isinstance(data, dict) and "model_cfg" in data:
        raise ConfigError(f"model.name: {path} is an open_clip_config.json (hub format); "
                          f"pass its directory {path.parent} as model.name instead")
    missing = [key for key in _CONFIG_KEYS if not isinstance(data, dict) or key not in data]
    if missing:
        raise ConfigError(f"model.name: {path} is not an open_clip model config (missing {', '.join(missing)})")
    stem = path.stem
    if stem not in _registered and stem in open_clip.list_models():
        raise ConfigError(f"model.name: config file {path} is named like open_clip's built-in architecture "
                          f"{stem!r}; rename the file so both stay usable")
    key = _stat_key(path)
    if _registered.get(stem) != key:
        open_clip.add_model_config(path)
        _registered[stem] = key
    return stem


def _is_path_like(text: str) -> bool:
    return text.endswith(".json") or text.startswith(("/", ".", "~")) or Path(text).expanduser().exists()


def _config_digest(config: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(config, sort_keys=True).encode()).hexdigest()[:10]


def _resolve_name(name: str) -> tuple[str, str]:
    """``(name for open_clip, architecture label for model_id)`` for a model.name value."""
    if name.startswith(("hf-hub:", "local-dir:")):
        return name, name
    if _is_path_like(name):
        path = Path(name).expanduser()
        if path.is_dir():
            if not (path / "open_clip_config.json").is_file():
                raise FileNotFoundError(f"model.name: directory {path} holds no open_clip_config.json")
            return f"local-dir:{path.resolve()}", f"local-dir:{path.resolve().name}"
        if not path.exists():
            raise FileNotFoundError(f"model.name: open_clip model config file {path} does not exist")
        stem = register_config_file(path)
        return stem, f"{stem}#{_config_digest(open_clip.get_model_config(stem))}"
    cleaned = name.replace("/", "-")  # open_clip accepts ViT-B/16 for ViT-B-16
    if cleaned not in open_clip.list_models():
        close = get_close_matches(cleaned, open_clip.list_models(), n=3)
        hint = f"; did you mean {', '.join(close)}?" if close else "; `clipcl list --open-clip-models` lists them"
        raise ConfigError(f"model.name: {name!r} is not an open_clip architecture or an existing JSON config file"
                          + hint)
    return cleaned, cleaned


def _resolve_pretrained(architecture: str, pretrained: str | None) -> tuple[str | None, str]:
    """``(value for open_clip, weights label for model_id)``; checks files and tags before open_clip does."""
    if not pretrained:
        return None, "random"
    path = Path(pretrained).expanduser()
    if path.is_file():
        return str(path.resolve()), path.name
    if architecture.startswith("local-dir:"):
        raise ConfigError("model.pretrained is not used when model.name is an open_clip directory: "
                          "the weights are the checkpoint inside it")
    if path.is_dir():
        raise FileNotFoundError(f"model.pretrained: {path} is a directory, not a checkpoint file")
    if path.suffix in CHECKPOINT_SUFFIXES or "/" in pretrained:
        raise FileNotFoundError(f"model.pretrained: checkpoint file {path} does not exist")
    tags = open_clip.list_pretrained_tags_by_model(architecture)
    if pretrained not in tags:
        known = ", ".join(tags) if tags else "none (use a local checkpoint file)"
        raise ConfigError(f"model.pretrained: {pretrained!r} is neither a local checkpoint file nor a pretrained "
                          f"tag of {architecture}; its tags: {known}")
    return pretrained, pretrained


def _first_line(error: BaseException) -> str:
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__


class OpenClipBackend(Backend):
    """An open_clip model (``CLIP`` or ``CustomTextCLIP``) behind the :class:`Backend` interface.

    The model is ``self.model``, so parameter names read ``model.visual...``, ``model.transformer...``.

    Args:
        name: an architecture name, a JSON model config file, or an open_clip directory (see module doc).
        pretrained: a pretrained tag or a local checkpoint file; None keeps the random initialisation
            (drawn from torch's global generator, so seed it first).
        image_size: build the image tower for this input resolution instead of the config's
            (open_clip resizes pretrained position embeddings to fit).
        cache_dir: where open_clip keeps downloaded weights (default: the Hugging Face cache).
    """

    backend_name = "open_clip"
    # ``model.text.*`` covers CustomTextCLIP models whose text tower is an open_clip transformer.
    ADAPTATION_TARGETS: ClassVar[dict[str, dict[str, tuple[str, ...]]]] = {
        # LoRA on every block's nn.MultiheadAttention (q, k, v and output projections).
        "lora": {
            "image": ("model.visual.transformer.resblocks.*.attn",),
            "text": ("model.transformer.resblocks.*.attn", "model.text.transformer.resblocks.*.attn"),
        },
        # Parallel adapters beside each transformer block's MLP (the placement He et al. 2022 found best).
        "adapter": {
            "image": ("model.visual.transformer.resblocks.*.mlp",),
            "text": ("model.transformer.resblocks.*.mlp", "model.text.transformer.resblocks.*.mlp"),
        },
        # Sequential adapters after each block's attention and MLP (LifeLong-CLIP's placement; the
        # two of a block share one adapter with shared_per_block).
        "adapter_sequential": {
            "image": ("model.visual.transformer.resblocks.*.attn", "model.visual.transformer.resblocks.*.mlp"),
            "text": ("model.transformer.resblocks.*.attn", "model.transformer.resblocks.*.mlp",
                     "model.text.transformer.resblocks.*.attn", "model.text.transformer.resblocks.*.mlp"),
        },
    }

    def __init__(self, name: str, pretrained: str | None = None, *, image_size: int | None = None,
                 cache_dir: str | None = None) -> None:
        super().__init__()
        architecture, label = _resolve_name(str(name))
        checkpoint, weights_label = _resolve_pretrained(architecture, pretrained)
        try:
            model, train_transform, eval_transform = open_clip.create_model_and_transforms(
                architecture,
                pretrained=checkpoint,
                force_image_size=image_size,
                cache_dir=cache_dir,
                weights_only=True,
            )
        except pickle.UnpicklingError:
            raise ConfigError(f"model.pretrained: {checkpoint} is not a plain state dict (it pickles Python "
                              "objects, which are never unpickled here); save model.state_dict() or use "
                              ".safetensors") from None
        except RuntimeError as error:
            message = _first_line(error)
            if "TorchScript" in message:
                raise ConfigError(f"model.pretrained: {checkpoint} is a TorchScript archive (like OpenAI's "
                                  "original .pt files), which is not loaded here; use the pretrained tag "
                                  "or a state dict (.safetensors)") from None
            if "download" in message.lower() or "hub" in message.lower():
                raise ConfigError(f"model.pretrained: could not fetch {pretrained!r} for {architecture} "
                                  f"(offline? use a local checkpoint file): {message}") from None
            if "state_dict" in message or "size mismatch" in message:
                raise ConfigError(f"model.pretrained: {checkpoint} does not fit architecture {architecture}: "
                                  f"{message}") from None
            raise
        self.model = model
        self.architecture = architecture
        self.tokenizer = open_clip.get_tokenizer(architecture)
        self.preprocess = eval_transform
        self.train_preprocess = train_transform
        self.preprocess_id = _transform_id(eval_transform)
        self.model_id = f"open_clip:{label}@{weights_label}"
        size = model.visual.preprocess_cfg.get("size", image_size) if hasattr(model.visual, "preprocess_cfg") \
            else image_size
        #: The square input resolution the image tower expects.
        self.image_size: int = int(size[0] if isinstance(size, (tuple, list)) else size)
        self._embed_dim = int(open_clip.get_model_config(architecture)["embed_dim"])

    # --- the towers -----------------------------------------------------------------------
    @property
    def image_tower(self) -> nn.Module:
        return self.model.visual

    @property
    def text_tower(self) -> nn.Module:
        if isinstance(getattr(self.model, "text", None), nn.Module):
            return self.model.text  # CustomTextCLIP keeps the whole text tower under .text
        # CLIP keeps the text tower's parts on the top-level model: everything except the image
        # tower and the temperature/bias belongs to the text side.
        members: dict[str, nn.Module | nn.Parameter | None] = {}
        for child_name, child in self.model.named_children():
            if child_name != "visual":
                members[child_name] = child
        for parameter_name, parameter in self.model.named_parameters(recurse=False):
            if parameter_name not in _SHARED_PARAMETERS:
                members[parameter_name] = parameter
        return TowerView(members)

    def image_blocks(self) -> list[nn.Module]:
        visual = self.model.visual
        transformer = getattr(visual, "transformer", None)
        if transformer is not None and hasattr(transformer, "resblocks"):
            return list(transformer.resblocks)  # VisionTransformer
        if all(hasattr(visual, f"layer{i}") for i in range(1, 5)):
            return [getattr(visual, f"layer{i}") for i in range(1, 5)]  # ModifiedResNet
        trunk = getattr(visual, "trunk", None)  # timm towers
        for attribute in ("blocks", "stages", "layers"):
            if trunk is not None and isinstance(getattr(trunk, attribute, None), (nn.ModuleList, nn.Sequential)):
                return list(getattr(trunk, attribute))
        return find_blocks(visual)

    def text_blocks(self) -> list[nn.Module]:
        text = getattr(self.model, "text", None)
        transformer = self.model.transformer if text is None else getattr(text, "transformer", None)
        if transformer is not None and hasattr(transformer, "resblocks"):
            return list(transformer.resblocks)
        return find_blocks(self.text_tower)

    def block_token_layout(self, tower: str) -> str:
        if tower == "image":
            transformer = getattr(self.model.visual, "transformer", None)
        else:
            text = getattr(self.model, "text", None)
            transformer = self.model.transformer if text is None else getattr(text, "transformer", None)
        # open_clip's Transformer runs its blocks batch-first unless built with batch_first=False.
        return "bld" if getattr(transformer, "batch_first", True) else "lbd"

    # --- adaptation sites -----------------------------------------------------------------
    def adaptation_sites(self, kind: str, towers: Sequence[str] = ("image", "text")) -> list[Site]:
        if kind == "moe":
            return self._moe_sites(towers)
        if kind == "prompts" and tuple(towers) == ("image",):
            visual = self.model.visual
            if not (hasattr(visual, "ln_pre") and hasattr(visual, "class_embedding")):
                raise ConfigError(f"prompts: the open_clip image tower {type(visual).__name__} has no token "
                                 "sequence with a class token (a ViT)")
            # ln_pre is the first module that sees the whole sequence (class token first, positions added).
            return [Site("image", "model.visual.ln_pre", visual, "ln_pre", width=int(visual.class_embedding.shape[-1]),
                         layout="bld", keep_first=1)]
        return super().adaptation_sites(kind, towers)

    def _moe_sites(self, towers: Sequence[str]) -> list[Site]:
        from open_clip.transformer import CustomResidualAttentionBlock, ResidualAttentionBlock

        names = self.module_names()
        sites = []
        for tower in towers:
            layout = self.block_token_layout(tower)
            for block in self.image_blocks() if tower == "image" else self.text_blocks():
                if isinstance(block, (ResidualAttentionBlock, CustomResidualAttentionBlock)):
                    # Beside the MLP, reading the residual stream before the MLP's norm (ln_2).
                    width = next(m for m in block.mlp.modules() if isinstance(m, nn.Linear)).in_features
                    sites.append(Site(tower, f"{names[id(block)]}.mlp", block, "mlp", width=width, layout=layout,
                                      input_from=block.ln_2))
                elif is_bert_layer(block):  # CustomTextCLIP with a transformers text tower
                    sites.append(whole_layer_site(tower, block, names, self))
                else:
                    raise ConfigError(f"moe_adapters: the {tower} tower's {type(block).__name__} blocks are not "
                                     "supported (supported: open_clip transformer blocks, BERT-like layers)")
        if not sites:
            raise ConfigError(f"moe_adapters: no block of the {'/'.join(towers)} tower(s) can take a mixture")
        return sites

    def token_embedding_site(self) -> Site:
        text = getattr(self.model, "text", None)
        owner = self.model if text is None else text
        if not hasattr(owner, "token_embedding"):
            raise ConfigError(f"open_clip text tower {type(owner).__name__} has no token_embedding table")
        return Site("text", "model.token_embedding" if text is None else "model.text.token_embedding", owner,
                    "token_embedding")

    # --- encoding ---------------------------------------------------------------------------
    def tokenize(self, texts: Sequence[str]) -> torch.Tensor:
        return self.tokenizer(list(texts))

    def encode_image(self, images: torch.Tensor) -> torch.Tensor:
        return self.model.encode_image(images)

    def encode_text(self, tokens: torch.Tensor) -> torch.Tensor:
        if getattr(self.token_embedding_site().module, "rows", 0) <= self.vocab_size:
            return self.model.encode_text(tokens)
        return self.encode_text_embeddings(self.embed_tokens(tokens), tokens)

    def encode_text_embeddings(self, embeddings: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
        # open_clip's CLIP pools at the largest id (its end token is the last of the original
        # vocabulary), which an added id would beat: the tower reads added ids as padding, while the
        # table's output, replaced, still comes from the real ids.
        tokens = tokens.masked_fill(tokens >= self.vocab_size, self.pad_token_id)
        return self._encode_text_replacing_embeddings(embeddings, tokens, self.model.encode_text)

    @property
    def image_token_width(self) -> int:
        visual = self.model.visual
        if not hasattr(visual, "class_embedding"):
            raise ConfigError(f"task prompts: the open_clip image tower {type(visual).__name__} has no token sequence")
        return int(visual.class_embedding.shape[-1])

    def encode_image_with_task_prompts(self, images: torch.Tensor, prompts: torch.Tensor,
                                       per_task: int = 1) -> torch.Tensor:
        from clipcl.models.task_prompt_towers import open_clip_task_features

        return open_clip_task_features(self.model.visual, self.encode_image, images, prompts, per_task)

    @property
    def logit_scale(self) -> nn.Parameter:
        return self.model.logit_scale

    # --- facts about the tokenizer ----------------------------------------------------------
    @property
    def vocab_size(self) -> int:
        """Rows of the token embedding: every id below this is a valid input."""
        size = getattr(self.model, "vocab_size", None)
        return int(size if size is not None else _tokenizer_vocab_size(self.tokenizer))

    @property
    def embed_dim(self) -> int:
        return self._embed_dim

    @property
    def context_length(self) -> int:
        """Tokens per text: ``tokenize`` pads/truncates to this length."""
        return int(self.tokenizer.context_length)

    @property
    def sot_token_id(self) -> int | None:
        """The start-of-text token (None if the tokenizer has none)."""
        tokenizer = self.tokenizer
        if hasattr(tokenizer, "sot_token_id"):
            return int(tokenizer.sot_token_id)
        return getattr(getattr(tokenizer, "tokenizer", None), "bos_token_id", None)

    @property
    def eot_token_id(self) -> int | None:
        """The end-of-text token (open_clip's CLIP text tower pools at it)."""
        tokenizer = self.tokenizer
        if hasattr(tokenizer, "eot_token_id"):
            return int(tokenizer.eot_token_id)
        return getattr(getattr(tokenizer, "tokenizer", None), "eos_token_id", None)

    @property
    def pad_token_id(self) -> int:
        """The id filling a text after its end token (0 for open_clip's own tokenizer)."""
        pad = getattr(getattr(self.tokenizer, "tokenizer", None), "pad_token_id", None)
        return int(pad) if pad is not None else 0


def _tokenizer_vocab_size(tokenizer: Any) -> int:
    if hasattr(tokenizer, "vocab_size"):
        return int(tokenizer.vocab_size)
    return len(tokenizer.tokenizer)


def _transform_id(transform: Any) -> str:
    """A stable one-line description of a transform (memory addresses removed)."""
    text = re.sub(r" at 0x[0-9a-fA-F]+", "", repr(transform))
    return " ".join(text.split())
