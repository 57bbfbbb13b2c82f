"""One continual-learning run, start to finish, resumable.

The run builds everything once (backend, stream, strategy, the method's sources, the feature cache,
observers), then hands the stream to its driver: :mod:`clipcl.engine.tasks` for task streams
(class-incremental, multi-domain, X-TAIL) and :mod:`clipcl.engine.online` for online streams
(Si-Blurry). Both train through the one :class:`~clipcl.engine.trainer.Trainer`, evaluate per their
schedule and checkpoint so that a rerun of an interrupted run resumes and ends with the same results
as an uninterrupted one.
"""

from __future__ import annotations

import json
import shutil
from typing import Any

import torch
import yaml

from clipcl.checkpoint import atomic_write_text, fingerprint_digest, snapshot_state
from clipcl.config import RunConfig, config_fingerprint, to_dict
from clipcl.data.base import DataError
from clipcl.engine.context import RunContext, RunDirectory, RunError, build_sources, seed_everything
from clipcl.engine.online import run_online_stream
from clipcl.engine.runtime import DistributedRuntime, Runtime, free_port, pick_device, rendezvous_environment
from clipcl.engine.tasks import run_task_stream


def _check_or_write_config(directory: RunDirectory, config: RunConfig, restart: bool) -> None:
    fingerprint = config_fingerprint(config)
    if directory.progress.exists() or directory.results.exists():
        previous = directory.read_progress() or (json.loads(directory.results.read_text())
                                                 if directory.results.exists() else {})
        if restart:
            for path in [directory.progress, directory.results, directory.summary,
                         *directory.checkpoints.glob("*.safetensors")]:
                path.unlink(missing_ok=True)
            shutil.rmtree(directory.root / "tensorboard", ignore_errors=True)  # no curves of the old run
        elif previous.get("config_digest") not in (None, fingerprint_digest(fingerprint)):
            raise RunError(f"{directory.root} holds a run with another config; choose another output_dir "
                           "or pass --restart to overwrite it")
    directory.root.mkdir(parents=True, exist_ok=True)
    atomic_write_text(directory.config, yaml.safe_dump(to_dict(config), sort_keys=False))


# --- the run --------------------------------------------------------------------------------------


def run_experiment(config: RunConfig, *, restart: bool = False, show_progress: bool = True,
                   stop_after_task: int | None = None, stop_after_samples: int | None = None) -> dict[str, Any]:
    """Run (or resume) ``config``; returns the results dict also written to results.json.

    ``stop_after_task`` (task streams) and ``stop_after_samples`` (online streams) stop after the
    checkpoint at that point, as an interruption would (for tests).
    """
    config.validate()  # a field changed in place after loading fails here, before anything is built
    kwargs = {"restart": restart, "show_progress": show_progress, "stop_after_task": stop_after_task,
              "stop_after_samples": stop_after_samples}
    if config.train.devices > 1:
        return _spawn(config, **kwargs)
    runtime = Runtime(pick_device(config.train.accelerator), config.train.precision)
    return _run(config, runtime, **kwargs)


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
         stop_after_task: int | None, stop_after_samples: int | None) -> dict[str, Any]:
    from clipcl.data.online_stream import ONLINE_PROTOCOL, build_online_stream
    from clipcl.data.streams import build_stream
    from clipcl.engine.observers import build_observers
    from clipcl.engine.trainer import Trainer
    from clipcl.eval.cache import FeatureCache, default_cache_dir
    from clipcl.models import build_backend
    from clipcl.strategies import build_strategy

    directory = RunDirectory(config.output_dir)
    online = config.stream.protocol == ONLINE_PROTOCOL
    if runtime.is_main:
        _check_or_write_config(directory, config, restart)
    runtime.barrier()
    if online and directory.results.exists() and not restart:
        return json.loads(directory.results.read_text())  # a finished online run

    seed_everything(config.seed)
    backend = build_backend(config.model).to(runtime.device)
    stream = build_online_stream(config.stream, config.seed) if online else build_stream(config.stream, config.seed)
    strategy = build_strategy(backend, config.strategy).to(runtime.device)
    if online and strategy.needs_task_boundaries:
        raise DataError(f"strategy {config.strategy.get('name')!r} needs task boundaries; online streams have "
                       "none (online strategies: zero_shot, finetune, sit, er, lwf)")
    strategy.eval()
    reference = snapshot_state(strategy)
    cache_dir = config.eval.cache_dir if config.eval.cache_dir is not None else default_cache_dir()
    cache = FeatureCache(cache_dir or None, enabled=config.eval.feature_cache)
    built, memory = build_sources(strategy, config, runtime)
    strategy.attach(runtime, cache, built)
    observers = build_observers(config.observe, str(directory.root), is_main=runtime.is_main,
                                show_progress=show_progress)
    context = RunContext(
        config=config, runtime=runtime, directory=directory, strategy=strategy, stream=stream, cache=cache,
        trainer=Trainer(strategy, runtime, config.train, observers), observers=observers,
        fingerprint=config_fingerprint(config), reference=reference, show_progress=show_progress, memory=memory,
        step_sources={name: source for name, source in built.items() if source.spec.per_step})
    try:
        if online:
            results = run_online_stream(context, stop_after_samples)
        else:
            results = run_task_stream(context, stop_after_task)
        if not results.get("interrupted"):
            observers.run_finished(results)
    finally:
        observers.close()
    runtime.barrier()
    return results


