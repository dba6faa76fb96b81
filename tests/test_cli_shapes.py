"""What a script can rely on: the output's format follows -o's name, -f json is one object for one
input and an array for a batch, a list gives the same columns whatever its length, `scores` is keyed
by choice, and no message recommends an option the next run refuses. A scripted model answers."""

from __future__ import annotations

import csv
import io
import json

import pytest
from conftest import write_tone
from fakes import ScriptedModel, install
from test_cli_answers import mellow


@pytest.fixture(scope="module")
def clips(tmp_path_factory):
    d = tmp_path_factory.mktemp("shapes")
    return [write_tone(d / f"tone{f}.wav", f, seconds=1.0) for f in (220, 440, 880)]


@pytest.fixture
def scripted(monkeypatch):
    return lambda **script: install(monkeypatch, ScriptedModel(**script))


# --- the format follows -o's name -----------------------------------------------------------------


@pytest.mark.parametrize("name, check", [
    ("captions.jsonl", lambda text: [json.loads(line)["answer"] for line in text.splitlines()] == ["a", "b"]),
    ("captions.json", lambda text: [r["answer"] for r in json.loads(text)] == ["a", "b"]),
    ("captions.csv", lambda text: [r["answer"] for r in csv.DictReader(io.StringIO(text))] == ["a", "b"]),
    ("captions.tsv", lambda text: [r["answer"] for r in csv.DictReader(io.StringIO(text), delimiter="\t")] == ["a", "b"]),
    ("captions.html", lambda text: text.startswith("<!doctype html>")),
    ("captions.txt", lambda text: [line.split("\t")[-1] for line in text.splitlines()] == ["a", "b"]),
])
def test_the_format_follows_the_output_name(scripted, clips, tmp_path, name, check):
    scripted(answers=["a", "b"])
    out = mellow("caption", str(clips[0]), str(clips[1]), "--model", "any", "-o", str(tmp_path / name), "-q")
    assert out.returncode == 0, out.stderr
    assert check((tmp_path / name).read_text())


def test_a_name_and_a_format_that_disagree_are_refused_before_any_work(scripted, clips, tmp_path):
    model = scripted()
    out = mellow("caption", str(clips[0]), "--model", "any", "-o", str(tmp_path / "rows.jsonl"), "-f", "csv")
    assert out.returncode == 2 and out.stderr.count("\n") == 1
    assert "names a jsonl file, but --format is csv" in out.stderr and "name the file .csv" in out.stderr
    assert not (tmp_path / "rows.jsonl").exists() and model.loaded_as == []
    scripted(answers=["a"])  # what the message says works
    assert mellow("caption", str(clips[0]), "--model", "any", "-o", str(tmp_path / "rows.csv"), "-f", "csv",
                  "-q").returncode == 0


def test_a_text_output_that_holds_something_is_not_told_to_resume(scripted, clips, tmp_path):
    notes = tmp_path / "notes.txt"
    notes.write_text("mine\n")
    scripted(answers=["a"])
    out = mellow("caption", str(clips[0]), "--model", "any", "-o", str(notes))
    assert out.returncode == 2 and "--resume" not in out.stderr and "--overwrite" in out.stderr
    assert notes.read_text() == "mine\n"
    assert mellow("caption", str(clips[0]), "--model", "any", "-o", str(notes), "--overwrite", "-q").returncode == 0


def test_resume_of_a_text_output_names_what_would_work(scripted, clips, tmp_path):
    scripted(answers=["a", "b"])
    out = mellow("caption", str(clips[0]), "--model", "any", "-o", str(tmp_path / "notes.txt"), "--resume")
    assert out.returncode == 2 and "--format" not in out.stderr and ".jsonl" in out.stderr
    out = mellow("caption", str(clips[0]), "--model", "any", "-o", str(tmp_path / "notes.jsonl"), "--resume", "-q")
    assert out.returncode == 0, out.stderr
