"""Recordings heard whole: one longer than the clip the model hears is walked in windows of that
clip (the family's own length), `-f srt` needs no flags, a line on stderr says how a file was cut,
--offset/--duration ask for one span and --offset with --window walks from there; a pair is one
clip of each unless --window walks its first; a folder's long files are each walked. A scripted
model answers: what is checked is which spans the CLI asks about."""

from __future__ import annotations

import dataclasses
import json

import pytest
from conftest import write_tone
from fakes import ScriptedModel, install
from mellow_cli.api import ClipReader
from test_cli_answers import mellow


@pytest.fixture(scope="module")
def audio(tmp_path_factory):
    d = tmp_path_factory.mktemp("whole")
    (d / "folder").mkdir()
    return {"long": write_tone(d / "long.wav", 330, seconds=25.0), "short": write_tone(d / "short.wav", 440, seconds=1.0),
            "folder": d / "folder", "folder_long": write_tone(d / "folder" / "a.wav", 220, seconds=12.0),
            "folder_short": write_tone(d / "folder" / "b.wav", 880, seconds=2.0)}


def _rows(out) -> list[dict]:
    assert out.returncode == 0, out.stderr
    return [json.loads(line) for line in out.stdout.splitlines()]


def _spans(rows) -> list[tuple]:
    return [(r["start"], r["end"]) for r in rows]


def test_a_long_recording_is_walked_in_the_model_clip_and_said_so(monkeypatch, audio):
    install(monkeypatch, ScriptedModel(answers=["a", "b", "c"]))
    out = mellow("caption", str(audio["long"]), "--model", "any", "-f", "jsonl")
    assert _spans(_rows(out)) == [(0.0, 10.0), (10.0, 20.0), (20.0, 25.0)]
    assert f"{audio['long']}: 25 s heard as 3 windows of 10 s" in out.stderr


def test_the_window_is_the_family_clip(monkeypatch, audio):
    model = ScriptedModel(answers=["a"] * 5)
    model.cfg = dataclasses.replace(model.cfg, clip_seconds=5)  # a family that hears 5 s at once
    model.read_clip = ClipReader(model.family, model.cfg)
    install(monkeypatch, model)
    out = mellow("caption", str(audio["long"]), "--model", "any", "-f", "jsonl")
    assert _spans(_rows(out)) == [(0.0, 5.0), (5.0, 10.0), (10.0, 15.0), (15.0, 20.0), (20.0, 25.0)]
    assert "heard as 5 windows of 5 s" in out.stderr
    out = mellow("caption", str(audio["long"]), "--model", "any", "--window", "8")
    assert out.returncode == 2 and "hears at most 5 s at once" in out.stderr


def test_srt_without_flags_has_a_cue_per_window(monkeypatch, audio):
    install(monkeypatch, ScriptedModel(answers=["a", "b", "c"]))
    out = mellow("caption", str(audio["long"]), "--model", "any", "-f", "srt", "-q")
    assert out.returncode == 0, out.stderr
    assert out.stdout.startswith("1\n00:00:00,000 --> 00:00:10,000\na\n\n")
    assert "3\n00:00:20,000 --> 00:00:25,000\nc\n" in out.stdout


def test_a_short_recording_is_one_row_and_no_note(monkeypatch, audio):
    install(monkeypatch, ScriptedModel(answers=["a"]))
    out = mellow("caption", str(audio["short"]), "--model", "any")
    assert out.returncode == 0 and out.stdout == "a\n" and "heard as" not in out.stderr


def test_offset_and_duration_ask_for_one_span(monkeypatch, audio):
    install(monkeypatch, ScriptedModel(answers=["a"]))
    out = mellow("caption", str(audio["long"]), "--model", "any", "-f", "jsonl", "--offset", "5", "--duration", "3")
    assert _spans(_rows(out)) == [(5.0, 8.0)] and "heard as" not in out.stderr
    install(monkeypatch, ScriptedModel(answers=["a"]))
    out = mellow("caption", str(audio["long"]), "--model", "any", "-f", "jsonl", "--offset", "5")
    assert _spans(_rows(out)) == [(5.0, 15.0)]


def test_offset_with_window_walks_from_there(monkeypatch, audio):
    install(monkeypatch, ScriptedModel(answers=["a", "b", "c"]))
    out = mellow("caption", str(audio["long"]), "--model", "any", "-f", "jsonl", "--offset", "10", "--window", "5")
    assert _spans(_rows(out)) == [(10.0, 15.0), (15.0, 20.0), (20.0, 25.0)]
    assert "heard as 3 windows of 5 s from 10 s" in out.stderr


def test_a_pair_is_one_clip_each_unless_window_walks_the_first(monkeypatch, audio):
    model = install(monkeypatch, ScriptedModel(answers=["a"]))
    out = mellow("ask", str(audio["long"]), str(audio["short"]), "which is higher?", "--model", "any", "-f", "jsonl")
    assert _spans(_rows(out)) == [(0.0, 10.0)] and len(model.asked) == 1
    assert f"{audio['long']}: 25 s, of which one clip of 10 s is heard, as one of a pair" in out.stderr
    assert "--window SECONDS walks the first of a pair" in out.stderr
    install(monkeypatch, ScriptedModel(answers=["a", "b", "c"]))
    out = mellow("compare", str(audio["long"]), str(audio["short"]), "--model", "any", "-f", "jsonl", "--window", "10")
    assert _spans(_rows(out)) == [(0.0, 10.0), (10.0, 20.0), (20.0, 25.0)]


def test_each_long_file_of_a_folder_is_walked(monkeypatch, audio):
    install(monkeypatch, ScriptedModel(answers=["a", "b", "c"]))
    out = mellow("caption", str(audio["folder"]), "--model", "any", "-f", "json")
    assert out.returncode == 0, out.stderr
    rows = json.loads(out.stdout)
    assert [(r["audio"], r["start"], r["end"]) for r in rows] == [
        (str(audio["folder_long"]), 0.0, 10.0), (str(audio["folder_long"]), 10.0, 12.0), (str(audio["folder_short"]), 0.0, 2.0)]
    assert f"{audio['folder_long']}: 12 s heard as 2 windows of 10 s" in out.stderr


def test_one_recording_in_windows_is_one_json_object(monkeypatch, audio):
    install(monkeypatch, ScriptedModel(picks=["no", "yes", "no"]))
    out = mellow("ask", str(audio["long"]), "is it a bird?", "-c", "yes|no", "--model", "any", "-f", "json", "-q")
    assert out.returncode == 0, out.stderr
    got = json.loads(out.stdout)
    assert got["audio"] == str(audio["long"]) and got["choices"] == ["yes", "no"]
    assert [(w["start"], w["end"], w["answer"]) for w in got["windows"]] == [(0.0, 10.0, "no"), (10.0, 20.0, "yes"),
                                                                              (20.0, 25.0, "no")]
    assert got["windows"][1]["scores"] == {"yes": 0.7, "no": 0.3}


def test_past_a_few_cut_recordings_one_line_counts_them_and_v_names_each(monkeypatch, tmp_path):
    many = [write_tone(tmp_path / f"{i}.wav", 220 + 110 * i, seconds=12.0) for i in range(4)]
    model = install(monkeypatch, ScriptedModel(answers=["a"] * 16))
    out = mellow("caption", *map(str, many), "--model", "any", "-f", "jsonl")
    assert len(_rows(out)) == 8
    assert "4 recordings heard in part: 4 in windows of 10 s (8 rows), 0 of pairs in their first 10 s" in out.stderr
    assert "heard as 2 windows" not in out.stderr  # one line, not one a recording
    model.net = None  # -v times a real network's stages: none here
    monkeypatch.setattr("mellow_cli.cli.options._time_stages", lambda net: None)
    out = mellow("caption", *map(str, many), "--model", "any", "-f", "jsonl", "-v")
    assert all(f"{path}: 12 s heard as 2 windows of 10 s" in out.stderr for path in many), out.stderr


def test_a_shard_with_no_rows_still_writes_its_file(monkeypatch, audio, tmp_path):
    install(monkeypatch, ScriptedModel(answers=["a", "b"]))
    parts = [tmp_path / f"part{i}.{ext}" for i, ext in ((1, "jsonl"), (2, "csv"), (3, "jsonl"))]
    for i, part in enumerate(parts, 1):  # two recordings, three shards
        out = mellow("caption", str(audio["short"]), str(audio["folder_short"]), "--model", "any", "-o", str(part),
                     "--shard", f"{i}/3")
        assert out.returncode == 0, out.stderr
    assert [len(_read(p)) for p in parts] == [1, 1, 0] and parts[2].read_text() == ""
    assert "--shard 3/3: no rows fall to this shard (2 in all)" in out.stderr
    page = tmp_path / "all.html"
    out = mellow("report", *map(str, (parts[0], parts[2])), "-o", str(page))
    assert out.returncode == 0 and page.stat().st_size > 0, out.stderr


def _read(path) -> list[dict]:
    import csv

    text = path.read_text()
    return list(csv.DictReader(text.splitlines())) if path.suffix == ".csv" else [json.loads(x) for x in text.splitlines()]


def test_a_report_needs_rows_in_one_of_its_files(tmp_path):
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    out = mellow("report", str(empty), "-o", str(tmp_path / "p.html"))
    assert out.returncode == 2 and f"{empty}: holds no rows" in out.stderr
    out = mellow("report", str(empty), str(empty), "-o", str(tmp_path / "p.html"))
    assert out.returncode == 2 and "none of the files holds rows" in out.stderr
