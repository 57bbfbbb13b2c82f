"""The ``clipcl`` command: run, list, metrics, report, demo.

Errors a user can fix (bad config, missing data, a foreign checkpoint) print one line and exit 2.
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import math
import os
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


class MatrixError(ValueError):
    """An accuracy matrix file that ``clipcl metrics`` cannot read; the message is one line naming it."""


def _read_text(path: str, name: str) -> str:
    """The file (or stdin) as text; one-line errors for a missing, unreadable or non-UTF-8 file."""
    try:
        if path == "-":
            # Read bytes where stdin has them, so that a non-UTF-8 pipe fails here with our message.
            buffer = getattr(sys.stdin, "buffer", None)
            data = buffer.read() if buffer is not None else sys.stdin.read().encode()
        else:
            data = Path(path).read_bytes()
    except FileNotFoundError:
        raise MatrixError(f"{name} does not exist") from None
    except OSError as error:
        raise MatrixError(f"cannot read {name}: {error.strerror or error}") from None
    try:
        return data.decode("utf-8-sig")  # -sig: spreadsheets often start a CSV with a byte-order mark
    except UnicodeDecodeError as error:
        raise MatrixError(f"{name} is not UTF-8 text (byte {error.start})") from None


def _matrix_from_json(text: str, name: str) -> list[tuple[str, list[tuple[str, object]]]]:
    """The rows of a JSON matrix as (row label, [(cell label, value)]) for :func:`_checked_matrix`."""
    try:
        data = json.loads(text)
    except json.JSONDecodeError as error:
        raise MatrixError(f"{name} is not valid JSON: {error.msg} (line {error.lineno}, column {error.colno})") from None
    if isinstance(data, dict):
        accuracy = data.get("accuracy")
        if "matrix" in data:
            data = data["matrix"]
        elif isinstance(accuracy, dict) and "matrix" in accuracy:
            data = accuracy["matrix"]  # a clipcl results.json
        else:
            raise MatrixError(f"{name}: a JSON object must hold 'matrix' or 'accuracy.matrix'")
    if not isinstance(data, list):
        raise MatrixError(f"{name}: the matrix must be a JSON list of rows, not {_json_kind(data)}")
    rows = []
    for row_number, row in enumerate(data, start=1):
        if not isinstance(row, list):
            raise MatrixError(f"{name}: row {row_number} is {_json_kind(row)}, not a list of numbers "
                             "(the matrix is a list of rows)")
        rows.append((f"row {row_number}", [(f"row {row_number}, column {column}", value)
                                           for column, value in enumerate(row, start=1)]))
    return rows


def _json_kind(value: object) -> str:
    """How a JSON value reads in an error message: null, true, a string, a list, an object, 5."""
    if value is None or isinstance(value, bool):
        return json.dumps(value)
    if isinstance(value, str):
        return f"the text {json.dumps(value[:20] + ('...' if len(value) > 20 else ''))}"
    return {list: "a list", dict: "an object"}.get(type(value), repr(value))


def _is_number(cell: str) -> bool:
    try:
        float(cell)
        return True
    except ValueError:
        return False


def _matrix_from_csv(text: str, name: str) -> list[tuple[str, list[tuple[str, object]]]]:
    """The rows of a CSV matrix, without its header row and label column, as for the JSON form."""
    reader = csv.reader(io.StringIO(text))
    lines = []  # (line number, stripped cells) of the non-blank rows
    for row in reader:
        if any(cell.strip() for cell in row):
            lines.append((reader.line_num, [cell.strip() for cell in row]))
    # A header names the columns: no cell of it is a number (its first cell may be the corner of a
    # label column). A first row with numbers in it is data, so a typo in it is reported, not skipped.
    if lines and not any(_is_number(cell) for cell in lines[0][1][1:]):
        lines = lines[1:]
    if not lines:
        raise MatrixError(f"{name} holds a header but no rows of numbers")
    # A label column ("after task 1", ...) has no number in any row; one label alone is a typo.
    if all(not _is_number(cells[0]) for _, cells in lines):
        lines = [(number, cells[1:]) for number, cells in lines]
    rows = []
    for line_number, cells in lines:
        values = []
        for column, cell in enumerate(cells, start=1):
            where = f"line {line_number}, column {column}"
            if not _is_number(cell):
                raise MatrixError(f"{name}: {where} is {'empty' if not cell else repr(cell)}, not a number")
            values.append((where, float(cell)))
        rows.append((f"line {line_number}", values))
    return rows


def _values(count: int) -> str:
    return f"{count} value" if count == 1 else f"{count} values"


def _checked_matrix(rows: list[tuple[str, list[tuple[str, object]]]], name: str,
                    fractions: bool) -> list[list[float]]:
    """A square matrix of percentages from labelled rows; a one-line MatrixError naming the first
    cell (or row) that is not a finite number in [0, 100], or the shape when it is not T x T."""
    matrix = []
    for _, cells in rows:
        values = []
        for where, value in cells:
            # bool is an int in Python, but JSON true is not an accuracy.
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                raise MatrixError(f"{name}: {where} is {_json_kind(value)}, not a number")
            try:
                number = float(value)
            except OverflowError:
                number = math.inf
            if not math.isfinite(number):
                raise MatrixError(f"{name}: {where} is {value}, not a finite number")
            values.append(number)
        matrix.append(values)
    if not matrix:
        raise MatrixError(f"{name} holds no matrix")
    for (label, _), values in zip(rows, matrix):
        if len(values) != len(matrix[0]):
            raise MatrixError(f"{name}: {label} has {_values(len(values))} but {rows[0][0]} has {_values(len(matrix[0]))}; "
                             "the matrix must be T x T")
    if len(matrix[0]) != len(matrix):
        raise MatrixError(f"{name}: the matrix has {len(matrix)} rows and {len(matrix[0])} columns; "
                         "it must be square (T x T: row t is after training task t, column d is task d)")
    if fractions:
        matrix = [[100.0 * value for value in values] for values in matrix]
    elif all(0.0 <= value <= 1.0 for values in matrix for value in values):
        raise MatrixError(f"{name}: every value is between 0 and 1, which looks like fractions; accuracies are "
                         "percentages (pass --fractions to multiply them by 100)")
    for (_, cells), values in zip(rows, matrix):
        for (where, _), value in zip(cells, values):
            if not 0.0 <= value <= 100.0:
                shown = f"{value / 100:g} (x 100 = {value:g})" if fractions else f"{value:g}"
                raise MatrixError(f"{name}: {where} is {shown}, outside 0..100 (accuracies are percentages)")
    return matrix


def read_matrix(path: str, fractions: bool = False) -> list[list[float]]:
    """Read a T x T accuracy matrix (percent) from CSV, with an optional header row and/or label
    column, or from JSON: a list of rows, ``{"matrix": ...}`` or a results.json. ``-`` is stdin;
    ``fractions`` multiplies every value by 100. Raises a one-line MatrixError naming the file."""
    name = "stdin" if path == "-" else path
    text = _read_text(path, name).strip()
    if not text:
        raise MatrixError(f"{name} is empty")
    rows = _matrix_from_json(text, name) if text[0] in "[{" else _matrix_from_csv(text, name)
    return _checked_matrix(rows, name, fractions)


def command_metrics(args: argparse.Namespace) -> int:
    from clipcl.eval.metrics import all_metrics

    try:
        matrix = read_matrix(args.file, fractions=args.fractions)
        metrics = all_metrics(matrix, class_incremental=args.class_incremental)
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
    from clipcl.checkpoint import atomic_write_text
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
    metrics.add_argument("file", help="CSV (T x T percentages, optional header row and label column) or JSON; - for stdin")
    metrics.add_argument("--json", action="store_true", help="print a JSON object")
    metrics.add_argument("--class-incremental", action="store_true", help="also average incremental accuracy")
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
    return args.handler(args)


if __name__ == "__main__":
    sys.exit(main())
