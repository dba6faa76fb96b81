"""The clip TinyMU hears from a decoded file: its first channel, its first 10 s, not padded.

As the authors' loader (xiquan-li/TinyMU, src/data_handling/dataset_utils.py `load_audio`), which
reads `waveform[0]` (no downmix) and at most `max_length` seconds. Two of that loader's habits are
not kept: a file it cannot read becomes 2 s of silence there, and a file under 1600 frames at its
own rate becomes 10 s of silence; here the first is an error (the caller's decoder reports it)
and a short clip is encoded as it is (the front end gives a clip under one 25 ms window one frame).
Decoding and resampling to cfg.sample_rate are the caller's.
"""

from __future__ import annotations

import numpy as np
import torch

from mellow_cli.models.tinymu.config import TinyMUConfig


def fit_clip(wave: np.ndarray, cfg: TinyMUConfig) -> torch.Tensor:
    """(channels, samples) float32 at cfg.sample_rate (or (samples,) for mono) -> the 1-D float32
    clip `TinyMU.encode_clips` takes: channel 0, at most cfg.clip_samples samples."""
    wave = np.asarray(wave, dtype=np.float32)
    if wave.ndim == 1:
        wave = wave[None]
    if wave.ndim != 2 or wave.shape[0] == 0 or wave.shape[1] == 0:
        raise ValueError(f"fit_clip needs a non-empty (channels, samples) waveform, got shape {wave.shape}")
    return torch.from_numpy(np.ascontiguousarray(wave[0, : cfg.clip_samples]))
