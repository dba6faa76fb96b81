"""`mellow bench qa FILE`: any multiple-choice set as JSON lines, scored like MMAU (or as the
Mellow authors score their question-answering sets, mellow.py).

Each line: `audio` (a path, relative to --audio-root), optional `audio2` (a second clip; without
it the clip is paired with itself), `question`, `choices` (a list, or one string "a|b|c"),
`answer` (the text of the right choice) and optional `id`. Any other keys are kept, and `task`,
`difficulty` and `sub-category`, when present, get their own accuracy tables. This is the shape
for the paper's other sets (Clotho / AudioCaps MCQ, audio entailment) or a home-made one.
"""

from __future__ import annotations

from mellow_cli.io.inputs import CHOICES_RULE, json_lines, parse_choices
from mellow_cli.errors import UsageError
from mellow_cli.bench import mellow
from mellow_cli.bench.items import Item, check_choice_count, check_unique, resolve
from mellow_cli.bench.scoring import OFFICIAL

NAME = "qa"
GROUPS = ("task", "difficulty", "sub-category")
SCORE_REQUIRED = ("answer", "choices")
# --scorer: MMAU's evaluation.py, or the Mellow authors' metrics/aqa.py (letter, or yes/no by substring)
SCORERS = {"mmau": OFFICIAL, "mellow": mellow.AQA, "mellow-binary": mellow.BINARY}


def key(record: dict) -> str:
    """A row's id, or its line number in the file when it has none."""
    return str(record["id"]) if record.get("id") not in (None, "") else f"line {record['line']}"


def read_rows(path: str) -> list[dict]:
    """The rows, checked, choices as lists, each with its line number under `line`."""
    rows = [check(obj, number, path) for number, obj in json_lines(path)]
    if not rows:
        raise UsageError(f"{path}: no questions in the file")
    return rows


def check(obj, number: int, path: str) -> dict:
    at = f"{path}: line {number}"
    if not isinstance(obj, dict):
        raise UsageError(f"{at}: expected a JSON object")
    if "audio" not in obj and "audio1" in obj:  # the training format's name for it
        obj = {**obj, "audio": obj["audio1"]}
    for field in ("audio", "question", "answer"):
        if not isinstance(obj.get(field), str) or not obj[field].strip():
            raise UsageError(f"{at}: needs a non-empty \"{field}\" string")
    if obj.get("audio2") is not None and not isinstance(obj["audio2"], str):
        raise UsageError(f"{at}: \"audio2\" must be a path")
    choices = parse_choices(obj.get("choices"), f"{at}: choices")
    if choices is None:
        raise UsageError(f"{at}: choices: {CHOICES_RULE}")
    check_choice_count(choices, at)
    return {**obj, "choices": list(choices), "line": number}


def read(path: str, audio_root: str) -> list[Item]:
    rows = read_rows(path)
    keys = [key(r) for r in rows]
    check_unique(keys, path, lambda i: f"line {rows[i]['line']}")
    return [Item(k, r, resolve(audio_root, r["audio"]), resolve(audio_root, r["audio2"]) if r.get("audio2") else None,
                 r["question"], tuple(r["choices"]), r["answer"]) for k, r in zip(keys, rows)]
