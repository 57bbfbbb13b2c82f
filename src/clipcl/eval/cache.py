"""Image-feature cache.

While a strategy's image path is unchanged (the image tower is frozen, or only text-side parameters
train), every row of the T x T accuracy matrix would re-encode the same test images. The cache keys
features by the strategy's image key (model, weights digest, preprocessing, task routing), the
dataset's fingerprint (name, split, exact subset) and the process's shard, in memory and optionally
on disk (safetensors, written atomically so a crash never leaves a half-written file).
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import torch
from safetensors.torch import load_file

from clipcl.checkpoint import atomic_save_safetensors


def default_cache_dir() -> Path:
    return Path(os.environ.get("CLIPCL_CACHE", Path.home() / ".cache" / "clipcl" / "features"))


class FeatureCache:
    """Features per (image key, dataset fingerprint, shard), in memory and optionally on disk."""

    def __init__(self, directory: str | Path | None = None, enabled: bool = True) -> None:
        self.enabled = enabled
        self.directory = Path(directory) if directory else None
        self._memory: dict[str, torch.Tensor] = {}
        self.hits = 0
        self.misses = 0

    @staticmethod
    def make_key(image_key: str, dataset_fingerprint: str, shard: str) -> str:
        return hashlib.sha256(f"{image_key}||{dataset_fingerprint}||{shard}".encode()).hexdigest()[:32]

    def _path(self, key: str) -> Path | None:
        return self.directory / f"{key}.safetensors" if self.directory else None

    def get(self, key: str) -> torch.Tensor | None:
        if not self.enabled:
            return None
        if key in self._memory:
            self.hits += 1
            return self._memory[key]
        path = self._path(key)
        if path is not None and path.exists():
            try:
                features = load_file(str(path))["features"]
            except Exception:  # noqa: BLE001 (a damaged cache file is only a miss; it is rewritten)
                features = None
            if features is not None:
                self._memory[key] = features
                self.hits += 1
                return features
        self.misses += 1
        return None

    def put(self, key: str, features: torch.Tensor) -> None:
        if not self.enabled:
            return
        features = features.detach().to("cpu", torch.float32).contiguous()
        self._memory[key] = features
        path = self._path(key)
        if path is None:
            return
        atomic_save_safetensors({"features": features}, path)
