"""Reading an accuracy matrix a user gives ``clipcl metrics``: CSV or JSON, checked cell by cell.

Accepted: CSV with an optional header row and/or label column, a JSON list of rows, ``{"matrix": ...}``
or a results.json (``{"accuracy": {"matrix": ...}}``), ``-`` for stdin. Anything else is a
:class:`MatrixError` whose one line names the file, row and column.
"""

from __future__ import annotations

import csv
import io
import json
import math
import sys
from pathlib import Path


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


__all__ = ["MatrixError", "read_matrix"]
