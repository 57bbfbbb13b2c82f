"""Check the CUDA code paths on a machine with a GPU (the test suite runs on CPU only).

1. Full runs (train, evaluate, checkpoint, resume) of the tiny open_clip model on CUDA with every
   distillation strategy, in fp32, bf16 and fp16 (fp16 goes through the loop's gradient scaler):
   every loss and accuracy must be finite, and a run interrupted after its first task must resume
   to the same results.
2. Per-image evaluation on CUDA: a randomly initialised open_clip ViT-B-16 predicts the same class
   for every image whatever the batch size (1, 7, 64) and batch composition; the largest difference
   of image features across batch sizes is reported too (GPU kernels may change with the batch).

    python benchmarks/cuda_check.py --output cuda_check.json
"""

from __future__ import annotations

import argparse
import json
import math
import tempfile
import time

import numpy as np
import torch

from clipcl.config import ModelConfig, RunConfig, StreamConfig, from_dict
from clipcl.data.base import SubsetDataset
from clipcl.data.streams import build_stream
from clipcl.engine.runtime import Runtime
from clipcl.eval.evaluator import image_features, predict
from clipcl.models import build_backend
from clipcl.models.tiny import write_tiny_open_clip_config
from clipcl.run import run_experiment
from clipcl.strategies import build_strategy

STRATEGIES = [
    {"name": "finetune", "train": "all"},
    {"name": "lwf"},
    {"name": "vr_lwf", "pseudo_texts": 32},
    {"name": "vr_lwf", "variant": "zscl", "pseudo_texts": 64},
    {"name": "zscl", "reference_dataset": "synthetic-9", "reference_samples": 32, "reference_texts_dataset": "cifar10",
     "average_every": 2},
    {"name": "wise_ft"},
]


def finite(values) -> bool:
    return all(value is None or math.isfinite(value) for value in np.ravel(np.asarray(values, dtype=float)))


def run_checks(root: str, accelerator: str, precisions: list[str]) -> list[dict]:
    tiny = str(write_tiny_open_clip_config(f"{root}/tiny"))
    records = []
    for precision in precisions:
        for strategy in STRATEGIES:
            def config(name: str, strategy=strategy, precision=precision) -> RunConfig:
                return from_dict(RunConfig, {
                    "model": {"backend": "open_clip", "name": tiny},
                    "stream": {"protocol": "class_incremental", "datasets": ["synthetic-0"], "num_tasks": 2,
                               "heldout": ["synthetic-5"], "test_samples_per_task": 40},
                    "strategy": strategy,
                    "train": {"batch_size": 16, "max_steps_per_task": 4, "lr": 1e-3, "precision": precision,
                              "accelerator": accelerator},
                    "eval": {"batch_size": 32, "cache_dir": "", "retrieval": ["synthetic-7"], "retrieval_images": 12},
                    "output_dir": f"{root}/{precision}-{strategy['name']}-{strategy.get('variant', '')}-{name}",
                })
            started = time.perf_counter()
            full = run_experiment(config("full"), show_progress=False)
            interrupted = config("resumed")
            run_experiment(interrupted, show_progress=False, stop_after_task=0)
            resumed = run_experiment(interrupted, show_progress=False)
            record = {
                "precision": precision, "strategy": strategy, "device": full["host"]["device"],
                "finite": finite(full["accuracy"]["matrix"]) and finite(full["losses_first_last"]),
                "resume_equal": resumed["accuracy"]["matrix"] == full["accuracy"]["matrix"],
                "seconds": time.perf_counter() - started,
                "losses_first_last": full["losses_first_last"],
            }
            print(json.dumps(record), flush=True)
            records.append(record)
    return records


@torch.no_grad()
def per_image_check(architecture: str, device: torch.device) -> dict:
    torch.manual_seed(0)
    backend = build_backend(ModelConfig(backend="open_clip", name=architecture)).to(device)
    strategy = build_strategy(backend, {"name": "zero_shot"}).to(device).eval()
    stream = build_stream(StreamConfig(protocol="multi_domain", datasets=["synthetic-0", "synthetic-1"],
                                       test_samples_per_task=120), seed=0)
    runtime = Runtime(device)
    task = stream.tasks[0]
    classes, _ = stream.eval_label_space(0, 0)
    reference, _ = predict(strategy, task.test, classes, 0, runtime, batch_size=1)
    same = {}
    for batch_size in (7, 64):
        predictions, _ = predict(strategy, task.test, classes, 0, runtime, batch_size=batch_size)
        same[f"batch_{batch_size}"] = bool(torch.equal(predictions, reference))
    order = np.random.default_rng(0).permutation(len(task.test))
    shuffled, _ = predict(strategy, SubsetDataset(task.test, order), classes, 0, runtime, batch_size=16)
    same["shuffled_batch_16"] = bool(torch.equal(shuffled, reference[order]))
    one, _ = image_features(strategy, task.test, 0, runtime, batch_size=1, cache=None, show_progress=False)
    many, _ = image_features(strategy, task.test, 0, runtime, batch_size=64, cache=None, show_progress=False)
    return {"architecture": architecture, "images": len(task.test), "identical_predictions": same,
            "max_feature_difference_batch_1_vs_64": float((one.double() - many.double()).abs().max())}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--architecture", default="ViT-B-16")
    parser.add_argument("--device", default="cuda", help="cuda, or cpu for a quick check of this script")
    parser.add_argument("--precisions", default="fp32,bf16,fp16")
    parser.add_argument("--output")
    args = parser.parse_args()
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("no CUDA device")
    with tempfile.TemporaryDirectory() as root:
        runs = run_checks(root, args.device, args.precisions.split(","))
    per_image = per_image_check(args.architecture, torch.device(args.device))
    print(json.dumps(per_image), flush=True)
    record = {"gpu": torch.cuda.get_device_name() if args.device == "cuda" else None, "torch": torch.__version__, "runs": runs, "per_image": per_image,
              "all_finite": all(run["finite"] for run in runs), "all_resume_equal": all(run["resume_equal"] for run in runs)}
    if args.output:
        with open(args.output, "w") as handle:
            json.dump(record, handle, indent=1)


if __name__ == "__main__":
    main()
