"""What a task stream measures at each model state: one function for class and caption streams.

:func:`evaluate_state` returns a row's accuracy (class streams) or retrieval recall (caption
streams: mean R@1 both ways on each phase's test pairs), the held-out sets, the ``eval.retrieval``
sets, and the image-text alignment measures of every evaluated set (:mod:`clipcl.eval.alignment`).
The alignment measures reuse the features the accuracy or retrieval evaluation computed, so no
image is encoded twice; the rotation measures compare them with the same set's features under the
zero-shot model and the previous one, which :class:`AlignmentTracker` keeps in the run folder
(``checkpoints/alignment_*.safetensors``) so a resumed run measures against the same references.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from clipcl.checkpoint import atomic_save_safetensors, read_verified
from clipcl.data.caption_stream import CAPTION_PROTOCOLS
from clipcl.eval.evaluator import evaluate_row
from clipcl.eval.retrieval import CaptionedImages, from_caption_dataset, retrieval_with_features

ALIGNMENT_SEED = 2468
"""Which images of a set the alignment measures keep (when capped); fixed, so every row, run and
method measures the same images."""


def mean_recall_at_1(recalls: dict[str, float]) -> float:
    """The caption streams' matrix entry: the mean of image->text and text->image R@1 (in %)."""
    return 0.5 * (recalls["image_to_text_R@1"] + recalls["text_to_image_R@1"])


def recall_mean(recalls: dict[str, float]) -> float:
    """The language streams' matrix entry, CLL-CLIP's ``r_mean``: the mean of R@1, R@5 and R@10 both
    ways (official clfm/evaluation/RetrievalEvaluator.py:84-86), in %."""
    return sum(recalls[f"{way}_R@{k}"] for way in ("image_to_text", "text_to_image") for k in (1, 5, 10)) / 6


def matrix_entry(protocol: str, recalls: dict[str, float]) -> float:
    """What a caption-like stream's matrix holds: r_mean for languages, mean R@1 for captions."""
    return recall_mean(recalls) if protocol == "languages" else mean_recall_at_1(recalls)


def _gathered(features: torch.Tensor, size: int, runtime) -> torch.Tensor:
    """The whole set's features from every process's strided shard (a sum of zero-padded copies:
    exact, since each row is a copy of one process's values plus zeros)."""
    if runtime.world_size == 1:
        return features
    full = torch.zeros(size, features.shape[1], dtype=features.dtype, device=features.device)
    full[torch.as_tensor(runtime.shard(list(range(size))), device=features.device)] = features
    return runtime.all_reduce_sum(full)


def _chosen_images(groups: list[int], limit: int | None) -> np.ndarray:
    """At most ``limit`` positions, as equal per group (class or image) as possible, seeded; sorted."""
    count = len(groups)
    if limit is None or limit >= count:
        return np.arange(count)
    rng = np.random.default_rng(ALIGNMENT_SEED)
    groups_array = np.asarray(groups)
    per_group = [rng.permutation(np.flatnonzero(groups_array == group)) for group in np.unique(groups_array)]
    chosen: list[int] = []
    depth = 0
    while len(chosen) < limit:
        for members in per_group:
            if depth < len(members) and len(chosen) < limit:
                chosen.append(int(members[depth]))
        depth += 1
    return np.sort(np.asarray(chosen))


def labelled_set(kept: dict, limit: int | None, runtime) -> dict[str, torch.Tensor]:
    """An alignment set from a labelled set's kept features: each chosen image paired with its class
    prompt (the class features are the text rows)."""
    classes = kept["classes"]
    images = _gathered(kept["images"], len(classes), runtime)
    chosen = _chosen_images(classes, limit)
    return {"images": images[torch.as_tensor(chosen, device=images.device)].float().cpu(),
            "texts": kept["texts"].float().cpu(),
            "image_index": torch.arange(len(chosen)),
            "text_index": torch.as_tensor([classes[position] for position in chosen], dtype=torch.long)}


def captioned_set(captioned: CaptionedImages, images: torch.Tensor, texts: torch.Tensor,
                  limit: int | None) -> dict[str, torch.Tensor]:
    """An alignment set from a captioned set: the chosen images and all their captions, each caption
    paired with its image."""
    chosen = _chosen_images(list(range(len(captioned.images))), limit)
    new_position = {int(old): new for new, old in enumerate(chosen)}
    rows = [row for row, owner in enumerate(captioned.caption_image) if owner in new_position]
    return {"images": images[torch.as_tensor(chosen, device=images.device)].float().cpu(),
            "texts": texts[torch.as_tensor(rows, dtype=torch.long, device=texts.device)].float().cpu(),
            "image_index": torch.as_tensor([new_position[captioned.caption_image[row]] for row in rows],
                                           dtype=torch.long),
            "text_index": torch.arange(len(rows))}


class AlignmentTracker:
    """Alignment measures per set, against the zero-shot and the previous model's features.

    The features of each measured row are kept (in memory, and by the main process in the run
    folder's checkpoints directory) for the next rows' rotation measures; a resumed run reads them.
    """

    def __init__(self, checkpoints: Path | None, is_main: bool) -> None:
        self.checkpoints, self.is_main = checkpoints, is_main
        self._rows: dict[int, dict[str, torch.Tensor]] = {}

    def path(self, after_task: int) -> Path | None:
        if self.checkpoints is None:
            return None
        name = "zero_shot" if after_task < 0 else f"after_task_{after_task:02d}"
        return self.checkpoints / f"alignment_{name}.safetensors"

    def features_of(self, after_task: int) -> dict[str, torch.Tensor] | None:
        """The kept features of a row (None when that row was not measured)."""
        if after_task not in self._rows:
            path = self.path(after_task)
            if path is None or not path.is_file():
                return None
            self._rows[after_task] = read_verified(path)[1]
        return self._rows[after_task]

    def measure(self, after_task: int, sets: dict[str, dict[str, torch.Tensor]],
                previous_row: int | None = None) -> dict[str, dict[str, float]]:
        """The measures of every set at row ``after_task`` (-1: zero-shot); ``previous_row``: the row
        the rotation "vs previous" compares with (default ``after_task - 1``)."""
        from clipcl.eval.alignment import alignment_summary

        previous_row = after_task - 1 if previous_row is None else previous_row
        zero_shot = self.features_of(-1) if after_task >= 0 else None
        previous = self.features_of(previous_row) if after_task >= 0 else None
        results: dict[str, dict[str, float]] = {}
        kept: dict[str, torch.Tensor] = {}
        for name, measured in sets.items():
            summary = alignment_summary(measured["images"], measured["texts"], measured["image_index"],
                                        measured["text_index"])
            for prefix, reference in (("vs_zero_shot", zero_shot), ("vs_previous", previous)):
                if reference is not None and f"{name}|images" in reference:
                    summary.update(_prefixed(prefix, alignment_summary(
                        measured["images"], measured["texts"], measured["image_index"], measured["text_index"],
                        reference=(reference[f"{name}|images"], reference[f"{name}|texts"]))))
            results[name] = summary
            kept[f"{name}|images"] = measured["images"].contiguous()
            kept[f"{name}|texts"] = measured["texts"].contiguous()
        self._rows[after_task] = kept
        for old in [row for row in self._rows if row not in (-1, after_task)]:
            del self._rows[old]  # only the zero-shot row and the latest are compared with again
        path = self.path(after_task)
        if self.is_main and path is not None and kept:
            atomic_save_safetensors(kept, path, metadata={"row": str(after_task)})
        return results


def _prefixed(prefix: str, summary: dict[str, float]) -> dict[str, float]:
    """The reference-dependent measures of ``summary`` under ``prefix/``."""
    from clipcl.eval.alignment import REFERENCE_KEYS

    return {f"{prefix}/{key}": value for key, value in summary.items() if key in REFERENCE_KEYS}


def _captioned(pairs, name: str, memo: dict) -> CaptionedImages:
    """A caption set grouped by image for retrieval, built once per run (its images stay in memory)."""
    if name not in memo:
        memo[name] = from_caption_dataset(pairs, name=name)
    return memo[name]


def static_accuracy(context, held, batch_size: int) -> float:
    """Zero-shot accuracy (%) on a labelled held-out set of a caption-like stream, in its own label space."""
    from clipcl.eval.evaluator import count_correct

    correct, total = count_correct(context.strategy, held.test, held.classes, held.target_of_label, None,
                                   context.runtime, batch_size, context.cache, False)
    return 100.0 * correct / total


def evaluate_state(context, after_task: int, batch_size: int, workers: int = 0) -> dict[str, Any]:
    """Everything measured at one model state (``after_task`` -1: before training): ``row``,
    ``heldout``, ``retrieval`` (by set), ``alignment`` (by set; empty with ``eval.alignment`` off) and
    the ``seconds`` taken."""
    config, runtime, strategy, stream = context.config, context.runtime, context.strategy, context.stream
    measure_alignment = config.eval.alignment
    limit = config.eval.alignment_images
    started = time.perf_counter()
    sets: dict[str, dict[str, torch.Tensor]] = {}
    retrieval: dict[str, dict[str, float]] = {}
    if getattr(stream, "protocol", None) in CAPTION_PROTOCOLS:
        memo = context.captioned
        # A language stream's tasks show the same images: each is encoded once per image tower state.
        image_memo = context.language_image_features if stream.protocol == "languages" else None
        row, heldout = [], []
        for key, pairs, scores in ([(f"task/{task.name}", task.test, row) for task in stream.tasks]
                                   + [(f"held-out/{held.name}", held.test, heldout) for held in stream.heldout]):
            if hasattr(pairs, "labels"):  # a time stream's static classification task (a labelled set)
                scores.append(static_accuracy(context, stream.heldout[len(scores)], batch_size))
                continue
            captioned = _captioned(pairs, key, memo)
            recalls, images, texts = retrieval_with_features(strategy, captioned, batch_size, image_memo=image_memo)
            scores.append(matrix_entry(stream.protocol, recalls))
            retrieval[key] = recalls
            if measure_alignment:
                sets[key] = captioned_set(captioned, images, texts, limit)
    else:
        keep: dict | None = {} if measure_alignment else None
        row, heldout, _ = evaluate_row(strategy, stream, after_task, runtime, batch_size, context.cache,
                                       context.show_progress, num_workers=workers, keep=keep)
        for key, kept in (keep or {}).items():
            sets[key] = labelled_set(kept, limit, runtime)
    for captioned in context.retrieval_sets:
        recalls, images, texts = retrieval_with_features(strategy, captioned, batch_size)
        retrieval[captioned.name] = recalls
        if measure_alignment:
            sets[f"retrieval/{captioned.name}"] = captioned_set(captioned, images, texts, limit)
    alignment = context.alignment.measure(after_task, sets) if measure_alignment else {}
    return {"row": row, "heldout": heldout, "retrieval": retrieval, "alignment": alignment,
            "seconds": time.perf_counter() - started}
