"""The ``clipcl`` command: run, list, metrics, report, demo.

Errors a user can fix (bad config, missing data, a foreign checkpoint) print one line and exit 2.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import traceback
from pathlib import Path


def _fail(message: str) -> int:
    print(f"clipcl: error: {message}", file=sys.stderr)
    return 2


def _user_errors() -> tuple[type[BaseException], ...]:
    """What a handler turns into one line: errors the user caused (clipcl.errors.UserError) and the
    machine's refusals (a missing or unreadable file, a full disk). Anything else is a bug: ``main``
    prints its traceback."""
    from clipcl.errors import UserError

    return (UserError, OSError)


def _one_line(error: BaseException) -> str:
    if isinstance(error, OSError) and error.strerror:
        where = error.filename if error.filename is not None else ""
        return f"{where}: {error.strerror}" if where else error.strerror
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__


# --- clipcl run -----------------------------------------------------------------------------------


def _quiet_libraries() -> None:
    """--quiet: also no progress bars from the libraries that load models (Hugging Face)."""
    os.environ["HF_HUB_DISABLE_PROGRESS_BARS"] = "1"
    try:
        from transformers.utils import logging as transformers_logging
    except ImportError:
        return
    transformers_logging.disable_progress_bar()


def command_run(args: argparse.Namespace) -> int:
    from clipcl.config import load_config
    from clipcl.report import plot_run, run_summary_markdown
    from clipcl.run import run_experiment

    if args.quiet:
        _quiet_libraries()
    try:
        config = load_config(args.config, args.overrides)
        results = run_experiment(config, restart=args.restart, resume_from_intact=args.resume_from_intact,
                                 show_progress=not args.quiet)
        if results.get("interrupted"):
            return _fail("the run stopped before its last task")
        plot_run(results, config.output_dir)
    except _user_errors() as error:
        return _fail(_one_line(error))
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
    print("  captions           (phases of image-caption pairs, contrastive; docs/alignment.md)")
    print("  languages          (one caption set, one language per task, CLL-CLIP's; docs/multilingual.md)")
    print("  time               (caption data in time steps, TiC-CLIP's modes and budgets; docs/time_continual.md)")
    print("caption sets (captions: stream.datasets, stream.heldout):")
    print("  tuxpaint, openclipart, emoji (Debian packages; drawings and glyphs, not photos), a caption file "
          "(.json Karpathy, .csv, .tsv, .jsonl) or webdataset shards (.tar, brace pattern)")
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


def command_metrics(args: argparse.Namespace) -> int:
    from clipcl.eval.matrix_file import read_matrix
    from clipcl.eval.metrics import all_metrics

    try:
        matrix = read_matrix(args.file, fractions=args.fractions)
        metrics = all_metrics(matrix, class_incremental=args.class_incremental, open_domain=args.open_domain)
    except ValueError as error:
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


def _is_writable_folder(folder: Path) -> bool:
    return folder.is_dir() and os.access(folder, os.W_OK | os.X_OK)


def _nearest_existing_folder(path: Path) -> Path:
    """``path`` or the closest of its parents that exists (the one that must be writable to create it)."""
    for candidate in [path, *path.parents]:
        if candidate.exists():
            return candidate
    return Path(".")


def _plot_folders(run_dirs: list[str], plots_dir: str | None) -> list[Path]:
    """Where each run's plots go: its own folder, or ``plots_dir/RUN_NAME``; checked, not yet created."""
    if plots_dir is None:
        for run_dir in run_dirs:
            if not _is_writable_folder(Path(run_dir)):
                raise ValueError(f"{run_dir} is read-only, so its plots cannot be written there; "
                                 "pass --plots-dir DIR to write them elsewhere, or --no-plots")
        return [Path(run_dir) for run_dir in run_dirs]
    base = Path(plots_dir)
    existing = _nearest_existing_folder(base)
    if not existing.is_dir():
        raise ValueError(f"--plots-dir {plots_dir}: {existing} is a file, not a folder")
    if not _is_writable_folder(existing):
        raise ValueError(f"--plots-dir {plots_dir}: {existing} is read-only")
    folders: list[Path] = []
    owner: dict[Path, Path] = {}  # plot folder -> the run directory whose plots it holds
    for run_dir in run_dirs:
        # One subfolder per run, named after it; different runs of the same name get -2, -3, ...
        run = Path(run_dir).resolve()
        name = run.name or "run"
        folder, suffix = base / name, 1
        while owner.get(folder, run) != run:
            suffix += 1
            folder = base / f"{name}-{suffix}"
        if folder.exists() and not folder.is_dir():
            raise ValueError(f"--plots-dir {plots_dir}: {folder} is a file, not a folder")
        owner[folder] = run
        folders.append(folder)
    return folders


def _checked_output(output: str) -> Path:
    """The --output file, refused when it could not be written (a folder, a missing or read-only one)."""
    path = Path(output)
    if path.is_dir():
        raise ValueError(f"--output {output} is a folder; give a file name, e.g. {path / 'report.md'}")
    if not path.parent.is_dir():
        raise ValueError(f"--output {output}: the folder {path.parent} does not exist")
    if not _is_writable_folder(path.parent):
        raise ValueError(f"--output {output}: the folder {path.parent} is read-only")
    return path


def command_report(args: argparse.Namespace) -> int:
    from clipcl.atomic_files import atomic_write_text
    from clipcl.report import comparison_markdown, load_results, plot_run, run_summary_markdown

    if args.no_plots and args.plots_dir:
        return _fail("--no-plots and --plots-dir exclude each other")
    # Check every input and destination first, so that a bad one leaves nothing written.
    try:
        all_results = [load_results(run_dir) for run_dir in args.run_dirs]
        plot_folders = [] if args.no_plots else _plot_folders(args.run_dirs, args.plots_dir)
        output = _checked_output(args.output) if args.output else None
    except ValueError as error:
        return _fail(str(error))
    parts = []
    try:
        for position, results in enumerate(all_results):
            parts.append(run_summary_markdown(results))
            if plot_folders:
                plot_folders[position].mkdir(parents=True, exist_ok=True)
                plots = plot_run(results, plot_folders[position])
                parts.append("Plots: " + ", ".join(str(path) for path in plots) + "\n")
        if len(all_results) > 1:
            parts.insert(0, "# Comparison\n\n" + comparison_markdown(all_results) + "\n")
            if plot_folders:  # next to the other plots: --plots-dir, else the first run's folder
                from clipcl.report_compute import plot_samples_seen

                folder = Path(args.plots_dir) if args.plots_dir else plot_folders[0]
                compared = plot_samples_seen(all_results, folder / "samples_seen_comparison.png")
                if compared is not None:
                    parts.insert(1, f"Measure against samples seen, every run: {compared}\n")
        text = "\n".join(parts)
        if output is not None:
            atomic_write_text(output, text)
    except OSError as error:  # a disk that fills, or a folder that changes while we write
        return _fail(f"cannot write {error.filename or 'the report'}: {error.strerror or error}")
    print(text)
    return 0


# --- clipcl demo ----------------------------------------------------------------------------------


def command_demo(args: argparse.Namespace) -> int:
    from clipcl.demo import run_demo

    try:
        return run_demo(args.output, quick=args.quick, show_progress=not args.quiet, restart=args.restart)
    except _user_errors() as error:
        return _fail(_one_line(error))


class _Parser(argparse.ArgumentParser):
    """argparse, with a usage mistake reported as the one ``clipcl: error:`` line every error gets."""

    def error(self, message: str):
        print(f"clipcl: error: {message} (see {self.prog} --help)", file=sys.stderr)
        raise SystemExit(2)


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="clipcl", description="Continual learning of CLIP models.")
    sub = parser.add_subparsers(dest="command", required=True)

    run = sub.add_parser("run", help="run (or resume) a continual-learning run from a YAML config")
    run.add_argument("config", help="YAML run config, or the name of a shipped one (clipcl list)")
    run.add_argument("overrides", nargs="*", help="dotted.key=value overrides, e.g. train.lr=1e-4")
    run.add_argument("--restart", action="store_true",
                     help="replace an earlier run in the same output_dir (only once the new one is built and checked)")
    run.add_argument("--resume-from-intact", action="store_true",
                     help="when the latest checkpoint is damaged, resume from the newest intact one")
    run.add_argument("--quiet", action="store_true", help="no progress bars")
    run.set_defaults(handler=command_run)

    listing = sub.add_parser("list", help="strategies, protocols, datasets and models")
    listing.add_argument("--open-clip-models", action="store_true", help="also list every open_clip architecture")
    listing.set_defaults(handler=command_list)

    metrics = sub.add_parser("metrics", help="metrics of an accuracy matrix file (CSV or JSON)")
    metrics.add_argument("file", help="CSV (T x T percentages, optional header row and label column) or JSON; - for stdin")
    metrics.add_argument("--json", action="store_true", help="print a JSON object")
    metrics.add_argument("--class-incremental", action="store_true", help="also average incremental accuracy")
    metrics.add_argument("--open-domain", action="store_true", help="also CoLeCLIP's seen-average (seen_avg)")
    metrics.add_argument("--fractions", action="store_true",
                         help="the values are fractions in [0, 1]: multiply them by 100")
    metrics.set_defaults(handler=command_metrics)

    report = sub.add_parser("report", help="Markdown summary and plots of one or more run directories")
    report.add_argument("run_dirs", nargs="+")
    report.add_argument("--output", help="also write the Markdown to this file")
    report.add_argument("--plots-dir", help="write the plots to DIR/RUN_NAME/ instead of into each run directory")
    report.add_argument("--no-plots", action="store_true", help="only the Markdown, no plots")
    report.set_defaults(handler=command_report)

    demo = sub.add_parser("demo", help="the default offline comparison (README's first command)")
    demo.add_argument("--output", default="runs/demo", help="parent folder of the run directories")
    demo.add_argument("--quick", action="store_true", help="a much smaller version, for a smoke test")
    demo.add_argument("--quiet", action="store_true", help="no progress bars")
    demo.add_argument("--restart", action="store_true",
                      help="discard earlier runs in the run directories instead of resuming them")
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
    try:
        return args.handler(args)
    except KeyboardInterrupt:
        again = " (rerun the same command to resume from the last checkpoint)" if args.command in ("run", "demo") else ""
        print(f"clipcl: interrupted{again}", file=sys.stderr)
        return 130
    except Exception:  # noqa: BLE001 (the handlers turn every user error into one line: this is a bug)
        traceback.print_exc()
        print("clipcl: internal error: this is a bug in clipcl, not a problem with your input; please report "
              "it with the traceback above", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
