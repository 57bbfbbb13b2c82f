"""The "Don't Stop Learning" protocol (Ding et al. 2022) on the offline starter, several seeds.

The updated task is Fashion-MNIST (the offline dataset on which the starter has real zero-shot
ability). Two settings:

- ``one_session``: all 10 classes in one task;
- ``multi_session``: the 10 classes in 5 phases of 2 (a seeded class order per seed), the same number
  of training images in total.

Zero-shot ability is measured on datasets never trained on (scikit-image/scikit-learn photos and
MNIST-5k); image-text retrieval on the 17 photos with captions written from their labels (templated,
not real, captions). Every method trains the whole model with the same optimiser, learning rate,
batches and data; nothing is tuned per method. The metrics are defined in docs/metrics.md.

    python benchmarks/dont_stop_learning.py                      # 3 seeds, both settings, all methods
    python benchmarks/dont_stop_learning.py --seeds 0 --methods finetune,vr_lwf --settings one_session

Runs go to ``runs/dont_stop_learning/<setting>/<method>/seed<k>`` and resume if interrupted (run the
same command again). The summary (mean and standard deviation over seeds) is written as JSON and
Markdown after every run, so a partial benchmark is readable.
"""

from __future__ import annotations

import argparse
import os
import platform
import time
from pathlib import Path

import numpy as np
import torch
from seeded import cell, choices, mean_and_std, write_summary

from clipcl.config import RunConfig, from_dict
from clipcl.run import run_experiment

METHODS: dict[str, dict] = {
    "zero_shot": {"name": "zero_shot"},
    "finetune": {"name": "finetune", "train": "all"},
    # Ding et al.'s LwF baseline: their LwF_KL at T = 1 over every class seen so far, weighted by
    # --alpha 0.5, with the logit scale trained (methods/lwf.py, main.py; docs/fidelity.md A1).
    "lwf": {"name": "lwf", "train": "all", "alpha": 0.5, "temperature": 1.0, "train_logit_scale": True},
    "vr_lwf": {"name": "vr_lwf", "train": "all", "train_logit_scale": True},
    "vr_lwf_zscl": {"name": "vr_lwf", "variant": "zscl", "train": "all"},
    # Reference images: sklearn digits, a real dataset that is neither a task nor a held-out probe;
    # reference texts: CIFAR-100's class prompts. Averaging every 10 steps (ZSCL: every 100 of 1,000).
    "zscl": {"name": "zscl", "train": "all", "reference_dataset": "digits", "reference_texts_dataset": "cifar100",
             "average_every": 10},
    "wise_ft": {"name": "wise_ft", "train": "all", "alpha": 0.5},
}

SETTINGS = {"one_session": 1, "multi_session": 5}

METRICS = [
    ("ut_acc", "UT-Acc"), ("ut_last", "UT last"), ("zs_acc", "ZS-Acc"), ("a_acc", "A-Acc"), ("bwt", "BWT"),
    ("i2t_r1_change", "I→T R@1 Δ"), ("t2i_r1_change", "T→I R@1 Δ"),
]


def run_config(setting: str, method: str, seed: int, args: argparse.Namespace) -> RunConfig:
    phases = SETTINGS[setting]
    data = {
        "model": {"backend": "starter"},
        "stream": {
            "protocol": "class_incremental",
            "datasets": ["fashion_mnist"],
            "num_tasks": phases,
            "train_samples_per_task": args.train_samples // phases,
            "test_samples_per_task": args.test_samples // phases,
            "heldout": ["skimage_photos", "mnist_5k"],
            "heldout_samples": args.heldout_samples,
        },
        "strategy": dict(METHODS[method]),
        "train": {"epochs": 1, "batch_size": 32, "lr": args.lr, "weight_decay": 0.0, "warmup_steps": 0},
        "eval": {"batch_size": 128, "retrieval": ["skimage_photos"]},
        "seed": seed,
        "output_dir": str(Path(args.output_dir) / setting / method / f"seed{seed}"),
    }
    return from_dict(RunConfig, data)


def summarise(records: list[dict]) -> dict:
    """Mean and sample standard deviation over seeds, per (setting, method)."""
    groups: dict[tuple[str, str], list[dict]] = {}
    for record in records:
        groups.setdefault((record["setting"], record["method"]), []).append(record)
    summary = {}
    for (setting, method), group in groups.items():
        entry = {"seeds": sorted(record["seed"] for record in group)}
        for key, _ in METRICS:
            entry[key] = mean_and_std(record["metrics"].get(key) for record in group)
        entry["train_seconds"] = float(np.mean([sum(record["train_seconds"]) for record in group]))
        summary.setdefault(setting, {})[method] = entry
    return summary


def markdown(summary: dict, methods: list[str]) -> str:
    lines = []
    for setting in SETTINGS:
        if setting not in summary:
            continue
        lines += [f"### {setting.replace('_', '-')}", "",
                  "| method | seeds | " + " | ".join(label for _, label in METRICS) + " | train s |",
                  "|---|---|" + "---|" * len(METRICS) + "---|"]
        for method in methods:
            entry = summary[setting].get(method)
            if entry is None:
                continue
            cells = [cell(entry[key]) for key, _ in METRICS]
            lines.append(f"| {method} | {len(entry['seeds'])} | " + " | ".join(cells) + f" | {entry['train_seconds']:.0f} |")
        lines.append("")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--settings", default=",".join(SETTINGS))
    parser.add_argument("--methods", default=",".join(METHODS))
    parser.add_argument("--train-samples", type=int, default=960, help="training images in total per run")
    parser.add_argument("--test-samples", type=int, default=500, help="Fashion-MNIST test images in total")
    parser.add_argument("--heldout-samples", type=int, default=300, help="at most this many per held-out set")
    parser.add_argument("--lr", type=float, default=1e-4)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--output-dir", default="runs/dont_stop_learning")
    parser.add_argument("--results", default="docs/results/dont_stop_learning.json")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    seeds = [int(seed) for seed in args.seeds.split(",")]
    settings = choices(parser, args.settings, SETTINGS, "setting")
    methods = choices(parser, args.methods, METHODS, "method")

    records = []
    started = time.perf_counter()
    for seed in seeds:
        for setting in settings:
            for method in methods:
                config = run_config(setting, method, seed, args)
                run_started = time.perf_counter()
                results = run_experiment(config, show_progress=False)
                records.append({"setting": setting, "method": method, "seed": seed, "metrics": results["metrics"],
                                "train_seconds": results["timing"]["train_seconds"],
                                "output_dir": config.output_dir})
                print(f"{setting:<14} {method:<12} seed {seed}: UT {results['metrics']['ut_acc']:5.1f} "
                      f"ZS {results['metrics']['zs_acc']:5.1f} ({time.perf_counter() - run_started:.0f} s)", flush=True)
                summary = summarise(records)
                record = {
                    "benchmark": "dont_stop_learning",
                    "settings": {name: {"phases": SETTINGS[name]} for name in settings},
                    "arguments": vars(args),
                    "methods": {name: METHODS[name] for name in methods},
                    "summary": summary,
                    "runs": records,
                    "elapsed_seconds": time.perf_counter() - started,
                    "machine": {"cpus": os.cpu_count(), "machine": platform.machine(),
                                "threads": args.threads, "torch": torch.__version__},
                }
                write_summary(args.results, record, markdown(summary, methods))
    print(markdown(summarise(records), methods))


if __name__ == "__main__":
    main()
