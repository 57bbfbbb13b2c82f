"""What every stream driver shares: the run directory, the run context, seeds, sources, results facts."""

from __future__ import annotations

import hashlib
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
from clipcl.atomic_files import atomic_write_json, atomic_write_text
from clipcl.config import RunConfig, to_dict
from clipcl.engine.runtime import Runtime
from clipcl.errors import UserError


class RunError(UserError, RuntimeError):
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
        return read_json_file(self.progress)


def read_json_file(path: Path) -> Any:
    """A JSON file clipcl wrote, or one line naming it when it is damaged."""
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError):
        raise RunError(f"{path} is damaged (not valid JSON); pass --restart to start this run over, "
                       "or choose another output_dir") from None


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
    retrieval_sets: list[Any] = field(default_factory=list)
    """``eval.retrieval``'s captioned sets, loaded before the run folder is touched."""
    resume_from_intact: bool = False
    """A damaged last checkpoint sends the run back to the last intact one instead of stopping it."""
    data: dict[str, str] = field(default_factory=dict)
    """Content fingerprint of every dataset that shapes a number (:func:`data_fingerprints`)."""
    alignment: Any = None
    """The :class:`~clipcl.engine.evaluation.AlignmentTracker` (its reference features), with ``eval.alignment``."""
    online_alignment: dict[str, Any] = field(default_factory=dict)
    """An online stream's alignment measures at its latest measured point (before or after the stream)."""
    captioned: dict[str, Any] = field(default_factory=dict)
    """A caption stream's test sets grouped by image for retrieval, built at their first evaluation."""
    language_image_features: dict[Any, Any] = field(default_factory=dict)
    """A language stream's test image features by (the strategy's image cache key, image key): every
    language shows the same images, and a frozen image tower gives the same key at every row."""


def data_fingerprints(stream, sources: dict[str, Any], retrieval_sets: list[Any]) -> dict[str, str]:
    """A short content digest of every dataset a run trains or measures on, by a readable name: the
    tasks' train and test sets, held-out sets, the method's reference and caption sources and the
    retrieval sets. Stored in progress.json; a resume whose data differs is refused."""
    found: dict[str, str] = {}

    def add(name: str, fingerprint: str) -> None:
        found[name] = hashlib.sha256(fingerprint.encode()).hexdigest()[:16]

    if hasattr(stream, "tasks"):
        for task in stream.tasks:
            add(f"task {task.name}/train", task.train.fingerprint())
            add(f"task {task.name}/test", task.test.fingerprint())
    else:  # an online stream: one union train set and one union test set
        add("stream/train", stream.train.fingerprint())
        add("stream/test", stream.test.fingerprint())
    for held in stream.heldout:
        add(f"held-out {held.name}", held.test.fingerprint())
    for name, source in sources.items():
        add(f"source {name}", _source_fingerprint(source))
    for captioned in retrieval_sets:
        digest = hashlib.sha256()
        for image in captioned.images:
            digest.update(repr((image.size, image.mode)).encode())
            digest.update(image.tobytes())
        digest.update(json.dumps([captioned.captions, captioned.caption_image]).encode())
        add(f"retrieval {captioned.name}", digest.hexdigest())
    return found


def _source_fingerprint(source) -> str:
    """A reference source's images and texts, or a caption source's pairs (paths relative to the file)."""
    if getattr(source, "follows_task", False):
        return "the current task's training set|" + json.dumps(source.texts)  # fingerprinted as a task
    dataset = source.dataset
    if hasattr(dataset, "fingerprint"):
        return dataset.fingerprint() + "|" + json.dumps(getattr(source, "texts", []))
    from clipcl.data.base import files_fingerprint

    unique = list(dict.fromkeys(dataset.image_paths))
    return files_fingerprint(unique, dataset.path.parent) + "|" + json.dumps(dataset.captions)


def check_same_data(previous: dict[str, str] | None, current: dict[str, str], progress_path: Path) -> None:
    """Refuse a resume whose data differs from what the run started with (a number would mix both)."""
    if not previous:
        return  # a run started before clipcl recorded its data
    for name in sorted(set(previous) | set(current)):
        if previous.get(name) != current.get(name):
            what = "is new" if name not in previous else ("is gone" if name not in current else "changed")
            raise RunError(f"the data of {name} {what} since this run started ({progress_path} records it); "
                           "a resume must see the same data: restore it, or pass --restart")


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


def batch_by_hand(strategy, images: torch.Tensor, targets: torch.Tensor, seed: int = 0, task=None) -> dict:
    """A training batch as the trainer builds it for a strategy attached by :func:`attach_by_hand`:
    the images and targets plus a draw of every per-step source (started at first use; a source of
    the current task's images draws from ``task.train``)."""
    batch = {"images": images, "targets": targets}
    for name, source in strategy.source_data.items():
        if source.spec.per_step:
            if not source.started:
                if getattr(source, "follows_task", False):
                    if task is None:
                        raise ValueError(f"source {name} draws the current task's images: pass task=")
                    source.use_dataset(task.train)
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
