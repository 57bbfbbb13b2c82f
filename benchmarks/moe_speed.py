"""MoE-Adapters' cost, in one run: training step time relative to fine-tuning, and inference throughput
relative to the zero-shot model.

Training: fine-tuning (all weights) and MoE-Adapters in both configurations (MTIL: 22 experts, top-2;
class-incremental: 2 experts) train the same model from the same weights on the same fixed batch of
Fashion-MNIST images, in interleaved rounds; a step is forward, backward and the optimizer step; the
time per method is the median over its timed steps.

Inference: the same test images are encoded by the zero-shot model and by MoE-Adapters after one
task (with DDAS: the frozen pass, the autoencoders, then the routed pass for the images not sent to
zero-shot; without a selector: one routed pass), batches of 128, the median over rounds of images per
second. Class prompts are not counted (encoded once per label space).

    python benchmarks/moe_speed.py --output docs/results/moe_speed_cpu.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time
from pathlib import Path

import torch

from clipcl.config import ModelConfig, StreamConfig
from clipcl.data.streams import build_stream
from clipcl.engine.context import attach_by_hand, batch_by_hand
from clipcl.models import build_backend
from clipcl.strategies import build_strategy

TRAINED = {
    "finetune": {"name": "finetune", "train": "all"},
    "moe_mtil": {"name": "moe_adapters", "num_experts": 22, "routers": "per_task", "selector": "ddas"},
    "moe_cil": {"name": "moe_adapters", "num_experts": 2, "routers": "shared", "selector": "none",
                "freeze_experts_per_task": 0, "label_smoothing": 0.0},
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--steps", type=int, default=5, help="timed steps per method per round")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--test-images", type=int, default=256)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--output")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    model_config = ModelConfig(backend="starter")
    stream = build_stream(StreamConfig(protocol="multi_domain", datasets=["fashion_mnist"], train_samples_per_task=640,
                                       test_samples_per_task=args.test_images), seed=0)
    task = stream.tasks[0]
    torch.manual_seed(0)
    pristine = build_backend(model_config)
    initial = {name: tensor.clone() for name, tensor in pristine.state_dict().items()}
    view = task.training_view(pristine.train_preprocess, augmentation_seed=0)
    images = torch.stack([view[i][0] for i in range(args.batch_size)])
    targets = torch.tensor([view[i][1] for i in range(args.batch_size)])
    test_images = torch.stack([pristine.preprocess(task.test[i][0]) for i in range(len(task.test))])

    strategies, optimizers = {}, {}
    for name, section in TRAINED.items():
        backend = build_backend(model_config)
        backend.load_state_dict(initial)
        strategy = attach_by_hand(build_strategy(backend, section))
        strategy.before_task(task)
        strategies[name] = strategy
        optimizers[name] = torch.optim.AdamW(strategy.trainable_parameters(), lr=1e-4, weight_decay=0.0)

    def step(name: str) -> float:
        strategy, optimizer = strategies[name], optimizers[name]
        strategy.train()
        started = time.perf_counter()
        loss = strategy(batch_by_hand(strategy, images, targets, task=task), task)["loss"]
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        return time.perf_counter() - started

    for name in TRAINED:  # warm-up, not timed
        step(name)
    step_seconds: dict[str, list[float]] = {name: [] for name in TRAINED}
    for _ in range(args.rounds):
        for name in TRAINED:
            step_seconds[name] += [step(name) for _ in range(args.steps)]
    base_step = statistics.median(step_seconds["finetune"])
    training = [{"method": name, "strategy": TRAINED[name], "seconds_per_step": statistics.median(values),
                 "ratio_to_finetune": statistics.median(values) / base_step} for name, values in step_seconds.items()]

    # Inference: finish the task (freezing, DDAS autoencoder) and encode the test images.
    for name in ("moe_mtil", "moe_cil"):
        strategies[name].after_task(task)
        strategies[name].eval()
    zero_shot = build_strategy(pristine, {"name": "zero_shot"}).eval()
    encoders = {
        "zero_shot": lambda batch: zero_shot.encode_images(batch, None),
        "moe_mtil_ddas": lambda batch: strategies["moe_mtil"].encode_images_routed(batch, None)[0],
        "moe_cil_no_selector": lambda batch: strategies["moe_cil"].encode_images_routed(batch, None)[0],
    }
    with torch.no_grad():
        routes = torch.cat([strategies["moe_mtil"].encode_images_routed(test_images[i: i + 128], None)[1]
                            for i in range(0, len(test_images), 128)])
    inference_seconds: dict[str, list[float]] = {name: [] for name in encoders}
    with torch.no_grad():
        for name, encode in encoders.items():  # warm-up
            encode(test_images[:128])
        for _ in range(args.rounds):
            for name, encode in encoders.items():
                started = time.perf_counter()
                for i in range(0, len(test_images), 128):
                    encode(test_images[i: i + 128])
                inference_seconds[name].append(time.perf_counter() - started)
    base_rate = len(test_images) / statistics.median(inference_seconds["zero_shot"])
    inference = [{"method": name, "images_per_second": len(test_images) / statistics.median(values),
                  "ratio_to_zero_shot": len(test_images) / statistics.median(values) / base_rate}
                 for name, values in inference_seconds.items()]

    print(f"{'training':<22} {'s/step':>8} {'x FT':>6}")
    for row in training:
        print(f"{row['method']:<22} {row['seconds_per_step']:8.3f} {row['ratio_to_finetune']:6.2f}")
    print(f"{'inference':<22} {'img/s':>8} {'x ZS':>6}")
    for row in inference:
        print(f"{row['method']:<22} {row['images_per_second']:8.1f} {row['ratio_to_zero_shot']:6.2f}")
    share = 100.0 * float((routes == -1).float().mean())
    print(f"DDAS sent {share:.1f}% of the {len(test_images)} test images to zero-shot")
    if args.output:
        record = {"benchmark": "moe_speed", "model": "starter", "batch_size": args.batch_size, "steps": args.steps,
                  "rounds": args.rounds, "test_images": len(test_images), "training": training, "inference": inference,
                  "ddas_zero_shot_share": share, "threads": args.threads, "cpus": os.cpu_count(),
                  "machine": platform.machine(), "torch": torch.__version__}
        Path(args.output).parent.mkdir(parents=True, exist_ok=True)
        Path(args.output).write_text(json.dumps(record, indent=2))


if __name__ == "__main__":
    main()
