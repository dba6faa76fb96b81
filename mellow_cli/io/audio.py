"""Audio input: a sound file (or stdin) in, a model's float32 mono clip out.

This module owns everything between a path on the command line and the waveform the front end
(the family's front end, e.g. models/mellow/frontend.py) turns into a log-mel spectrogram, in the manner of whisper's `audio.py`:

- decoding WAV, FLAC, OGG (Vorbis, Opus), MP3 and whatever else libsndfile reads, via soundfile,
  and what it cannot open through FFmpeg (io/ffmpeg.py: m4a, video files' audio, wma, ...);
  the source `-` is a whole audio file on standard input, read once and kept, so `-` can be
  used twice in one process;
- mono (by averaging the channels, or the family's own way), then resampling to the model's rate
  with soxr;
- a deterministic window of at most one clip (the start of the recording, or the span
  `offset`/`duration` choose), which the family then fits to its clip (Mellow tiles a short one,
  as its reference does). Only that window is decoded: a seek and a bounded read, so an 8-hour
  file costs one clip of memory;
- turning every unusable input into `AudioError(path, problem)`, one line, never a traceback.

A source is a path, `-`, or an `AudioBytes`: a whole file already in memory (an upload), read
where it is instead of through a temporary file.

Public: MIN_SAMPLE_RATE, MAX_SAMPLE_RATE, STDIN, AudioBytes, load_audio, load_clip, audio_duration,
probe, and the two pure steps they use, to_mono and resample. docs/audio.md explains the policy,
the limits and where we differ from the reference.
"""

from __future__ import annotations

import contextlib
import io
import math
import os
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from fractions import Fraction
from typing import BinaryIO, Union

import numpy as np
import soundfile as sf
import soxr

from mellow_cli.errors import AudioError, UsageError

# No recording is sampled below 1 kHz (telephone audio is 8 kHz) and no converter ships above
# 768 kHz: a header claiming either is corrupt, or the file is not sound.
MIN_SAMPLE_RATE = 1000
MAX_SAMPLE_RATE = 768000

# soxr "very high quality": 28-bit precision; a tone above the new Nyquist comes out about 160 dB
# down. Barely slower than "HQ" on a 10 s window, and cleaner than the short Hann-windowed sinc
# of torchaudio's default resampler, which the reference used.
RESAMPLE_QUALITY = "VHQ"

# Extra input decoded on each side of a window so that the resampler's filter sees real
# neighbours instead of an edge: a window then equals the same span of the whole file resampled.
_RESAMPLE_CONTEXT_SECONDS = 0.05

# After a seek, libmpg123 (through libsndfile) returns zeros or garbage for the first few MP3
# frames, because layer III borrows bits from earlier frames (the bit reservoir) and the MDCT
# overlaps the previous granule. Decoding this many frames before the window and dropping them
# makes a seeked read equal a straight read; 4 frames of 1152 sufficed in every test, this is 8.
_MP3_PREROLL_FRAMES = 8 * 1152

STDIN = "-"
_STDIN_NAME = "<stdin>"
_stdin_bytes: bytes | None = None  # standard input, read once on first use of "-"



@dataclass(frozen=True)
class AudioBytes:
    """A whole audio file held in memory, named for messages."""

    name: str
    data: bytes


Source = Union[str, os.PathLike, AudioBytes]
Mono = Callable[[np.ndarray], np.ndarray]  # (frames, channels) -> (frames,)


# ---------------------------------------------------------------- public API


# Float files hold samples in -1..1 (a little over is clipping). Values this far out are not audio
# and would overflow the log-mel's power spectrum into infinities.
MAX_PEAK = 1e4


def load_audio(
    source: Source, *, sr: int | None, offset: float = 0.0, duration: float | None = None, mono: Mono | None = None
) -> np.ndarray:
    """Decode [offset, offset + duration) of `source` to float32 mono at `sr` Hz (None: the file's
    own rate; `mono` makes the channels one, by default their average).

    `duration=None` reads to the end of the file. Only that span (plus a few milliseconds of
    context for the resampler) is decoded. Raises AudioError for anything unusable in the file,
    UsageError for a negative offset or a duration that is not positive.
    """
    _check_span(offset, duration)
    name = _display_name(source)
    with _open_sound(source) as snd:
        sr = sr or snd.samplerate
        first, stop = _window(name, snd, offset, duration, sr)
        try:
            return _decode_window(name, snd, first, stop, sr, mono or to_mono)
        except MemoryError:
            raise AudioError(
                name, f"too long to decode at once ({(stop - first) / sr:.0f} s); pass a duration"
            ) from None


def load_clip(
    source: Source,
    *,
    sr: int,
    clip_seconds: float,
    fit: Callable[[np.ndarray], np.ndarray],
    mono: Mono | None = None,
    offset: float = 0.0,
    duration: float | None = None,
) -> np.ndarray:
    """One clip of `source`: the window from `offset` lasting `duration` (default and at most
    `clip_seconds`), decoded as `load_audio` does and handed to `fit`, the model's own rule for
    a clip's length. A duration longer than the clip is a UsageError.
    """
    if duration is not None and duration > clip_seconds:
        raise UsageError(f"duration {duration:g} s is longer than the {clip_seconds:g} s clip")
    window = clip_seconds if duration is None else duration
    return fit(load_audio(source, offset=offset, duration=window, sr=sr, mono=mono))


def audio_duration(source: Source) -> float:
    """Length of `source` in seconds, from its header, without decoding the samples.

    Exact for WAV, FLAC and OGG; for MP3 it is what the Xing/LAME header says, or an estimate
    from the file size when there is none.
    """
    with _open_sound(source) as snd:
        return snd.frames / snd.samplerate


@dataclass(frozen=True)
class Probe:
    """What `load_clip` would read from a file, from its header alone."""

    seconds: float  # the whole recording's length
    channels: int
    samplerate: int
    decoded: int  # samples (frames x channels) load_clip decodes for its window, before mixing to mono


def probe(source: Source, *, sr: int, clip_seconds: float) -> Probe:
    """The header's promise for `load_clip(source, sr=sr, clip_seconds=clip_seconds)`: a file of a
    few kilobytes can declare 8 channels at 655 kHz, which would decode to hundreds of megabytes,
    so a caller bounding memory asks here first. AudioError for anything unusable."""
    name = _display_name(source)
    with _open_sound(source) as snd:
        first, stop = _window(name, snd, 0.0, clip_seconds, sr)
        start, end, _ = _input_span(first, stop, snd.frames, snd.samplerate, sr, _margin(snd, sr))
        return Probe(snd.frames / snd.samplerate, snd.channels, snd.samplerate, (end - start) * snd.channels)


def to_mono(frames: np.ndarray) -> np.ndarray:
    """(n_frames, n_channels) -> (n_frames,): the average of the channels, what a listener hears
    from a pair of speakers (the reference instead concatenated them end to end)."""
    if frames.shape[1] == 1:
        return frames[:, 0]
    return frames.mean(axis=1, dtype=np.float32)


def resample(wav: np.ndarray, sr_in: int, sr_out: int) -> np.ndarray:
    """Band-limited resampling with soxr; output length is round(len * sr_out / sr_in)."""
    if sr_in == sr_out:
        return wav
    return soxr.resample(wav, sr_in, sr_out, quality=RESAMPLE_QUALITY)


# ---------------------------------------------------------------- the window


def _check_span(offset: float, duration: float | None) -> None:
    # Caller mistakes rather than bad files: UsageError, which the CLI reports with exit code 2.
    if not (math.isfinite(offset) and offset >= 0):
        raise UsageError(f"offset must be a number of seconds >= 0, got {offset}")
    if duration is not None and not (math.isfinite(duration) and duration > 0):
        raise UsageError(f"duration must be a number of seconds > 0, got {duration}")


def _window(
    name: str, snd: sf.SoundFile, offset: float, duration: float | None, sr: int
) -> tuple[int, int]:
    """[first, stop) of the window in output samples at `sr`, the grid a resampling of the whole
    file lands on. An offset at or past the end is an AudioError."""
    total = round(snd.frames * Fraction(sr, snd.samplerate))  # soxr's output length
    first = round(offset * sr)
    if first >= total:
        raise AudioError(
            name,
            f"offset {offset:g} s is past the end of the audio "
            f"({snd.frames / snd.samplerate:.2f} s long)",
        )
    stop = total if duration is None else min(total, first + round(duration * sr))
    return first, stop


def _input_span(
    first: int, stop: int, frames: int, sr_in: int, sr_out: int, margin: int
) -> tuple[int, int, int]:
    """Which input frames to decode for output samples [first, stop), and where they start.

    Returns (read_start, read_stop, skip): resample frames [read_start, read_stop) and drop the
    first `skip` output samples. `margin` extra frames on each side give the resampler real
    neighbours, and read_start is a multiple of sr_in / gcd(sr_in, sr_out) so that it falls
    exactly on an output sample: the window's samples are then the very samples a resampling of
    the whole file has there, not an approximation with edge artefacts.
    """
    ratio = Fraction(sr_out, sr_in)
    step = sr_in // math.gcd(sr_in, sr_out)
    read_start = max(0, (math.floor(first / ratio) - margin) // step * step)
    read_stop = min(frames, math.ceil(stop / ratio) + margin)
    skip = first - int(read_start * ratio)
    return read_start, read_stop, skip


def _margin(snd: sf.SoundFile, sr: int) -> int:
    """Input frames decoded on each side of a window (see _input_span)."""
    margin = 0 if snd.samplerate == sr else round(_RESAMPLE_CONTEXT_SECONDS * snd.samplerate)
    return max(margin, _MP3_PREROLL_FRAMES) if snd.format == "MP3" else margin


def _decode_window(name: str, snd: sf.SoundFile, first: int, stop: int, sr: int, mono: Mono) -> np.ndarray:
    """Output samples [first, stop) at `sr`: seek, a bounded read, mono, checks, resample."""
    sr_in = snd.samplerate
    read_start, read_stop, skip = _input_span(first, stop, snd.frames, sr_in, sr, _margin(snd, sr))
    try:
        snd.seek(read_start)
        frames = snd.read(read_stop - read_start, dtype="float32", always_2d=True)
    except (RuntimeError, ValueError) as e:
        raise AudioError(
            name,
            f"cannot decode the audio between {read_start / sr_in:.2f} s and "
            f"{read_stop / sr_in:.2f} s, truncated or corrupt? ({getattr(snd, 'decoder', 'libsndfile')}: {_reason(e)})",
        ) from None
    wav = np.asarray(mono(frames), dtype=np.float32)
    if not np.isfinite(wav).all():
        raise AudioError(name, "contains NaN or infinite samples")
    peak = float(np.abs(wav).max(initial=0.0))
    if peak > MAX_PEAK:
        raise AudioError(name, f"samples reach {peak:.3g}, far outside the -1..1 of audio (a float file "
                         "with unscaled data?)")
    wav = resample(wav, sr_in, sr)[skip : skip + stop - first]
    if len(wav) == 0:
        # The header promised more frames than the data holds (a truncated MP3, typically).
        raise AudioError(
            name, f"no audio could be decoded from {first / sr:.2f} s on (truncated file?)"
        )
    return np.ascontiguousarray(wav, dtype=np.float32)


# ---------------------------------------------------------------- opening


def _display_name(source: Source) -> str:
    if isinstance(source, AudioBytes):
        return source.name
    return _STDIN_NAME if _is_stdin(source) else os.fspath(source)


def _is_stdin(source: Source) -> bool:
    # Only the string "-": Path("-") still names a file called "-".
    return isinstance(source, str) and source == STDIN


def _read_stdin() -> bytes:
    """Standard input, read whole on first use and kept: `-` may be asked for twice (a clip
    paired with itself) and a pipe can be read only once."""
    global _stdin_bytes
    if _stdin_bytes is None:
        stdin = sys.stdin
        if stdin is None:
            raise AudioError(_STDIN_NAME, "there is no standard input to read")
        isatty = getattr(stdin, "isatty", None)
        if isatty is not None and isatty():
            raise AudioError(
                _STDIN_NAME, "standard input is a terminal; pipe an audio file in (- < clip.wav)"
            )
        try:
            # .buffer: the bytes under the text wrapper; audio is not text.
            _stdin_bytes = stdin.buffer.read()
        except AttributeError:
            raise AudioError(_STDIN_NAME, "standard input is not a byte stream") from None
        except OSError as e:
            problem = f"cannot read standard input ({e.strerror or e})"
            raise AudioError(_STDIN_NAME, problem) from None
    return _stdin_bytes


@contextlib.contextmanager
def _open_stream(source: Source) -> Iterator[BinaryIO]:
    """A seekable binary stream of the encoded bytes; OS errors become AudioErrors."""
    if isinstance(source, AudioBytes):
        yield io.BytesIO(source.data)  # an empty one is refused by _open_sound
        return
    if _is_stdin(source):
        data = _read_stdin()
        if not data:
            raise AudioError(_STDIN_NAME, "empty input (0 bytes); pipe an audio file in")
        yield io.BytesIO(data)
        return
    name = os.fspath(source)
    try:
        # Opened by Python, not by libsndfile, so that missing files, directories and permissions
        # give OS errors we can name, and any path Python can open (non-ASCII too) works.
        f = open(name, "rb")
    except FileNotFoundError:
        raise AudioError(name, "no such file") from None
    except IsADirectoryError:
        raise AudioError(name, "is a directory, not an audio file") from None
    except PermissionError:
        raise AudioError(name, "permission denied") from None
    except OSError as e:
        raise AudioError(name, f"cannot open ({e.strerror or e})") from None
    with f:
        if not f.seekable():
            # A named pipe or process substitution: libsndfile needs to seek, so buffer it.
            yield io.BytesIO(f.read())
        else:
            yield f


@contextlib.contextmanager
def _open_sound(source: Source) -> Iterator[sf.SoundFile]:
    """An open, sanity-checked SoundFile for `source`; every failure is an AudioError."""
    name = _display_name(source)
    with _open_stream(source) as stream:
        try:
            head = stream.read(512)
            stream.seek(0)
        except OSError as e:
            raise AudioError(name, f"cannot read ({e.strerror or e})") from None
        if not head:
            raise AudioError(name, "empty file (0 bytes)")
        try:
            snd = sf.SoundFile(stream)
        except MemoryError:
            raise AudioError(name, "not enough memory to open it") from None
        except (RuntimeError, TypeError, ValueError) as e:
            # RuntimeError: libsndfile's LibsndfileError. TypeError: soundfile's demand for a
            # sample rate when the name ends in .raw (headerless PCM, which we cannot use).
            snd = _open_with_ffmpeg(name, stream, head, e)
        with snd:
            _check_header(name, snd)
            yield snd


def _open_with_ffmpeg(name: str, stream: BinaryIO, head: bytes, err: Exception):
    """What libsndfile refused, opened by FFmpeg (io/ffmpeg.py: m4a, video files' audio, wma, ...),
    unless its first bytes already say it is not sound; an AudioError saying why otherwise."""
    from mellow_cli.io import ffmpeg

    if not isinstance(err, TypeError) and _not_audio(head) is None:
        stream.seek(0)
        try:
            return ffmpeg.open_sound(stream)
        except ffmpeg.NotReadable as e:
            for at, magic, what in _CONTAINERS:
                if head[at : at + len(magic)] == magic:
                    raise AudioError(name, f"cannot open this {what} file ({e.problem})") from None
    raise AudioError(name, _open_problem(head, err))


def _check_header(name: str, snd: sf.SoundFile) -> None:
    if not MIN_SAMPLE_RATE <= snd.samplerate <= MAX_SAMPLE_RATE:
        raise AudioError(
            name,
            f"sample rate {snd.samplerate} Hz is outside the supported "
            f"{MIN_SAMPLE_RATE}-{MAX_SAMPLE_RATE} Hz (corrupt header?)",
        )
    if snd.frames <= 0:
        raise AudioError(name, "no audio samples (the file holds 0 frames; empty or truncated?)")


# ---------------------------------------------------------------- messages

# (byte offset, magic, what it is): recognised only to say something better than "format not
# recognised" when libsndfile has already refused the file.
_NOT_AUDIO = (
    (0, b"\x89PNG", "a PNG image"),
    (0, b"\xff\xd8\xff", "a JPEG image"),
    (0, b"GIF8", "a GIF image"),
    (0, b"%PDF", "a PDF document"),
    (0, b"PK\x03\x04", "a zip archive"),
    (0, b"\x1f\x8b", "a gzip archive"),
)
_CONTAINERS = (  # what libsndfile leaves to FFmpeg: FFmpeg's reason is the better message
    (4, b"ftyp", "MP4/M4A (AAC, ALAC)"),
    (0, b"\x1aE\xdf\xa3", "Matroska/WebM"),
    (0, b"0&\xb2u\x8ef\xcf\x11", "ASF (WMA)"),
)


def _open_problem(head: bytes, err: Exception) -> str:
    """One line saying why libsndfile would not open a file whose first bytes are `head`."""
    if isinstance(err, TypeError):
        return "headerless raw audio is not supported (it needs a WAV or FLAC header)"
    if (what := _not_audio(head)) is not None:
        return f"not an audio file (looks like {what})"
    code = getattr(err, "code", None)
    if code == 1:  # SF_ERR_UNRECOGNISED_FORMAT
        return "not an audio file, or a format neither libsndfile nor FFmpeg can read"
    if code == 7:
        # libsndfile's text for this code blames the path ("does not exist or is not a regular
        # file"), but we opened the file ourselves; here it means the MPEG decoder found no
        # usable frames in data it had taken for MP3.
        return "not an audio file (no decodable audio frames)"
    return f"cannot open as audio (libsndfile: {_reason(err)})"


def _not_audio(head: bytes) -> str | None:
    """What a file whose first bytes are `head` is, when they say it is not sound."""
    for at, magic, what in _NOT_AUDIO:
        if head[at : at + len(magic)] == magic:
            return what
    return "text" if _looks_like_text(head) else None


def _looks_like_text(head: bytes) -> bool:
    try:
        text = head.decode("utf-8")
    except UnicodeDecodeError as e:
        if e.start < len(head) - 3:  # not just a character cut in two by the 512-byte peek
            return False
        text = head[: e.start].decode("utf-8")
    return all(c.isprintable() or c in "\t\r\n" for c in text)


def _reason(err: Exception) -> str:
    # LibsndfileError.error_string is libsndfile's own message, without soundfile's prefix
    # naming the (here meaningless) stream object. Keep it to one line.
    text = getattr(err, "error_string", None) or str(err)
    return " ".join(text.split()).rstrip(".")
