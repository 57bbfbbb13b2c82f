"""Training step time of each method relative to plain fine-tuning, on the same model and batch, in one run.

Every method trains the same model (the offline starter by default) on the same fixed batch of
Fashion-MNIST training images, from the same starting weights. A step is what the training loop does:
the strategy's forward (the student's passes plus any teacher, pseudo-text or reference passes),
backward, the optimizer step and the strategy's ``after_step``. Methods are timed in interleaved
rounds (every method once per round) so that drift of the machine's speed hits all of them alike; the
reported time per method is the median over all its timed steps, and the ratio is that median over
fine-tuning's.

    python benchmarks/step_time.py --output docs/results/step_time_cpu.json
    python benchmarks/step_time.py --model tiny --steps 3 --rounds 1     # a quick check of the script
    python benchmarks/step_time.py --model open_clip:ViT-B-16 --device cuda --precision bf16 --batch-size 64

An ``open_clip:ARCH`` model is built with random weights (no download): the cost of a step depends on
the architecture, not on the values of the weights.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time

import torch

from clipcl.config import ModelConfig, StreamConfig
from clipcl.data.streams import build_stream
from clipcl.engine.context import attach_by_hand, batch_by_hand
from clipcl.engine.runtime import Runtime
from clipcl.models import build_backend
from clipcl.strategies import build_strategy

# Each method with the settings the "Don't Stop Learning" benchmark uses (benchmarks/dont_stop_learning.py).
METHODS: dict[str, dict] = {
    "finetune": {"name": "finetune", "train": "all"},
    "wise_ft": {"name": "wise_ft", "train": "all", "alpha": 0.5},
    # Ding et al.'s LwF baseline: their LwF_KL at T = 1, weighted by --alpha 0.5 (methods/lwf.py, main.py).
    "lwf": {"name": "lwf", "train": "all", "alpha": 0.5, "temperature": 1.0},
    "vr_lwf": {"name": "vr_lwf", "train": "all"},
    "vr_lwf_zscl": {"name": "vr_lwf", "variant": "zscl", "train": "all"},
    "zscl": {"name": "zscl", "train": "all", "reference_dataset": "digits", "reference_texts_dataset": "cifar100",
             "average_every": 10},
}


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="starter",
                        help="starter (default), tiny (a random tiny open_clip model) or open_clip:ARCH (random weights)")
    parser.add_argument("--precision", default="fp32", choices=["fp32", "bf16", "fp16"],
                        help="autocast precision of the forward passes (weights stay fp32, as in the loop)")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--steps", type=int, default=4, help="timed steps per method per round")
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps per method per round")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--methods", default=",".join(METHODS), help="comma-separated subset of " + ",".join(METHODS))
    parser.add_argument("--output", help="write the measurements as JSON here")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    methods = [name.strip() for name in args.methods.split(",") if name.strip()]
    unknown = [name for name in methods if name not in METHODS]
    if unknown:
        parser.error(f"unknown method {unknown[0]!r}; choose from {', '.join(METHODS)}")
    if "finetune" not in methods:
        methods.insert(0, "finetune")

    if args.model == "tiny":
        from clipcl.models.tiny import write_tiny_open_clip_config

        model_config = ModelConfig(backend="open_clip", name=str(write_tiny_open_clip_config("/tmp/clipcl-tiny")))
        dataset = "synthetic-0"
    elif args.model.startswith("open_clip:"):
        model_config = ModelConfig(backend="open_clip", name=args.model.split(":", 1)[1])
        dataset = "synthetic-0"
    elif args.model != "starter":
        parser.error(f"--model must be starter, tiny or open_clip:ARCH, got {args.model!r}")
    else:
        model_config = ModelConfig()
        dataset = "fashion_mnist"
    torch.manual_seed(0)
    backend = build_backend(model_config).to(device)
    initial = {name: tensor.detach().clone() for name, tensor in backend.state_dict().items()}
    stream = build_stream(StreamConfig(protocol="class_incremental", datasets=[dataset], num_tasks=1,
                                       train_samples_per_task=args.batch_size, test_samples_per_task=10), seed=0)
    task = stream.tasks[0]
    view = task.training_view(backend.train_preprocess, augmentation_seed=0)
    images = torch.stack([view[index][0] for index in range(args.batch_size)]).to(device)
    targets = torch.tensor([view[index][1] for index in range(args.batch_size)], device=device)

    autocast_dtype = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}[args.precision]
    scaler = torch.amp.GradScaler(device.type) if args.precision == "fp16" else None
    times: dict[str, list[float]] = {name: [] for name in methods}
    for _ in range(args.rounds):
        for name in methods:
            backend.load_state_dict(initial)
            torch.manual_seed(1)
            strategy = attach_by_hand(build_strategy(backend, METHODS[name]).to(device), Runtime(device))
            strategy.train()
            strategy.before_task(task)
            optimizer = torch.optim.AdamW(strategy.trainable_parameters(), lr=1e-6, weight_decay=0.0)
            for step in range(args.warmup + args.steps):
                synchronize(device)
                started = time.perf_counter()
                optimizer.zero_grad(set_to_none=True)
                with torch.autocast(device.type, dtype=autocast_dtype, enabled=autocast_dtype is not None):
                    loss = strategy(batch_by_hand(strategy, images, targets, task=task), task)["loss"]
                if scaler is None:
                    loss.backward()
                    optimizer.step()
                else:
                    scaler.scale(loss).backward()
                    scaler.step(optimizer)
                    scaler.update()
                strategy.after_step(step + 1)
                synchronize(device)
                if step >= args.warmup:
                    times[name].append(time.perf_counter() - started)
            strategy.after_task(task)
            del strategy, optimizer

    base = statistics.median(times["finetune"])
    rows = []
    for name in methods:
        median = statistics.median(times[name])
        rows.append({"method": name, "settings": METHODS[name], "median_step_seconds": median,
                     "ratio_to_finetune": median / base, "steps_timed": len(times[name])})
    print(f"{'method':<14} {'s/step':>8} {'x FT':>6}")
    for row in rows:
        print(f"{row['method']:<14} {row['median_step_seconds']:8.3f} {row['ratio_to_finetune']:6.2f}")
    if args.output:
        record = {
            "benchmark": "step_time", "model": backend.model_id, "batch_size": args.batch_size,
            "rounds": args.rounds, "steps_per_round": args.steps, "warmup_per_round": args.warmup,
            "device": str(device), "precision": args.precision, "threads": args.threads, "cpus": os.cpu_count(),
            "machine": platform.machine(), "processor": platform.processor() or platform.machine(),
            "torch": torch.__version__, "results": rows,
            "gpu": torch.cuda.get_device_name(device) if device.type == "cuda" else None,
        }
        os.makedirs(os.path.dirname(os.path.abspath(args.output)), exist_ok=True)
        with open(args.output, "w") as handle:
            json.dump(record, handle, indent=2)


if __name__ == "__main__":
    main()
