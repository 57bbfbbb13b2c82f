"""Class text features of a row: one canonical encode per model state, cached like image features.

A row of the accuracy matrix evaluates every task of the stream and every held-out set, each against
its own label space; class-incremental and X-TAIL label spaces share or nest their classes. Rather
than encoding each label space, :class:`RowText` encodes *one canonical list* -- every distinct class
the stream and its held-out sets can be evaluated on, in first-seen order (:func:`stream_classes`) --
once per row, and each task takes its classes' rows out of it. The uncached path makes exactly the
same call, so a cached feature is bit for bit the one it replaces: CPU matmuls may round a row
differently in another batch, and here the batch never changes.

The encode is memoised in the run's :class:`~clipcl.eval.cache.FeatureCache` (memory and disk) under
a key of the strategy's :meth:`~clipcl.strategies.base.Strategy.text_cache_key` (model id, a digest of
the text tower's weights, the prompt mode), a digest of the canonical prompts, and the numerics of
:meth:`FeatureCache.key_for`. A strategy that trains its text tower changes the digest at every step,
so it gets no stale hit; one that overrides ``encode_classes`` or ``encode_classes_routed`` below the
class that defines its ``text_cache_key`` is not cached across rows (:func:`cacheable_text_key`).

Online anytime evaluations do the same with every class of the online stream: each evaluation takes
the classes seen so far out of one canonical encode, so a frozen text tower is encoded once per run.
"""

from __future__ import annotations

import hashlib

import torch

from clipcl.data.streams import ClassText
from clipcl.eval.cache import FeatureCache


def stream_classes(stream) -> list[ClassText]:
    """Every distinct class (name and templates) the stream's label spaces can hold (a task stream:
    :meth:`~clipcl.data.streams.Stream.evaluation_classes`, which for the open-domain protocols are
    the classes with pooled templates; an online stream: all its classes, in label order), then the
    classes of its held-out sets. Classes are keyed by name *and* templates, so a merged class is
    never served the features of a single dataset's prompts."""
    seen: dict[ClassText, None] = {}
    if hasattr(stream, "evaluation_classes"):
        seen.update(dict.fromkeys(stream.evaluation_classes()))
    else:
        for classes in [task.classes for task in stream.tasks] if hasattr(stream, "tasks") else [stream.classes]:
            seen.update(dict.fromkeys(classes))
    for held in stream.heldout:
        seen.update(dict.fromkeys(held.classes))
    return list(seen)


def _definer(cls: type, name: str) -> type:
    return next(klass for klass in cls.__mro__ if name in vars(klass))


def cacheable_text_key(strategy, task_index: int | None) -> str | None:
    """The strategy's text key, or None when a subclass changed how classes are encoded without
    saying how to key them (it overrides ``encode_classes``/``encode_classes_routed`` below the class
    that defines ``text_cache_key``)."""
    owner = _definer(type(strategy), "text_cache_key")
    for method in ("encode_classes", "encode_classes_routed"):
        definer = _definer(type(strategy), method)
        if definer is not owner and issubclass(definer, owner):
            return None
    return strategy.text_cache_key(task_index)


def text_key_for(text_key: str, classes: list[ClassText], runtime) -> str:
    """The cache key of ``classes``' features through ``text_key`` on this process of ``runtime``."""
    prompts = hashlib.sha256(repr([(c.name, c.templates) for c in classes]).encode()).hexdigest()[:24]
    numerics = [runtime.precision, runtime.device.type, torch.__version__, torch.get_float32_matmul_precision()]
    if runtime.device.type == "cuda":
        numerics.append(torch.cuda.get_device_name(runtime.device))
    # The shard is irrelevant to text, but every process computes the same entry: keep one name.
    return FeatureCache.make_key(f"text|{text_key}", prompts, "text", "|".join(numerics))


class RowText:
    """The class text features of one row (one model state): see the module docstring."""

    def __init__(self, strategy, canonical: list[ClassText], runtime, cache: FeatureCache | None) -> None:
        self.strategy, self.canonical, self.runtime = strategy, canonical, runtime
        self.cache = cache if cache is not None and cache.enabled else None
        self.position = {class_text: index for index, class_text in enumerate(canonical)}
        self._encoded: dict = {}
        self.encodes = 0
        """Canonical encodes this row computed (0 when every one was a cache hit)."""

    def features(self, classes: list[ClassText], task_index: int | None, route: int | None = None) -> torch.Tensor:
        """Normalised float32 features of ``classes`` (``route``: as the images of that route see them)."""
        if any(class_text not in self.position for class_text in classes):
            return self._encode(classes, task_index, route)  # not a class of the stream: encoded as asked
        text_key = cacheable_text_key(self.strategy, task_index)
        memo = (text_key if text_key is not None else task_index, route)
        if memo not in self._encoded:
            self._encoded[memo] = self._canonical(text_key, task_index, route)
        rows = torch.tensor([self.position[class_text] for class_text in classes], dtype=torch.long)
        return self._encoded[memo][rows.to(self._encoded[memo].device)]

    def _canonical(self, text_key: str | None, task_index: int | None, route: int | None) -> torch.Tensor:
        key = None
        if text_key is not None and self.cache is not None:
            key = text_key_for(f"{text_key}|route={route}", self.canonical, self.runtime)
        if key is not None:
            cached = self.cache.get(key, rows=len(self.canonical))
            if cached is not None:
                return cached.to(self.runtime.device)
        features = self._encode(self.canonical, task_index, route)
        self.encodes += 1
        if key is not None:
            self.cache.put(key, features)
        return features

    def _encode(self, classes: list[ClassText], task_index: int | None, route: int | None) -> torch.Tensor:
        with self.runtime.autocast():
            if route is None:
                return self.strategy.encode_classes(classes, task_index).float()
            return self.strategy.encode_classes_routed(classes, task_index, route).float()
