"""Batch inputs and outputs: what the arguments expand to, and rows that parse back in every format."""

from __future__ import annotations

import csv
import io
import json

import pytest

from mellow_cli.io.jobs import FIELDS, Job, row
from mellow_cli.batch.loop import decoded_chunks
from mellow_cli.io.inputs import expand_inputs, json_lines, json_list
from mellow_cli.errors import AudioError, UsageError
from mellow_cli.io.formats import RowWriter


@pytest.fixture
def tree(tmp_path):
    (tmp_path / "sub").mkdir()
    for name in ("b.wav", "a.flac", "notes.txt", "sub/c.mp3", "sub/d.ogg"):
        (tmp_path / name).write_bytes(b"x")
    return tmp_path


def test_folder_lists_audio_sorted_and_recursive_descends(tree):
    assert expand_inputs([str(tree)]) == [str(tree / "a.flac"), str(tree / "b.wav")]
    assert expand_inputs([str(tree)], recursive=True) == [
        str(tree / "a.flac"), str(tree / "b.wav"), str(tree / "sub" / "c.mp3"), str(tree / "sub" / "d.ogg")]


def test_files_globs_lists_and_stdin_list(tree):
    listing = tree / "list.txt"
    listing.write_text(f"# my clips\n{tree / 'b.wav'}\n\n{tree / 'sub' / 'c.mp3'}\n")
    stdin = io.StringIO(f"{tree / 'a.flac'}\n")
    got = expand_inputs([str(tree / "b.wav"), str(tree / "sub" / "*.ogg"), f"@{listing}", "@-", "-"], stdin=stdin)
    assert got == [str(tree / "b.wav"), str(tree / "sub" / "d.ogg"), str(tree / "b.wav"),
                   str(tree / "sub" / "c.mp3"), str(tree / "a.flac"), "-"]


def test_missing_files_are_kept_for_their_row_to_report(tree):
    assert expand_inputs([str(tree / "gone.wav")]) == [str(tree / "gone.wav")]


@pytest.mark.parametrize("make, message", [
    (lambda t: str(t / "sub" / "*.wav"), "no files match"),
    (lambda t: str((t / "empty").mkdir() or t / "empty"), "no audio files in this folder"),
    (lambda t: "@" + str(t / "nolist.txt"), "no such list of paths"),
])
def test_inputs_that_name_nothing_are_usage_errors(tree, make, message):
    with pytest.raises(UsageError, match=message):
        expand_inputs([make(tree)])


ROWS = [
    {k: v for k, v in r.items() if k in FIELDS} for r in (
        row(Job("a.wav", "a.wav", "caption the audio."), answer='a dog barks, "twice", then\tstops', model="v0", revision="abc"),
        row(Job("b, c.wav", "b, c.wav", "caption the audio."), model="v0", error="not an audio file"),
    )
]


def _written(fmt: str, rows=ROWS) -> str:
    out = io.StringIO()
    writer = RowWriter(fmt, out)
    for r in rows:
        writer.write(r)
    writer.close()
    return out.getvalue()


def test_jsonl_and_json_parse_back():
    assert [json.loads(line) for line in _written("jsonl").splitlines()] == ROWS
    assert json.loads(_written("json")) == ROWS
    assert json.loads(_written("json", [])) == []


@pytest.mark.parametrize("fmt, delimiter", [("csv", ","), ("tsv", "\t")])
def test_csv_and_tsv_parse_back_with_every_field(fmt, delimiter):
    parsed = list(csv.DictReader(io.StringIO(_written(fmt)), delimiter=delimiter))
    assert tuple(parsed[0]) == FIELDS
    assert [{k: (v or None) for k, v in r.items()} for r in parsed] == ROWS


def test_text_has_answers_only_and_skips_failed_rows():
    assert _written("text") == 'a.wav\ta dog barks, "twice", then\tstops\n'
    out = io.StringIO()
    RowWriter("text", out, many=False).write(ROWS[0])
    assert out.getvalue() == ROWS[0]["answer"] + "\n"


def test_each_row_is_flushed_as_written():
    flushed = []

    class Stream(io.StringIO):
        def flush(self):
            flushed.append(self.getvalue().count("\n"))

    writer = RowWriter("jsonl", Stream())
    writer.write(ROWS[0])
    writer.write(ROWS[1])
    assert flushed == [1, 2]


def test_decoded_chunks_keep_order_and_errors():
    def decode(path):
        if path.startswith("bad"):
            raise AudioError(path, "not an audio file")
        return path.upper()

    paths = ["a", "bad1", "c", "d", "bad2"]
    chunks = list(decoded_chunks(paths, decode, size=2))
    assert [c for c, _ in chunks] == [["a", "bad1"], ["c", "d"], ["bad2"]]
    flat = [d for _, ds in chunks for d in ds]
    assert [clip for clip, _ in flat] == ["A", None, "C", "D", None]
    assert [err.problem if err else None for _, err in flat] == [None, "not an audio file", None, None, "not an audio file"]


@pytest.mark.parametrize("duration, window, hop, spans", [
    (4.0, 10.0, 10.0, [(0.0, 4.0)]),  # shorter than a window: one window, the whole recording
    (20.0, 10.0, 10.0, [(0.0, 10.0), (10.0, 20.0)]),
    (20.3, 10.0, 10.0, [(0.0, 10.0), (10.0, 20.0)]),  # a 0.3 s tail is not worth a row
    (21.0, 10.0, 10.0, [(0.0, 10.0), (10.0, 20.0), (20.0, 21.0)]),
    (12.0, 10.0, 4.0, [(0.0, 10.0), (4.0, 12.0)]),
])
def test_windows_cover_the_recording(duration, window, hop, spans):
    from mellow_cli.io.spans import windows

    assert windows(duration, window, hop) == spans


def test_a_window_walks_the_first_recording_and_hears_the_second_whole(tmp_path):
    import numpy as np
    from conftest import mellow_clip as load_clip
    from conftest import write_tone

    from mellow_cli.io.audio import audio_duration
    from mellow_cli.io.spans import clip_reader
    from mellow_cli.io.spans import windowed

    long, short = write_tone(tmp_path / "long.wav", 440, seconds=25), write_tone(tmp_path / "short.wav", 880, seconds=2)
    jobs = windowed([Job(str(long), str(short), "q")], 10, 10, audio_duration)
    assert [(j.start, j.end) for j in jobs] == [(0.0, 10.0), (10.0, 20.0), (20.0, 25.0)]
    decode = clip_reader(load_clip)
    whole = load_clip(str(short))
    for job in jobs:  # the short clip has nothing at 10 s or 20 s: cutting it there would fail
        first, second = decode(job)
        assert np.array_equal(second, whole)
    assert np.array_equal(decode(jobs[1])[0], load_clip(str(long), offset=10.0, duration=10.0))


def test_shards_are_disjoint_balanced_and_cover_the_list():
    from mellow_cli.io.jobs import parse_shard, take_shard

    items = list(range(11))
    parts = [take_shard(items, parse_shard(f"{i}/4")) for i in range(1, 5)]
    assert sorted(sum(parts, [])) == items and {len(p) for p in parts} == {2, 3}
    for bad in ("0/4", "5/4", "x", "1/0", "1-4"):
        with pytest.raises(UsageError):
            parse_shard(bad)




# --- reading input files back: only "\n" ends a line -----------------------------------------------


def test_questions_may_hold_line_separators_inside_their_strings(tmp_path):
    from mellow_cli.io.jobs import read_questions

    q = tmp_path / "q.jsonl"
    q.write_text(json.dumps({"audio": "a.wav", "question": "one\u2028two\x85three?"}, ensure_ascii=False) + "\r\n"
                 + json.dumps({"audio": "b.wav", "question": "four?"}) + "\n", encoding="utf-8", newline="")
    assert [j.question for j in read_questions(str(q))] == ["one\u2028two\x85three?", "four?"]


def test_pairs_keep_a_quoted_newline_and_lose_a_bom(tmp_path):
    from mellow_cli.io.jobs import read_pairs

    pairs = tmp_path / "pairs.csv"
    pairs.write_bytes('\ufeffaudio1,audio2,prompt\na.wav,b.wav,"first line\nsecond line"\nc.wav,d.wav,\n'.encode())
    jobs = read_pairs(str(pairs), "default?")
    assert [(j.audio, j.audio2, j.question) for j in jobs] == [
        ("a.wav", "b.wav", "first line\nsecond line"), ("c.wav", "d.wav", "default?")]
    pairs.write_bytes("\ufeffaudio1,audio2\na.wav,\n".encode())
    with pytest.raises(UsageError, match=r"pairs.csv: line 2: needs two recordings"):
        read_pairs(str(pairs), "default?")


def test_deeply_nested_json_in_questions_is_one_line(tmp_path):
    from mellow_cli.io.jobs import read_questions

    q = tmp_path / "deep.jsonl"
    q.write_text("[" * 100_000 + "]" * 100_000 + "\n")
    with pytest.raises(UsageError, match="deep.jsonl: line 1: JSON nested too deeply"):
        read_questions(str(q))


@pytest.mark.parametrize("name, read", [("long.jsonl", lambda p: list(json_lines(p))), ("long.json", json_list)])
def test_a_number_too_long_to_read_is_one_line_in_both_json_readers(tmp_path, name, read):
    """JSON lines and a JSON list fail the same ways: here, an integer past Python's digit limit."""
    path = tmp_path / name
    path.write_text('[{"audio": "a.wav", "n": ' + "1" * 5000 + "}]\n")
    with pytest.raises(UsageError) as e:
        read(str(path))
    place = ": line 1" if name.endswith("jsonl") else ""
    assert str(e.value) == f"{path}{place}: a number longer than 4300 digits"


@pytest.mark.parametrize("reader", ["list", "questions", "pairs"])
def test_an_endless_input_is_refused_in_one_line(reader):
    from mellow_cli.io import jobs

    read = {"list": lambda: expand_inputs(["@/dev/zero"]), "questions": lambda: jobs.read_questions("/dev/zero"),
            "pairs": lambda: jobs.read_pairs("/dev/zero", "x")}[reader]
    with pytest.raises(UsageError, match="/dev/zero: a device, not a .* \\(it never ends\\)"):
        read()


def test_an_input_past_the_size_limit_is_refused(tmp_path, monkeypatch):
    from mellow_cli.io import inputs

    monkeypatch.setattr(inputs, "MAX_TEXT_BYTES", 10)
    big = tmp_path / "list.txt"
    big.write_text("a.wav\nb.wav\nc.wav\n")
    with pytest.raises(UsageError, match="list.txt: larger than"):
        expand_inputs([f"@{big}"])
    with pytest.raises(UsageError, match="-: larger than"):
        expand_inputs(["@-"], stdin=io.StringIO("a.wav\n" * 5))
    assert expand_inputs(["@-"], stdin=io.StringIO("a.wav\n")) == ["a.wav"]
