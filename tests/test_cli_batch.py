"""Batch runs through the CLI with the tiny model: questions files, pairs files, choices per row,
every output format read back, windows with timestamps, shards, resume and Ctrl-C."""

from __future__ import annotations

import csv
import io
import json
import os
import signal
import subprocess
import sys
import time

import pytest
from conftest import write_tone
from test_cli_answers import mellow


@pytest.fixture(scope="module")
def clips(tmp_path_factory):
    d = tmp_path_factory.mktemp("batch_clips")
    return [write_tone(d / f"tone{f}.wav", f) for f in (220, 440, 880)]


@pytest.fixture(scope="module")
def long_clip(tmp_path_factory):
    return write_tone(tmp_path_factory.mktemp("long") / "field.flac", 330, seconds=25.0, sr=8000)


def _jsonl(text: str) -> list[dict]:
    return [json.loads(line) for line in text.splitlines()]


def _questions(tmp_path, clips, extra=()) -> str:
    rows = [
        {"id": "q1", "audio": str(clips[0]), "question": "what is it?"},
        {"id": "q2", "audio": str(clips[0]), "audio2": str(clips[1]), "question": "which is higher?",
         "choices": ["the first", "the second"]},
        {"id": 3, "audio": str(clips[2]), "question": "is it a dog?", "choices": "yes|no"},
        *extra,
    ]
    path = tmp_path / "questions.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def test_ask_input_jsonl_answers_each_row_with_its_choices(tiny_model_dir, clips, tmp_path):
    out = mellow("ask", "--input", _questions(tmp_path, clips), "--model", str(tiny_model_dir), "--max-tokens", "4",
                 "-f", "jsonl", "-q")
    assert out.returncode == 0, out.stderr
    rows = _jsonl(out.stdout)
    assert [r["id"] for r in rows] == ["q1", "q2", "3"]
    assert rows[0]["audio2"] == rows[0]["audio"] and rows[0]["choices"] is None and rows[0]["scores"] is None
    assert rows[1]["audio2"] == str(clips[1])
    assert rows[1]["answer"] in ("the first", "the second") and rows[2]["answer"] in ("yes", "no")
    for r in rows[1:]:
        assert list(r["scores"]) == r["choices"]
        assert abs(sum(r["scores"].values()) - 1) < 1e-4
    assert all(r["model"] == str(tiny_model_dir) and r["error"] is None for r in rows)


def test_batch_choices_match_one_by_one(tiny_model_dir, clips, tmp_path):
    batched = _jsonl(mellow("ask", "--input", _questions(tmp_path, clips), "--model", str(tiny_model_dir),
                            "-f", "jsonl", "-q", "--max-tokens", "3").stdout)
    single = mellow("ask", str(clips[0]), str(clips[1]), "which is higher?", "--choices", "the first|the second",
                    "--model", str(tiny_model_dir), "-f", "json", "-q")
    one = json.loads(single.stdout)
    assert one["answer"] == batched[1]["answer"]
    assert one["scores"] == pytest.approx(batched[1]["scores"], abs=1e-4)


def test_ask_input_keeps_its_fields_and_a_gold_answer_beside_the_prediction(tiny_model_dir, clips, tmp_path):
    gold = [{"answer": "the second", "category": "pitch", "meta": {"by": "me"}}, {"category": "species"}]
    path = tmp_path / "gold.jsonl"
    path.write_text("".join(json.dumps({"id": f"q{i}", "audio": str(clips[0]), "audio2": str(clips[1]),
                                        "question": "which is higher?", "choices": ["the first", "the second"], **g})
                            + "\n" for i, g in enumerate(gold)))
    args = ("ask", "--input", str(path), "--model", str(tiny_model_dir), "-q")
    out = mellow(*args, "-f", "jsonl")
    assert out.returncode == 0, out.stderr
    rows = _jsonl(out.stdout)
    assert list(rows[0]) == ["id", "audio", "audio2", "start", "end", "question", "choices", "category", "meta", "answer",
                             "prediction", "scores", "model", "revision", "error"]
    assert rows[0]["answer"] == "the second" and rows[1]["answer"] is None  # the gold answers, as given
    assert rows[0]["category"] == "pitch" and rows[0]["meta"] == {"by": "me"} and rows[1]["meta"] is None
    assert all(r["prediction"] in ("the first", "the second") for r in rows)
    text = mellow(*args).stdout.splitlines()  # text shows what the model said
    assert [line.split("\t")[-1] for line in text] == [r["prediction"] for r in rows]
    table = list(csv.DictReader(io.StringIO(mellow(*args, "-f", "csv").stdout)))
    assert json.loads(table[0]["meta"]) == {"by": "me"} and table[0]["prediction"] == rows[0]["prediction"]


def test_input_from_stdin_and_default_choices(tiny_model_dir, clips, monkeypatch):
    lines = "".join(json.dumps({"audio": str(c), "question": "what?"}) + "\n" for c in clips)
    monkeypatch.setattr("sys.stdin", io.StringIO(lines))
    out = mellow("ask", "--input", "-", "--choices", "dog|cat", "--model", str(tiny_model_dir), "-f", "csv", "-q")
    assert out.returncode == 0, out.stderr
    rows = list(csv.DictReader(io.StringIO(out.stdout)))
    assert [r["audio"] for r in rows] == [str(c) for c in clips]
    assert all(r["choices"] == "dog|cat" and r["answer"] in ("dog", "cat") for r in rows)
    assert all(r["scores"].startswith("dog=") for r in rows)


def test_a_bad_row_does_not_stop_the_others(tiny_model_dir, clips, tmp_path):
    missing = tmp_path / "gone.wav"
    path = _questions(tmp_path, clips, extra=[{"audio": str(missing), "question": "what?"}])
    out = mellow("ask", "--input", path, "--model", str(tiny_model_dir), "--max-tokens", "3", "-f", "jsonl")
    assert out.returncode == 1
    rows = _jsonl(out.stdout)
    assert len(rows) == 4 and [r["error"] is None for r in rows] == [True, True, True, False]
    assert rows[3]["answer"] is None and rows[3]["audio"] == str(missing)
    assert f"mellow: error: {missing}: " in out.stderr
    assert "answered 3 of 4 rows, 1 failed" in out.stderr


@pytest.mark.parametrize("content, message", [
    ('{"audio": "a.wav"}\n', "line 1: needs a non-empty \"question\""),
    ('{"question": "q"}\n', "line 1: needs an \"audio\" path"),
    ('{"audio": "a.wav", "question": "q"}\nnot json\n', "line 2: not JSON"),
    ('{"audio": "a.wav", "question": "q", "choices": ["only"]}\n', "line 1: choices: needs at least two non-empty choices"),
    ('[1, 2]\n', "line 1: expected a JSON object"),
    ("", "no questions in the file"),
])
def test_bad_questions_file_is_a_usage_error_naming_the_line(tmp_path, content, message):
    path = tmp_path / "q.jsonl"
    path.write_text(content)
    out = mellow("ask", "--input", str(path), "--model", "unused")
    assert out.returncode == 2
    assert out.stderr.count("\n") == 1 and f"{path}: " in out.stderr and message in out.stderr


def test_ask_about_a_folder_asks_each_file(tiny_model_dir, clips):
    out = mellow("ask", str(clips[0].parent), "what is it?", "--model", str(tiny_model_dir), "--max-tokens", "3", "-q")
    assert out.returncode == 0, out.stderr
    lines = out.stdout.splitlines()
    assert [line.split("\t")[0] for line in lines] == sorted(str(c) for c in clips)


def test_compare_pairs_csv_with_prompt_column(tiny_model_dir, clips, tmp_path):
    pairs = tmp_path / "pairs.csv"
    pairs.write_text(f"audio1,audio2,prompt\n{clips[0]},{clips[1]},\n{clips[1]},{clips[2]},which is louder?\n")
    out = mellow("compare", "--pairs", str(pairs), "--model", str(tiny_model_dir), "--max-tokens", "3", "-f", "tsv", "-q")
    assert out.returncode == 0, out.stderr
    rows = list(csv.DictReader(io.StringIO(out.stdout), delimiter="\t"))
    assert [(r["audio"], r["audio2"]) for r in rows] == [(str(clips[0]), str(clips[1])), (str(clips[1]), str(clips[2]))]
    assert rows[0]["question"] == "explain the difference between the two audios in detail."
    assert rows[1]["question"] == "which is louder?"


def test_compare_pairs_missing_column_is_a_usage_error(tmp_path):
    pairs = tmp_path / "pairs.csv"
    pairs.write_text("a_path,b_path\nx.wav,y.wav\n")
    out = mellow("compare", "--pairs", str(pairs), "--model", "unused")
    assert out.returncode == 2 and "line 2: needs two recordings" in out.stderr


@pytest.mark.parametrize("fmt", ["text", "json", "jsonl", "csv", "tsv"])
def test_every_format_parses_back_to_the_same_rows(tiny_model_dir, clips, tmp_path, fmt):
    args = ("ask", "--input", _questions(tmp_path, clips), "--model", str(tiny_model_dir), "--max-tokens", "4", "-q")
    reference = _jsonl(mellow(*args, "-f", "jsonl").stdout)
    out = mellow(*args, "-f", fmt)
    assert out.returncode == 0, out.stderr
    if fmt == "text":
        got = [line.split("\t") for line in out.stdout.splitlines()]
        assert [g[0] for g in got] == [r["id"] for r in reference]
        assert [g[-1] for g in got] == [r["answer"] for r in reference]
        return
    if fmt == "json":
        got = json.loads(out.stdout)
    elif fmt == "jsonl":
        got = _jsonl(out.stdout)
    else:
        got = list(csv.DictReader(io.StringIO(out.stdout), delimiter="," if fmt == "csv" else "\t"))
        reference = [{k: _as_csv(k, v) for k, v in r.items()} for r in reference]
    assert got == reference


def _as_csv(key, value):
    from mellow_cli.io.formats import _flat

    flat = _flat(key, value)
    return flat if isinstance(flat, str) else str(flat)  # a number, as csv writes it


def test_windows_give_timed_rows_and_srt_vtt(tiny_model_dir, long_clip):
    base = ("caption", str(long_clip), "--model", str(tiny_model_dir), "--max-tokens", "3", "-q", "--window", "10")
    rows = _jsonl(mellow(*base, "-f", "jsonl").stdout)
    assert [(r["start"], r["end"]) for r in rows] == [(0.0, 10.0), (10.0, 20.0), (20.0, 25.0)]
    hopped = _jsonl(mellow(*base, "--hop", "5", "-f", "jsonl").stdout)
    assert [(r["start"], r["end"]) for r in hopped] == [(0.0, 10.0), (5.0, 15.0), (10.0, 20.0), (15.0, 25.0)]
    assert hopped[0]["answer"] == rows[0]["answer"] and hopped[2]["answer"] == rows[1]["answer"]
    srt = mellow(*base, "-f", "srt").stdout
    assert srt.startswith("1\n00:00:00,000 --> 00:00:10,000\n" + rows[0]["answer"] + "\n\n")
    assert "3\n00:00:20,000 --> 00:00:25,000\n" in srt
    vtt = mellow(*base, "-f", "vtt").stdout
    assert vtt.startswith("WEBVTT\n\n00:00:00.000 --> 00:00:10.000\n")


def test_srt_needs_no_window_and_one_recording_or_an_output_dir(tiny_model_dir, long_clip, clips):
    base = ("caption", str(long_clip), "--model", str(tiny_model_dir), "--max-tokens", "3", "-f", "srt")
    out = mellow(*base)
    assert out.returncode == 0, out.stderr
    assert out.stdout == mellow(*base, "--window", "10", "-q").stdout and out.stdout.count(" --> ") == 3
    out = mellow("caption", str(long_clip), str(clips[0]), "--model", str(tiny_model_dir), "-f", "vtt", "--window", "5")
    assert out.returncode == 2 and "give --output-dir DIR" in out.stderr


def test_output_dir_writes_a_file_per_recording_named_after_it(tiny_model_dir, clips, tmp_path):
    subs = tmp_path / "subs"
    base = ("caption", str(clips[0]), str(clips[1]), "--model", str(tiny_model_dir), "--max-tokens", "3", "-q",
            "--output-dir", str(subs))
    out = mellow(*base, "--window", "1", "-f", "srt")
    assert out.returncode == 0 and out.stdout == "", out.stderr
    assert sorted(p.name for p in subs.iterdir()) == ["tone220.srt", "tone440.srt"]
    srt = (subs / "tone440.srt").read_text()
    assert srt.startswith("1\n00:00:00,000 --> 00:00:01,000\n") and "\n2\n00:00:01,000 --> 00:00:02,000\n" in srt
    again = mellow(*base, "--window", "1", "-f", "srt")
    assert again.returncode == 2 and "already exist" in again.stderr and "--overwrite" in again.stderr
    assert (subs / "tone440.srt").read_text() == srt  # refused before a byte changed
    assert mellow(*base, "--window", "1", "-f", "srt", "--overwrite").returncode == 0
    assert (subs / "tone440.srt").read_text() == srt
    assert mellow(*base).returncode == 0  # text: the answers alone, in .txt
    texts = {p.name: p.read_text() for p in subs.glob("*.txt")}
    assert sorted(texts) == ["tone220.txt", "tone440.txt"] and all(t.count("\n") == 1 for t in texts.values())
    jsonl = mellow(*base, "-f", "jsonl")
    assert json.loads((subs / "tone220.jsonl").read_text())["audio"] == str(clips[0]), jsonl.stderr


@pytest.mark.parametrize("inputs, message", [
    (lambda c, d: [str(c[0]), str(d / "tone220.flac")], "would both be written to"),
    (lambda c, d: ["-"], "audio on stdin (-) has no name"),
    (lambda c, d: [str(c[0]), str(c[0])], "given twice"),
])
def test_output_dir_refuses_names_it_cannot_keep_apart(clips, tmp_path, inputs, message):
    other = tmp_path / "other"
    other.mkdir()
    (other / "tone220.flac").write_bytes(clips[0].read_bytes())
    out = mellow("caption", *inputs(clips, other), "--model", "unused", "-d", str(tmp_path / "subs"))
    assert out.returncode == 2 and message in out.stderr and out.stderr.count("\n") == 1, out.stderr
    assert not (tmp_path / "subs").exists()


def test_ask_with_window_and_choices_at_each_window(tiny_model_dir, long_clip):
    out = mellow("ask", str(long_clip), "is a bird singing?", "--window", "10", "--choices", "yes|no",
                 "--model", str(tiny_model_dir), "-f", "csv", "-q")
    assert out.returncode == 0, out.stderr
    rows = list(csv.DictReader(io.StringIO(out.stdout)))
    assert [r["start"] for r in rows] == ["0.0", "10.0", "20.0"] and all(r["answer"] in ("yes", "no") for r in rows)


def test_shards_split_the_rows_exactly(tiny_model_dir, clips, long_clip):
    args = ("caption", *map(str, clips), str(long_clip), "--window", "10", "--model", str(tiny_model_dir),
            "--max-tokens", "3", "-q", "-f", "jsonl")
    whole = _jsonl(mellow(*args).stdout)
    parts = [_jsonl(mellow(*args, "--shard", f"{i}/3").stdout) for i in (1, 2, 3)]
    assert len(whole) == 6 and sorted(len(p) for p in parts) == [2, 2, 2]
    key = lambda r: (r["audio"], r["start"])  # noqa: E731
    assert sorted(map(key, sum(parts, []))) == sorted(map(key, whole))
    assert mellow(*args, "--shard", "4/3").returncode == 2


def test_resume_after_an_interruption_does_only_the_rest(tiny_model_dir, clips, long_clip, tmp_path):
    args = ["caption", *map(str, clips), str(long_clip), "--window", "10", "--model", str(tiny_model_dir),
            "--max-tokens", "3", "-f", "jsonl", "--batch-size", "2"]
    full = tmp_path / "full.jsonl"
    assert mellow(*args, "-o", str(full)).returncode == 0
    lines = full.read_text().splitlines(keepends=True)
    cut = tmp_path / "cut.jsonl"
    cut.write_text("".join(lines[:2]) + lines[2][:17])  # a kill in the middle of the third row
    out = mellow(*args, "-o", str(cut), "--resume")
    assert out.returncode == 0, out.stderr
    assert "resuming: 2 of 6 rows already" in out.stderr and "captioned 4 of 4 rows" in out.stderr
    assert cut.read_text() == full.read_text()
    again = mellow(*args, "-o", str(cut), "--resume")
    assert "nothing left to do" in again.stderr and cut.read_text() == full.read_text()


def test_resume_csv_keeps_one_header(tiny_model_dir, clips, tmp_path):
    args = ["caption", *map(str, clips), "--model", str(tiny_model_dir), "--max-tokens", "3", "-f", "csv"]
    out_file = tmp_path / "out.csv"
    assert mellow(*args[:2], *args[4:], "-o", str(out_file)).returncode == 0  # the first clip only
    assert mellow(*args, "-o", str(out_file), "--resume").returncode == 0
    rows = list(csv.DictReader(out_file.open()))
    assert [r["audio"] for r in rows] == [str(c) for c in clips]


@pytest.mark.parametrize("extra, message", [
    (["--resume"], "--resume needs --output"),
    (["--resume", "-o", "x.json", "-f", "json"], "--resume needs rows a later run can read back, and json cannot be"),
])
def test_resume_usage_errors(tiny_model_dir, clips, extra, message):
    out = mellow("caption", str(clips[0]), str(clips[1]), "--model", str(tiny_model_dir), *extra)
    assert out.returncode == 2 and message in out.stderr


def test_ctrl_c_finishes_the_row_and_exits_130_then_resume_completes(tiny_model_dir, long_clip, tmp_path):
    """A real process and a real SIGINT: the file holds whole rows only, and --resume finishes it."""
    out_file = tmp_path / "night.jsonl"
    args = [sys.executable, "-m", "mellow_cli", "caption", str(long_clip), "--window", "1", "--hop", "0.5",
            "--model", str(tiny_model_dir), "--max-tokens", "12", "--batch-size", "1", "-f", "jsonl", "-o", str(out_file)]
    # A background job of a non-interactive shell (CI launched with `&`) starts with SIGINT ignored,
    # and its children inherit that: give this one Ctrl-C's default, as a terminal would.
    proc = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and (not out_file.exists() or out_file.read_text().count("\n") < 2):
        time.sleep(0.05)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err.decode()
    assert b"interrupted after" in err and b"add --resume to continue" in err and b"Traceback" not in err
    text = out_file.read_text()
    assert text.endswith("\n")
    done = _jsonl(text)
    assert 2 <= len(done) < 49
    resumed = subprocess.run(args + ["--resume", "-q"], capture_output=True)
    assert resumed.returncode == 0, resumed.stderr.decode()
    rows = _jsonl(out_file.read_text())
    starts = [r["start"] for r in rows]
    assert starts == sorted(set(starts)) and len(rows) == 49  # 0, 0.5, ... 24.0: each window once, in order


def test_stdout_has_only_rows_and_stderr_only_logs(tiny_model_dir, clips):
    proc = subprocess.run([sys.executable, "-m", "mellow_cli", "caption", *map(str, clips), "--model", str(tiny_model_dir),
                           "--max-tokens", "3", "-f", "jsonl"], capture_output=True, text=True,
                          env={**os.environ, "NO_COLOR": "1"})
    assert proc.returncode == 0, proc.stderr
    assert len(_jsonl(proc.stdout)) == 3
    assert "{" not in proc.stderr and "captioned 3 of 3 rows" in proc.stderr


def test_a_folder_mixing_good_and_bad_files(tiny_model_dir, clips, tmp_path):
    import shutil

    folder = tmp_path / "mixed"
    folder.mkdir()
    for c in clips:
        shutil.copy(c, folder / c.name)
    (folder / "broken.flac").write_bytes(b"fLaC" + b"\0" * 50)
    (folder / "empty.wav").write_bytes(b"")
    (folder / "notes.txt").write_text("not audio, and not picked up")
    out = mellow("caption", str(folder), "--model", str(tiny_model_dir), "--max-tokens", "3", "-f", "jsonl", "-b", "2")
    assert out.returncode == 1
    rows = {os.path.basename(r["audio"]): r for r in _jsonl(out.stdout)}
    assert sorted(rows) == sorted(["broken.flac", "empty.wav", *(c.name for c in clips)])
    assert all(rows[c.name]["error"] is None and rows[c.name]["answer"] for c in clips)
    assert rows["broken.flac"]["error"] and rows["empty.wav"]["error"]
    assert out.stderr.count("mellow: error:") == 2 and "captioned 3 of 5 rows, 2 failed" in out.stderr


def test_progress_bar_on_a_terminal_only(monkeypatch):
    import rich.console

    from mellow_cli.cli import render

    render.configure()
    term = rich.console.Console(file=io.StringIO(), force_terminal=True, width=120)
    monkeypatch.setitem(render._consoles, "stderr", term)
    monkeypatch.delenv("NO_COLOR", raising=False)
    with render.progress(3, "captioned") as advance:
        for _ in range(3):
            advance()
    drawn = term.file.getvalue()
    assert "captioned" in drawn and "3/3" in drawn and "/s" in drawn and "eta" in drawn
    piped = rich.console.Console(file=io.StringIO(), force_terminal=False)
    monkeypatch.setitem(render._consoles, "stderr", piped)
    with render.progress(3, "captioned") as advance:
        advance()
    assert piped.file.getvalue().startswith("captioned: 1 of 3 (33%)")  # a plain line, no bar
    assert "\x1b[" not in piped.file.getvalue()


@pytest.mark.skipif(not os.path.exists("/dev/full"), reason="no /dev/full")
@pytest.mark.parametrize("command", [["caption", "{0}", "{1}", "-f", "jsonl"], ["ask", "{0}", "what is it?"]])
def test_a_full_stdout_is_one_line_naming_it(tiny_model_dir, clips, command):
    args = [a.format(*clips) for a in command]
    with open("/dev/full", "w") as full:
        proc = subprocess.run([sys.executable, "-m", "mellow_cli", *args, "--model", str(tiny_model_dir),
                               "--max-tokens", "2", "-q"], stdout=full, stderr=subprocess.PIPE, text=True)
    assert proc.returncode == 1
    assert proc.stderr == "mellow: error: standard output: cannot write the output (No space left on device)\n"


@pytest.fixture(scope="module")
def nan_model_dir(tiny_model_dir, tmp_path_factory):
    """The tiny model whose language model's last norm is NaN: every logit is NaN."""
    import shutil

    import torch
    from safetensors.torch import load_file, save_file

    out = tmp_path_factory.mktemp("nan_model")
    for f in tiny_model_dir.iterdir():
        shutil.copyfile(f, out / f.name)
    state = load_file(str(out / "model.safetensors"))
    state["caption_decoder.lm.model.norm.weight"] = torch.full_like(state["caption_decoder.lm.model.norm.weight"],
                                                                     float("nan"))
    save_file(state, str(out / "model.safetensors"))
    return out


@pytest.mark.parametrize("extra", [["--choices", "yes|no", "-f", "json"], ["-f", "json"], ["--sample", "-f", "json"]])
def test_nan_logits_are_one_line_and_never_reach_the_json(nan_model_dir, clips, extra):
    out = mellow("ask", str(clips[0]), "is it a dog?", "--model", str(nan_model_dir), "--max-tokens", "2", "-q", *extra)
    assert out.returncode == 1 and "NaN" not in out.stdout
    assert out.stderr.count("\n") == 1 and "NaN or infinite" in out.stderr and "unexpected" not in out.stderr
