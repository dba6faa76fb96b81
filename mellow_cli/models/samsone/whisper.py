"""The Whisper encoder (Radford et al. 2022, openai/whisper `model.py` `AudioEncoder`), with the
module names of transformers' `WhisperEncoder`, which Samsone's checkpoint stores: two GELU
convolutions (the second halves the frames), fixed sinusoidal positions, pre-LayerNorm
transformer layers and a final LayerNorm. Every frame attends to every frame: the zero padding
of a short clip is part of what the model saw in training.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn


def sinusoids(length: int, channels: int, max_timescale: float = 10000.0) -> torch.Tensor:
    """Whisper's fixed positions (length, channels), float32, CPU: sines then cosines. The
    checkpoint stores them (transformers keeps them as a frozen Parameter); a fresh build makes them."""
    increment = math.log(max_timescale) / (channels // 2 - 1)
    inv_timescales = torch.exp(-increment * torch.arange(channels // 2, device="cpu"))
    scaled_time = torch.arange(length, device="cpu")[:, None] * inv_timescales[None, :]
    return torch.cat([scaled_time.sin(), scaled_time.cos()], dim=1)


class Attention(nn.Module):
    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.heads = heads
        # transformers' order (and Whisper's: no bias on the keys), which is the checkpoint's
        self.k_proj = nn.Linear(dim, dim, bias=False)
        self.v_proj = nn.Linear(dim, dim)
        self.q_proj = nn.Linear(dim, dim)
        self.out_proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, d = x.shape
        q, k, v = (p(x).view(b, t, self.heads, -1).transpose(1, 2) for p in (self.q_proj, self.k_proj, self.v_proj))
        y = F.scaled_dot_product_attention(q, k, v)  # scale 1/sqrt(head_dim), no mask
        return self.out_proj(y.transpose(1, 2).reshape(b, t, d))


class EncoderLayer(nn.Module):
    def __init__(self, dim: int, heads: int, ffn: int):
        super().__init__()
        self.self_attn = Attention(dim, heads)
        self.self_attn_layer_norm = nn.LayerNorm(dim)
        self.fc1 = nn.Linear(dim, ffn)
        self.fc2 = nn.Linear(ffn, dim)
        self.final_layer_norm = nn.LayerNorm(dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.self_attn(self.self_attn_layer_norm(x))
        return x + self.fc2(F.gelu(self.fc1(self.final_layer_norm(x))))


class WhisperEncoder(nn.Module):
    """Log-mel features (B, n_mels, audio_frames) -> (B, audio_positions, audio_dim), after the
    final LayerNorm (transformers' `last_hidden_state`)."""

    def __init__(self, cfg):
        super().__init__()
        dim = cfg.audio_dim
        self.conv1 = nn.Conv1d(cfg.n_mels, dim, kernel_size=3, padding=1)
        self.conv2 = nn.Conv1d(dim, dim, kernel_size=3, stride=2, padding=1)
        self.embed_positions = nn.Embedding(cfg.audio_positions, dim)
        self.embed_positions.requires_grad_(False)  # fixed sinusoids, never trained
        if not self.embed_positions.weight.is_meta:
            with torch.no_grad():
                self.embed_positions.weight.copy_(sinusoids(cfg.audio_positions, dim))
        self.layers = nn.ModuleList(EncoderLayer(dim, cfg.audio_heads, cfg.audio_ffn) for _ in range(cfg.audio_layers))
        self.layer_norm = nn.LayerNorm(dim)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        x = F.gelu(self.conv1(features))
        x = F.gelu(self.conv2(x)).transpose(1, 2)
        x = x + self.embed_positions.weight
        for layer in self.layers:
            x = layer(x)
        return self.layer_norm(x)
