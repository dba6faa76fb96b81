"""Result rows in each output format: how one row is written as text, json, jsonl, csv, tsv, srt,
vtt or html. Which file the rows go to, its lock and `--resume` are outputs.py's.

Rows are plain dicts with the same keys in every format, so a script can parse any of them back.
"""

from __future__ import annotations

import contextlib
import csv
import json
import math
import signal
import threading
from typing import IO, Sequence

from mellow_cli.errors import UsageError

FORMATS = ("text", "json", "jsonl", "csv", "tsv", "srt", "vtt", "html")


# What an output file's name says it holds: `-o rows.csv` writes CSV without --format.
SUFFIXES = {".txt": "text", ".json": "json", ".jsonl": "jsonl", ".ndjson": "jsonl", ".csv": "csv", ".tsv": "tsv",
            ".srt": "srt", ".vtt": "vtt", ".html": "html", ".htm": "html"}


def format_of_name(path: str) -> str | None:
    """The format a file name's extension names (SUFFIXES), None for any other name."""
    import os

    return SUFFIXES.get(os.path.splitext(path)[1].lower())


def check_format(fmt: str) -> None:
    """Refuse a format name that is not one of FORMATS."""
    if fmt not in FORMATS:
        raise UsageError(f"unknown format {fmt!r}: use {', '.join(FORMATS)}")


class RowWriter:
    """Writes result rows in one format and flushes each, so `tail -f` and pipes see them at once.

    The shape follows the input, never how many rows it gives: `many` (a batch: a folder, a
    list, several recordings) or one recording (or pair) named on the command line, whose
    windows are still one input. text: the answer, after `[id] audio [audio2]` in a batch and
    `start end` when `times` (recordings heard in windows); failed rows are left out (their error
    went to stderr). json: a batch is one array of rows; one input is one object, its row, or
    for a recording heard in several windows the fields they share and `windows`, the rows'
    own fields (start, end, answer, scores, error), written by `close()`. jsonl: one object per
    line. csv/tsv: a header, then one line per row (choices joined with "|", scores as
    `choice=probability|...`). srt/vtt: one timed cue per row. (html, one page of every row, is
    html.py's PageWriter.) A Ctrl-C that lands during a write waits for the row to be complete.
    """

    def __init__(self, fmt: str, stream: IO[str], many: bool = True, fields: Sequence[str] = (),
                 append: bool = False, times: bool = False):
        check_format(fmt)
        from mellow_cli.io.jobs import FIELDS

        self.fmt, self.stream, self.many, self.fields = fmt, stream, many, tuple(fields or FIELDS)
        self.times = times
        self._count = 0
        self._csv = None
        self._kept: list[dict] = []  # one input's json rows, written whole by close()
        if fmt in ("csv", "tsv"):
            self._csv = csv.DictWriter(stream, self.fields, delimiter="," if fmt == "csv" else "\t",
                                       lineterminator="\n", extrasaction="ignore")
            if not append:
                self._csv.writeheader()
        elif fmt == "json" and many:
            stream.write("[")
        elif fmt == "vtt":
            stream.write("WEBVTT\n\n")

    def write(self, r: dict) -> None:
        with _finish_before_interrupt():
            self._write(r)
            self._count += 1
            self.stream.flush()

    def _write(self, r: dict) -> None:
        kept = {k: r.get(k) for k in self.fields}
        if self.fmt == "text":
            if r["error"] is None:
                self.stream.write(self._text_line(r))
        elif self.fmt == "jsonl":
            self.stream.write(json_text(kept) + "\n")
        elif self.fmt == "json":
            if self.many:
                self.stream.write(("\n" if self._count == 0 else ",\n") + json_text(kept))
            else:
                self._kept.append(kept)
        elif self.fmt in ("srt", "vtt"):
            if r["error"] is None:
                self.stream.write(_cue(self.fmt, self._count + 1, r))
        else:
            self._csv.writerow({k: _flat(k, v) for k, v in kept.items()})

    def _text_line(self, r: dict) -> str:
        parts = []
        if self.many:
            parts += [r["id"]] if r.get("id") is not None else []
            parts.append(r["audio"])
            if r["audio2"] != r["audio"]:
                parts.append(r["audio2"])
        if self.times:
            parts += ["" if r.get("start") is None else f"{r['start']:g}", "" if r.get("end") is None else f"{r['end']:g}"]
        return "\t".join(parts + [said(r)]) + "\n"

    def close(self) -> None:
        if self.fmt == "json" and self.many:
            self.stream.write("\n]\n" if self._count else "]\n")
        elif self.fmt == "json" and self._kept:
            self.stream.write(json_text(one_input(self._kept)) + "\n")
        self.stream.flush()


# A row's own fields when it is one window of a recording: the rest its windows share.
WINDOW_FIELDS = ("start", "end", "answer", "prediction", "scores", "error")


def one_input(rows: Sequence[dict]) -> dict:
    """The JSON object of one input: its row, or, for a recording heard in several windows, the
    fields the windows share and `windows`, each window's own fields (WINDOW_FIELDS), as whisper's
    JSON holds a file's segments. A gold `answer` of an input is shared, not a window's."""
    if len(rows) == 1:
        return dict(rows[0])
    own = [k for k in WINDOW_FIELDS if k in rows[0] and not (k == "answer" and "prediction" in rows[0])]
    shared = {k: v for k, v in rows[0].items() if k not in own}
    return {**shared, "windows": [{k: r[k] for k in own} for r in rows]}


def said(r: dict) -> str:
    """What the model answered: `prediction` when the row also holds a gold `answer`."""
    return r["prediction"] if "prediction" in r else r["answer"]


def json_text(obj: dict) -> str:
    """One JSON row; a NaN or infinity (never valid JSON) becomes null rather than a broken file."""
    try:
        return json.dumps(obj, ensure_ascii=False, allow_nan=False)
    except ValueError:
        return json.dumps(_finite(obj), ensure_ascii=False)


def _finite(value):
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_finite(v) for v in value]
    return value


def _flat(key: str, value) -> str:
    if value is None:
        return ""
    if key == "choices":
        return "|".join(value)
    if key == "scores":
        return "|".join(f"{choice}={p:.4f}" for choice, p in value.items() if p is not None)
    if isinstance(value, (dict, list, bool)):  # an input row's own field: as JSON, read back the same way
        return json.dumps(_finite(value), ensure_ascii=False)
    return value


def _cue(fmt: str, number: int, r: dict) -> str:
    sep = "," if fmt == "srt" else "."
    start, end = _timestamp(r.get("start") or 0.0, sep), _timestamp(r.get("end") or 0.0, sep)
    head = f"{number}\n" if fmt == "srt" else ""
    return f"{head}{start} --> {end}\n{said(r)}\n\n"


def _timestamp(seconds: float, sep: str) -> str:
    ms = round(seconds * 1000)
    h, ms = divmod(ms, 3_600_000)
    m, ms = divmod(ms, 60_000)
    s, ms = divmod(ms, 1000)
    return f"{h:02d}:{m:02d}:{s:02d}{sep}{ms:03d}"


@contextlib.contextmanager
def _finish_before_interrupt():
    """Hold a Ctrl-C (SIGINT) until the block ends, then raise it: a row is written whole or not
    at all, so `--resume` never meets half a row from an interrupt."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    caught = []
    previous = signal.signal(signal.SIGINT, lambda signum, frame: caught.append(signum))
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)
        if caught:
            raise KeyboardInterrupt
