"""Show that measuring alignment in every run (issue 14) changed no accuracy, held-out or retrieval number.

Runs, on the tree it is imported from, tiny open_clip runs of three class protocols (multi-domain,
class-incremental, X-TAIL) with a held-out set and a templated retrieval set, for fine-tuning, ZSCL
and ER, a short online Si-Blurry run, and one starter run on real data (Fashion-MNIST, MNIST-5k,
digits; accuracies far from chance), and saves every matrix, held-out row, retrieval row and
metric that existed before the change (new keys are left out). Run it on two trees and compare::

    PYTHONPATH=/path/to/old/src python benchmarks/alignment_unchanged.py --out /tmp/old.json
    PYTHONPATH=src python benchmarks/alignment_unchanged.py --out /tmp/new.json
    python benchmarks/alignment_unchanged.py --compare /tmp/old.json /tmp/new.json

``--compare`` requires exact equality and lists every difference.
"""

from __future__ import annotations

import json
import sys
import tempfile
from pathlib import Path

import torch
from seeded import capture_or_compare

KEPT = ("accuracy", "heldout", "retrieval", "anytime", "losses_first_last")
NEW_METRICS = ("modality_gap", "alignment", "uniformity", "rotation", "inter_modal", "similarity_correlation")

RUNS = {
    "multi_domain-finetune": ({"protocol": "multi_domain"}, {"name": "finetune"}),
    "class_incremental-zscl": ({"protocol": "class_incremental", "datasets": ["synthetic-0"], "num_tasks": 3},
                               {"name": "zscl", "reference_dataset": "synthetic-3"}),
    "xtail-er": ({"protocol": "xtail"}, {"name": "er", "memory_size": 32}),
    "si_blurry-finetune": ({"protocol": "si_blurry", "num_tasks": 3, "train_samples_per_task": 40},
                           {"name": "finetune"}),
    # The offline starter on real data, where accuracies are far from chance (the tiny random model's
    # are near it, so only its losses and retrieval values would show a change).
    "starter-multi_domain-finetune": ({"protocol": "multi_domain", "datasets": ["fashion_mnist", "mnist_5k", "digits"],
                                       "test_samples_per_task": 200, "heldout": ["skimage_photos"],
                                       "heldout_samples": None}, {"name": "finetune", "train": "all"}),
}
STARTER_RUNS = ("starter-multi_domain-finetune",)


def capture(output: str) -> None:
    from clipcl.config import RunConfig, from_dict
    from clipcl.models.tiny import write_tiny_open_clip_config
    from clipcl.run import run_experiment

    torch.set_num_threads(1)
    record = {}
    with tempfile.TemporaryDirectory() as folder:
        model = str(write_tiny_open_clip_config(Path(folder)))
        for name, (stream, strategy) in RUNS.items():
            online = stream["protocol"] == "si_blurry"
            config = from_dict(RunConfig, {
                "model": {"backend": "starter"} if name in STARTER_RUNS else {"backend": "open_clip", "name": model},
                "stream": {"datasets": ["synthetic-0", "synthetic-1", "synthetic-2"], "test_samples_per_task": 60,
                           "heldout": ["synthetic-4"], "heldout_samples": 40, **stream},
                "strategy": strategy,
                # The starter keeps its zero-shot ability at a small rate (all of it trains).
                "train": {"batch_size": 16, "max_steps_per_task": 4, "lr": 1e-5 if name in STARTER_RUNS else 1e-3},
                "eval": {"batch_size": 32, "cache_dir": "", **({} if online else {
                    "retrieval": ["skimage_photos" if name in STARTER_RUNS else "synthetic-5"], "retrieval_images": 30})},
                "observe": {"tensorboard": False, "progress": False},
                "seed": 0, "output_dir": str(Path(folder) / name)})
            results = run_experiment(config, show_progress=False)
            kept = {key: results[key] for key in KEPT if key in results}
            kept["metrics"] = {key: value for key, value in results["metrics"].items()
                               if not key.startswith(NEW_METRICS) and key != "train_samples_per_second"}
            if "accuracy" in kept:
                kept["accuracy"] = {key: value for key, value in kept["accuracy"].items() if key != "measure"}
            record[name] = kept
            print(f"{name}: captured", file=sys.stderr)
    Path(output).write_text(json.dumps(record, indent=1, sort_keys=True))


if __name__ == "__main__":
    capture_or_compare(__doc__.splitlines()[0], capture)
