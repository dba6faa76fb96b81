"""`mellow ask`'s arguments read before any model loads: an unquoted question and a recording
mixed with a folder are usage errors that say what to write instead, and what they say works."""

from __future__ import annotations

import pytest
from conftest import write_tone
from fakes import ScriptedModel, install
from test_cli_answers import mellow


@pytest.fixture
def bee(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    write_tone(tmp_path / "bee.ogg", 300, seconds=1.0)
    return "bee.ogg"


def test_an_unquoted_question_is_refused_before_the_model_loads(monkeypatch, bee):
    model = install(monkeypatch, ScriptedModel(answers=["yes"]))
    out = mellow("ask", bee, "is", "there", "a", "bee", "--model", "any")
    assert out.returncode == 2 and out.stderr.count("\n") == 1 and out.stdout == ""
    assert "is, there, a: no such files" in out.stderr
    assert model.loaded_as == []  # nothing was loaded, nothing answered
    suggested = out.stderr.split("quote the question: ")[1].strip()
    assert suggested == "mellow ask bee.ogg 'is there a bee'"
    import shlex

    again = mellow(*shlex.split(suggested)[1:], "--model", "any", "-q")  # what the message says works
    assert again.returncode == 0 and again.stdout == "yes\n"
    assert [q.prompt for q in model.asked] == ["is there a bee"]


def test_one_loose_word_beside_a_recording_is_caught_too(monkeypatch, bee):
    model = install(monkeypatch, ScriptedModel())
    out = mellow("ask", bee, "buzzing", "insects?", "--model", "any")
    assert out.returncode == 2 and "buzzing: no such file; if it is a word of the question" in out.stderr
    assert model.loaded_as == []


def test_a_recording_mixed_with_a_folder_is_refused_with_how_to_write_a_batch(monkeypatch, bee, tmp_path):
    folder = tmp_path / "audio"
    folder.mkdir()
    for f in (220, 440):
        write_tone(folder / f"{f}.wav", f, seconds=0.5)
    model = install(monkeypatch, ScriptedModel())
    for other in ("audio", "audio/*.wav"):
        out = mellow("ask", bee, other, "which is louder?", "--model", "any")
        assert out.returncode == 2 and out.stderr.count("\n") == 1
        assert f"bee.ogg is one recording and {other} a" in out.stderr and "--input" in out.stderr
    assert model.loaded_as == []


def test_three_recordings_are_still_a_batch_and_a_folder_alone_too(monkeypatch, bee, tmp_path):
    for name in ("a.wav", "b.wav"):
        write_tone(tmp_path / name, 500, seconds=0.5)
    install(monkeypatch, ScriptedModel(answers=["1", "2", "3", "4", "5", "6"]))
    out = mellow("ask", bee, "a.wav", "b.wav", "what is it?", "--model", "any", "-q")
    assert out.returncode == 0 and [line.split("\t")[0] for line in out.stdout.splitlines()] == [bee, "a.wav", "b.wav"]
    out = mellow("ask", ".", "what is it?", "--model", "any", "-q", "-f", "jsonl")
    assert out.returncode == 0 and out.stdout.count("\n") == 3
