"""MuChoMusic's published file read as its authors' code reads it (audio found through each
dataset's metadata), scored by their rule, and run end to end on a tiny model."""

from __future__ import annotations

import csv
import json

import pytest
from conftest import write_tone
from test_bench_mmau import bench

from mellow_cli.bench import muchomusic
from mellow_cli.errors import UsageError

ROWS = [
    ("sdd", "1042.json", "What is the tempo?", "fast", "slow", "medium", "none", "Rock", "['Tempo']", "[]"),
    ("sdd", "77.json", "Which instrument leads?", "piano", "violin", "drums", "voice", "Jazz", "[]", "['Instruments']"),
    ("musiccaps", "abcDEF_1.json", "What is the mood?", "calm", "angry", "tense", "joyful", "Pop", "['Mood']", "[]"),
]


def write_fixture(root):
    header = ["dataset", "dataset_identifier", "question", "correct_answer", "distractor_1_answer",
              "distractor_2_answer", "distractor_3_answer", "genre", "music_reasoning", "music_knowledge"]
    with open(root / "muchomusic.csv", "w", newline="") as f:
        csv.writer(f).writerows([header, *ROWS])
    (root / "sdd" / "audio" / "00").mkdir(parents=True)
    (root / "sdd" / "song_describer.csv").write_text("track_id,path\n1042,00/1042.mp3\n77,00/77.mp3\n")
    for track in ("1042", "77"):
        write_tone(root / "sdd" / "audio" / "00" / f"{track}.2min.wav", 440)
        (root / "sdd" / "audio" / "00" / f"{track}.2min.wav").rename(root / "sdd" / "audio" / "00" / f"{track}.2min.mp3")
    (root / "musiccaps" / "audio").mkdir(parents=True)
    (root / "musiccaps" / "musiccaps-public.csv").write_text("ytid,start_s,end_s\nabcDEF,30.0,40.0\n")
    write_tone(root / "musiccaps" / "audio" / "[abcDEF]-[30-40].wav", 660)
    return root / "muchomusic.csv"


def test_read_finds_the_audio_and_shuffles_each_row_the_same_way_every_time(tmp_path):
    data = write_fixture(tmp_path)
    items = muchomusic.read(str(data), str(tmp_path))
    assert [i.audio for i in items] == [str(tmp_path / "sdd/audio/00/1042.2min.mp3"),
                                        str(tmp_path / "sdd/audio/00/77.2min.mp3"),
                                        str(tmp_path / "musiccaps/audio/[abcDEF]-[30-40].wav")]
    assert all(sorted(i.choices) == sorted(r[3:7]) and i.answer == r[3] for i, r in zip(items, ROWS))
    assert [i.choices for i in muchomusic.read(str(data), str(tmp_path))] == [i.choices for i in items]
    assert len({i.choices.index(i.answer) for i in items}) > 1 or items[0].choices[0] != ROWS[0][3]  # shuffled
    assert items[0].record["music_reasoning"] == ["Tempo"] and items[1].record["music_knowledge"] == ["Instruments"]


def test_without_the_metadata_the_error_says_what_to_pass(tmp_path):
    data = write_fixture(tmp_path)
    (tmp_path / "sdd" / "song_describer.csv").unlink()
    with pytest.raises(UsageError, match="song_describer.csv .*pass --audio-dir"):
        muchomusic.read(str(data), str(tmp_path))


@pytest.mark.parametrize("output, pick", [
    ("The correct answer is: (B) slow", 1), ("B", 1), ("it is medium, I think", 2), ("(A) or (C)", -1),
    ("no idea", -1), ("Question: x The correct answer is: D", 3),
])
def test_the_authors_scorer_reads_a_letter_or_an_options_text(output, pick):
    assert muchomusic.picked(output, ["fast", "slow", "medium", "none"]) == pick


def test_bench_muchomusic_end_to_end(tiny_model_dir, tmp_path, monkeypatch):
    data = write_fixture(tmp_path)
    monkeypatch.chdir(tmp_path)
    out, report = bench("muchomusic", "--data", str(data), "--json", model=tiny_model_dir)
    assert out.returncode == 0, out.stderr
    assert report["score"]["counts"]["items"] == 3 and report["scored_with"].startswith("the authors' scorer")
    predictions = json.loads(next(tmp_path.glob("muchomusic-*-choices-muchomusic.json")).read_text())
    assert all(r["model_output"] in r["choices"] for r in predictions)
    refused = bench("muchomusic", "--data", str(data), "--prompt-style", "mellow", model=tiny_model_dir)[0]
    assert refused.returncode == 2 and "leave out --prompt-style" in refused.stderr
