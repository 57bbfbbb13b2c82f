"""The transformers backend: a ``CLIPModel`` (or ``SiglipModel``) from a local directory or hub id.

The directory holds what ``save_pretrained`` writes for the model, its tokenizer and its image
processor (``config.json``, ``model.safetensors``, ``tokenizer.json``, ``preprocessor_config.json``), as
in the hub repositories ``openai/clip-vit-base-patch16`` or ``google/siglip-base-patch16-224``.

Embeddings are computed from the towers explicitly (encoder -> ``pooler_output`` -> projection)
rather than through ``get_image_features``/``get_text_features``, whose return type changed in
transformers 5 (a model output instead of a tensor). The image processor's size, crop, mean and std
become a torchvision transform, so ``preprocess`` takes a PIL image and returns a tensor.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any, ClassVar

import torch
from torch import nn
from torchvision import transforms

from clipcl.config import ConfigError
from clipcl.models import TowerView, find_blocks
from clipcl.models.base import Backend, Site

SUPPORTED_MODEL_TYPES = ("clip", "siglip")

# PIL resampling codes (what image processors store) -> torchvision interpolation modes.
_INTERPOLATION = {
    0: transforms.InterpolationMode.NEAREST,
    1: transforms.InterpolationMode.LANCZOS,
    2: transforms.InterpolationMode.BILINEAR,
    3: transforms.InterpolationMode.BICUBIC,
    4: transforms.InterpolationMode.BOX,
    5: transforms.InterpolationMode.HAMMING,
}


def _offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on")


def _looks_local(name: str) -> bool:
    """A name that can only mean a local directory (hub ids look like ``org/name`` or ``name``)."""
    return name.startswith(("/", ".", "~")) or name.count("/") >= 2 or Path(name).expanduser().exists()


def _first_line(error: BaseException) -> str:
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__


def _size_value(size: Any, key: str) -> int | None:
    """Read one entry of an image processor's size dict (a dict in transformers 4, a SizeDict in 5)."""
    if size is None:
        return None
    value = size.get(key) if isinstance(size, dict) else getattr(size, key, None)
    return int(value) if value is not None else None


def processor_transforms(processor: Any) -> tuple[transforms.Compose, transforms.Compose]:
    """``(eval, train)`` torchvision transforms equivalent to an image processor's settings.

    Eval: resize (shortest edge, or to height x width), centre crop when the processor crops,
    to tensor, normalise. Train: a random resized crop (scale 0.9-1, as open_clip's default
    augmentation) to the same output size, to tensor, normalise.
    """
    size, crop = getattr(processor, "size", None), getattr(processor, "crop_size", None)
    resample = getattr(processor, "resample", 3)
    if isinstance(resample, transforms.InterpolationMode):
        interpolation = resample
    else:
        interpolation = _INTERPOLATION.get(int(getattr(resample, "value", resample)),
                                           transforms.InterpolationMode.BICUBIC)
    steps: list[Any] = [ToRGB()]
    shortest = _size_value(size, "shortest_edge")
    height, width = _size_value(size, "height"), _size_value(size, "width")
    if getattr(processor, "do_resize", True):
        if shortest is not None:
            steps.append(transforms.Resize(shortest, interpolation=interpolation, antialias=True))
            output = (shortest, shortest)
        elif height is not None and width is not None:
            steps.append(transforms.Resize((height, width), interpolation=interpolation, antialias=True))
            output = (height, width)
        else:
            raise ConfigError(f"image processor size {size!r} has neither shortest_edge nor height/width")
    else:
        output = (height or shortest or 224, width or shortest or 224)
    crop_height, crop_width = _size_value(crop, "height"), _size_value(crop, "width")
    if getattr(processor, "do_center_crop", False) and crop_height and crop_width:
        steps.append(transforms.CenterCrop((crop_height, crop_width)))
        output = (crop_height, crop_width)
    mean = [float(value) for value in getattr(processor, "image_mean", None) or (0.5, 0.5, 0.5)]
    std = [float(value) for value in getattr(processor, "image_std", None) or (0.5, 0.5, 0.5)]
    tail = [transforms.ToTensor()]
    if getattr(processor, "do_normalize", True):
        tail.append(transforms.Normalize(mean, std))
    train = [ToRGB(),
             transforms.RandomResizedCrop(output, scale=(0.9, 1.0), interpolation=interpolation, antialias=True)]
    return transforms.Compose(steps + tail), transforms.Compose(train + tail)


class ToRGB:
    """Convert a PIL image of any mode (grey, palette, RGBA) to RGB; leave RGB images alone."""

    def __call__(self, image: Any) -> Any:
        if hasattr(image, "convert") and getattr(image, "mode", "RGB") != "RGB":
            return image.convert("RGB")
        return image

    def __repr__(self) -> str:
        return "ToRGB()"


class HFClipBackend(Backend):
    """A transformers ``CLIPModel`` or ``SiglipModel`` behind the :class:`Backend` interface.

    The model is ``self.model`` (parameter names read ``model.vision_model...``). ``name`` is a local
    directory or a hub id; with ``HF_HUB_OFFLINE=1`` (or a local directory) nothing is downloaded.
    Weights are loaded in float32 whatever dtype they were saved in (transformers 5 would otherwise
    keep the checkpoint's dtype).
    """

    backend_name = "hf"
    # transformers CLIPModel / SiglipModel: the four attention projections of every encoder layer
    # (its attention module is not an nn.MultiheadAttention, so LoRA goes on the projections).
    ADAPTATION_TARGETS: ClassVar[dict[str, dict[str, tuple[str, ...]]]] = {
        "lora": {
            "image": ("model.vision_model.encoder.layers.*.self_attn.[qkv]_proj",
                      "model.vision_model.encoder.layers.*.self_attn.out_proj"),
            "text": ("model.text_model.encoder.layers.*.self_attn.[qkv]_proj",
                     "model.text_model.encoder.layers.*.self_attn.out_proj"),
        },
        "adapter": {
            "image": ("model.vision_model.encoder.layers.*.mlp",),
            "text": ("model.text_model.encoder.layers.*.mlp",),
        },
        # Sequential adapters after each layer's attention and MLP (LifeLong-CLIP's placement).
        "adapter_sequential": {
            "image": ("model.vision_model.encoder.layers.*.self_attn", "model.vision_model.encoder.layers.*.mlp"),
            "text": ("model.text_model.encoder.layers.*.self_attn", "model.text_model.encoder.layers.*.mlp"),
        },
    }

    def __init__(self, name: str) -> None:
        super().__init__()
        from transformers import AutoConfig, AutoImageProcessor, AutoTokenizer, CLIPModel, SiglipModel

        name = str(name)
        local = _looks_local(name)
        if local:
            path = Path(name).expanduser()
            if not path.is_dir():
                raise FileNotFoundError(f"model.name: transformers model directory {path} does not exist")
            if not (path / "config.json").is_file():
                raise FileNotFoundError(f"model.name: {path} holds no config.json (not a transformers model directory)")
            source = str(path.resolve())
        else:
            source = name
        local_only = local or _offline()
        try:
            config = AutoConfig.from_pretrained(source, local_files_only=local_only)
            model_type = getattr(config, "model_type", "")
            if model_type not in SUPPORTED_MODEL_TYPES:
                raise ConfigError(f"model.name: {name} is a {model_type!r} model; the hf backend supports "
                                  f"{', '.join(SUPPORTED_MODEL_TYPES)}")
            model_class = CLIPModel if model_type == "clip" else SiglipModel
            model = model_class.from_pretrained(source, local_files_only=local_only, dtype=torch.float32)
            tokenizer = AutoTokenizer.from_pretrained(source, local_files_only=local_only)
            processor = AutoImageProcessor.from_pretrained(source, local_files_only=local_only)
        except OSError as error:
            where = "the local directory" if local else ("the local cache (HF_HUB_OFFLINE=1)" if local_only
                                                         else "the hub")
            raise ConfigError(f"model.name: could not load {name!r} from {where}: {_first_line(error)}") from None
        self.model = model
        self.model_type = model_type
        self.tokenizer = tokenizer
        self.preprocess, self.train_preprocess = processor_transforms(processor)
        self.preprocess_id = " ".join(repr(self.preprocess).split())
        self.model_id = f"hf:{name.rstrip('/')}"
        self.image_size = int(config.vision_config.image_size)
        self._context_length = int(config.text_config.max_position_embeddings)

    # --- the towers -----------------------------------------------------------------------
    def _members(self, prefixes: tuple[str, ...]) -> dict[str, nn.Module | nn.Parameter | None]:
        members: dict[str, nn.Module | nn.Parameter | None] = {}
        for child_name, child in self.model.named_children():
            if child_name.startswith(prefixes):
                members[child_name] = child
        for parameter_name, parameter in self.model.named_parameters(recurse=False):
            if parameter_name.startswith(prefixes):
                members[parameter_name] = parameter
        return members

    @property
    def image_tower(self) -> nn.Module:
        return TowerView(self._members(("vision", "visual")))

    @property
    def text_tower(self) -> nn.Module:
        return TowerView(self._members(("text",)))

    def image_blocks(self) -> list[nn.Module]:
        encoder = getattr(self.model.vision_model, "encoder", None)
        if encoder is not None and hasattr(encoder, "layers"):
            return list(encoder.layers)
        return find_blocks(self.model.vision_model)

    def text_blocks(self) -> list[nn.Module]:
        encoder = getattr(self.model.text_model, "encoder", None)
        if encoder is not None and hasattr(encoder, "layers"):
            return list(encoder.layers)
        return find_blocks(self.model.text_model)

    # --- adaptation sites -----------------------------------------------------------------
    def adaptation_sites(self, kind: str, towers: Sequence[str] = ("image", "text")) -> list[Site]:
        if kind == "moe":
            return self._moe_sites(towers)
        if kind == "prompts" and tuple(towers) == ("image",):
            vision = self.model.vision_model
            if not hasattr(vision, "pre_layrnorm"):
                raise ConfigError(f"prompts: the {self.model_type} image tower has no pre-encoder norm with a "
                                 "class token in front (CLIP has; SigLIP pools with an attention head)")
            # CLIP's vision tower: embeddings (class token first, positions added) -> pre_layrnorm -> encoder.
            return [Site("image", "model.vision_model.pre_layrnorm", vision, "pre_layrnorm",
                         width=int(self.model.config.vision_config.hidden_size), layout="bld", keep_first=1)]
        return super().adaptation_sites(kind, towers)

    def _moe_sites(self, towers: Sequence[str]) -> list[Site]:
        names = self.module_names()
        sites = []
        for tower in towers:
            for layer in self.image_blocks() if tower == "image" else self.text_blocks():
                if not (hasattr(layer, "mlp") and hasattr(layer, "layer_norm2")):
                    raise ConfigError(f"moe_adapters: the {tower} tower's {type(layer).__name__} blocks are not "
                                     "supported (supported: CLIP and SigLIP encoder layers)")
                # Beside the MLP, reading the residual stream before the MLP's norm (layer_norm2).
                width = next(m for m in layer.mlp.modules() if isinstance(m, nn.Linear)).in_features
                sites.append(Site(tower, f"{names[id(layer)]}.mlp", layer, "mlp", width=width, layout="bld",
                                  input_from=layer.layer_norm2))
        if not sites:
            raise ConfigError(f"moe_adapters: no block of the {'/'.join(towers)} tower(s) can take a mixture")
        return sites

    def token_embedding_site(self) -> Site:
        embeddings = self.model.text_model.embeddings
        return Site("text", "model.text_model.embeddings.token_embedding", embeddings, "token_embedding")

    # --- encoding ---------------------------------------------------------------------------
    def tokenize(self, texts: Sequence[str]) -> torch.Tensor:
        # Pad to the full context: the text towers pool at the (first) end token, and SigLIP was
        # trained on max-length padding. No attention mask is needed: CLIP's text attention is
        # causal, so padding after the end token cannot change the pooled feature.
        encoded = self.tokenizer(list(texts), padding="max_length", max_length=self._context_length,
                                 truncation=True, return_tensors="pt")
        return encoded["input_ids"]

    def encode_image(self, images: torch.Tensor) -> torch.Tensor:
        pooled = _pooled(self.model.vision_model(pixel_values=images))
        projection = getattr(self.model, "visual_projection", None)
        return projection(pooled) if projection is not None else pooled

    def encode_text(self, tokens: torch.Tensor) -> torch.Tensor:
        pooled = _pooled(self.model.text_model(input_ids=tokens))
        projection = getattr(self.model, "text_projection", None)
        return projection(pooled) if projection is not None else pooled

    @property
    def image_token_width(self) -> int:
        if not hasattr(self.model.vision_model, "pre_layrnorm"):
            raise ConfigError(f"task prompts: the {self.model_type} image tower has no class token to prompt beside")
        return int(self.model.config.vision_config.hidden_size)

    def encode_image_with_task_prompts(self, images: torch.Tensor, prompts: torch.Tensor,
                                       per_task: int = 1) -> torch.Tensor:
        from clipcl.models.task_prompt_towers import hf_task_features

        return hf_task_features(self.model, self.model_type, self.encode_image, images, prompts, per_task)

    @property
    def logit_scale(self) -> nn.Parameter:
        return self.model.logit_scale

    # --- facts about the tokenizer ----------------------------------------------------------
    @property
    def vocab_size(self) -> int:
        """Rows of the token embedding: every id below this is a valid input."""
        return int(self.model.config.text_config.vocab_size)

    @property
    def embed_dim(self) -> int:
        projection = getattr(self.model, "visual_projection", None)
        if projection is not None:
            return int(projection.out_features)
        return int(self.model.config.vision_config.hidden_size)  # SigLIP: the pooling head keeps the width

    @property
    def context_length(self) -> int:
        """Tokens per text: ``tokenize`` pads/truncates to this length."""
        return self._context_length

    @property
    def sot_token_id(self) -> int | None:
        """The start-of-text token (None for tokenizers without one, such as SigLIP's)."""
        return self.tokenizer.bos_token_id

    @property
    def eot_token_id(self) -> int | None:
        """The end-of-text token (CLIP's text tower pools at its first occurrence)."""
        return self.tokenizer.eos_token_id

    @property
    def pad_token_id(self) -> int:
        """The id filling a text after its end token."""
        pad = self.tokenizer.pad_token_id
        return int(pad) if pad is not None else 0


def _pooled(output: Any) -> torch.Tensor:
    """The pooled embedding of a tower's output, whether a model output or a tuple."""
    pooled = getattr(output, "pooler_output", None)
    if pooled is None and isinstance(output, (tuple, list)):
        pooled = output[1]
    if pooled is None:
        raise RuntimeError(f"{type(output).__name__} has no pooler_output")
    return pooled
