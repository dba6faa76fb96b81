"""The Mellow network: the audio side (HTSAT encoder, projection into the language model's width,
pooling), the language model (SmolLM2, runtime/llama.py, laid out as transformers' `LlamaForCausalLM`), and the input
sequence that joins them: clip 1 · separator · clip 2 · separator · prompt.

Follows the reference implementation soham97/mellow (`mellow/model/mellow.py`, `decoder.py`,
`wrapper.py`) and the paper (arXiv 2503.08540). Module names match the published state dict
(`audio_encoder.base`, `audio_encoder.projection`, `caption_decoder.lm`) so `v0.ckpt` loads with
`strict=True`. Loading follows gpt-fast: build on the `meta` device, then
`load_state_dict(..., assign=True)` and recompute the buffers a checkpoint does not carry.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
from torch import nn

from mellow_cli.models.mellow.config import MellowConfig
from mellow_cli.models.blocks import Projection
from mellow_cli.models.mellow.htsat import HTSATEncoder
from mellow_cli.models.weights import (
    assign,
    build_lm,
    check_filled,
    init_lm_buffers,
    normalize_state_dict,
    Network,
    tie_lm_head,
)


class AudioEncoder(nn.Module):
    """HTSAT (+ c2l) as `base`, then `projection`: wav (B, samples) -> (B, 1025, hidden_size)."""

    def __init__(self, cfg: MellowConfig):
        super().__init__()
        self.base = HTSATEncoder(cfg)
        self.projection = Projection(cfg.audio_dim, cfg.hidden_size)

    def forward(self, wav: torch.Tensor) -> torch.Tensor:
        # The encoder may stay float32 (its STFT kernels and mel matrix lose too much in half
        # precision) while the mapper and language model run in bfloat16 on a GPU: meet at the
        # mapper's dtype.
        with torch.autocast(wav.device.type, enabled=False):  # training runs under autocast
            frames = self.base(wav.to(self.base.c2l.weight.dtype))
        return self.projection(frames.to(self.projection.linear1.weight.dtype))


class CaptionDecoder(nn.Module):
    """Holds the language model; exists so its weights sit under `caption_decoder.lm.*`."""

    def __init__(self, cfg: MellowConfig):
        super().__init__()
        self.lm = build_lm(cfg)


class Mellow(Network):
    """Two clips and a prompt -> the language model's input embeddings; `lm` decodes from them
    (see mellow_cli.generate)."""

    def __init__(self, cfg: MellowConfig):
        super().__init__()
        self.cfg = cfg
        self.audio_encoder = AudioEncoder(cfg)
        self.caption_decoder = CaptionDecoder(cfg)

    @property
    def lm(self):
        return self.caption_decoder.lm

    # --- audio side -------------------------------------------------------------------------

    def pool(self, frames: torch.Tensor) -> torch.Tensor:
        """(B, 1 + n*pool, H) -> (B, 1 + n, H): keep the clip latent (position 0) as it is and
        average the frame embeddings in groups of `cfg.pool`, as the reference's avg_pool2d."""
        b, t, h = frames.shape
        pooled = frames[:, 1:].reshape(b, (t - 1) // self.cfg.pool, self.cfg.pool, h).mean(dim=2)
        return torch.cat([frames[:, :1], pooled], dim=1)

    def encode_audio(self, wav: torch.Tensor) -> torch.Tensor:
        """wav (B, clip_samples) at cfg.sample_rate -> (B, audio_tokens, hidden_size)."""
        return self.pool(self.audio_encoder(wav))

    # --- the sequence the language model sees ------------------------------------------------

    def embed_prefix(self, clip1: torch.Tensor, clip2: torch.Tensor, input_ids: torch.Tensor) -> torch.Tensor:
        """clips (B, audio_tokens, H) from `encode_audio`, input_ids (B, prompt_tokens) from
        `tokenize_prompts` -> inputs_embeds (B, prefix_len, H)."""
        prompt = self.lm.embed(input_ids)
        sep = self.lm.embed(input_ids.new_full((prompt.shape[0], 1), self.cfg.sep_token_id))
        return torch.cat([clip1, sep, clip2, sep, prompt], dim=1)

    def prefix(self, wav1: torch.Tensor, wav2: torch.Tensor, input_ids: torch.Tensor) -> torch.Tensor:
        """wavs (B, clip_samples) -> inputs_embeds (B, prefix_len, H), for training and for the
        reference's view (the CLI embeds clips once and caches them, then calls `embed_prefix`).
        Both clips go through the encoder as one batch; a row whose second clip is its first (a
        one-clip question) encodes it once."""
        b = wav1.shape[0]
        own = torch.zeros(b, dtype=torch.bool, device=wav1.device) if wav1 is wav2 else (wav1 != wav2).any(dim=1)
        clips = self.encode_audio(torch.cat([wav1, wav2[own]]))
        second = torch.arange(b, device=wav1.device)
        second[own] = torch.arange(b, len(clips), device=wav1.device)
        return self.embed_prefix(clips[:b], clips[second], input_ids)


def tokenize_prompts(tokenizer, prompts: Sequence[str], cfg: MellowConfig) -> torch.Tensor:
    """Prompts -> (B, prompt_tokens) ids exactly as the reference's `preprocess_text`: plain text
    (no chat template), the tokenizer's own special tokens (SmolLM2 adds none), cut to
    `prompt_tokens` from the right and right-padded with `pad_token_id` (`!`). There is no
    attention mask: the model was trained attending to the padding."""
    rows = []
    for text in prompts:
        ids = tokenizer(text, add_special_tokens=True)["input_ids"][: cfg.prompt_tokens]
        rows.append(ids + [cfg.pad_token_id] * (cfg.prompt_tokens - len(ids)))
    return torch.tensor(rows, dtype=torch.long)


# --- loading ---------------------------------------------------------------------------------


def load_weights(model: Mellow, sd: Mapping[str, torch.Tensor]) -> Mellow:
    """Adopt the checkpoint's tensors (no copy; mmap-friendly), re-tie the head, recompute the
    buffers a checkpoint does not hold. Raises ModelError, naming keys, if anything differs."""
    assign(model, normalize_state_dict(sd, prefix="caption_decoder.lm."), f"Mellow {model.cfg.name}")
    tie_lm_head(model.lm)
    init_buffers(model)
    return model.eval()


def init_buffers(model: Mellow) -> None:
    """Recompute the buffers a meta build leaves without data. HTSAT keeps all of its buffers in
    the checkpoint; the language model's RoPE table is not stored and is rebuilt here."""
    init_lm_buffers(model.lm)
    check_filled(model)

