"""HTSAT, the Swin-transformer audio encoder of Mellow, and the `c2l` layer on top of it.

HTSAT: Chen et al., "HTS-AT: A Hierarchical Token-Semantic Audio Transformer" (ICASSP 2022), built
on the Swin transformer (Liu et al., arXiv 2103.14030). We follow the reference used by Mellow
(soham97/mellow, mellow/model/htsat.py, `HTSAT_Swin_Transformer` and `HTSATWrapper`) in eval mode:
module and key names match its state dict, so the published checkpoint loads strictly.

The path of one 10 s clip (v0 sizes):
  wav (320000,) -> log-mel (1001, 64) -> bn0 -> bicubic resize to 1024 frames -> 4 time chunks of
  256 frames stacked along frequency: a 256x256 image -> 4x4 patches (64x64 tokens of 96) ->
  4 Swin stages (window 8, shifted on odd blocks, patch merging between stages) -> 8x8 tokens of
  768 -> `latent` = mean over tokens, and the token-semantic head `tscam_conv` -> 32 frames of 527
  class probabilities -> `c2l` to 768, each frame repeated 32 times -> (1 + 1024, 768).

Inference runs it in eval mode. In `train()` mode it does what the reference does in training
(the official training release, soham97/mellow branch `training`, models/htsat.py): bn0 normalises
with batch statistics, SpecAugment (torchlibrosa's `SpecAugmentation(64, 2, 8, 2)`) zeroes stripes
of the normalised log-mel, and DropPath (stochastic depth, rising linearly to 0.1 over the blocks)
drops residual branches per clip. The reference's mixup and attention-map outputs are left out
(its training never asks for them). Every random draw comes from torch's global generator.

Meta-device builds: every buffer is persistent and in the checkpoint (STFT kernels, mel matrix,
bn0 statistics, `relative_position_index`, `attn_mask`) and nothing else is precomputed (position
bias and shift mask are combined in `forward`), so after `load_state_dict(..., assign=True)` no
meta tensor is left and nothing needs re-initialising. Buffers are computed on the CPU and then
moved to the default device (see `frontend.constant`), which keeps a meta build fast.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from mellow_cli.models.mellow.config import MellowConfig
from mellow_cli.models.blocks import CPU, MLP, constant
from mellow_cli.models.mellow.frontend import LogMel, Spectrogram

MASKED = -100.0  # the reference's additive mask between tokens from different shifted regions
DROP_PATH = 0.1  # the reference's drop_path_rate: the last block's stochastic depth
SPEC_AUGMENT = ((2, 64, 2), (3, 8, 2))  # (axis, widest stripe, stripes): time, then frequency


def drop_path(x: torch.Tensor, p: float) -> torch.Tensor:
    """Stochastic depth (timm's drop_path): each clip's branch kept with probability 1 - p, scaled."""
    keep = 1 - p
    mask = (keep + torch.rand((x.shape[0],) + (1,) * (x.ndim - 1), dtype=x.dtype, device=x.device)).floor_()
    return x.div(keep) * mask


def spec_augment(x: torch.Tensor) -> torch.Tensor:
    """(B, 1, frames, mels) -> the same with random stripes zeroed, drawn as torchlibrosa's
    DropStripes draws them: for each axis, for each clip, each stripe a width in [0, widest) and
    a start in [0, size - width)."""
    keep = torch.ones_like(x, dtype=torch.bool)
    for axis, widest, stripes in SPEC_AUGMENT:
        size = x.shape[axis]
        for clip in keep:
            for _ in range(stripes):
                width = int(torch.randint(0, widest, (1,))[0])
                start = int(torch.randint(0, size - width, (1,))[0])
                clip.narrow(axis - 1, start, width).fill_(False)
    return x.masked_fill(~keep, 0.0)


def window_partition(x: torch.Tensor, window: int) -> torch.Tensor:
    """(B, H, W, C) -> (B, windows, window * window, C), windows in row-major order."""
    B, H, W, C = x.shape
    x = x.view(B, H // window, window, W // window, window, C).transpose(2, 3)
    return x.reshape(B, (H // window) * (W // window), window * window, C)


def window_merge(windows: torch.Tensor, H: int, W: int, window: int) -> torch.Tensor:
    """The inverse of `window_partition`: (B, windows, window * window, C) -> (B, H, W, C)."""
    B, _, _, C = windows.shape
    x = windows.view(B, H // window, W // window, window, window, C).transpose(2, 3)
    return x.reshape(B, H, W, C)


def relative_position_index(window: int) -> torch.Tensor:
    """(N, N) int64 on the CPU, N = window^2: the bias-table row of each query/key pair in a window.

    The table has (2 window - 1)^2 rows, one per relative offset (dy, dx); the index is
    (dy + window - 1) * (2 window - 1) + (dx + window - 1).
    """
    steps = torch.arange(window, device=CPU)
    coords = torch.stack(torch.meshgrid(steps, steps, indexing="ij"))
    coords = coords.flatten(1)  # (2, N)
    offset = coords[:, :, None] - coords[:, None, :] + (window - 1)  # (2, N, N), from 0
    return offset[0] * (2 * window - 1) + offset[1]


def shifted_window_mask(size: int, window: int, shift: int) -> torch.Tensor:
    """(windows, N, N) float32 CPU additive mask for a cyclic shift of `shift` on a size^2 grid.

    After the shift, windows on the last row/column hold tokens that were not neighbours; tokens
    are labelled by region (3 bands per axis) and may only attend within their own region.
    """
    band = torch.zeros(size, dtype=torch.long, device=CPU)
    band[size - window:] = 1
    band[size - shift:] = 2
    region = (band[:, None] * 3 + band[None, :]).float()  # (size, size)
    windows = window_partition(region[None, :, :, None], window)[0, :, :, 0]  # (windows, N)
    different = windows[:, None, :] != windows[:, :, None]
    return torch.zeros_like(different, dtype=torch.float32).masked_fill(different, MASKED)


class WindowAttention(nn.Module):
    """Multi-head self-attention inside each window, with a learned relative-position bias."""

    def __init__(self, dim: int, num_heads: int, window: int):
        super().__init__()
        self.num_heads = num_heads
        self.relative_position_bias_table = nn.Parameter(torch.zeros((2 * window - 1) ** 2, num_heads))
        nn.init.trunc_normal_(self.relative_position_bias_table, std=0.02)
        self.register_buffer("relative_position_index", constant(relative_position_index(window)))
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        """x (B, windows, N, C); mask (windows, N, N) or None -> (B, windows, N, C)."""
        B, nW, N, C = x.shape
        heads, head_dim = self.num_heads, C // self.num_heads
        # windows folded into the head axis: with 4-d inputs SDPA takes its fused CPU kernel (5-d
        # inputs fall back to the unfused path; the whole encoder was ~10% slower that way)
        qkv = self.qkv(x).view(B, nW, N, 3, heads, head_dim).permute(3, 0, 1, 4, 2, 5)
        q, k, v = qkv.reshape(3, B, nW * heads, N, head_dim)
        bias = self.relative_position_bias_table[self.relative_position_index].permute(2, 0, 1)
        bias = (bias + mask[:, None]) if mask is not None else bias.expand(nW, -1, -1, -1)
        # in q's dtype: bfloat16 where htsat.pack_linears has qkv keep its products' rounding
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=bias.reshape(1, nW * heads, N, N).to(q.dtype))
        return self.proj(out.view(B, nW, heads, N, head_dim).transpose(2, 3).reshape(B, nW, N, C))


class SwinBlock(nn.Module):
    """Pre-norm window attention + MLP; with `shift`, windows are offset by a cyclic roll."""

    def __init__(self, dim: int, num_heads: int, size: int, window: int, shift: int, mlp_ratio: float,
                 drop: float = 0.0):
        super().__init__()
        self.window, self.shift, self.drop = window, shift, drop
        self.norm1 = nn.LayerNorm(dim)
        self.attn = WindowAttention(dim, num_heads, window)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = MLP(dim, int(dim * mlp_ratio))
        # a None buffer stays out of the state dict, as in the checkpoint (unshifted blocks)
        self.register_buffer("attn_mask", constant(shifted_window_mask(size, window, shift)) if shift else None)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, H, W, C) -> (B, H, W, C)."""
        _, H, W, _ = x.shape
        h = self.norm1(x)
        if self.shift:
            h = torch.roll(h, (-self.shift, -self.shift), dims=(1, 2))
        h = window_merge(self.attn(window_partition(h, self.window), self.attn_mask), H, W, self.window)
        if self.shift:
            h = torch.roll(h, (self.shift, self.shift), dims=(1, 2))
        x = x + self._branch(h)
        return x + self._branch(self.mlp(self.norm2(x)))

    def _branch(self, h: torch.Tensor) -> torch.Tensor:
        return drop_path(h, self.drop) if self.training and self.drop > 0 else h


class PatchMerging(nn.Module):
    """Halve the grid, double the width: each 2x2 group of tokens -> one token."""

    def __init__(self, dim: int):
        super().__init__()
        self.norm = nn.LayerNorm(4 * dim)
        self.reduction = nn.Linear(4 * dim, 2 * dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, H, W, C) -> (B, H/2, W/2, 2C)."""
        # channel order (even row, even col), (odd, even), (even, odd), (odd, odd), as trained
        x = torch.cat([x[:, 0::2, 0::2], x[:, 1::2, 0::2], x[:, 0::2, 1::2], x[:, 1::2, 1::2]], dim=-1)
        return self.reduction(self.norm(x))


class Stage(nn.Module):
    """Swin blocks at one resolution, alternating plain and shifted windows, then merging."""

    def __init__(self, dim: int, depth: int, num_heads: int, size: int, cfg: MellowConfig, downsample: bool,
                 drops: list[float]):
        super().__init__()
        # a grid no larger than the window is one window: nothing to shift (the last stage of v0)
        window = min(size, cfg.window_size)
        shift = 0 if size <= cfg.window_size else cfg.window_size // 2
        self.blocks = nn.ModuleList(
            SwinBlock(dim, num_heads, size, window, shift if i % 2 else 0, cfg.mlp_ratio, drops[i])
            for i in range(depth)
        )
        self.downsample = PatchMerging(dim) if downsample else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for block in self.blocks:
            x = block(x)
        return x if self.downsample is None else self.downsample(x)


class PatchEmbed(nn.Module):
    def __init__(self, patch_size: int, dim: int):
        super().__init__()
        self.proj = nn.Conv2d(1, dim, kernel_size=patch_size, stride=patch_size)
        self.norm = nn.LayerNorm(dim)

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        """(B, 1, S, S) -> (B, S / patch, S / patch, dim)."""
        return self.norm(self.proj(image).permute(0, 2, 3, 1))


class HTSAT(nn.Module):
    """wav -> (clip latent, per-frame class probabilities). Keys match the reference's `htsat`."""

    def __init__(self, cfg: MellowConfig):
        super().__init__()
        # the image is freq_ratio time chunks of n_mels rows stacked into a square
        assert cfg.spec_size == cfg.freq_ratio * cfg.n_mels, "image layout needs spec_size = freq_ratio * n_mels"
        self.freq_ratio = cfg.freq_ratio
        self.frames = cfg.spec_size * cfg.freq_ratio  # time steps after resizing (1024)
        self.spectrogram_extractor = Spectrogram(cfg.n_fft, cfg.hop_length)
        self.logmel_extractor = LogMel(cfg.sample_rate, cfg.n_fft, cfg.n_mels, cfg.fmin, cfg.fmax)
        self.bn0 = nn.BatchNorm2d(cfg.n_mels)
        self.patch_embed = PatchEmbed(cfg.patch_size, cfg.embed_dim)
        grid = cfg.spec_size // cfg.patch_size
        n = len(cfg.depths)
        # the reference's float32 linspace, on the CPU even inside a meta-device build
        drops = torch.linspace(0, DROP_PATH, sum(cfg.depths), device=CPU).tolist()
        first = [sum(cfg.depths[:i]) for i in range(n)]
        self.layers = nn.ModuleList(
            Stage(cfg.embed_dim * 2**i, cfg.depths[i], cfg.num_heads[i], grid // 2**i, cfg, downsample=i < n - 1,
                  drops=drops[first[i]: first[i] + cfg.depths[i]])
            for i in range(n)
        )
        self.norm = nn.LayerNorm(cfg.audio_dim)
        # token-semantic head: spans all frequency rows of one time chunk (2 for v0), 3 time steps
        rows_per_chunk = grid // 2 ** (n - 1) // cfg.freq_ratio
        self.tscam_conv = nn.Conv2d(cfg.audio_dim, cfg.num_classes, kernel_size=(rows_per_chunk, 3), padding=(0, 1))
        # unused by the reference's forward, but stored in the checkpoint: kept for a strict load
        self.head = nn.Linear(cfg.num_classes, cfg.num_classes)

    def log_mel(self, wav: torch.Tensor) -> torch.Tensor:
        """(B, samples) -> (B, 1, frames, n_mels) in dB, before bn0."""
        return self.logmel_extractor(self.spectrogram_extractor(wav))[:, None]

    def to_image(self, log_mel: torch.Tensor) -> torch.Tensor:
        """(B, 1, frames, n_mels) -> normalised, resized and folded (B, 1, spec_size, spec_size)."""
        x = self.bn0(log_mel.transpose(1, 3)).transpose(1, 3)  # bn0 normalises each mel band
        if self.training:
            x = spec_augment(x)
        B, _, _, M = x.shape
        x = F.interpolate(x, (self.frames, M), mode="bicubic", align_corners=True)
        # (B, 1, T, M) -> rows: chunk * M + mel, columns: time within the chunk
        x = x.transpose(2, 3).reshape(B, 1, M, self.freq_ratio, -1).transpose(2, 3)
        return x.reshape(B, 1, self.freq_ratio * M, -1)

    def forward(self, wav: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """wav (B, samples) -> latent (B, audio_dim), framewise (B, time tokens, num_classes)."""
        x = self.patch_embed(self.to_image(self.log_mel(wav)))
        for stage in self.layers:
            x = stage(x)
        x = self.norm(x)  # (B, H, W, C): H = chunk-major frequency rows, W = time within a chunk
        B, H, W, C = x.shape
        latent = x.mean(dim=(1, 2))
        # unstack the time chunks: (B, C, H / freq_ratio, freq_ratio * W), time = chunk * W + w
        x = x.view(B, self.freq_ratio, H // self.freq_ratio, W, C).permute(0, 4, 2, 1, 3)
        x = x.reshape(B, C, H // self.freq_ratio, self.freq_ratio * W)
        logits = self.tscam_conv(x).flatten(2)  # (B, classes, time tokens)
        return latent, torch.sigmoid(logits).transpose(1, 2)


class HTSATEncoder(nn.Module):
    """The reference's `HTSATWrapper` (`audio_encoder.base`): HTSAT plus `c2l`, classes -> latent width.

    forward: wav (B, clip_samples) float32 -> (B, 1 + spec_size * freq_ratio, audio_dim), the clip
    latent followed by one embedding per resized frame.
    """

    def __init__(self, cfg: MellowConfig):
        super().__init__()
        self.clip_samples = cfg.clip_samples
        self.frames = cfg.spec_size * cfg.freq_ratio
        self.htsat = HTSAT(cfg)
        self.c2l = nn.Linear(cfg.num_classes, cfg.audio_dim)

    def forward(self, wav: torch.Tensor) -> torch.Tensor:
        if wav.ndim != 2 or wav.shape[1] != self.clip_samples:
            raise ValueError(f"expected waveforms of shape (batch, {self.clip_samples}), got {tuple(wav.shape)}")
        latent, framewise = self.htsat(wav)
        # The reference upsamples the 32 frames by repeating each one, then applies c2l; c2l acts
        # on each frame alone, so applying it first to the distinct frames gives the same output.
        frames = self.c2l(framewise).repeat_interleave(self.frames // framewise.shape[1], dim=1)
        return torch.cat([latent[:, None], frames], dim=1)


def pack_linears(htsat: HTSAT, precision, release=None) -> bool:
    """Multiply the HTSAT encoder's linears (two thirds of its time) through a bfloat16 copy,
    oneDNN-packed, where `precision` multiplies several rows in bfloat16 on a CPU that packs it:
    a 10 s clip's embeddings then stay within 0.2% of float32's (their norm) for a third less
    time. Biases, and each MLP's GELU, are applied inside oneDNN's product, to its float32 sums
    before the output is rounded, and an MLP's hidden activations stay bfloat16 between its two
    products (its second product rounds them so anyway), as do each window attention's queries,
    keys and values: its attention then runs in bfloat16 too (torch's flash kernel sums in float32),
    a fifteenth less time for the same error. The float32 weights go, each handed to
    `release` first (as in LlamaForCausalLM.prepare). The exact path (float32) and float16
    leave the encoder as it is. Whether it changed."""
    from mellow_cli.runtime.matrices import PackedLinear, packed_available

    if precision.prefill != "bfloat16" or not packed_available(torch.bfloat16):
        return False
    for module in list(htsat.modules()):
        for name, child in list(module.named_children()):
            if isinstance(child, MLP) and child.fc1.weight.device.type == "cpu":
                first = PackedLinear(child.fc1, torch.bfloat16, post="gelu", keep=True)
                setattr(module, name, torch.nn.Sequential(first, PackedLinear(child.fc2, torch.bfloat16)))
                if release is not None:
                    release([child.fc1.weight.detach(), child.fc2.weight.detach()])
            elif isinstance(child, torch.nn.Linear) and child.weight.device.type == "cpu":
                keep = isinstance(module, WindowAttention) and name == "qkv"
                setattr(module, name, PackedLinear(child, torch.bfloat16, keep=keep))
                if release is not None:
                    release([child.weight.detach()])
    return True
