"""Where the rows of a run of ask, compare or caption go: one stream (stdout or `-o FILE`, which
`--resume` continues) or a file per recording (`--output-dir`). Everything that can be refused is
refused when the destination opens, before the model loads; then the rows already there are left
out, and the rows that come are written as they come, each failure said on stderr.
"""

from __future__ import annotations

import dataclasses
import os
from collections import Counter
from dataclasses import dataclass
from typing import Sequence

from mellow_cli import events
from mellow_cli.errors import UsageError
from mellow_cli.io import outputs
from mellow_cli.io.formats import SUFFIXES, format_of_name
from mellow_cli.io.jobs import Job, row


@dataclass(frozen=True)
class Destination:
    """Where a run's rows go and in which format (None: the one `output`'s name says, else text)."""

    output: str | None = None
    output_dir: str | None = None
    fmt: str | None = None
    overwrite: bool = False
    resume: bool = False

    def settled(self) -> "Destination":
        """The same, with the format settled: `fmt`, else the one the output's extension names
        (`-o rows.csv` writes CSV), else text. A name and a format that disagree are a usage
        error: a file named .jsonl holding CSV would mislead the next reader."""
        named = None if self.output is None else format_of_name(self.output)
        if self.fmt is not None and named is not None and self.fmt != named:
            suffix = next(s for s, f in SUFFIXES.items() if f == self.fmt)
            raise UsageError(f"--output {self.output} names a {named} file, but --format is {self.fmt}: leave "
                             f"out --format (the name chooses {named}), or name the file {suffix}")
        return dataclasses.replace(self, fmt=self.fmt or named or "text")


@dataclass(frozen=True)
class Tally:
    """How a run's writing ended: rows written (failed ones among them), of how many."""

    total: int
    written: int = 0
    failed: int = 0
    interrupted: bool = False


def destination(to: Destination, jobs: list[Job], fields: Sequence[str]) -> "Stream | Files":
    """Where the rows of `jobs` go (Stream or Files), options that cannot go together refused, and
    a file per recording that cannot be. Nothing is opened yet: `open()` does, after the run has
    said whether its recordings can be read."""
    to = to.settled()
    if to.fmt in ("srt", "vtt") and to.output_dir is None and len({j.audio for j in jobs}) != 1:
        raise UsageError(f"--format {to.fmt} holds one recording's captions: with several, give --output-dir DIR "
                         "for a file each")
    if to.resume and to.overwrite:
        raise UsageError("--resume keeps the rows in --output and --overwrite replaces them: give one of the two")
    if to.output_dir is None:
        return Stream(to, fields)
    clash = "--output" if to.output is not None else "--resume (it works with --output)" if to.resume else None
    if clash:
        raise UsageError(f"--output-dir writes a file per recording: leave out {clash}")
    paths = outputs.per_input_paths(to.output_dir, [j.audio for j in jobs], to.fmt, to.overwrite)
    return Files(to, outputs.FilePerInput(paths, to.fmt, fields, to.overwrite))


class Stream:
    """Rows to stdout or one file: a batch's rows in the format, after those a resumed file holds."""

    by_recording = False  # a shard takes every N-th row (window), not every N-th recording

    def __init__(self, to: Destination, fields: Sequence[str]):
        self.to, self.fields = to, tuple(fields)
        self.opened: outputs.Opened | None = None

    def open(self) -> "Stream":
        """Open the file (or stdout) under outputs.open_rows's rules: a file that holds anything
        is kept for --resume only once proved this run's kind, replaced only with --overwrite."""
        to = self.to
        self.opened = outputs.open_rows(to.output, to.fmt, self.fields, resume=to.resume, overwrite=to.overwrite)
        return self

    @property
    def terminal_text(self) -> bool:
        """Whether the rows are plain text to stdout, where one free answer can be streamed."""
        return self.to.fmt == "text" and self.to.output is None

    def check_model(self, name: str) -> None:
        self.opened.check_model(name, self.to.output)

    def left(self, jobs: list[Job]) -> list[Job]:
        """The jobs whose rows the file does not hold yet, saying how many it holds."""
        if self.opened.fields and any(j.start for j in jobs):
            raise UsageError(f"{self.to.output}: its rows have no start and end (an older mellow-cli heard one clip "
                             "of each recording), and this run hears recordings in windows: resume with --duration "
                             "SECONDS (one span of each), or write to another --output")
        if self.opened.fields:
            events.note(f"{self.to.output}: its rows have no start and end (an older mellow-cli wrote them); the "
                        "rest are written alike")
        held = Counter(self.opened.done)
        todo = []
        for job, (key, _) in zip(jobs, outputs.numbered_keys(row(j) for j in jobs)):
            if held[key] > 0:
                held[key] -= 1
            else:
                todo.append(job)
        if self.opened.done:
            events.note(f"resuming: {len(jobs) - len(todo)} of {len(jobs)} rows already in {self.to.output}")
        return todo

    def write(self, results, verb: str, total: int, *, many: bool, times: bool) -> Tally:
        """Write each (row, error) of `results` as it comes (write_rows); `many`: a batch's rows,
        not one input's; `times`: text shows each row's span."""
        fields = self.opened.fields or self.fields  # an older file's rows go on in its layout
        writer = outputs.writer(self.to.fmt, self.opened.stream, many=many, fields=fields,
                                append=self.opened.append, folder=os.path.dirname(self.to.output or ""), times=times)
        resumable = self.to.output if self.to.fmt in outputs.RESUMABLE else None
        tally = write_rows(writer, results, verb, total, resumable)
        if not tally.interrupted:
            self.opened.keep()
        return tally

    def close(self) -> None:
        if self.opened is not None:
            self.opened.close()


class Files:
    """Rows to a file per recording (outputs.FilePerInput), created as their rows come."""

    by_recording = True  # each recording's file is one process's
    terminal_text = False

    def __init__(self, to: Destination, sink: outputs.FilePerInput):
        self.to, self.sink = to, sink

    def open(self) -> "Files":
        return self  # each file opens when its recording's first row comes

    def check_model(self, name: str) -> None:
        pass  # nothing is resumed

    def left(self, jobs: list[Job]) -> list[Job]:
        return jobs

    def write(self, results, verb: str, total: int, *, many: bool, times: bool) -> Tally:
        tally = write_rows(self.sink, results, verb, total, None)
        if not tally.interrupted:
            files = self.sink.files()
            events.note(f"wrote {len(files)} file{'' if len(files) == 1 else 's'} to {self.to.output_dir}")
        return tally

    def close(self) -> None:
        pass  # write_rows closes the files it wrote


def write_rows(writer, results, verb: str, total: int, resumable: str | None) -> Tally:
    """Write each (row, error) as it comes, errors to stderr, and a summary line. Ctrl-C stops
    after the row being written, says how far the run got (and, for a file `resumable` names, that
    --resume goes on), and the tally says it was interrupted."""
    written = failed = 0
    try:
        with events.progress(total, verb) as advance:
            for result, err in results:
                if err is not None:
                    events.error(str(err))
                    failed += 1
                writer.write(result)
                written += 1
                advance()
    except KeyboardInterrupt:
        where = f" to {resumable}; add --resume to continue" if resumable else ""
        events.error(f"interrupted after {written} of {total} rows{where}")
        return Tally(total, written, failed, interrupted=True)
    finally:
        writer.close()
    if total > 1:
        events.note(f"{verb} {written - failed} of {total} rows" + (f", {failed} failed" if failed else ""))
    return Tally(total, written, failed)
