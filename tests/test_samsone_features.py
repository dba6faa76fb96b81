"""Samsone's audio in: fit_clip (channels and length) and Whisper's log-mel, against
transformers' WhisperFeatureExtractor and the reference's golden features."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from mellow_cli.models.samsone.clip import fit_clip
from mellow_cli.models.samsone.config import SamsoneConfig
from mellow_cli.models.samsone.features import log_mel

CFG = SamsoneConfig()


def features(wave: np.ndarray) -> np.ndarray:
    return log_mel(torch.from_numpy(wave), CFG).numpy()


# The reference and we both compute the STFT in float32: in bins near the floor its rounding
# alone moves a value by ~5e-5 (each is that far from the same computation in float64).
FEATURES_ATOL = 1e-4


def test_golden_features_from_the_decoded_10s_clip(samsone_golden):
    """clip0 is 16 kHz mono: the decoder gave pcm / 32768, which fit_clip pads to 30 s."""
    pcm = samsone_golden["clip0_pcm16"]  # (samples, channels)
    wave = fit_clip((pcm / 32768).T.astype(np.float32), CFG)
    assert samsone_golden["clip0_wave16k_equals_pcm_div_32768_zero_padded"]
    got = features(wave)
    assert got.shape == (80, 3000)
    assert np.abs(got - samsone_golden["clip0_input_features"]).max() < FEATURES_ATOL


def test_golden_features_from_the_stored_16k_waveform(samsone_golden):
    """clip1 (44.1 kHz stereo) went through FFmpeg's resampler, which is not ours: the stored
    16 kHz mono waveform checks the front end apart from it."""
    got = features(samsone_golden["clip1_wave16k"])
    assert np.abs(got - samsone_golden["clip1_input_features"]).max() < FEATURES_ATOL


def test_features_are_transformers_whisper_feature_extractor(samsone_golden):
    from transformers import WhisperFeatureExtractor

    extractor = WhisperFeatureExtractor(feature_size=80, sampling_rate=16000, hop_length=160, chunk_length=30,
                                        n_fft=400, padding_value=0.0)
    wave = samsone_golden["clip1_wave16k"]
    expected = extractor(wave[None], sampling_rate=16000, return_tensors="np")["input_features"][0]
    assert np.array_equal(features(wave), expected)


def test_the_floor_is_8_below_the_clips_own_peak_padding_included():
    t = np.arange(CFG.sample_rate) / CFG.sample_rate
    wave = fit_clip((0.5 * np.sin(2 * np.pi * 1000 * t))[None].astype(np.float32), CFG)
    got = features(wave)
    assert np.isclose(got.min(), got.max() - CFG.log_mel_range / 4)  # (x + 4) / 4 scales 8 to 2
    assert np.allclose(got[:, 150:], got.min())  # the 29 s of padding sit on the floor
    silence = features(np.zeros(CFG.clip_samples, np.float32))
    assert np.array_equal(silence, np.full((80, 3000), (-10 + 4) / 4, np.float32))  # log10(1e-10)


def test_fit_clip_averages_channels_keeps_the_first_30s_and_pads():
    rng = np.random.default_rng(0)
    stereo = rng.standard_normal((2, 40 * CFG.sample_rate)).astype(np.float32)
    fitted = fit_clip(stereo, CFG)
    assert fitted.shape == (CFG.clip_samples,) and fitted.dtype == np.float32
    assert np.array_equal(fitted, ((stereo[0] + stereo[1]) / 2)[: CFG.clip_samples])
    short = fit_clip(stereo[:1, :1000], CFG)
    assert np.array_equal(short[:1000], stereo[0, :1000]) and not short[1000:].any()
    assert short.shape == (CFG.clip_samples,)


def test_a_clip_of_another_length_is_refused():
    with pytest.raises(ValueError, match="480000 samples"):
        log_mel(torch.zeros(16000), CFG)
