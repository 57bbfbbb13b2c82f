"""Full T x T evaluation of a 5-task stream with and without the image-feature cache, in one run.

The strategy fine-tunes the text tower only (the image tower is frozen), so every row of the matrix
would encode the same test images again without the cache. Both passes evaluate the zero-shot row
and the five "after task t" rows on the same model states, in the same process; the training
between rows is short and not timed. The accuracy matrices must be identical.

    python benchmarks/eval_cache.py --output docs/results/eval_cache.json
"""

from __future__ import annotations

import argparse
import json
import time

import torch
from seeded import machine, write_json

from clipcl.config import load_config
from clipcl.data.streams import build_stream
from clipcl.engine.runtime import Runtime
from clipcl.engine.tasks import model_states, standalone_context
from clipcl.eval.cache import FeatureCache
from clipcl.eval.evaluator import eval_batch_size, evaluate_row
from clipcl.models import build_backend
from clipcl.run import seed_everything
from clipcl.strategies import build_strategy


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--test-samples", type=int, default=200, help="test images per task")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--output", help="write the measurements as JSON here")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    config = load_config(None, [
        "model.backend=starter",
        "stream.protocol=class_incremental", "stream.datasets=[fashion_mnist]", "stream.num_tasks=5",
        "stream.train_samples_per_task=64", f"stream.test_samples_per_task={args.test_samples}",
        "strategy={name: finetune, train: text}", "train.batch_size=32", "train.lr=1e-4",
    ])
    seed_everything(config.seed)
    backend = build_backend(config.model)
    stream = build_stream(config.stream, config.seed)
    strategy = build_strategy(backend, config.strategy)
    runtime = Runtime(torch.device("cpu"))
    cache = FeatureCache(None)  # memory only: measures the cache, not the disk
    context = standalone_context(config, strategy, stream, runtime, None)

    timings = {"cached": 0.0, "uncached": 0.0}
    matrices = {"cached": [], "uncached": []}
    for after_task in model_states(context):
        for mode in ("uncached", "cached"):
            started = time.perf_counter()
            row, _, _ = evaluate_row(strategy, stream, after_task, runtime, eval_batch_size(config.eval.batch_size, runtime.device),
                                     cache if mode == "cached" else None, show_progress=False)
            timings[mode] += time.perf_counter() - started
            matrices[mode].append(row)
    assert matrices["cached"] == matrices["uncached"], "the cache changed a number"
    result = {
        "stream": "class-incremental Fashion-MNIST, 5 tasks, starter model, text tower fine-tuned",
        "rows_evaluated": len(matrices["cached"]),
        "test_images_per_row": sum(len(task.test) for task in stream.tasks),
        "seconds_uncached": round(timings["uncached"], 2),
        "seconds_cached": round(timings["cached"], 2),
        "speedup": round(timings["uncached"] / timings["cached"], 2),
        "cache_hits": cache.hits, "cache_misses": cache.misses,
        "matrices_identical": True,
        "machine": f"{machine()}, torch threads {args.threads}",
        "torch": torch.__version__,
    }
    print(json.dumps(result, indent=2))
    write_json(args.output, result)


if __name__ == "__main__":
    main()
