"""The one training loop, for every kind of experience.

A stream hands the trainer experiences (a task; a window of an online stream). For each, the
trainer makes the optimizer and the learning-rate schedule, then takes micro-batches (dicts: the
experience's ``images`` and dataset ``labels``, plus what the method's sources add), maps labels to
the experience's targets, adds per-step source batches, and runs ``forward`` -> ``backward`` ->
(every ``grad_accumulation`` micro-batches) gradient average over processes -> clip -> step ->
schedule -> ``after_step``. An online stream repeats each group of micro-batches ``online_iter``
times (with ``views``, each repeat on its own augmentation of the group). Methods only return losses: mixed precision, accumulation and data parallelism live here.
"""

from __future__ import annotations

import math
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field

import torch

from clipcl.config import ConfigError, TrainConfig
from clipcl.engine.optimizers import RowScaledAdamW
from clipcl.engine.runtime import Runtime
from clipcl.errors import UserError


class TrainingDiverged(UserError, FloatingPointError):
    """The loss became NaN or infinite."""

SCHEDULES = ("cosine", "constant", "step")


def learning_rate_factor(step: int, total_steps: int, warmup_steps: int, schedule: str = "cosine",
                         step_size: int | None = None, gamma: float = 0.1) -> float:
    """Linear warm-up, then cosine decay to zero at ``total_steps``, a constant rate, or (``step``) the
    rate times ``gamma`` after every ``step_size`` optimizer steps (counted from the first step, as
    ``torch.optim.lr_scheduler.StepLR`` counts them)."""
    if warmup_steps and step < warmup_steps:
        return (step + 1) / warmup_steps
    if schedule == "constant":
        return 1.0
    if schedule == "step":
        if step_size is None:
            raise ValueError("the step schedule needs a step size")
        return gamma ** (step // step_size)
    progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
    return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))


@dataclass
class ExperienceStats:
    """What one experience's training did."""

    steps: int = 0
    examples: int = 0
    seconds: float = 0.0
    losses: list[float] = field(default_factory=list)

    @property
    def first_loss(self) -> float | None:
        return self.losses[0] if self.losses else None

    @property
    def last_loss(self) -> float | None:
        return self.losses[-1] if self.losses else None


class Trainer:
    """Trains a strategy on one experience at a time. See the module docstring for the loop."""

    def __init__(self, strategy, runtime: Runtime, config: TrainConfig, observers=None) -> None:
        self.strategy, self.runtime, self.config = strategy, runtime, config
        self.observers = observers
        self.global_step = 0
        self.optimizer: torch.optim.Optimizer | None = None
        self.scheduler = None
        self.parameters: list[torch.nn.Parameter] = []
        self.step_sources: dict = {}  # name -> ReferenceSource, drawn once per forward
        #: Steps between host reads of the loss: every step on CPU (no cost there); on a GPU every
        #: 25, so the loop never waits for the device only to log (divergence is caught at the read).
        self.read_every = 1 if runtime.device.type == "cpu" else 25
        self._pending: list = []
        self.forward_calls = 0  # per-step source draws so far (a resumed online run skips as many)
        # (experience number, dataset label) -> ClassText, for replayed samples; set by the stream driver.
        self.class_of = None

    # --- an experience ------------------------------------------------------------------------
    def begin(self, total_steps: int, schedule: str = "cosine", steps_per_epoch: float | None = None,
              warmup_steps: int | None = None) -> bool:
        """A fresh optimizer and schedule; False when the method has nothing to train.
        ``steps_per_epoch`` (optimizer steps) places the cuts of the ``step`` schedule; ``warmup_steps``
        replaces ``train.warmup_steps`` for this experience (a time stream's first step)."""
        self.parameters = self.strategy.trainable_parameters()
        self.optimizer = self.scheduler = None
        if not self.parameters:
            return False
        config = self.config
        self.runtime.start_task()
        # Never the fused kernel (torch may pick it by default some day): it does not bump the
        # weights' version counters, which the evaluation caches' digest memo relies on (hash_module).
        groups_of = getattr(self.strategy, "parameter_groups", None)  # a Strategy hook; test doubles lack it
        groups = groups_of(self.parameters, config.weight_decay) if groups_of is not None else None
        moments = {"betas": tuple(config.adam_betas), "eps": config.adam_eps}
        if groups is None:
            self.optimizer = torch.optim.AdamW(self.parameters, lr=config.lr, weight_decay=config.weight_decay,
                                               fused=False, **moments)
        else:
            self.optimizer = RowScaledAdamW(groups, lr=config.lr, fused=False, **moments)
        total = max(total_steps, 1)
        step_size = None
        if schedule == "step":
            if steps_per_epoch is None:
                raise ConfigError("train.lr_schedule=step cuts the rate every few epochs; an online stream "
                                  "has no epochs (use cosine or constant)")
            step_size = max(1, round(config.lr_step_epochs * steps_per_epoch))
        warmup = config.warmup_steps if warmup_steps is None else warmup_steps
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, lambda step: learning_rate_factor(step, total, warmup, schedule,
                                                              step_size, config.lr_step_gamma))
        begin_training = getattr(self.strategy, "begin_training", None)  # a Strategy hook; test doubles lack it
        if begin_training is not None:
            begin_training(total)
        return True

    def device_batch(self, batch: dict, experience) -> dict:
        """Move a loaded micro-batch to the device and give it targets in the experience's label space.

        A caption batch (``captions``, ``image_ids``, a language stream's ``english_captions``) is moved as it is. Replayed samples keep their dataset labels and get their classes (``replay["classes"]``):
        they may come from earlier experiences whose classes the current label space lacks.
        """
        device = self.runtime.device
        if "captions" in batch:  # an image-caption phase: no labels, every caption of an image a positive
            moved = {"images": batch["images"].to(device, non_blocking=True), "captions": batch["captions"],
                     "image_ids": batch["image_ids"].to(device, non_blocking=True)}
            if "english_captions" in batch:  # a language stream: each caption's English source
                moved["english_captions"] = batch["english_captions"]
            return moved
        target_of_label = experience.target_of_label
        moved = {"images": batch["images"].to(device, non_blocking=True), "labels": batch["labels"], "indices": batch["indices"],
                 "targets": torch.tensor([target_of_label[int(label)] for label in batch["labels"]],
                                         dtype=torch.long, device=device)}
        replay = batch.get("replay")
        if replay is not None and self.class_of is not None:
            moved["replay"] = {**replay, "images": replay["images"].to(device, non_blocking=True),
                               "classes": [self.class_of(int(source), int(label))
                                           for source, label in zip(replay["experiences"], replay["labels"])]}
        return moved

    def _forward(self, batch: dict, experience) -> tuple[torch.Tensor, dict]:
        for name, source in self.step_sources.items():
            batch[name] = {key: value.to(self.runtime.device) if isinstance(value, torch.Tensor) else value
                           for key, value in source.next_batch().items()}
        self.forward_calls += 1
        with self.runtime.autocast():
            outputs = self.strategy(batch, experience)
        loss = outputs["loss"]
        if self.read_every == 1 and not torch.isfinite(loss):
            # A user's setting (a learning rate too high, fp16 overflow), not a bug: one line, and the
            # last checkpoint stays in force.
            raise TrainingDiverged(f"the training loss became {loss.item()} at step {self.global_step} of "
                                   f"{experience.name}; lower train.lr (now {self.config.lr:g}) or use "
                                   "train.precision=fp32")
        return loss, outputs

    def train_groups(self, groups: Iterable[list[dict]] | Iterator[list[dict]], experience, stats: ExperienceStats,
                     repeats: int = 1, max_steps: int | None = None, before_group=None, views: bool = False) -> None:
        """Train on groups of ``grad_accumulation`` loaded micro-batches, ``repeats`` optimizer steps each.

        ``before_group(group)`` runs first for each group with the strategy in eval mode (an online
        stream registers newly arrived classes there: their frozen text features must not see
        dropout). With ``views``, each element of ``groups`` is instead a list of ``repeats`` groups,
        augmentations of the same samples: repeat ``r`` trains on the ``r``-th (``before_group`` gets
        the first).
        """
        runtime, config, strategy = self.runtime, self.config, self.strategy
        started = time.perf_counter()
        strategy.train()
        for element in groups:
            view_groups = element if views else [element]
            if before_group is not None:
                strategy.eval()
                before_group(view_groups[0])
                strategy.train()
            # Empty micro-batches (the untrained tail of a ragged online chunk) are the same on every
            # process (and in every view), so every process skips the same ones and the collectives
            # stay in step.
            view_batches = [[self.device_batch(batch, experience) for batch in group if len(batch["images"])]
                            for group in view_groups]
            if not view_batches[0]:
                continue
            # A short last group is the mean over its own micro-batches, not a fraction of a full group.
            share = len(view_batches[0])
            for repeat in range(repeats):
                if max_steps is not None and stats.steps >= max_steps:
                    break
                batches = view_batches[repeat] if views else view_batches[0]
                step_loss = torch.zeros((), device=runtime.device)
                terms: dict[str, float] = {}
                for batch in batches:
                    loss, outputs = self._forward(dict(batch), experience)
                    runtime.backward(loss / share)
                    step_loss += loss.detach().float() / share
                    for name, value in outputs.items():
                        if name != "loss" and isinstance(value, torch.Tensor) and value.numel() == 1:
                            term = value.detach().float() if self.read_every > 1 else float(value)
                            terms[name] = terms.get(name, 0.0) + term / share
                    replayed = len(batch["replay"]["images"]) if "replay" in batch else 0
                    stats.examples += (len(batch["images"]) + replayed) * runtime.world_size
                runtime.sync_gradients(self.parameters)
                runtime.step(self.optimizer, self.parameters, config.max_grad_norm)
                self.scheduler.step()
                self.optimizer.zero_grad(set_to_none=True)
                strategy.after_step(stats.steps)
                stats.steps += 1
                self.global_step += 1
                # The step's loss over all its micro-batches and processes, for logging.
                self._pending.append((experience.name, stats.steps, self.global_step,
                                      runtime.all_reduce_sum(step_loss), self.scheduler.get_last_lr()[0], terms))
                if len(self._pending) >= self.read_every:
                    self._read_losses(stats)
            if max_steps is not None and stats.steps >= max_steps:
                break
        self._read_losses(stats)
        strategy.eval()
        stats.seconds += time.perf_counter() - started

    def _read_losses(self, stats: ExperienceStats) -> None:
        """Read the pending steps' losses on the host (one synchronisation for all of them), record
        them and hand them to the observers; a non-finite one ends training (``TrainingDiverged``)."""
        pending, self._pending = self._pending, []
        if not pending:
            return
        values = torch.stack([loss.float() for _, _, _, loss, _, _ in pending]).cpu().tolist()
        for (name, step, global_step, _, lr, terms), total in zip(pending, values):
            loss_value = total / self.runtime.world_size
            if self.read_every > 1 and not math.isfinite(loss_value):
                raise TrainingDiverged(f"the training loss became {loss_value} at step {global_step} of {name}; "
                                       f"lower train.lr (now {self.config.lr:g}) or use train.precision=fp32")
            stats.losses.append(loss_value)
            if self.observers is not None:
                # Named loss terms are this process's; the loss is the mean over processes.
                self.observers.step(name, step, global_step,
                                    {"loss": loss_value, "lr": lr, **{key: float(value) for key, value in terms.items()}})


def grouped_views(batches: Iterable[dict], size: int, views: int) -> Iterator[list[list[dict]]]:
    """Groups of ``size`` micro-batches from a loader that yields ``views`` consecutive views of each
    micro-batch (``PlanSampler(views=...)``), as ``views`` lists: the ``v``-th holds view ``v`` of
    every micro-batch of the group (the last group may be shorter)."""
    chunks: list[list[dict]] = []
    current: list[dict] = []
    for batch in batches:
        current.append(batch)
        if len(current) == views:
            chunks.append(current)
            current = []
            if len(chunks) == size:
                yield [[chunk[view] for chunk in chunks] for view in range(views)]
                chunks = []
    if chunks:
        yield [[chunk[view] for chunk in chunks] for view in range(views)]


def grouped(batches: Iterable[dict], size: int) -> Iterator[list[dict]]:
    """Consecutive micro-batches in groups of ``size`` (the last group may be shorter)."""
    group: list[dict] = []
    for batch in batches:
        group.append(batch)
        if len(group) == size:
            yield group
            group = []
    if group:
        yield group
