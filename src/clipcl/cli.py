"""The ``clipcl`` command: run, list, metrics, report, demo.

Errors a user can fix (bad config, missing data, a foreign checkpoint) print one line and exit 2.
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import math
import sys
from pathlib import Path


def _fail(message: str) -> int:
    print(f"clipcl: error: {message}", file=sys.stderr)
    return 2


def _user_errors() -> tuple[type[BaseException], ...]:
    from clipcl.checkpoint import CheckpointError
    from clipcl.config import ConfigError
    from clipcl.data.base import DataError
    from clipcl.run import RunError

    return (ConfigError, DataError, CheckpointError, RunError, ValueError, FileNotFoundError)


# --- clipcl run -----------------------------------------------------------------------------------


def command_run(args: argparse.Namespace) -> int:
    from clipcl.config import load_config
    from clipcl.report import plot_run, run_summary_markdown
    from clipcl.run import run_experiment

    try:
        config = load_config(args.config, args.overrides)
        results = run_experiment(config, restart=args.restart, show_progress=not args.quiet)
        if results.get("interrupted"):
            return _fail("the run stopped before its last task")
        plot_run(results, config.output_dir)
    except _user_errors() as error:
        return _fail(str(error).splitlines()[0] if str(error) else type(error).__name__)
    print(run_summary_markdown(results))
    print(f"run directory: {config.output_dir}")
    return 0


# --- clipcl list ----------------------------------------------------------------------------------


def command_list(args: argparse.Namespace) -> int:
    from clipcl.data.registry import STREAM_ORDERS, available_datasets
    from clipcl.data.streams import PROTOCOLS
    from clipcl.strategies import STRATEGIES, describe

    print("strategies:")
    for name in STRATEGIES:
        print(f"  {name:<14} {describe(name)}")
    from clipcl.config import shipped_configs

    print("shipped configs (clipcl run NAME):")
    for name, path in shipped_configs().items():
        first = path.read_text().splitlines()[0].lstrip("# ").strip()
        print(f"  {name:<24} {first}")
    print("protocols (stream.protocol):")
    for name in PROTOCOLS:
        print(f"  {name}")
    print("  si_blurry          (online: one pass, stochastic blurry task boundaries; docs/online.md)")
    print("stream orders (stream.datasets):")
    for name, datasets in STREAM_ORDERS.items():
        print(f"  {name:<14} {' -> '.join(datasets)}")
    print("datasets:")
    for name in available_datasets():
        print(f"  {name}")
    from clipcl.models import available_models

    print("models (model.backend / model.name):")
    for description in available_models(open_clip_names=args.open_clip_models):
        print(f"  {description}")
    return 0


# --- clipcl metrics -------------------------------------------------------------------------------


def read_matrix(path: str) -> list[list[float]]:
    """Read a T x T accuracy matrix from CSV (optionally with a header row and/or a label column)
    or JSON (a list of rows, or an object with ``matrix`` / ``accuracy.matrix``)."""
    text = Path(path).read_text() if path != "-" else sys.stdin.read()
    stripped = text.strip()
    if not stripped:
        raise ValueError(f"{path} is empty")
    if stripped[0] in "[{":
        data = json.loads(stripped)
        if isinstance(data, dict):
            data = data.get("matrix") or (data.get("accuracy") or {}).get("matrix")
        if not isinstance(data, list):
            raise ValueError(f"{path}: JSON must be a list of rows or hold a 'matrix'")
        return [[float(value) for value in row] for row in data]
    rows = [row for row in csv.reader(io.StringIO(stripped)) if any(cell.strip() for cell in row)]

    def is_number(cell: str) -> bool:
        try:
            float(cell)
            return True
        except ValueError:
            return False

    if rows and not all(is_number(cell) for cell in rows[0][1:]):
        rows = rows[1:]  # a header row
    if rows and all(not is_number(row[0]) for row in rows):
        rows = [row[1:] for row in rows]  # a label column
    matrix = []
    for number, row in enumerate(rows, start=1):
        try:
            matrix.append([float(cell) for cell in row])
        except ValueError:
            raise ValueError(f"{path}: row {number} holds a value that is not a number: {row}") from None
    return matrix


def command_metrics(args: argparse.Namespace) -> int:
    from clipcl.eval.metrics import all_metrics

    try:
        matrix = read_matrix(args.file)
        metrics = all_metrics(matrix, class_incremental=args.class_incremental)
    except (OSError, ValueError, json.JSONDecodeError) as error:
        return _fail(str(error))
    if args.json:
        print(json.dumps({key: (None if math.isnan(value) else value) for key, value in metrics.items()}))
        return 0
    width = max(len(key) for key in metrics)
    print(f"{len(matrix)} tasks")
    for key, value in metrics.items():
        print(f"{key:<{width}}  {value:8.2f}")
    return 0


# --- clipcl report --------------------------------------------------------------------------------


def command_report(args: argparse.Namespace) -> int:
    from clipcl.report import comparison_markdown, load_results, plot_run, run_summary_markdown

    try:
        all_results = [load_results(run_dir) for run_dir in args.run_dirs]
    except (FileNotFoundError, json.JSONDecodeError) as error:
        return _fail(str(error))
    parts = []
    for run_dir, results in zip(args.run_dirs, all_results):
        plots = plot_run(results, run_dir)
        parts.append(run_summary_markdown(results))
        parts.append("Plots: " + ", ".join(str(path) for path in plots) + "\n")
    if len(all_results) > 1:
        parts.insert(0, "# Comparison\n\n" + comparison_markdown(all_results) + "\n")
    text = "\n".join(parts)
    if args.output:
        from clipcl.checkpoint import atomic_write_text

        atomic_write_text(args.output, text)
    print(text)
    return 0


# --- clipcl demo ----------------------------------------------------------------------------------


def command_demo(args: argparse.Namespace) -> int:
    from clipcl.demo import run_demo

    try:
        return run_demo(args.output, quick=args.quick, show_progress=not args.quiet)
    except _user_errors() as error:
        return _fail(str(error).splitlines()[0])


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="clipcl", description="Continual learning of CLIP models.")
    sub = parser.add_subparsers(dest="command", required=True)

    run = sub.add_parser("run", help="run (or resume) a continual-learning run from a YAML config")
    run.add_argument("config", help="YAML run config, or the name of a shipped one (clipcl list)")
    run.add_argument("overrides", nargs="*", help="dotted.key=value overrides, e.g. train.lr=1e-4")
    run.add_argument("--restart", action="store_true", help="discard an earlier run in the same output_dir")
    run.add_argument("--quiet", action="store_true", help="no progress bars")
    run.set_defaults(handler=command_run)

    listing = sub.add_parser("list", help="strategies, protocols, datasets and models")
    listing.add_argument("--open-clip-models", action="store_true", help="also list every open_clip architecture")
    listing.set_defaults(handler=command_list)

    metrics = sub.add_parser("metrics", help="metrics of an accuracy matrix file (CSV or JSON)")
    metrics.add_argument("file", help="CSV (T x T numbers, optional header) or JSON; - for stdin")
    metrics.add_argument("--json", action="store_true", help="print a JSON object")
    metrics.add_argument("--class-incremental", action="store_true", help="also average incremental accuracy")
    metrics.set_defaults(handler=command_metrics)

    report = sub.add_parser("report", help="Markdown summary and plots of one or more run directories")
    report.add_argument("run_dirs", nargs="+")
    report.add_argument("--output", help="also write the Markdown here")
    report.set_defaults(handler=command_report)

    demo = sub.add_parser("demo", help="the default offline comparison (README's first command)")
    demo.add_argument("--output", default="runs/demo", help="parent folder of the run directories")
    demo.add_argument("--quick", action="store_true", help="a much smaller version, for a smoke test")
    demo.add_argument("--quiet", action="store_true", help="no progress bars")
    demo.set_defaults(handler=command_demo)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    # Overrides may come after options (`clipcl run c.yaml --quiet train.lr=1`), which argparse's
    # positional nargs="*" does not collect; pick them up from the leftovers.
    args, leftovers = parser.parse_known_args(argv)
    if args.command == "run":
        args.overrides += [item for item in leftovers if "=" in item and not item.startswith("-")]
        leftovers = [item for item in leftovers if not ("=" in item and not item.startswith("-"))]
    if leftovers:
        parser.error(f"unrecognized arguments: {' '.join(leftovers)}")
    return args.handler(args)


if __name__ == "__main__":
    sys.exit(main())
