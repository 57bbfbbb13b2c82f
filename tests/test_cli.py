"""`clipcl metrics`, `clipcl report` and `clipcl demo` on bad input: exit code 2, one line on stderr
that starts `clipcl: error:` and names the file (or key), and nothing written. Also the accepted forms."""

import copy
import io
import json
import os
import sys
from pathlib import Path

import pytest

from clipcl.cli import main

# rows: after task 1, 2, 3; columns: task 1, 2, 3
MATRIX = [
    [80.0, 30.0, 20.0],
    [70.0, 90.0, 25.0],
    [60.0, 85.0, 95.0],
]
TRANSFER, BWT = 26.25, -12.5  # of MATRIX (hand-computed in test_metrics.py)


def one_error_line(capsys, *names: str) -> str:
    """The single stderr line of a refused command, checked to name each of ``names``."""
    captured = capsys.readouterr()
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1, captured.err
    assert lines[0].startswith("clipcl: error:"), lines[0]
    for name in names:
        assert name in lines[0], (name, lines[0])
    return lines[0]


def csv_text(matrix) -> str:
    return "\n".join(",".join(f"{value:g}" for value in row) for row in matrix) + "\n"


# --- clipcl metrics: refused ----------------------------------------------------------------------

BAD_MATRICES = {
    # A 4 x 3 CSV whose first row has a typo was read as a header and its last 3 x 3 scored.
    "typo_in_first_row.csv": ("80,3o,20\n70,90,25\n60,85,95\n50,50,50\n", ["line 1, column 2", "'3o'"]),
    "typo_in_first_cell.csv": ("8o,30,20\n70,90,25\n60,85,95\n", ["line 1, column 1", "'8o'"]),
    "above_100.csv": ("80,30\n70,390\n", ["line 2, column 2", "390", "0..100"]),
    "negative.csv": ("80,-5\n70,90\n", ["line 1, column 2", "-5"]),
    "fractions.csv": ("0.8,0.3\n0.7,0.9\n", ["fractions", "--fractions"]),
    "not_square.csv": ("1,2,3\n4,5,6\n", ["2 rows and 3 columns", "square"]),
    "ragged.csv": ("80,30\n70\n", ["line 2 has 1 value", "line 1 has 2 values"]),
    "infinite.csv": ("80,inf\n70,90\n", ["line 1, column 2", "finite"]),
    "flat.json": ("[1,2,3]", ["row 1 is 1", "list of numbers"]),
    "null.json": ("[[1,null]]", ["row 1, column 2 is null"]),
    "boolean.json": ("[[true,50],[50,50]]", ["row 1, column 1 is true"]),
    "text.json": ('[[80,"30"],[70,90]]', ["row 1, column 2", '"30"']),
    "too_deep.json": ("[[[80]]]", ["row 1, column 1 is a list"]),
    "nan.json": ("[[NaN,30],[70,90]]", ["row 1, column 1", "finite"]),
}


@pytest.mark.parametrize("name", sorted(BAD_MATRICES))
def test_metrics_refuses_a_bad_matrix_with_one_line(name, tmp_path, capsys):
    text, expected = BAD_MATRICES[name]
    path = tmp_path / name
    path.write_text(text)
    assert main(["metrics", str(path)]) == 2
    one_error_line(capsys, str(path), *expected)


def test_metrics_refuses_a_file_that_is_not_utf8(tmp_path, capsys):
    path = tmp_path / "latin1.csv"
    path.write_bytes("80,30\n70,90 % précision\n".encode("latin-1"))
    assert main(["metrics", str(path)]) == 2
    one_error_line(capsys, str(path), "UTF-8")


def test_metrics_refuses_stdin_that_is_not_utf8(monkeypatch, capsys):
    monkeypatch.setattr(sys, "stdin", io.TextIOWrapper(io.BytesIO(b"80,30\n70,\xff\n"), encoding="utf-8"))
    assert main(["metrics", "-"]) == 2
    one_error_line(capsys, "stdin", "UTF-8")


def test_metrics_fractions_out_of_range_after_scaling(tmp_path, capsys):
    path = tmp_path / "mixed.csv"
    path.write_text("0.8,30\n0.7,0.9\n")  # percentages and fractions mixed: 30 x 100 is out of range
    assert main(["metrics", str(path), "--fractions"]) == 2
    one_error_line(capsys, str(path), "line 1, column 2", "0..100")


# --- clipcl metrics: accepted ---------------------------------------------------------------------

GOOD_MATRICES = {
    "plain.csv": csv_text(MATRIX),
    "header.csv": "task1,task2,task3\n" + csv_text(MATRIX),
    "labels.csv": "".join(f"after task{t + 1}," + csv_text([row]) for t, row in enumerate(MATRIX)),
    "header_and_labels.csv": ",task1,task2,task3\n" + "".join(
        f"after task{t + 1}," + csv_text([row]) for t, row in enumerate(MATRIX)),
    "byte_order_mark.csv": "\ufefftask1,task2,task3\n" + csv_text(MATRIX),
    "rows.json": json.dumps(MATRIX),
    "object.json": json.dumps({"matrix": MATRIX}),
    "results.json": json.dumps({"name": "run", "accuracy": {"matrix": MATRIX, "unit": "percent"}}),
}


@pytest.mark.parametrize("name", sorted(GOOD_MATRICES))
def test_metrics_reads_each_accepted_form(name, tmp_path, capsys):
    path = tmp_path / name
    path.write_text(GOOD_MATRICES[name], encoding="utf-8")
    assert main(["metrics", str(path), "--json"]) == 0
    printed = json.loads(capsys.readouterr().out)
    assert printed["transfer"] == pytest.approx(TRANSFER)
    assert printed["bwt"] == pytest.approx(BWT)


def test_metrics_fractions_are_multiplied_by_100(tmp_path, capsys):
    path = tmp_path / "fractions.json"
    path.write_text(json.dumps([[value / 100 for value in row] for row in MATRIX]))
    assert main(["metrics", str(path), "--json", "--fractions"]) == 0
    printed = json.loads(capsys.readouterr().out)
    assert printed["transfer"] == pytest.approx(TRANSFER)
    assert printed["bwt"] == pytest.approx(BWT)


def test_metrics_reads_stdin(monkeypatch, capsys):
    monkeypatch.setattr(sys, "stdin", io.TextIOWrapper(io.BytesIO(csv_text(MATRIX).encode())))
    assert main(["metrics", "-", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["transfer"] == pytest.approx(TRANSFER)


# --- clipcl report --------------------------------------------------------------------------------

TASK_RESULTS = {
    "name": "toy/finetune",
    "strategy": "finetune",
    "protocol": "multi_domain",
    "seed": 0,
    "tasks": ["task1", "task2", "task3"],
    "accuracy": {
        "rows": ["after task1", "after task2", "after task3"],
        "columns": ["task1", "task2", "task3"],
        "matrix": MATRIX,
        "zero_shot_row": [10.0, 20.0, 30.0],
        "unit": "percent",
    },
    "heldout": {"datasets": ["held"], "zero_shot": [40.0], "after_each_task": [[39.0], [38.0], [37.0]]},
    "metrics": {"transfer": TRANSFER, "avg": 61.7, "last": 80.0, "bwt": BWT, "forgetting": 12.5},
    "timing": {"train_seconds": [1.0, 2.0, 3.0], "eval_seconds": [0.5, 0.5, 0.5],
               "zero_shot_eval_seconds": 0.5},
    "parameters": {"trainable": 1000, "total": 5000},
}

ONLINE_RESULTS = {
    "name": "toy/online",
    "protocol": "si_blurry",
    "seed": 0,
    "anytime": {"samples": [100, 200], "accuracy": [30.0, 40.0], "periodic": [], "unit": "percent"},
    "stream": {"samples": 200, "classes": 10},
    "heldout": {"datasets": [], "zero_shot": [], "after_stream": []},
    "metrics": {"a_auc": 35.0, "a_last": 40.0},
    "timing": {"train_seconds": 1.0, "eval_seconds": 0.5, "train_steps": 10, "train_examples": 200},
    "parameters": {"trainable": 1000, "total": 5000},
}


def write_run(folder: Path, results=None, raw: bytes | None = None) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    data = raw if raw is not None else json.dumps(TASK_RESULTS if results is None else results).encode()
    (folder / "results.json").write_bytes(data)
    return folder


def without(results: dict, dotted_key: str) -> dict:
    results = copy.deepcopy(results)
    *parents, last = dotted_key.split(".")
    section = results
    for part in parents:
        section = section[part]
    del section[last]
    return results


def files_under(folder: Path) -> dict[str, bytes]:
    return {str(path.relative_to(folder)): path.read_bytes() for path in folder.rglob("*") if path.is_file()}


BAD_RESULTS = {
    "empty_object": b"{}",
    "list": b"[]",
    "not_utf8": b'{"name": "caf\xe9"}',
    "not_json": b'{"name": ',
    "no_accuracy": json.dumps(without(TASK_RESULTS, "accuracy")).encode(),
    "no_matrix": json.dumps(without(TASK_RESULTS, "accuracy.matrix")).encode(),
    "no_columns": json.dumps(without(TASK_RESULTS, "accuracy.columns")).encode(),
    "no_metrics": json.dumps(without(TASK_RESULTS, "metrics")).encode(),
    "no_timing": json.dumps(without(TASK_RESULTS, "timing.train_seconds")).encode(),
    "no_parameters": json.dumps(without(TASK_RESULTS, "parameters")).encode(),
    "matrix_is_text": json.dumps({**TASK_RESULTS, "accuracy": {**TASK_RESULTS["accuracy"], "matrix": "x"}}).encode(),
    "online_no_anytime": json.dumps(without(ONLINE_RESULTS, "anytime")).encode(),
}
EXPECTED_IN_MESSAGE = {
    "empty_object": ["empty"], "list": ["a list", "JSON object"], "not_utf8": ["UTF-8"],
    "not_json": ["not valid JSON"], "no_accuracy": ["lacks 'accuracy'"],
    "no_matrix": ["lacks 'accuracy.matrix'"], "no_columns": ["lacks 'accuracy.columns'"],
    "no_metrics": ["lacks 'metrics'"], "no_timing": ["lacks 'timing.train_seconds'"],
    "no_parameters": ["lacks 'parameters"], "matrix_is_text": ["'accuracy.matrix' is text"],
    "online_no_anytime": ["lacks 'anytime"],
}


@pytest.mark.parametrize("case", sorted(BAD_RESULTS))
def test_report_refuses_bad_results_and_writes_nothing(case, tmp_path, capsys):
    good = write_run(tmp_path / "good")  # listed first: its plots must not be written either
    bad = write_run(tmp_path / "bad", raw=BAD_RESULTS[case])
    before = files_under(tmp_path)
    assert main(["report", str(good), str(bad), "--output", str(tmp_path / "report.md")]) == 2
    one_error_line(capsys, str(bad / "results.json"), *EXPECTED_IN_MESSAGE[case])
    assert files_under(tmp_path) == before


@pytest.fixture
def read_only(monkeypatch):
    """Make folders read-only: by mode bits, and (the tests may run as root, who ignores them) for
    os.access too. Returns the function that makes one folder read-only."""
    folders: list[Path] = []
    real_access = os.access

    def access(path, mode, *args, **kwargs):
        if mode & os.W_OK and Path(path).resolve() in folders:
            return False
        return real_access(path, mode, *args, **kwargs)

    monkeypatch.setattr(os, "access", access)

    def make(folder: Path) -> Path:
        folder.chmod(0o555)
        folders.append(folder.resolve())
        return folder

    yield make
    for folder in folders:
        folder.chmod(0o755)  # so that pytest can remove tmp_path


def test_report_on_a_read_only_run_names_both_options(tmp_path, capsys, read_only):
    run = read_only(write_run(tmp_path / "run"))
    before = files_under(tmp_path)
    assert main(["report", str(run)]) == 2
    one_error_line(capsys, str(run), "read-only", "--plots-dir", "--no-plots")
    assert files_under(tmp_path) == before


def test_report_on_a_read_only_run_with_plots_dir_or_no_plots(tmp_path, capsys, read_only):
    run = read_only(write_run(tmp_path / "run"))
    assert main(["report", str(run), "--plots-dir", str(tmp_path / "plots")]) == 0
    assert (tmp_path / "plots" / "run" / "accuracy_matrix.png").exists()
    assert (tmp_path / "plots" / "run" / "task_accuracy.png").exists()
    assert "\n| zero-shot |" in capsys.readouterr().out
    before = files_under(tmp_path)
    assert main(["report", str(run), "--no-plots"]) == 0
    assert "Plots:" not in capsys.readouterr().out
    assert files_under(tmp_path) == before


def test_report_plots_dir_keeps_runs_of_the_same_name_apart(tmp_path, capsys):
    first = write_run(tmp_path / "a" / "run")
    second = write_run(tmp_path / "b" / "run")
    assert main(["report", str(first), str(second), "--plots-dir", str(tmp_path / "plots")]) == 0
    assert (tmp_path / "plots" / "run" / "accuracy_matrix.png").exists()
    assert (tmp_path / "plots" / "run-2" / "accuracy_matrix.png").exists()
    assert not (first / "accuracy_matrix.png").exists()


@pytest.mark.parametrize("where", ["a folder", "a missing folder", "a read-only folder"])
def test_report_refuses_an_output_it_cannot_write(where, tmp_path, capsys, read_only):
    run = write_run(tmp_path / "run")
    output = {"a folder": tmp_path / "out",
              "a missing folder": tmp_path / "missing" / "report.md",
              "a read-only folder": tmp_path / "locked" / "report.md"}[where]
    if where == "a folder":
        output.mkdir()
    if where == "a read-only folder":
        output.parent.mkdir()
        read_only(output.parent)
    before = files_under(tmp_path)
    assert main(["report", str(run), "--output", str(output)]) == 2
    one_error_line(capsys, "--output", str(output))
    assert files_under(tmp_path) == before
    assert not (tmp_path / "missing").exists()


def test_report_renders_a_run_without_zero_shot_row(tmp_path, capsys):
    results = copy.deepcopy(TASK_RESULTS)
    results["accuracy"]["zero_shot_row"] = None  # eval.zero_shot_row: false
    results["heldout"]["zero_shot"] = None
    results["timing"]["zero_shot_eval_seconds"] = None
    results["metrics"]["zero_shot_avg"] = None
    run = write_run(tmp_path / "run", results)
    output = tmp_path / "report.md"
    assert main(["report", str(run), str(write_run(tmp_path / "other")), "--output", str(output)]) == 0
    text = output.read_text()
    assert text.count("\n| zero-shot |") == 1  # a zero-shot row of the matrix: only the other run has one
    assert "| zero_shot_avg | – |" in text
    assert "| held | – | 37.0 |" in text
    assert (run / "accuracy_matrix.png").exists() and (run / "task_accuracy.png").exists()


def test_report_of_an_online_run(tmp_path, capsys):
    run = write_run(tmp_path / "run", ONLINE_RESULTS)
    assert main(["report", str(run)]) == 0
    assert "Anytime accuracy" in capsys.readouterr().out
    assert (run / "anytime_accuracy.png").exists()


def test_report_plots_every_run_against_the_samples_it_has_seen(tmp_path, capsys):
    from clipcl.report_compute import samples_seen_curve

    results = copy.deepcopy(TASK_RESULTS)
    results["compute"] = {"samples_seen_cumulative": [64, 128, 192]}
    online = copy.deepcopy(ONLINE_RESULTS)
    online["anytime"]["samples_trained"] = [150, 300]
    # After task t: the mean of row t over the tasks seen so far; the zero-shot row's first task at 0.
    samples, measure = samples_seen_curve(results)
    assert samples == [0.0, 64.0, 128.0, 192.0]
    assert measure == [10.0, MATRIX[0][0], (MATRIX[1][0] + MATRIX[1][1]) / 2, sum(MATRIX[2]) / 3]
    assert samples_seen_curve(online) == ([150.0, 300.0], [30.0, 40.0])
    assert samples_seen_curve(TASK_RESULTS) is None  # a run from before compute accounting
    first, second = write_run(tmp_path / "first", results), write_run(tmp_path / "second", online)
    assert main(["report", str(first), str(second)]) == 0
    assert (first / "samples_seen.png").exists() and (second / "samples_seen.png").exists()
    assert (first / "samples_seen_comparison.png").exists()
    assert "samples_seen_comparison.png" in capsys.readouterr().out


# --- clipcl demo ----------------------------------------------------------------------------------


def test_demo_accepts_the_restart_it_advises(tmp_path, capsys, monkeypatch):
    """A demo folder holding runs of another config says to pass --restart; demo takes it and
    passes it on to every run."""
    import clipcl.demo
    from clipcl.run import RunError

    calls = []

    def fake_run_experiment(config, restart=False, show_progress=True):
        calls.append(restart)
        if not restart:
            raise RunError(f"{config.output_dir} holds a run with another config; choose another output_dir "
                           "or pass --restart to overwrite it")
        return {"name": config.label, "protocol": config.stream.protocol, "metrics": {"avg": 50.0}}

    monkeypatch.setattr(clipcl.demo, "run_experiment", fake_run_experiment)
    monkeypatch.setattr(clipcl.demo, "plot_run", lambda results, directory: [])
    output = tmp_path / "demo"
    assert main(["demo", "--quick", "--quiet", "--output", str(output)]) == 2
    one_error_line(capsys, "--restart")
    calls.clear()
    assert main(["demo", "--quick", "--quiet", "--output", str(output), "--restart"]) == 0
    assert calls == [True] * 6
    assert "multi_domain/finetune" in (output / "comparison.md").read_text()
