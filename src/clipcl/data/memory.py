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
- :class:`BudgetedMemory`: a fixed budget split over experiences (the replay buffers of TiC-CLIP,
  Garg et al. 2024): ``budget_equal`` gives every experience seen so far an equal share,
  ``budget_exponential`` halves the share of each older experience (the newest gets half, the one
  before a quarter, ...; the oldest takes what is left). Within its share an experience keeps a
  uniform (reservoir) sample of what it offered.
"""

from __future__ import annotations

import base64
from dataclasses import dataclass

import torch

from clipcl.config.schema import ConfigError

Reference = tuple[int, int]  # (experience number, index into its training set)

KINDS = ("reservoir", "class_balanced", "budget_equal", "budget_exponential")


@dataclass(frozen=True)
class ReplaySpec:
    """A replay memory a method declares (see ``Strategy.sources``)."""

    capacity: int
    """Samples kept (0: an empty memory, nothing is replayed)."""
    kind: str = "reservoir"
    """``reservoir`` or ``class_balanced``."""

    def __post_init__(self) -> None:
        if self.capacity < 0:
            raise ConfigError(f"replay memory capacity must be >= 0, got {self.capacity}")
        if self.kind not in KINDS:
            raise ConfigError(f"replay memory kind must be one of {', '.join(KINDS)}, got {self.kind!r}")


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


class BudgetedMemory(ReservoirMemory):
    """A budget of ``capacity`` samples shared by the experiences seen so far."""

    def __init__(self, capacity: int, seed: int, policy: str = "equal") -> None:
        super().__init__(capacity, seed)
        self.policy = policy
        self.offered: dict[int, int] = {}  # per experience: samples offered so far (its reservoir's n)

    def shares(self) -> dict[int, int]:
        """How many samples each experience may hold now."""
        experiences = sorted(self.offered)
        if not experiences:
            return {}
        if self.policy == "equal":
            base, extra = divmod(self.capacity, len(experiences))
            return {e: base + (1 if index < extra else 0)
                    for index, e in enumerate(reversed(experiences))}  # the newest get the remainder
        shares, left = {}, self.capacity
        for e in reversed(experiences[1:]):  # newest first: half of what is left, then half again
            shares[e] = left // 2
            left -= shares[e]
        shares[experiences[0]] = left
        return shares

    def add(self, references: list[Reference], labels: list[int]) -> None:
        for reference, label in zip(references, labels):
            experience = int(reference[0])
            new_experience = experience not in self.offered
            self.seen += 1
            self.offered[experience] = self.offered.get(experience, 0) + 1
            if new_experience:
                self._shrink_to_shares()
            share = self.shares()[experience]
            slots = [slot for slot, item in enumerate(self.items) if int(item[0]) == experience]
            if len(slots) < share:
                self.items.append(reference)
                self.labels.append(int(label))
                continue
            if share == 0:
                continue
            # Reservoir within the experience: the n-th of its samples enters with probability share / n.
            pick = int(torch.randint(0, self.offered[experience], (1,), generator=self.generator))
            if pick < share:
                slot = slots[pick]
                self.items[slot], self.labels[slot] = reference, int(label)

    def _shrink_to_shares(self) -> None:
        """A new experience arrived: older ones give up random samples down to their new share."""
        shares = self.shares()
        for experience, share in shares.items():
            slots = [slot for slot, item in enumerate(self.items) if int(item[0]) == experience]
            if len(slots) <= share:
                continue
            order = torch.randperm(len(slots), generator=self.generator)
            drop = {slots[int(index)] for index in order[: len(slots) - share]}
            self.items = [item for slot, item in enumerate(self.items) if slot not in drop]
            self.labels = [label for slot, label in enumerate(self.labels) if slot not in drop]

    def state_dict(self) -> dict:
        return {**super().state_dict(), "offered": {str(e): n for e, n in self.offered.items()}}

    def load_state_dict(self, state: dict) -> None:
        super().load_state_dict(state)
        self.offered = {int(e): int(n) for e, n in state["offered"].items()}


def build_memory(spec: ReplaySpec, seed: int) -> ReservoirMemory:
    if spec.kind == "class_balanced":
        return ClassBalancedMemory(spec.capacity, seed)
    if spec.kind.startswith("budget_"):
        return BudgetedMemory(spec.capacity, seed, "equal" if spec.kind == "budget_equal" else "exponential")
    return ReservoirMemory(spec.capacity, seed)
