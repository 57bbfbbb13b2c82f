"""Replay memories: which past training samples a method may see again.

A memory holds sample references (``(experience, index)`` pairs: the experience's number and the
index of the sample in that experience's training set), never images: the engine turns references
into images through the same loader as the stream. All draws use the memory's own seeded generator,
so a memory evolves identically on every process and in every run with the same seed.

- :class:`ReservoirMemory` (Vitter 1985; Chaudhry et al. 2019's ER): the n-th sample offered
  replaces a random slot with probability ``capacity / n``, so the memory is a uniform sample of the
  stream so far.
- :class:`ClassBalancedMemory` (GDumb's greedy balancer, Prabhu et al. 2020): when full, a sample of
  a class that is not the largest evicts a random sample of the largest class.
"""

from __future__ import annotations

import base64
from dataclasses import dataclass

import torch

Reference = tuple[int, int]  # (experience number, index into its training set)

KINDS = ("reservoir", "class_balanced")


@dataclass(frozen=True)
class ReplaySpec:
    """A replay memory a method declares (see ``Strategy.sources``)."""

    capacity: int
    """Samples kept (0: an empty memory, nothing is replayed)."""
    kind: str = "reservoir"
    """``reservoir`` or ``class_balanced``."""

    def __post_init__(self) -> None:
        if self.capacity < 0:
            raise ValueError(f"replay memory capacity must be >= 0, got {self.capacity}")
        if self.kind not in KINDS:
            raise ValueError(f"replay memory kind must be one of {', '.join(KINDS)}, got {self.kind!r}")


class ReservoirMemory:
    """Reservoir sampling over every sample offered."""

    def __init__(self, capacity: int, seed: int) -> None:
        self.capacity = capacity
        self.items: list[Reference] = []
        self.labels: list[int] = []
        self.seen = 0  # samples offered so far (the reservoir's n)
        self.generator = torch.Generator().manual_seed(seed)

    def __len__(self) -> int:
        return len(self.items)

    def sample(self, count: int) -> list[Reference]:
        """Up to ``count`` distinct stored references, uniformly drawn."""
        if not self.items or count <= 0:
            return []
        picks = torch.randperm(len(self.items), generator=self.generator)[: min(count, len(self.items))]
        return [self.items[int(pick)] for pick in picks]

    def add(self, references: list[Reference], labels: list[int]) -> None:
        for reference, label in zip(references, labels):
            self.seen += 1
            if len(self.items) < self.capacity:
                self.items.append(reference)
                self.labels.append(int(label))
                continue
            if self.capacity == 0:
                continue
            slot = int(torch.randint(0, self.seen, (1,), generator=self.generator))
            if slot < self.capacity:
                self.items[slot] = reference
                self.labels[slot] = int(label)

    def state_dict(self) -> dict:
        """A JSON-ready copy of the memory (for mid-stream resume)."""
        return {"items": [list(item) for item in self.items], "labels": list(self.labels), "seen": self.seen,
                "generator": base64.b64encode(self.generator.get_state().numpy().tobytes()).decode()}

    def load_state_dict(self, state: dict) -> None:
        self.items = [tuple(item) for item in state["items"]]
        self.labels = [int(label) for label in state["labels"]]
        self.seen = int(state["seen"])
        raw = base64.b64decode(state["generator"])
        self.generator.set_state(torch.frombuffer(bytearray(raw), dtype=torch.uint8))


class ClassBalancedMemory(ReservoirMemory):
    """Keeps classes as equal as the capacity allows."""

    def add(self, references: list[Reference], labels: list[int]) -> None:
        for reference, label in zip(references, labels):
            self.seen += 1
            label = int(label)
            if len(self.items) < self.capacity:
                self.items.append(reference)
                self.labels.append(label)
                continue
            if self.capacity == 0:
                continue
            counts: dict[int, int] = {}
            for stored in self.labels:
                counts[stored] = counts.get(stored, 0) + 1
            largest = max(sorted(counts), key=lambda key: counts[key])  # ties: the lowest label
            if counts.get(label, 0) >= counts[largest]:
                continue  # this class already holds the largest share
            slots = [slot for slot, stored in enumerate(self.labels) if stored == largest]
            slot = slots[int(torch.randint(0, len(slots), (1,), generator=self.generator))]
            self.items[slot] = reference
            self.labels[slot] = label


def build_memory(spec: ReplaySpec, seed: int) -> ReservoirMemory:
    return ClassBalancedMemory(spec.capacity, seed) if spec.kind == "class_balanced" \
        else ReservoirMemory(spec.capacity, seed)
