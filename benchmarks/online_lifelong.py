"""Online lifelong learning on Si-Blurry streams (Wang et al. 2024 protocol) on the offline starter.

Two streams, both Si-Blurry with N = 50% disjoint classes, M = 10% blurred samples and 5 hidden
tasks (the papers' setting):

- ``fashion_mnist``: 600 Fashion-MNIST training images (60 per class);
- ``union``: 200 images each of Fashion-MNIST, MNIST-5k and sklearn digits (the digit datasets share
  their ten class names, so the stream has 20 classes).

Batches of 16 new images, each used for 3 optimiser steps (``online_iter`` 3, as the paper's scripts);
evaluation on all classes seen so far every 150 samples. Zero-shot retention is measured on the 17
offline photos (and on MNIST-5k for the Fashion-MNIST stream). Learning rates are not tuned: full-model
methods use 1e-4 (the rate of the other starter benchmarks), parameter-efficient ones 5e-4 (the LoRA
rate of LifeLong-CLIP's scripts, ``scripts/lora_clip.sh``). The SIT family (``sit``, ``sit_image``,
``sit_text``, ``pet_all_seen``) also trains as the official trainer does: AdamW weight decay 1e-5, no
gradient clipping, a fresh augmentation per ``online_iter`` step (``configs/sit.yaml``). Every run of
one seed sees the same stream.

    python benchmarks/online_lifelong.py                 # 3 seeds, both streams, all methods
    python benchmarks/online_lifelong.py --seeds 0 --streams fashion_mnist --methods finetune,sit

Runs go to ``runs/online_lifelong/<stream>/<method>/seed<k>``; a finished run is not repeated. The
summary (mean and standard deviation over seeds) is written as JSON and Markdown after every run.
"""

from __future__ import annotations

import argparse
import os
import platform
import time
from pathlib import Path

import torch
from seeded import cell, choices, mean_and_std, write_summary

from clipcl.config import RunConfig, from_dict
from clipcl.run import run_experiment

FULL_LR, PEFT_LR = 1e-4, 5e-4
SIT_FAMILY = ("pet_all_seen", "sit", "sit_image", "sit_text")
"""Rows that use the ``sit`` preset, trained with LifeLong-CLIP's optimiser settings (SIT_TRAIN)."""
SIT_TRAIN = {"weight_decay": 1e-5, "max_grad_norm": None, "online_reaugment": True}
"""LLC @ bf20b82: utils/train_utils.py:26-27 (AdamW wd 1e-5), methods/adapter_clip.py:47-48,90,100-104
(re-augmented every step, no clipping)."""

METHODS: dict[str, tuple[dict, str, float]] = {
    # name: (strategy section, tuned encoder(s), learning rate)
    "zero_shot": ({"name": "zero_shot"}, "none", FULL_LR),
    "online_ft": ({"name": "finetune", "train": "all"}, "both (all weights)", FULL_LR),
    "er": ({"name": "er", "train": "all", "memory_size": 200}, "both (all weights)", FULL_LR),
    "lwf": ({"name": "lwf", "train": "all"}, "both (all weights)", FULL_LR),
    "pet_all_seen": ({"name": "sit", "train": "all", "label_space": "task"}, "both (LoRA)", PEFT_LR),
    "sit": ({"name": "sit", "train": "all"}, "both (LoRA)", PEFT_LR),
    "sit_image": ({"name": "sit", "train": "image"}, "image (LoRA)", PEFT_LR),
    "sit_text": ({"name": "sit", "train": "text"}, "text (LoRA)", PEFT_LR),
}

STREAMS = {
    "fashion_mnist": {"datasets": ["fashion_mnist"], "train_samples_per_task": 600,
                      "heldout": ["skimage_photos", "mnist_5k"]},
    "union": {"datasets": ["fashion_mnist", "mnist_5k", "digits"], "train_samples_per_task": 200,
              "heldout": ["skimage_photos"]},
}

METRICS = [("a_auc", "A_auc"), ("a_last", "A_last"), ("heldout_zero_shot", "held-out ZS"),
           ("heldout_last", "held-out after"), ("heldout_retention", "retention %"),
           ("train_samples_per_second", "train img/s")]


def run_config(stream: str, method: str, seed: int, args: argparse.Namespace) -> RunConfig:
    section, _, lr = METHODS[method]
    data = {
        "model": {"backend": "starter"},
        "stream": {"protocol": "si_blurry", "num_tasks": 5, "disjoint_class_ratio": 0.5, "blurry_sample_ratio": 0.1,
                   "test_samples_per_task": args.test_samples, "heldout_samples": 300, **STREAMS[stream]},
        "strategy": dict(section),
        "train": {"batch_size": 16, "online_iter": args.online_iter, "lr": lr, "weight_decay": 0.0,
                  **(SIT_TRAIN if method in SIT_FAMILY else {})},
        "eval": {"batch_size": 128, "eval_period": args.eval_period},
        "seed": seed,
        "output_dir": str(Path(args.output_dir) / stream / method / f"seed{seed}"),
    }
    return from_dict(RunConfig, data)


def summarise(records: list[dict]) -> dict:
    groups: dict[tuple[str, str], list[dict]] = {}
    for record in records:
        groups.setdefault((record["stream"], record["method"]), []).append(record)
    summary: dict = {}
    for (stream, method), group in groups.items():
        entry = {"seeds": sorted(record["seed"] for record in group), "tuned": METHODS[method][1]}
        for key, _ in METRICS:
            entry[key] = mean_and_std(record["metrics"].get(key) for record in group)
        summary.setdefault(stream, {})[method] = entry
    return summary


def markdown(summary: dict, methods: list[str]) -> str:
    lines = []
    for stream in STREAMS:
        if stream not in summary:
            continue
        lines += [f"### {stream}", "", "| method | tuned | seeds | " + " | ".join(label for _, label in METRICS) + " |",
                  "|---|---|---|" + "---|" * len(METRICS)]
        for method in methods:
            entry = summary[stream].get(method)
            if entry is None:
                continue
            cells = [cell(entry[key]) for key, _ in METRICS]
            lines.append(f"| {method} | {entry['tuned']} | {len(entry['seeds'])} | " + " | ".join(cells) + " |")
        lines.append("")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--streams", default=",".join(STREAMS))
    parser.add_argument("--methods", default=",".join(METHODS))
    parser.add_argument("--online-iter", type=int, default=3)
    parser.add_argument("--eval-period", type=int, default=150)
    parser.add_argument("--test-samples", type=int, default=500, help="test images of the stream's classes")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--output-dir", default="runs/online_lifelong")
    parser.add_argument("--results", default="docs/results/online_lifelong.json")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    seeds = [int(seed) for seed in args.seeds.split(",")]
    streams = choices(parser, args.streams, STREAMS, "stream")
    methods = choices(parser, args.methods, METHODS, "method")

    records = []
    started = time.perf_counter()
    for seed in seeds:
        for stream in streams:
            for method in methods:
                config = run_config(stream, method, seed, args)
                run_started = time.perf_counter()
                results = run_experiment(config, show_progress=False)
                records.append({"stream": stream, "method": method, "seed": seed, "metrics": results["metrics"],
                                "anytime": results["anytime"], "output_dir": config.output_dir})
                metrics = results["metrics"]
                print(f"{stream:<14} {method:<13} seed {seed}: A_auc {metrics['a_auc']:5.1f} "
                      f"A_last {metrics['a_last']:5.1f} ZS {metrics.get('heldout_last', float('nan')):5.1f} "
                      f"({time.perf_counter() - run_started:.0f} s)", flush=True)
                summary = summarise(records)
                record = {"benchmark": "online_lifelong", "arguments": vars(args),
                          "methods": {name: {"strategy": METHODS[name][0], "tuned": METHODS[name][1],
                                             "lr": METHODS[name][2]} for name in methods},
                          "streams": {name: STREAMS[name] for name in streams}, "summary": summary, "runs": records,
                          "elapsed_seconds": time.perf_counter() - started,
                          "machine": {"cpus": os.cpu_count(), "machine": platform.machine(), "threads": args.threads,
                                      "torch": torch.__version__}}
                write_summary(args.results, record, markdown(summary, methods))
    print(markdown(summarise(records), methods))


if __name__ == "__main__":
    main()
