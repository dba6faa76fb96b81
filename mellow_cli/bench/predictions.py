"""Predictions files: the official MMAU format (a JSON list of the benchmark's items, each with
`model_output` added), written so that a run can be killed at any moment and picked up again.

The list is written one item per line and flushed item by item:

    [
    {"id": "...", ..., "model_output": "b) chirping birds", "mode": "generate", "model": "v0"},
    {"id": "...", ..., "mode": "generate", "model": "v0", "error": "x.wav: no such file"}
    ]

so evaluation.py reads a finished file as it is. A killed run leaves the list without its
closing bracket, perhaps with half a line at the end; `read` takes every whole line and drops that
half, and `Writer` rewrites the kept items before appending, so `--resume` continues cleanly.
An item that could not be answered carries `error` instead of `model_output`: evaluation.py skips
it, `--resume` tries it again. `mode`, `prompt_style` and `model` are ours; evaluation.py ignores
them.
"""

from __future__ import annotations

import json
import os

from mellow_cli.io.inputs import read_text
from mellow_cli.errors import MellowError, UsageError
from mellow_cli.io.outputs import lock
from mellow_cli.bench.scoring import OUTPUT_KEY

OURS = (OUTPUT_KEY, "mode", "prompt_style", "model", "error")  # keys a prediction adds to its item


def read(path: str) -> tuple[list[dict], bool]:
    """(records, complete): the items in a predictions file, and whether its list was closed.
    A list cut short by a kill (ours: one item per line) gives every whole item it holds."""
    text = read_text(path, "predictions file")
    if not text.strip():
        return [], False
    try:
        data = json.loads(text)
    except json.JSONDecodeError as e:
        return _read_cut_short(path, text, e), False
    if not isinstance(data, list):
        raise UsageError(f"{path}: expected a JSON list of predictions")
    for index, obj in enumerate(data):
        if not isinstance(obj, dict):
            raise UsageError(f"{path}: item [{index}] is not a JSON object")
    return data, True


def _read_cut_short(path: str, text: str, error: json.JSONDecodeError) -> list[dict]:
    lines = text.split("\n")
    if lines[0].strip() != "[":
        raise UsageError(f"{path}: not JSON ({error.msg} at line {error.lineno}, column {error.colno})")
    body = [(n, line.strip()) for n, line in enumerate(lines[1:], 2) if line.strip()]
    records = []
    for i, (number, line) in enumerate(body):
        if line == "]":
            break
        try:
            obj = json.loads(line[:-1] if line.endswith(",") else line)
        except json.JSONDecodeError:
            if all(rest == "]" for _, rest in body[i + 1 :]):  # the half-written last item of a killed run
                break
            raise UsageError(f"{path}: line {number} is not a JSON item; is this a predictions file?") from None
        if not isinstance(obj, dict):
            raise UsageError(f"{path}: line {number} is not a JSON object")
        records.append(obj)
    return records


def check_output(record: dict, index: int, path: str) -> None:
    """evaluation.py fails on a `model_output` that is not text; say so instead."""
    if OUTPUT_KEY in record and not isinstance(record[OUTPUT_KEY], str):
        raise UsageError(f"{path}: item [{index}]: \"{OUTPUT_KEY}\" must be a string (evaluation.py cannot score it)")


class Writer:
    """Appends predictions to `path` one line each, flushing every one; `close` ends the list.

    The file is first rewritten with the `kept` records alone (through a temporary file, so a kill
    at that moment leaves the old file intact), which also drops a half-written last line."""

    def __init__(self, path: str, kept: list[dict]):
        self.path = path
        self.count = 0
        tmp = f"{path}.tmp"
        try:
            # The new file is locked before it takes the old one's place, so a second run never
            # finds the name unlocked (runner.run holds the old file's lock until now).
            self._file = open(tmp, "w", encoding="utf-8")
            lock(self._file.fileno(), path)
            self._file.write("[")
            for record in kept:
                self._file.write(self._line(record))
                self.count += 1
            self._file.flush()
            os.replace(tmp, path)
        except OSError as e:
            raise MellowError(f"{path}: cannot write the predictions ({e.strerror or e})") from None

    def _line(self, record: dict) -> str:
        return ("\n" if self.count == 0 else ",\n") + json.dumps(record, ensure_ascii=False)

    def write(self, record: dict) -> None:
        try:
            self._file.write(self._line(record))
            self._file.flush()
        except OSError as e:
            raise MellowError(f"{self.path}: cannot write the predictions ({e.strerror or e})") from None
        self.count += 1

    def close(self) -> None:
        if not self._file.closed:
            self._file.write("\n]\n" if self.count else "]\n")
            self._file.close()
