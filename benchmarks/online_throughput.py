"""Online training throughput of each method relative to online fine-tuning, in one run.

One process loads the starter and one Si-Blurry Fashion-MNIST stream once. Every method then
consumes that same stream with the online loop (batches of 16 new images, ``online_iter`` 3, no
evaluation), starting from the same weights, in interleaved rounds. A method's throughput is stream
images per second of training time (the incoming images, counted once; replay and repeated steps are
part of the cost), the median over rounds; the ratio is that over online fine-tuning's.

    python benchmarks/online_throughput.py --output docs/results/online_throughput_cpu.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from online_lifelong import METHODS

from clipcl.config import RunConfig, from_dict
from clipcl.models import build_backend
from clipcl.online import build_online_stream, train_online
from clipcl.strategies import build_strategy
from clipcl.engine.runtime import Runtime


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--samples", type=int, default=160, help="stream length (Fashion-MNIST training images)")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--output")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    methods = [name for name in METHODS if name != "zero_shot"]

    def config_for(method: str) -> RunConfig:
        section, _, lr = METHODS[method]
        return from_dict(RunConfig, {
            "model": {"backend": "starter"},
            "stream": {"protocol": "si_blurry", "datasets": ["fashion_mnist"], "num_tasks": 5,
                       "train_samples_per_task": args.samples, "test_samples_per_task": 10},
            "strategy": dict(section),
            "train": {"batch_size": 16, "online_iter": 3, "lr": lr},
            "eval": {"eval_period": 10**9, "cache_dir": ""},
        })

    base_config = config_for("online_ft")
    torch.manual_seed(0)
    pristine = build_backend(base_config.model)
    initial = {name: tensor.clone() for name, tensor in pristine.state_dict().items()}
    stream = build_online_stream(base_config.stream, seed=0)
    runtime = Runtime(torch.device("cpu"))
    seconds: dict[str, list[float]] = {name: [] for name in methods}
    for _ in range(args.rounds):
        for method in methods:
            backend = build_backend(base_config.model)
            backend.load_state_dict(initial)
            torch.manual_seed(0)
            strategy = build_strategy(backend, config_for(method).strategy)
            config = config_for(method)
            # Only the end-of-stream evaluation runs (eval_period is huge); its time is not counted.
            outcome = train_online(strategy, stream, config, runtime, cache=None, show_progress=False)
            seconds[method].append(outcome["train_seconds"])
            print(f"{method:<13} {len(stream.train) / outcome['train_seconds']:7.1f} img/s", flush=True)
    base = len(stream.train) / statistics.median(seconds["online_ft"])
    rows = []
    for method in methods:
        rate = len(stream.train) / statistics.median(seconds[method])
        rows.append({"method": method, "strategy": METHODS[method][0], "tuned": METHODS[method][1],
                     "images_per_second": rate, "ratio_to_online_ft": rate / base,
                     "images_per_second_each_round": [len(stream.train) / value for value in seconds[method]]})
    print(f"{'method':<13} {'img/s':>7} {'x FT':>6}")
    for row in rows:
        print(f"{row['method']:<13} {row['images_per_second']:7.1f} {row['ratio_to_online_ft']:6.2f}")
    if args.output:
        record = {"benchmark": "online_throughput", "stream_images": len(stream.train), "batch_size": 16,
                  "online_iter": 3, "rounds": args.rounds, "results": rows, "threads": args.threads,
                  "cpus": os.cpu_count(), "machine": platform.machine(), "torch": torch.__version__}
        Path(args.output).parent.mkdir(parents=True, exist_ok=True)
        Path(args.output).write_text(json.dumps(record, indent=2))


if __name__ == "__main__":
    main()
