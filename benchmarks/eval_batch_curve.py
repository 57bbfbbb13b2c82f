"""Seconds per image of a bare ``encode_image`` loop against the evaluation batch size.

Each (threads, batch size) point encodes the same preprocessed images, after one untimed batch, in
interleaved rounds (every batch size once per round); the time per image is the median over rounds.
This is the curve behind the default evaluation batch of each device (``eval.batch_size=auto``).

    python benchmarks/eval_batch_curve.py --model starter --threads 1 2 --output docs/results/eval_batch_curve_starter.json
    python benchmarks/eval_batch_curve.py --model open_clip:ViT-B-32 --threads 1 --images 64
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch
from seeded import machine, write_json

from clipcl.config.schema import ModelConfig
from clipcl.models import build_backend


def model_config(name: str) -> ModelConfig:
    if name == "tiny":
        from clipcl.models.tiny import write_tiny_open_clip_config

        return ModelConfig(backend="open_clip", name=str(write_tiny_open_clip_config("/tmp/clipcl-tiny")))
    if name.startswith("open_clip:"):
        return ModelConfig(backend="open_clip", name=name.split(":", 1)[1])
    if name != "starter":
        raise SystemExit(f"--model must be starter, tiny or open_clip:ARCH, got {name!r}")
    return ModelConfig()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="starter")
    parser.add_argument("--threads", type=int, nargs="+", default=[1])
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[8, 16, 32, 64, 128, 256])
    parser.add_argument("--images", type=int, default=256, help="images per timed pass (a multiple of each batch)")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--output")
    args = parser.parse_args()
    device = torch.device(args.device)
    torch.manual_seed(0)
    backend = build_backend(model_config(args.model)).to(device).eval()
    size = getattr(backend, "image_size", 224)
    images = torch.rand(args.images, 3, size, size, device=device)
    curve: dict[int, dict[int, list[float]]] = {t: {b: [] for b in args.batch_sizes} for t in args.threads}
    with torch.no_grad():
        for _ in range(args.rounds):
            for threads in args.threads:
                torch.set_num_threads(threads)
                for batch in args.batch_sizes:
                    backend.encode_image(images[:batch])  # untimed: kernel choice, allocations
                    if device.type == "cuda":
                        torch.cuda.synchronize()
                    started = time.perf_counter()
                    for start in range(0, args.images, batch):
                        backend.encode_image(images[start: start + batch])
                    if device.type == "cuda":
                        torch.cuda.synchronize()
                    curve[threads][batch].append((time.perf_counter() - started) / args.images)
    result = {
        "model": args.model, "device": args.device, "images": args.images, "rounds": args.rounds,
        "ms_per_image": {str(t): {str(b): round(1000 * statistics.median(v), 3) for b, v in per.items()}
                         for t, per in curve.items()},
        "machine": machine(),
        "torch": torch.__version__,
    }
    print(json.dumps(result, indent=2))
    write_json(args.output, result)


if __name__ == "__main__":
    main()
