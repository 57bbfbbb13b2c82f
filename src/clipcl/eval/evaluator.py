"""Fill the accuracy matrix, one per-image prediction at a time.

Every image is classified on its own: its features depend only on its own pixels (models are in
eval mode, no batch statistics), and the prediction is the argmax over the label space of the
cosine similarity with the class prompts (for a strategy with ``scores_image_views``, each class's
similarity is the best of the image views it allows: :func:`_predict_from_views`). Under data parallelism each process evaluates its shard
and (correct, total) counts are summed, so the result is exact, not an average of averages.

What the batch does and does not change: an image's features depend on its own pixels only, but
CPU (and GPU) matmul kernels are chosen by the batch's size, so the last bits of a feature may differ
between two evaluation batch sizes; predictions (float64 similarities) change only on a near-tie.
So the image-feature cache key holds the batch size, and the class text features of a row come from
one canonical encode (:mod:`clipcl.eval.text_cache`): a cached feature is always the one the
uncached path computes, and the matrices with and without the caches are identical by construction.
"""

from __future__ import annotations

import time

import numpy as np
import torch
from torch.utils.data import DataLoader, Subset
from tqdm.auto import tqdm

from clipcl.data.base import ClassificationDataset
from clipcl.data.streams import ClassText, LabelledView, Stream
from clipcl.engine.runtime import Runtime
from clipcl.eval.cache import FeatureCache
from clipcl.eval.text_cache import RowText, stream_classes
from clipcl.losses import best_view_scores
from clipcl.strategies.base import Strategy

AUTO_BATCH_SIZE = {"cpu": 16, "cuda": 256}
"""``eval.batch_size`` when unset, by device type: on CPU the per-image time of a bare encode rises
with the batch (benchmarks/eval_batch_curve.py); on a GPU, the previous default (not measured here)."""


def eval_batch_size(batch_size: int | None, device: torch.device) -> int:
    """The user's ``eval.batch_size``, or the device's default. A fixed table, never a timing taken
    at run time, so a run's numbers do not depend on the machine's load."""
    return batch_size if batch_size is not None else AUTO_BATCH_SIZE.get(device.type, 256)


class _ImagesOnly(torch.utils.data.Dataset):
    def __init__(self, dataset: ClassificationDataset, transform):
        self.dataset, self.transform = dataset, transform

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int) -> torch.Tensor:
        return self.transform(self.dataset[index][0])


@torch.no_grad()
def image_features(
    strategy: Strategy,
    dataset: ClassificationDataset,
    task_index: int | None,
    runtime: Runtime,
    batch_size: int,
    cache: FeatureCache | None = None,
    show_progress: bool = False,
    num_workers: int = 0,
) -> tuple[torch.Tensor, np.ndarray]:
    """Normalised features of this process's shard of ``dataset``, and the shard's dataset labels."""
    features, _, labels = routed_image_features(strategy, dataset, task_index, runtime, batch_size, cache,
                                                show_progress, num_workers)
    return features, labels


@torch.no_grad()
def routed_image_features(
    strategy: Strategy,
    dataset: ClassificationDataset,
    task_index: int | None,
    runtime: Runtime,
    batch_size: int,
    cache: FeatureCache | None = None,
    show_progress: bool = False,
    num_workers: int = 0,
) -> tuple[torch.Tensor, torch.Tensor | None, np.ndarray]:
    """As :func:`image_features`, plus each image's route (None when the strategy does not route)."""
    image_key = strategy.image_cache_key(task_index) if cache is not None else None
    if strategy.scores_image_views:  # [N, V, D] features, never routed
        def encode(images):
            return strategy.encode_image_views(images, task_index), None
    else:
        def encode(images):
            return strategy.encode_images_routed(images, task_index)
    return encode_dataset(encode, image_key, dataset, strategy.backend, runtime, batch_size, cache, show_progress,
                          num_workers)


@torch.no_grad()
def encode_dataset(
    encode,
    image_key: str | None,
    dataset: ClassificationDataset,
    backend,
    runtime: Runtime,
    batch_size: int,
    cache: FeatureCache | None = None,
    show_progress: bool = False,
    num_workers: int = 0,
) -> tuple[torch.Tensor, torch.Tensor | None, np.ndarray]:
    """Features of this process's shard of ``dataset`` through ``encode`` (preprocessed images ->
    (normalised features, routes or None)), cached under ``image_key`` when it is not None; also the
    routes and the shard's dataset labels. Methods that encode a dataset with a view of their own (DDAS's
    frozen features) call this directly."""
    indices = runtime.shard(list(range(len(dataset))))
    labels = dataset.labels[indices] if len(indices) else np.zeros(0, dtype=np.int64)
    cache_key = None
    if image_key is not None and cache is not None and cache.enabled:
        cache_key = FeatureCache.key_for(image_key, dataset, runtime, batch_size)
        cached = cache.get(cache_key, rows=len(indices))
        if cached is not None:
            return cached.to(runtime.device), None, labels

    view = Subset(_ImagesOnly(dataset, backend.preprocess), indices)
    # An own generator: evaluating must not draw from the global one, which training's dropout uses.
    # (Creating a loader's iterator draws a seed from it, and a cache hit creates none, so a run's
    # numbers would otherwise depend on whether its features were cached.)
    loader = DataLoader(view, batch_size=batch_size, shuffle=False, num_workers=num_workers,
                        generator=torch.Generator(), pin_memory=runtime.device.type == "cuda")
    chunks, route_chunks = [], []
    for images in tqdm(loader, desc=f"encode {dataset.name}/{dataset.split}", leave=False,
                       disable=not (show_progress and runtime.is_main), dynamic_ncols=True):
        with runtime.autocast():
            features, routes = encode(images.to(runtime.device, non_blocking=True))
        chunks.append(features.float())
        route_chunks.append(routes)
    features = torch.cat(chunks) if chunks else torch.zeros(0, backend.embed_dim, device=runtime.device)
    routed = any(routes is not None for routes in route_chunks)
    if routed and cache_key is not None:
        raise RuntimeError("routed image features cannot be cached: give no cache key")
    if cache_key is not None:
        cache.put(cache_key, features)
    return features, (torch.cat(route_chunks) if routed else None), labels


@torch.no_grad()
def predict(
    strategy: Strategy,
    dataset: ClassificationDataset,
    classes: list[ClassText],
    task_index: int | None,
    runtime: Runtime,
    batch_size: int = 256,
    cache: FeatureCache | None = None,
    show_progress: bool = False,
    text: RowText | None = None,
    num_workers: int = 0,
    keep: list | None = None,
) -> tuple[torch.Tensor, np.ndarray]:
    """Per-image predicted class indices (into ``classes``) for this process's shard, and its labels.
    ``text``: the row's class text features (None: ``classes`` are encoded here, as asked). ``keep``:
    a list the shard's image features are appended to (for the alignment measures)."""
    features, routes, labels = routed_image_features(strategy, dataset, task_index, runtime, batch_size, cache,
                                                     show_progress, num_workers)
    text = text if text is not None else RowText(strategy, [], runtime, None)
    if strategy.scores_image_views:
        return _predict_from_views(strategy, features, classes, task_index, text, keep), labels
    if keep is not None:
        keep.append(features)
    # float64 for the similarities: ties and near-ties resolve the same on every batch layout.
    if routes is None:
        class_features = text.features(classes, task_index)
        return (features.double() @ class_features.double().t()).argmax(dim=-1).cpu(), labels
    # Each image against the class features of its own route.
    predictions = torch.zeros(len(features), dtype=torch.long)
    for route in routes.unique().tolist():
        rows = (routes == route).nonzero().squeeze(-1)
        class_features = text.features(classes, task_index, route)
        predictions[rows.cpu()] = (features[rows].double() @ class_features.double().t()).argmax(dim=-1).cpu()
    return predictions, labels


VIEW_CHUNK = 1024
"""Images scored at a time on the multi-view path (its similarities are ``images x views x classes``)."""


def _predict_from_views(strategy: Strategy, features: torch.Tensor, classes: list[ClassText], task_index: int | None,
                        text: RowText, keep: list | None) -> torch.Tensor:
    """Predictions of a ``scores_image_views`` strategy: each class scores with the best of the views
    it allows (:meth:`Strategy.class_views`), in float64. ``keep`` receives, per image, the view that
    scored its predicted class: the image embedding the prediction used."""
    class_features = text.features(classes, task_index).double()
    allowed = strategy.class_views(classes, task_index).to(features.device)
    if len(features) == 0:  # an empty shard
        if keep is not None:
            keep.append(torch.zeros(0, class_features.shape[1], device=features.device))
        return torch.zeros(0, dtype=torch.long)
    predictions, chosen = [], []
    for start in range(0, len(features), VIEW_CHUNK):
        views = features[start: start + VIEW_CHUNK]
        scores, best = best_view_scores(views.double(), class_features, allowed)
        predicted = scores.argmax(dim=-1)
        predictions.append(predicted.cpu())
        if keep is not None:
            rows = torch.arange(len(views), device=views.device)
            chosen.append(views[rows, best[rows, predicted]])
    if keep is not None:
        keep.append(torch.cat(chosen))
    return torch.cat(predictions)


def count_correct(
    strategy: Strategy,
    dataset: ClassificationDataset,
    classes: list[ClassText],
    target_of_label: dict[int, int],
    task_index: int | None,
    runtime: Runtime,
    batch_size: int,
    cache: FeatureCache | None,
    show_progress: bool = False,
    text: RowText | None = None,
    num_workers: int = 0,
    keep: list | None = None,
) -> tuple[int, int]:
    """(correct, total) over the whole dataset, summed over processes (``text``, ``keep``: see :func:`predict`)."""
    predictions, labels = predict(strategy, dataset, classes, task_index, runtime, batch_size, cache, show_progress,
                                  text, num_workers, keep)
    targets = torch.tensor([target_of_label[int(label)] for label in labels], dtype=torch.long)
    counts = torch.tensor([int((predictions == targets).sum()), len(targets)], dtype=torch.long,
                          device=runtime.device if runtime.world_size > 1 else "cpu")
    counts = runtime.all_reduce_sum(counts)
    return int(counts[0]), int(counts[1])


def evaluate_row(
    strategy: Strategy,
    stream: Stream,
    after_task: int,
    runtime: Runtime,
    batch_size: int,
    cache: FeatureCache | None,
    show_progress: bool = True,
    shared_text: bool = True,
    num_workers: int = 0,
    keep: dict | None = None,
) -> tuple[list[float], list[float], float]:
    """Accuracy (%) on every task of the stream and on every held-out set; also the seconds taken.

    ``after_task`` is -1 for the zero-shot row. The class text features come from one canonical encode
    per model state (:class:`~clipcl.eval.text_cache.RowText`); ``shared_text=False`` encodes each
    task's label space on its own instead, as clipcl did before (benchmarks compare the two).
    ``keep``: a dict that receives, per evaluated set (``task/<name>``, ``held-out/<name>``), this
    process's image features, the set's own class text features and each image's class (index into
    them): what the alignment measures need, so no image is encoded twice.
    """
    started = time.perf_counter()
    strategy.eval()
    text = RowText(strategy, stream_classes(stream) if shared_text else [], runtime, cache)

    def measure(key, dataset, classes, target_of_label, own_classes, own_target_of_label, task_index):
        kept = [] if keep is not None else None
        correct, total = count_correct(strategy, dataset, classes, target_of_label, task_index, runtime,
                                       batch_size, cache, show_progress, text, num_workers, kept)
        if keep is not None:
            keep[key] = {"images": kept[0], "texts": text.features(own_classes, task_index),
                         "classes": [own_target_of_label[int(label)] for label in dataset.labels]}
        return 100.0 * correct / total

    row = []
    for task in stream.tasks:
        classes, target_of_label = stream.eval_label_space(after_task, task.index)
        task_index = task.index if stream.task_id_at_test else None
        row.append(measure(f"task/{task.name}", task.test, classes, target_of_label,
                           stream.own_label_space(task.index), task.target_of_label, task_index))
    heldout = [measure(f"held-out/{held.name}", held.test, held.classes, held.target_of_label, held.classes,
                       held.target_of_label, None) for held in stream.heldout]
    return row, heldout, time.perf_counter() - started


__all__ = ["AUTO_BATCH_SIZE", "LabelledView", "count_correct", "encode_dataset", "eval_batch_size", "evaluate_row",
           "image_features", "predict", "routed_image_features"]
