"""The official MMAU matcher, the scorers a benchmark can be scored with, and the accuracy
tables built on them.

`is_correct` is `string_match` of the benchmark's own `evaluation.py` (GitHub Sakshi113/MMAU,
last changed 2025-01-29), rule for rule, and `score` aggregates the way its main loop does:

- text is lower-cased and read as a set of words, `re.findall(r"\\b\\w+\\b", ...)`;
- a prediction is right when it has at least one word, holds every word of the answer, and holds
  none of the "wrong words": the words of each choice whose word set differs from the answer's,
  minus the words the answer also has. A bare letter, two choices named, or no choice named is
  therefore wrong, and "the answer is X" is wrong whenever "the", "answer" or "is" appears in a
  wrong choice;
- an item without the key `model_output` is skipped: left out of every denominator;
- accuracy = correct / scored in percent, shown with two decimals, per task, per difficulty, per
  sub-category (items without one are left out of that table only) and overall.

Where evaluation.py crashes (a `model_output` that is not a string, a task outside sound / music /
speech) we either refuse the file with a message or, for unknown groups, simply count them.

A `Scorer` is such a rule with its counting policy; `OFFICIAL` is the one above, the default.
mellow.py holds the Mellow authors' scorers, which judge each item another way and keep every
item in the denominator; `score` aggregates all of them the same way.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Callable, Iterable, Sequence

OUTPUT_KEY = "model_output"  # evaluation.py's key (its README's older name is `model_prediction`)
GROUPS = ("task", "difficulty", "sub-category")  # the tables evaluation.py prints, in its order
_WORD = re.compile(r"\b\w+\b")
# Rows of the tables in a fixed, readable order; values not listed follow in order of appearance.
_ORDER = {"task": ("sound", "music", "speech"), "difficulty": ("easy", "medium", "hard")}


def words(text: str) -> set[str]:
    """The set of lower-cased words evaluation.py compares."""
    return set(_WORD.findall(text.lower()))


def wrong_words(answer: str, choices: Sequence[str]) -> set[str]:
    """Words that make a prediction wrong: those of every choice whose word set is not the
    answer's, less the words the answer has too (so shared words such as "the" stay allowed)."""
    gold = words(answer)
    wrong: set[str] = set()
    for choice in choices:
        found = words(choice)
        if found != gold:
            wrong |= found - gold
    return wrong


def is_correct(answer: str, prediction: str, choices: Sequence[str]) -> bool:
    """evaluation.py's `string_match(answer, prediction, choices)`."""
    said = words(prediction)
    if not said:
        return False
    return words(answer) <= said and said.isdisjoint(wrong_words(answer, choices))


@dataclass(frozen=True)
class Scorer:
    """How a predictions file is scored: which items are right, and which count."""

    name: str  # what --scorer calls it
    source: str  # the script it follows, as reports name it
    judge: Callable[[dict], bool]  # a record holding `model_output` -> right?
    every_item: bool = False  # items without `model_output` count as wrong (else they are left out)
    decimals: int = 2  # as the script prints its percentages
    letters: bool = False  # reads the option letter of a generated answer ("b) dog")


OFFICIAL = Scorer("mmau", "official matcher (evaluation.py)",
                  lambda record: is_correct(record["answer"], record[OUTPUT_KEY], record["choices"]))


@dataclass(frozen=True)
class Accuracy:
    correct: int
    scored: int
    decimals: int = 2

    @property
    def percent(self) -> float | None:
        """correct / scored in percent, rounded as the scorer's script prints it (evaluation.py:
        two decimals); None when nothing was scored (evaluation.py divides by zero there)."""
        if self.scored == 0:
            return None
        return float(f"{100.0 * self.correct / self.scored:.{self.decimals}f}")

    def as_dict(self) -> dict:
        return {"accuracy": self.percent, "correct": self.correct, "scored": self.scored}


@dataclass(frozen=True)
class Score:
    """What `score` found: the official figures plus the counts that explain them."""

    overall: Accuracy
    groups: dict[str, list[tuple[str, Accuracy]]]  # "task" -> [("sound", Accuracy), ...]
    items: int  # records read
    unanswered: int  # no model_output because the run could not answer (our `error` key is set)
    skipped: int  # no model_output and no error: never predicted (e.g. another tool's partial file)
    flags: list[bool | None] = field(default_factory=list, repr=False)  # per record; None = not scored
    every_item: bool = False  # the scorer counted items without model_output as wrong

    @property
    def answered(self) -> int:
        return self.items - self.unanswered - self.skipped

    @property
    def strict(self) -> Accuracy:
        """Accuracy with every unanswered item counted wrong, for a report that must not let a
        missing file raise the figure; evaluation.py itself leaves them out."""
        if self.every_item:
            return self.overall
        return Accuracy(self.overall.correct, self.overall.scored + self.unanswered, self.overall.decimals)

    def as_dict(self) -> dict:
        return {
            "overall": self.overall.as_dict(),
            **{name: {value: acc.as_dict() for value, acc in rows} for name, rows in self.groups.items()},
            "counts": {"items": self.items, "answered": self.answered, "unanswered": self.unanswered,
                       "skipped": self.skipped},
            "overall_unanswered_as_wrong": self.strict.as_dict(),
        }


def group_name(value) -> str | None:
    """A group value as a table row name: MMAU stores a few `category` values as one-element
    lists, so lists are joined; None means "not in this table"."""
    if value is None:
        return None
    if isinstance(value, list):
        return ", ".join(str(v) for v in value) if value else None
    return str(value)


def score(records: Iterable[dict], groups: Sequence[str] = GROUPS, scorer: Scorer = OFFICIAL) -> Score:
    """Score prediction records (each a benchmark item plus `model_output`) the way the
    scorer's script does (by default evaluation.py). Records are assumed checked
    (predictions.check_output)."""
    records = list(records)
    correct = scored = unanswered = skipped = 0
    tally: dict[str, dict[str, list[int]]] = {g: {} for g in groups}
    flags: list[bool | None] = []
    for record in records:
        answered = OUTPUT_KEY in record
        if not answered:
            if record.get("error"):
                unanswered += 1
            else:
                skipped += 1
            if not scorer.every_item:
                flags.append(None)
                continue
        right = answered and scorer.judge(record)
        flags.append(right)
        correct += right
        scored += 1
        for g in groups:
            name = group_name(record.get(g))
            if name is not None:
                cell = tally[g].setdefault(name, [0, 0])
                cell[0] += right
                cell[1] += 1
    table = {g: [(name, Accuracy(*tally[g][name], scorer.decimals)) for name in _ordered(g, tally[g])]
             for g in groups if tally[g]}
    return Score(Accuracy(correct, scored, scorer.decimals), table, len(records), unanswered, skipped, flags,
                 scorer.every_item)


def _ordered(group: str, seen: dict) -> list[str]:
    known = [v for v in _ORDER.get(group, ()) if v in seen]
    return known + [v for v in seen if v not in known]
