"""What a page draws of a recording: a coarse spectrogram and the waveform's envelope over its
whole length, computed from the decoded audio.

The recording is decoded a minute at a time (load_audio reads only that span), so a recording
of hours costs a minute of memory; each column of the picture averages the power spectra of the
32 ms frames that fall in it and keeps their lowest and highest sample. The number of columns is
fixed by the caller's budget, not by the length, so a page stays small whatever it shows: a
3-hour recording at 4096 columns is about 200 kB before base64.
"""

from __future__ import annotations

import base64
from dataclasses import dataclass

RATE = 16000  # Hz decoded: the picture reaches 8 kHz, where most sounds people ask about lie
FRAME = 512  # samples per spectrum (32 ms at RATE); also the finest column
BANDS = 48  # rows of the spectrogram, mel-spaced so low sounds get as many rows as high ones
RANGE_DB = 80.0  # shown below the recording's loudest band at most; quieter is black
MIN_RANGE_DB = 30.0  # ... and at least, so that a steady sound is not drawn as a flat glare
CHUNK_FRAMES = 1875  # frames decoded at once: one minute at RATE
MAX_COLUMNS = 4096  # a screen or two wide: finer would only grow the page
_EPS = 1e-14  # power floor: digital silence is -140 dB, far below any range shown
SILENCE_DB = -130.0  # below this a cell holds no sound (rounding noise of silence is above -140)


@dataclass(frozen=True)
class Picture:
    duration: float  # seconds, from the file's header
    columns: int
    spectrogram: bytes  # columns x BANDS levels 0..255, column by column, lowest band first
    peaks: bytes  # columns x 2: the lowest and highest sample, -1..1 mapped to 0..255

    def as_dict(self) -> dict:
        return {"duration": self.duration, "columns": self.columns, "bands": BANDS, "top_hz": RATE / 2,
                "spectrogram": base64.b64encode(self.spectrogram).decode(),
                "peaks": base64.b64encode(self.peaks).decode()}


def picture(path: str, max_columns: int = MAX_COLUMNS) -> Picture:
    """The picture of the recording at `path` in at most `max_columns` columns. Raises what
    load_audio raises (AudioError) for a file that cannot be read."""
    import numpy as np

    from mellow_cli.io.audio import audio_duration, load_audio

    duration = audio_duration(path)
    frames = max(1, int(duration * RATE) // FRAME)
    columns = max(1, min(max_columns, frames))
    power = np.zeros((columns, BANDS))
    counts = np.zeros(columns)
    low, high = np.ones(columns, np.float32), -np.ones(columns, np.float32)
    bands = _band_matrix()
    window = np.hanning(FRAME)  # float64: numpy's FFT is faster in double than in single precision
    scale = float(window.sum()) ** 2  # a full-scale sine's bin near 0 dB
    for first in range(0, frames, CHUNK_FRAMES):
        count = min(CHUNK_FRAMES, frames - first)
        samples = load_audio(path, sr=RATE, offset=first * FRAME / RATE, duration=count * FRAME / RATE)
        count = min(count, len(samples) // FRAME)  # a header that promised more than the file holds
        if count == 0:
            break
        chunk = samples[: count * FRAME].reshape(count, FRAME)
        spectra = np.abs(np.fft.rfft(chunk * window, axis=1)) ** 2 / scale
        where = (np.arange(first, first + count) * columns) // frames
        np.add.at(power, where, spectra @ bands)
        np.add.at(counts, where, 1)
        np.minimum.at(low, where, chunk.min(axis=1))
        np.maximum.at(high, where, chunk.max(axis=1))
    heard = counts > 0
    power[heard] /= counts[heard, None]
    low[~heard] = high[~heard] = 0.0
    return Picture(duration, columns, _levels(power).tobytes(), _peaks(low, high).tobytes())


def _levels(power):
    """Power -> 0..255 from the recording's floor to its loudest cell, so that the one bark in
    three hours is the brightest thing drawn. The floor is RANGE_DB below that, or the level a
    fifth of the cells that hold any sound stay under where that is higher: a field recording's
    steady hiss then stays dark and what rises above it shows. (Cells of digital silence, such
    as the bands above a file's own Nyquist frequency, would put that fifth at nothing.)"""
    import numpy as np

    db = 10 * np.log10(power + _EPS)
    top = float(db.max())
    sounding = db[db > SILENCE_DB]
    hiss = float(np.percentile(sounding, 20)) if sounding.size else top
    floor = min(max(top - RANGE_DB, hiss), top - MIN_RANGE_DB)
    return np.clip((db - floor) / (top - floor) * 255, 0, 255).round().astype(np.uint8)


def _peaks(low, high):
    import numpy as np

    pairs = np.stack([low, high], axis=1).clip(-1, 1)
    return ((pairs + 1) * 127.5).round().astype(np.uint8)


def _band_matrix():
    """(FRAME // 2 + 1, BANDS): each band the mean of the FFT bins between its mel edges, or the
    nearest bin where a low band is narrower than one bin."""
    import numpy as np

    def mel(hz):
        return 2595 * np.log10(1 + hz / 700)

    def hz(m):
        return 700 * (10 ** (m / 2595) - 1)

    edges = hz(np.linspace(mel(0.0), mel(RATE / 2), BANDS + 1))
    freqs = np.arange(FRAME // 2 + 1) * RATE / FRAME
    matrix = np.zeros((len(freqs), BANDS))
    for b in range(BANDS):
        inside = np.flatnonzero((freqs >= edges[b]) & (freqs < edges[b + 1]))
        if inside.size == 0:
            inside = np.array([int(np.argmin(np.abs(freqs - (edges[b] + edges[b + 1]) / 2)))])
        matrix[inside, b] = 1.0 / inside.size
    return matrix


FEWEST_COLUMNS = 32  # a thumbnail that still shows where the sound is


def columns_for(recordings: int, budget: int, most: int = MAX_COLUMNS) -> int:
    """Columns per recording when `recordings` share a page's `budget` of spectrogram cells, at
    most `most`; 0 (no pictures) when the budget cannot give each FEWEST_COLUMNS."""
    share = min(most, budget // max(1, recordings) // BANDS)
    return share if share >= FEWEST_COLUMNS else 0
