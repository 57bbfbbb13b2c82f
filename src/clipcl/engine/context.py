"""What every stream driver shares: the run directory, the run context, seeds, sources, results facts."""

from __future__ import annotations

import json
import os
import platform
import random
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from clipcl import __version__
from clipcl.checkpoint import atomic_write_json, atomic_write_text
from clipcl.config import RunConfig, to_dict
from clipcl.engine.runtime import Runtime


class RunError(RuntimeError):
    """A run that cannot start or go on. One line says why."""


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def task_seed(seed: int, task_index: int) -> int:
    """Seed of a task's training: depends only on the run seed and the task, so resume is exact."""
    return seed * 1000 + task_index + 1


def versions() -> dict[str, str]:
    found = {"clipcl": __version__, "torch": torch.__version__, "python": platform.python_version(),
             "platform": platform.platform()}
    for module in ("open_clip", "transformers", "torchvision"):
        if module in sys.modules:
            found[module] = getattr(sys.modules[module], "__version__", "?")
    return found


def parameter_counts(strategy) -> dict[str, int]:
    seen: set[int] = set()
    total = trainable = 0
    for parameter in strategy.parameters():
        if id(parameter) in seen:
            continue
        seen.add(id(parameter))
        total += parameter.numel()
        trainable += parameter.numel() if parameter.requires_grad else 0
    return {"trainable": trainable, "total": total}


# --- the run directory ----------------------------------------------------------------------------


class RunDirectory:
    """Paths inside a run directory, and the progress file that makes resume possible."""

    def __init__(self, root: str | Path) -> None:
        self.root = Path(root)
        self.config = self.root / "config.yaml"
        self.results = self.root / "results.json"
        self.summary = self.root / "summary.md"
        self.progress = self.root / "progress.json"
        self.checkpoints = self.root / "checkpoints"

    def checkpoint(self, task_index: int) -> Path:
        return self.checkpoints / f"after_task_{task_index:02d}.safetensors"

    def online_checkpoint(self) -> Path:
        """The latest mid-stream checkpoint of an online run (model, optimizer, random state)."""
        return self.checkpoints / "online_latest.safetensors"

    def read_progress(self) -> dict[str, Any] | None:
        if not self.progress.exists():
            return None
        return json.loads(self.progress.read_text())


# --- what every driver gets ------------------------------------------------------------------------


@dataclass
class RunContext:
    """Everything a stream driver needs, built once per run."""

    config: RunConfig
    runtime: Runtime
    directory: RunDirectory
    strategy: Any
    stream: Any
    cache: Any
    trainer: Any
    observers: Any
    fingerprint: str
    reference: dict[str, torch.Tensor]
    show_progress: bool
    memory: Any = None
    """The replay memory, when the method declares one (``clipcl.data.memory``)."""
    step_sources: dict[str, Any] = field(default_factory=dict)
    """Sources drawn for every training step, by batch key."""


def build_sources(strategy, config: RunConfig, runtime: Runtime):
    """Build what the method declares: reference sets and caption pairs (loaded here, honouring
    ``stream.data_root``) and at most one replay memory. Returns (built sources by name, memory or None)."""
    return declared_sources(strategy, config.stream.data_root, config.train.num_workers, config.seed)


def declared_sources(strategy, data_root: str | None = None, num_workers: int = 0, seed: int = 0):
    from clipcl.data.memory import ReplaySpec, build_memory
    from clipcl.data.sources import CaptionSource, CaptionSpec, ReferenceSource, ReferenceSpec

    built, memory = {}, None
    for name, spec in strategy.sources().items():
        if isinstance(spec, ReplaySpec):
            if name != "replay" or memory is not None:
                raise RunError(f"{type(strategy).__name__}: a method has at most one replay memory, named 'replay'")
            memory = build_memory(spec, seed)
        elif isinstance(spec, ReferenceSpec):
            built[name] = ReferenceSource(spec, data_root, num_workers)
        elif isinstance(spec, CaptionSpec):
            built[name] = CaptionSource(spec, data_root, num_workers)
        else:
            raise RunError(f"{type(strategy).__name__}: source {name!r} has unknown spec {type(spec).__name__}")
    return built, memory


def attach_by_hand(strategy, runtime: Runtime | None = None, cache=None, data_root: str | None = None):
    """Build ``strategy``'s sources and attach them with a runtime and cache, as a run does: for tests
    and benchmarks that drive a strategy without the engine. Returns the strategy."""
    built, _ = declared_sources(strategy, data_root)
    strategy.attach(runtime or Runtime(torch.device("cpu")), cache, built)
    return strategy


def batch_by_hand(strategy, images: torch.Tensor, targets: torch.Tensor, seed: int = 0) -> dict:
    """A training batch as the trainer builds it for a strategy attached by :func:`attach_by_hand`:
    the images and targets plus a draw of every per-step source (started at first use)."""
    batch = {"images": images, "targets": targets}
    for name, source in strategy.source_data.items():
        if source.spec.per_step:
            if not source.started:
                source.start(strategy.backend, seed=seed, count=len(images))
            batch[name] = {key: value.to(images.device) if isinstance(value, torch.Tensor) else value
                           for key, value in source.next_batch().items()}
    return batch


def write_results(context: RunContext, results: dict[str, Any]) -> None:
    """results.json and summary.md, from the main process, atomically."""
    if context.runtime.is_main:
        atomic_write_json(context.directory.results, results)
        from clipcl.report import run_summary_markdown

        atomic_write_text(context.directory.summary, run_summary_markdown(results))


def run_facts(context: RunContext) -> dict[str, Any]:
    """The fields every results.json has besides its measurements."""
    import time

    config = context.config
    return {"parameters": parameter_counts(context.strategy), "config": to_dict(config), "versions": versions(),
            "created": time.strftime("%Y-%m-%dT%H:%M:%S%z")}


def host_facts(context: RunContext) -> dict[str, Any]:
    return {"cpus": os.cpu_count(), "device": str(context.runtime.device)}
