"""MoE-Adapters with and without DDAS against zero-shot, fine-tuning and ZSCL, on the offline
multi-domain stream and its X-TAIL form (Yu et al., CVPR 2024 protocol), starter model, several seeds.

Stream: Fashion-MNIST -> MNIST-5k -> sklearn digits, 640 training and 200 test images per task, the
17 offline photos as the held-out domain. Every method trains 3 epochs per task (60 steps of 32 images),
AdamW without weight decay, cosine schedule after 2 warm-up steps.

Training does not depend on the protocol (MTIL and X-TAIL differ only at test: X-TAIL gives no domain
id and classifies among the union of all classes), so each (method, seed) trains once and, after every
task, is evaluated under both protocols.

    python benchmarks/moe_adapters.py                      # 3 seeds, all methods (about an hour on 2 cores)
    python benchmarks/moe_adapters.py --seeds 0 --methods finetune,moe_ddas

Each finished (method, seed) is saved under ``runs/moe_adapters/<method>/seed<k>.json`` and not repeated.
"""

from __future__ import annotations

import argparse
import platform
import time
from functools import partial
from pathlib import Path

import numpy as np
import torch
from seeded import cell, choices, mean_and_std, write_summary
from train_once import cached_record, config_digests, train_and_evaluate

from clipcl.config import RunConfig, from_dict

# name: (strategy section, learning rate). Fine-tuning and ZSCL use the rate of the other starter
# benchmarks. MoE-Adapters' rate was chosen before this benchmark ran, by the training loss on
# Fashion-MNIST (seed 0) among 1e-3 (the official code's common rate), 5e-3 and 2e-2: zero-initialised
# adapters scaled by 0.1 barely move in 60 steps at 1e-3 (docs/moe_adapters.md).
METHODS: dict[str, tuple[dict, float]] = {
    "zero_shot": ({"name": "zero_shot"}, 1e-4),
    "finetune": ({"name": "finetune", "train": "all"}, 1e-4),
    # The real offline images are the stream's tasks and the held-out photos, so ZSCL's reference
    # images are clipcl's synthetic squares (ZSCL uses ImageNet); texts: CIFAR-100 class prompts.
    "zscl": ({"name": "zscl", "train": "all", "reference_dataset": "synthetic-9",
              "reference_texts_dataset": "cifar100", "average_every": 10}, 1e-4),
    "moe_no_ddas": ({"name": "moe_adapters", "selector": "none"}, 5e-3),
    "moe_ddas": ({"name": "moe_adapters", "selector": "ddas"}, 5e-3),
    # DDAS with the official code's autoencoder shape and recipe (docs/moe_adapters.md, fidelity.md B4).
    "moe_ddas_official": ({"name": "moe_adapters", "selector": "ddas", "ddas_shape": "official"}, 5e-3),
}
PROTOCOLS = ("multi_domain", "xtail")
METRICS = [("transfer", "Transfer"), ("avg", "Avg"), ("last", "Last"), ("bwt", "BWT"),
           ("heldout_last", "held-out after")]


def run_config(method: str, seed: int, protocol: str, args: argparse.Namespace) -> RunConfig:
    section, lr = METHODS[method]
    return from_dict(RunConfig, {
        "model": {"backend": "starter"},
        "stream": {"protocol": protocol, "datasets": ["fashion_mnist", "mnist_5k", "digits"],
                   "train_samples_per_task": args.train_samples, "test_samples_per_task": args.test_samples,
                   "heldout": ["skimage_photos"]},
        "strategy": dict(section),
        "train": {"epochs": args.epochs, "batch_size": 32, "lr": lr, "weight_decay": 0.0, "warmup_steps": 2},
        "eval": {"batch_size": 128},
        "seed": seed,
    })


def run_one(method: str, seed: int, configs: dict[str, RunConfig]) -> dict:
    """Train ``method`` once on the stream and evaluate it under both protocols after every task."""
    record = train_and_evaluate(configs, train=METHODS[method][0]["name"] != "zero_shot")
    return {"method": method, "seed": seed, **record}


def summarise(records: list[dict]) -> dict:
    summary: dict = {}
    for method in METHODS:
        group = [record for record in records if record["method"] == method]
        if not group:
            continue
        entry: dict = {"seeds": sorted(record["seed"] for record in group)}
        for protocol in PROTOCOLS:
            entry[protocol] = {key: mean_and_std(record["metrics"][protocol][key] for record in group)
                               for key, _ in METRICS}
        routing = [record["strategy_report"].get("routing") for record in group]
        if all(routing):
            entry["routing"] = {
                "own_router": mean_and_std(np.mean([task["own_router"] for task in r["trained_tasks"]]) for r in routing),
                "heldout_to_zero_shot": mean_and_std(np.mean([held["zero_shot"] for held in r["heldout"]]) for r in routing),
                "per_task_own_router": {task["task"]: mean_and_std(
                    next(t["own_router"] for t in r["trained_tasks"] if t["task"] == task["task"]) for r in routing)
                    for task in routing[0]["trained_tasks"]},
            }
        parameters = [record["strategy_report"].get("parameters") for record in group]
        if all(parameters):
            entry["parameters"] = parameters[0]
        entry["train_seconds"] = mean_and_std(sum(record["train_seconds"]) for record in group) if group[0]["train_seconds"] else None
        summary[method] = entry
    return summary


def markdown(summary: dict) -> str:
    lines = []
    for protocol in PROTOCOLS:
        lines += [f"### {protocol}", "", "| method | seeds | " + " | ".join(label for _, label in METRICS) + " |",
                  "|---|---|" + "---|" * len(METRICS)]
        for method, entry in summary.items():
            cells = [cell(entry[protocol][key]) for key, _ in METRICS]
            lines.append(f"| {method} | {len(entry['seeds'])} | " + " | ".join(cells) + " |")
        lines.append("")
    routed = {method: entry["routing"] for method, entry in summary.items() if "routing" in entry}
    if routed:
        lines += ["### DDAS routing (test images)", "", "| method | own task's router % | held-out photos to zero-shot % |",
                  "|---|---|---|"]
        for method, routing in routed.items():
            lines.append(f"| {method} | {cell(routing['own_router'])} | {cell(routing['heldout_to_zero_shot'])} |")
        lines.append("")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--methods", default=",".join(METHODS))
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--train-samples", type=int, default=640)
    parser.add_argument("--test-samples", type=int, default=200)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--output-dir", default="runs/moe_adapters")
    parser.add_argument("--results", default="docs/results/moe_adapters.json")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    seeds = [int(seed) for seed in args.seeds.split(",")]
    methods = choices(parser, args.methods, METHODS, "method")
    records = []
    started = time.perf_counter()
    for seed in seeds:
        for method in methods:
            configs = {protocol: run_config(method, seed, protocol, args) for protocol in PROTOCOLS}
            record = cached_record(Path(args.output_dir) / method / f"seed{seed}.json",
                                   partial(run_one, method, seed, configs), config_digests(configs))
            records.append(record)
            md, xt = record["metrics"]["multi_domain"], record["metrics"]["xtail"]
            print(f"{method:<12} seed {seed}: MTIL Transfer {md['transfer']:5.1f} Avg {md['avg']:5.1f} Last {md['last']:5.1f}"
                  f" | X-TAIL Transfer {xt['transfer']:5.1f} Avg {xt['avg']:5.1f} Last {xt['last']:5.1f}"
                  f" | held-out {md['heldout_last']:5.1f}", flush=True)
            summary = summarise(records)
            write_summary(args.results, {
                "benchmark": "moe_adapters", "arguments": vars(args),
                "methods": {name: {"strategy": METHODS[name][0], "lr": METHODS[name][1]} for name in methods},
                "summary": summary, "runs": [{key: value for key, value in r.items() if key not in ("rows", "losses")} for r in records],
                "elapsed_seconds": time.perf_counter() - started,
                "machine": {"cpus": torch.get_num_threads(), "machine": platform.machine(), "torch": torch.__version__},
            }, markdown(summary))


if __name__ == "__main__":
    main()
