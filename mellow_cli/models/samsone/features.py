"""Whisper's log-mel front end, as transformers' `WhisperFeatureExtractor` computes it in torch
(`_torch_extract_fbank_features`, the path Samsone's reference runs): a centred, reflect-padded
STFT with a periodic Hann window, |X|^2 with the last frame dropped, Slaney mel filters over
0 .. sample_rate / 2, log10 floored at 1e-10, then at `log_mel_range` below the clip's loudest
bin, and scaled as (x + 4) / 4. The loudest bin is taken over the whole 30 s clip, zero padding
included: a quiet clip's floor is set by its own peak, never by another clip's.
"""

from __future__ import annotations

import functools

import torch

from mellow_cli.models.blocks import mel_filterbank


@functools.lru_cache(maxsize=4)
def mel_filters(sample_rate: int, n_fft: int, n_mels: int) -> torch.Tensor:
    """(n_mels, n_fft // 2 + 1) float32, CPU: the matrix the extractor multiplies from the left."""
    return mel_filterbank(sample_rate, n_fft, n_mels, 0.0, sample_rate / 2).T.contiguous()


def log_mel(wave: torch.Tensor, cfg) -> torch.Tensor:
    """One clip (clip_samples,) float32 -> features (n_mels, audio_frames) float32."""
    if wave.shape != (cfg.clip_samples,):
        raise ValueError(f"a Samsone clip holds {cfg.clip_samples} samples, got shape {tuple(wave.shape)}")
    wave = wave.to(torch.float32)
    window = torch.hann_window(cfg.n_fft, device=wave.device)
    stft = torch.stft(wave, cfg.n_fft, cfg.hop_length, window=window, return_complex=True)
    power = stft[..., :-1].abs() ** 2
    mel = mel_filters(cfg.sample_rate, cfg.n_fft, cfg.n_mels).to(wave.device) @ power
    log = torch.clamp(mel, min=1e-10).log10()
    log = torch.maximum(log, log.max() - cfg.log_mel_range)
    return (log + 4.0) / 4.0
