"""Time-continual training (TiC-CLIP's six modes) on emoji over time, with the offline starter, several seeds.

Stream: ``stream.protocol: time`` over Unicode's emoji (Debian ``unicode-data``, ``unicode-cldr-core``,
``fonts-noto-color-emoji``: rendered glyphs captioned with their English CLDR names, not photos),
dated by the release year of each emoji's Emoji version and cut into six steps: 2010, 2014-2015, 2016,
2017-2018, 2019, 2020-2021; 20% of the emoji of every step are held out (a fixed hash split). After each
step every step's held-out emoji are measured by retrieval (mean R@1 both ways: the dynamic matrix) and
two static tasks never trained on: Tux Paint's stamps by retrieval and Fashion-MNIST by zero-shot
classification (500 images).

Settings: the shipped config ``tic_emoji`` (src/clipcl/configs/tic_emoji.yaml), alignment measures off.
Modes (``time.mode``; docs/time_continual.md): sequential, cumulative_all, cumulative_exp,
cumulative_equal, restart and oracle, each with ``--budget`` samples per step (oracle: step t gets
t + 1 budgets, what every other mode has spent by then). Every mode trains the starter's two
projections and its temperature with CLIP's contrastive loss (the settings of benchmarks/alignment.py:
AdamW lr 1e-3, no weight decay, batch 32, cosine per step), warm-up 2 steps on the first step and none
later (the official medium scripts' first/later split), nothing tuned per mode.

    python benchmarks/time_continual.py                  # 3 seeds, every mode
    python benchmarks/time_continual.py --seeds 0 --modes sequential,oracle

Each finished (mode, seed) is saved under ``docs/results/time_continual_records/<mode>/seed<k>.json``
(atomically; read back when the command runs again); the summary (``docs/results/time_continual.md``,
``.json``) and the plot of mean R@1 against samples seen (``.png``) are rewritten after each.
"""

from __future__ import annotations

import argparse
import platform
import tempfile
import time
from functools import partial
from pathlib import Path

import numpy as np
import torch
from seeded import cell, choices, machine, mean_and_std, write_summary
from train_once import cached_record

from clipcl.config import RunConfig, load_config, to_dict
from clipcl.config.time_schema import TIME_MODES

RESULTS = Path(__file__).resolve().parents[1] / "docs" / "results"


def run_config(arguments, mode: str, seed: int, output_dir: str) -> RunConfig:
    """The shipped ``tic_emoji`` config (the same settings a user runs) with this mode, budget and seed."""
    return load_config("tic_emoji", [f"time.mode={mode}", f"time.budget_samples={arguments.budget}",
                                     "eval.alignment=false", "observe.tensorboard=false", "observe.progress=false",
                                     f"seed={seed}", f"output_dir={output_dir}", f"name=time-{mode}-seed{seed}"])


def measure(arguments, mode: str, seed: int) -> dict:
    from clipcl.run import run_experiment

    with tempfile.TemporaryDirectory() as folder:
        results = run_experiment(run_config(arguments, mode, seed, folder), show_progress=False)
    return {"mode": mode, "seed": seed, "steps": results["tasks"], "matrix": results["accuracy"]["matrix"],
            "zero_shot_row": results["accuracy"]["zero_shot_row"], "metrics": results["metrics"],
            "static": {"sets": results["heldout"]["datasets"], "zero_shot": results["heldout"]["zero_shot"],
                       "after_each_step": results["heldout"]["after_each_task"]},
            "compute": results["compute"], "time": results["time"]}


def seen_average(matrix: list[list[float]]) -> list[float]:
    """After each step, the mean of its row over the steps seen so far (what report's compute plot shows)."""
    return [float(np.mean(row[: index + 1])) for index, row in enumerate(matrix)]


def summarise(records: list[dict], arguments, elapsed: float) -> tuple[dict, str]:
    summary = {}
    for mode in TIME_MODES:
        mine = [record for record in records if record["mode"] == mode]
        if not mine:
            continue
        entry = {key: mean_and_std(record["metrics"][key] for record in mine)
                 for key in ("dynamic_in_distribution", "dynamic_backward", "dynamic_forward", "last")}
        entry["seen_average_by_step"] = [mean_and_std(values) for values in
                                         zip(*(seen_average(record["matrix"]) for record in mine))]
        entry["static_last"] = {name: mean_and_std(record["static"]["after_each_step"][-1][column] for record in mine)
                                for column, name in enumerate(mine[0]["static"]["sets"])}
        entry["samples_seen"] = mine[0]["compute"]["total"]["samples_seen"]
        entry["samples_seen_cumulative"] = mine[0]["compute"]["samples_seen_cumulative"]
        entry["train_seconds"] = mean_and_std(record["compute"]["total"]["train_seconds"] for record in mine)
        entry["seeds"] = sorted(record["seed"] for record in mine)
        summary[mode] = entry
    steps = records[0]["steps"] if records else []
    static = records[0]["static"]["sets"] if records else []
    lines = ["# Time-continual training on emoji over time (offline starter)", "",
             (f"Steps: {', '.join(steps)}. Mean R@1 (%) of the dynamic matrix, mean ± std over seeds; "
              f"budget {arguments.budget} samples per step (oracle: t + 1 budgets at step t); command: "
              "`python benchmarks/time_continual.py`."), "",
             "| mode | seeds | samples seen | ID (diagonal) | backward | forward | last row | "
             + " | ".join(f"static: {name}" for name in static) + " |",
             "|---|---|---|---|---|---|---|" + "---|" * len(static)]
    if records:  # the initial model, measured before step 0: the same for every mode and seed
        zero_shot = records[0]
        lines.append(f"| zero-shot (before training) | – | 0 | – | – | – | {np.mean(zero_shot['zero_shot_row']):.1f} | "
                     + " | ".join(f"{value:.1f}" for value in zero_shot["static"]["zero_shot"]) + " |")
    for mode, entry in summary.items():
        lines.append(f"| {mode} | {len(entry['seeds'])} | {entry['samples_seen']} | "
                     f"{cell(entry['dynamic_in_distribution'])} | {cell(entry['dynamic_backward'])} | "
                     f"{cell(entry['dynamic_forward'])} | {cell(entry['last'])} | "
                     + " | ".join(cell(entry["static_last"][name]) for name in static) + " |")
    lines += ["", "Mean R@1 over the steps so far, after each step, against the training samples seen:", "",
              "| mode | " + " | ".join(steps) + " |", "|---|" + "---|" * len(steps)]
    for mode, entry in summary.items():
        cells = [f"{cell(value)} ({samples})" for value, samples in
                 zip(entry["seen_average_by_step"], entry["samples_seen_cumulative"])]
        lines.append(f"| {mode} | " + " | ".join(cells) + " |")
    run_minutes = sum(record["seconds"] for record in records) / 60
    lines += ["", ("The zero-shot row's last-row cell is the mean of its row (every step's held-out emoji before "
              "training). The steps' test sets differ in size (75 to 191 emoji), so their columns are not "
              "comparable with one another, and the mean over the steps so far moves as steps join it."),
              "", (f"Machine: {machine()}, {platform.platform()}; the runs took {run_minutes:.0f} min in all "
              f"(their records' seconds; this invocation {elapsed / 60:.1f} min).")]
    record = {"benchmark": "time_continual", "arguments": vars(arguments), "summary": summary, "runs": records,
              "machine": machine(), "elapsed_seconds": elapsed}
    return record, "\n".join(lines) + "\n"


def plot_against_samples(summary: dict, records: list[dict], path: Path) -> None:
    """Mean R@1 over the steps so far against the training samples seen, one curve per mode (mean, with
    a band of ± one std over seeds), from the zero-shot point at 0 samples."""
    from clipcl.report_compute import draw_samples_seen

    zero_shot = float(np.mean([record["zero_shot_row"][0] for record in records]))
    curves = []
    for mode, entry in summary.items():
        means = [zero_shot] + [value["mean"] for value in entry["seen_average_by_step"]]
        spread = np.nan_to_num([0.0] + [value["std"] for value in entry["seen_average_by_step"]])  # one seed: no band
        curves.append((f"{mode} ({len(entry['seeds'])} seeds)", [0, *entry["samples_seen_cumulative"]], means, spread))
    draw_samples_seen(curves, path, "mean R@1 over the steps so far (%)", "emoji over time, offline starter")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--modes", default=",".join(TIME_MODES))
    parser.add_argument("--budget", type=int, default=640, help="training samples per step (20 steps of 32)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--output-dir", default=str(RESULTS / "time_continual_records"))
    parser.add_argument("--results", default=str(RESULTS / "time_continual.json"))
    arguments = parser.parse_args()
    torch.set_num_threads(arguments.threads)
    modes = choices(parser, arguments.modes, TIME_MODES, "mode")
    seeds = [int(seed) for seed in arguments.seeds.split(",") if seed]
    started, records = time.perf_counter(), []
    for seed in seeds:
        for mode in modes:
            identity = {key: value for key, value in to_dict(run_config(arguments, mode, seed, "identity")).items()
                        if key not in ("output_dir", "observe")}
            record = cached_record(Path(arguments.output_dir) / mode / f"seed{seed}.json",
                                   partial(measure, arguments, mode, seed), identity)
            records.append(record)
            metrics = record["metrics"]
            print(f"{mode:17s} seed {seed}: ID {metrics['dynamic_in_distribution']:5.1f} backward "
                  f"{metrics['dynamic_backward']:5.1f} forward {metrics['dynamic_forward']:5.1f} "
                  f"({record['compute']['total']['samples_seen']} samples, {record['seconds']:.0f} s)", flush=True)
            summary, markdown = summarise(records, arguments, time.perf_counter() - started)
            write_summary(arguments.results, summary, markdown)
            plot_against_samples(summary["summary"], records, Path(arguments.results).with_suffix(".png"))


if __name__ == "__main__":
    main()
