"""What every multiple-choice benchmark shares: the item the runner works on, the prompt the
model is asked, the texts scored in `--mode choices`, and the data file's fingerprint.

A benchmark module (mmau.py, qa.py) only turns its file into `Item`s; prompts, prediction,
predictions files and scoring are common. The prompt follows the reference's examples
(soham97/mellow README and examples/mcq.py): the question, then the options lettered in line,

    what is the primary sound event present in the clip? a) dog barking b) chirping birds ...

and the reference's own MMAU script scores an answer by the letter before ")", so the model was
expected to answer "b) chirping birds". `--mode choices` therefore scores each option written
that way, lower-cased like every training answer (the reference's loaders call `answer.lower()`),
and records the option's original text.
"""

from __future__ import annotations

import hashlib
import string
from dataclasses import dataclass

from mellow_cli.errors import UsageError
from mellow_cli.files import beside_or_here
from mellow_cli.io.inputs import json_kind

LETTERS = string.ascii_lowercase


@dataclass(frozen=True)
class Item:
    """One question of a benchmark, ready to predict."""

    key: str  # unique within the file: what --resume and duplicate checks compare
    record: dict  # the item as read (choices as a list); written back with `model_output` added
    audio: str  # path of the clip, resolved against the audio folder
    audio2: str | None  # a second clip, or None: the clip is paired with itself
    question: str
    choices: tuple[str, ...]
    answer: str


def prompt(question: str, choices: tuple[str, ...] | list[str]) -> str:
    """The question with its options lettered in line, as the reference's examples ask."""
    options = " ".join(f"{LETTERS[i]}) {c}" for i, c in enumerate(choices))
    return f"{question.strip()} {options}"


def candidates(choices: tuple[str, ...] | list[str]) -> list[str]:
    """The answer texts scored in --mode choices, one per option, in order."""
    return [f"{LETTERS[i]}) {c}".lower() for i, c in enumerate(choices)]


def check_choice_count(choices, where: str) -> None:
    if len(choices) > len(LETTERS):
        raise UsageError(f"{where}: {len(choices)} choices; at most {len(LETTERS)} can be lettered")


def resolve(root: str, path: str) -> str:
    """`path` as the data file names it (e.g. "./test-mini-audios/x.wav"): under `root`, else
    under the current folder (files.beside_or_here: the rule `mellow ask --input` follows too)."""
    return beside_or_here(root, path)


def sha256(path: str) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def answers_outside_choices(items: list[Item]) -> int:
    """How many items have an answer that is not literally one of their choices: legal (the
    matcher compares words), but often a typo in a hand-made file, so the CLI warns."""
    return sum(item.answer not in item.choices for item in items)


def check_unique(keys: list[str], path: str, name=lambda i: f"item [{i}]") -> None:
    """Two items with one id would be predicted once and scored twice: refuse the file."""
    first: dict[str, int] = {}
    for index, key in enumerate(keys):
        if key in first:
            raise UsageError(f"{path}: {name(index)} repeats id {key} of {name(first[key])}")
        first[key] = index


def where(path: str, index: int, obj) -> str:
    """How messages name an item: its 0-based position (as jq's `.[i]`) and its id if it has one."""
    ident = obj.get("id") if isinstance(obj, dict) else None
    return f"{path}: item [{index}]" + (f" (id {ident})" if ident not in (None, "") else "")


def check_record(obj, index: int, path: str, required: tuple[str, ...]) -> dict:
    """One item, checked: an object with the keys we use, of the types we use them as."""
    if not isinstance(obj, dict):
        raise UsageError(f"{path}: item [{index}] is a JSON {json_kind(obj)}, expected an object")
    at = where(path, index, obj)
    missing = [k for k in required if k not in obj]
    if missing:
        raise UsageError(f"{at}: missing key{'s' if len(missing) > 1 else ''} {', '.join(missing)}")
    for key in ("audio_id", "question", "answer", "task", "difficulty"):
        if key in obj and not isinstance(obj[key], str):
            raise UsageError(f"{at}: \"{key}\" must be a string")
    if "id" in obj and not isinstance(obj["id"], (str, int)):
        raise UsageError(f"{at}: \"id\" must be a string or a number")
    sub = obj.get("sub-category")
    if sub is not None and not isinstance(sub, str):
        raise UsageError(f"{at}: \"sub-category\" must be a string")
    choices = obj.get("choices")
    if "choices" in required or choices is not None:
        if not isinstance(choices, list) or not all(isinstance(c, str) for c in choices):
            raise UsageError(f"{at}: \"choices\" must be a list of strings")
        if len(choices) < 2:
            raise UsageError(f"{at}: needs at least two choices")
        check_choice_count(choices, at)
    return obj
