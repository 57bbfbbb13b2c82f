"""Task streams (class-incremental, multi-domain, X-TAIL): one experience per task.

Per task: ``before_task`` -> the trainer's steps -> ``after_task`` -> evaluate every task of the stream
(future ones included) and the held-out sets -> checkpoint + progress file. The zero-shot row is
evaluated first. Each task's training is seeded from (seed, task index) and a replay memory is
rebuilt by planning the finished tasks again, so a resumed run ends with the same results as an
uninterrupted one.
"""

from __future__ import annotations

import sys
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader

from clipcl.atomic_files import atomic_write_json
from clipcl.checkpoint import (
    CheckpointError,
    DamagedCheckpoint,
    fingerprint_digest,
    load_checkpoint,
    read_verified,
    save_checkpoint,
)
from clipcl.config import to_dict
from clipcl.data.caption_stream import CAPTION_PROTOCOLS
from clipcl.data.streams import OPEN_DOMAIN_PROTOCOLS
from clipcl.data.time_stream import TIME_PROTOCOL
from clipcl.engine.batches import (
    CaptionStreamImages,
    GlobalBatchSampler,
    PlanSampler,
    StreamImages,
    collate_captions,
    collate_plan,
)
from clipcl.engine.compute import Compute, measuring, per_task_compute
from clipcl.engine.context import (
    RunContext,
    RunError,
    host_facts,
    run_facts,
    seed_everything,
    task_seed,
    write_results,
)
from clipcl.engine.evaluation import evaluate_state
from clipcl.engine.time_steps import start_from_initial_weights, step_warmup, time_results, time_step_plans
from clipcl.engine.trainer import ExperienceStats, grouped
from clipcl.eval import metrics as metrics_module
from clipcl.eval.evaluator import eval_batch_size


def task_batches(context: RunContext, task) -> GlobalBatchSampler:
    """The micro-batches a task trains on: full epochs, cut to the schedule's steps."""
    config, runtime = context.config.train, context.runtime
    seed = task_seed(context.config.seed, task.index)
    full = GlobalBatchSampler(len(task.train), config.batch_size, config.epochs, seed, runtime.rank, runtime.world_size)
    total_steps = len(full) // config.grad_accumulation
    if config.max_steps_per_task is not None:
        total_steps = min(total_steps, config.max_steps_per_task)
    total_steps = max(total_steps, 1)
    return GlobalBatchSampler(len(task.train), config.batch_size, config.epochs, seed, runtime.rank,
                              runtime.world_size, limit=total_steps * config.grad_accumulation)


def train_task(context: RunContext, task, images: StreamImages) -> ExperienceStats:
    """Train on one task. Call between ``before_task`` and ``after_task``."""
    config, trainer = context.config.train, context.trainer
    stats = ExperienceStats()
    time_stream = context.stream.protocol == TIME_PROTOCOL
    if time_stream:  # drawn from the mode's pool, the budget's steps (clipcl.engine.time_steps)
        batches = time_step_plans(context, task, task_seed(context.config.seed, task.index))
    else:
        batches = task_batches(context, task)
    total_steps = max(1, len(batches) // config.grad_accumulation)
    steps_per_epoch = batches.batches_per_epoch / config.grad_accumulation
    warmup = step_warmup(context.config.time, config, task.index) if time_stream else None
    if not trainer.begin(total_steps, config.lr_schedule or "cosine", steps_per_epoch, warmup_steps=warmup):
        return stats
    for source in context.step_sources.values():
        if getattr(source, "follows_task", False):
            source.use_dataset(task.train)
        # Seeded from the global generator, which the run seeds per task: the same draws on resume
        # and on every process.
        source.start(context.strategy.backend, int(torch.randint(0, 2**62, (1,)).item()), batches.per_process_batch)
    trainer.step_sources = context.step_sources
    if hasattr(batches, "loader"):  # a streamed time step reads its shards itself
        loader = batches.loader()
    else:
        plans = batches if time_stream else PlanSampler(batches, task.index, task_seed(context.config.seed, task.index),
                                                        getattr(task.train, "labels", None), context.memory)
        collate = collate_captions if isinstance(images, CaptionStreamImages) else collate_plan
        loader = DataLoader(images, batch_sampler=plans, num_workers=config.num_workers, collate_fn=collate,
                            pin_memory=context.runtime.device.type == "cuda")
    context.observers.experience_started(task.name, task.index, total_steps)
    trainer.train_groups(grouped(loader, config.grad_accumulation), task, stats, max_steps=total_steps)
    context.observers.experience_finished(task.name, task.index, {
        "steps": stats.steps, "seconds": stats.seconds,
        **({"first_loss": stats.first_loss, "last_loss": stats.last_loss} if stats.losses else {})})
    for source in context.step_sources.values():
        source.stop()
    trainer.step_sources = {}
    return stats


def stream_images(context: RunContext) -> StreamImages | CaptionStreamImages:
    """Every task's training images (a caption stream's: its pairs), for the loader; also tells the
    trainer each replayed sample's class."""
    stream = context.stream
    transform = context.strategy.backend.train_preprocess
    if stream.protocol in CAPTION_PROTOCOLS:
        # A time step's batches mix steps: image ids are made distinct across steps (positives stay right).
        return CaptionStreamImages({task.index: task.train for task in stream.tasks}, transform,
                                   load_pixels=context.strategy.uses_training_images,
                                   distinct_ids=stream.protocol == TIME_PROTOCOL)
    context.trainer.class_of = lambda experience, label: stream.tasks[experience].classes[
        stream.tasks[experience].target_of_label[label]]
    return StreamImages({task.index: task.train for task in stream.tasks}, transform)


def replan_memory(context: RunContext, completed: int) -> None:
    """Rebuild the replay memory of a resumed run: plan the finished tasks again (no image is loaded)."""
    if context.memory is None or not context.strategy.trainable_parameters():
        return
    for task in context.stream.tasks[: completed + 1]:
        plans = PlanSampler(task_batches(context, task), task.index, 0, task.train.labels, context.memory)
        for _ in plans:
            pass


PER_TASK_PROGRESS = ("rows", "heldout_rows", "retrieval_rows", "alignment_rows", "train_seconds", "eval_seconds",
                     "train_steps", "train_examples", "losses", "compute")
"""The progress lists with one entry per finished task."""


def last_intact_task(context: RunContext, progress: dict[str, Any], completed: int) -> int:
    """The task to resume after: ``completed`` when its checkpoint verifies. A missing or damaged one
    ends the run with one line naming it, or, with ``--resume-from-intact``, the run goes back to the
    newest earlier checkpoint that verifies (-1: the start) and forgets the later tasks' rows in
    ``progress``; those tasks train again, from the same seeds, so the numbers come out the same."""
    directory = context.directory
    for task_index in range(completed, -1, -1):
        path = directory.checkpoint(task_index)
        try:
            read_verified(path)
            break
        except (FileNotFoundError, DamagedCheckpoint) as error:
            problem = f"checkpoint {path} is missing" if isinstance(error, FileNotFoundError) else str(error)
            if not context.resume_from_intact:
                raise RunError(f"{problem}; pass --resume-from-intact to go back to the last intact checkpoint "
                               "(later tasks train again), or --restart") from None
            if context.runtime.is_main and context.show_progress:
                print(f"{problem}: going back one task", file=sys.stderr)
    else:
        task_index = -1
    if task_index != completed:
        for key in PER_TASK_PROGRESS:
            if key in progress:
                progress[key] = progress[key][: task_index + 1]
        progress["completed_tasks"] = task_index
    return task_index


def run_task_stream(context: RunContext, stop_after_task: int | None) -> dict[str, Any]:
    config, runtime, strategy, stream = context.config, context.runtime, context.strategy, context.stream
    directory, show_progress = context.directory, context.show_progress
    progress = directory.read_progress() or {}
    completed = progress.get("completed_tasks", -1)
    if completed >= 0:
        completed = last_intact_task(context, progress, completed)
    if completed >= 0:
        strategy.restore_structure(stream.tasks[: completed + 1])
        loaded = load_checkpoint(directory.checkpoint(completed), strategy, context.fingerprint)
        if loaded != completed:
            raise CheckpointError(f"checkpoint {directory.checkpoint(completed)} is from task {loaded}")
        replan_memory(context, completed)
        if runtime.is_main and show_progress:
            print(f"resuming {directory.root} after task {completed} ({stream.tasks[completed].name})",
                  file=sys.stderr)
    context.observers.run_started(str(directory.root), to_dict(config),
                                  str(directory.checkpoint(completed)) if completed >= 0 else None,
                                  global_step=sum(progress.get("train_steps", [])))
    context.trainer.global_step = sum(progress.get("train_steps", []))
    images = stream_images(context)

    batch_size = eval_batch_size(config.eval.batch_size, runtime.device)
    # Loader workers for evaluation on a GPU (they change no number: preprocessing is deterministic).
    workers = config.train.num_workers if runtime.device.type == "cuda" else 0
    if "zero_shot_row" not in progress:
        if config.eval.zero_shot_row:
            state = evaluate_state(context, -1, batch_size, workers)
            row, heldout, seconds = state["row"], state["heldout"], state["seconds"]
            retrieval, alignment = state["retrieval"], state["alignment"]
        else:  # eval.zero_shot_row=false: nothing is measured before training; metrics that need it are left out
            row, heldout, seconds, retrieval, alignment = None, None, None, {}, {}
        progress.update(config_digest=fingerprint_digest(context.fingerprint), data=context.data,
                        completed_tasks=-1, zero_shot_row=row,
                        zero_shot_heldout=heldout, zero_shot_eval_seconds=seconds, rows=[], heldout_rows=[],
                        train_seconds=[], eval_seconds=[], train_steps=[], train_examples=[], losses=[],
                        compute=[], zero_shot_retrieval=retrieval, retrieval_rows=[], zero_shot_alignment=alignment,
                        alignment_rows=[])
        if row is not None:
            context.observers.evaluated("row", 0, {f"task/{task.name}": value for task, value in zip(stream.tasks, row)})
        if runtime.is_main:
            atomic_write_json(directory.progress, progress)

    for task in stream.tasks[completed + 1:]:
        seed_everything(task_seed(config.seed, task.index))
        if stream.protocol == TIME_PROTOCOL:
            start_from_initial_weights(context)  # restart / oracle only
        compute = Compute()
        with measuring(compute):  # the task's hooks spend too (a teacher's snapshot, a calibration)
            strategy.before_task(task)
            stats = train_task(context, task, images)
            strategy.after_task(task)
        compute.samples_seen, compute.optimizer_steps = stats.examples, stats.steps
        compute = compute.summed(runtime)
        state = evaluate_state(context, task.index, batch_size, workers)
        row, heldout, eval_seconds = state["row"], state["heldout"], state["seconds"]
        step = context.trainer.global_step
        context.observers.evaluated("row", step, {f"task/{t.name}": value for t, value in zip(stream.tasks, row)})
        if heldout:
            context.observers.evaluated("heldout", step, {h.name: v for h, v in zip(stream.heldout, heldout)})
        progress["rows"].append(row)
        progress["heldout_rows"].append(heldout)
        progress["retrieval_rows"].append(state["retrieval"])
        progress.setdefault("alignment_rows", []).append(state["alignment"])
        context.observers.evaluated("retrieval", step, {f"{name}/{key}": value
                                                        for name, recalls in progress["retrieval_rows"][-1].items()
                                                        for key, value in recalls.items()})
        progress["train_seconds"].append(stats.seconds)
        progress["eval_seconds"].append(eval_seconds)
        progress["train_steps"].append(stats.steps)
        progress["train_examples"].append(stats.examples)
        progress["losses"].append([stats.first_loss, stats.last_loss])
        progress.setdefault("compute", []).append(compute.as_dict())
        progress["completed_tasks"] = task.index
        if runtime.is_main:
            # Checkpoint first, progress second: progress never points at a checkpoint not yet written.
            save_checkpoint(directory.checkpoint(task.index), strategy, context.reference, context.fingerprint,
                            task.index)
            atomic_write_json(directory.progress, progress)
            if show_progress:
                cells = "  ".join(f"{value:5.1f}" for value in row)
                print(f"after {task.name}: {cells}", file=sys.stderr)
        runtime.barrier()
        if stop_after_task is not None and task.index >= stop_after_task and task.index < len(stream.tasks) - 1:
            return {"interrupted": True, "progress": progress}

    results = build_results(context, progress)
    report = strategy.final_report(stream, runtime)
    if report:
        results["strategy_report"] = report
    write_results(context, results)
    return results


def build_results(context: RunContext, progress: dict[str, Any]) -> dict[str, Any]:
    """The results.json content: matrix with labels, metrics, timings, parameter counts, versions."""
    config, stream = context.config, context.stream
    task_names = [task.name for task in stream.tasks]
    captions = stream.protocol in CAPTION_PROTOCOLS
    # A caption phase's size is its number of test images (its rows are captions).
    task_sizes = [task.test.num_images if captions else len(task.test) for task in stream.tasks]
    matrix = progress["rows"]
    metrics = metrics_module.all_metrics(matrix, task_sizes, class_incremental=stream.protocol == "class_incremental",
                                         open_domain=stream.protocol in OPEN_DOMAIN_PROTOCOLS,
                                         languages=stream.protocol == "languages", time=stream.protocol == TIME_PROTOCOL)
    heldout_names = [held.name for held in stream.heldout]
    zero_shot_heldout = progress["zero_shot_heldout"]  # None with eval.zero_shot_row=false
    if heldout_names:
        final = progress["heldout_rows"][-1]
        metrics["heldout_last"] = float(np.mean(final))
        if zero_shot_heldout is not None:
            metrics["heldout_zero_shot"] = float(np.mean(zero_shot_heldout))
            metrics["heldout_retention"] = metrics_module.retention(zero_shot_heldout, final)
    if progress["zero_shot_row"] is not None:
        metrics["zero_shot_avg"] = float(np.mean(progress["zero_shot_row"]))
    if stream.protocol == "class_incremental":
        # The "Don't Stop Learning" settings are class-incremental (one or several phases of one dataset).
        metrics.update(metrics_module.dont_stop_learning(matrix, task_sizes, zero_shot_heldout,
                                                         progress["heldout_rows"][-1]))
    retrieval_before = progress.get("zero_shot_retrieval", {})
    retrieval_rows = progress.get("retrieval_rows", [])
    if retrieval_before and retrieval_rows:
        # eval.retrieval's sets only: a caption stream's phases and held-out sets are its matrix and heldout.
        names = {captioned.name for captioned in context.retrieval_sets}
        metrics.update(metrics_module.retrieval_change({k: v for k, v in retrieval_before.items() if k in names},
                                                       {k: v for k, v in retrieval_rows[-1].items() if k in names}))
    alignment_rows = progress.get("alignment_rows", [])
    if alignment_rows:
        metrics.update(metrics_module.alignment_change(progress.get("zero_shot_alignment") or {}, alignment_rows[-1]))
    facts = run_facts(context)
    return {
        "name": config.label,
        "strategy": config.strategy.get("name"),
        "protocol": stream.protocol,
        "seed": config.seed,
        "config_digest": fingerprint_digest(context.fingerprint),
        "data": context.data,
        "tasks": task_names,
        "task_test_sizes": task_sizes,
        "task_train_sizes": [len(task.train) for task in stream.tasks],
        "accuracy": {
            "rows": [f"after {name}" for name in task_names],
            "columns": task_names,
            "matrix": matrix,
            "zero_shot_row": progress["zero_shot_row"],
            "unit": "percent",
            # Caption streams: retrieval on each phase's test pairs, not classification.
            "measure": ("r_mean (R@1, R@5, R@10 both ways)" if stream.protocol == "languages" else
                        "mean R@1 (image->text, text->image)" if captions else "top-1 accuracy"),
        },
        "heldout": {
            "datasets": heldout_names,
            "zero_shot": progress["zero_shot_heldout"],
            "after_each_task": progress["heldout_rows"],
        },
        "retrieval": {
            "sets": [captioned.name for captioned in context.retrieval_sets],
            "zero_shot": progress.get("zero_shot_retrieval", {}),
            "after_each_task": progress.get("retrieval_rows", []),
            "unit": "percent",
        },
        "alignment": {
            "sets": sorted(progress.get("zero_shot_alignment") or (alignment_rows[-1] if alignment_rows else {})),
            "zero_shot": progress.get("zero_shot_alignment", {}),
            "after_each_task": alignment_rows,
            "definitions": "docs/metrics.md#image-text-alignment",
        },
        "metrics": metrics,
        "timing": {
            "train_seconds": progress["train_seconds"],
            "eval_seconds": progress["eval_seconds"],
            "zero_shot_eval_seconds": progress["zero_shot_eval_seconds"],
            "train_steps": progress["train_steps"],
            "train_examples": progress["train_examples"],
        },
        "compute": per_task_compute(progress.get("compute", []), progress["train_seconds"], progress["eval_seconds"]),
        **({"time": time_results(context)} if stream.protocol == TIME_PROTOCOL else {}),
        "losses_first_last": progress["losses"],
        "parameters": facts["parameters"],
        "config": facts["config"],
        "versions": facts["versions"],
        "created": facts["created"],
        "host": host_facts(context),
    }


def standalone_context(config, strategy, stream, runtime, cache) -> RunContext:
    """A context for driving tasks by hand (benchmarks that train once and evaluate several ways):
    the strategy's sources built and attached, no run directory, no observers."""
    from clipcl.config import config_fingerprint
    from clipcl.engine.context import RunDirectory, build_sources
    from clipcl.engine.observers import Observers
    from clipcl.engine.trainer import Trainer

    built, memory = build_sources(strategy, config, runtime)
    strategy.attach(runtime, cache, built)
    observers = Observers()
    from clipcl.engine.evaluation import AlignmentTracker

    return RunContext(config=config, runtime=runtime, directory=RunDirectory(config.output_dir), strategy=strategy,
                      stream=stream, cache=cache, trainer=Trainer(strategy, runtime, config.train, observers),
                      observers=observers, fingerprint=config_fingerprint(config), reference={},
                      show_progress=False, memory=memory,
                      step_sources={name: source for name, source in built.items() if source.spec.per_step},
                      alignment=AlignmentTracker(None, runtime.is_main))


def train_one_task(context: RunContext, task) -> ExperienceStats:
    """``train_task`` with the stream's training images built here (see :func:`standalone_context`)."""
    return train_task(context, task, stream_images(context))


def model_states(context: RunContext):
    """Yield -1 (the model before training), then each task's index once the model has trained on it,
    with the run's per-task seeding: the states a run evaluates, for benchmarks and tests that
    evaluate each state several ways."""
    config, strategy = context.config, context.strategy
    yield -1
    for task in context.stream.tasks:
        strategy.before_task(task)
        seed_everything(task_seed(config.seed, task.index))
        train_one_task(context, task)
        strategy.after_task(task)
        yield task.index
