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


# --- one shape per input --------------------------------------------------------------------------


def test_json_is_one_object_for_one_input_and_an_array_for_a_batch(scripted, clips, tmp_path):
    listed = tmp_path / "one.txt"
    listed.write_text(f"{clips[0]}\n")
    runs = [
        (["caption", str(clips[0])], dict),
        (["ask", str(clips[0]), "what is it?"], dict),
        (["ask", str(clips[0]), str(clips[1]), "which is higher?"], dict),
        (["compare", str(clips[0]), str(clips[1])], dict),
        (["caption", str(clips[0]), str(clips[1])], list),
        (["caption", f"@{listed}"], list),  # a list is a batch, however short
        (["ask", str(clips[0]), str(clips[1]), str(clips[2]), "what is it?"], list),
    ]
    for args, shape in runs:
        scripted(answers=["a", "b", "c"])
        out = mellow(*args, "--model", "any", "-f", "json", "-q")
        assert out.returncode == 0, out.stderr
        got = json.loads(out.stdout)
        assert isinstance(got, shape), args
        assert (got["answer"] if shape is dict else got[0]["answer"]) == "a"


def test_a_list_gives_the_same_columns_whatever_its_length(scripted, clips, tmp_path):
    said = {}
    for n in (1, 2):
        listed = tmp_path / f"list{n}.txt"
        listed.write_text("".join(f"{c}\n" for c in clips[:n]))
        scripted(answers=["a", "b"])
        text = mellow("caption", f"@{listed}", "--model", "any", "-q")
        scripted(answers=["a", "b"])
        rows = mellow("caption", f"@{listed}", "--model", "any", "-f", "jsonl", "-q")
        assert text.returncode == rows.returncode == 0, text.stderr + rows.stderr
        said[n] = (text.stdout.splitlines(), [tuple(json.loads(line)) for line in rows.stdout.splitlines()])
    assert said[1][0] == [f"{clips[0]}\ta"] and said[2][0] == [f"{clips[0]}\ta", f"{clips[1]}\tb"]
    assert set(said[1][1]) == set(said[2][1]) and len(set(said[2][1])) == 1  # the same keys


def test_scores_are_keyed_by_choice_and_read_back_so(scripted, clips, tmp_path, monkeypatch):
    scripted(picks=["no"])
    out = mellow("ask", str(clips[0]), "is it a dog?", "-c", "yes|no", "--model", "any", "-f", "json", "-q")
    assert out.returncode == 0, out.stderr
    row = json.loads(out.stdout)
    assert row["scores"] == {"yes": 0.3, "no": 0.7} and row["choices"] == ["yes", "no"]  # the order kept
    monkeypatch.chdir(tmp_path)
    for name in ("one.json", "rows.csv"):
        scripted(picks=["no"])
        assert mellow("ask", str(clips[0]), "is it a dog?", "-c", "yes|no", "--model", "any", "-o", name,
                      "-q").returncode == 0
        from mellow_cli.cli.report import _read

        kind, rows = _read(name)
        assert kind == "rows" and [r["scores"] for r in rows] == [{"yes": 0.3, "no": 0.7}]
