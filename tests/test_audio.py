"""Tests for mellow_cli.audio: decoding, mono, resampling, the 10 s window policy, stdin, and one
AudioError per kind of bad input. Every file is generated here with numpy + soundfile."""

from __future__ import annotations

import builtins
import io
import math
import os
import struct
import sys
import tracemalloc
import zipfile
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import soxr

from mellow_cli.io import audio
from mellow_cli.io.audio import audio_duration
from mellow_cli.models.mellow.family import fit_clip as _fit_clip

# These tests read audio as Mellow hears it: 10 s clips at 32 kHz, a short one tiled.
SAMPLE_RATE, CLIP_SECONDS = 32000, 10
CLIP_SAMPLES = SAMPLE_RATE * CLIP_SECONDS


def fit_clip(wav, n_samples: int = CLIP_SAMPLES):
    return _fit_clip(wav, n_samples)


def load_audio(source, **kw):
    return audio.load_audio(source, **{"sr": SAMPLE_RATE, **kw})


def load_clip(source, **kw):
    return audio.load_clip(source, sr=SAMPLE_RATE, clip_seconds=CLIP_SECONDS, fit=fit_clip, **kw)
from mellow_cli.errors import AudioError, UsageError

# ---------------------------------------------------------------- helpers


def tone(freq: float, seconds: float, sr: int, amp: float = 0.5) -> np.ndarray:
    return amp * np.sin(2 * np.pi * freq * np.arange(round(seconds * sr)) / sr)


def tones_per_second(seconds: int, sr: int) -> np.ndarray:
    """Second k holds a pure tone at 300 + 200 k Hz: the content tells which second it came from."""
    return np.concatenate([tone(300 + 200 * k, 1, sr) for k in range(seconds)])


def write(path: Path, data, sr: int, subtype: str | None = None, fmt: str | None = None) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    sf.write(path, data, sr, subtype=subtype, format=fmt)
    return path


def encode(data, sr: int, fmt: str, subtype: str | None = None) -> bytes:
    buf = io.BytesIO()
    sf.write(buf, data, sr, format=fmt, subtype=subtype)
    return buf.getvalue()


def peak_hz(wav: np.ndarray, sr: int) -> float:
    spectrum = np.abs(np.fft.rfft(wav * np.hanning(len(wav))))
    return float(np.argmax(spectrum)) * sr / len(wav)


def rms(x: np.ndarray) -> float:
    return float(np.sqrt(np.mean(np.asarray(x, dtype=np.float64) ** 2)))


class FakeStdin:
    """Stands in for sys.stdin: `.buffer` is the byte stream, as for the real one."""

    def __init__(self, data: bytes, tty: bool = False):
        self.buffer = io.BytesIO(data)
        self._tty = tty

    def isatty(self) -> bool:
        return self._tty


@pytest.fixture(autouse=True)
def fresh_stdin(monkeypatch):
    """Each test starts as a new process would: standard input not yet read."""
    monkeypatch.setattr(audio, "_stdin_bytes", None)


# ---------------------------------------------------------------- formats and sample types

LOSSLESS = [  # (extension, format, subtype, tolerance against the resampled original)
    ("wav", "WAV", "PCM_U8", 2e-2),
    ("wav", "WAV", "PCM_16", 2e-4),
    ("wav", "WAV", "PCM_24", 1e-5),
    ("wav", "WAV", "PCM_32", 1e-5),
    ("wav", "WAV", "FLOAT", 1e-5),
    ("wav", "WAV", "DOUBLE", 1e-5),
    ("flac", "FLAC", "PCM_16", 2e-4),
    ("flac", "FLAC", "PCM_24", 1e-5),
    ("aiff", "AIFF", "PCM_16", 2e-4),
]


@pytest.mark.parametrize("ext,fmt,subtype,tol", LOSSLESS, ids=[f"{c[0]}-{c[2]}" for c in LOSSLESS])
def test_lossless_formats_decode_to_the_resampled_signal(tmp_path, ext, fmt, subtype, tol):
    sr = 44100
    x = tone(1000, 2, sr)
    path = write(tmp_path / f"a.{ext}", x, sr, subtype, fmt)
    wav = load_audio(path)
    assert wav.dtype == np.float32 and wav.ndim == 1 and len(wav) == 2 * SAMPLE_RATE
    expected = soxr.resample(x.astype(np.float32), sr, SAMPLE_RATE, quality="VHQ")
    assert np.abs(wav - expected).max() < tol


LOSSY = [
    ("ogg", "OGG", "VORBIS", 44100),
    ("opus", "OGG", "OPUS", 48000),
    ("mp3", "MP3", None, 44100),
]


@pytest.mark.parametrize("ext,fmt,subtype,sr", LOSSY, ids=[e for e, *_ in LOSSY])
def test_lossy_formats_keep_pitch_level_and_length(tmp_path, ext, fmt, subtype, sr):
    x = tone(1000, 2, sr)
    wav = load_audio(write(tmp_path / f"a.{ext}", x, sr, subtype, fmt))
    assert wav.dtype == np.float32 and len(wav) == 2 * SAMPLE_RATE
    assert abs(peak_hz(wav, SAMPLE_RATE) - 1000) <= SAMPLE_RATE / len(wav)
    assert rms(wav[3200:-3200]) == pytest.approx(rms(x), rel=0.05)


def test_integer_pcm_is_scaled_exactly(tmp_path):
    # At 32 kHz nothing is resampled, so this checks decoding alone: int16 k -> k / 32768.
    ints = np.array([0, 1, -1, 16384, 32767, -32768] * 100, dtype=np.int16)
    wav = load_audio(write(tmp_path / "i16.wav", ints, SAMPLE_RATE, "PCM_16"))
    np.testing.assert_array_equal(wav, ints.astype(np.float32) / 32768)
    ints32 = np.array([0, 2**30, -(2**31), 2**31 - 1] * 100, dtype=np.int32)
    wav = load_audio(write(tmp_path / "i32.wav", ints32, SAMPLE_RATE, "PCM_32"))
    np.testing.assert_allclose(wav, ints32 / 2**31, rtol=1e-7)


def test_float_samples_are_neither_clipped_nor_normalised(tmp_path):
    x = np.array([0.0, 1.5, -2.0, 0.25] * 100, dtype=np.float32)
    np.testing.assert_array_equal(load_audio(write(tmp_path / "f.wav", x, SAMPLE_RATE, "FLOAT")), x)


def test_silence_is_not_an_error(tmp_path):
    wav = load_clip(write(tmp_path / "quiet.wav", np.zeros(16000), 16000, "PCM_16"))
    assert wav.shape == (CLIP_SAMPLES,) and not wav.any()


def test_paths_with_spaces_and_non_ascii(tmp_path):
    path = tmp_path / "my clips" / "café – ünïcödé 音.flac"
    write(path, tone(440, 1, 16000), 16000)
    assert load_clip(path).shape == (CLIP_SAMPLES,)
    assert load_clip(str(path)).shape == (CLIP_SAMPLES,)
    assert audio_duration(path) == 1.0


# ---------------------------------------------------------------- mono


def test_stereo_is_averaged_not_concatenated(tmp_path):
    s = tone(440, 2, SAMPLE_RATE)
    opposite = write(tmp_path / "lr.wav", np.stack([s, -s], axis=1), SAMPLE_RATE, "FLOAT")
    wav = load_audio(opposite)
    assert len(wav) == len(s)  # concatenating the channels would double this
    assert np.abs(wav).max() < 1e-7  # L + R cancel
    left_only = write(tmp_path / "l.wav", np.stack([s, 0 * s], axis=1), SAMPLE_RATE, "FLOAT")
    np.testing.assert_allclose(load_audio(left_only), s / 2, atol=1e-7)


def test_stereo_cancels_after_resampling_too(tmp_path):
    s = tone(440, 1, 44100)
    wav = load_audio(write(tmp_path / "lr.flac", np.stack([s, -s], axis=1), 44100, "PCM_24"))
    assert len(wav) == SAMPLE_RATE and np.abs(wav).max() < 1e-6


def test_six_channels_average(tmp_path):
    levels = np.arange(1, 7) / 10  # 0.1 .. 0.6, mean 0.35
    data = np.ones((8000, 6)) * levels
    wav = load_audio(write(tmp_path / "51.wav", data, SAMPLE_RATE, "FLOAT"))
    np.testing.assert_allclose(wav, 0.35, atol=1e-6)


# ---------------------------------------------------------------- resampling


@pytest.mark.parametrize("sr", [8000, 16000, 22050, 44100, 48000, 96000])
def test_resampling_keeps_frequency_amplitude_and_length(tmp_path, sr):
    freq = 1234.5  # between FFT bins of neither rate
    x = tone(freq, 2, sr)
    wav = load_audio(write(tmp_path / f"{sr}.wav", x, sr, "FLOAT"))
    assert len(wav) == 2 * SAMPLE_RATE
    assert abs(peak_hz(wav, SAMPLE_RATE) - freq) <= SAMPLE_RATE / len(wav)  # within one bin
    assert rms(wav[3200:-3200]) == pytest.approx(rms(x), rel=0.01)


@pytest.mark.parametrize("sr,freq", [(48000, 20000), (96000, 30000), (44100, 17000)])
def test_resampling_does_not_alias(tmp_path, sr, freq):
    # A tone above the new 16 kHz Nyquist must vanish, not fold back to 32000 - freq Hz. The
    # first and last 0.1 s hold the filter's response to the file's abrupt start and end, so
    # the steady state in between is what is measured.
    x = tone(freq, 2, sr)
    wav = load_audio(write(tmp_path / "hi.wav", x, sr, "FLOAT"))
    attenuation_db = 20 * math.log10(rms(wav[3200:-3200]) / rms(x))
    assert attenuation_db < -90


# ---------------------------------------------------------------- fit_clip


def test_fit_clip_tiles_a_short_clip_like_the_reference():
    w = np.random.default_rng(0).standard_normal(3 * SAMPLE_RATE).astype(np.float32)
    clip = fit_clip(w)
    assert clip.shape == (CLIP_SAMPLES,) and clip.dtype == np.float32
    assert clip[3 * SAMPLE_RATE] == clip[0]
    for k in range(3):
        np.testing.assert_array_equal(clip[k * len(w) : (k + 1) * len(w)], w)
    np.testing.assert_array_equal(clip[9 * SAMPLE_RATE :], w[: SAMPLE_RATE])


def test_fit_clip_crops_a_long_clip_to_its_start_and_keeps_an_exact_one():
    w = np.arange(12 * SAMPLE_RATE, dtype=np.float32)
    np.testing.assert_array_equal(fit_clip(w), w[:CLIP_SAMPLES])
    np.testing.assert_array_equal(fit_clip(w[:CLIP_SAMPLES]), w[:CLIP_SAMPLES])
    np.testing.assert_array_equal(fit_clip(np.array([0.5]), 7), np.full(7, 0.5, np.float32))


def test_fit_clip_rejects_an_empty_waveform():
    with pytest.raises(ValueError):
        fit_clip(np.zeros(0, np.float32))


# ---------------------------------------------------------------- the window policy


@pytest.fixture(scope="module")
def ramp_file(tmp_path_factory) -> tuple[Path, np.ndarray]:
    """25 s at 32 kHz where every sample differs: any misplaced window shows."""
    ramp = (np.arange(25 * SAMPLE_RATE) / (25 * SAMPLE_RATE)).astype(np.float32)
    return write(tmp_path_factory.mktemp("ramp") / "ramp.wav", ramp, SAMPLE_RATE, "FLOAT"), ramp


def test_short_file_is_tiled_to_exactly_ten_seconds(tmp_path):
    ramp = (np.arange(3 * SAMPLE_RATE) / (3 * SAMPLE_RATE)).astype(np.float32)
    clip = load_clip(write(tmp_path / "short.wav", ramp, SAMPLE_RATE, "FLOAT"))
    assert clip.shape == (CLIP_SAMPLES,)
    assert clip[3 * SAMPLE_RATE] == clip[0]
    np.testing.assert_array_equal(clip, np.tile(ramp, 4)[:CLIP_SAMPLES])


def test_long_file_defaults_to_its_first_ten_seconds(ramp_file):
    path, ramp = ramp_file
    np.testing.assert_array_equal(load_clip(path), ramp[:CLIP_SAMPLES])


def test_offset_picks_the_window(ramp_file):
    path, ramp = ramp_file
    clip = load_clip(path, offset=7)
    np.testing.assert_array_equal(clip, ramp[7 * SAMPLE_RATE : 17 * SAMPLE_RATE])


def test_a_shorter_duration_is_tiled(ramp_file):
    path, ramp = ramp_file
    clip = load_clip(path, offset=7.5, duration=2)
    piece = ramp[240000:304000]
    np.testing.assert_array_equal(clip, np.tile(piece, 5))


def test_a_window_running_past_the_end_is_tiled(ramp_file):
    path, ramp = ramp_file
    clip = load_clip(path, offset=20)  # 5 s left
    np.testing.assert_array_equal(clip, np.tile(ramp[20 * SAMPLE_RATE :], 2))
    assert len(load_audio(path, offset=20, duration=10)) == 5 * SAMPLE_RATE


def test_load_audio_span_and_to_the_end(ramp_file):
    path, ramp = ramp_file
    np.testing.assert_array_equal(load_audio(path, offset=2, duration=3), ramp[64000:160000])
    np.testing.assert_array_equal(load_audio(path, offset=24), ramp[24 * SAMPLE_RATE :])
    np.testing.assert_array_equal(load_audio(path), ramp)


def test_offset_picks_the_right_second_after_resampling(tmp_path):
    path = write(tmp_path / "tones.wav", tones_per_second(14, 48000), 48000, "PCM_16")
    clip = load_clip(path, offset=3)
    for k in range(10):  # clip second k is file second 3 + k
        second = clip[k * SAMPLE_RATE + 1600 : (k + 1) * SAMPLE_RATE - 1600]
        assert abs(peak_hz(second, SAMPLE_RATE) - (300 + 200 * (3 + k))) < 40


SEEKABLE = [
    ("wav", "WAV", "FLOAT", 44100),
    ("flac", "FLAC", "PCM_24", 48000),
    ("ogg", "OGG", "VORBIS", 44100),
    ("mp3", "MP3", None, 44100),
    ("mp3", "MP3", None, 22050),
    ("mp3", "MP3", None, SAMPLE_RATE),  # no resampler context: the MP3 pre-roll alone
]


@pytest.mark.parametrize("ext,fmt,subtype,sr", SEEKABLE, ids=[f"{c[0]}-{c[3]}" for c in SEEKABLE])
def test_a_window_equals_the_same_span_of_the_whole_file(tmp_path, ext, fmt, subtype, sr):
    # Seeking must land on the right sample (MP3 needs the decoder pre-roll for this) and the
    # resampler must see the window's neighbours, so no edge artefacts either.
    # Pure tones: an MP3 encoder banks their spare bits in the reservoir, which is exactly what
    # a seek without pre-roll cannot recover (noise spends every bit and would hide the bug).
    path = write(tmp_path / f"tones.{ext}", tones_per_second(6, sr), sr, subtype, fmt)
    whole = load_audio(path)
    for offset, duration in [(1.2345, 1.5), (3.0, 2.0), (0.01, 0.5)]:
        window = load_audio(path, offset=offset, duration=duration)
        first = round(offset * SAMPLE_RATE)
        assert len(window) == round(duration * SAMPLE_RATE)
        np.testing.assert_allclose(window, whole[first : first + len(window)], atol=1e-5)


def test_offset_past_the_end_names_offset_and_duration(tmp_path):
    path = write(tmp_path / "six.wav", tone(440, 6, 8000), 8000, "PCM_16")
    for offset in (30, 6):
        with pytest.raises(AudioError) as e:
            load_clip(path, offset=offset)
        expected = f"offset {offset} s is past the end of the audio (6.00 s long)"
        assert str(e.value) == f"{path}: {expected}"


@pytest.mark.parametrize(
    "kwargs", [{"offset": -1}, {"offset": float("nan")}, {"duration": 0}, {"duration": -2},
               {"duration": 10.5}, {"duration": float("inf")}]
)
def test_bad_offset_or_duration_is_a_usage_error(ramp_file, kwargs):
    with pytest.raises(UsageError):
        load_clip(ramp_file[0], **kwargs)


# ---------------------------------------------------------------- decode only the window


@pytest.fixture(scope="module")
def long_file(tmp_path_factory) -> tuple[Path, np.ndarray]:
    """10 minutes of 8 kHz int16 noise: 9.6 MB on disk, 19.2 MB as float32 if read whole."""
    ints = np.random.default_rng(2).integers(-20000, 20000, 600 * 8000, dtype=np.int16)
    return write(tmp_path_factory.mktemp("long") / "long.wav", ints, 8000, "PCM_16"), ints


def _peak_bytes(fn) -> int:
    tracemalloc.start()
    try:
        fn()
        return tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


def test_a_window_of_a_long_file_costs_a_window_of_memory(long_file):
    path, _ = long_file
    window_peak = _peak_bytes(lambda: load_clip(path, offset=400))
    assert window_peak < 5e6  # the clip itself is 1.28 MB
    whole_peak = _peak_bytes(lambda: load_audio(path))  # the control: this measure can fail
    assert whole_peak > 19e6


def test_a_window_reads_only_its_frames(long_file, monkeypatch):
    asked = []
    real_read = sf.SoundFile.read

    def spy(self, frames=-1, *args, **kwargs):
        asked.append(frames)
        return real_read(self, frames, *args, **kwargs)

    monkeypatch.setattr(sf.SoundFile, "read", spy)
    load_clip(long_file[0], offset=400)
    assert asked and all(0 < n <= 10 * 8000 + 2 * 400 for n in asked)  # + resampler context
    asked.clear()
    assert audio_duration(long_file[0]) == 600.0
    assert asked == []  # the header alone


def test_a_window_of_a_long_file_holds_the_right_samples(long_file):
    path, ints = long_file
    wav = load_audio(path, offset=400, duration=2, sr=8000)
    np.testing.assert_array_equal(wav, ints[400 * 8000 : 402 * 8000] / np.float32(32768))


# ---------------------------------------------------------------- stdin


def test_stdin_reads_a_whole_file(tmp_path, monkeypatch):
    path = write(tmp_path / "a.flac", tone(440, 3, 22050), 22050)
    monkeypatch.setattr(sys, "stdin", FakeStdin(path.read_bytes()))
    np.testing.assert_array_equal(load_clip("-"), load_clip(path))


def test_stdin_is_read_once_and_can_be_used_twice(tmp_path, monkeypatch):
    data = encode(tone(440, 2, 16000), 16000, "WAV")
    monkeypatch.setattr(sys, "stdin", FakeStdin(data))
    first = load_clip("-")
    monkeypatch.setattr(sys, "stdin", FakeStdin(b"not read again"))
    np.testing.assert_array_equal(load_clip("-"), first)  # a clip paired with itself
    assert audio_duration("-") == 2.0


def test_empty_stdin_is_an_error(monkeypatch):
    monkeypatch.setattr(sys, "stdin", FakeStdin(b""))
    with pytest.raises(AudioError) as e:
        load_clip("-")
    assert str(e.value).startswith("<stdin>: empty input (0 bytes)")


def test_stdin_from_a_terminal_is_an_error_not_a_hang(monkeypatch):
    monkeypatch.setattr(sys, "stdin", FakeStdin(b"", tty=True))
    with pytest.raises(AudioError, match="^<stdin>: standard input is a terminal"):
        load_clip("-")


def test_stdin_garbage_is_named_stdin(monkeypatch):
    monkeypatch.setattr(sys, "stdin", FakeStdin(b"hello, this is not audio\n"))
    with pytest.raises(AudioError) as e:
        load_clip("-")
    assert str(e.value) == "<stdin>: not an audio file (looks like text)"


def test_a_path_object_named_dash_is_a_file(tmp_path, monkeypatch):
    write(tmp_path / "-", tone(440, 1, 16000), 16000, "PCM_16", "WAV")
    monkeypatch.chdir(tmp_path)
    assert len(load_audio(Path("-"))) == SAMPLE_RATE


# ---------------------------------------------------------------- bad input: one AudioError each

RNG = np.random.default_rng(3)
NOISE = RNG.integers(0, 256, 40000, dtype=np.uint8).tobytes()
WAV16 = encode(tone(440, 1, 16000), 16000, "WAV", "PCM_16")


def _wav_with_fmt_field(at: int, fmt: str, value: int) -> bytes:
    """WAV16 with one little-endian field of its 'fmt ' chunk (at bytes into it) overwritten."""
    data = bytearray(WAV16)
    start = data.find(b"fmt ") + 8 + at
    data[start : start + struct.calcsize(fmt)] = struct.pack(fmt, value)
    return bytes(data)


def _zip_bytes() -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as z:
        z.writestr("notes.txt", "a" * 1000)
    return buf.getvalue()


def _with_nonfinite(value: float, subtype: str) -> bytes:
    x = tone(440, 1, 16000)
    x[1234] = value
    return encode(x, 16000, "WAV", subtype)


def _half(data: bytes) -> bytes:
    return data[: len(data) // 2]


def _random_after_header(data: bytes, keep: int) -> bytes:
    return data[:keep] + NOISE[: len(data) - keep]


SECOND = tone(440, 1, 16000)
NON_FINITE = "contains NaN or infinite samples"
FLOAT_WAV = encode(SECOND, 16000, "WAV", "FLOAT")


BAD_FILES = {  # name: (file bytes, expected part of the problem)
    "empty": (b"", "empty file (0 bytes)"),
    "zero frames": (encode(np.zeros(0), 16000, "WAV", "PCM_16"), "no audio samples"),
    "text": (b"just some notes\nnot a sound\n" * 20, "not an audio file (looks like text)"),
    "png": (b"\x89PNG\r\n\x1a\n" + bytes(300), "not an audio file (looks like a PNG image)"),
    "zip": (_zip_bytes(), "not an audio file (looks like a zip archive)"),
    "random bytes": (NOISE, "not an audio file"),
    "m4a": (b"\x00\x00\x00\x20ftypM4A \x00\x00\x02\x00M4A isom" + bytes(300),
            "cannot open this MP4/M4A (AAC, ALAC) file (FFmpeg: "),
    "webm": (b"\x1aE\xdf\xa3" + bytes(300), "cannot open this Matroska/WebM file (FFmpeg: "),
    # format tag 0x2000 (AC-3), a codec libsndfile does not decode inside WAV: FFmpeg does, and
    # finds the tone's samples are not AC-3 frames
    "unknown wav codec": (_wav_with_fmt_field(0, "<H", 0x2000), "cannot decode the audio between 0.00 s and 1.00 s, "
                          "truncated or corrupt? (FFmpeg: "),
    "1 Hz": (_wav_with_fmt_field(4, "<I", 1), "sample rate 1 Hz is outside the supported 1000-"),
    "10 MHz": (_wav_with_fmt_field(4, "<I", 10_000_000), "sample rate 10000000 Hz is outside"),
    "nan": (_with_nonfinite(np.nan, "FLOAT"), NON_FINITE),
    "inf": (_with_nonfinite(np.inf, "DOUBLE"), NON_FINITE),
    # random float32 bit patterns include NaNs and infinities (exponent bits all ones)
    "float wav + random": (_random_after_header(FLOAT_WAV, 80), NON_FINITE),
    "flac + random": (_random_after_header(encode(SECOND, 16000, "FLAC"), 200), "cannot decode"),
    "flac cut mid-frame": (encode(np.tile(SECOND, 4), 16000, "FLAC")[:5000], "cannot decode"),
    "ogg cut in half": (_half(encode(tone(440, 4, 16000), 16000, "OGG")), "no audio samples"),
    "mp3 header only": (encode(tone(440, 2, 16000), 16000, "MP3")[:100], "not an audio file"),
}


@pytest.mark.parametrize("case", list(BAD_FILES))
def test_bad_file_is_one_audio_error(tmp_path, case):
    data, expected = BAD_FILES[case]
    path = tmp_path / "input.bin"
    path.write_bytes(data)
    with pytest.raises(AudioError) as e:
        load_clip(path)
    message = str(e.value)
    assert message.startswith(f"{path}: ") and "\n" not in message
    assert expected in e.value.problem
    assert e.value.path == str(path)


HEADER_CASES = ["empty", "zero frames", "text", "png", "m4a", "1 Hz", "10 MHz"]


@pytest.mark.parametrize("case", HEADER_CASES)
def test_audio_duration_rejects_bad_headers_too(tmp_path, case):
    data, _ = BAD_FILES[case]
    path = tmp_path / "x.wav"
    path.write_bytes(data)
    with pytest.raises(AudioError, match="x.wav: "):
        audio_duration(path)


def test_missing_file(tmp_path):
    with pytest.raises(AudioError) as e:
        load_clip(tmp_path / "nope.wav")
    assert str(e.value) == f"{tmp_path / 'nope.wav'}: no such file"


def test_directory(tmp_path):
    with pytest.raises(AudioError) as e:
        load_clip(tmp_path)
    assert str(e.value) == f"{tmp_path}: is a directory, not an audio file"


def test_raw_pcm_without_header(tmp_path):
    path = tmp_path / "x.raw"
    path.write_bytes(NOISE)
    with pytest.raises(AudioError, match="headerless raw audio is not supported"):
        load_clip(path)


def test_permission_denied_simulated(tmp_path, monkeypatch):
    # Tests often run as root, whom chmod does not stop; refuse the open() itself instead.
    path = write(tmp_path / "locked.wav", tone(440, 1, 16000), 16000)
    real_open = builtins.open

    def refusing_open(file, *args, **kwargs):
        if os.fspath(file) == str(path):
            raise PermissionError(13, "Permission denied", str(path))
        return real_open(file, *args, **kwargs)

    monkeypatch.setattr(builtins, "open", refusing_open)
    with pytest.raises(AudioError) as e:
        load_clip(path)
    assert str(e.value) == f"{path}: permission denied"


def test_permission_denied_for_real(tmp_path):
    path = write(tmp_path / "locked.wav", tone(440, 1, 16000), 16000)
    path.chmod(0)
    try:
        if os.access(path, os.R_OK):
            pytest.skip("this user (root) reads files whatever their mode; see the simulated test")
        with pytest.raises(AudioError, match="permission denied$"):
            load_clip(path)
    finally:
        path.chmod(0o644)


@pytest.mark.parametrize("error", [MemoryError(), RuntimeError("boom"), sf.LibsndfileError(1)])
def test_whatever_decoding_raises_becomes_an_audio_error(tmp_path, monkeypatch, error):
    path = write(tmp_path / "a.wav", tone(440, 1, 16000), 16000)

    def failing_read(*args, **kwargs):
        raise error

    monkeypatch.setattr(sf.SoundFile, "read", failing_read)
    with pytest.raises(AudioError, match=f"^{path}: "):
        load_clip(path)


def test_truncated_wav_decodes_what_is_there(tmp_path):
    # Decision: the header's length is a claim, the data is the truth (players do the same).
    x = tone(440, 2, SAMPLE_RATE)
    data = encode(x, SAMPLE_RATE, "WAV", "PCM_16")
    path = tmp_path / "cut.wav"
    path.write_bytes(data[: len(data) // 2])
    wav = load_audio(path)
    assert abs(len(wav) - len(x) // 2) < 100
    np.testing.assert_allclose(wav, x[: len(wav)], atol=1e-4)
    assert load_clip(path).shape == (CLIP_SAMPLES,)


def test_truncated_flac_decodes_windows_before_the_cut(tmp_path):
    data = encode(tone(440, 4, 16000), 16000, "FLAC")
    path = tmp_path / "cut.flac"
    path.write_bytes(data[: len(data) // 2])
    assert load_clip(path, duration=1).shape == (CLIP_SAMPLES,)
    with pytest.raises(AudioError, match="cannot decode the audio between"):
        load_audio(path)


def test_truncated_mp3_decodes_what_is_there_and_errs_past_it(tmp_path):
    data = encode(tone(440, 4, 16000), 16000, "MP3")
    path = tmp_path / "cut.mp3"
    path.write_bytes(data[: len(data) // 2])
    wav = load_audio(path)  # the header still claims 4 s
    assert 0 < len(wav) < 3 * SAMPLE_RATE and np.isfinite(wav).all()
    with pytest.raises(AudioError):
        load_audio(path, offset=3.5)


def test_random_bytes_after_a_pcm_header_are_just_noise(tmp_path):
    # Any bytes are valid 16-bit PCM: this cannot be told from a recording of noise.
    path = tmp_path / "noise.wav"
    path.write_bytes(_random_after_header(WAV16, 44))
    wav = load_audio(path, sr=16000)  # the file's own rate: decoding only, no resampler overshoot
    assert len(wav) == 16000 and np.isfinite(wav).all() and np.abs(wav).max() <= 1


# ---------------------------------------------------------------- files in memory and their header


@pytest.mark.parametrize("fmt, subtype", [("WAV", None), ("FLAC", None), ("OGG", "VORBIS"), ("MP3", "MPEG_LAYER_III")])
def test_a_file_in_memory_reads_as_the_same_file_on_disk(tmp_path, fmt, subtype):
    data = encode(tone(440, 3, 44100).astype(np.float32), 44100, fmt, subtype)
    path = tmp_path / f"a.{fmt.lower()}"
    path.write_bytes(data)
    in_memory = audio.AudioBytes("upload", data)
    assert np.array_equal(load_clip(in_memory), load_clip(path))
    assert audio_duration(in_memory) == audio_duration(path)
    with pytest.raises(AudioError, match=r"^upload: empty file"):
        load_clip(audio.AudioBytes("upload", b""))
    with pytest.raises(AudioError, match=r"^upload: not an audio file"):
        load_clip(audio.AudioBytes("upload", b"hello, this is text " * 40))


def test_probe_counts_the_samples_load_clip_decodes_before_decoding(monkeypatch):
    """A few kilobytes of FLAC declaring 8 channels at 655,350 Hz: the header says how much its
    window decodes, and that is what a read of the window then asks for."""
    data = encode(np.zeros((655350 * 2, 8), dtype=np.int16), 655350, "FLAC")
    assert len(data) < 100_000
    found = audio.probe(audio.AudioBytes("x.flac", data), sr=SAMPLE_RATE, clip_seconds=CLIP_SECONDS)
    assert (found.channels, found.samplerate, found.seconds) == (8, 655350, 2.0)
    assert found.decoded == 8 * 655350 * 2  # the whole 2 s, shorter than the 10 s window
    asked = []
    real_read = sf.SoundFile.read
    monkeypatch.setattr(sf.SoundFile, "read", lambda self, frames=-1, *a, **k: asked.append(frames * self.channels)
                        or real_read(self, frames, *a, **k))
    long = encode(tone(440, 30, 48000).astype(np.float32), 48000, "FLAC")
    window = audio.probe(audio.AudioBytes("y.flac", long), sr=SAMPLE_RATE, clip_seconds=CLIP_SECONDS)
    load_clip(audio.AudioBytes("y.flac", long))
    assert asked == [window.decoded] and 10 * 48000 < window.decoded < 11 * 48000  # 10 s and the resampler's context
