"""Online streams (Si-Blurry): one pass, anytime evaluation, mid-stream resume.

The stream's training images arrive once, in chunks of ``train.batch_size``
(:mod:`clipcl.data.online_stream`); the learner only learns which classes have appeared so far.
Every group of ``train.grad_accumulation`` chunks (plus whatever the method replays) is used for
``train.online_iter`` optimizer steps by the same trainer as task streams (with
``train.online_reaugment``, each step on a fresh seeded augmentation of the same images); the learning rate is
constant unless ``train.lr_schedule`` says otherwise (the stream has no known end). Every
``eval.eval_period`` samples, and at the end, the model is evaluated on the test images of every
class seen so far, among those classes: the anytime accuracy curve, its area A_auc and its last
point A_last. Held-out datasets give zero-shot retention before and after the stream.

After every evaluation the run checkpoints: the changed weights, the optimizer, the random state,
the curve so far and the arrivals. A rerun of an interrupted run loads the latest checkpoint, plans
the consumed chunks again without loading images (so a replay memory is rebuilt exactly) and goes
on, ending with the same results as an uninterrupted run.
"""

from __future__ import annotations

import sys
import time
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader

from clipcl.atomic_files import atomic_write_json
from clipcl.checkpoint import (
    CheckpointError,
    DamagedCheckpoint,
    atomic_save_safetensors,
    fingerprint_digest,
    load_checkpoint,
    read_verified,
    save_checkpoint,
)
from clipcl.config import to_dict
from clipcl.data.base import SubsetDataset
from clipcl.data.online import a_last, anytime_accuracy_auc
from clipcl.data.online_stream import ONLINE_PROTOCOL, Arrivals
from clipcl.engine.batches import OnlineChunks, PlanSampler, StreamImages, collate_plan
from clipcl.engine.compute import Compute, measuring, per_task_compute
from clipcl.engine.context import RunContext, RunError, host_facts, run_facts, write_results
from clipcl.engine.evaluation import labelled_set
from clipcl.engine.trainer import ExperienceStats, grouped, grouped_views
from clipcl.eval.evaluator import count_correct, eval_batch_size
from clipcl.eval.metrics import retention
from clipcl.eval.text_cache import RowText, stream_classes


def anytime_accuracy(context: RunContext, arrivals: Arrivals) -> float:
    """Accuracy (%) on the test images of every class seen so far, among those classes."""
    stream = context.stream
    seen = np.asarray(arrivals.seen_labels, dtype=np.int64)
    indices = np.flatnonzero(np.isin(stream.test.labels, seen))
    if not len(indices):
        return float("nan")
    subset = SubsetDataset(stream.test, indices)
    correct, total = count_correct(context.strategy, subset, list(arrivals.task.classes),
                                   dict(arrivals.task.target_of_label), None, context.runtime,
                                   eval_batch_size(context.config.eval.batch_size, context.runtime.device),
                                   context.cache, False, _row_text(context))
    return 100.0 * correct / total


def _row_text(context: RunContext) -> RowText:
    # One canonical encode of every class of the stream per model state, cached across evaluations
    # (the seen classes only grow, and a frozen text tower is then encoded once per run).
    return RowText(context.strategy, stream_classes(context.stream), context.runtime, context.cache)


def heldout_accuracies(context: RunContext, alignment_row: int | None = None) -> list[float]:
    """Accuracy (%) on every held-out set. With ``alignment_row`` (-1 before the stream, 0 after it) and
    ``eval.alignment`` on, also the alignment measures of the held-out sets and of the stream's test
    set (all its classes), from the same features, into ``context.online_alignment``."""
    values, text = [], _row_text(context)
    batch_size = eval_batch_size(context.config.eval.batch_size, context.runtime.device)
    measure = alignment_row is not None and context.config.eval.alignment
    stream = context.stream
    sets = {}

    def accuracy(key, dataset, classes, target_of_label) -> float:
        kept = [] if measure else None
        correct, total = count_correct(context.strategy, dataset, classes, target_of_label, None, context.runtime,
                                       batch_size, context.cache, False, text, keep=kept)
        if measure:
            sets[key] = labelled_set({"images": kept[0], "texts": text.features(classes, None),
                                      "classes": [target_of_label[int(label)] for label in dataset.labels]},
                                     context.config.eval.alignment_images, context.runtime)
        return 100.0 * correct / total

    for held in stream.heldout:
        values.append(accuracy(f"held-out/{held.name}", held.test, held.classes, held.target_of_label))
    if measure:
        accuracy("stream/test", stream.test, list(stream.classes), {label: label for label in range(len(stream.classes))})
        context.online_alignment = context.alignment.measure(alignment_row, sets)
    return values


# --- mid-stream checkpoints -------------------------------------------------------------------------


def _state_path(context: RunContext, chunks: int):
    return context.directory.checkpoints / f"online_state_{chunks:06d}.safetensors"


def _model_path(context: RunContext, chunks: int):
    return context.directory.checkpoints / f"online_model_{chunks:06d}.safetensors"


def save_online(context: RunContext, progress: dict, chunks: int) -> None:
    """Weights, optimizer, random state and the method's extra state after ``chunks`` chunks, then the
    progress file that points at them (so a crash leaves the previous checkpoint in force)."""
    trainer, strategy = context.trainer, context.strategy
    if context.runtime.is_main:
        save_checkpoint(_model_path(context, chunks), strategy, context.reference, context.fingerprint, chunks)
        # The global random state (dropout, router noise) after the evaluation; every process has the
        # same one (equal blocks, equal draws), so the main process's stands for all.
        tensors = {"rng/torch": torch.get_rng_state()}
        if torch.cuda.is_available():
            for index, state in enumerate(torch.cuda.get_rng_state_all()):
                tensors[f"rng/cuda/{index}"] = state
        scheduler_state = {}
        if trainer.optimizer is not None:
            for index, state in trainer.optimizer.state_dict()["state"].items():
                for key, value in state.items():
                    tensors[f"optimizer/{index}/{key}"] = torch.as_tensor(value).detach().cpu().contiguous()
            scheduler_state = {key: value for key, value in trainer.scheduler.state_dict().items()
                               if key != "lr_lambdas"}
        for key, value in strategy.online_state().items():
            tensors[f"strategy/{key}"] = value.detach().cpu().contiguous()
        atomic_save_safetensors(tensors, _state_path(context, chunks),
                                {"chunks": str(chunks), "config": fingerprint_digest(context.fingerprint)})
        progress["scheduler"] = scheduler_state
        # fp16's loss scale evolves along the stream; a resumed run must go on with it.
        scaler = context.runtime.scaler
        progress["loss_scaler"] = scaler.state_dict() if scaler is not None else None
        atomic_write_json(context.directory.progress, progress)
        for old in context.directory.checkpoints.glob("online_*_*.safetensors"):
            if not old.name.endswith(f"_{chunks:06d}.safetensors"):
                old.unlink(missing_ok=True)
    context.runtime.barrier()


def load_online(context: RunContext, progress: dict) -> None:
    """Restore what :func:`save_online` wrote (the trainer has begun: its optimizer exists)."""
    chunks, trainer = progress["chunks"], context.trainer
    if load_checkpoint(_model_path(context, chunks), context.strategy, context.fingerprint) != chunks:
        raise CheckpointError(f"{_model_path(context, chunks)} is not the checkpoint progress.json names")
    metadata, tensors = read_verified(_state_path(context, chunks))
    if metadata.get("chunks") != str(chunks) or metadata.get("config") != fingerprint_digest(context.fingerprint):
        raise CheckpointError(f"{_state_path(context, chunks)} is not the state progress.json names")
    if trainer.optimizer is not None:
        state = trainer.optimizer.state_dict()
        restored: dict[int, dict] = {}
        for name, value in tensors.items():
            if name.startswith("optimizer/"):
                _, index, key = name.split("/", 2)
                restored.setdefault(int(index), {})[key] = value.to(context.runtime.device) if key != "step" else value
        state["state"] = restored
        trainer.optimizer.load_state_dict(state)
        scheduler = trainer.scheduler.state_dict()
        scheduler.update(progress.get("scheduler", {}))
        trainer.scheduler.load_state_dict(scheduler)
        # Loading a scheduler's state does not set the optimizer's rate: set the rate of the next step.
        for group, rate in zip(trainer.optimizer.param_groups, trainer.scheduler.get_last_lr()):
            group["lr"] = rate
        if context.runtime.scaler is not None and progress.get("loss_scaler"):
            context.runtime.scaler.load_state_dict(progress["loss_scaler"])
    context.strategy.load_online_state({name[len("strategy/"):]: value for name, value in tensors.items()
                                        if name.startswith("strategy/")})
    torch.set_rng_state(tensors["rng/torch"])
    cuda_states = [tensors[name] for name in sorted(tensors) if name.startswith("rng/cuda/")]
    if cuda_states and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(cuda_states)


def checkpoint_intact(context: RunContext, chunks: int) -> bool:
    """Whether the mid-stream checkpoint after ``chunks`` chunks reads and verifies. A damaged one
    ends the run with one line, or, with ``--resume-from-intact``, returns False: the stream starts
    over (only the latest mid-stream checkpoint is kept, so there is no earlier one to go back to)."""
    for path in (_model_path(context, chunks), _state_path(context, chunks)):
        try:
            read_verified(path)
        except FileNotFoundError:
            if not context.resume_from_intact:
                raise RunError(f"{context.directory.progress} names checkpoint {path}, which is missing; pass "
                               "--resume-from-intact to start the stream over, or --restart") from None
            return False
        except DamagedCheckpoint as error:
            if not context.resume_from_intact:
                raise DamagedCheckpoint(f"{error}; pass --resume-from-intact to start the stream over "
                                        "(an online run keeps only its latest checkpoint), or --restart") from None
            if context.runtime.is_main and context.show_progress:
                print(f"{error}: starting the stream over", file=sys.stderr)
            return False
    return True


# --- the stream --------------------------------------------------------------------------------------


def run_online_stream(context: RunContext, stop_after_samples: int | None) -> dict[str, Any]:
    config, runtime, strategy, stream, trainer = (context.config, context.runtime, context.strategy,
                                                  context.stream, context.trainer)
    train_config = config.train
    period = config.eval.eval_period
    accumulation = train_config.grad_accumulation
    arrivals = Arrivals(stream)
    order = np.asarray(stream.order.order, dtype=np.int64)
    chunks = OnlineChunks(order, train_config.batch_size, runtime.rank, runtime.world_size)
    progress = context.directory.read_progress() or {}
    resumed = progress.get("protocol") == ONLINE_PROTOCOL and progress.get("chunks", 0) > 0
    if resumed:
        resumed = checkpoint_intact(context, progress["chunks"])
    if not resumed:
        progress = {"protocol": ONLINE_PROTOCOL, "config_digest": fingerprint_digest(context.fingerprint),
                    "data": context.data, "chunks": 0, "samples": [], "accuracy": [], "periodic": [], "arrivals": [],
                    "train_seconds": 0.0, "eval_seconds": 0.0, "steps": 0, "examples": 0, "losses": [],
                    "next_eval": period, "forward_calls": 0, "compute": Compute().as_dict(), "samples_trained": [],
                    # eval.zero_shot_row=false: nothing is measured before training
                    "heldout_zero_shot": heldout_accuracies(context, -1) if config.eval.zero_shot_row else None,
                    "alignment_zero_shot": None}
        progress["alignment_zero_shot"] = context.online_alignment
    else:
        arrivals.restore(progress["arrivals"])
    context.observers.run_started(str(context.directory.root), to_dict(config),
                                  str(_model_path(context, progress["chunks"])) if resumed else None,
                                  global_step=progress["steps"])

    # This process's spending so far (a resumed run's, as its checkpoint saved them; every process
    # trains an equal block of each chunk, so the main process's counts are every process's).
    compute = Compute.from_dict(progress.get("compute", {}))
    with measuring(Compute() if resumed else compute):  # a resumed run's counts hold this call already
        strategy.before_task(arrivals.task)
    schedule = train_config.lr_schedule or "constant"
    trains = trainer.begin(max(1, -(-len(chunks) // accumulation) * train_config.online_iter), schedule)
    if trains and context.step_sources:
        # One seed per source, drawn from the global generator once; kept for a resume.
        seeds = progress.setdefault("source_seeds", {name: int(torch.randint(0, 2**62, (1,)).item())
                                                     for name in context.step_sources})
        for name, source in context.step_sources.items():
            if getattr(source, "follows_task", False):
                raise RunError(f"source {name}: the current task's images are a task-stream source; an online "
                               "stream has no current task")
            count = train_config.batch_size // runtime.world_size
            source.start(strategy.backend, seeds[name], count, skip=progress["forward_calls"])
        trainer.step_sources = context.step_sources
    if resumed:
        load_online(context, progress)
    trainer.global_step, trainer.forward_calls = progress["steps"], progress["forward_calls"]
    trainer.class_of = lambda experience, label: stream.classes[label]
    stats = ExperienceStats(steps=progress["steps"], examples=progress["examples"], losses=list(progress["losses"]))
    # Re-augmentation: the loader yields online_iter views of each chunk, augmented apart (seeded by
    # the sample's stream position and the view), so a resumed run draws the same views.
    views = train_config.online_iter if trains and train_config.online_reaugment and train_config.online_iter > 1 else 1
    plans = PlanSampler(chunks, 0, config.seed, stream.train.labels, context.memory, skip=progress["chunks"],
                        views=views)
    if trains:
        images = StreamImages({0: stream.train}, strategy.backend.train_preprocess)
        # An own generator: the loader must not draw from the global one (dropout's), which the
        # stream's earlier versions never touched here.
        loader = DataLoader(images, batch_sampler=plans, num_workers=train_config.num_workers,
                            collate_fn=collate_plan, generator=torch.Generator().manual_seed(config.seed),
                            pin_memory=runtime.device.type == "cuda")
        groups = grouped(loader, accumulation) if views == 1 else grouped_views(loader, accumulation, views)
    else:
        groups = grouped(({} for _ in plans), accumulation)  # nothing trains: positions only, no images
    context.observers.experience_started("online", 0, None)

    consumed = progress["chunks"]
    for group in groups:
        started = time.perf_counter()
        first, consumed = consumed, consumed + len(group[0] if views > 1 else group)
        labels = stream.train.labels[order[first * train_config.batch_size: consumed * train_config.batch_size]]

        def register_arrivals(_group, labels=labels) -> None:
            if arrivals.add(labels):
                strategy.on_new_classes(arrivals.task)

        with measuring(compute):
            if trains:
                trainer.train_groups([group], arrivals.task, stats, repeats=train_config.online_iter,
                                     before_group=register_arrivals, views=views > 1)
            else:
                register_arrivals(group)
        progress["train_seconds"] += time.perf_counter() - started
        seen = min(consumed * train_config.batch_size, len(order))
        if seen >= progress["next_eval"] or seen == len(order):
            started = time.perf_counter()
            progress["periodic"].append(seen >= progress["next_eval"])
            progress["samples"].append(seen)
            progress["accuracy"].append(anytime_accuracy(context, arrivals))
            progress.setdefault("samples_trained", []).append(stats.examples)
            progress["eval_seconds"] += time.perf_counter() - started
            context.observers.evaluated("anytime", trainer.global_step, {"accuracy": progress["accuracy"][-1]})
            while progress["next_eval"] <= seen:
                progress["next_eval"] += period
            if seen < len(order):
                progress.update(chunks=consumed, arrivals=list(arrivals.seen_labels), steps=stats.steps,
                                examples=stats.examples, losses=stats.losses[:1] + stats.losses[-1:],
                                forward_calls=trainer.forward_calls, compute=compute.as_dict())
                save_online(context, progress, consumed)
                if stop_after_samples is not None and seen >= stop_after_samples:
                    return {"interrupted": True, "progress": progress}
    for source in context.step_sources.values():
        source.stop()
    with measuring(compute):
        strategy.after_task(arrivals.task)
    compute.samples_seen, compute.optimizer_steps = stats.examples, stats.steps
    progress["compute"] = compute.summed(context.runtime).as_dict()
    context.observers.experience_finished("online", 0, {
        "steps": stats.steps, **({"first_loss": stats.first_loss, "last_loss": stats.last_loss} if stats.losses else {})})
    heldout_after = heldout_accuracies(context, 0)
    context.observers.evaluated("heldout", trainer.global_step,
                                {held.name: value for held, value in zip(stream.heldout, heldout_after)})
    if runtime.is_main:
        save_checkpoint(context.directory.checkpoint(0), strategy, context.reference, context.fingerprint, 0)
    results = online_results(context, progress, stats, arrivals, heldout_after)
    write_results(context, results)
    if runtime.is_main:  # finished: the mid-stream checkpoints (weights and optimizer moments) are spent
        for spent in context.directory.checkpoints.glob("online_*_*.safetensors"):
            spent.unlink(missing_ok=True)
    return results


def online_results(context: RunContext, progress: dict, stats: ExperienceStats, arrivals: Arrivals,
                   heldout_after: list[float]) -> dict[str, Any]:
    config, stream = context.config, context.stream
    heldout_before = progress["heldout_zero_shot"]
    # A_auc as the official Si-Blurry code computes it: the mean of the evaluations every eval_period
    # samples (an end-of-stream evaluation that is not one of them only gives A_last).
    curve = list(zip(progress["samples"], progress["accuracy"], progress["periodic"]))
    points = [(n, value) for n, value, due in curve if due] or [(n, value) for n, value, _ in curve]
    metrics = {"a_auc": anytime_accuracy_auc([n for n, _ in points], [value for _, value in points]),
               "a_last": a_last(progress["accuracy"])}
    if stream.heldout:
        metrics["heldout_last"] = float(np.mean(heldout_after))
        if heldout_before is not None:
            metrics.update(heldout_zero_shot=float(np.mean(heldout_before)),
                           heldout_retention=retention(heldout_before, heldout_after))
    if context.online_alignment:
        from clipcl.eval.metrics import alignment_change

        metrics.update(alignment_change(progress.get("alignment_zero_shot") or {}, context.online_alignment))
    # Stream images per second of training (each incoming image once, whatever online_iter and replay).
    metrics["train_samples_per_second"] = (len(stream.train) / progress["train_seconds"]
                                           if stats.steps and progress["train_seconds"] > 0 else float("nan"))
    facts = run_facts(context)
    return {
        "name": config.label,
        "strategy": config.strategy.get("name"),
        "protocol": ONLINE_PROTOCOL,
        "config_digest": fingerprint_digest(context.fingerprint),
        "data": context.data,
        "seed": config.seed,
        "anytime": {"samples": progress["samples"], "accuracy": progress["accuracy"], "periodic": progress["periodic"],
                    "samples_trained": progress.get("samples_trained", []),
                    "unit": "percent", "eval_period": config.eval.eval_period},
        "stream": {"samples": len(stream.train), "classes": len(stream.classes),
                   "disjoint_classes": [stream.classes[c].name for c in stream.order.disjoint_classes],
                   "blurry_classes": [stream.classes[c].name for c in stream.order.blurry_classes],
                   "hidden_task_boundaries": [int(b) for b in stream.order.task_boundaries],
                   "arrival_order_of_classes": [stream.classes[label].name for label in arrivals.seen_labels]},
        "heldout": {"datasets": [held.name for held in stream.heldout], "zero_shot": heldout_before,
                    "after_stream": heldout_after},
        "metrics": metrics,
        "alignment": {"zero_shot": progress.get("alignment_zero_shot") or {}, "after_stream": context.online_alignment,
                      "definitions": "docs/metrics.md#image-text-alignment"},
        "timing": {"train_seconds": progress["train_seconds"], "eval_seconds": progress["eval_seconds"],
                   "train_steps": stats.steps, "train_examples": stats.examples},
        "compute": per_task_compute([progress["compute"]], [progress["train_seconds"]], [progress["eval_seconds"]]),
        "losses_first_last": [stats.first_loss, stats.last_loss],
        "parameters": facts["parameters"],
        "config": facts["config"],
        "versions": facts["versions"],
        "created": facts["created"],
        "host": host_facts(context),
    }


__all__ = ["anytime_accuracy", "heldout_accuracies", "run_online_stream"]
