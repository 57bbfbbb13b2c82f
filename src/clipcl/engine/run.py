"""One continual-learning run, start to finish, resumable.

The run builds everything once (backend, stream, strategy, the method's sources, the feature cache,
observers), then hands the stream to its driver: :mod:`clipcl.engine.tasks` for task streams
(class-incremental, multi-domain, X-TAIL) and :mod:`clipcl.engine.online` for online streams
(Si-Blurry). Both train through the one :class:`~clipcl.engine.trainer.Trainer`, evaluate per their
schedule and checkpoint so that a rerun of an interrupted run resumes and ends with the same results
as an uninterrupted one.
"""

from __future__ import annotations

import logging
import sys
from typing import Any

import torch
import yaml

from clipcl.atomic_files import atomic_write_text
from clipcl.checkpoint import fingerprint_digest, snapshot_state
from clipcl.config import ConfigError, RunConfig, config_fingerprint, to_dict
from clipcl.data.base import DataError
from clipcl.engine.context import (
    RunContext,
    RunDirectory,
    RunError,
    build_sources,
    check_same_data,
    data_fingerprints,
    read_json_file,
    seed_everything,
)
from clipcl.engine.online import run_online_stream
from clipcl.engine.run_folder import MARKER_NAME, RunLock, previous_run, replace_outputs, write_marker
from clipcl.engine.runtime import (
    DistributedRuntime,
    Runtime,
    free_port,
    launched_processes,
    pick_device,
    rendezvous_environment,
)
from clipcl.engine.tasks import run_task_stream
from clipcl.errors import UserError


def check_previous_run(directory: RunDirectory, config: RunConfig, restart: bool) -> dict[str, Any] | None:
    """What an earlier run left in the folder (:func:`~clipcl.engine.run_folder.previous_run`), refusing
    one with another config unless ``restart``. Reads only: nothing is written before the run is built."""
    previous = previous_run(directory, restart)
    digest = fingerprint_digest(config_fingerprint(config))
    if previous and previous["measured"] and not restart and previous["config_digest"] != digest:
        raise RunError(f"{directory.root} holds a run with another config; choose another output_dir "
                       "or pass --restart to overwrite it")
    return previous


def prepare_folder(directory: RunDirectory, config: RunConfig, previous: dict[str, Any] | None,
                   restart: bool) -> None:
    """Called once the run is built and checked: replace the earlier run's outputs (``--restart``, or a
    folder whose run never measured anything), then write the marker and config.yaml."""
    digest = fingerprint_digest(config_fingerprint(config))
    if previous and (restart or (not previous["measured"] and previous["config_digest"] != digest)):
        replace_outputs(directory)
    write_marker(directory, digest)
    atomic_write_text(directory.config, yaml.safe_dump(to_dict(config), sort_keys=False))


# --- the run --------------------------------------------------------------------------------------


def run_experiment(config: RunConfig, *, restart: bool = False, resume_from_intact: bool = False,
                   show_progress: bool = True, stop_after_task: int | None = None,
                   stop_after_samples: int | None = None) -> dict[str, Any]:
    """Run (or resume) ``config``; returns the results dict also written to results.json.

    A finished run's results are returned as they are (nothing is loaded). ``restart`` replaces an
    earlier run in the folder, once the new one is built and checked; ``resume_from_intact`` resumes
    an unfinished run from the newest checkpoint that verifies when the latest is damaged. ``stop_after_task`` (task streams) and
    ``stop_after_samples`` (online streams) stop after the checkpoint at that point, as an
    interruption would (for tests).
    """
    config.validate()  # a field changed in place after loading fails here, before anything is built
    launched = launched_processes()
    if launched is not None:
        return _launched(config, launched, restart=restart, resume_from_intact=resume_from_intact,
                         show_progress=show_progress, stop_after_task=stop_after_task,
                         stop_after_samples=stop_after_samples)
    directory = RunDirectory(config.output_dir)
    lock = RunLock(directory.root).acquire()  # held by this process until the run ends, however it ends
    try:
        previous = check_previous_run(directory, config, restart)
        if previous and previous["finished"] and not restart:
            # Said even when quiet: otherwise a rerun looks like a run that trained again.
            print(f"{directory.root} holds this run, finished; its results are in {directory.results}",
                  file=sys.stderr)
            return read_json_file(directory.results)
        kwargs = {"restart": restart, "resume_from_intact": resume_from_intact, "previous": previous,
                  "show_progress": show_progress, "stop_after_task": stop_after_task,
                  "stop_after_samples": stop_after_samples}
        if config.train.devices > 1:
            return _spawn(config, **kwargs)
        runtime = Runtime(pick_device(config.train.accelerator), config.train.precision)
        return _run(config, runtime, **kwargs)
    finally:
        # A run that failed before it wrote its marker wrote nothing: a folder made for it goes again.
        lock.release(wrote_nothing=not (directory.root / MARKER_NAME).exists())


def _launched(config: RunConfig, launched: tuple[int, int, int], **kwargs) -> dict[str, Any]:
    """This process as one of torchrun's (any number of machines and processes; ``env://``). The
    world size is the launcher's: ``train.devices`` left at 1 takes it, another number must match.
    Process 0 holds the folder's lock and writes; on several machines ``output_dir`` must be on a
    filesystem they share (every process reads a resumed run's progress and checkpoint)."""
    import dataclasses

    rank, world_size, local_rank = launched
    if config.train.devices not in (1, world_size):
        raise ConfigError(f"train.devices={config.train.devices} but torchrun started {world_size} processes; "
                          "leave train.devices at 1 (it takes torchrun's number) or make them agree")
    config = dataclasses.replace(config, train=dataclasses.replace(config.train, devices=world_size))
    directory = RunDirectory(config.output_dir)
    lock = RunLock(directory.root).acquire() if rank == 0 else None
    try:
        runtime = DistributedRuntime(rank, world_size, pick_device(config.train.accelerator), config.train.precision,
                                     local_rank=local_rank)
        try:
            previous = check_previous_run(directory, config, kwargs["restart"])
            runtime.barrier()  # every process has read the folder before process 0 may change it
            if previous and previous["finished"] and not kwargs["restart"]:
                if rank == 0:
                    print(f"{directory.root} holds this run, finished; its results are in {directory.results}",
                          file=sys.stderr)
                results = read_json_file(directory.results)
            else:
                results = _run(config, runtime, previous=previous, **kwargs)
        except BaseException:
            runtime.close(synchronise=False)
            raise
        runtime.close()
        return results
    finally:
        if lock is not None:
            lock.release(wrote_nothing=not (directory.root / MARKER_NAME).exists())


def _spawn(config: RunConfig, **kwargs) -> dict[str, Any]:
    import torch.multiprocessing as mp

    # A worker's user error (bad data, a damaged checkpoint) would reach us as a wrapped traceback;
    # the worker sends its one line here instead, and we raise it as this process's error.
    user_errors = mp.get_context("spawn").SimpleQueue()
    # torch logs a warning for every sibling it terminates after one worker failed; our own line
    # says what failed, so that noise is hidden (a worker's traceback, for a bug, still shows).
    spawn_log = logging.getLogger("torch.multiprocessing.spawn")
    level = spawn_log.level
    spawn_log.setLevel(logging.ERROR)
    try:
        with rendezvous_environment(free_port()):
            mp.spawn(_worker, args=(config, kwargs, user_errors), nprocs=config.train.devices, join=True)
    except (mp.ProcessExitedException, mp.ProcessRaisedException):
        if not user_errors.empty():
            raise RunError(user_errors.get()) from None
        raise
    finally:
        spawn_log.setLevel(level)
    directory = RunDirectory(config.output_dir)
    if directory.results.exists():
        return read_json_file(directory.results)
    return {"interrupted": True, "progress": directory.read_progress()}


def _worker(rank: int, config: RunConfig, kwargs: dict[str, Any], user_errors) -> None:
    torch.set_num_threads(max(1, torch.get_num_threads() // config.train.devices))
    try:
        runtime = DistributedRuntime(rank, config.train.devices, pick_device(config.train.accelerator),
                                     config.train.precision)
        try:
            _run(config, runtime, **kwargs)
        except BaseException:
            runtime.close(synchronise=False)
            raise
        runtime.close()
    except (UserError, OSError) as error:  # what the command reports in one line, not as a bug
        if isinstance(error, OSError) and error.strerror:
            message = f"{error.filename}: {error.strerror}" if error.filename is not None else error.strerror
        else:
            message = str(error).splitlines()[0] if str(error) else type(error).__name__
        user_errors.put(message)
        raise SystemExit(2) from None


def _run(config: RunConfig, runtime: Runtime, *, restart: bool, resume_from_intact: bool,
         previous: dict[str, Any] | None, show_progress: bool, stop_after_task: int | None,
         stop_after_samples: int | None) -> dict[str, Any]:
    from clipcl.data.caption_stream import CAPTION_PROTOCOL, CAPTION_PROTOCOLS, build_caption_stream
    from clipcl.data.languages import LANGUAGE_PROTOCOL, build_language_stream
    from clipcl.data.online_stream import ONLINE_PROTOCOL, build_online_stream
    from clipcl.data.registry import check_dataset_names
    from clipcl.data.streams import build_stream
    from clipcl.data.time_stream import TIME_PROTOCOL, build_time_stream
    from clipcl.engine.evaluation import AlignmentTracker
    from clipcl.engine.observers import build_observers
    from clipcl.engine.trainer import Trainer
    from clipcl.eval.cache import FeatureCache, default_cache_dir
    from clipcl.eval.retrieval import CAPTION_SUFFIXES, load_captioned
    from clipcl.models import build_backend
    from clipcl.strategies import build_strategy

    directory = RunDirectory(config.output_dir)
    online = config.stream.protocol == ONLINE_PROTOCOL
    captions = config.stream.protocol in CAPTION_PROTOCOLS
    # Build and check everything (model, data, the method's sources) before the folder is touched:
    # a run that cannot start leaves an earlier run's results as they were. Dataset names first:
    # a typo should not wait for the model to load.
    datasets = config.stream.datasets
    stream_names = [] if captions else [*([datasets] if isinstance(datasets, str) else datasets), *config.stream.heldout]
    check_dataset_names([*stream_names,
                         *(spec for spec in config.eval.retrieval if not spec.lower().endswith(CAPTION_SUFFIXES))])
    seed_everything(config.seed)
    backend = build_backend(config.model).to(runtime.device)
    if online:
        stream = build_online_stream(config.stream, config.seed)
    elif config.stream.protocol == LANGUAGE_PROTOCOL:
        stream = build_language_stream(config.stream, config.seed)
    elif config.stream.protocol == TIME_PROTOCOL:
        from clipcl.engine.time_steps import check_budgets

        stream = build_time_stream(config.stream, config.time, config.seed)
        check_budgets(config, stream)
    elif config.stream.protocol == CAPTION_PROTOCOL:
        stream = build_caption_stream(config.stream, config.seed)
    else:
        stream = build_stream(config.stream, config.seed)
    strategy = build_strategy(backend, config.strategy).to(runtime.device)
    if online and strategy.needs_task_boundaries:
        raise DataError(f"strategy {config.strategy.get('name')!r} needs task boundaries; online streams have "
                       "none (online strategies: zero_shot, finetune, sit, er, lwf)")
    strategy.eval()
    reference = snapshot_state(strategy)
    cache_dir = config.eval.cache_dir if config.eval.cache_dir is not None else default_cache_dir()
    cache = FeatureCache(cache_dir or None, enabled=config.eval.feature_cache)
    built, memory = build_sources(strategy, config, runtime)
    if captions and memory is not None:
        raise DataError(f"strategy {config.strategy.get('name')!r} replays labelled samples; a caption stream "
                        "(stream.protocol: captions) has no labels")
    retrieval_sets = [] if online else [load_captioned(spec, config.eval.retrieval_images, config.stream.data_root)
                                        for spec in config.eval.retrieval]
    data = data_fingerprints(stream, built, retrieval_sets)
    if config.model.weights is not None:  # the starting weights shape every number, as the data does
        import hashlib
        from pathlib import Path

        data["model weights"] = hashlib.sha256(Path(config.model.weights).read_bytes()).hexdigest()[:16]
    if previous and not restart and previous["progress"]:
        check_same_data(previous["progress"].get("data"), data, directory.progress)
    if runtime.is_main:
        prepare_folder(directory, config, previous, restart)
    runtime.barrier()
    strategy.attach(runtime, cache, built)
    observers = build_observers(config.observe, str(directory.root), is_main=runtime.is_main,
                                show_progress=show_progress)
    context = RunContext(
        config=config, runtime=runtime, directory=directory, strategy=strategy, stream=stream, cache=cache,
        trainer=Trainer(strategy, runtime, config.train, observers), observers=observers,
        fingerprint=config_fingerprint(config), reference=reference, show_progress=show_progress, memory=memory,
        step_sources={name: source for name, source in built.items() if source.spec.per_step},
        retrieval_sets=retrieval_sets, data=data, resume_from_intact=resume_from_intact,
        alignment=AlignmentTracker(directory.checkpoints, runtime.is_main) if config.eval.alignment else None)
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


