"""The official MMAU matcher (bench/scoring.py) on hand-written predictions whose official result
is known, the per-group aggregation, and a cross-check against an independent re-implementation of
the benchmark's evaluation.py."""

from __future__ import annotations

import json
import random
import re
from pathlib import Path

import pytest

from mellow_cli.bench.scoring import Accuracy, is_correct, score, words, wrong_words

FIXTURE = Path(__file__).parent / "data" / "mmau-fixture" / "mmau-fixture.json"
VOICE = ["Man", "Woman", "Child", "Robot"]
EVENTS = ["Dog barking", "The car is honking", "Birds chirping", "A door slams"]
COUNTS = ["four", "nine", "fourteen", "fourteen"]  # MMAU repeats choices like this


@pytest.mark.parametrize("answer, choices, prediction, right", [
    ("Man", VOICE, "Man", True),  # exact
    ("Man", VOICE, "man.", True),  # case and punctuation are not words
    ("Man", VOICE, "The answer is Man", True),  # filler words that no choice has are harmless
    ("Dog barking", EVENTS, "The answer is dog barking", False),  # "the", "is" are wrong words here
    ("Dog barking", EVENTS, "dog barking", True),
    ("Man", VOICE, "Man or Woman", False),  # two choices named
    ("Woman", VOICE, "B", False),  # a bare letter names no choice
    ("Woman", VOICE, "b) Woman", True),  # the lettered form: "b" is in no choice
    ("A door slams", EVENTS, "a) A door slams", True),  # "a" is the answer's own word
    ("Birds chirping", EVENTS, "a) birds chirping", False),  # ... and a wrong word for another answer
    ("Man", VOICE, "", False),  # no words at all
    ("Man", VOICE, "?!", False),
    ("?", ["?", "yes"], "", False),  # no words is wrong even when the answer has none either
    ("Man", VOICE, "a robot", False),  # another choice
    ("Man", VOICE, "a human voice", False),  # no choice named
    ("fourteen", COUNTS, "fourteen", True),  # a repeated choice is still the answer
    ("fourteen", COUNTS, "four", False),
    ("Dog", ["dog.", "cat"], "dog", True),  # a choice with the answer's words is not wrong
    ("A dog barking", ["A dog barking", "A cat meowing"], "dog barking", False),  # "a" missing
    ("A dog barking", ["A dog barking", "A cat meowing"], "a dog barking loudly", True),
])
def test_official_matcher(answer, choices, prediction, right):
    assert is_correct(answer, prediction, choices) is right


def test_words_and_wrong_words():
    assert words("It's a DOG-barking, 2x!") == {"it", "s", "a", "dog", "barking", "2x"}
    # Words shared with the answer never count against it; choices equal to the answer add nothing.
    assert wrong_words("A dog barking", ["A dog barking", "A cat meowing", "a DOG barking!"]) == {"cat", "meowing"}


def record(task, difficulty, sub, answer, choices, output=None, **extra):
    r = {"task": task, "difficulty": difficulty, "sub-category": sub, "answer": answer, "choices": choices, **extra}
    if output is not None:
        r["model_output"] = output
    return r


def test_aggregation_per_task_difficulty_subcategory_two_decimals():
    records = [
        record("sound", "easy", "Counting", "two", ["one", "two", "three"], "two"),  # right
        record("sound", "hard", "Counting", "one", ["one", "two", "three"], "three"),  # wrong
        record("sound", "easy", "Events", "Man", VOICE, "man"),  # right
        record("music", "medium", "Events", "Woman", VOICE, "Woman or Man"),  # wrong
        record("music", "medium", None, "Robot", VOICE, "robot"),  # right, no sub-category table row
        record("speech", "hard", "Counting", "four", COUNTS, "nine"),  # wrong
        record("speech", "medium", "Counting", "Child", VOICE),  # skipped: no model_output
        record("speech", "easy", "Counting", "Child", VOICE, error="x.wav: no such file"),  # unanswered
    ]
    s = score(records)
    assert s.overall == Accuracy(3, 6) and s.overall.percent == 50.0
    assert dict(s.groups["task"]) == {"sound": Accuracy(2, 3), "music": Accuracy(1, 2), "speech": Accuracy(0, 1)}
    assert [name for name, _ in s.groups["task"]] == ["sound", "music", "speech"]
    assert [name for name, _ in s.groups["difficulty"]] == ["easy", "medium", "hard"]
    assert dict(s.groups["difficulty"]) == {"easy": Accuracy(2, 2), "medium": Accuracy(1, 2), "hard": Accuracy(0, 2)}
    assert dict(s.groups["sub-category"]) == {"Counting": Accuracy(1, 3), "Events": Accuracy(1, 2)}
    assert Accuracy(1, 3).percent == 33.33 and Accuracy(2, 3).percent == 66.67 and Accuracy(0, 0).percent is None
    assert (s.items, s.answered, s.unanswered, s.skipped) == (8, 6, 1, 1)
    assert s.strict == Accuracy(3, 7)  # the unanswered item counted as wrong; the skipped one not
    d = s.as_dict()
    assert d["sub-category"]["Counting"] == {"accuracy": 33.33, "correct": 1, "scored": 3}
    assert d["counts"] == {"items": 8, "answered": 6, "unanswered": 1, "skipped": 1}
    assert s.flags == [True, False, True, False, True, False, None, None]


# --- an independent re-implementation of evaluation.py ---------------------------------------
# Written from the benchmark's own script, GitHub Sakshi113/MMAU, evaluation.py as last changed in
# commit 7468292 (2025-01-29), Apache-2.0: `string_match` tokenizes with re.findall(r'\b\w+\b',
# text.lower()); the main loop `continue`s past items without 'model_output', counts every other
# item in `total`, and prints per task ('sound', 'music', 'speech'), per difficulty ('easy',
# 'hard', 'medium'), per sub-category (sample.get('sub-category'), None left out) and overall,
# each as f"{acc:.2f}". Deliberately written differently from bench/scoring.py (token lists,
# explicit loops, no shared helper) so that a bug in one is not copied into the other.

def reference_match(answer, prediction, choices):
    tok = lambda text: re.findall(r"\b\w+\b", text.lower())  # noqa: E731
    pred = tok(prediction)
    if len(pred) == 0:
        return False
    gold = tok(answer)
    banned = []
    for choice in choices:
        c = tok(choice)
        if set(c) != set(gold):
            banned += [w for w in c if w not in gold]
    return all(w in pred for w in gold) and not any(w in banned for w in pred)


def reference_evaluate(samples):
    tables = {"task": {}, "difficulty": {}, "sub-category": {}}
    corr = total = 0
    for sample in samples:
        if "model_output" not in sample:
            continue
        ok = reference_match(sample["answer"], sample["model_output"], sample["choices"])
        corr += ok
        total += 1
        for name in tables:
            value = sample.get(name)
            if value is None:
                continue
            cell = tables[name].setdefault(value, [0, 0])
            cell[0] += ok
            cell[1] += 1
    printed = {name: {k: f"{100 * c / n:.2f}" for k, (c, n) in t.items()} for name, t in tables.items()}
    return f"{100 * corr / total:.2f}", total, printed


def perturbed_predictions(seed: int) -> list[dict]:
    """The fixture's items with predictions of every kind: gold, other choices, fillers, letters,
    two choices, empty, none at all."""
    rng = random.Random(seed)
    items = json.loads(FIXTURE.read_text())
    out = []
    for item in items:
        c = item["choices"]
        kind = rng.randrange(9)
        prediction = [
            item["answer"], rng.choice(c), f"The answer is {item['answer']}", f"{rng.choice('abcd')}) {rng.choice(c)}",
            f"{c[0]} or {c[1]}", "", item["answer"].upper() + "!!", "I hear something", None,
        ][kind]
        out.append(dict(item) if prediction is None else {**item, "model_output": prediction})
    return out


@pytest.mark.parametrize("seed", range(6))
def test_scorer_agrees_with_evaluation_py_reimplementation(seed):
    samples = perturbed_predictions(seed)
    overall, total, printed = reference_evaluate(samples)
    ours = score(samples)
    assert ours.overall.scored == total
    assert f"{ours.overall.percent:.2f}" == overall
    for name, table in printed.items():
        assert {k: f"{acc.percent:.2f}" for k, acc in ours.groups.get(name, [])} == table
    for sample, flag in zip(samples, ours.flags):
        if "model_output" in sample:
            assert flag == reference_match(sample["answer"], sample["model_output"], sample["choices"])
