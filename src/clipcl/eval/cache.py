"""Image-feature cache.

While a strategy's image path is unchanged (the image tower is frozen, or only text-side parameters
train), every row of the T x T accuracy matrix would re-encode the same test images. The cache keeps
features in memory and optionally on disk (safetensors, written atomically so a crash never leaves a
half-written file), under a key (:meth:`FeatureCache.key_for`) made of everything that shapes a
feature:

- the strategy's image key: model id, preprocessing id, a digest of the image tower's weights (and
  the task routing, for methods that route);
- the dataset's content fingerprint (pixels, or files' relative paths, sizes and sampled bytes; see
  :meth:`~clipcl.data.base.ClassificationDataset.fingerprint`) and its local stamp (every file's
  mtime, size and inode), so a changed file is never served from an old entry;
- the process's shard, the evaluation batch size (kernels are chosen by batch size, so the last
  bits may depend on it), the autocast precision (bf16 features differ from fp32 ones), the device
  type (and GPU model), the torch release and the float32 matmul setting.

Class text features use the same store under keys of their own (:mod:`clipcl.eval.text_cache`).

A read is verified: the file's format tag, the row count the caller expects, and a sha256 of the
features. Anything that does not match, or a file that cannot be read, is a miss (counted in
``rejected``), and the features computed instead replace the entry.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import torch

from clipcl.checkpoint import DamagedCheckpoint, atomic_save_safetensors, read_verified

CACHE_FORMAT = "clipcl-features-2"


def default_cache_dir() -> Path:
    return Path(os.environ.get("CLIPCL_CACHE", Path.home() / ".cache" / "clipcl" / "features"))


class FeatureCache:
    """Features per key (see the module docstring), in memory and optionally on disk."""

    def __init__(self, directory: str | Path | None = None, enabled: bool = True) -> None:
        self.enabled = enabled
        self.directory = Path(directory) if directory else None
        self._memory: dict[str, torch.Tensor] = {}
        self.hits = 0
        self.misses = 0
        self.rejected = 0
        """Disk entries found but refused: unreadable, another format, wrong shape or checksum."""

    @staticmethod
    def make_key(image_key: str, dataset_fingerprint: str, shard: str, numerics: str = "fp32|cpu") -> str:
        return hashlib.sha256(f"{image_key}||{dataset_fingerprint}||{shard}||{numerics}".encode()).hexdigest()[:32]

    @classmethod
    def key_for(cls, image_key: str, dataset, runtime, batch_size: int | None = None) -> str:
        """The key of ``dataset``'s features through ``image_key`` on this process of ``runtime``,
        encoded in batches of ``batch_size`` (matmul kernels, hence last bits, depend on it)."""
        # What changes a feature's rounding: the autocast precision, the device (and GPU model), the
        # torch release and the float32 matmul setting (TF32 on a GPU).
        numerics = [runtime.precision, runtime.device.type, torch.__version__, torch.get_float32_matmul_precision()]
        if runtime.device.type == "cuda":
            numerics.append(torch.cuda.get_device_name(runtime.device))
        if batch_size is not None:
            numerics.append(f"batch={batch_size}")
        return cls.make_key(image_key, f"{dataset.fingerprint()}|{dataset.local_stamp()}",
                            f"{runtime.rank}/{runtime.world_size}", "|".join(numerics))

    def _path(self, key: str) -> Path | None:
        return self.directory / f"{key}.safetensors" if self.directory else None

    def get(self, key: str, rows: int | None = None) -> torch.Tensor | None:
        """The features under ``key``, or None. ``rows``: how many the caller expects (one per image)."""
        if not self.enabled:
            return None
        if key in self._memory:
            self.hits += 1
            return self._memory[key]
        path = self._path(key)
        if path is not None and path.exists():
            features = self._read(path, rows)
            if features is not None:
                self._memory[key] = features
                self.hits += 1
                return features
            self.rejected += 1
        self.misses += 1
        return None

    @staticmethod
    def _read(path: Path, rows: int | None) -> torch.Tensor | None:
        try:
            metadata, tensors = read_verified(path)
        except DamagedCheckpoint:
            return None
        features = tensors.get("features")
        # A file without this format's checksum (an older clipcl, or written by hand) is not trusted.
        if metadata.get("format") != CACHE_FORMAT or "sha256" not in metadata or features is None:
            return None
        # 2-d: one feature per image; 3-d: several views per image (``Strategy.scores_image_views``).
        if features.ndim not in (2, 3) or (rows is not None and features.shape[0] != rows):
            return None
        return features

    def put(self, key: str, features: torch.Tensor) -> None:
        if not self.enabled:
            return
        features = features.detach().to("cpu", torch.float32).contiguous()
        self._memory[key] = features
        path = self._path(key)
        if path is None:
            return
        atomic_save_safetensors({"features": features}, path, {"format": CACHE_FORMAT})
