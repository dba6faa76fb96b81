"""MuChoMusic (Weck, Manco et al., ISMIR 2024; data and code at GitHub mulab-mir/muchomusic): the
music benchmark TinyMU reports, read from its published `muchomusic.csv`.

Each row holds a question, the right answer and three distractors (`correct_answer`,
`distractor_1_answer` .. `distractor_3_answer`), the source `dataset` (`sdd`: the Song Describer
Dataset; `musiccaps`) and `dataset_identifier`, the `genre`, and lists of `music_knowledge` and
`music_reasoning` categories. The authors' code (muchomusic_eval/utils.py) finds a row's audio
through each dataset's own metadata, laid out under their `data/` folder; so does this reader,
under --audio-dir:

    sdd/song_describer.csv, sdd/audio/<its path, .mp3 -> .2min.mp3>
    musiccaps/musiccaps-public.csv, musiccaps/audio/[<ytid>]-[<start_s>-<end_s>].wav

The authors shuffle each row's four options at random (prepare_prompts.py); here each row's
order is drawn from a generator seeded by its identifier, so every run, and every model, sees
the same order. Their prompt asks "Question: ... Options: (A) .. (D) .. The correct answer is: "
and their scorer (muchomusic_eval/scoring.py) reads the letter the answer names, or else the
option whose text it contains: `--scorer muchomusic` counts the same way.
"""

from __future__ import annotations

import ast
import csv
import io
import os
import random

from mellow_cli.bench.items import Item, check_unique, resolve
from mellow_cli.bench.scoring import OFFICIAL, OUTPUT_KEY, Scorer
from mellow_cli.errors import UsageError
from mellow_cli.io.inputs import read_text

NAME = "muchomusic"
REQUIRED = ("question", "dataset", "dataset_identifier", "correct_answer", "distractor_1_answer",
            "distractor_2_answer", "distractor_3_answer")
SCORE_REQUIRED = ("answer", "choices")
GROUPS = ("genre", "music_knowledge", "music_reasoning")
LETTERS = ("A", "B", "C", "D")
PREFIX = "The correct answer is:"


def prompt(question: str, choices) -> str:
    """The authors' prompt (prepare_prompts.py `get_prompts`, no in-context examples)."""
    options = "".join(f"({LETTERS[i]}) {c} " for i, c in enumerate(choices))
    return f"Question: {question}\n Options: {options}\n {PREFIX} "


def picked(output: str, choices) -> int:
    """The option an answer names, as the authors' `extract_responses` reads it: after the
    prefix, the one letter of A-D it holds, else the first option whose text it contains; -1:
    none."""
    output = output.split(PREFIX)[-1].strip()
    letters = set(LETTERS) & set(output)
    if len(letters) == 1:
        return LETTERS.index(letters.pop())
    text = output.lower().strip()
    return next((i for i, c in enumerate(choices) if c.lower().strip() in text), -1)


def _correct(record: dict) -> bool:
    choices = record["choices"]
    return picked(record[OUTPUT_KEY], choices) == choices.index(record["answer"])


MUCHOMUSIC = Scorer("muchomusic", "the authors' scorer (muchomusic_eval/scoring.py)", _correct, every_item=True)
SCORERS = {"muchomusic": MUCHOMUSIC, "mmau": OFFICIAL}


def key(record: dict) -> str:
    return f"{record['dataset']}:{record['dataset_identifier']}:{record['question']}"


def read(path: str, audio_dir: str) -> list[Item]:
    rows = list(csv.DictReader(io.StringIO(read_text(path, "data file"), newline="")))
    if not rows:
        raise UsageError(f"{path}: no questions in the file")
    missing = [f for f in REQUIRED if f not in rows[0]]
    if missing:
        raise UsageError(f"{path}: not MuChoMusic's file (no column {missing[0]})")
    audio = _AudioIndex(audio_dir)
    items = []
    for number, row in enumerate(rows, 2):
        options = [row["correct_answer"], *(row[f"distractor_{i}_answer"] for i in (1, 2, 3))]
        random.Random(f"{row['dataset']}:{row['dataset_identifier']}").shuffle(options)
        record = {**row, "choices": options, "answer": row["correct_answer"],
                  "music_knowledge": _categories(row.get("music_knowledge")),
                  "music_reasoning": _categories(row.get("music_reasoning")), "line": number}
        items.append(Item(key(record), record, audio.path(row, f"{path}: line {number}"), None, row["question"],
                          tuple(options), row["correct_answer"]))
    check_unique([i.key for i in items], path)
    return items


def _categories(text: str | None) -> list[str]:
    """A cell like "['Melody', 'Harmony']" (a Python list as text, read without evaluating code)."""
    try:
        value = ast.literal_eval(text) if text else []
    except (ValueError, SyntaxError):
        return [text]
    return [str(v) for v in value] if isinstance(value, list) else [str(value)]


class _AudioIndex:
    """Each dataset's metadata, read once, to find a row's recording as the authors' code does."""

    def __init__(self, root: str):
        self.root = root
        self._tables: dict[str, list[dict]] = {}

    def _table(self, name: str, where: str) -> list[dict]:
        if name not in self._tables:
            path = os.path.join(self.root, name)
            if not os.path.isfile(path):
                raise UsageError(f"{where}: finding its audio needs {path} (the dataset's metadata, as the "
                                 "authors' data/ folder holds it): pass --audio-dir that folder")
            self._tables[name] = list(csv.DictReader(io.StringIO(read_text(path, "metadata file"), newline="")))
        return self._tables[name]

    def path(self, row: dict, where: str) -> str:
        ident = row["dataset_identifier"].removesuffix(".json")
        if row["dataset"] == "sdd":
            found = [r for r in self._table("sdd/song_describer.csv", where) if r.get("track_id") == ident]
            if found:
                return resolve(self.root, os.path.join("sdd", "audio", found[0]["path"].replace(".mp3", ".2min.mp3")))
        elif row["dataset"] == "musiccaps":
            ytid = "_".join(ident.split("_")[:-1])
            found = [r for r in self._table("musiccaps/musiccaps-public.csv", where) if r.get("ytid") == ytid]
            if found:
                name = f"[{ytid}]-[{int(float(found[0]['start_s']))}-{int(float(found[0]['end_s']))}].wav"
                return resolve(self.root, os.path.join("musiccaps", "audio", name))
        else:
            raise UsageError(f"{where}: unknown dataset {row['dataset']!r} (MuChoMusic's are sdd and musiccaps)")
        raise UsageError(f"{where}: {row['dataset']} has no recording {ident!r} in its metadata")
