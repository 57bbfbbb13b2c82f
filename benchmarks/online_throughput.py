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
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from online_lifelong import METHODS

from clipcl.config import RunConfig, from_dict
from clipcl.run import run_experiment


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--samples", type=int, default=160, help="stream length (Fashion-MNIST training images)")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--output")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    methods = [name for name in METHODS if name != "zero_shot"]

    work = Path(tempfile.mkdtemp(prefix="online-throughput-"))

    def config_for(method: str) -> RunConfig:
        section, _, lr = METHODS[method]
        return from_dict(RunConfig, {
            "output_dir": str(work / method),
            "observe": {"progress": False, "tensorboard": False},
            "model": {"backend": "starter"},
            "stream": {"protocol": "si_blurry", "datasets": ["fashion_mnist"], "num_tasks": 5,
                       "train_samples_per_task": args.samples, "test_samples_per_task": 10},
            "strategy": dict(section),
            "train": {"batch_size": 16, "online_iter": 3, "lr": lr},
            "eval": {"eval_period": 10**9, "cache_dir": ""},
        })

    seconds: dict[str, list[float]] = {name: [] for name in methods}
    stream_images = 0
    for _ in range(args.rounds):
        for method in methods:
            # A whole run (same seed, same initial weights); only its training time is counted: the
            # evaluations run once at the end (eval_period is huge) and are timed apart.
            results = run_experiment(config_for(method), restart=True, show_progress=False)
            stream_images = results["stream"]["samples"]
            seconds[method].append(results["timing"]["train_seconds"])
            print(f"{method:<13} {stream_images / seconds[method][-1]:7.1f} img/s", flush=True)
    base = stream_images / statistics.median(seconds["online_ft"])
    rows = []
    for method in methods:
        rate = stream_images / statistics.median(seconds[method])
        rows.append({"method": method, "strategy": METHODS[method][0], "tuned": METHODS[method][1],
                     "images_per_second": rate, "ratio_to_online_ft": rate / base,
                     "images_per_second_each_round": [stream_images / value for value in seconds[method]]})
    print(f"{'method':<13} {'img/s':>7} {'x FT':>6}")
    for row in rows:
        print(f"{row['method']:<13} {row['images_per_second']:7.1f} {row['ratio_to_online_ft']:6.2f}")
    if args.output:
        record = {"benchmark": "online_throughput", "stream_images": stream_images, "batch_size": 16,
                  "online_iter": 3, "rounds": args.rounds, "results": rows, "threads": args.threads,
                  "cpus": os.cpu_count(), "machine": platform.machine(), "torch": torch.__version__}
        Path(args.output).parent.mkdir(parents=True, exist_ok=True)
        Path(args.output).write_text(json.dumps(record, indent=2))


if __name__ == "__main__":
    main()
