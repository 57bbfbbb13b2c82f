"""Choose benchmarks/multilingual.py's learning rate by training loss only, before the benchmark.

CLL-CLIP with TEIR, seed 0, on English then Italian (the first two languages of the benchmark's
stream), ``--epochs`` epochs of 32 per language, for each rate in ``--rates``; the criterion is the
training loss of the last step on Italian (``losses_first_last``), never a test number. The official
rate (5e-5, projects/cll_clip/train.py:129) is meant for about 13,000 steps a language on COCO-36.

    python benchmarks/multilingual_rate.py        # writes docs/results/multilingual_rate.json
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

import torch
from multilingual import RESULTS, run_config
from seeded import machine


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rates", default="5e-5,5e-4,5e-3")
    parser.add_argument("--epochs", type=int, default=5)
    parser.add_argument("--warmup-steps", type=int, default=12)
    parser.add_argument("--results", default=str(RESULTS / "multilingual_rate.json"))
    arguments = parser.parse_args()
    torch.set_num_threads(2)
    from clipcl.run import run_experiment

    found = {}
    for rate in [float(text) for text in arguments.rates.split(",")]:
        settings = argparse.Namespace(languages=2, epochs=arguments.epochs, lr=rate, warmup_steps=arguments.warmup_steps)
        with tempfile.TemporaryDirectory() as folder:
            config = run_config(settings, "cll_clip_teir", 0, folder)
            config.eval.zero_shot_row = False
            results = run_experiment(config, show_progress=False)
        found[str(rate)] = {"losses_first_last": results["losses_first_last"],
                            "italian_last_step_loss": results["losses_first_last"][-1][-1]}
        print(f"lr {rate:g}: Italian loss {found[str(rate)]['italian_last_step_loss']:.4f}", flush=True)
    best = min(found, key=lambda rate: found[rate]["italian_last_step_loss"])
    record = {"criterion": "training loss of the last step on Italian (seed 0)", "epochs": arguments.epochs,
              "rates": found, "chosen": float(best), "machine": machine()}
    Path(arguments.results).write_text(json.dumps(record, indent=1))
    print(f"chosen: {best}")


if __name__ == "__main__":
    main()
