"""What training spends, for every method on every protocol: TiC-CLIP's question of any method is how
much accuracy it buys per unit of compute.

A :class:`Compute` counts, while it is active (:func:`measuring`):

- ``samples_seen``: training samples through the loss, replayed ones included, over all processes;
- ``optimizer_steps``;
- ``image_forward`` / ``text_forward``: samples through a tower, every model counted (the student,
  a teacher, a frozen reference: ZSCL's teacher pass counts as much as the student's);
- ``image_backward`` / ``text_backward``: the part of those whose output carries a gradient, so that
  a backward pass goes through the tower (a frozen tower under trainable prompts counts: its
  activations are back-propagated through).

Tower passes are counted where every backend's encoders are called (:func:`counted` wraps
:class:`~clipcl.models.base.Backend`'s ``encode_*`` methods), once per outermost call, so a method
that calls another encoder of the same tower is not counted twice. Features read from the
evaluation cache cost no pass and count none. Counts are per process while training and summed over
processes when the experience ends (:meth:`Compute.summed`).
"""

from __future__ import annotations

import functools
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, fields

import torch

TOWER_COUNTERS = ("image_forward", "image_backward", "text_forward", "text_backward")


@dataclass
class Compute:
    """Counters of one experience (or of a whole run, summed with :meth:`add`)."""

    samples_seen: int = 0
    optimizer_steps: int = 0
    image_forward: int = 0
    image_backward: int = 0
    text_forward: int = 0
    text_backward: int = 0

    def add(self, other: Compute) -> Compute:
        for field in fields(self):
            setattr(self, field.name, getattr(self, field.name) + getattr(other, field.name))
        return self

    def as_dict(self) -> dict[str, int]:
        return asdict(self)

    @classmethod
    def from_dict(cls, values: dict) -> Compute:
        return cls(**{field.name: int(values.get(field.name, 0)) for field in fields(cls)})

    def summed(self, runtime) -> Compute:
        """The tower counters summed over processes (``samples_seen`` and ``optimizer_steps`` are
        already global); every process must call it."""
        if runtime.world_size == 1:
            return self
        counts = torch.tensor([getattr(self, name) for name in TOWER_COUNTERS], dtype=torch.float64,
                              device=runtime.device)
        # float64 holds integers exactly up to 2**53: far beyond any count here.
        totals = runtime.all_reduce_sum(counts).cpu().tolist()
        return Compute(self.samples_seen, self.optimizer_steps, *(round(value) for value in totals))


_active: list[Compute] = []
_depth = threading.local()  # per tower: how deep inside a counted call this thread is


@contextmanager
def measuring(compute: Compute) -> Iterator[Compute]:
    """Count tower passes into ``compute`` until the block ends (blocks nest: the innermost counts)."""
    _active.append(compute)
    try:
        yield compute
    finally:
        _active.pop()


def counted(tower: str, method: Callable) -> Callable:
    """``method`` (an encoder taking a batch first) with its samples counted into the active Compute."""

    @functools.wraps(method)
    def wrapper(self, inputs, *args, **kwargs):
        if not _active or getattr(_depth, tower, 0):
            return method(self, inputs, *args, **kwargs)
        setattr(_depth, tower, 1)
        try:
            output = method(self, inputs, *args, **kwargs)
        finally:
            setattr(_depth, tower, 0)
        compute, samples = _active[-1], len(inputs)
        setattr(compute, f"{tower}_forward", getattr(compute, f"{tower}_forward") + samples)
        if isinstance(output, torch.Tensor) and output.requires_grad:
            setattr(compute, f"{tower}_backward", getattr(compute, f"{tower}_backward") + samples)
        return output

    wrapper.counts_tower = tower
    return wrapper


def per_task_compute(entries: list[dict], train_seconds: list[float], eval_seconds: list[float]) -> dict:
    """results.json's ``compute``: each experience's counters and wall time, and their totals."""
    per_task = [{**Compute.from_dict(entry).as_dict(), "train_seconds": train, "eval_seconds": evaluation}
                for entry, train, evaluation in zip(entries, train_seconds, eval_seconds)]
    total = Compute()
    for entry in entries:
        total.add(Compute.from_dict(entry))
    cumulative, running = [], 0
    for entry in per_task:
        running += entry["samples_seen"]
        cumulative.append(running)
    return {"per_task": per_task, "total": {**total.as_dict(), "train_seconds": float(sum(train_seconds)),
                                            "eval_seconds": float(sum(eval_seconds))},
            "samples_seen_cumulative": cumulative, "definitions": "docs/metrics.md#compute"}
