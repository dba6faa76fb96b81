"""Rows of work and their results: a `Job` is one question about one pair of clips (or a window of
them), read from what the user gave (paths, `--input` JSON lines, `--pairs`), cut into windows and
shards; `row` is its result with the same keys in every format, so a script can parse any of them back.
"""

from __future__ import annotations

import csv
import io
import os
from dataclasses import dataclass
from typing import IO, Iterable, Sequence

from mellow_cli.errors import UsageError
from mellow_cli.files import beside_or_here
from mellow_cli.io.inputs import json_lines, parse_choices, read_text

# --- jobs: one question about one pair of clips (or one window of them) ---------------------------


@dataclass(frozen=True)
class Job:
    """One row of work. `audio2` is always set: a one-clip question pairs the clip with itself, as
    the model requires, and the row says so. `start`/`end` bound a --window (seconds)."""

    audio: str
    audio2: str
    question: str
    choices: tuple[str, ...] | None = None
    id: str | None = None
    start: float | None = None
    end: float | None = None
    # The other fields of an --input row, in its order, written back under their own names (a
    # gold "answer" among them: the model's then goes under "prediction").
    extra: tuple[tuple[str, object], ...] = ()


def jobs_for(paths: Iterable[str], question: str, choices: Sequence[str] | None = None) -> list[Job]:
    """The same question about each path, each clip paired with itself."""
    return [Job(p, p, question, tuple(choices) if choices else None) for p in paths]


def read_questions(name: str, default_choices: Sequence[str] | None = None, stdin: IO[str] | None = None) -> list[Job]:
    """`--input FILE` (`-` for stdin): JSON lines with `audio`, optional `audio2`, `question`,
    optional `choices` (a list, or one string split on "|") and optional `id`. A relative audio
    path is found beside FILE first, then in the current folder (files.beside_or_here). Any other field
    is kept, to be written back with the row; when any row has an `answer`, every row keeps one
    (null where it had none), so that the model's answers all go under `prediction`."""
    jobs = []
    records = list(json_lines(name, stdin))
    gold = any("answer" in obj for _, obj in records)
    folder = "" if name == "-" else os.path.dirname(name)
    for number, obj in records:
        where = f"{name}: line {number}"
        audio = obj.get("audio", obj.get("audio1"))
        question = obj.get("question")
        if not isinstance(audio, str) or not audio:
            raise UsageError(f"{where}: needs an \"audio\" path")
        if not isinstance(question, str) or not question.strip():
            raise UsageError(f"{where}: needs a non-empty \"question\"")
        audio2 = beside_or_here(folder, str(obj.get("audio2") or audio))
        audio = beside_or_here(folder, audio)
        choices = parse_choices(obj.get("choices"), f"{where}: choices")
        choices = choices or (tuple(default_choices) if default_choices else None)
        ident = obj.get("id")
        extra = {"answer": None} if gold else {}
        extra.update((k, v) for k, v in obj.items() if k not in _READ and k not in _OURS)
        jobs.append(Job(audio, str(audio2), question, choices, None if ident is None else str(ident),
                        extra=tuple(extra.items())))
    check_unique_ids([j.id for j in jobs], name)
    return jobs


def read_pairs(name: str, prompt: str, stdin: IO[str] | None = None) -> list[Job]:
    """`--pairs FILE` for compare: CSV or TSV with a header naming `audio1` and `audio2` (also
    `audio`, `a`/`b`), optional `prompt`/`question` and `id` columns; or JSON lines with the same
    keys (by the .jsonl extension)."""
    if name.endswith((".jsonl", ".ndjson")):
        records = list(json_lines(name, stdin))
    else:
        text = read_text(name, "pairs file", stdin)
        delimiter = "\t" if name.endswith(".tsv") or ("\t" in text.split("\n", 1)[0]) else ","
        reader = csv.DictReader(io.StringIO(text, newline=""), delimiter=delimiter)  # quoted newlines are text
        records = [(reader.line_num, r) for r in reader]
    jobs = []
    for number, rec in records:
        first = rec.get("audio1") or rec.get("audio") or rec.get("a")
        second = rec.get("audio2") or rec.get("b")
        if not first or not second:
            raise UsageError(f"{name}: line {number}: needs two recordings, in columns audio1 and audio2")
        question = rec.get("prompt") or rec.get("question") or prompt
        jobs.append(Job(first, second, question, None, rec.get("id") or None))
    check_unique_ids([j.id for j in jobs], name)
    return jobs


def check_unique_ids(ids: Sequence[str | None], source: str) -> None:
    """Ids name rows: two rows with one id (after reading 1 and "1" as the same) would make a
    resumed run skip one of them. Refused before any work is done."""
    first: dict[str, int] = {}
    for number, ident in enumerate(ids, 1):
        if ident is None:
            continue
        if str(ident) in first:
            raise UsageError(f"{source}: id {ident!r} is used by rows {first[str(ident)]} and {number}; "
                             "ids must be unique")
        first[str(ident)] = number


def row(job: Job, *, answer: str | None = None, scores: dict[str, float] | None = None, model: str | None = None,
        revision: str | None = None, error: str | None = None) -> dict:
    """A result row with every field; RowWriter keeps those the run uses. `start` and `end` are
    the span of the first recording heard; `scores` each choice's probability, keyed by the
    choice. An input row's own fields come after the question; its gold `answer` stays, and the
    model's is `prediction`."""
    out = {"id": job.id, "audio": job.audio, "audio2": job.audio2, "start": job.start, "end": job.end,
           "question": job.question, "choices": list(job.choices) if job.choices else None}
    out.update(job.extra)
    if "answer" in out:
        out["prediction"] = answer
    else:
        out["answer"] = answer
    out.update(scores=scores, model=model, revision=revision, error=error)
    return out


ALL_FIELDS = ("id", "audio", "audio2", "start", "end", "question", "choices", "answer", "prediction", "scores",
              "model", "revision", "error")
FIELDS = ("audio", "audio2", "start", "end", "question", "answer", "model", "revision", "error")  # in every row
_READ = ("audio", "audio1", "audio2", "question", "choices", "id")  # the input fields a Job holds
_OURS = ("start", "end", "prediction", "scores", "model", "revision", "error")  # a row's own: not taken as input


def fields_for(jobs: Sequence[Job]) -> tuple[str, ...]:
    """The row fields a run writes: FIELDS, plus id / choices, scores when any job has them, and
    an input file's own fields after the question (with `prediction` after a gold `answer`), so a
    plain caption run's rows stay short and every row of one run has the same keys. They depend
    on the inputs alone, not on how long the recordings are: they are known (and a file to
    resume checked against them) before any recording is cut into windows."""
    used = set(FIELDS)
    if any(j.id is not None for j in jobs):
        used.add("id")
    if any(j.choices for j in jobs):
        used |= {"choices", "scores"}
    extra = list(dict.fromkeys(k for j in jobs for k, _ in j.extra if k != "answer"))
    if any(k == "answer" for j in jobs for k, _ in j.extra):
        used.add("prediction")
    fields = [f for f in ALL_FIELDS if f in used]
    at = fields.index("answer")
    return tuple(fields[:at] + extra + fields[at:])


# --- sharing a run out, and picking it up again ---------------------------------------------------


def parse_shard(text: str | None) -> tuple[int, int] | None:
    """`--shard I/N` (1 <= I <= N) -> (I, N); None when no shard was asked for."""
    if text is None:
        return None
    try:
        i, n = (int(part) for part in text.split("/"))
    except ValueError:
        raise UsageError(f"--shard {text}: expected I/N, e.g. 1/4 (the first of four shards)") from None
    if not 1 <= i <= n:
        raise UsageError(f"--shard {text}: I must be between 1 and N")
    return i, n


def take_shard(items: list, shard: tuple[int, int] | None) -> list:
    """Every N-th item from the I-th: shards are disjoint, cover the list, differ in size by at
    most one, and depend only on the list's order, so N processes given the same inputs and
    `--shard 1/N` ... `--shard N/N` share the work exactly."""
    if shard is None:
        return items
    i, n = shard
    return items[i - 1 :: n]
