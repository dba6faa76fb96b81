"""Formats libsndfile cannot read, read through FFmpeg (PyAV): m4a, mp4, webm, mkv, amr, wma; a window
of such a file decodes only its own stretch; a folder takes every file a reader opens and says
what it skipped. The clips are encoded here with PyAV from a synthesized tone."""

from __future__ import annotations

import json

import numpy as np
import pytest
from conftest import write_tone
from fakes import ScriptedModel, install
from test_cli_answers import mellow

from mellow_cli.errors import AudioError
from mellow_cli.io import audio

av = pytest.importorskip("av")

RATE = 48000


def encode(path, codec: str, seconds: float = 3.0, freq: float = 440.0, rate: int = RATE, fmt: str | None = None):
    """A tone written by FFmpeg's encoder `codec` into the container `path`'s name (or `fmt`) says."""
    t = np.arange(int(seconds * rate)) / rate
    wav = (0.3 * np.sin(2 * np.pi * freq * t)).astype(np.float32)
    with av.open(str(path), "w", format=fmt) as out:
        stream = out.add_stream(codec, rate=rate)
        stream.layout = "mono"
        if codec.startswith("wmav"):
            stream.bit_rate = 64000  # FFmpeg's WMA encoder takes no default bit rate
        for i in range(0, len(wav), 1024):
            frame = av.AudioFrame.from_ndarray(wav[None, i:i + 1024], format="fltp", layout="mono")
            frame.sample_rate = rate
            for packet in stream.encode(frame):
                out.mux(packet)
        for packet in stream.encode(None):
            out.mux(packet)
    return path


def pitch(wav: np.ndarray, sr: int) -> float:
    spectrum = np.abs(np.fft.rfft(wav * np.hanning(len(wav))))
    return float(np.argmax(spectrum) * sr / len(wav))


@pytest.mark.parametrize("name, codec, rate", [
    ("tone.m4a", "aac", RATE), ("tone.mp4", "aac", RATE), ("tone.mkv", "aac", RATE), ("tone.webm", "libopus", RATE),
    ("tone.amr", "libopencore_amrnb", 8000), ("tone.wma", "wmav2", 44100),
])
def test_a_format_only_ffmpeg_reads_is_heard(tmp_path, name, codec, rate):
    if codec not in av.codecs_available:
        pytest.skip(f"this FFmpeg has no {codec} encoder")
    path = encode(tmp_path / name, codec, rate=rate)
    assert audio.audio_duration(path) == pytest.approx(3.0, abs=0.1)
    wav = audio.load_audio(path, sr=16000)
    assert len(wav) == pytest.approx(48000, abs=1600) and pitch(wav, 16000) == pytest.approx(440, abs=5)
    window = audio.load_audio(path, sr=16000, offset=1.0, duration=1.0)
    assert len(window) == 16000 and pitch(window, 16000) == pytest.approx(440, abs=5)


def test_a_window_of_a_long_file_decodes_only_its_stretch(tmp_path, monkeypatch):
    from mellow_cli.io import ffmpeg

    path = encode(tmp_path / "long.m4a", "aac", seconds=60.0)
    decoded = []
    real = ffmpeg._float_frames
    monkeypatch.setattr(ffmpeg, "_float_frames", lambda frame, channels: decoded.append(frame.samples) or real(frame, channels))
    window = audio.load_audio(path, sr=16000, offset=40.0, duration=2.0)
    assert len(window) == 32000 and pitch(window, 16000) == pytest.approx(440, abs=5)
    assert sum(decoded) < 4 * RATE  # the 2 s asked for and a short run-in, not the 60 s of the file
    found = audio.probe(path, sr=16000, clip_seconds=10)  # what a caller bounding memory sees first
    assert found.seconds == pytest.approx(60, abs=0.1) and found.channels == 1 and found.samplerate == RATE


def test_without_pyav_such_a_file_says_what_to_install(tmp_path, monkeypatch):
    path = encode(tmp_path / "tone.m4a", "aac")
    monkeypatch.setitem(__import__("sys").modules, "av", None)  # import av fails
    with pytest.raises(AudioError, match=r"tone.m4a: cannot open this MP4/M4A .* \(PyAV, .* \(pip install av\)\)"):
        audio.audio_duration(path)


def test_a_file_that_is_not_audio_still_gets_its_one_line(tmp_path):
    notes = tmp_path / "notes.m4a"
    notes.write_text("a shopping list, not a sound\n" * 20)
    with pytest.raises(AudioError, match="not an audio file \\(looks like text\\)"):
        audio.audio_duration(notes)


def test_a_folder_takes_what_a_reader_opens_and_says_what_it_skipped(tmp_path, monkeypatch):
    folder = tmp_path / "phone"
    folder.mkdir()
    encode(folder / "memo.m4a", "aac")
    encode(folder / "clip.webm", "libopus")
    write_tone(folder / "field.wav", 330, seconds=1.0)
    encode(folder / "untitled", "aac", fmt="mp4")  # no extension: taken because FFmpeg opens it
    (folder / "notes.txt").write_text("nothing to hear\n")
    (folder / "cover.png").write_bytes(b"\x89PNG\r\n\x1a\n" + bytes(300))
    install(monkeypatch, ScriptedModel(answers=["a", "b", "c", "d"]))
    out = mellow("caption", str(folder), "--model", "any", "-f", "jsonl")
    assert out.returncode == 0, out.stderr
    rows = [json.loads(line) for line in out.stdout.splitlines()]
    assert [r["audio"].rsplit("/", 1)[1] for r in rows] == ["clip.webm", "field.wav", "memo.m4a", "untitled"]
    assert all(r["error"] is None for r in rows)
    assert f"{folder}: skipped 2 files no reader opens as audio (cover.png, notes.txt)" in out.stderr
