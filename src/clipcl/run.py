"""One continual-learning run, start to finish, resumable at task boundaries.

Per task: ``before_task`` -> train -> ``after_task`` -> evaluate every task of the stream (future
ones included) and the held-out sets -> checkpoint + progress file. The zero-shot row is evaluated
first. A rerun of an interrupted run loads the last checkpoint and goes on after it; each task's
training is seeded from (seed, task index), so the resumed run ends with the same results as an
uninterrupted one.
"""

from __future__ import annotations

import json
import os
import platform
import random
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
import yaml

from clipcl import __version__
from clipcl.checkpoint import (
    CheckpointError,
    atomic_write_json,
    atomic_write_text,
    fingerprint_digest,
    load_checkpoint,
    save_checkpoint,
    snapshot_state,
)
from clipcl.config import RunConfig, config_fingerprint, to_dict
from clipcl.eval import metrics as metrics_module
from clipcl.eval.cache import FeatureCache, default_cache_dir
from clipcl.eval.evaluator import evaluate_row
from clipcl.eval.retrieval import evaluate_retrieval, load_captioned
from clipcl.train.loop import train_task
from clipcl.train.runtime import DistributedRuntime, Runtime, free_port, pick_device, rendezvous_environment


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

    def read_progress(self) -> dict[str, Any] | None:
        if not self.progress.exists():
            return None
        return json.loads(self.progress.read_text())


def _check_or_write_config(directory: RunDirectory, config: RunConfig, restart: bool) -> None:
    fingerprint = config_fingerprint(config)
    if directory.progress.exists() or directory.results.exists():
        # Task-based runs keep the digest in progress.json; online runs (no progress) in results.json.
        previous = directory.read_progress() or (json.loads(directory.results.read_text())
                                                 if directory.results.exists() else {})
        if restart:
            for path in [directory.progress, directory.results, directory.summary,
                         *directory.checkpoints.glob("*.safetensors")]:
                path.unlink(missing_ok=True)
        elif previous.get("config_digest") not in (None, fingerprint_digest(fingerprint)):
            raise RunError(f"{directory.root} holds a run with another config; choose another output_dir "
                           "or pass --restart to overwrite it")
    directory.root.mkdir(parents=True, exist_ok=True)
    atomic_write_text(directory.config, yaml.safe_dump(to_dict(config), sort_keys=False))


# --- the run --------------------------------------------------------------------------------------


def run_experiment(config: RunConfig, *, restart: bool = False, show_progress: bool = True,
                   stop_after_task: int | None = None) -> dict[str, Any]:
    """Run (or resume) ``config``; returns the results dict also written to results.json.

    ``stop_after_task`` stops after that task's checkpoint, as an interruption would (for tests).
    """
    config.validate()  # again: a field may have been changed in place; nothing is built or written before
    if config.train.devices > 1:
        return _spawn(config, restart=restart, show_progress=show_progress, stop_after_task=stop_after_task)
    runtime = Runtime(pick_device(config.train.accelerator), config.train.precision)
    return _run(config, runtime, restart=restart, show_progress=show_progress, stop_after_task=stop_after_task)


def _spawn(config: RunConfig, **kwargs) -> dict[str, Any]:
    import torch.multiprocessing as mp

    with rendezvous_environment(free_port()):
        mp.spawn(_worker, args=(config, kwargs), nprocs=config.train.devices, join=True)
    directory = RunDirectory(config.output_dir)
    if directory.results.exists():
        return json.loads(directory.results.read_text())
    return {"interrupted": True, "progress": directory.read_progress()}


def _worker(rank: int, config: RunConfig, kwargs: dict[str, Any]) -> None:
    torch.set_num_threads(max(1, torch.get_num_threads() // config.train.devices))
    runtime = DistributedRuntime(rank, config.train.devices, pick_device(config.train.accelerator),
                                 config.train.precision)
    try:
        _run(config, runtime, **kwargs)
    finally:
        runtime.close()


def _run(config: RunConfig, runtime: Runtime, *, restart: bool, show_progress: bool,
         stop_after_task: int | None) -> dict[str, Any]:
    from clipcl.data.streams import build_stream
    from clipcl.models import build_backend
    from clipcl.strategies import build_strategy

    directory = RunDirectory(config.output_dir)
    fingerprint = config_fingerprint(config)
    if runtime.is_main:
        _check_or_write_config(directory, config, restart)
    runtime.barrier()

    if config.stream.protocol == "si_blurry":
        from clipcl.online import run_online

        if directory.results.exists() and not restart:
            return json.loads(directory.results.read_text())  # a finished online run
        results = run_online(config, runtime, directory, show_progress)
        runtime.barrier()
        return results

    seed_everything(config.seed)
    backend = build_backend(config.model).to(runtime.device)
    stream = build_stream(config.stream, config.seed)
    strategy = build_strategy(backend, config.strategy).to(runtime.device)
    strategy.eval()
    reference = snapshot_state(strategy)

    cache_dir = config.eval.cache_dir if config.eval.cache_dir is not None else default_cache_dir()
    cache = FeatureCache(cache_dir or None, enabled=config.eval.feature_cache)
    strategy.feature_cache = cache

    progress = directory.read_progress() or {}
    completed = progress.get("completed_tasks", -1)
    if completed >= 0:
        strategy.restore_structure(stream.tasks[: completed + 1])
        try:
            loaded = load_checkpoint(directory.checkpoint(completed), strategy, fingerprint)
        except FileNotFoundError:
            raise RunError(f"{directory.progress} says task {completed} finished but its checkpoint is missing")
        if loaded != completed:
            raise CheckpointError(f"checkpoint {directory.checkpoint(completed)} is from task {loaded}")
        if runtime.is_main and show_progress:
            print(f"resuming {directory.root} after task {completed} ({stream.tasks[completed].name})",
                  file=sys.stderr)

    batch_size = config.eval.batch_size
    retrieval_sets = [load_captioned(spec, config.eval.retrieval_images, config.stream.data_root)
                      for spec in config.eval.retrieval]
    if "zero_shot_row" not in progress:
        row, heldout, seconds = evaluate_row(strategy, stream, -1, runtime, batch_size, cache, show_progress)
        retrieval = retrieval_row(strategy, retrieval_sets, batch_size)
        progress.update(config_digest=fingerprint_digest(fingerprint), completed_tasks=-1, zero_shot_row=row,
                        zero_shot_heldout=heldout, zero_shot_eval_seconds=seconds, rows=[], heldout_rows=[],
                        train_seconds=[], eval_seconds=[], train_steps=[], train_examples=[], losses=[],
                        zero_shot_retrieval=retrieval, retrieval_rows=[])
        if runtime.is_main:
            atomic_write_json(directory.progress, progress)

    for task in stream.tasks[completed + 1:]:
        seed_everything(task_seed(config.seed, task.index))
        strategy.before_task(task)
        stats = train_task(strategy, task, config.train, runtime, task_seed(config.seed, task.index),
                           show_progress)
        strategy.after_task(task)
        row, heldout, eval_seconds = evaluate_row(strategy, stream, task.index, runtime, batch_size, cache,
                                                  show_progress)
        progress["rows"].append(row)
        progress["heldout_rows"].append(heldout)
        progress["retrieval_rows"].append(retrieval_row(strategy, retrieval_sets, batch_size))
        progress["train_seconds"].append(stats.seconds)
        progress["eval_seconds"].append(eval_seconds)
        progress["train_steps"].append(stats.steps)
        progress["train_examples"].append(stats.examples)
        progress["losses"].append([stats.first_loss, stats.last_loss])
        progress["completed_tasks"] = task.index
        if runtime.is_main:
            # Checkpoint first, progress second: progress never points at a checkpoint not yet written.
            save_checkpoint(directory.checkpoint(task.index), strategy, reference, fingerprint, task.index)
            atomic_write_json(directory.progress, progress)
            if show_progress:
                cells = "  ".join(f"{value:5.1f}" for value in row)
                print(f"after {task.name}: {cells}", file=sys.stderr)
        runtime.barrier()
        if stop_after_task is not None and task.index >= stop_after_task and task.index < len(stream.tasks) - 1:
            return {"interrupted": True, "progress": progress}

    results = build_results(config, stream, strategy, progress)
    report = strategy.final_report(stream, runtime)
    if report:
        results["strategy_report"] = report
    if runtime.is_main:
        atomic_write_json(directory.results, results)
        from clipcl.report import run_summary_markdown

        atomic_write_text(directory.summary, run_summary_markdown(results))
    runtime.barrier()
    return results


def retrieval_row(strategy, sets, batch_size: int) -> dict[str, dict[str, float]]:
    """R@1/5/10 both ways on every retrieval set, by set name. Every process computes it in full
    (the sets are small), so all processes agree without communicating."""
    return {captioned.name: evaluate_retrieval(strategy, captioned, batch_size) for captioned in sets}


def build_results(config: RunConfig, stream, strategy, progress: dict[str, Any]) -> dict[str, Any]:
    """The results.json content: matrix with labels, metrics, timings, parameter counts, versions."""
    task_names = [task.name for task in stream.tasks]
    task_sizes = [len(task.test) for task in stream.tasks]
    matrix = progress["rows"]
    metrics = metrics_module.all_metrics(matrix, task_sizes, class_incremental=stream.protocol == "class_incremental")
    heldout_names = [held.name for held in stream.heldout]
    if heldout_names:
        final = progress["heldout_rows"][-1]
        metrics["heldout_zero_shot"] = float(np.mean(progress["zero_shot_heldout"]))
        metrics["heldout_last"] = float(np.mean(final))
        metrics["heldout_retention"] = metrics_module.retention(progress["zero_shot_heldout"], final)
    metrics["zero_shot_avg"] = float(np.mean(progress["zero_shot_row"]))
    if stream.protocol == "class_incremental":
        # The "Don't Stop Learning" settings are class-incremental (one or several phases of one dataset).
        metrics.update(metrics_module.dont_stop_learning(matrix, task_sizes, progress["zero_shot_heldout"],
                                                         progress["heldout_rows"][-1]))
    retrieval_before = progress.get("zero_shot_retrieval", {})
    retrieval_rows = progress.get("retrieval_rows", [])
    if retrieval_before and retrieval_rows:
        metrics.update(metrics_module.retrieval_change(retrieval_before, retrieval_rows[-1]))
    return {
        "name": config.label,
        "strategy": config.strategy.get("name"),
        "protocol": stream.protocol,
        "seed": config.seed,
        "tasks": task_names,
        "task_test_sizes": task_sizes,
        "task_train_sizes": [len(task.train) for task in stream.tasks],
        "accuracy": {
            "rows": [f"after {name}" for name in task_names],
            "columns": task_names,
            "matrix": matrix,
            "zero_shot_row": progress["zero_shot_row"],
            "unit": "percent",
        },
        "heldout": {
            "datasets": heldout_names,
            "zero_shot": progress["zero_shot_heldout"],
            "after_each_task": progress["heldout_rows"],
        },
        "retrieval": {
            "sets": list(progress.get("zero_shot_retrieval", {})),
            "zero_shot": progress.get("zero_shot_retrieval", {}),
            "after_each_task": progress.get("retrieval_rows", []),
            "unit": "percent",
        },
        "metrics": metrics,
        "timing": {
            "train_seconds": progress["train_seconds"],
            "eval_seconds": progress["eval_seconds"],
            "zero_shot_eval_seconds": progress["zero_shot_eval_seconds"],
            "train_steps": progress["train_steps"],
            "train_examples": progress["train_examples"],
        },
        "losses_first_last": progress["losses"],
        "parameters": parameter_counts(strategy),
        "config": to_dict(config),
        "versions": versions(),
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "host": {"cpus": os.cpu_count(), "device": str(next(strategy.parameters()).device)},
    }
