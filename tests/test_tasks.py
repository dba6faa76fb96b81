"""Tests for mellow_cli.train.tasks: the synthetic audio-reasoning dataset. The labels are checked by
measuring the audio (level, beep count, pitch direction, kind of sound), not by trusting the
generator."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

from mellow_cli.train import tasks
from conftest import mellow_clip as load_clip
from mellow_cli.train.data import read_rows, validate_rows

SR = 32000


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    out = tmp_path_factory.mktemp("tasks")
    train, val = tasks.make_tasks(out, rows=48, seed=0, val_rows=16)
    return out, train, val


def rows_of(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def read(out: Path, rel: str) -> np.ndarray:
    x, sr = sf.read(out / rel, dtype="float64")
    assert sr == SR
    return x


def event(x: np.ndarray) -> np.ndarray:
    """The sound itself: from the first to the last non-silent sample."""
    loud = np.flatnonzero(x)
    return x[loud[0]:loud[-1] + 1]


def level_db(x: np.ndarray) -> float:
    return float(20 * np.log10(np.sqrt(np.mean(event(x) ** 2))))


def count_beeps(x: np.ndarray) -> int:
    frames = np.sqrt(np.mean(x[: len(x) // 320 * 320].reshape(-1, 320) ** 2, axis=1))  # 10 ms
    on = frames > 0.1 * frames.max()
    return int(on[0] + np.sum(on[1:] & ~on[:-1]))


def pitch_direction(x: np.ndarray) -> str:
    e = event(x)
    third = len(e) // 3

    def zero_crossings(seg):
        return np.mean(np.abs(np.diff(np.signbit(seg).astype(int))))

    return "rises" if zero_crossings(e[-third:]) > zero_crossings(e[:third]) else "falls"


def kind_of(x: np.ndarray) -> str:
    """Tell tone, noise, clicks and chirp apart from the waveform alone."""
    e = event(x)
    ms = np.mean(e[: len(e) // 32 * 32].reshape(-1, 32) ** 2, axis=1)  # 1 ms frames
    if np.mean(ms < 0.01 * ms.max()) > 0.5:
        return "clicks"  # mostly silence between short bursts
    frames = e[: len(e) // 640 * 640].reshape(-1, 640)[1:-1]  # 20 ms frames, edges dropped
    peak = (np.abs(np.fft.rfft(frames * np.hanning(640), axis=1)) ** 2).argmax(axis=1)
    if np.max(np.bincount(peak)) >= 0.8 * len(peak):
        return "tone"  # one steady frequency
    rise = np.sign(peak[-1] - peak[0])
    if abs(np.log2((peak[-1] + 0.5) / (peak[0] + 0.5))) > 0.6 and np.mean(np.diff(peak) * rise >= 0) > 0.9:
        return "chirp"  # a frequency that moves one way
    return "noise"  # the strongest frequency wanders


def test_clips_are_exactly_10s_32k_mono(dataset):
    out, train, val = dataset
    files = sorted((out / "audio").glob("*.flac"))
    assert files
    for f in files:
        info = sf.info(f)
        assert (info.samplerate, info.frames, info.channels, info.format) == (SR, 10 * SR, 1, "FLAC")
    # So the model's window is the whole file, neither cropped nor tiled.
    x = read(out, files[0].relative_to(out).as_posix()).astype(np.float32)
    assert np.array_equal(load_clip(files[0]), x)


def test_rows_are_valid_training_rows(dataset):
    out, train, val = dataset
    for path, n in ((train, 48), (val, 16)):
        rows = rows_of(path)
        assert len(rows) == n
        for r in rows:
            assert r["answer"] in r["choices"] and list(r["choices"]) == list(tasks.TASKS[r["task"]][1])
            assert r["question"] == tasks.TASKS[r["task"]][0]
        good, bad = validate_rows(read_rows(path))
        assert bad == [] and len(good) == n
        assert all(Path(g.audio1).is_file() for g in good)
    train_clips = {r[k] for r in rows_of(train) for k in ("audio1", "audio2") if k in r}
    val_clips = {r[k] for r in rows_of(val) for k in ("audio1", "audio2") if k in r}
    assert not train_clips & val_clips


def test_classes_are_balanced(dataset):
    out, train, val = dataset
    rows = rows_of(train)
    assert Counter(r["task"] for r in rows) == {t: 12 for t in tasks.TASKS}
    for task, (_, choices) in tasks.TASKS.items():
        answers = Counter(r["answer"] for r in rows if r["task"] == task)
        assert answers == {c: 12 // len(choices) for c in choices}
    assert tasks.chance_accuracy(rows) == pytest.approx(7 / 16)
    assert tasks.chance_accuracy(read_rows(train)) == pytest.approx(7 / 16)


def test_labels_are_right(dataset):
    out, train, val = dataset
    seen = Counter()
    for r in rows_of(train) + rows_of(val):
        task = r["task"]
        x1 = read(out, r["audio1"])
        if task == "louder":
            d = level_db(x1) - level_db(read(out, r["audio2"]))
            assert abs(d) >= tasks.LOUDER_MIN_GAP_DB - 0.5
            assert r["answer"] == ("the first" if d > 0 else "the second")
        elif task == "pitch":
            assert "audio2" not in r
            assert pitch_direction(x1) == r["answer"]
        elif task == "beeps":
            assert "audio2" not in r
            assert ("one", "two", "three", "four")[count_beeps(x1) - 1] == r["answer"]
        else:
            assert r["audio1"] != r["audio2"]
            k1, k2 = kind_of(x1), kind_of(read(out, r["audio2"]))
            assert r["answer"] == ("yes" if k1 == k2 else "no"), (r, k1, k2)
        seen[task] += 1
    assert set(seen) == set(tasks.TASKS)


def test_the_kind_classifier_agrees_with_every_kind_clip(dataset):
    out, _, _ = dataset
    clips = sorted((out / "audio").glob("*_kind_*.flac"))
    assert {f.name.split("_")[2] for f in clips} == set(tasks.KINDS)
    for f in clips:
        assert kind_of(read(out, f.relative_to(out).as_posix())) == f.name.split("_")[2], f.name


def test_levels_do_not_give_answers_away(dataset):
    out, train, _ = dataset
    # Outside `louder`, the level is drawn independently of the answer: both ranges overlap.
    rows = [r for r in rows_of(train) if r["task"] == "pitch"]
    by_answer = {a: [level_db(read(out, r["audio1"])) for r in rows if r["answer"] == a] for a in ("rises", "falls")}
    assert all(tasks.MIN_DB - 0.5 <= v <= tasks.MAX_DB + 0.5 for vs in by_answer.values() for v in vs)
    assert max(by_answer["rises"]) > min(by_answer["falls"]) and max(by_answer["falls"]) > min(by_answer["rises"])


def test_same_seed_same_dataset(tmp_path):
    a = tasks.make_tasks(tmp_path / "a", rows=4, seed=3, val_rows=4)
    b = tasks.make_tasks(tmp_path / "b", rows=4, seed=3, val_rows=4)
    c = tasks.make_tasks(tmp_path / "c", rows=4, seed=4, val_rows=4)
    assert [p.read_text() for p in a] == [p.read_text() for p in b]
    assert [p.read_text() for p in a] != [p.read_text() for p in c]
    files = sorted(p.name for p in (tmp_path / "a" / "audio").iterdir())
    assert files == sorted(p.name for p in (tmp_path / "b" / "audio").iterdir())
    for name in files:
        assert np.array_equal(sf.read(tmp_path / "a" / "audio" / name)[0], sf.read(tmp_path / "b" / "audio" / name)[0])
    # val depends on the seed and its own size only
    d = tasks.make_tasks(tmp_path / "d", rows=8, seed=3, val_rows=4)
    assert d[1].read_text() == a[1].read_text()


def test_command_line(tmp_path, capsys):
    assert tasks.main([str(tmp_path / "out"), "--rows", "4", "--val-rows", "4", "--seed", "1"]) == 0
    captured = capsys.readouterr()
    assert captured.out.split() == [str(tmp_path / "out" / "train.jsonl"), str(tmp_path / "out" / "val.jsonl")]
    assert "chance accuracy 0.4375" in captured.err
    with pytest.raises(SystemExit):
        tasks.main([str(tmp_path / "out"), "--rows", "0"])
