"""TinyMU's front end: waveform -> power spectrogram -> Slaney mel -> natural log -> fixed mean/std.

Follows MATPAC++ as TinyMU builds it (xiquan-li/TinyMU, src/models/matpac/model.py:
`logMelSpectrogram`, `matpac_wrapper.preprocess`), i.e. torchaudio's
`MelSpectrogram(sample_rate=16000, n_fft=400, hop_length=160, f_min=50, f_max=8000, n_mels=80,
center=False, power=2, norm="slaney", mel_scale="slaney")` with a periodic Hann window, then
`(log(mel + eps) - mean) / std`. torchaudio is not a dependency: the same torch calls run here.

Module and buffer names are torchaudio's (`MelSpectrogram.spectrogram.window`,
`MelSpectrogram.mel_scale.fb`) because the published checkpoint stores both buffers and the
authors' strict load overwrites them: the file's values are the ones in use. A fresh build
computes them (the mel matrix with the project's Slaney filterbank, which agrees with torchaudio's
to float32 rounding).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from mellow_cli.models.blocks import CPU, constant, mel_filterbank
from mellow_cli.models.tinymu.config import TinyMUConfig


class Spectrogram(nn.Module):
    """wave (B, samples) -> |STFT|^2 (B, bins, frames): uncentred frames, periodic Hann window."""

    def __init__(self, n_fft: int, hop_length: int):
        super().__init__()
        self.n_fft, self.hop_length = n_fft, hop_length
        self.register_buffer("window", constant(torch.hann_window(n_fft, periodic=True, device=CPU)))

    def forward(self, wave: torch.Tensor) -> torch.Tensor:
        spec = torch.stft(wave, self.n_fft, self.hop_length, win_length=self.n_fft, window=self.window,
                          center=False, normalized=False, onesided=True, return_complex=True)
        return spec.abs().pow(2.0)  # torchaudio's order: the magnitude, then its square


class MelScale(nn.Module):
    """Power (B, bins, frames) -> mel power (B, n_mels, frames) through the stored filterbank."""

    def __init__(self, cfg: TinyMUConfig):
        super().__init__()
        fb = mel_filterbank(cfg.sample_rate, cfg.n_fft, cfg.n_mels, cfg.fmin, cfg.fmax)
        self.register_buffer("fb", constant(fb))  # (bins, n_mels)

    def forward(self, power: torch.Tensor) -> torch.Tensor:
        return torch.matmul(power.transpose(-1, -2), self.fb).transpose(-1, -2)


class MelSpectrogram(nn.Module):
    def __init__(self, cfg: TinyMUConfig):
        super().__init__()
        self.spectrogram = Spectrogram(cfg.n_fft, cfg.hop_length)
        self.mel_scale = MelScale(cfg)

    def forward(self, wave: torch.Tensor) -> torch.Tensor:
        return self.mel_scale(self.spectrogram(wave))


class LogMel(nn.Module):
    """wave (B, samples) at cfg.sample_rate -> normalised log-mel (B, n_mels, frames), frames =
    1 + (samples - n_fft) // hop_length. A clip shorter than one window (25 ms) is zero-padded to
    one window, so it still gives one frame: its sound is kept, however short."""

    def __init__(self, cfg: TinyMUConfig):
        super().__init__()
        self.cfg = cfg
        self.MelSpectrogram = MelSpectrogram(cfg)  # the checkpoint's key path

    def forward(self, wave: torch.Tensor) -> torch.Tensor:
        if wave.shape[-1] < self.cfg.n_fft:
            wave = F.pad(wave, (0, self.cfg.n_fft - wave.shape[-1]))
        log_mel = torch.log(self.MelSpectrogram(wave) + self.cfg.log_offset)
        return (log_mel - self.cfg.lms_mean) / self.cfg.lms_std
