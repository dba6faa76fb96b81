"""Pieces more than one family's encoder is built from: buffers computed at build time (on the
CPU, whatever device the network is built on), Slaney's mel filterbank (librosa's default, which
HTSAT's torchlibrosa front end, TinyMU's torchaudio one and Whisper's feature extractor all use),
the transformer MLP of timm and HTSAT (fc1, exact GELU, fc2), and the projector Mellow and Samsone
share (LayerNorm(l1 x + l2 gelu(l1 x))).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

CPU = torch.device("cpu")


def constant(t: torch.Tensor) -> torch.Tensor:
    """A buffer's initial value, computed on the CPU, moved to the default device (e.g. `meta`).

    On `meta`, ops without a native meta kernel (hann_window, log, where, ...) go through torch's
    Python reference implementations, whose first use costs ~1.4 s of imports: too much at start-up.
    """
    return t.to(torch.get_default_device())


# Slaney's mel scale (librosa's default, htk=False): linear below 1 kHz, logarithmic above
HZ_PER_MEL = 200.0 / 3  # slope of the linear part
LOG_HZ = 1000.0  # where the logarithmic part starts
LOG_MEL = LOG_HZ / HZ_PER_MEL
LOG_STEP = math.log(6.4) / 27.0  # 27 mels per factor 6.4 in Hz


def hz_to_mel(hz: torch.Tensor) -> torch.Tensor:
    log_part = LOG_MEL + torch.log(torch.clamp(hz, min=LOG_HZ) / LOG_HZ) / LOG_STEP
    return torch.where(hz >= LOG_HZ, log_part, hz / HZ_PER_MEL)


def mel_to_hz(mel: torch.Tensor) -> torch.Tensor:
    log_part = LOG_HZ * torch.exp(LOG_STEP * (mel - LOG_MEL))
    return torch.where(mel >= LOG_MEL, log_part, mel * HZ_PER_MEL)


def mel_filterbank(sample_rate: int, n_fft: int, n_mels: int, fmin: float, fmax: float) -> torch.Tensor:
    """Triangular Slaney-normalised mel filters, (n_fft // 2 + 1, n_mels) float32, CPU.

    Equals librosa.filters.mel(sr, n_fft, n_mels, fmin, fmax, htk=False, norm='slaney').T, the
    matrix torchlibrosa stores as `melW`; computed here so librosa is not a runtime dependency.
    """
    fft_hz = torch.linspace(0, sample_rate / 2, n_fft // 2 + 1, dtype=torch.float64, device=CPU)
    lo, hi = hz_to_mel(torch.tensor([fmin, fmax], dtype=torch.float64, device=CPU))
    steps = torch.linspace(0, 1, n_mels + 2, dtype=torch.float64, device=CPU)
    edges_hz = mel_to_hz(lo + (hi - lo) * steps)  # band edges and centres, (n_mels + 2,)
    widths = edges_hz.diff()
    offsets = edges_hz[:, None] - fft_hz[None, :]  # (n_mels + 2, bins)
    rising = -offsets[:-2] / widths[:-1, None]
    falling = offsets[2:] / widths[1:, None]
    weights = torch.clamp(torch.minimum(rising, falling), min=0)
    # Slaney norm: each triangle has unit area in Hz, so wide high bands are not louder
    weights = weights * (2.0 / (edges_hz[2:] - edges_hz[:-2]))[:, None]
    return weights.T.float().contiguous()


class MLP(nn.Module):
    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.gelu(self.fc1(x)))


class Projection(nn.Module):
    """Maps encoder frames (d_in) into the language model's embedding space (d_out): Mellow's mapper,
    Samsone's projector."""

    def __init__(self, d_in: int, d_out: int, dropout: float = 0.5):
        super().__init__()
        self.linear1 = nn.Linear(d_in, d_out, bias=False)
        self.linear2 = nn.Linear(d_out, d_out, bias=False)
        self.layer_norm = nn.LayerNorm(d_out)
        self.drop = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.linear1(x)
        return self.layer_norm(h + self.drop(self.linear2(F.gelu(h))))
