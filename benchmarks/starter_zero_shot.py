"""Zero-shot top-1 of the offline starter model, and how its settings were chosen.

Two modes:

    # choose settings on a validation subset of the Fashion-MNIST TRAIN split (never the test set)
    python benchmarks/starter_zero_shot.py select --images 1000 --output docs/results/starter_selection.json
    # report test accuracy of the defaults on full test sets, and encoding speed
    python benchmarks/starter_zero_shot.py test --output docs/results/starter_zero_shot.json

The image tower's EfficientNet logits are computed once per resolution; top-k and softmax
temperature only change the cheap ConSE combination after it, so the sweep reuses them.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time

import numpy as np
import torch
import torch.nn.functional as F

from clipcl.data.streams import balanced_subset, heldout_set
from clipcl.engine.runtime import Runtime
from clipcl.eval.evaluator import predict
from clipcl.models.starter import DEFAULT_IMAGE_SIZE, StarterBackend
from clipcl.strategies.base import class_text_features
from clipcl.strategies.zero_shot import ZeroShot, ZeroShotConfig


def imagenet_logits(backend: StarterBackend, dataset, batch_size: int = 64) -> tuple[torch.Tensor, float]:
    started = time.perf_counter()
    chunks = []
    with torch.no_grad():
        for start in range(0, len(dataset), batch_size):
            images = torch.stack([backend.preprocess(dataset[i][0]) for i in range(start, min(len(dataset), start + batch_size))])
            chunks.append(backend.image_tower.classifier(images))
    return torch.cat(chunks), len(dataset) / (time.perf_counter() - started)


def conse_accuracy(logits, class_embeddings, text_features, labels, top_k, temperature) -> float:
    probabilities = torch.softmax(logits / temperature, dim=-1)
    if top_k < probabilities.shape[-1]:
        top = probabilities.topk(top_k, dim=-1)
        probabilities = torch.zeros_like(probabilities).scatter(-1, top.indices, top.values)
    embedding = F.normalize(probabilities @ class_embeddings, dim=-1)
    predictions = (embedding @ text_features.t()).argmax(dim=-1).numpy()
    return 100.0 * float(np.mean(predictions == labels))


def select(args) -> None:
    from clipcl.data.registry import load_dataset

    validation = balanced_subset(load_dataset("fashion_mnist", "train"), args.images, seed=0)
    labels = validation.labels
    import clipcl.models.starter as starter_module

    rows = []
    threshold = starter_module.DARK_BORDER_THRESHOLD
    for size, polarity in [(size, polarity) for size in args.sizes for polarity in args.polarity]:
        # Polarity normalisation on (1) or off (0): the module-level threshold is read per image.
        starter_module.DARK_BORDER_THRESHOLD = threshold if polarity else -1
        backend = StarterBackend(image_size=size).eval()
        with torch.no_grad():
            text = class_text_features(backend, heldout_set(validation).classes)
        logits, speed = imagenet_logits(backend, validation)
        for top_k in args.top_k:
            for temperature in args.temperatures:
                accuracy = conse_accuracy(logits, backend.image_tower.class_embeddings, text, labels, top_k, temperature)
                rows.append({"size": size, "polarity": polarity, "top_k": top_k, "temperature": temperature,
                             "val_accuracy": accuracy,
                             "images_per_second": round(speed, 1)})
                print(json.dumps(rows[-1]), flush=True)
    best = max(rows, key=lambda row: row["val_accuracy"])
    print("best on validation:", json.dumps(best))
    if args.output:
        with open(args.output, "w") as handle:
            json.dump({"validation": "fashion_mnist train, class-balanced subset", "images": args.images,
                       "rows": rows, "best": best}, handle, indent=2)


def test(args) -> None:
    from clipcl.data.registry import load_dataset

    backend = StarterBackend(image_size=args.size).eval()
    strategy = ZeroShot(backend, ZeroShotConfig(name="zero_shot")).eval()
    runtime = Runtime(torch.device("cpu"))
    results = {}
    for name, split in args.datasets:
        dataset = load_dataset(name, split)
        held = heldout_set(dataset)
        started = time.perf_counter()
        predictions, labels = predict(strategy, dataset, held.classes, None, runtime, batch_size=64)
        seconds = time.perf_counter() - started
        accuracy = 100.0 * float((predictions.numpy() == labels).mean())
        results[f"{name}/{split}"] = {"images": len(dataset), "top1": round(accuracy, 2),
                                      "chance": round(100.0 / len(dataset.classnames), 2),
                                      "images_per_second": round(len(dataset) / seconds, 1)}
        print(name, split, json.dumps(results[f"{name}/{split}"]), flush=True)
    summary = {"model": backend.model_id, "results": results,
               "machine": f"{platform.machine()}, {os.cpu_count()} cores, torch threads {torch.get_num_threads()}",
               "torch": torch.__version__}
    if args.output:
        os.makedirs(os.path.dirname(args.output) or ".", exist_ok=True)
        with open(args.output, "w") as handle:
            json.dump(summary, handle, indent=2)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="mode", required=True)
    choose = sub.add_parser("select")
    choose.add_argument("--images", type=int, default=1000)
    choose.add_argument("--sizes", type=int, nargs="+", default=[112, 160])
    choose.add_argument("--polarity", type=int, nargs="+", default=[0, 1], help="1: invert light-on-dark images")
    choose.add_argument("--top-k", type=int, nargs="+", default=[1, 3, 5, 10, 20, 50, 1000])
    choose.add_argument("--temperatures", type=float, nargs="+", default=[0.5, 1.0, 2.0])
    choose.add_argument("--output")
    report = sub.add_parser("test")
    report.add_argument("--size", type=int, default=DEFAULT_IMAGE_SIZE)
    report.add_argument("--datasets", nargs="+", type=lambda text: tuple(text.split(":")),
                        default=[("fashion_mnist", "test"), ("mnist_5k", "test"), ("digits", "test")],
                        help="name:split pairs")
    report.add_argument("--output")
    args = parser.parse_args()
    torch.set_num_threads(int(os.environ.get("CLIPCL_THREADS", "2")))
    select(args) if args.mode == "select" else test(args)


if __name__ == "__main__":
    main()
