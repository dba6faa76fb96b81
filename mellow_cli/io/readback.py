"""Result rows read back from the files ask, compare and caption write (jsonl, csv, tsv), so a
page can be made of a run after it, or while it runs: the inverse of formats.py, with csv and
tsv cells made lists, scores and numbers again.

A file that a run is still writing, or that a kill cut short, gives its whole rows: a last line
without its newline that does not parse is left out, as `--resume` leaves it. (A `-f json` array
is a list written one row a line, as a benchmark's predictions file is, and is read by the same
reader: bench/predictions.py; the object of one input is read by read_one_input.)
"""

from __future__ import annotations

import csv
import io
import json

from mellow_cli.errors import UsageError
from mellow_cli.files import text_lines
from mellow_cli.io.inputs import json_kind, read_text

NUMBERS = ("start", "end")


def read_rows(path: str, fmt: str) -> list[dict]:
    """The rows of `path`, written as `fmt` (jsonl, csv or tsv); a UsageError naming the file and
    the line for anything that is not a row."""
    text = read_text(path, "rows file")
    rows = _jsonl(path, text) if fmt == "jsonl" else _table(path, text, "," if fmt == "csv" else "\t")
    for number, row in enumerate(rows, 1):
        check_row(row, f"{path}: row {number}")
    return rows


def read_one_input(path: str) -> list[dict] | None:
    """The rows of a `-f json` file of one input (one object, a recording's windows inside it:
    formats.one_input read backwards), or None when the file holds no JSON object (a batch's
    list is read as bench/predictions.py reads one)."""
    text = read_text(path, "rows file")
    if not text.lstrip().startswith("{"):
        return None
    try:
        record = json.loads(text)
    except ValueError as e:
        raise UsageError(f"{path}: not JSON ({e})") from None
    windows = record.pop("windows", None) if isinstance(record, dict) else None
    if windows is None:
        return [check_row(record, path)]
    if not isinstance(windows, list) or not all(isinstance(w, dict) for w in windows):
        raise UsageError(f"{path}: \"windows\" is not a list of objects")
    return [check_row({**record, **w}, f"{path}: window {n}") for n, w in enumerate(windows, 1)]


def check_row(row, where: str) -> dict:
    """A result row is an object naming its recording; the rest the page reads as it can."""
    if not isinstance(row, dict):
        raise UsageError(f"{where}: expected a JSON object, got {json_kind(row)}")
    if not isinstance(row.get("audio"), str):
        raise UsageError(f"{where}: not a result row (no \"audio\"); was it written by mellow ask, compare or caption?")
    return row


def _jsonl(path: str, text: str) -> list[dict]:
    lines = text_lines(text)
    rows = []
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            rows.append(json.loads(line))
        except ValueError:
            if number == len(lines) and not text.endswith("\n"):  # the row being written, or cut by a kill
                break
            raise UsageError(f"{path}: line {number} is not JSON; is this a file of result rows (-f jsonl)?") from None
    return rows


def _table(path: str, text: str, delimiter: str) -> list[dict]:
    try:
        records = list(csv.reader(io.StringIO(text, newline=""), delimiter=delimiter))
    except csv.Error as e:
        raise UsageError(f"{path}: not {'CSV' if delimiter == ',' else 'TSV'} ({e})") from None
    if not records:
        return []
    header, body = records[0], records[1:]
    if body and len(body[-1]) != len(header) and not text.endswith("\n"):
        body.pop()  # the row being written, or cut by a kill
    rows = []
    for number, cells in enumerate(body, 2):
        if len(cells) != len(header):
            raise UsageError(f"{path}: line {number} has {len(cells)} cells, not {len(header)} as its header")
        rows.append({key: unflat(key, value) for key, value in zip(header, cells)})
    return rows


def unflat(key: str, value: str):
    """A csv/tsv cell as the row held it (formats.py's `_flat` read backwards): empty is None,
    choices a list, scores each choice's probability keyed by the choice, start and end numbers."""
    if value == "":
        return None
    if key == "choices":
        return value.split("|")
    if key == "scores":
        pairs = [part.rpartition("=") for part in value.split("|")]
        return {choice: _number(p) for choice, _, p in pairs}
    if key in NUMBERS:
        return _number(value)
    return value


def _number(text: str):
    try:
        return float(text)
    except ValueError:
        return None
