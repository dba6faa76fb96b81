"""Result files under hostile use: one writer at a time, nothing overwritten or cut that is not
proved to be ours, resume keyed so no row is skipped or done twice, and bad values refused up
front with one line and exit 2."""

from __future__ import annotations

import csv
import io
import json
import multiprocessing
import os
from collections import Counter

import numpy as np
import pytest
import soundfile as sf
from conftest import write_tone
from test_cli_answers import mellow

from mellow_cli.io import outputs
from mellow_cli.io.jobs import FIELDS, Job, read_questions, row
from mellow_cli.io.spans import windows
from mellow_cli.io.inputs import expand_inputs
from mellow_cli.errors import AudioError, UsageError

ROW_FIELDS = FIELDS


def _row(audio: str, answer: str = "a tone", model: str = "m") -> dict:
    return {**row(Job(audio, audio, "what?"), answer=answer, model=model)}


def _jsonl(rows) -> str:
    return "".join(json.dumps({k: r[k] for k in ROW_FIELDS}) + "\n" for r in rows)


@pytest.fixture(scope="module")
def clips(tmp_path_factory):
    d = tmp_path_factory.mktemp("out_clips")
    return [write_tone(d / f"tone{f}.wav", f) for f in (220, 440, 880)]


# --- opening a file: the rules, without a model ------------------------------------------------------


def test_a_file_with_rows_is_refused_without_resume_or_overwrite(tmp_path):
    out = tmp_path / "answers.jsonl"
    out.write_text(_jsonl([_row("a.wav")]))
    with pytest.raises(UsageError, match="already holds .*--resume.*--overwrite"):
        outputs.open_rows(str(out), "jsonl", ROW_FIELDS)
    assert out.read_text() == _jsonl([_row("a.wav")])
    opened = outputs.open_rows(str(out), "jsonl", ROW_FIELDS, overwrite=True)
    opened.close()
    assert out.read_text() == ""


def test_a_second_writer_is_refused_while_the_first_holds_the_file(tmp_path):
    out = tmp_path / "shared.jsonl"
    first = outputs.open_rows(str(out), "jsonl", ROW_FIELDS)
    try:
        ctx = multiprocessing.get_context("fork")
        with ctx.Pool(1) as pool:
            message = pool.apply(_try_open, (str(out),))
        assert "another mellow run is writing this file" in message
    finally:
        first.close()
    assert _try_open(str(out)) == "opened"  # released with the first writer


def _try_open(path: str) -> str:
    try:
        outputs.open_rows(path, "jsonl", ROW_FIELDS).close()
        return "opened"
    except UsageError as e:
        return str(e)


@pytest.mark.parametrize("fmt, content, message", [
    ("csv", None, "header is not this run's"),  # a JSONL file resumed as CSV
    ("jsonl", "my own notes\nline two\n", "line 1 is not a row of this run"),
    ("jsonl", "\x00\xff\xfe binary", "not a UTF-8 text file"),
    ("jsonl", json.dumps({"audio": "a.wav", "answer": "x"}) + "\n", "line 1 is not a row of this run"),
])
def test_resume_refuses_a_file_that_is_not_ours_without_touching_it(tmp_path, fmt, content, message):
    out = tmp_path / "x.out"
    data = (_jsonl([_row("a.wav"), _row("b.wav")]) if content is None else content).encode("latin-1")
    out.write_bytes(data + b"half a li")  # even an unfinished last line is left as it is
    with pytest.raises(UsageError, match=message):
        outputs.open_rows(str(out), fmt, ROW_FIELDS, resume=True)
    assert out.read_bytes() == data + b"half a li"


def test_resume_with_other_fields_is_refused(tmp_path):
    out = tmp_path / "x.csv"
    out.write_text(",".join(ROW_FIELDS) + "\n" + ",".join("v" for _ in ROW_FIELDS) + "\n")
    more = ROW_FIELDS + ("choices", "scores")
    with pytest.raises(UsageError, match="header is not this run's"):
        outputs.open_rows(str(out), "csv", more, resume=True)


def test_resume_keeps_whole_rows_and_drops_only_a_cut_last_line(tmp_path):
    out = tmp_path / "x.jsonl"
    whole = _jsonl([_row("a.wav"), _row("./b.wav")])
    out.write_text(whole + '{"audio": "c.w')
    opened = outputs.open_rows(str(out), "jsonl", ROW_FIELDS, resume=True)
    opened.stream.write(_jsonl([_row("c.wav")]))
    opened.close()
    assert out.read_text() == whole + _jsonl([_row("c.wav")])
    assert opened.append and opened.models == {"m"}
    assert opened.done[outputs.row_key(_row("b.wav"))] == 1  # ./b.wav and b.wav are one path


@pytest.mark.parametrize("fmt", ["csv", "tsv", "jsonl"])
@pytest.mark.parametrize("question", ["what\nis it?", "what\r\nis it?", "a\u2028b\u2029c\x85d?"])
def test_resume_reads_back_every_row_whatever_its_text_holds(tmp_path, fmt, question):
    rows = [{**row(Job(a, a, question), answer=f"x\u2028{question}", model="m")} for a in ("a.wav", "b.wav")]
    out = tmp_path / f"x.{fmt}"
    opened = outputs.open_rows(str(out), fmt, ROW_FIELDS)
    writer = outputs.RowWriter(fmt, opened.stream, fields=ROW_FIELDS)
    for r in rows:
        writer.write(r)
    writer.close()
    opened.close()
    whole = out.read_bytes()
    cut = b'{"audio": "c.w' if fmt == "jsonl" else b'c.wav,c.wav,"half\nof a ro'  # a kill, inside quotes
    out.write_bytes(whole + cut)
    again = outputs.open_rows(str(out), fmt, ROW_FIELDS, resume=True)
    again.close()
    assert again.done == Counter(key for key, _ in outputs.numbered_keys(rows))
    assert out.read_bytes() == whole + cut  # nothing changes before a row is written
    again = outputs.open_rows(str(out), fmt, ROW_FIELDS, resume=True)
    outputs.RowWriter(fmt, again.stream, fields=ROW_FIELDS, append=again.append).write(rows[0])
    again.close()
    added = io.StringIO()
    outputs.RowWriter(fmt, added, fields=ROW_FIELDS, append=True).write(rows[0])
    assert out.read_bytes() == whole + added.getvalue().encode()


def test_resume_reads_rows_written_with_crlf(tmp_path):
    out = tmp_path / "x.jsonl"
    out.write_bytes(_jsonl([_row("a.wav"), _row("b.wav")]).replace("\n", "\r\n").encode())
    opened = outputs.open_rows(str(out), "jsonl", ROW_FIELDS, resume=True)
    opened.close()
    assert sum(opened.done.values()) == 2


def test_resume_by_another_model_is_refused(tmp_path):
    out = tmp_path / "x.jsonl"
    out.write_text(_jsonl([_row("a.wav", model="v0")]))
    opened = outputs.open_rows(str(out), "jsonl", ROW_FIELDS, resume=True)
    opened.check_model("v0", str(out))
    with pytest.raises(UsageError, match="written by model v0; resume with --model v0"):
        opened.check_model("v0_s", str(out))
    opened.close()


def test_a_resume_refused_for_another_model_keeps_even_the_cut_line(tmp_path):
    out = tmp_path / "x.jsonl"
    data = _jsonl([_row("a.wav", model="v0")]) + '{"audio": "b.w'
    out.write_text(data)
    opened = outputs.open_rows(str(out), "jsonl", ROW_FIELDS, resume=True)
    with pytest.raises(UsageError, match="written by model v0"):
        opened.check_model("v0_s", str(out))
    opened.close()
    assert out.read_text() == data


def test_a_folder_is_refused_and_a_refused_new_file_is_not_left_behind(tmp_path):
    with pytest.raises(UsageError, match="is a folder"):
        outputs.open_rows(str(tmp_path), "jsonl", ROW_FIELDS)
    with pytest.raises(UsageError, match="--resume needs rows a later run can read back"):
        outputs.open_rows(str(tmp_path / "new.json"), "json", ROW_FIELDS, resume=True)
    assert not (tmp_path / "new.json").exists()


def test_a_full_disk_names_the_file(tmp_path):
    if not os.path.exists("/dev/full"):
        pytest.skip("no /dev/full")
    opened = outputs.open_rows("/dev/full", "jsonl", ROW_FIELDS)
    writer = outputs.RowWriter("jsonl", opened.stream, fields=ROW_FIELDS)
    with pytest.raises(Exception, match="/dev/full: cannot write the output"):
        writer.write(_row("a.wav"))


def test_nan_never_reaches_a_json_row():
    out = io.StringIO()
    writer = outputs.RowWriter("jsonl", out, fields=("audio", "scores"))
    writer.write({"audio": "a.wav", "scores": {"x": float("nan")}, "error": None})
    assert json.loads(out.getvalue())["scores"]["x"] is None


# --- keys: ids unique, the same clip twice is two rows ---------------------------------------------


def test_ids_one_and_quoted_one_are_the_same_id(tmp_path):
    q = tmp_path / "q.jsonl"
    q.write_text(json.dumps({"id": 1, "audio": "a.wav", "question": "x?"}) + "\n"
                 + json.dumps({"id": "1", "audio": "b.wav", "question": "y?"}) + "\n")
    with pytest.raises(UsageError, match="id '1' is used by rows 1 and 2"):
        read_questions(str(q))


def test_the_same_clip_twice_is_two_rows_of_work():
    rows = [_row("a.wav"), _row("./a.wav"), _row("b.wav")]
    keys = outputs.numbered_keys(rows)
    assert keys[0][0] == keys[1][0] and [n for _, n in keys] == [0, 1, 0]


# --- inputs ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("duration, window, hop", [(100.0, 10.0, 60.0), (120.0, 10.0, 60.0), (30.0, 5.0, 15.0)])
def test_no_window_starts_at_or_after_the_end(duration, window, hop):
    spans = windows(duration, window, hop)
    assert spans and all(0 <= s < e <= duration for s, e in spans)


def test_a_list_that_includes_itself_is_refused(tmp_path):
    a, b = tmp_path / "a.txt", tmp_path / "b.txt"
    a.write_text(f"@{b}\n")
    b.write_text(f"x.wav\n@{a}\n")
    with pytest.raises(UsageError, match="includes itself"):
        expand_inputs([f"@{a}"])


def test_a_bom_is_not_part_of_the_first_path(tmp_path):
    lst = tmp_path / "list.txt"
    lst.write_bytes("\ufeffone.wav\ntwo.wav\n".encode("utf-8"))
    assert expand_inputs([f"@{lst}"]) == ["one.wav", "two.wav"]


def test_a_glob_match_named_like_a_list_is_a_file(tmp_path):
    (tmp_path / "@b.wav").write_bytes(b"x")
    assert expand_inputs([str(tmp_path / "*.wav")]) == [str(tmp_path / "@b.wav")]


def test_absurd_amplitudes_are_an_audio_error(tmp_path):
    from conftest import mellow_clip as load_clip

    path = tmp_path / "huge.wav"
    sf.write(path, (np.sin(np.arange(16000) / 5) * 1e38).astype(np.float32), 16000, subtype="FLOAT")
    with pytest.raises(AudioError, match="far outside"):
        load_clip(str(path))


# --- through the command line ----------------------------------------------------------------------


def test_a_second_run_on_the_same_output_is_refused_and_resume_completes(tiny_model_dir, clips, tmp_path):
    out = tmp_path / "caps.jsonl"
    args = ["caption", *map(str, clips), "--model", str(tiny_model_dir), "--max-tokens", "3", "-f", "jsonl",
            "-o", str(out), "-q"]
    assert mellow(*args, "--shard", "1/2").returncode == 0
    first = out.read_text()
    again = mellow(*args, "--shard", "2/2")
    assert again.returncode == 2 and "already holds" in again.stderr and out.read_text() == first
    assert mellow(*args, "--resume").returncode == 0
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert sorted(r["audio"] for r in rows) == sorted(map(str, clips))


def test_one_clip_twice_gets_two_rows_after_resume(tiny_model_dir, clips, tmp_path):
    lst = tmp_path / "list.txt"
    lst.write_text(f"{clips[0]}\n{clips[0]}\n")
    out = tmp_path / "caps.csv"
    args = ["caption", f"@{lst}", "--model", str(tiny_model_dir), "--max-tokens", "3", "-f", "csv", "-o", str(out), "-q"]
    assert mellow(*args).returncode == 0
    text = out.read_text()
    out.write_text(text[: text.rfind("\n", 0, len(text) - 1) + 1])  # the second row lost to a kill
    assert mellow(*args, "--resume").returncode == 0
    assert len(list(csv.DictReader(io.StringIO(out.read_text())))) == 2


def test_a_question_with_a_newline_is_resumed_without_duplicates(tiny_model_dir, clips, tmp_path):
    out = tmp_path / "q.csv"
    args = ["ask", *map(str, clips), "what\nis it?", "--model", str(tiny_model_dir), "--max-tokens", "2", "-q",
            "-f", "csv", "-o", str(out)]
    assert mellow(*args).returncode == 0
    first = out.read_text()
    assert mellow(*args, "--resume").returncode == 0
    assert out.read_text() == first and len(list(csv.DictReader(io.StringIO(first)))) == 3


def test_a_tiny_temperature_answers_every_row(tiny_model_dir, clips, tmp_path):
    out = tmp_path / "a.jsonl"
    res = mellow("ask", *map(str, clips), "x?", "--sample", "--temperature", "1e-40", "--model",
                 str(tiny_model_dir), "--max-tokens", "2", "-q", "-f", "jsonl", "-o", str(out))
    assert res.returncode == 0, res.stderr
    assert [json.loads(line)["error"] for line in out.read_text().splitlines()] == [None, None, None]


def test_a_run_that_fails_before_its_first_row_leaves_no_new_file(tiny_model_dir, clips, tmp_path, monkeypatch):
    from mellow_cli.api import Model
    from mellow_cli.errors import ModelError

    def fails(*args, **kwargs):
        raise ModelError("the model failed")

    monkeypatch.setattr(Model, "ask_batch", fails)
    out = tmp_path / "a.jsonl"
    res = mellow("caption", *map(str, clips[:2]), "--model", str(tiny_model_dir), "-q", "-f", "jsonl", "-o", str(out))
    assert res.returncode == 1 and "the model failed" in res.stderr and not out.exists()
    out.write_text("")  # an empty file of the user's own is left as it was
    assert mellow("caption", *map(str, clips[:2]), "--model", str(tiny_model_dir), "-q", "-f", "jsonl", "-o",
                  str(out)).returncode == 1
    assert out.exists()


@pytest.mark.parametrize("extra, message", [
    (["--offset", "1e308"], "--offset"),
    (["--max-tokens", "100000000000"], "--max-tokens"),
    (["--seed", "100000000000000000000000"], "--seed"),
    (["--resume", "--overwrite", "-o", "x.jsonl", "-f", "jsonl"], "give one of the two"),
])
def test_absurd_values_are_usage_errors(tiny_model_dir, clips, extra, message):
    out = mellow("caption", str(clips[0]), str(clips[1]), "--model", str(tiny_model_dir), *extra)
    assert out.returncode == 2 and message in out.stderr and "unexpected" not in out.stderr


@pytest.mark.parametrize("flag", ["--tokens", "--repeat", "--batch-size", "--prompts"])
def test_bench_speed_refuses_absurd_sizes_before_loading(flag):
    out = mellow("bench", "speed", "--model", "no/such-model", flag, "100000000000")
    assert out.returncode == 2 and flag in out.stderr and "no/such-model" not in out.stderr


def test_a_forgotten_question_is_a_usage_error(tiny_model_dir, clips):
    out = mellow("ask", str(clips[0]), str(clips[1]), "--model", str(tiny_model_dir))
    assert out.returncode == 2 and "an audio file's name" in out.stderr
    out = mellow("ask", str(clips[0]), str(clips[0].parent), "--model", str(tiny_model_dir))
    assert out.returncode == 2 and "a folder: ask takes AUDIO [AUDIO2] QUESTION" in out.stderr


def test_an_empty_output_name_is_a_usage_error(tiny_model_dir, clips):
    out = mellow("caption", str(clips[0]), str(clips[1]), "--model", str(tiny_model_dir), "-o", "")
    assert out.returncode == 2 and "--output is empty" in out.stderr


def test_a_long_hop_keeps_every_window_good(tiny_model_dir, tmp_path):
    clip = write_tone(tmp_path / "long.flac", 300, seconds=40.0, sr=8000)
    out = mellow("caption", str(clip), "--window", "5", "--hop", "20", "--model", str(tiny_model_dir),
                 "--max-tokens", "2", "-f", "jsonl", "-q")
    assert out.returncode == 0, out.stderr
    rows = [json.loads(line) for line in out.stdout.splitlines()]
    assert [(r["start"], r["end"]) for r in rows] == [(0.0, 5.0), (20.0, 25.0)]


def test_ctrl_c_hint_only_where_resume_can_follow():
    from mellow_cli.io import results

    class Interrupting:
        def __init__(self):
            self.closed = False

        def write(self, r):
            raise KeyboardInterrupt

        def close(self):
            self.closed = True

    err = io.StringIO()
    import contextlib

    for resumable, hint in ((None, False), ("x.jsonl", True)):
        writer = Interrupting()
        with contextlib.redirect_stderr(err):
            tally = results.write_rows(writer, iter([({"error": None}, None)]), "captioned", 3, resumable)
        assert tally.interrupted and tally.written == 0 and writer.closed
        assert ("--resume" in err.getvalue()) is hint


def test_a_predictions_file_in_use_is_refused_to_a_second_bench_run(tmp_path):
    path = str(tmp_path / "preds.json")
    with outputs.held(path):
        ctx = multiprocessing.get_context("fork")
        with ctx.Pool(1) as pool:
            assert "another mellow run" in pool.apply(_try_predictions, (path,))
    assert _try_predictions(path) == "opened"  # the name is free again, and the new file is locked


def _try_predictions(path: str) -> str:
    from mellow_cli.bench import predictions

    try:
        with outputs.held(path):
            predictions.Writer(path, []).close()
        return "opened"
    except UsageError as e:
        return str(e)
