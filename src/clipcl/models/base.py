"""The one small interface every model backend implements.

Strategies talk only to :class:`Backend`; they never import open_clip or transformers.
A backend is an ``nn.Module`` holding two towers and a temperature:

- ``tokenize(texts) -> LongTensor`` turns strings into the text tower's input ids.
- ``encode_image(images) -> Tensor[B, D]`` and ``encode_text(tokens) -> Tensor[N, D]`` return
  *unnormalised* embeddings in the shared space; callers normalise.
- ``logit_scale`` is the learnable log-temperature (CLIP's ``logit_scale``); use ``logit_scale.exp()``.
- ``preprocess`` maps a PIL image to the evaluation tensor; ``train_preprocess`` the training one.
- ``image_tower`` / ``text_tower`` are the sub-modules holding each tower's parameters, and
  ``image_blocks()`` / ``text_blocks()`` list their repeated blocks (for adapters and prompts).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import nn


class Backend(nn.Module):
    """Base class for model backends. Subclasses fill in the towers and the methods below."""

    #: Short backend name, written to results.json.
    backend_name: str = "base"

    def __init__(self) -> None:
        super().__init__()
        self.preprocess: Callable = lambda image: image
        self.train_preprocess: Callable = lambda image: image
        #: A string that identifies the preprocessing; part of the image-feature cache key.
        self.preprocess_id: str = ""
        #: A string naming the architecture and weights; part of checkpoint compatibility checks.
        self.model_id: str = ""

    # --- the towers -------------------------------------------------------------------------
    @property
    def image_tower(self) -> nn.Module:
        raise NotImplementedError

    @property
    def text_tower(self) -> nn.Module:
        raise NotImplementedError

    def image_blocks(self) -> list[nn.Module]:
        """The repeated blocks of the image tower, input side first."""
        raise NotImplementedError

    def text_blocks(self) -> list[nn.Module]:
        """The repeated blocks of the text tower, input side first."""
        raise NotImplementedError

    def block_token_layout(self, tower: str) -> str:
        """How a transformer block of ``tower`` lays out its input: ``bld`` (batch, length, width;
        the default) or ``lbd`` (length first). Adapters that route on the first token need it."""
        return "bld"

    # --- encoding ---------------------------------------------------------------------------
    def tokenize(self, texts: Sequence[str]) -> torch.Tensor:
        raise NotImplementedError

    def encode_image(self, images: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def encode_text(self, tokens: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    @property
    def logit_scale(self) -> nn.Parameter:
        raise NotImplementedError

    # --- facts about the tokenizer, used by methods that invent texts (VR-LwF) ----------------
    @property
    def vocab_size(self) -> int:
        raise NotImplementedError

    @property
    def embed_dim(self) -> int:
        raise NotImplementedError

    # --- conveniences built on the above -------------------------------------------------------
    @property
    def device(self) -> torch.device:
        return next(self.parameters()).device

    def encode_texts(self, texts: Sequence[str]) -> torch.Tensor:
        """Tokenize and encode a list of strings on the model's device."""
        return self.encode_text(self.tokenize(texts).to(self.device))
