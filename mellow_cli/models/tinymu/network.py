"""The TinyMU network: MATPAC++ (`audio_encoder.enc`), the projector into SmolLM2's width
(`projector`), SmolLM2 (`text_decoder.lm`), and the sequence that joins them:
audio tokens · `<|endoftext|>` · prompt.

Follows the authors' `m2t` (xiquan-li/TinyMU, src/models/m2t.py, encoder.py, projector.py,
decoder.py). Module names are the published state dict's, so `tinymu.pt`'s `"model"` loads with
`strict=True` after a build on the `meta` device (checkpoint.py reads the file). The authors' third
name for the token embedding, `text_decoder.embed_fn`, is not a module here: one table, two names
(embedding and tied head), as in every other family.

Two things differ from the authors' code on purpose:
- Each clip is encoded alone. The authors zero-pad a batch to its longest clip and encode the
  padding as sound, so a 7 s clip gives 44 tokens alone and 63 beside a 10 s clip: an answer
  would depend on what else was in the batch.
- The prompt's `!` padding is not materialised. The authors right-pad the prompt to 129 tokens
  with `!`, mask the pads from every later token but count their positions, and read the first
  answer token from the last pad. `prefix_row` gives the same computation without the dead pads:
  the real prompt tokens, then that last pad as the row's `query` at its own position.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from mellow_cli.errors import UsageError
from mellow_cli.models.family import PrefixRow
from mellow_cli.models.weights import (
    assign,
    build_lm,
    check_filled,
    init_lm_buffers,
    normalize_state_dict,
    Network,
    tie_lm_head,
)
from mellow_cli.models.tinymu.config import TinyMUConfig
from mellow_cli.models.tinymu.matpac import MATPAC

LM_PREFIX = "text_decoder.lm."


class AudioEncoder(nn.Module):
    """Holds MATPAC++ under `enc`, the checkpoint's key path."""

    def __init__(self, cfg: TinyMUConfig):
        super().__init__()
        self.enc = MATPAC(cfg)

    def forward(self, wave: torch.Tensor) -> torch.Tensor:
        return self.enc(wave)


class Projector(nn.Module):
    """audio_dim -> projector_hidden -> ReLU -> hidden_size, both layers with bias."""

    def __init__(self, cfg: TinyMUConfig):
        super().__init__()
        self.linear1 = nn.Linear(cfg.audio_dim, cfg.projector_hidden)
        self.linear2 = nn.Linear(cfg.projector_hidden, cfg.hidden_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear2(F.relu(self.linear1(x)))


class TextDecoder(nn.Module):
    """Holds the language model under `lm`, the checkpoint's key path."""

    def __init__(self, cfg: TinyMUConfig):
        super().__init__()
        self.lm = build_lm(cfg)


class TinyMU(Network):
    def __init__(self, cfg: TinyMUConfig):
        super().__init__()
        self.cfg = cfg
        self.audio_encoder = AudioEncoder(cfg)
        self.projector = Projector(cfg)
        self.text_decoder = TextDecoder(cfg)

    @property
    def lm(self):
        return self.text_decoder.lm

    def encode_clips(self, waves: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        """1-D float32 clips at cfg.sample_rate (as `fit_clip` gives them) -> each clip's audio
        tokens (cfg.audio_tokens(len), hidden_size). Clips are encoded one by one: a clip's tokens
        never depend on the other clips of the call."""
        enc = self.audio_encoder.enc
        dtype = enc.patch_embed.proj.weight.dtype
        out = []
        for wave in waves:
            # The encoder may stay float32 while the projector and language model run in half precision.
            with torch.autocast(wave.device.type, enabled=False):
                tokens = self.audio_encoder(wave.to(dtype)[None])
            out.append(self.projector(tokens.to(self.projector.linear1.weight.dtype))[0])
        return out

    def prefix_row(self, clips: Sequence[torch.Tensor], prompt_ids: Sequence[int]) -> PrefixRow:
        """One question: its clip's tokens (from `encode_clips`) and its prompt (from
        `prompt.prompt_ids`) -> the row the language model reads.

        The authors' sequence is [audio (n), sep, prompt padded to 129 with `!`]; positions count
        the pads, the pads are masked from every later token, and the last slot (position n + 129)
        predicts the first answer token, which goes at n + 130 whatever the prompt's length.
        Here: embeds = audio, sep, the real prompt tokens; the last pad as `query` at n + 129 when
        the prompt is shorter than 129 (the other pads are seen by nothing and read by nothing)."""
        cfg = self.cfg
        if len(clips) != 1:
            raise UsageError(f"TinyMU ({cfg.name}) answers about one clip at a time, not {len(clips)}")
        if len(prompt_ids) > cfg.prompt_tokens:
            raise ValueError(f"a TinyMU prompt holds at most {cfg.prompt_tokens} tokens, got {len(prompt_ids)}")
        audio = clips[0]
        ids = torch.tensor([cfg.sep_token_id, *prompt_ids], dtype=torch.long, device=audio.device)
        embeds = torch.cat([audio, self.lm.embed(ids).to(audio.dtype)])
        last = audio.shape[0] + cfg.prompt_tokens  # the position of the prompt's last slot
        if len(prompt_ids) == cfg.prompt_tokens:
            return PrefixRow(embeds, None, None, last + 1)
        pad = torch.tensor([cfg.pad_token_id], dtype=torch.long, device=audio.device)
        return PrefixRow(embeds, self.lm.embed(pad)[0].to(audio.dtype), last, last + 1)


def load_weights(model: TinyMU, sd: Mapping[str, torch.Tensor]) -> TinyMU:
    """Adopt the state dict's tensors (no copy; mmap-friendly) into a model built on `meta`, re-tie
    the head, recompute the rotary table. The front end's window and mel matrix come from the state
    dict, as in the authors' strict load. Raises ModelError, naming keys, if anything differs."""
    assign(model, normalize_state_dict(sd, prefix=LM_PREFIX), f"TinyMU {model.cfg.name}")
    tie_lm_head(model.lm)
    init_lm_buffers(model.lm)
    check_filled(model)
    return model.eval()
