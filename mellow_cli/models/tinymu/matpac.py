"""MATPAC++, TinyMU's audio encoder: a ViT-B over 16 x 16 patches of the log-mel, run on chunks
of 992 frames, each patch column's frequency patches concatenated into one 3840-wide token.

Follows the encoder as TinyMU uses it (xiquan-li/TinyMU, src/models/matpac/model.py:
`matpac_wrapper.forward_precise`, `extract_features`, `encoder_layers`; timm 0.4.12's `Block`):
pre-norm blocks with exact GELU, LayerNorm eps 1e-6, no time pooling, the final LayerNorm's output,
CLS dropped. Upstream MATPAC (aurianworld/matpac) is the same network with 608-frame chunks; the
published checkpoint's position table (1 + 5 x 62 rows) fixes 992 here.

The path of one 10 s clip: log-mel (80, 998) -> zero-padded to 1008 frames (a multiple of 16;
zero is the normalised mean level, not silence) -> chunk 1 (992 frames, 62 columns) and chunk 2
(16 frames, 1 column) -> each chunk: patches in frequency-major order (row f, column j is token
f * t + j), plus the position table's first t columns of each row, behind the CLS token -> 12
blocks -> LayerNorm -> (t, 5 x 768) -> 63 tokens.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from mellow_cli.models.blocks import MLP  # timm's: fc1, exact GELU, fc2
from mellow_cli.models.tinymu.config import TinyMUConfig
from mellow_cli.models.tinymu.frontend import LogMel


class PatchEmbed(nn.Module):
    """(B, 1, n_mels, frames) -> (B, rows * columns, dim), one token per non-overlapping patch."""

    def __init__(self, patch: int, dim: int):
        super().__init__()
        self.proj = nn.Conv2d(1, dim, kernel_size=patch, stride=patch)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x).flatten(2).transpose(1, 2)


class Attention(nn.Module):
    """timm's ViT attention, written as timm writes it (explicit softmax) to match it closely."""

    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.heads = heads
        self.scale = (dim // heads) ** -0.5
        self.qkv = nn.Linear(dim, dim * 3)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, c = x.shape
        q, k, v = self.qkv(x).reshape(b, n, 3, self.heads, c // self.heads).permute(2, 0, 3, 1, 4)
        attn = ((q @ k.transpose(-2, -1)) * self.scale).softmax(dim=-1)
        return self.proj((attn @ v).transpose(1, 2).reshape(b, n, c))


class Block(nn.Module):
    def __init__(self, cfg: TinyMUConfig):
        super().__init__()
        self.norm1 = nn.LayerNorm(cfg.encoder_dim, eps=cfg.encoder_norm_eps)
        self.attn = Attention(cfg.encoder_dim, cfg.encoder_heads)
        self.norm2 = nn.LayerNorm(cfg.encoder_dim, eps=cfg.encoder_norm_eps)
        self.mlp = MLP(cfg.encoder_dim, cfg.encoder_mlp)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class Transformer(nn.Module):
    """The blocks and the final LayerNorm (the checkpoint's `student_encoder`)."""

    def __init__(self, cfg: TinyMUConfig):
        super().__init__()
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.encoder_depth))
        self.norm = nn.LayerNorm(cfg.encoder_dim, eps=cfg.encoder_norm_eps)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for block in self.blocks:
            x = block(x)
        return self.norm(x)


class MATPAC(nn.Module):
    """wave (B, samples) -> audio tokens (B, cfg.audio_tokens(samples), cfg.audio_dim)."""

    def __init__(self, cfg: TinyMUConfig):
        super().__init__()
        self.cfg = cfg
        self.cls_token = nn.Parameter(torch.zeros(1, 1, cfg.encoder_dim))
        # Fixed (not trained) in the authors' model; a Parameter so it sits in the state dict as there.
        positions = 1 + cfg.freq_patches * cfg.chunk_columns
        self.pos_embed = nn.Parameter(torch.zeros(1, positions, cfg.encoder_dim), requires_grad=False)
        self.patch_embed = PatchEmbed(cfg.patch_size, cfg.encoder_dim)
        self.student_encoder = Transformer(cfg)
        self.log_mel = LogMel(cfg)

    def forward(self, wave: torch.Tensor) -> torch.Tensor:
        x = self.log_mel(wave)  # (B, n_mels, frames)
        patch = self.cfg.patch_size
        x = F.pad(x, (0, -x.shape[-1] % patch))[:, None]  # (B, 1, n_mels, frames rounded up to patches)
        chunks = x.split(self.cfg.chunk_frames, dim=-1)
        return torch.cat([self.encode_chunk(chunk) for chunk in chunks], dim=1)

    def encode_chunk(self, x: torch.Tensor) -> torch.Tensor:
        """(B, 1, n_mels, frames <= chunk_frames) -> (B, columns, audio_dim)."""
        tokens = self.patch_embed(x)  # (B, rows * columns, dim), frequency-major
        rows, dim = self.cfg.freq_patches, self.cfg.encoder_dim
        columns = tokens.shape[1] // rows
        table = self.pos_embed[:, 1:].reshape(1, rows, self.cfg.chunk_columns, dim)[:, :, :columns]
        tokens = tokens + table.reshape(1, rows * columns, dim)
        cls = (self.cls_token + self.pos_embed[:, :1]).expand(tokens.shape[0], -1, -1)
        out = self.student_encoder(torch.cat([cls, tokens], dim=1))[:, 1:]
        # token (f, j) -> column j's features f * dim .. (f + 1) * dim
        return out.reshape(-1, rows, columns, dim).transpose(1, 2).reshape(-1, columns, rows * dim)
