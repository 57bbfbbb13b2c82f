"""Full T x T evaluation against a bare loop of only the necessary encodes, in one process.

For each model, stream and strategy kind (``image``: the text tower frozen; ``text``: the image tower
frozen; ``all``: both trained, finetune in each case), the model goes through the zero-shot state and
one short (untimed) training per task; at every state three evaluations run, in a rotating order:

- ``new``: ``evaluate_row`` with the feature cache (memory only), text from one canonical encode;
- ``old``: ``evaluate_row(shared_text=False)`` with the same image cache: each task's label space is
  encoded on its own, as clipcl did before;
- ``bare``: preprocessing + ``encode_image`` of each test image and one encode of each distinct
  prompt, only at the states where that tower's features changed (the first state, and every state
  for a tower that trains).

The ratio is a mode's total seconds over the bare loop's, summed over the states of the run.

    python benchmarks/eval_limit.py --output docs/results/eval_limit.json
    python benchmarks/eval_limit.py --models starter open_clip:ViT-B-32 --test-samples 8
"""

from __future__ import annotations

import argparse
import json
import time

import torch
from seeded import machine, write_json
from torch.utils.data import DataLoader, Subset

from clipcl.config import load_config
from clipcl.data.streams import build_stream
from clipcl.engine.runtime import Runtime
from clipcl.engine.tasks import model_states, standalone_context
from clipcl.eval.cache import FeatureCache
from clipcl.eval.evaluator import _ImagesOnly, eval_batch_size, evaluate_row
from clipcl.eval.text_cache import stream_classes
from clipcl.models import build_backend
from clipcl.run import seed_everything
from clipcl.strategies import build_strategy
from clipcl.strategies.base import class_text_features

STREAMS = {
    "class_incremental": ["stream.protocol=class_incremental", "stream.datasets=[fashion_mnist]", "stream.num_tasks=5"],
    "multi_domain": ["stream.protocol=multi_domain", "stream.datasets=[synthetic-0,synthetic-1,synthetic-2]"],
}


def model_overrides(name: str) -> list[str]:
    if name == "starter":
        return ["model.backend=starter"]
    if name.startswith("open_clip:"):
        return ["model.backend=open_clip", f"model.name={name.split(':', 1)[1]}"]
    raise SystemExit(f"--models takes starter or open_clip:ARCH, got {name!r}")


@torch.no_grad()
def bare_encode(backend, stream, batch_size: int, images: bool, texts: bool) -> None:
    """The necessary work: each test image through preprocessing and the image tower, each distinct
    prompt through the text tower once."""
    if images:
        for dataset in [task.test for task in stream.tasks] + [held.test for held in stream.heldout]:
            view = Subset(_ImagesOnly(dataset, backend.preprocess), list(range(len(dataset))))
            for batch in DataLoader(view, batch_size=batch_size, generator=torch.Generator()):
                backend.encode_image(batch)
    if texts:
        class_text_features(backend, stream_classes(stream), ensemble=True)


def measure(model: str, stream_name: str, kind: str, args) -> dict:
    config = load_config(None, model_overrides(model) + STREAMS[stream_name] + [
        f"stream.test_samples_per_task={args.test_samples}", "stream.train_samples_per_task=16",
        f"strategy={{name: finetune, train: {kind}}}", "train.batch_size=8", "train.max_steps_per_task=1",
        "train.lr=1e-5"])
    seed_everything(config.seed)
    runtime = Runtime(torch.device("cpu"))
    strategy = build_strategy(build_backend(config.model), config.strategy)
    stream = build_stream(config.stream, config.seed)
    context = standalone_context(config, strategy, stream, runtime, None)
    batch_size = eval_batch_size(config.eval.batch_size, runtime.device)
    caches = {"new": FeatureCache(None), "old": FeatureCache(None)}
    seconds = {"new": 0.0, "old": 0.0, "bare": 0.0}
    rows: dict[str, list] = {"new": [], "old": []}
    modes = list(seconds)
    for state, after_task in enumerate(model_states(context)):
        strategy.eval()
        for mode in modes[state % 3:] + modes[: state % 3]:
            started = time.perf_counter()
            if mode == "bare":
                bare_encode(strategy.backend, stream, batch_size, images=state == 0 or kind != "text",
                            texts=state == 0 or kind != "image")
            else:
                row, _heldout, _ = evaluate_row(strategy, stream, after_task, runtime, batch_size, caches[mode],
                                               show_progress=False, shared_text=mode == "new")
                rows[mode].append(row)
            seconds[mode] += time.perf_counter() - started
    return {"model": model, "stream": stream_name, "kind": {"image": "text tower frozen", "text": "image tower frozen",
                                                            "all": "both trained"}[kind],
            "states": len(stream.tasks) + 1, "test_images_per_row": sum(len(t.test) for t in stream.tasks),
            "distinct_classes": len(stream_classes(stream)), "eval_batch_size": batch_size,
            "seconds": {mode: round(value, 2) for mode, value in seconds.items()},
            "ratio_new": round(seconds["new"] / seconds["bare"], 2),
            "ratio_old": round(seconds["old"] / seconds["bare"], 2),
            "old_and_new_matrices_equal": rows["new"] == rows["old"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=["starter"])
    parser.add_argument("--streams", nargs="+", default=list(STREAMS), choices=list(STREAMS))
    parser.add_argument("--kinds", nargs="+", default=["image", "text", "all"], choices=["image", "text", "all"])
    parser.add_argument("--test-samples", type=int, default=20, help="test images per task")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--output")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    results = []
    for model in args.models:
        for stream_name in args.streams:
            for kind in args.kinds:
                results.append(measure(model, stream_name, kind, args))
                print(json.dumps(results[-1]), flush=True)
    summary = {"results": results, "threads": args.threads, "test_samples_per_task": args.test_samples,
               "machine": machine(),
               "torch": torch.__version__}
    write_json(args.output, summary)


if __name__ == "__main__":
    main()
