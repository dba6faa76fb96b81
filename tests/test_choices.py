"""Choices read one way wherever a user writes them: `mellow ask --choices`, a questions file
(`ask --input`), bench qa data and training rows all strip each choice and refuse fewer than two
non-empty ones with the same words."""

from __future__ import annotations

import json

import pytest
from test_cli_answers import mellow

from mellow_cli.io.jobs import read_questions
from mellow_cli.io.inputs import CHOICES_RULE, parse_choices
from mellow_cli.bench import qa
from mellow_cli.train.data import read_rows, validate_rows
from mellow_cli.errors import UsageError

BAD = ["dog", "dog|", "|cat", " | ", "dog| |cat", ""]
GOOD = [("dog|cat", ("dog", "cat")), (" dog | cat ", ("dog", "cat")), ([" dog", "cat "], ("dog", "cat")),
        ("a|b|c", ("a", "b", "c"))]


def _jsonl(tmp_path, name: str, row: dict) -> str:
    path = tmp_path / name
    path.write_text(json.dumps(row) + "\n")
    return str(path)


@pytest.mark.parametrize("value", BAD)
def test_the_same_bad_choices_are_refused_the_same_way_everywhere(tmp_path, value):
    flag = mellow("ask", "a.wav", "what is it?", "--choices", value, "--model", "unused")
    questions = _jsonl(tmp_path, "q.jsonl", {"audio": "a.wav", "question": "what is it?", "choices": value})
    row = mellow("ask", "--input", questions, "--model", "unused")
    data = _jsonl(tmp_path, "qa.jsonl", {"audio": "a.wav", "question": "what is it?", "choices": value, "answer": "dog"})
    bench = mellow("bench", "qa", data, "--model", "unused")
    assert flag.stderr == f"mellow: error: --choices: {CHOICES_RULE}\n"
    assert row.stderr == f"mellow: error: {questions}: line 1: choices: {CHOICES_RULE}\n"
    assert bench.stderr == f"mellow: error: {data}: line 1: choices: {CHOICES_RULE}\n"
    assert (flag.returncode, row.returncode, bench.returncode) == (2, 2, 2)
    assert flag.stdout == row.stdout == bench.stdout == ""
    # Training keeps such a row to list with the file's other bad rows (--skip-bad drops it).
    _, (bad,) = validate_rows(read_rows(data), check_audio=False)
    assert bad.problem.startswith(f"choices: {CHOICES_RULE}")


@pytest.mark.parametrize("value, expected", GOOD)
def test_the_same_good_choices_read_the_same_everywhere(tmp_path, value, expected):
    data = _jsonl(tmp_path, "qa.jsonl", {"audio": "a.wav", "question": "q?", "choices": value, "answer": "a"})
    (job,) = read_questions(data)
    (item,) = qa.read(data, str(tmp_path))
    (row,) = read_rows(data)
    assert job.choices == item.choices == row.choices == expected
    if isinstance(value, str):
        assert parse_choices(value, "--choices") == expected


@pytest.mark.parametrize("value", [5, {"a": 1}, ["dog", 3]])
def test_choices_of_the_wrong_type_name_where(tmp_path, value):
    for read in (read_questions, lambda p: qa.read(p, str(tmp_path)), read_rows):
        data = _jsonl(tmp_path, "q.jsonl", {"audio": "a.wav", "question": "q?", "choices": value, "answer": "a"})
        with pytest.raises(UsageError) as e:
            read(data)
        assert str(e.value) == f"{data}: line 1: choices: {CHOICES_RULE}"


@pytest.mark.parametrize("value", [[], ["dog"], ["dog", " "]])
def test_lists_of_fewer_than_two_choices_are_refused_in_files(tmp_path, value):
    data = _jsonl(tmp_path, "q.jsonl", {"audio": "a.wav", "question": "q?", "choices": value, "answer": "dog"})
    for read in (read_questions, lambda p: qa.read(p, str(tmp_path))):
        with pytest.raises(UsageError) as e:
            read(data)
        assert str(e.value) == f"{data}: line 1: choices: {CHOICES_RULE}"
    _, (bad,) = validate_rows(read_rows(data), check_audio=False)
    assert bad.problem.startswith(f"choices: {CHOICES_RULE}")


def test_no_choices_only_when_none_are_given(tmp_path):
    assert parse_choices(None, "--choices") is None
    data = _jsonl(tmp_path, "q.jsonl", {"audio": "a.wav", "question": "q?", "choices": None, "answer": "a"})
    assert read_questions(data)[0].choices is None and read_rows(data)[0].choices is None
