"""The Samsone network: each clip's log-mel (features.py) through the Whisper-tiny encoder
(whisper.py), averaged in groups of 30 frames to 50 tokens, projected into SmolLM2's width; the
language model then reads `[sep, clip 1, sep, clip 2, sep, ..., prompt]`, where `sep` is a
learned vector, not a vocabulary token.

Follows SamsungLabs/samsone (`models/multimodal/audio_lm.py` AudioLM, `models/audio/poolers.py`
FixedLengthAudioEmbeddingsPooler, `models/projectors.py` NonLinearProjector). Module names are the
published checkpoint's keys after its `audio_lm.` prefix, except `text_model.embedding_layer`:
the authors register the language model's input embedding a second time under that name; here
it exists once (checkpoint.py maps the third name), so dropping the table for inference frees it.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
from torch import nn

from mellow_cli.errors import UsageError
from mellow_cli.runtime.llama import LlamaForCausalLM
from mellow_cli.models.blocks import Projection
from mellow_cli.models.family import PrefixRow
from mellow_cli.models.weights import (
    assign,
    check_filled,
    init_lm_buffers,
    normalize_state_dict,
    Network,
    tie_lm_head,
)
from mellow_cli.models.samsone.config import SamsoneConfig
from mellow_cli.models.samsone.features import log_mel
from mellow_cli.models.samsone.whisper import WhisperEncoder


class Scope(nn.Module):
    """Holds modules under given names, so their weights sit under the checkpoint's key path."""

    def __init__(self, **children: nn.Module):
        super().__init__()
        for name, child in children.items():
            self.add_module(name, child)


class Samsone(Network):
    def __init__(self, cfg: SamsoneConfig):
        super().__init__()
        self.cfg = cfg
        self.sep_token = nn.Parameter(torch.randn(cfg.hidden_size))
        # AudioEncoderWithPooling.encoder (WhisperAudioEncoder) .encoder (transformers' WhisperEncoder)
        self.audio_encoder = Scope(encoder=Scope(encoder=WhisperEncoder(cfg)))
        self.projector = Projection(cfg.audio_dim, cfg.hidden_size)
        self.text_model = Scope(model=LlamaForCausalLM(cfg).eval())

    @property
    def whisper(self) -> WhisperEncoder:
        return self.audio_encoder.encoder.encoder

    @property
    def lm(self) -> LlamaForCausalLM:
        return self.text_model.model

    # --- audio side -------------------------------------------------------------------------

    def pool(self, frames: torch.Tensor) -> torch.Tensor:
        """(B, audio_positions, D) -> (B, audio_tokens, D): the mean of each run of
        audio_positions // audio_tokens frames (30), padding frames included, as the reference."""
        b, t, d = frames.shape
        size = t // self.cfg.audio_tokens
        return frames[:, : size * self.cfg.audio_tokens].reshape(b, self.cfg.audio_tokens, size, d).mean(dim=2)

    def encode_clips(self, waves: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        """Clips (clip_samples,) at cfg.sample_rate, as `fit_clip` made them -> each one's
        (audio_tokens, hidden_size). Each clip runs alone: its tokens never depend on the others."""
        weight = self.projector.linear1.weight
        out = []
        for wave in waves:
            features = log_mel(torch.as_tensor(wave, device=weight.device), self.cfg)
            frames = self.whisper(features[None].to(self.whisper.conv1.weight.dtype))
            out.append(self.projector(self.pool(frames).to(weight.dtype))[0])
        return out

    # --- the sequence the language model sees ------------------------------------------------

    def prefix_row(self, clips: Sequence[torch.Tensor], prompt_ids: Sequence[int]) -> PrefixRow:
        """One question's clips (from `encode_clips`) and prompt (prompt.py's `prompt_ids`) ->
        `[sep, clip 1, sep, clip 2, sep, ..., prompt]`; the last position predicts the answer."""
        if not clips:
            raise UsageError(f"{self.cfg.name} needs one or more clips for a question, got none")
        sep = self.sep_token[None]
        parts = [sep]
        for clip in clips:
            parts += [clip.to(sep.dtype), sep]
        ids = torch.tensor(list(prompt_ids), dtype=torch.long, device=sep.device)
        parts.append(self.lm.embed(ids).to(sep.dtype))
        embeds = torch.cat(parts)
        return PrefixRow(embeds, query=None, query_position=None, next_position=embeds.shape[0])


LM_PREFIX = "text_model.model."  # where the language model's keys start


def load_weights(model: Samsone, sd: Mapping[str, torch.Tensor], dtype: torch.dtype | None = None) -> Samsone:
    """Adopt a state dict with the network's keys (checkpoint.py's `read_published` gives one):
    strict, no copy unless `dtype` asks for a conversion (the published files are half precision;
    the reference computes in the dtype it is asked for). The tied head may be left out (a cached
    folder stores the table once). Raises ModelError naming the keys."""
    sd = normalize_state_dict(sd, prefix=LM_PREFIX)
    if dtype is not None:
        sd = {k: v.to(dtype) if v.is_floating_point() else v for k, v in sd.items()}
    stored = {v.dtype for v in sd.values() if v.is_floating_point()}
    if len(stored) == 1:
        model.to(stored.pop())  # the layout check compares dtypes; on meta this moves no data
    assign(model, sd, f"Samsone {model.cfg.name}")
    tie_lm_head(model.lm)
    init_lm_buffers(model.lm)
    check_filled(model)
    return model.eval()
