"""Tiny random CLIP models for tests and demos: built from configs, no download.

- :func:`write_tiny_open_clip_config` writes an open_clip model config (a 2-layer ViT of width 64 on
  32x32 images, a 2-layer text transformer of width 32 with CLIP's 49,408-token vocabulary; about
  1.7M parameters, 1.6M of them the token embedding, and about 20 ms a training step on one core)
  that ``model.name`` can point to. The text width is 32 rather than 64 because the token
  embedding dominates both the size and the optimizer step.
- :func:`tiny_open_clip_backend` builds it with seeded random weights.
- :func:`write_tiny_hf_clip` writes a transformers ``CLIPModel`` of the same shape, with its
  tokenizer (CLIP's BPE, taken from the vocabulary file open_clip ships) and image processor,
  to a directory that the ``hf`` backend loads offline.
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path
from typing import Any

import torch

TINY_OPEN_CLIP_NAME = "clipcl-tiny-vit"
"""Architecture name (file stem) of the tiny open_clip config."""

TINY_IMAGE_SIZE = 32
TINY_CONTEXT_LENGTH = 16
CLIP_VOCAB_SIZE = 49408

TINY_OPEN_CLIP_CONFIG: dict[str, Any] = {
    "embed_dim": 32,
    "vision_cfg": {"image_size": TINY_IMAGE_SIZE, "patch_size": 8, "width": 64, "layers": 2, "head_width": 32,
                   "mlp_ratio": 2.0},
    "text_cfg": {"context_length": TINY_CONTEXT_LENGTH, "vocab_size": CLIP_VOCAB_SIZE, "width": 32, "heads": 2,
                 "layers": 2, "mlp_ratio": 2.0},
}
"""The tiny architecture, in open_clip's model config format."""


def write_tiny_open_clip_config(directory: str | Path) -> Path:
    """Write ``<directory>/clipcl-tiny-vit.json`` and return its path."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / f"{TINY_OPEN_CLIP_NAME}.json"
    path.write_text(json.dumps(TINY_OPEN_CLIP_CONFIG, indent=2) + "\n")
    return path


def tiny_open_clip_backend(seed: int = 0, pretrained: str | Path | None = None):
    """An :class:`~clipcl.models.open_clip_backend.OpenClipBackend` of the tiny architecture.

    Its random weights depend only on ``seed`` (torch's global generator is left as it was);
    ``pretrained`` loads a checkpoint file instead.
    """
    from clipcl.models.open_clip_backend import OpenClipBackend

    with tempfile.TemporaryDirectory(prefix="clipcl-tiny-") as directory:
        path = write_tiny_open_clip_config(directory)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            return OpenClipBackend(str(path), None if pretrained is None else str(pretrained))


def clip_bpe_vocabulary() -> tuple[dict[str, int], list[tuple[str, str]]]:
    """CLIP's byte-level BPE as ``(vocab, merges)`` in Hugging Face's naming of the special tokens.

    Read from the vocabulary file open_clip ships, through open_clip's own tokenizer, so ids
    match open_clip's tokenizer (and OpenAI's CLIP) exactly: 256 byte symbols, the same with the
    end-of-word mark ``</w>``, 48,894 merges, then ``<|startoftext|>`` = 49406 and ``<|endoftext|>`` = 49407.
    """
    from open_clip.tokenizer import SimpleTokenizer

    reference = SimpleTokenizer()
    renamed = {"<start_of_text>": "<|startoftext|>", "<end_of_text>": "<|endoftext|>"}
    vocab = {renamed.get(token, token): index for token, index in reference.encoder.items()}
    merges = [pair for pair, _ in sorted(reference.bpe_ranks.items(), key=lambda item: item[1])]
    return vocab, merges


def write_tiny_hf_clip(directory: str | Path, seed: int = 0) -> Path:
    """Write a tiny random transformers ``CLIPModel`` with tokenizer and image processor to ``directory``.

    The model mirrors :data:`TINY_OPEN_CLIP_CONFIG` (embedding 32; 32x32 images, patch 8, width 64;
    text width 32; 2 layers per tower; 16-token context). Returns the directory.
    """
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPTokenizer

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    vocab, merges = clip_bpe_vocabulary()
    tokenizer = CLIPTokenizer(vocab=vocab, merges=merges, model_max_length=TINY_CONTEXT_LENGTH)
    config = CLIPConfig(
        text_config={"vocab_size": CLIP_VOCAB_SIZE, "hidden_size": 32, "intermediate_size": 64,
                     "num_hidden_layers": 2, "num_attention_heads": 2,
                     "max_position_embeddings": TINY_CONTEXT_LENGTH,
                     "bos_token_id": tokenizer.bos_token_id, "eos_token_id": tokenizer.eos_token_id,
                     "pad_token_id": tokenizer.pad_token_id},
        vision_config={"image_size": TINY_IMAGE_SIZE, "patch_size": 8, "hidden_size": 64, "intermediate_size": 128,
                       "num_hidden_layers": 2, "num_attention_heads": 2},
        projection_dim=32,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = CLIPModel(config)
    model.save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    processor = CLIPImageProcessor(size={"shortest_edge": TINY_IMAGE_SIZE},
                                   crop_size={"height": TINY_IMAGE_SIZE, "width": TINY_IMAGE_SIZE})
    processor.save_pretrained(directory)
    return directory


__all__ = [
    "TINY_OPEN_CLIP_CONFIG",
    "TINY_OPEN_CLIP_NAME",
    "clip_bpe_vocabulary",
    "tiny_open_clip_backend",
    "write_tiny_hf_clip",
    "write_tiny_open_clip_config",
]
