"""The run of ask, caption and compare (batch/run.py) without the CLI: jobs and a plan in, rows
written and a tally out, each refusal made before the model loads. A scripted model answers."""

from __future__ import annotations

import json

import pytest
from conftest import write_tone
from fakes import ScriptedModel

from mellow_cli.batch.run import Plan, answer
from mellow_cli.errors import UsageError
from mellow_cli.io.jobs import Job, jobs_for
from mellow_cli.io.results import Destination
from mellow_cli.io.spans import Span


@pytest.fixture
def clips(tmp_path):
    return [str(write_tone(tmp_path / "a.wav", 440, seconds=1.0)), str(write_tone(tmp_path / "long.wav", 330, seconds=15.0))]


def _loader(model):
    loads = []

    def load():
        loads.append(model.name)
        return model

    return load, loads


def test_a_run_writes_its_rows_and_tallies_them(tmp_path, clips):
    out = tmp_path / "rows.jsonl"
    model = ScriptedModel(answers=["one", "two", "three"])
    load, loads = _loader(model)
    tally = answer(jobs_for([*clips, str(tmp_path / "missing.wav")], "what?"), "captioned",
                   Plan("v0", to=Destination(output=str(out))), load)
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    # the long recording is walked in two windows of Mellow's 10 s clip; the missing file's row says why
    assert [(r["audio"], r["start"], r["answer"]) for r in rows[:3]] == [
        (clips[0], 0.0, "one"), (clips[1], 0.0, "two"), (clips[1], 10.0, "three")]
    assert rows[3]["answer"] is None and rows[3]["error"]
    assert (tally.total, tally.written, tally.failed, tally.interrupted) == (4, 4, 1, False) and loads == ["scripted"]


def test_what_can_be_refused_is_refused_before_the_model_loads(tmp_path, clips):
    load, loads = _loader(ScriptedModel(answers=["x"]))
    jobs = jobs_for(clips, "what?")
    refused = [
        Plan("v0", span=Span(window=5, duration=3)),  # a walk and one span
        Plan("v0", to=Destination(output=str(tmp_path / "r.jsonl"), fmt="csv")),  # a name and a format that disagree
        Plan("v0", to=Destination(fmt="srt")),  # one recording's captions, for two
        Plan("v0", shard="3/2"),
        Plan("tinymu"),  # a family that takes one clip, asked about a pair
    ]
    for plan in refused:
        pair = [Job(clips[0], clips[1], "which?")] if plan.model == "tinymu" else jobs
        with pytest.raises(UsageError):
            answer(pair, "answered", plan, load)
    assert loads == [] and not (tmp_path / "r.jsonl").exists()


def test_one_free_answer_for_a_terminal_is_streamed(clips, capsys):
    model = ScriptedModel(answers=[["a dog ", "barks"]])
    load, _ = _loader(model)
    streamed = []
    tally = answer([Job(clips[0], clips[0], "what?")], "answered", Plan("v0"), load, single=True,
                   stream=lambda pieces: streamed.append(list(pieces)))
    assert streamed == [["a dog ", "barks"]] and tally.written == 1
    assert capsys.readouterr().out == ""  # the caller printed it; nothing was written twice


@pytest.mark.parametrize("fmt", ["jsonl", "csv"])
def test_a_file_written_before_rows_had_spans_resumes_in_its_layout(tmp_path, clips, fmt, capsys):
    import csv

    old = ["audio", "audio2", "question", "answer", "model", "revision", "error"]  # no start, end
    first = dict(zip(old, [clips[0], clips[0], "what?", "one", "scripted", "0" * 40, None]))
    out = tmp_path / f"rows.{fmt}"
    if fmt == "jsonl":
        out.write_text(json.dumps(first) + "\n")
    else:
        with out.open("w", newline="") as f:
            w = csv.DictWriter(f, old, lineterminator="\n")
            w.writeheader()
            w.writerow(first)
    load, _ = _loader(ScriptedModel(answers=["two"]))
    short = str(write_tone(tmp_path / "b.wav", 550, seconds=1.0))
    tally = answer(jobs_for([clips[0], short], "what?"), "captioned",
                   Plan("v0", to=Destination(output=str(out), resume=True)), load)
    if fmt == "jsonl":
        rows = [json.loads(line) for line in out.read_text().splitlines()]
    else:
        rows = list(csv.DictReader(out.read_text().splitlines()))
    assert [list(r) for r in rows] == [old, old] and [r["answer"] for r in rows] == ["one", "two"]
    assert tally.written == 1 and "resuming: 1 of 2 rows already" in capsys.readouterr().err


def test_a_file_without_spans_is_not_resumed_in_windows(tmp_path, clips):
    old = ["audio", "audio2", "question", "answer", "model", "revision", "error"]
    out = tmp_path / "rows.jsonl"
    out.write_text(json.dumps(dict(zip(old, [clips[1], clips[1], "what?", "one", "scripted", "0" * 40, None]))) + "\n")
    before = out.read_text()
    load, _ = _loader(ScriptedModel(answers=["two", "three"]))
    with pytest.raises(UsageError, match="resume with --duration"):  # the long clip would be heard in windows
        answer(jobs_for([clips[1]], "what?"), "captioned", Plan("v0", to=Destination(output=str(out), resume=True)),
               load)
    assert out.read_text() == before
    tally = answer(jobs_for([clips[1]], "what?"), "captioned",
                   Plan("v0", span=Span(duration=10), to=Destination(output=str(out), resume=True)), load)
    assert tally.total == 0 and out.read_text() == before  # its one clip is the row already there
