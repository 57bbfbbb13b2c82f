"""Train one (method, seed) once and evaluate it under several protocols after every task.

For protocols that differ only at test (MTIL and X-TAIL; ODCL-TIL and ODCL-CIL), training does not
depend on the protocol, so a benchmark that reports both need not train the same model twice. The
loop here drives the engine's own pieces in the order a run (``clipcl.run.run_experiment``) does:
the run seed, then the backend, the streams and the strategy; the strategy's sources built and
attached (``standalone_context``); then per task the task's seed (``task_seed``), ``before_task``,
the trainer (which calls ``begin_training``), ``after_task``, and one evaluation row per protocol.
The metrics are the ones a run's results.json holds for the same matrix.

:func:`cached_record` keeps a benchmark resumable: a finished (method, seed) is read back from its
JSON file, not trained again.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

from clipcl.atomic_files import atomic_write_json
from clipcl.checkpoint import fingerprint_digest
from clipcl.config import RunConfig, config_fingerprint
from clipcl.data.streams import OPEN_DOMAIN_PROTOCOLS, build_stream
from clipcl.engine.runtime import Runtime
from clipcl.engine.tasks import standalone_context, train_one_task
from clipcl.eval import metrics as metrics_module
from clipcl.eval.cache import FeatureCache, default_cache_dir
from clipcl.eval.evaluator import eval_batch_size, evaluate_row
from clipcl.models import build_backend
from clipcl.run import seed_everything, task_seed
from clipcl.strategies import build_strategy


def stream_metrics(protocol: str, task_sizes: list[int], rows: dict) -> dict[str, float]:
    """A protocol's metrics from its rows, with the keys and definitions of a run's results.json
    (``clipcl.engine.tasks.build_results``): the matrix metrics, and for the held-out sets the mean
    accuracy before training, after the last task and its retention."""
    values = metrics_module.all_metrics(rows["rows"], task_sizes, class_incremental=protocol == "class_incremental",
                                        open_domain=protocol in OPEN_DOMAIN_PROTOCOLS)
    if rows["heldout"] and rows["heldout"][-1]:
        values["heldout_zero_shot"] = float(np.mean(rows["heldout_zero_shot"]))
        values["heldout_last"] = float(np.mean(rows["heldout"][-1]))
        values["heldout_retention"] = metrics_module.retention(rows["heldout_zero_shot"], rows["heldout"][-1])
    values["zero_shot_avg"] = float(np.mean(rows["zero_shot"]))
    return values


def _without_protocol(config: RunConfig) -> dict:
    """Everything in ``config`` that changes a number, but the protocol."""
    data = json.loads(config_fingerprint(config))
    data["stream"].pop("protocol")
    return data


def train_and_evaluate(configs: dict[str, RunConfig], train: bool = True) -> dict:
    """Train the strategy of the first config once on its stream and evaluate every config's stream
    (one per protocol) before training and after each task.

    The configs may differ only in ``stream.protocol``: every stream must train on the same images
    (checked by fingerprint). ``train=False`` skips the per-task hooks and training (a method with
    nothing to train; its numbers are the same either way). Returns ``rows`` (per protocol: the
    zero-shot row, the rows after each task and the held-out accuracies of both), ``metrics`` (per
    protocol, :func:`stream_metrics`), per task ``train_seconds``, ``train_steps``, ``losses`` (every
    optimizer step's loss) and ``losses_first_last`` (as in results.json), and the strategy's
    ``strategy_report`` on the first stream. Runs on the CPU, as the benchmarks using it do.
    """
    first = next(iter(configs.values()))
    if any(_without_protocol(config) != _without_protocol(first) for config in configs.values()):
        raise ValueError("train_and_evaluate's configs may differ only in stream.protocol")
    seed = first.seed
    seed_everything(seed)
    backend = build_backend(first.model)
    streams = {protocol: build_stream(config.stream, seed) for protocol, config in configs.items()}
    fingerprints = {protocol: [task.train.fingerprint() for task in stream.tasks] for protocol, stream in streams.items()}
    if len({tuple(prints) for prints in fingerprints.values()}) != 1:
        raise AssertionError(f"the protocols {', '.join(configs)} must train on the same data")
    strategy = build_strategy(backend, first.strategy)
    runtime = Runtime(torch.device("cpu"))
    cache = FeatureCache(default_cache_dir())
    # The strategy's sources built and the runtime and cache attached, as a run does.
    context = standalone_context(first, strategy, next(iter(streams.values())), runtime, cache)
    strategy.eval()
    batch_size = eval_batch_size(first.eval.batch_size, runtime.device)
    rows = {protocol: {"zero_shot": None, "rows": [], "heldout_zero_shot": None, "heldout": []} for protocol in configs}
    for protocol, stream in streams.items():
        row, heldout, _ = evaluate_row(strategy, stream, -1, runtime, batch_size, cache, show_progress=False)
        rows[protocol].update(zero_shot=row, heldout_zero_shot=heldout)
    train_seconds, train_steps, losses = [], [], []
    for task in context.stream.tasks:
        if train:
            seed_everything(task_seed(seed, task.index))
            strategy.before_task(task)
            stats = train_one_task(context, task)
            strategy.after_task(task)
            train_seconds.append(stats.seconds)
            train_steps.append(stats.steps)
            losses.append(list(stats.losses))
        for protocol, stream in streams.items():
            row, heldout, _ = evaluate_row(strategy, stream, task.index, runtime, batch_size, cache,
                                           show_progress=False)
            rows[protocol]["rows"].append(row)
            rows[protocol]["heldout"].append(heldout)
    metrics = {protocol: stream_metrics(protocol, [len(task.test) for task in stream.tasks], rows[protocol])
               for protocol, stream in streams.items()}
    return {"metrics": metrics, "rows": rows, "train_seconds": train_seconds, "train_steps": train_steps,
            "losses": losses, "losses_first_last": [[task[0], task[-1]] if task else [None, None] for task in losses],
            "strategy_report": strategy.final_report(context.stream, runtime)}


def config_digests(configs: dict[str, RunConfig]) -> dict[str, str]:
    """Per protocol, the digest of everything in its config that changes a number (what a run checks
    before it resumes: ``clipcl.config.config_fingerprint``)."""
    return {protocol: fingerprint_digest(config_fingerprint(config)) for protocol, config in configs.items()}


def same_settings(saved, current) -> bool:
    """Whether a saved record's identity matches the current one. A key only the current identity has
    is a config field added since the record was made; new fields default to the old behaviour, so it
    does not make the settings differ. Anything else must be equal."""
    if isinstance(saved, dict) and isinstance(current, dict):
        return all(key in current and same_settings(value, current[key]) for key, value in saved.items())
    return saved == current


def cached_record(path: str | Path, compute: Callable[[], dict], identity: dict | None = None) -> dict:
    """The record saved at ``path`` when there is one (a finished (method, seed)); otherwise
    ``compute()``'s, with the wall ``seconds`` it took and ``identity`` added, written atomically (an
    interrupted benchmark leaves no half-written record).

    A saved record whose ``identity`` (e.g. :func:`config_digests`) differs from the given one was
    made with other settings (other caps, epochs or rates): that stops the benchmark with one line
    rather than mixing it in (:func:`same_settings`). Records saved before identities were kept have
    none and are read back.
    """
    path = Path(path)
    if path.exists():
        record = json.loads(path.read_text())
        if identity is not None and not same_settings(record.get("identity", identity), identity):
            raise SystemExit(f"{path} was made with other settings; remove it or choose another --output-dir")
        return record
    started = time.perf_counter()
    record = compute()
    record["seconds"] = time.perf_counter() - started
    record["identity"] = identity
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_json(path, record)
    return record
