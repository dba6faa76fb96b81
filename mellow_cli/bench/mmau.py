"""MMAU (Sakshi et al., "MMAU: A Massive Multi-Task Audio Understanding and Reasoning
Benchmark"; data and evaluation.py at GitHub Sakshi113/MMAU): read and check the official JSON.

The file is a JSON list of items with 11 keys: id, audio_id ("./test-mini-audios/<id>.wav"),
question, choices (2 to 8 strings; a choice may repeat), answer (the text of the right choice),
dataset, task (sound / music / speech), split, category (a string, or for a few items a
one-element list), sub-category and difficulty (easy / medium / hard). We need the seven keys
below; the rest are carried into the predictions untouched, as evaluation.py expects.
"""

from __future__ import annotations

from mellow_cli.io.inputs import json_list
from mellow_cli.errors import UsageError
from mellow_cli.bench import mellow
from mellow_cli.bench.items import Item, check_record, check_unique, resolve
from mellow_cli.bench.scoring import OFFICIAL

NAME = "mmau"
REQUIRED = ("id", "audio_id", "question", "choices", "answer", "task", "difficulty")
SCORE_REQUIRED = ("answer", "choices", "task", "difficulty")  # what evaluation.py reads to score
GROUPS = ("task", "difficulty", "sub-category")
SCORERS = {"mmau": OFFICIAL, "mellow": mellow.MMAU}  # --scorer: evaluation.py, or the Mellow authors' metrics/mmau.py


def key(record: dict) -> str:
    return str(record["id"])


def read(path: str, audio_dir: str) -> list[Item]:
    """The items of an MMAU file, their audio resolved under `audio_dir`."""
    records = [check_record(obj, i, path, REQUIRED) for i, obj in enumerate(json_list(path, "data file"))]
    if not records:
        raise UsageError(f"{path}: the list holds no items")
    keys = [key(r) for r in records]
    check_unique(keys, path)
    return [Item(k, r, resolve(audio_dir, r["audio_id"]), None, r["question"], tuple(r["choices"]), r["answer"])
            for k, r in zip(keys, records)]
