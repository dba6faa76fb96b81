"""Audio in any format FFmpeg reads (m4a/aac, mp4/mov/webm/mkv audio tracks, wma, amr, ...), through
PyAV, whose wheels ship FFmpeg's libraries: the reader audio.py tries when libsndfile cannot open a
file.

`FFmpegSound` answers what audio.py asks of a soundfile.SoundFile (samplerate, channels, frames,
format, seek, read), so a file read here is windowed, bounded, mixed and resampled exactly as one
libsndfile reads. Memory stays bounded the same way: `read` decodes from a seek to the window's
start and keeps only the frames asked for, one decoded frame beyond them at most; a header's
length, rate and channels are what audio.probe reports before anything is decoded. A file whose
container states no length, or more than its size can hold, is measured by decoding it once and
keeping nothing.
"""

from __future__ import annotations

from fractions import Fraction
from typing import BinaryIO

import numpy as np

# Integer samples scaled to -1..1 as libsndfile scales them.
_SCALE = {np.dtype(np.int16): 1 / 32768, np.dtype(np.int32): 1 / 2147483648, np.dtype(np.int64): 1 / 2**63}

# No audio codec packs a second into fewer bytes than this (codec2, the leanest, takes 88): a
# header promising more seconds than its file's size allows is measured instead of believed, so a
# few bytes cannot claim a year and be walked in millions of windows.
_MIN_BYTES_PER_SECOND = 32

# A seek lands on a packet at or before the time asked; starting it this much earlier lets the
# decoder settle (AAC's and Opus's frames overlap their neighbours) before the window's samples.
_PREROLL_SECONDS = 0.5


class NotReadable(Exception):
    """FFmpeg cannot read the file as audio; `problem` says why, in a few words."""

    def __init__(self, problem: str):
        super().__init__(problem)
        self.problem = problem


def open_sound(stream: BinaryIO) -> "FFmpegSound":
    """The first audio stream of `stream`, or NotReadable (PyAV missing, not a container FFmpeg
    knows, no audio stream)."""
    try:
        import av
    except ImportError:
        raise NotReadable("PyAV, which reads it through FFmpeg, is not installed (pip install av)") from None
    size = stream.seek(0, 2)
    stream.seek(0)
    try:
        container = av.open(stream, mode="r", metadata_errors="ignore")
    except (av.FFmpegError, ValueError, OSError) as e:
        raise NotReadable(f"FFmpeg: {_reason(e)}") from None
    if not container.streams.audio:
        container.close()
        raise NotReadable(f"no audio track (FFmpeg reads it as {container.format.name})")
    try:
        return FFmpegSound(container, size)
    except (av.FFmpegError, ValueError, OSError, RuntimeError) as e:  # measuring it decoded bad data
        container.close()
        raise NotReadable(f"FFmpeg: {_reason(e)}") from None


class FFmpegSound:
    """One audio stream of an open container, read as float32 frames from a sample position."""

    decoder = "FFmpeg"  # named in audio.py's messages, where libsndfile's would be

    def __init__(self, container, size: int):
        self._container = container
        self._size = size
        self._stream = container.streams.audio[0]
        ctx = self._stream.codec_context
        self.samplerate = int(ctx.sample_rate or self._stream.rate or 0)
        self.channels = int(ctx.channels or 0)
        self.format = container.format.name
        self.frames = self._length()
        self._at = 0

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        self._container.close()

    def _length(self) -> int:
        """Frames the header promises: the stream's duration, else the container's, else counted."""
        s = self._stream
        if s.duration is not None and s.time_base is not None:
            seconds = s.duration * s.time_base
        elif self._container.duration is not None:
            seconds = Fraction(self._container.duration, 1_000_000)  # AV_TIME_BASE
        else:
            seconds = None
        if seconds is None or seconds * _MIN_BYTES_PER_SECOND > self._size:
            return sum(frame.samples for frame in self._frames_from(0))
        return max(0, round(seconds * self.samplerate))

    def seek(self, frame: int) -> None:
        self._at = frame

    def read(self, frames: int, dtype: str = "float32", always_2d: bool = True) -> np.ndarray:
        """Frames [position, position + frames) as (frames, channels) float32; fewer where the
        audio ends first. RuntimeError for data FFmpeg cannot decode."""
        first, parts, got = self._at, [], 0
        try:
            blocks = self._blocks_from(first)
            head = next(blocks, None)
            if head is not None and head[0] > first:  # the seek overshot: decode from the start
                blocks = self._blocks_from(0)
            elif head is not None:
                blocks = _chain(head, blocks)
            for start, block in blocks:
                lo = max(0, first - start)
                hi = min(len(block), first + frames - start)
                if hi > lo:
                    parts.append(block[lo:hi])
                    got += hi - lo
                if start + len(block) >= first + frames:
                    break
        except Exception as e:  # av.FFmpegError and its kin: the data, not the caller
            raise RuntimeError(_reason(e)) from None
        self._at = first + got
        return np.concatenate(parts) if parts else np.zeros((0, self.channels), np.float32)

    def _blocks_from(self, first: int):
        """(start frame, (n, channels) float32) of each decoded frame, from a seek before `first`."""
        counted = 0
        for frame in self._frames_from(first):
            if frame.sample_rate != self.samplerate or len(frame.layout.channels) != self.channels:
                raise RuntimeError("the audio changes its sample rate or channels midway")
            if frame.pts is not None and frame.time_base is not None:
                counted = round(frame.pts * frame.time_base * self.samplerate)
            yield counted, _float_frames(frame, self.channels)
            counted += frame.samples

    def _frames_from(self, first: int):
        s = self._stream
        seconds = first / self.samplerate - _PREROLL_SECONDS if self.samplerate and first else 0
        if seconds > 0 and s.time_base:
            self._container.seek(int(seconds / s.time_base), stream=s, backward=True)
        else:
            self._container.seek(0)
        return self._container.decode(s)


def _chain(head, rest):
    yield head
    yield from rest


def _float_frames(frame, channels: int) -> np.ndarray:
    """A decoded frame as (samples, channels) float32 in -1..1."""
    data = frame.to_ndarray()
    data = data.T if frame.format.is_planar else data.reshape(-1, channels)
    if data.dtype == np.uint8:
        return (data.astype(np.float32) - 128) / 128
    scale = _SCALE.get(data.dtype)
    return data.astype(np.float32) * np.float32(scale) if scale else data.astype(np.float32, copy=False)


def _reason(err: Exception) -> str:
    text = getattr(err, "strerror", None) or str(err)
    return " ".join(str(text).split()).rstrip(".")
