"""The training loop: one task, read top to bottom.

It owns backward, gradient accumulation, mixed precision, gradient synchronisation across processes,
clipping, the optimizer and the learning-rate schedule. Strategies only return losses.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass

import numpy as np
import torch
from torch.utils.data import DataLoader, Sampler
from tqdm.auto import tqdm

from clipcl.config import TrainConfig
from clipcl.data.streams import Task
from clipcl.strategies.base import Strategy
from clipcl.train.runtime import Runtime


class GlobalBatchSampler(Sampler[list[tuple[int, int]]]):
    """Seeded shuffled global batches; each process takes an equal, contiguous slice of each one.

    With the same seed, the union over processes of step ``k``'s slices is exactly the batch one
    process would see at step ``k``. Process ``r`` gets the ``r``-th block, which is also the ``r``-th
    micro-batch a single process would see with ``grad_accumulation = world_size`` and a batch
    ``world_size`` times smaller: the two runs then compute bitwise the same gradients
    (``a/2 + b/2 == (a + b)/2`` in floating point), which is what the data-parallel test checks.
    """

    def __init__(self, size: int, batch_size: int, epochs: int, seed: int, rank: int, world_size: int):
        self.size, self.batch_size, self.epochs = size, batch_size, epochs
        self.seed, self.rank, self.world_size = seed, rank, world_size
        # Drop the ragged last batch so every step has the same size on every process; a task
        # smaller than one batch trains on one batch of all its images (cut to a multiple of world).
        self.batches_per_epoch = max(1, size // batch_size)

    def __len__(self) -> int:
        return self.batches_per_epoch * self.epochs

    def __iter__(self):
        generator = np.random.default_rng(self.seed)
        for epoch in range(self.epochs):
            order = generator.permutation(self.size)
            for batch in range(self.batches_per_epoch):
                start = batch * self.batch_size
                indices = order[start: start + self.batch_size]
                share = len(indices) // self.world_size
                first = self.rank * share
                # (dataset index, draw number): the draw number seeds this image's augmentation.
                yield [(int(indices[position]), epoch * self.size + start + position)
                       for position in range(first, first + share)]


def learning_rate_factor(step: int, total_steps: int, warmup_steps: int) -> float:
    """Linear warm-up, then cosine decay to zero at ``total_steps``."""
    if warmup_steps and step < warmup_steps:
        return (step + 1) / warmup_steps
    progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
    return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))


@dataclass
class TaskTrainingStats:
    steps: int
    seconds: float
    first_loss: float | None
    last_loss: float | None
    examples: int


def train_task(
    strategy: Strategy,
    task: Task,
    config: TrainConfig,
    runtime: Runtime,
    seed: int,
    show_progress: bool = True,
) -> TaskTrainingStats:
    """Train ``strategy`` on ``task``. Call between ``before_task`` and ``after_task``."""
    started = time.perf_counter()
    parameters = strategy.trainable_parameters()
    if not parameters:
        return TaskTrainingStats(0, 0.0, None, None, 0)

    dataset = task.training_view(strategy.backend.train_preprocess, augmentation_seed=seed)
    sampler = GlobalBatchSampler(len(dataset), config.batch_size, config.epochs, seed, runtime.rank, runtime.world_size)
    loader = DataLoader(dataset, batch_sampler=sampler, num_workers=config.num_workers,
                        persistent_workers=False)
    micro_batches = len(sampler)
    total_steps = micro_batches // config.grad_accumulation
    if config.max_steps_per_task is not None:
        total_steps = min(total_steps, config.max_steps_per_task)
    total_steps = max(total_steps, 1)

    runtime.start_task()
    optimizer = torch.optim.AdamW(parameters, lr=config.lr, weight_decay=config.weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: learning_rate_factor(step, total_steps, config.warmup_steps)
    )

    strategy.train()
    step, examples = 0, 0
    first_loss = last_loss = None
    progress = tqdm(total=total_steps, desc=f"train {task.name}", disable=not (show_progress and runtime.is_main),
                    leave=False, dynamic_ncols=True)
    micro = 0
    step_loss = torch.zeros((), device=runtime.device)
    optimizer.zero_grad(set_to_none=True)
    for images, targets in loader:
        images, targets = images.to(runtime.device), targets.to(runtime.device)
        with runtime.autocast():
            outputs = strategy(images, targets, task)
        loss = outputs["loss"]
        if not torch.isfinite(loss):
            raise FloatingPointError(f"loss became {loss.item()} at step {step} of task {task.name}")
        runtime.backward(loss / config.grad_accumulation)
        step_loss += loss.detach().float() / config.grad_accumulation
        examples += len(images) * runtime.world_size
        micro += 1
        if micro % config.grad_accumulation:
            continue
        runtime.sync_gradients(parameters)
        runtime.step(optimizer, parameters, config.max_grad_norm)
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        strategy.after_step(step)
        step += 1
        # The step's loss over all its micro-batches and processes, for logging.
        last_loss = float(runtime.all_reduce_sum(step_loss)) / runtime.world_size
        step_loss = torch.zeros((), device=runtime.device)
        if first_loss is None:
            first_loss = last_loss
        progress.set_postfix(loss=f"{last_loss:.3f}")
        progress.update(1)
        if step >= total_steps:
            break
    progress.close()
    strategy.eval()
    return TaskTrainingStats(step, time.perf_counter() - started, first_loss, last_loss, examples)
