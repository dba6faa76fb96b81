"""The log-mel front end against librosa, numpy and the reference's golden output."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from safetensors import safe_open

from mellow_cli.models.mellow.config import MellowConfig
from mellow_cli.models.blocks import mel_filterbank
from mellow_cli.models.mellow.frontend import LogMel, Spectrogram, hann_dft_kernels

CFG = MellowConfig.v0()
PREFIX = "audio_encoder.base.htsat."
GOLDEN_WEIGHTS = "mellow_v0_golden_audio_encoder.fp16.safetensors"


def golden_tensor(golden_dir, key: str) -> torch.Tensor:
    with safe_open(str(golden_dir / GOLDEN_WEIGHTS), framework="pt") as f:
        return f.get_tensor(PREFIX + key).float()


def front_end(cfg: MellowConfig = CFG) -> tuple[Spectrogram, LogMel]:
    return Spectrogram(cfg.n_fft, cfg.hop_length), LogMel(cfg.sample_rate, cfg.n_fft, cfg.n_mels, cfg.fmin, cfg.fmax)


def test_mel_filterbank_matches_librosa():
    librosa = pytest.importorskip("librosa")
    expected = librosa.filters.mel(
        sr=CFG.sample_rate, n_fft=CFG.n_fft, n_mels=CFG.n_mels, fmin=CFG.fmin, fmax=CFG.fmax, htk=False, norm="slaney"
    ).T
    ours = mel_filterbank(CFG.sample_rate, CFG.n_fft, CFG.n_mels, CFG.fmin, CFG.fmax)
    assert ours.shape == (CFG.n_fft // 2 + 1, CFG.n_mels) and ours.dtype == torch.float32
    np.testing.assert_allclose(ours.numpy(), expected, rtol=0, atol=1e-8)


def test_stft_power_of_a_sine_matches_librosa():
    librosa = pytest.importorskip("librosa")
    bin_hz = CFG.sample_rate / CFG.n_fft
    t = np.arange(CFG.sample_rate // 2) / CFG.sample_rate
    wav = 0.5 * np.sin(2 * np.pi * 32 * bin_hz * t) + 0.1 * np.sin(2 * np.pi * 1234.5 * t)
    expected = np.abs(
        librosa.stft(wav, n_fft=CFG.n_fft, hop_length=CFG.hop_length, window="hann", center=True, pad_mode="reflect")
    ).T ** 2  # (frames, bins)
    spectrogram, _ = front_end()
    power = spectrogram(torch.tensor(wav, dtype=torch.float32)[None])[0].numpy()
    assert power.shape == expected.shape == (1 + len(wav) // CFG.hop_length, CFG.n_fft // 2 + 1)
    np.testing.assert_allclose(power, expected, rtol=0, atol=1e-5 * expected.max())
    assert (power[1:-1].argmax(axis=1) == 32).all()  # the edge frames see reflected audio


def test_dft_kernels_are_a_windowed_rfft():
    real, imag = hann_dft_kernels(CFG.n_fft)
    frame = np.random.default_rng(0).standard_normal(CFG.n_fft)
    window = 0.5 - 0.5 * np.cos(2 * np.pi * np.arange(CFG.n_fft) / CFG.n_fft)  # periodic Hann
    expected = np.fft.rfft(frame * window)
    got = real.double().numpy() @ frame + 1j * (imag.double().numpy() @ frame)
    np.testing.assert_allclose(got, expected, rtol=0, atol=1e-5)


def test_checkpoint_constants_are_what_we_compute(golden_dir):
    """The stored kernels and mel matrix are the standard ones (up to the golden file's fp16
    rounding), so a freshly built front end computes the same transform as a loaded one."""
    spectrogram, logmel = front_end()
    for key, ours in [
        ("spectrogram_extractor.stft.conv_real.weight", spectrogram.stft.conv_real.weight),
        ("spectrogram_extractor.stft.conv_imag.weight", spectrogram.stft.conv_imag.weight),
        ("logmel_extractor.melW", logmel.melW),
    ]:
        stored = golden_tensor(golden_dir, key)
        assert stored.shape == ours.shape
        torch.testing.assert_close(ours, stored, rtol=2**-11, atol=1e-7, msg=key)


def test_log_mel_matches_golden(golden, golden_dir):
    spectrogram, logmel = front_end()
    spectrogram.stft.conv_real.weight = golden_tensor(golden_dir, "spectrogram_extractor.stft.conv_real.weight")
    spectrogram.stft.conv_imag.weight = golden_tensor(golden_dir, "spectrogram_extractor.stft.conv_imag.weight")
    logmel.melW = golden_tensor(golden_dir, "logmel_extractor.melW")
    wav = torch.from_numpy(np.stack([golden["wav1"], golden["wav2"]])).float()
    with torch.inference_mode():
        got = logmel(spectrogram(wav))[:, None]
    expected = torch.from_numpy(golden["logmel_audio1"])
    assert got.shape == expected.shape == (2, 1, 1001, CFG.n_mels)
    # dB values in about -45..25; the reference's own fp32 error in quiet bins is ~1e-4
    assert (got - expected).abs().max().item() < 1e-4


def test_silence_is_floored_not_minus_infinity():
    spectrogram, logmel = front_end()
    out = logmel(spectrogram(torch.zeros(1, CFG.sample_rate)))
    assert torch.equal(out, torch.full_like(out, -100.0))  # 10 * log10(1e-10)


def test_builds_on_meta():
    with torch.device("meta"):
        spectrogram, logmel = front_end()
    assert spectrogram.stft.conv_real.weight.is_meta and logmel.melW.is_meta
    assert logmel.melW.shape == (CFG.n_fft // 2 + 1, CFG.n_mels)


def test_exact_kernels_run_as_an_fft_with_the_same_result():
    """A fresh build holds the exact Hann DFT, so its STFT runs as an FFT; it must be the
    convolution's transform to float32 rounding. Rounded (checkpoint) kernels keep the convolution."""
    import torch

    from mellow_cli.models.mellow.frontend import STFT

    stft = STFT(1024, 320)
    assert stft.exact_dft()
    wav = torch.randn(2, 32000, generator=torch.Generator().manual_seed(0))
    fft_real, fft_imag = stft(wav)
    stft._exact = (stft._exact[0], False)  # force the convolution on the same kernels
    conv_real, conv_imag = stft(wav)
    scale = conv_real.abs().amax()
    assert (fft_real - conv_real).abs().max() < 1e-5 * scale and (fft_imag - conv_imag).abs().max() < 1e-5 * scale
    stft.conv_real.weight = stft.conv_real.weight.half().float()  # what the published checkpoint stores
    assert not stft.exact_dft()


def test_kernels_made_under_inference_mode_still_work():
    import torch

    from mellow_cli.models.mellow.frontend import STFT

    with torch.inference_mode():
        stft = STFT(1024, 320)
        real, _ = stft(torch.zeros(1, 3200))
    assert real.shape == (1, 11, 513)
    assert stft(torch.zeros(1, 3200))[0].shape == (1, 11, 513)
