"""Choose CoLeCLIP's learning rate on the offline starter before its benchmark, by training loss only.

The rule MoE-Adapters' rate was chosen by (docs/moe_adapters.md): seed 0, the first task of the
benchmark's stream (Fashion-MNIST) with the benchmark's training settings (benchmarks/coleclip.py:
640 images, 3 epochs, batch 32, cosine after 2 warm-up steps), one run per candidate rate, and the
mean training loss of the last five optimizer steps compared. No test accuracy enters the choice
(the loop evaluates a few test images because it always does; they are not read).

    python benchmarks/coleclip_rate.py                     # candidates 1e-3 3e-3 1e-2 3e-2
"""

from __future__ import annotations

import argparse
import json
import platform
from pathlib import Path

import numpy as np
import torch
from train_once import train_and_evaluate

from clipcl.config import RunConfig, from_dict


def config(lr: float, args: argparse.Namespace) -> RunConfig:
    return from_dict(RunConfig, {
        "model": {"backend": "starter"},
        "stream": {"protocol": "open_domain_cil", "datasets": ["fashion_mnist"], "heldout": [],
                   "train_samples_per_task": args.train_samples, "test_samples_per_task": 20},
        "strategy": {"name": "coleclip"},
        "train": {"epochs": args.epochs, "batch_size": 32, "lr": lr, "weight_decay": 0.0, "warmup_steps": 2},
        "eval": {"batch_size": 128},
        "seed": 0,
        "output_dir": str(Path(args.output_dir) / f"lr{lr:g}"),
    })


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rates", default="1e-3,3e-3,1e-2,3e-2")
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--train-samples", type=int, default=640)
    parser.add_argument("--output-dir", default="runs/coleclip_rate")
    parser.add_argument("--results", default="docs/results/coleclip_rate.json")
    args = parser.parse_args()
    torch.set_num_threads(2)
    record = {"rule": "mean training loss of the last 5 steps, seed 0, Fashion-MNIST, no test data",
              "arguments": vars(args), "machine": {"machine": platform.machine(), "torch": torch.__version__},
              "rates": {}}
    for rate in [float(value) for value in args.rates.split(",")]:
        losses = train_and_evaluate({"open_domain_cil": config(rate, args)})["losses"][0]
        record["rates"][f"{rate:g}"] = {"first": losses[0], "last5": float(np.mean(losses[-5:])),
                                        "steps": len(losses), "losses": losses}
        print(f"lr {rate:g}: first {losses[0]:.3f}, last five {np.mean(losses[-5:]):.3f} ({len(losses)} steps)",
              flush=True)
        Path(args.results).parent.mkdir(parents=True, exist_ok=True)
        Path(args.results).write_text(json.dumps(record, indent=1))


if __name__ == "__main__":
    main()
