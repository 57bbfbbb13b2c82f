"""``clipcl demo``: the default offline continual-learning comparison (the README's first command).

On the offline starter model it runs zero-shot, fine-tuning and WiSE-FT on a multi-domain stream
(Fashion-MNIST -> MNIST-5k -> digits) and on a class-incremental Fashion-MNIST stream, writes one
run directory per (stream, method) and prints the comparison table. Runs resume if interrupted;
``restart`` (``clipcl demo --restart``) discards earlier runs in the same directories instead, which
is also what a run directory holding a run of another config asks for.
"""

from __future__ import annotations

import sys
import time
from importlib import resources
from pathlib import Path

from clipcl.atomic_files import atomic_write_text
from clipcl.config import load_config
from clipcl.report import comparison_markdown, plot_run
from clipcl.run import run_experiment

STREAMS = ("multi_domain", "class_incremental")
METHODS = ("zero_shot", "finetune", "wise_ft")

# The strategy section of each method in the demo. Fine-tuning and WiSE-FT train the whole model.
STRATEGY_OVERRIDES = {
    "zero_shot": ["strategy={name: zero_shot}"],
    "finetune": ["strategy={name: finetune, train: all}"],
    "wise_ft": ["strategy={name: wise_ft, train: all, alpha: 0.5}"],
}

# --quick: a smoke test of the same pipeline on far less data (used by the tests).
QUICK_OVERRIDES = [
    "stream.train_samples_per_task=32",
    "stream.test_samples_per_task=20",
    "stream.heldout_samples=20",
    "train.batch_size=16",
]


def demo_config_path(stream: str) -> Path:
    return Path(str(resources.files("clipcl") / "configs" / f"demo_{stream}.yaml"))


def run_demo(output: str = "runs/demo", quick: bool = False, show_progress: bool = True,
             restart: bool = False) -> int:
    started = time.perf_counter()
    all_results = []
    for stream in STREAMS:
        for method in METHODS:
            overrides = STRATEGY_OVERRIDES[method] + [f"output_dir={Path(output) / f'{stream}-{method}'}",
                                                      f"name={stream}/{method}"]
            if quick:
                overrides += QUICK_OVERRIDES
            config = load_config(demo_config_path(stream), overrides)
            if show_progress:
                print(f"== {stream} / {method} -> {config.output_dir}", file=sys.stderr)
            results = run_experiment(config, restart=restart, show_progress=show_progress)
            plot_run(results, config.output_dir)
            all_results.append(results)
    table = comparison_markdown(all_results)
    minutes = (time.perf_counter() - started) / 60
    text = (f"# clipcl demo: offline starter model, seed 0\n\n{table}\n\n"
            f"Accuracies in %. Transfer/Avg/Last/BWT as defined in docs/metrics.md; held-out retention is "
            f"the final accuracy on never-trained datasets as a share of their zero-shot accuracy.\n"
            f"Wall time: {minutes:.1f} min.\n")
    atomic_write_text(Path(output) / "comparison.md", text)
    print(text)
    print(f"run directories and plots: {output}/")
    return 0
