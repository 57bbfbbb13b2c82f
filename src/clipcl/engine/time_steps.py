"""What each time step of a time stream trains on, from which weights, for how long (TiC-CLIP).

At step ``t`` (0-based) a mode draws its training samples uniformly, with replacement (TiC-CLIP's code
resamples shards, so every sample of the pool is equally likely and each step's share is its size),
from a pool of rows:

- ``sequential``: step ``t``'s own rows;
- ``cumulative_all``, ``restart``, ``oracle``: every row of steps ``0..t``;
- ``cumulative_exp``: step ``t``'s rows and a replay buffer of ``D`` rows (``time.buffer_size``; default
  step ``t``'s size): ``D / 2**a`` rows of the step ``a`` steps back (``D/2`` of the last, ``D/4`` of the
  one before, ...);
- ``cumulative_equal``: step ``t``'s rows and ``D / t`` rows of each earlier step.

A buffer keeps the first rows of a fixed, seeded order of each old step, so what it holds only ever
shrinks, as a buffer that discards would. ``restart`` and ``oracle`` start each step from the initial
weights (the other modes warm-start from the last step); every step gets a fresh optimizer and
schedule, as the official ``--new_run`` does. The budget is ``time.budget_samples`` per step
(``oracle``: times ``time.oracle_factor``, default ``t + 1``), as whole optimizer steps.
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np

from clipcl.config import ConfigError
from clipcl.engine.batches import Item

REPLAY_MODES = ("cumulative_exp", "cumulative_equal")
FROM_INITIAL_WEIGHTS = ("restart", "oracle")
POOL_ORDER_SEED = 8191
"""Seeds the fixed order in which a replay buffer keeps each old step's rows (with the run seed)."""


def step_pool(sizes: list[int], step: int, mode: str, buffer_size: int | None, seed: int) -> list[tuple[int, np.ndarray]]:
    """The rows step ``step`` draws from, as (step index, row indices) per step; ``sizes`` are every
    step's training rows."""
    if mode == "sequential":
        return [(step, np.arange(sizes[step]))]
    if mode not in REPLAY_MODES:
        return [(old, np.arange(sizes[old])) for old in range(step + 1)]
    budget = sizes[step] if buffer_size is None else buffer_size
    pool = []
    for old in range(step):
        keep = budget >> (step - old) if mode == "cumulative_exp" else budget // step
        keep = min(keep, sizes[old])
        if keep:
            order = np.random.default_rng([seed, POOL_ORDER_SEED, old]).permutation(sizes[old])
            pool.append((old, np.sort(order[:keep])))
    pool.append((step, np.arange(sizes[step])))
    return pool


def budget_steps(time_config, train_config, step: int, own_rows: int) -> int:
    """Optimizer steps of time step ``step``: its budget in samples over one optimizer step's samples."""
    per_step = train_config.batch_size * train_config.grad_accumulation
    budget = time_config.budget_samples if time_config.budget_samples is not None else train_config.epochs * own_rows
    if budget < per_step:
        raise ConfigError(f"time.budget_samples ({budget}) is smaller than one optimizer step's samples "
                          f"(train.batch_size * train.grad_accumulation = {per_step})")
    steps = budget // per_step
    if time_config.mode == "oracle":
        steps *= time_config.oracle_factor if time_config.oracle_factor is not None else step + 1
    if train_config.max_steps_per_task is not None:
        steps = min(steps, train_config.max_steps_per_task)
    return steps


class TimeStepPlans:
    """A time step's micro-batch plans: ``batch_size`` rows a micro-batch over all processes, drawn
    uniformly with replacement from the pool, seeded; each process takes its contiguous block, as
    :class:`~clipcl.engine.batches.GlobalBatchSampler` does. The draw number (a row's position in the
    step's draws) seeds its augmentation."""

    def __init__(self, pool: list[tuple[int, np.ndarray]], micro_batches: int, batch_size: int, seed: int,
                 augmentation_seed: int, rank: int, world_size: int) -> None:
        self.sources = np.concatenate([np.full(len(rows), source) for source, rows in pool])
        self.rows = np.concatenate([rows for _, rows in pool])
        self.micro_batches, self.batch_size, self.seed = micro_batches, batch_size, seed
        self.augmentation_seed, self.rank, self.world_size = augmentation_seed, rank, world_size
        self.per_process_batch = batch_size // world_size
        self.batches_per_epoch = max(1, len(self.rows) // batch_size)  # where the step schedule cuts

    def __len__(self) -> int:
        return self.micro_batches

    def __iter__(self) -> Iterator[list[Item]]:
        generator = np.random.default_rng(self.seed)
        share = self.per_process_batch
        for number in range(self.micro_batches):
            drawn = generator.integers(0, len(self.rows), self.batch_size)
            start = number * self.batch_size + self.rank * share
            yield [(int(self.sources[position]), int(self.rows[position]), self.augmentation_seed, start + offset, 0)
                   for offset, position in enumerate(drawn[self.rank * share: (self.rank + 1) * share])]


class StreamedStep:
    """A streamed time step's batches (``time.streaming``): the pool's shards read through webdataset
    by :func:`clipcl.data.shard_stream.streamed_loader`; the attributes the trainer reads of plans."""

    def __init__(self, context, task, pool: list[tuple[int, np.ndarray]], micro_batches: int, seed: int) -> None:
        self.context, self.task, self.micro_batches, self.seed = context, task, micro_batches, seed
        tasks = context.stream.tasks
        self.shards = [[tasks[source].train.shards[position] for position in positions] for source, positions in pool]
        batch_size = context.config.train.batch_size
        self.per_process_batch = batch_size // context.runtime.world_size
        self.batches_per_epoch = max(1, len(task.train) // batch_size)

    def __len__(self) -> int:
        return self.micro_batches

    def loader(self):
        from clipcl.data.shard_stream import streamed_loader
        from clipcl.data.time_stream import held_out_by_key

        context = self.context
        return streamed_loader(self.shards, self.task.index, context.runtime, self.seed,
                               context.strategy.backend.train_preprocess, held_out_by_key,
                               context.config.train.batch_size, self.micro_batches, context.config.train.num_workers)


def pool_sizes(context) -> list[int]:
    """What a mode's pool counts per step: training rows, or shards for a streamed stream."""
    if context.config.time.streaming:
        return [len(step.train.shards) for step in context.stream.tasks]
    return [len(step.train) for step in context.stream.tasks]


def time_step_plans(context, task, seed: int) -> TimeStepPlans | StreamedStep:
    """The plans of ``task`` (a time step) under the run's ``time`` section; ``seed`` (the task's) seeds
    the draws and the augmentations."""
    config = context.config
    sizes = pool_sizes(context)
    pool = step_pool(sizes, task.index, config.time.mode, config.time.buffer_size, config.seed)
    steps = budget_steps(config.time, config.train, task.index, len(task.train))
    if config.time.streaming:
        return StreamedStep(context, task, pool, steps * config.train.grad_accumulation, seed)
    return TimeStepPlans(pool, steps * config.train.grad_accumulation, config.train.batch_size, seed,
                         seed, context.runtime.rank, context.runtime.world_size)


def check_budgets(config, stream) -> None:
    """Refuse a budget below one optimizer step before anything is written (one ConfigError line)."""
    for step in stream.tasks:
        budget_steps(config.time, config.train, step.index, len(step.train))
    if config.time.streaming and config.strategy.get("name") != "zero_shot":
        from clipcl.data.shard_stream import check_readers

        for step in stream.tasks:
            check_readers(len(step.train.shards), step.name, config.train.devices, config.train.num_workers)


def step_warmup(time_config, train_config, step: int) -> int:
    """The step's warm-up: ``time.first_warmup_steps`` for the first step when set, else ``train.warmup_steps``."""
    if step == 0 and time_config.first_warmup_steps is not None:
        return time_config.first_warmup_steps
    return train_config.warmup_steps


def start_from_initial_weights(context) -> None:
    """``restart`` / ``oracle``: load the weights the run started with before the step trains."""
    if context.config.time.mode not in FROM_INITIAL_WEIGHTS:
        return
    strategy, initial = context.strategy, context.reference
    state = strategy.state_dict()
    if set(state) != set(initial) or any(state[name].shape != initial[name].shape for name in state):
        raise ConfigError(f"time.mode={context.config.time.mode} restarts from the initial weights; strategy "
                          f"{context.config.strategy.get('name')!r} grows its parameters over the stream")
    strategy.load_state_dict(initial)


def time_results(context) -> dict:
    """results.json's ``time``: the mode, each step's timestamps, budget and pool (rows per step)."""
    config, tasks = context.config, context.stream.tasks
    sizes = pool_sizes(context)
    return {"mode": config.time.mode, "pool_counts": "shards" if config.time.streaming else "rows",
            "steps": [{"name": step.name, "first": step.first, "last": step.last, "train_rows": len(step.train),
                       "budget_steps": budget_steps(config.time, config.train, step.index, len(step.train)),
                       "pool": {tasks[source].name: len(rows) for source, rows in
                                step_pool(sizes, step.index, config.time.mode, config.time.buffer_size, config.seed)}}
                      for step in tasks],
            "definitions": "docs/time_continual.md"}
