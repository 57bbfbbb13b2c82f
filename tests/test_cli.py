"""`clipcl metrics` on bad input: exit code 2, one line on stderr
that starts `clipcl: error:` and names the file and the cell. Also the accepted forms."""

import io
import json
import sys

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
