"""Check that ``benchmarks/train_once.py`` measures what ordinary runs measure.

For each method, one ``train_and_evaluate`` over both protocols of benchmarks/coleclip.py, then one
``run_experiment`` per protocol with the same config; the accuracy matrices, zero-shot rows,
held-out rows and metrics must be identical (exact equality: the same computations in the same
order on the same machine).

    python benchmarks/train_once_unchanged.py --methods coleclip --train-samples 64 --test-samples 20
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import torch
from coleclip import METHODS, PROTOCOLS, run_config
from seeded import choices
from train_once import train_and_evaluate

from clipcl.run import run_experiment


def compare(method: str, args: argparse.Namespace) -> list[str]:
    """The differences between the loop's and the runs' numbers for ``method`` (empty: none)."""
    problems = []
    with tempfile.TemporaryDirectory() as folder:
        args.output_dir = folder
        configs = {protocol: run_config(protocol, method, args.seed, args) for protocol in PROTOCOLS}
        once = train_and_evaluate(configs)
        for protocol, config in configs.items():
            config.output_dir = str(Path(folder) / "run" / protocol)
            results = run_experiment(config, show_progress=False)
            ours, theirs = once["rows"][protocol], results
            pairs = {"matrix": (ours["rows"], theirs["accuracy"]["matrix"]),
                     "zero-shot row": (ours["zero_shot"], theirs["accuracy"]["zero_shot_row"]),
                     "held-out rows": (ours["heldout"], theirs["heldout"]["after_each_task"]),
                     "held-out zero-shot": (ours["heldout_zero_shot"], theirs["heldout"]["zero_shot"]),
                     "losses (first, last)": (once["losses_first_last"], theirs["losses_first_last"])}
            pairs.update({f"metric {key}": (value, theirs["metrics"].get(key))
                          for key, value in once["metrics"][protocol].items()})
            for what, (mine, run) in pairs.items():
                if mine != run:
                    problems.append(f"{method} {protocol} {what}: loop {mine} != run {run}")
            print(f"{method:<13} {protocol:<16} matrix {ours['rows']}", flush=True)
    return problems


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--methods", default="coleclip")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--epochs", type=int, default=1)
    parser.add_argument("--train-samples", type=int, default=64)
    parser.add_argument("--test-samples", type=int, default=20)
    parser.add_argument("--heldout-samples", type=int, default=None)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    problems = [problem for method in choices(parser, args.methods, METHODS, "method") for problem in compare(method, args)]
    print("\n".join(problems) if problems else "identical: matrices, held-out rows, losses and metrics")
    sys.exit(1 if problems else 0)


if __name__ == "__main__":
    main()
