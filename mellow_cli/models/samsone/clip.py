"""How Samsone hears a decoded recording (`SamsoneModel._prepare_audio`): the mean of its
channels (`ToMono`), then its first 30 s, zero-padded to 30 s when shorter (`CropOrPad`, which
keeps the start despite its docstring). Decoding and resampling to 16 kHz are the caller's.
"""

from __future__ import annotations


def fit_clip(wave, cfg):
    """(channels, samples) float32 at cfg.sample_rate -> (cfg.clip_samples,) float32."""
    import numpy as np

    mono = np.asarray(wave, dtype=np.float32).mean(axis=0, dtype=np.float32)[: cfg.clip_samples]
    return np.pad(mono, (0, cfg.clip_samples - mono.shape[0]))
