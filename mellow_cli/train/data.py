"""Training rows: reading them, checking them, and turning them into waveform batches.

This module owns the data side of `mellow train`: a file of question/answer rows in, batches of
each row's clips, question and answer out. Only the training code imports it.

Two file formats, told apart by their first non-blank character:

- **JSON lines** (`[` not first): one object per line with `audio1` (alias `audio`), optional
  `audio2`, `question`, `answer`, optional `choices` (a list of strings or one string "a|b|c") and
  optional `id`. Blank lines are skipped; messages name a row by its line (`rows.jsonl: line 17`).
- **A JSON list** (`[` first): ReasonAQA as published (Deshmukh et al., arXiv 2503.08540; the
  train/val/test JSONs on Zenodo). Messages name a row by its 0-based place in the list, as jq's
  `.[i]` does (`train.json: item [16]`).
  The field names below are the ones the reference repository (soham97/mellow) documents in its
  README and reads in `data/audiotext_dataset.py` and `data/audiotext_eval_dataset.py`: they are
  confirmed from the reference's own loaders, not from the Zenodo archive itself (the reference
  README links record 15036628; record 15002886 is cited for the dataset too).

  | ReasonAQA field | QARow field | how |
  | --- | --- | --- |
  | `filepath1` | `audio1` | resolved against the audio root |
  | `filepath2` | `audio2` | `""` (every task but audio difference) -> None: clip 1 twice |
  | `input` | `question` | lower-cased; the keyword prompts below are spelled out |
  | `answer` | `answer` | lower-cased |
  | `caption1`, `caption2` | `answer` | only for the caption keyword prompts below |
  | `taskname`, `subtype` | - | ignored (dataset and task family) |
  | - | `choices` | None: ReasonAQA writes multiple-choice options inside `input` |
  | - | `id` | None |

  Keyword prompts in `input`, mapped the way the reference's evaluation loader does (its training
  loader instead draws one of ~100 paraphrases at random, which would make rows change between
  epochs; `read_rows(..., text="official")` reads them that way: templates.py, drawn per epoch):

  | `input` | question | answer |
  | --- | --- | --- |
  | explain the difference in few words | explain the difference between the two audios in few words. | `answer` |
  | explain the difference in a sentence | explain the difference between the two audios in one extended sentence. | `answer` |
  | explain the difference in detail | explain the difference between the two audios in detail. | `answer` |
  | caption first audio | caption the audio | `caption1` |
  | caption second audio | caption the second audio | `caption2` |
  | caption both audios | caption both audios | "the audio 1 is <caption1>. the audio 2 is <caption2>." |

  Both formats accept both sets of names, so a JSONL of ReasonAQA-shaped rows also reads.

- **MusicSkills-3.5M's JSON lists** (TinyMU's training data, HF dataset AndreasXi/MusicSkills-3.5M;
  read as the authors' `AudioDataset` reads them): `file_name` -> `audio1` (resolved as our paths
  are), `input_text` -> `question`, `target_text` -> `answer`, both as written; `dataset` and `task`
  are ignored (the authors pick each file's audio folder by its first row's `dataset`: here it is
  the audio root, or the data file's folder).

Relative audio paths are resolved against `audio_root`, or, without one, against the folder of the
data file (so a dataset folder can be moved or read from anywhere).

The window policy: validation and evaluation take the inference window (the start of the
recording, fitted to a clip as the model's family does). For training, a recording longer than a
clip gives a random window of a clip's length, as in the reference, drawn from a generator seeded by (seed, epoch, row index): the same epoch always
sees the same windows, so a resumed run reads exactly what an uninterrupted one would have.
"""

from __future__ import annotations

import os
import random
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from mellow_cli.io.audio import audio_duration, load_audio
from mellow_cli.io.inputs import choices_problem, json_kind, json_lines, json_list, read_choices, read_text
from mellow_cli.errors import AudioError, UsageError
from mellow_cli.train.templates import OfficialText, first, realize


@dataclass(frozen=True)
class QARow:
    audio1: str  # path, already resolved against the audio root
    audio2: str | None  # None: a one-clip question; the model hears audio1 twice
    question: str
    answer: str
    choices: tuple[str, ...] | None = None  # when present, the answer is one of them
    id: str | None = None
    line: int = 0  # 1-based line of a JSONL, or 0-based position in a JSON list (as jq's `.[i]`)
    in_list: bool = False  # read from a JSON list
    official: OfficialText | None = None  # text drawn anew each epoch (templates.py); question/answer: one draw
    source: str = field(default="", compare=False)  # the file it was read from, for messages

    @property
    def clips(self) -> int:
        return 1 if self.audio2 is None else 2

    @property
    def where(self) -> str:
        return _place(self.line, self.in_list)


def _place(line: int, in_list: bool) -> str:
    """How messages name a row: `line 17`, or `item [16]` in a JSON list."""
    return f"item [{line}]" if in_list else f"line {line}"


@dataclass(frozen=True)
class BadRow:
    where: str  # QARow.where
    problem: str  # every problem of the row, joined by "; "


# ---------------------------------------------------------------- reading

# ReasonAQA's keyword prompts -> (question, how to build the answer from the item).
_REASONAQA_PROMPTS: dict[str, tuple[str, Callable[[dict], object]]] = {
    "explain the difference in few words": (
        "explain the difference between the two audios in few words.", lambda d: d.get("answer")),
    "explain the difference in a sentence": (
        "explain the difference between the two audios in one extended sentence.",
        lambda d: d.get("answer")),
    "explain the difference in detail": (
        "explain the difference between the two audios in detail.", lambda d: d.get("answer")),
    "caption first audio": ("caption the audio", lambda d: d.get("caption1")),
    "caption second audio": ("caption the second audio", lambda d: d.get("caption2")),
    "caption both audios": (
        "caption both audios",
        lambda d: f"the audio 1 is {_sentence(d.get('caption1'))} the audio 2 is {_sentence(d.get('caption2'))}"),
}


def read_rows(path: str | os.PathLike, audio_root: str | os.PathLike | None = None,
              text: str = "mellow") -> list[QARow]:
    """Every row of a JSONL or ReasonAQA JSON file, paths resolved, nothing checked yet. With
    `text="official"`, rows in the official format (`input`, no `question`) keep their text
    fields for templates.realize, as the authors' training loader reads them.

    A file that is not JSON, or a row that is not an object or has a field of the wrong type, is
    a UsageError naming the file and line (or item); missing or empty fields are left for
    validate_rows to report with the other bad rows.
    """
    name = os.fspath(path)
    body = read_text(name)
    root = Path(audio_root) if audio_root is not None else Path(name).resolve().parent
    if body.lstrip().startswith("["):
        return [_row(obj, index, True, name, root, text) for index, obj in enumerate(json_list(name, text=body))]
    return [_row(obj, line, False, name, root, text) for line, obj in json_lines(name, text=body)]


def _row(obj: object, line: int, in_list: bool, name: str, root: Path, text: str) -> QARow:
    where = f"{name}: {_place(line, in_list)}"
    if not isinstance(obj, dict):
        raise UsageError(f"{where}: expected a JSON object, got {json_kind(obj)}")
    official = None
    if text == "official" and "question" not in obj and "input" in obj:
        official = OfficialText(*(_text(obj.get(k), where, k) for k in ("input", "answer", "caption1", "caption2")))
        question, answer = realize(official, first)
    else:
        question, answer = _question_answer(obj, where)
    ident = obj.get("id")
    return QARow(
        audio1=_path(obj, ("audio1", "audio", "file_name"), "filepath1", root, where),
        audio2=_path(obj, ("audio2",), "filepath2", root, where) or None,
        question=question,
        answer=answer,
        choices=read_choices(obj.get("choices"), f"{where}: choices"),
        id=None if ident is None else str(ident),
        line=line,
        in_list=in_list,
        official=official,
        source=name,
    )


def _question_answer(obj: dict, where: str) -> tuple[str, str]:
    if "question" not in obj and "input_text" in obj:  # MusicSkills: the text as written
        return _text(obj.get("input_text"), where, "input_text"), _text(obj.get("target_text"), where, "target_text")
    if "question" in obj or "input" not in obj:
        return _text(obj.get("question"), where, "question"), _text(obj.get("answer"), where, "answer")
    # ReasonAQA: `input` holds the prompt, sometimes a keyword standing for a fixed prompt.
    prompt = _text(obj.get("input"), where, "input")
    question, answer_of = _REASONAQA_PROMPTS.get(prompt.strip().lower(), (prompt, lambda d: d.get("answer")))
    answer = _text(answer_of(obj), where, "answer")
    return question.lower(), answer.lower()


def _path(obj: dict, ours: tuple[str, ...], theirs: str, root: Path, where: str) -> str:
    """A clip's path, resolved: our fields (and MusicSkills' `file_name`) as written (`~`
    expanded), else the official field as
    the authors read it: joined to the root, then every backslash made a separator."""
    for key in ours:
        if obj.get(key) not in (None, ""):
            return _resolve(_text(obj[key], where, key), root)
    path = _text(obj.get(theirs), where, theirs)
    return str(Path(os.path.join(root, path).replace("\\", "/"))) if path else ""


def _text(value: object, where: str, field: str) -> str:
    """A string field; a number is taken as its text (an answer of 3 means "3")."""
    if value is None:
        return ""
    if isinstance(value, bool) or not isinstance(value, (str, int, float)):
        raise UsageError(f"{where}: \"{field}\" must be a string, got {type(value).__name__}")
    return str(value)


def _sentence(value: object) -> str:
    text = str(value or "").strip().lower()
    return text if text.endswith(".") else text + "."


def _resolve(path: str, root: Path) -> str:
    if not path:
        return ""
    p = Path(path).expanduser()
    return str(p if p.is_absolute() else root / p)


# ---------------------------------------------------------------- checking


def validate_rows(
    rows: Sequence[QARow],
    check_audio: bool = True,
    workers: int = 2,
    progress: Callable[[int], None] | None = None,
) -> tuple[list[QARow], list[BadRow]]:
    """Split rows into usable ones and bad ones, each bad row with all its problems.

    Problems: empty question or answer; fewer than two choices, repeated choices or an answer
    that is not one of them; and, with `check_audio`, a missing or undecodable clip. Each distinct
    path's first seconds are decoded once (at the file's own rate: whatever the model, a file that
    decodes there decodes) in a pool of
    `workers` threads: decoding is file I/O and C code that releases the GIL. `progress(n)` is
    called as files finish. Without `check_audio` no file is opened.
    """
    audio_problems = _audio_problems(rows, workers, progress) if check_audio else {}
    good, bad = [], []
    for row in rows:
        problems = _text_problems(row) + [
            f"{field} {audio_problems[path]}"
            for field, path in (("audio1", row.audio1), ("audio2", row.audio2))
            if path and path in audio_problems
        ]
        if not row.audio1:
            problems.insert(0, "no audio1 path")
        if problems:
            bad.append(BadRow(row.where, "; ".join(problems)))
        else:
            good.append(row)
    return good, bad


def _text_problems(row: QARow) -> list[str]:
    problems = []
    if not row.question.strip():
        problems.append("empty question")
    if not row.answer.strip():
        problems.append("empty answer")
    if row.choices is not None:
        if problem := choices_problem(row.choices):
            problems.append(f"choices: {problem}, got {list(row.choices)}")
        elif len(set(row.choices)) < len(row.choices):
            problems.append(f"choices repeat: {list(row.choices)}")
        elif row.answer.strip() and row.answer.strip() not in row.choices:
            problems.append(f"answer {row.answer!r} is not one of the choices {list(row.choices)}")
    return problems


DECODE_CHECK_SECONDS = 10.0  # of each recording, decoded before training to find bad files


def _audio_problems(rows: Sequence[QARow], workers: int, progress) -> dict[str, str]:
    """{path: problem} for every distinct path that cannot be used."""
    paths = sorted({p for r in rows for p in (r.audio1, r.audio2) if p})
    problems = {}
    with ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
        for path, problem in zip(paths, pool.map(_decode_problem, paths)):
            if problem is not None:
                problems[path] = problem
            if progress is not None:
                progress(1)
    return problems


def _decode_problem(path: str) -> str | None:
    try:
        load_audio(path, sr=None, duration=DECODE_CHECK_SECONDS)
    except AudioError as e:
        return f"{e.path}: {e.problem}"
    return None


def describe_bad(path: str | os.PathLike, bad: Sequence[BadRow], limit: int = 10) -> str:
    """`file: line N: problem`, one bad row a line, the first `limit` of them and a count of the rest."""
    name = os.fspath(path)
    lines = [f"{name}: {b.where}: {b.problem}" for b in bad[:limit]]
    if len(bad) > limit:
        lines.append(f"... and {len(bad) - limit} more bad rows")
    return "\n".join(lines)


def split_val(rows: Sequence[QARow], fraction: float, seed: int) -> tuple[list[QARow], list[QARow]]:
    """(train, val), about `fraction` of the rows in val, the same for the same seed.

    Rows are held out by their first clip, all questions about a clip on the same side: ReasonAQA
    asks many questions about each recording, and a validation set that shares recordings with
    training would measure memory of the clip, not listening. With a single clip in the whole
    file, rows are held out one by one. Both lists keep the file's order.
    """
    if not 0 < fraction < 1:
        raise UsageError(f"the validation fraction must be between 0 and 1, got {fraction:g}")
    if len(rows) < 2:
        raise UsageError(f"cannot hold out a validation set from {len(rows)} row(s)")
    groups: dict[str, list[int]] = {}
    for i, row in enumerate(rows):
        groups.setdefault(row.audio1, []).append(i)
    members = list(groups.values()) if len(groups) > 1 else [[i] for i in range(len(rows))]
    random.Random(seed).shuffle(members)
    target = max(1, round(fraction * len(rows)))
    held: set[int] = set()
    for group in members[:-1]:  # never the last group: training keeps at least one
        if len(held) >= target:
            break
        held.update(group)
    train = [r for i, r in enumerate(rows) if i not in held]
    val = [r for i, r in enumerate(rows) if i in held]
    return train, val


# ---------------------------------------------------------------- waveforms


class QADataset(torch.utils.data.Dataset):
    """Rows -> dicts of the row's clips' waveforms (as the model's family hears a clip) and the
    texts, decoded on demand (in DataLoader workers). Call set_epoch before each epoch's iterator is created: workers get a copy of the
    dataset when an iterator starts, so do not combine this with `persistent_workers=True`."""

    def __init__(self, rows: Sequence[QARow], cfg, seed: int = 0, random_window: bool = True,
                 second_clip: str = "first"):
        from mellow_cli.api import ClipReader
        from mellow_cli.models.family import family_of

        family = family_of(cfg)
        self.rows = list(rows)
        self.cfg = cfg
        self.read = ClipReader(family, cfg)
        self.sample_rate = family.sample_rate(cfg)
        self.clip_samples = round(family.clip_seconds(cfg) * self.sample_rate)
        self.seed = seed
        self.random_window = random_window
        self.second_clip = second_clip  # a row without audio2: "first" (clip 1 twice) or "random"
        self.clips = sorted({r.audio1 for r in self.rows})  # what "random" draws from (theirs: every filepath1)
        self.epoch = 0

    def __len__(self) -> int:
        return len(self.rows)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def __getitem__(self, index: int) -> dict:
        row = self.rows[index]
        rng = self.window_rng(index)
        wav1 = self._clip(row.audio1, rng)
        audio2 = row.audio2
        if audio2 is None and self.second_clip == "random":
            audio2 = self.clips[int(rng.integers(len(self.clips)))]
        # The same tensor object when there is one clip: the model may encode it once.
        same = audio2 is None or audio2 == row.audio1
        wav2 = wav1 if same else self._clip(audio2, rng)
        question, answer = (row.question, row.answer) if row.official is None else \
            realize(row.official, lambda items: items[int(rng.integers(len(items)))])
        # what the question hears (Mellow hears a lone clip beside itself, as wav2 has it)
        clips = (wav1,) if audio2 is None else (wav1, wav2)
        return dict(wav1=wav1, wav2=wav2, clips=clips, question=question, answer=answer, choices=row.choices,
                    index=index)

    def window_rng(self, index: int) -> np.random.Generator:
        """The generator that picks row `index`'s windows in the current epoch."""
        return np.random.default_rng([s % 2**64 for s in (self.seed, self.epoch, index)])

    def window_offset(self, path: str, rng: np.random.Generator) -> float:
        """Start of the clip's window in seconds: 0 (the inference policy) unless random windows
        are on and the recording is longer than a clip; then a whole sample drawn from `rng`."""
        sr, n = self.sample_rate, self.clip_samples
        if not self.random_window:
            return 0.0
        excess = round(audio_duration(path) * sr) - n
        return int(rng.integers(0, excess + 1)) / sr if excess > 0 else 0.0

    def _clip(self, path: str, rng: np.random.Generator) -> torch.Tensor:
        offset = self.window_offset(path, rng)
        try:
            wav = self.read(path, offset=offset)
        except AudioError:
            if offset == 0:
                raise
            # An MP3 whose header overstates its length: fall back to the inference window.
            wav = self.read(path)
        return torch.from_numpy(wav)


def collate(items: Sequence[dict]) -> dict:
    """QADataset items as a batch: clips (each row's tuple of waveforms), question, answer,
    choices as lists, index (B,) int64; and where every clip has one length (every family but
    TinyMU, whose clips are as long as the recording), wav1, wav2 (B, N) float32 stacked: when
    every item is a one-clip question, wav2 IS wav1 (the same tensor)."""
    batch = {}
    if len({it["wav1"].shape for it in items} | {it["wav2"].shape for it in items}) == 1:
        batch["wav1"] = torch.stack([it["wav1"] for it in items])
        one_clip = all(it["wav2"] is it["wav1"] for it in items)
        batch["wav2"] = batch["wav1"] if one_clip else torch.stack([it["wav2"] for it in items])
    return dict(
        **batch,
        clips=[it["clips"] for it in items],
        question=[it["question"] for it in items],
        answer=[it["answer"] for it in items],
        choices=[it["choices"] for it in items],
        index=torch.tensor([it["index"] for it in items], dtype=torch.long),
    )
