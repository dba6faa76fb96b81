"""Tests for mellow_cli.data: reading JSONL and ReasonAQA JSON, validation by line number, the
training dataset's waveforms and random windows, collate, and the validation split."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import torch
from conftest import write_tone

from mellow_cli.train import data
from conftest import mellow_clip as load_clip
from mellow_cli.models.mellow.config import MellowConfig
from mellow_cli.train.data import (
    BadRow,
    QADataset,
    QARow,
    collate,
    describe_bad,
    read_rows,
    split_val,
    validate_rows,
)
from mellow_cli.errors import UsageError

CFG = MellowConfig.tiny()


def write_jsonl(path: Path, rows: list) -> Path:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


def write_ramp(path: Path, seconds: float, sr: int = 32000) -> np.ndarray:
    """A rising ramp as float WAV: a window's first sample tells where in the file it starts."""
    ramp = (np.arange(round(seconds * sr)) / (seconds * sr)).astype(np.float32) * 0.9
    sf.write(path, ramp, sr, subtype="FLOAT")
    return ramp


# ---------------------------------------------------------------- reading


def test_jsonl_rows_fields_aliases_and_line_numbers(tmp_path):
    f = write_jsonl(tmp_path / "rows.jsonl", [
        {"audio1": "a.wav", "audio2": "b.wav", "question": "which is louder?", "answer": "the first",
         "choices": ["the first", "the second"], "id": 7},
        "",  # blank lines are skipped but still counted
        {"audio": "c.wav", "question": "how many beeps?", "answer": 3, "choices": "1| 2 |3"},
        {"audio1": "d.wav", "question": "what is it?", "answer": "a dog"},
    ])
    a, c, d = read_rows(f)
    assert a == QARow(str(tmp_path / "a.wav"), str(tmp_path / "b.wav"), "which is louder?", "the first",
                      ("the first", "the second"), "7", 1)
    assert (c.audio1, c.audio2, c.answer, c.choices, c.line) == (str(tmp_path / "c.wav"), None, "3", ("1", "2", "3"), 3)
    assert (d.choices, d.id, d.line) == (None, None, 4)


def test_reasonaqa_json_mapping(tmp_path):
    items = [
        {"taskname": "audiocaps", "filepath1": "AudioCaps/test/x.wav", "filepath2": "AudioCaps/test/y.wav",
         "caption1": "A Rocket flies by", "caption2": "Water trickling.", "input": "explain the difference in few words",
         "answer": "Audio 1 is LOUD, audio 2 is calm.", "subtype": "ACD-1.json"},
        {"taskname": "clothov21", "filepath1": "Clotho/dev/z.wav", "filepath2": "", "caption1": "Birds Sing",
         "caption2": "", "input": "Is there a Bird? answer yes or no", "answer": "Yes", "subtype": "CLE.json"},
        {"taskname": "clothov21", "filepath1": "Clotho/dev/z.wav", "filepath2": "", "caption1": "Birds Sing",
         "caption2": "", "input": "caption first audio", "answer": "", "subtype": "AudioCaps.json"},
        {"taskname": "audiocaps", "filepath1": "p.wav", "filepath2": "q.wav", "caption1": "A dog barks",
         "caption2": "A cat meows", "input": "caption both audios", "answer": ""},
    ]
    f = tmp_path / "train.json"
    f.write_text(json.dumps(items, indent=2))
    diff, bird, cap, both = read_rows(f, audio_root=tmp_path / "root")
    root = tmp_path / "root"
    assert diff.audio1 == str(root / "AudioCaps/test/x.wav") and diff.audio2 == str(root / "AudioCaps/test/y.wav")
    assert diff.question == "explain the difference between the two audios in few words."
    assert diff.answer == "audio 1 is loud, audio 2 is calm."
    assert (bird.audio2, bird.question, bird.answer, bird.choices, bird.line) == (
        None, "is there a bird? answer yes or no", "yes", None, 1)
    assert (cap.question, cap.answer, cap.where) == ("caption the audio", "birds sing", "item [2]")
    assert both.answer == "the audio 1 is a dog barks. the audio 2 is a cat meows."


def test_audio_root_resolution(tmp_path):
    sub = tmp_path / "lists"
    sub.mkdir()
    absolute = str(tmp_path / "abs.wav")
    f = write_jsonl(sub / "rows.jsonl", [{"audio1": "clips/a.wav", "audio2": absolute, "question": "q", "answer": "a"}])
    (row,) = read_rows(f)  # no root: relative to the data file's folder
    assert row.audio1 == str(sub / "clips/a.wav") and row.audio2 == absolute
    (row,) = read_rows(f, audio_root=tmp_path / "elsewhere")
    assert row.audio1 == str(tmp_path / "elsewhere/clips/a.wav") and row.audio2 == absolute


def test_unparseable_files_name_file_and_line(tmp_path):
    f = write_jsonl(tmp_path / "rows.jsonl", [{"audio1": "a", "question": "q", "answer": "a"}, "{not json"])
    with pytest.raises(UsageError, match=r"rows\.jsonl: line 2: not JSON"):
        read_rows(f)
    g = tmp_path / "list.json"
    g.write_text('[\n  {"filepath1": "a", "input": "q", "answer": "a"},\n  {"filepath1": "b",,}\n]')
    with pytest.raises(UsageError, match=r"list\.json: not JSON \(.* at line 3, column"):
        read_rows(g)
    h = write_jsonl(tmp_path / "scalar.jsonl", ['{"audio1": "a", "question": "q", "answer": "a"}', "[1, 2]"])
    with pytest.raises(UsageError, match=r"scalar\.jsonl: line 2: expected a JSON object, got list"):
        read_rows(h)
    k = write_jsonl(tmp_path / "types.jsonl", [{"audio1": "a", "question": ["q"], "answer": "a"}])
    with pytest.raises(UsageError, match=r"types\.jsonl: line 1: \"question\" must be a string"):
        read_rows(k)
    with pytest.raises(UsageError, match="no such file"):
        read_rows(tmp_path / "missing.jsonl")


# ---------------------------------------------------------------- validation


def test_each_problem_is_reported_by_line(tmp_path):
    write_tone(tmp_path / "good.wav", seconds=1.0)
    (tmp_path / "text.wav").write_text("this is not audio\n")
    ok = {"audio1": "good.wav", "question": "q", "answer": "a"}
    f = write_jsonl(tmp_path / "rows.jsonl", [
        ok,
        {**ok, "audio1": "missing.wav"},
        {**ok, "audio2": "text.wav"},
        {**ok, "question": "  "},
        {**ok, "answer": ""},
        {**ok, "choices": ["b", "c"]},
        {**ok, "answer": "a", "choices": ["a"]},
        {**ok, "choices": ["a", "b"]},
        {"question": "q", "answer": "a"},
        {**ok, "choices": "a|a"},
    ])
    good, bad = validate_rows(read_rows(f))
    assert [r.line for r in good] == [1, 8]
    problems = {int(b.where.removeprefix("line ")): b.problem for b in bad}
    assert sorted(problems) == [2, 3, 4, 5, 6, 7, 9, 10]
    assert "audio1" in problems[2] and "missing.wav" in problems[2] and "no such file" in problems[2]
    assert "audio2" in problems[3] and "text.wav" in problems[3] and "not an audio file" in problems[3]
    assert problems[4] == "empty question"
    assert problems[5] == "empty answer"
    assert "not one of the choices" in problems[6]
    assert "at least two" in problems[7]
    assert problems[9] == "no audio1 path"
    assert "repeat" in problems[10]
    text = describe_bad(f, bad, limit=3)
    assert text.splitlines()[0] == f"{f}: line 2: {problems[2]}"
    assert text.splitlines()[-1] == "... and 5 more bad rows" and len(text.splitlines()) == 4


def test_each_distinct_clip_is_decoded_once(tmp_path, monkeypatch):
    write_tone(tmp_path / "a.wav", seconds=0.5)
    write_tone(tmp_path / "b.wav", seconds=0.5)
    rows = [QARow(str(tmp_path / n1), n2 and str(tmp_path / n2), "q", "a", line=i)
            for i, (n1, n2) in enumerate([("a.wav", "b.wav"), ("b.wav", None), ("a.wav", "a.wav")], 1)]
    calls = []
    real = data.load_audio
    monkeypatch.setattr(data, "load_audio", lambda p, **kw: calls.append(p) or real(p, **kw))
    done = []
    good, bad = validate_rows(rows, workers=2, progress=done.append)
    assert len(good) == 3 and bad == []
    assert sorted(calls) == [str(tmp_path / "a.wav"), str(tmp_path / "b.wav")] and sum(done) == 2
    calls.clear()
    assert validate_rows([QARow(str(tmp_path / "nope.wav"), None, "q", "a")], check_audio=False)[1] == []
    assert calls == []


def test_describe_bad_short_list():
    assert describe_bad("f.jsonl", [BadRow("line 3", "empty answer")]) == "f.jsonl: line 3: empty answer"
    assert describe_bad("f.json", [BadRow("item [0]", "empty answer")]) == "f.json: item [0]: empty answer"


# ---------------------------------------------------------------- dataset


def test_dataset_items(tmp_path):
    write_tone(tmp_path / "a.wav", freq=440, seconds=3.0, sr=16000)
    write_tone(tmp_path / "b.wav", freq=880, seconds=12.0, sr=44100)
    rows = [QARow(str(tmp_path / "a.wav"), None, "q1", "a1"),
            QARow(str(tmp_path / "a.wav"), str(tmp_path / "b.wav"), "q2", "a2", ("a2", "x"))]
    ds = QADataset(rows, CFG, seed=0, random_window=False)
    assert len(ds) == 2
    one, two = ds[0], ds[1]
    for item in (one, two):
        for key in ("wav1", "wav2"):
            assert item[key].dtype == torch.float32 and item[key].shape == (CFG.clip_samples,)
    assert one["wav2"] is one["wav1"]
    assert two["wav2"] is not two["wav1"] and not torch.equal(two["wav1"], two["wav2"])
    assert (two["question"], two["answer"], two["choices"], two["index"]) == ("q2", "a2", ("a2", "x"), 1)
    # Without random windows: exactly what inference feeds the model.
    assert np.array_equal(two["wav2"].numpy(), load_clip(rows[1].audio2))


def test_random_window_is_seeded_by_seed_epoch_and_index(tmp_path):
    ramp = write_ramp(tmp_path / "long.wav", 30.0)
    short = tmp_path / "short.wav"
    write_tone(short, seconds=4.0, sr=32000)
    rows = [QARow(str(tmp_path / "long.wav"), None, "q", "a"), QARow(str(short), None, "q", "a")]
    ds = QADataset(rows, CFG, seed=5)

    def start(d: QADataset, i: int = 0) -> int:
        wav = d[i]["wav1"].numpy()
        s = int(np.argmin(np.abs(ramp - wav[0])))
        assert np.array_equal(wav, ramp[s:s + CFG.clip_samples])  # a real 10 s window, untiled
        return s

    first = start(ds)
    assert start(QADataset(rows, CFG, seed=5)) == first  # same seed, epoch, index: same window
    starts = {first}
    for epoch in (1, 2, 3):
        ds.set_epoch(epoch)
        starts.add(start(ds))
    assert len(starts) == 4  # each epoch its own window
    ds.set_epoch(1)
    assert start(ds) in starts and start(ds) == start(ds)  # and epoch 1 again is epoch 1's
    assert len({start(QADataset(rows, CFG, seed=s)) for s in range(4)}) == 4
    assert all(0 <= s <= len(ramp) - CFG.clip_samples for s in starts)
    # A clip no longer than 10 s keeps the inference policy (tiled), and so does random_window=False.
    assert np.array_equal(ds[1]["wav1"].numpy(), load_clip(short))
    assert start(QADataset(rows, CFG, seed=5, random_window=False)) == 0


def test_collate_and_dataloader(tmp_path):
    write_tone(tmp_path / "a.wav", seconds=1.0)
    write_tone(tmp_path / "b.wav", freq=300, seconds=1.0)
    one = [QARow(str(tmp_path / "a.wav"), None, "q", "a"), QARow(str(tmp_path / "b.wav"), None, "q", "b", ("a", "b"))]
    ds = QADataset(one, CFG)
    batch = collate([ds[0], ds[1]])
    assert batch["wav1"].shape == (2, CFG.clip_samples) and batch["wav1"].dtype == torch.float32
    assert batch["wav2"] is batch["wav1"]  # every row one clip: encode once
    assert batch["question"] == ["q", "q"] and batch["answer"] == ["a", "b"]
    assert batch["choices"] == [None, ("a", "b")]
    assert batch["index"].dtype == torch.long and batch["index"].tolist() == [0, 1]
    mixed = QADataset(one + [QARow(str(tmp_path / "a.wav"), str(tmp_path / "b.wav"), "q", "c")], CFG)
    loader = torch.utils.data.DataLoader(mixed, batch_size=3, collate_fn=collate)
    (batch,) = list(loader)
    assert batch["wav2"] is not batch["wav1"] and batch["wav2"].shape == (3, CFG.clip_samples)
    assert torch.equal(batch["wav2"][0], batch["wav1"][0]) and not torch.equal(batch["wav2"][2], batch["wav1"][2])


# ---------------------------------------------------------------- split


def test_split_val_is_deterministic_and_keeps_clips_together():
    rows = [QARow(f"clip{i % 25}.wav", None, f"q{i}", "a", line=i + 1) for i in range(100)]
    train, val = split_val(rows, 0.2, seed=0)
    assert split_val(rows, 0.2, seed=0) == (train, val)
    assert split_val(rows, 0.2, seed=1) != (train, val)
    assert len(train) + len(val) == 100 and 20 <= len(val) <= 24
    assert not {r.audio1 for r in train} & {r.audio1 for r in val}
    assert [r.line for r in train] == sorted(r.line for r in train)  # file order kept
    same_clip = [QARow("one.wav", None, f"q{i}", "a", line=i) for i in range(10)]
    train, val = split_val(same_clip, 0.3, seed=0)
    assert (len(train), len(val)) == (7, 3)
    with pytest.raises(UsageError):
        split_val(rows, 1.0, seed=0)


# ---------------------------------------------------------------- the official format


def write_official(path: Path, rows: list[dict]) -> Path:
    full = [{"filepath1": "", "filepath2": "", "caption1": "", "caption2": "", "input": "", "answer": "", **r}
            for r in rows]
    path.write_text(json.dumps(full))
    return path


def test_official_text_templates_and_casing():
    from mellow_cli.train import templates as T
    from mellow_cli.train.templates import OfficialText, first, realize

    caps = dict(caption1="A Dog Barks.", caption2="Rain On A Roof")
    assert realize(OfficialText("caption both audios", "", **caps), first) == (
        T.BOTH[0], "The audio 1 is a dog barks. The audio 2 is rain on a roof.")
    assert realize(OfficialText("caption first audio", "", **caps), first) == (T.FIRST[0], "The audio 1 is a dog barks.")
    assert realize(OfficialText("caption second audio", "", **caps), first) == (T.SECOND[0], "The audio 2 is rain on a roof.")
    last = lambda items: items[-1]  # noqa: E731
    for keyword, paraphrases in (("explain the difference in few words", T.WORDONLY),
                                 ("explain the difference in a sentence", T.LONGLINEONLY),
                                 ("explain the difference in detail", T.DETAILONLY)):
        assert realize(OfficialText(keyword, "The First Is Louder"), last) == (paraphrases[-1], "The First Is Louder")
    assert realize(OfficialText("Listen. emo_emo_emo Answer Briefly", "Happy"), first) == (
        f"Listen. {T.EMOTION[0]} Answer Briefly", "Happy")
    # anything else: both lower-cased; keywords match exactly, so another casing is "anything else"
    assert realize(OfficialText("Which Clip Is LOUDER?", "The First"), first) == ("which clip is louder?", "the first")
    assert realize(OfficialText("Caption First Audio", "X"), first) == ("caption first audio", "x")
    assert (len(T.BOTH), len(T.FIRST), len(T.SECOND), len(T.EMOTION)) == (96, 102, 95, 103)


def test_official_rows_paths_data_root_and_backslashes(tmp_path):
    root = tmp_path / "audio_root"
    f = write_official(tmp_path / "rows.json", [
        {"filepath1": "clips\\a.wav", "filepath2": "clips/b.wav", "input": "explain the difference in detail",
         "answer": "A Is Louder"},
        {"filepath1": "/abs/c.wav", "input": "caption first audio", "caption1": "A Cat."},
    ])
    official = read_rows(f, audio_root=root, text="official")
    assert official[0].audio1 == str(root / "clips" / "a.wav") and official[0].audio2 == str(root / "clips" / "b.wav")
    assert official[1].audio1 == "/abs/c.wav" and official[1].audio2 is None
    assert official[1].official is not None and official[1].answer == "The audio 1 is a cat."
    # the mellow reading of the same file: fixed phrasing, lower-cased, nothing drawn later
    mine = read_rows(f, audio_root=root)
    assert mine[0].official is None and mine[0].answer == "a is louder"
    assert mine[0].audio1 == official[0].audio1
    # without a root, paths start at the data file's folder
    assert read_rows(f, text="official")[0].audio1 == str(tmp_path / "clips" / "a.wav")


def test_official_dataset_draws_text_and_second_clip_per_epoch(tmp_path):
    clips = [write_tone(tmp_path / f"{i}.wav", freq=200 + 100 * i, seconds=1.0) for i in range(6)]
    f = write_official(tmp_path / "rows.json", [
        {"filepath1": c.name, "input": "caption first audio", "caption1": f"Tone {i}"} for i, c in enumerate(clips)])
    rows = read_rows(f, text="official")

    def draws(second_clip, epoch, seed=0):
        ds = QADataset(rows, CFG, seed=seed, second_clip=second_clip)
        ds.set_epoch(epoch)
        return [ds[i] for i in range(len(ds))]

    a, again, later = draws("random", 0), draws("random", 0), draws("random", 1)
    assert [x["question"] for x in a] == [x["question"] for x in again]  # seeded: a resume draws the same
    assert all(torch.equal(x["wav2"], y["wav2"]) for x, y in zip(a, again))
    assert [x["question"] for x in a] != [x["question"] for x in later]  # drawn anew each epoch
    assert all(x["answer"] == f"The audio 1 is tone {i}." for i, x in enumerate(a))
    others = sum(not torch.equal(x["wav1"], x["wav2"]) for x in a + later)
    assert others >= 6  # mostly another clip: 1 in 6 draws its own
    assert all(x["wav2"] is x["wav1"] for x in draws("first", 0))  # ours: clip 1 twice


def test_several_files_are_read_as_one_list(tmp_path):
    from mellow_cli.train.recipe import options
    from mellow_cli.train.datasets import training_rows
    from mellow_cli.train.world import World

    for name in ("a", "b"):
        write_tone(tmp_path / f"{name}.wav", seconds=1.0)
    one = write_official(tmp_path / "one.json", [{"filepath1": "a.wav", "input": "What Is It?", "answer": "A Tone"}])
    two = write_official(tmp_path / "two.json", [{"filepath1": "b.wav", "input": "caption first audio",
                                                  "caption1": "A Tone"},
                                                 {"filepath1": "missing.wav", "input": "x", "answer": "y"}])
    opts = options("official", data=(str(one), str(two)), out=str(tmp_path / "run"), skip_bad=True)
    events = []
    train, val = training_rows(opts, events.append, World())
    assert [r.audio1 for r in train] == [str(tmp_path / "a.wav"), str(tmp_path / "b.wav")] and val == []
    assert [e["path"] for e in events if e["event"] == "checking"] == [str(one), str(two)]
    assert any("item [1]" in e.get("message", "") for e in events if e["event"] == "note")
