"""Image-text alignment under continual contrastive training (issue 14), offline, several seeds.

Old domain: Tux Paint stamps (drawings with an English description each). New domain: openclipart
(drawings with a title and keywords), cut into five contiguous phases (they follow the collection's
category folders, so each phase is a shift of subject). Both are drawings, not photos.

Per seed:

1. **Pretrain phase**: the starter's two projections are trained contrastively on Tux Paint's
   training split (plain contrastive fine-tuning), as Mod-X starts from a COCO-trained model. Its
   weights are saved and every method starts from them (``model.weights``).
2. **Five openclipart phases** with each method (contrastive fine-tuning, Mod-X, contrastive LwF,
   ZSCL), the same optimiser, batches and data; nothing is tuned per method. Evaluated before
   training and after each phase: retrieval R@1/5/10 both ways on each phase's test pairs (new
   domain) and on Tux Paint's test split (old domain, never trained on in the stream), and the
   alignment measures of docs/metrics.md on each of those sets.

    bash benchmarks/setup_captions.sh                  # the two Debian packages (once)
    python benchmarks/alignment.py                     # 3 seeds, all methods
    python benchmarks/alignment.py --seeds 0 --methods finetune,mod_x

Runs go to ``runs/alignment/<method>/seed<k>`` (the pretrain phase to ``runs/alignment/pretrain/seed<k>``)
and resume if interrupted. The summary (mean ± std over seeds) is written as JSON and Markdown after
every run.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch
from seeded import cell, choices, machine, mean_and_std, write_summary

from clipcl.checkpoint import atomic_save_safetensors
from clipcl.config import from_dict
from clipcl.config.schema import RunConfig
from clipcl.run import run_experiment

PROJECTIONS = "_text.projection,_image.projection"
# Every method trains the two projections and the temperature, as CLIP's contrastive training and
# Mod-X's code do (its default train_logit_scale); nothing else differs between them.
TRAINED = {"train": PROJECTIONS, "train_logit_scale": True}
METHODS: dict[str, dict] = {
    "finetune": {"name": "finetune", **TRAINED},
    # modx_5phase.sh's alpha = 20; the rest of Mod-X's defaults are its code's (docs/fidelity.md C1).
    "mod_x": {"name": "mod_x", **TRAINED},
    # Mod-X with each model's temperature in the distilled softmax (strategy.distill_logits): the raw
    # cosines of the official code give near-uniform rows, so this shows what the temperature changes.
    "mod_x_scaled": {"name": "mod_x", "distill_logits": True, **TRAINED},
    "lwf": {"name": "lwf", **TRAINED},
    # Reference images and texts as in the Don't Stop Learning benchmark: sklearn digits and CIFAR-100's
    # class prompts, neither a phase nor the held-out set.
    "zscl": {"name": "zscl", **TRAINED, "reference_dataset": "digits", "reference_texts_dataset": "cifar100",
             "average_every": 10},
}
TRAIN = {"batch_size": 32, "lr": 1e-3, "weight_decay": 0.0, "warmup_steps": 0, "lr_schedule": "cosine",
         "num_workers": 0}
NEW_DOMAIN = {"datasets": ["openclipart"], "num_tasks": 5, "heldout": ["tuxpaint"]}


def base_config(output_dir: Path, seed: int, stream: dict, strategy: dict, epochs: int, weights: str | None,
                images_per_phase: int | None, test_images: int | None) -> RunConfig:
    return from_dict(RunConfig, {
        "model": {"backend": "starter", "weights": weights},
        "stream": {"protocol": "captions", "train_samples_per_task": images_per_phase,
                   "test_samples_per_task": test_images, "heldout_samples": None, **stream},
        "strategy": strategy,
        "train": {**TRAIN, "epochs": epochs},
        "eval": {"alignment_images": 500},
        "observe": {"tensorboard": False, "progress": False},
        "seed": seed, "output_dir": str(output_dir)})


def pretrained_weights(root: Path, seed: int, epochs: int) -> str:
    """Contrastive fine-tuning of the projections on Tux Paint's training split; returns the file of
    the backend's weights after it (made once per seed)."""
    path = root / "pretrain" / f"seed{seed}" / "backend.safetensors"
    if path.is_file():
        return str(path)
    config = base_config(path.parent, seed, {"datasets": ["tuxpaint"], "num_tasks": 1, "heldout": []},
                         METHODS["finetune"], epochs, None, None, None)
    from clipcl.data.caption_stream import build_caption_stream
    from clipcl.engine.context import seed_everything
    from clipcl.engine.runtime import Runtime
    from clipcl.engine.tasks import model_states, standalone_context
    from clipcl.models import build_backend
    from clipcl.strategies import build_strategy

    seed_everything(seed)
    backend = build_backend(config.model)
    strategy = build_strategy(backend, config.strategy)
    stream = build_caption_stream(config.stream, seed)
    context = standalone_context(config, strategy, stream, Runtime(torch.device("cpu")), None)
    for _ in model_states(context):
        pass
    # Through a temporary file: an interrupted benchmark never leaves half a weights file to start from.
    atomic_save_safetensors({key: value.contiguous() for key, value in backend.state_dict().items()}, path)
    return str(path)


ROWS = [("old", "held-out/tuxpaint"), ("new", "task")]
RECALLS = ("image_to_text_R@1", "text_to_image_R@1", "image_to_text_R@5", "text_to_image_R@5",
           "image_to_text_R@10", "text_to_image_R@10")
ALIGNMENT = ("modality_gap", "alignment", "uniformity_image", "uniformity_text", "vs_zero_shot/rotation_image_deg",
             "vs_zero_shot/rotation_text_deg", "vs_zero_shot/inter_modal_deviation_deg",
             "vs_zero_shot/similarity_correlation_image", "vs_zero_shot/similarity_correlation_text")


def per_phase(results: dict) -> dict:
    """For each row (the pretrained model, then after each phase): old-domain and new-domain recalls
    and alignment measures. New domain: the mean over all five phases' test sets (each phase's own
    test pairs; the phases not trained yet measure transfer)."""
    retrieval = [results["retrieval"]["zero_shot"], *results["retrieval"]["after_each_task"]]
    alignment = [results["alignment"]["zero_shot"], *results["alignment"]["after_each_task"]]
    tasks = results["tasks"]
    rows = []
    seen = [f"task/{name}" for name in tasks]
    for recalls, aligned in zip(retrieval, alignment):
        entry = {}
        for measure in RECALLS:
            entry[f"old/{measure}"] = recalls["held-out/tuxpaint"][measure]
            entry[f"new/{measure}"] = sum(recalls[name][measure] for name in seen) / len(seen)
        for measure in ALIGNMENT:
            if measure in aligned.get("held-out/tuxpaint", {}):
                entry[f"old/{measure}"] = aligned["held-out/tuxpaint"][measure]
            values = [aligned[name][measure] for name in seen if measure in aligned.get(name, {})]
            if values:
                entry[f"new/{measure}"] = sum(values) / len(values)
        rows.append(entry)
    return {"rows": rows, "metrics": results["metrics"]}


def summarise(collected: dict[str, dict[int, dict]]) -> dict:
    """Mean ± std over seeds of every per-phase value, per method."""
    record = {"machine": machine(), "methods": {}}
    for method, by_seed in collected.items():
        first = next(iter(by_seed.values()))["rows"]
        record["methods"][method] = {
            "seeds": sorted(by_seed),
            "rows": [{key: mean_and_std([by_seed[seed]["rows"][row].get(key) for seed in by_seed])
                      for key in first[row]} for row in range(len(first))]}
    return record


SHOWN = [("old/image_to_text_R@1", "old I→T R@1"), ("old/text_to_image_R@1", "old T→I R@1"),
         ("new/image_to_text_R@1", "new I→T R@1"), ("new/text_to_image_R@1", "new T→I R@1"),
         ("old/modality_gap", "old gap"), ("old/alignment", "old align"),
         ("old/vs_zero_shot/rotation_image_deg", "old img rot°"),
         ("old/vs_zero_shot/inter_modal_deviation_deg", "old inter-dev°"),
         ("old/vs_zero_shot/similarity_correlation_image", "old img sim-corr")]
THREE_PLACES = {"old/modality_gap", "old/alignment", "old/vs_zero_shot/similarity_correlation_image"}
LAST_SHOWN = [("old/image_to_text_R@1", "old I→T R@1"), ("old/image_to_text_R@5", "R@5"),
              ("old/image_to_text_R@10", "R@10"), ("old/text_to_image_R@1", "old T→I R@1"),
              ("old/text_to_image_R@5", "R@5"), ("old/text_to_image_R@10", "R@10"),
              ("new/image_to_text_R@1", "new I→T R@1"), ("new/text_to_image_R@1", "new T→I R@1")]


def markdown(record: dict) -> str:
    """The summary's tables: the last phase across methods, then every phase per method."""
    lines = [("### After the last phase (mean ± std over seeds; old: Tux Paint test, new: the five openclipart "
              "test slices)"), "", "| method | seeds | " + " | ".join(label for _, label in LAST_SHOWN) + " |",
             "|---|---|" + "---|" * len(LAST_SHOWN)]
    for method, summary in record["methods"].items():
        final = summary["rows"][-1]
        lines.append(f"| {method} | {len(summary['seeds'])} | "
                     + " | ".join(cell(final.get(key)) for key, _ in LAST_SHOWN) + " |")
    lines.append("")
    for method, summary in record["methods"].items():
        lines += [f"### {method} ({len(summary['seeds'])} seeds)", "",
                  "| after | " + " | ".join(label for _, label in SHOWN) + " |", "|---|" + "---|" * len(SHOWN)]
        for row, entry in enumerate(summary["rows"]):
            label = "pretrained" if row == 0 else f"phase {row}"
            # Gap, alignment and correlations move in the second or third decimal: three places.
            lines.append(f"| {label} | " + " | ".join(_cell3(entry.get(key)) if key in THREE_PLACES
                                                      else cell(entry.get(key)) for key, _ in SHOWN) + " |")
        lines.append("")
    return "\n".join(lines)


def _cell3(entry: dict | None) -> str:
    if entry is None:
        return "–"
    return f"{entry['mean']:.3f}" + ("" if entry["n"] < 2 else f" ± {entry['std']:.3f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--methods", default=",".join(METHODS))
    parser.add_argument("--pretrain-epochs", type=int, default=5)
    parser.add_argument("--epochs", type=int, default=2, help="epochs per openclipart phase")
    parser.add_argument("--images-per-phase", type=int, default=400, help="training images per phase (cap)")
    parser.add_argument("--test-images", type=int, default=100, help="test images per phase (cap)")
    parser.add_argument("--root", default="runs/alignment")
    parser.add_argument("--output", default="docs/results/alignment.json")
    parser.add_argument("--render-only", action="store_true",
                        help="rewrite the Markdown beside --output from its JSON summary; run nothing")
    args = parser.parse_args()
    if args.render_only:
        record = json.loads(Path(args.output).read_text())
        write_summary(args.output, record, markdown(record))
        return
    torch.set_num_threads(2)
    seeds = [int(seed) for seed in args.seeds.split(",")]
    methods = choices(parser, args.methods, METHODS, "method")
    root = Path(args.root)
    collected: dict[str, dict[int, dict]] = {}
    for seed in seeds:
        started = time.perf_counter()
        weights = pretrained_weights(root, seed, args.pretrain_epochs)
        print(f"seed {seed}: pretrained in {time.perf_counter() - started:.0f} s", flush=True)
        for method in methods:
            started = time.perf_counter()
            config = base_config(root / method / f"seed{seed}", seed, NEW_DOMAIN, METHODS[method], args.epochs,
                                 weights, args.images_per_phase, args.test_images)
            results = run_experiment(config, show_progress=False)
            collected.setdefault(method, {})[seed] = per_phase(results)
            print(f"seed {seed} {method}: {time.perf_counter() - started:.0f} s", flush=True)
            record = {**summarise(collected), "settings": vars(args)}
            write_summary(args.output, record, markdown(record))


if __name__ == "__main__":
    main()
