"""Show that adding language streams and CLL-CLIP (issue 16) changed no number of the existing paths (and time streams since).

The change touched the trainer (a method may give AdamW parameter groups), caption batches (an item
may carry an English source), retrieval (a strategy encodes the captions; a language stream reuses
image features) and the caption protocols' checks. This runs, on the tree it is imported from, tiny
open_clip runs of image-caption streams (fine-tuning, Mod-X, LwF and ZSCL on CSV caption files it
writes, with a held-out caption set) and a multi-domain fine-tuning run with a retrieval set, and
saves every matrix, held-out row, retrieval row, loss and metric. Run it on two trees and compare::

    PYTHONPATH=/path/to/old/src python benchmarks/languages_unchanged.py --out /tmp/old.json
    PYTHONPATH=src python benchmarks/languages_unchanged.py --out /tmp/new.json
    python benchmarks/languages_unchanged.py --compare /tmp/old.json /tmp/new.json

``--compare`` requires exact equality and lists every difference (same machine, same threads).
"""

from __future__ import annotations

import json
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from seeded import capture_or_compare

KEPT = ("accuracy", "heldout", "retrieval", "alignment", "losses_first_last", "metrics")
VOLATILE_METRICS = ("train_samples_per_second",)
CAPTION_METHODS = {"finetune": {"name": "finetune"}, "mod_x": {"name": "mod_x"},
                   "lwf": {"name": "lwf"}, "zscl": {"name": "zscl"}}


def write_captions(folder: Path, name: str, images: int, seed: int) -> str:
    """A CSV caption file with ``images`` small pictures, two captions each."""
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    colours = ["red", "green", "blue", "yellow", "purple", "orange"]
    lines = ["image,caption"]
    for index in range(images):
        colour = colours[index % len(colours)]
        pixels = (rng.random((24, 24, 3)) * 60 + 30 * (index % len(colours))).astype("uint8")
        Image.fromarray(pixels).save(folder / f"{name}_{index:03d}.png")
        lines += [f"{name}_{index:03d}.png,a {colour} picture number {index}", f"{name}_{index:03d}.png,a drawing in {colour}"]
    path = folder / f"{name}.csv"
    path.write_text("\n".join(lines) + "\n")
    return str(path)


ANIMALS = [("A frog.", "Una rana.", "Ein Frosch."), ("A red bird.", "Un uccello rosso.", "Ein roter Vogel."),
           ("A big cat.", "Un gatto grande.", "Eine große Katze."), ("A green tree.", "Un albero verde.", "Ein grüner Baum.")]


def write_stamps(root: Path, copies: int = 6) -> None:
    """A small Tux Paint stamps tree (English, Italian and German lines), for a language stream."""
    rng = np.random.default_rng(0)
    for copy in range(copies):
        for index, (english, italian, german) in enumerate(ANIMALS):
            folder = root / ("animals" if index % 2 else "nature")
            folder.mkdir(parents=True, exist_ok=True)
            name = f"stamp{copy}_{index}"
            Image.fromarray((rng.random((20, 20, 3)) * 80 + 30 * index).astype("uint8")).save(folder / f"{name}.png")
            (folder / f"{name}.txt").write_text(f"{english}\nit.utf8={italian}\nde.utf8={german}\n", encoding="utf-8")


def write_dated_shards(folder: Path, years: dict[int, int]) -> str:
    """Webdataset shards, one per year, each sample a small PNG and a ``.json`` with its caption and year."""
    import io

    import webdataset

    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(3)
    for year, count in years.items():
        with webdataset.TarWriter(str(folder / f"{year}.tar")) as sink:
            for index in range(count):
                buffer = io.BytesIO()
                Image.fromarray((rng.random((20, 20, 3)) * 60 + 40 * (index % 4)).astype("uint8")).save(buffer, "PNG")
                record = {"caption": f"shape {index % 4} seen in {year}", "year": year}
                sink.write({"__key__": f"{year}-{index:03d}", "png": buffer.getvalue(), "json": json.dumps(record)})
    return str(folder)


def kept_numbers(results: dict) -> dict:
    kept = {key: results[key] for key in KEPT if key in results}
    kept["metrics"] = {key: value for key, value in kept.get("metrics", {}).items() if key not in VOLATILE_METRICS}
    if "accuracy" in kept:
        kept["accuracy"] = {key: value for key, value in kept["accuracy"].items() if key != "measure"}
    return kept


def capture(output: str) -> None:
    from clipcl.config import RunConfig, from_dict
    from clipcl.models.tiny import write_tiny_open_clip_config
    from clipcl.run import run_experiment

    torch.set_num_threads(1)
    record = {}
    with tempfile.TemporaryDirectory() as folder:
        root = Path(folder)
        model = str(write_tiny_open_clip_config(root))
        train, old = write_captions(root / "data", "new", 36, 1), write_captions(root / "data", "old", 12, 2)
        runs = {f"captions-{name}": ({"protocol": "captions", "datasets": [train], "num_tasks": 3, "heldout": [old]},
                                     strategy, {}) for name, strategy in CAPTION_METHODS.items()}
        runs["multi_domain-finetune"] = ({"protocol": "multi_domain", "datasets": ["synthetic-0", "synthetic-1"],
                                          "test_samples_per_task": 60}, {"name": "finetune"},
                                         {"retrieval": ["synthetic-5", old], "retrieval_images": 30})
        # Added with issue 17: CLL-CLIP (TEIR on and off) on a language stream, which that change's
        # trainer and caption-batch edits also reach.
        write_stamps(root / "data" / "tuxpaint")
        for teir in (False, True):
            runs[f"languages-cll_clip-teir_{str(teir).lower()}"] = (
                {"protocol": "languages", "datasets": ["tuxpaint"], "languages": ["en", "it", "de"],
                 "data_root": str(root / "data")}, {"name": "cll_clip", "teir": teir}, {})
        # Added with issue 17's review (timestamps moved to captions.py, AdamW's moments made
        # configurable): time streams over dated webdataset shards, a replay mode and the oracle.
        shards = write_dated_shards(root / "data" / "dated", {2014: 24, 2015: 24, 2016: 24})
        times = {}
        for mode in ("cumulative_exp", "oracle"):
            runs[f"time-{mode}"] = ({"protocol": "time", "datasets": [shards], "heldout": [old]}, {"name": "finetune"},
                                    {"alignment": False})
            times[f"time-{mode}"] = {"mode": mode, "budget_samples": 16}
        for name, (stream, strategy, evaluation) in runs.items():
            config = from_dict(RunConfig, {
                "model": {"backend": "open_clip", "name": model}, "stream": stream, "strategy": strategy,
                "train": {"batch_size": 8, "max_steps_per_task": 3, "lr": 1e-3},
                "eval": {"batch_size": 16, "cache_dir": "", **evaluation},
                "observe": {"tensorboard": False, "progress": False},
                **({"time": times[name]} if name in times else {}),
                "seed": 0, "output_dir": str(root / name)})
            results = run_experiment(config, show_progress=False)
            record[name] = kept_numbers(results)
            if name in times:
                record[name]["time"] = results["time"]
                record[name]["compute"] = {key: value for key, value in results["compute"]["total"].items()
                                           if not key.endswith("_seconds")}
            print(f"{name}: captured", file=sys.stderr)
        # Set names hold the temporary folder's path, which differs between captures.
        text = json.dumps(record, indent=1, sort_keys=True).replace(str(root), "<data>")
    Path(output).write_text(text)


if __name__ == "__main__":
    capture_or_compare(__doc__.splitlines()[0], capture)
