"""The Mellow family's dimensions, as a plain frozen dataclass.

`MellowConfig.v0()` is the published model (arXiv 2503.08540; reference soham97/mellow, config
v0.yaml and the HTSAT defaults it inherits). `MellowConfig.tiny()` has the same structure at toy
widths, with random weights, for fast tests. A config is saved inside every checkpoint we write and
rebuilt with `MellowConfig.from_dict`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from mellow_cli.models.config import ModelConfig


@dataclass(frozen=True)
class MellowConfig(ModelConfig):
    family: ClassVar[str] = "mellow"  # models/family.py: which family's network this config builds
    default_max_tokens: ClassVar[int] = 300  # the reference's max_len: an answer's budget by default
    name: str = "v0"
    # --- audio front end (torchlibrosa-style, frozen in the checkpoint)
    sample_rate: int = 32000  # Hz; every clip is resampled to this
    clip_seconds: int = 10  # the encoder sees exactly this much audio per clip
    n_fft: int = 1024  # STFT size = Hann window length
    hop_length: int = 320  # 10 ms at 32 kHz -> 1001 frames per 10 s clip
    n_mels: int = 64  # Slaney mel bands
    fmin: float = 50.0
    fmax: float = 14000.0
    # --- HTSAT (Swin transformer over the log-mel "image")
    spec_size: int = 256  # frames are resized to spec_size * freq_ratio, folded into spec_size^2
    freq_ratio: int = 4
    patch_size: int = 4
    embed_dim: int = 96  # width of stage 1; doubles at each later stage
    depths: tuple[int, ...] = (2, 2, 6, 2)
    num_heads: tuple[int, ...] = (4, 8, 16, 32)
    window_size: int = 8
    mlp_ratio: float = 4.0
    num_classes: int = 527  # AudioSet classes of the token-semantic head
    # --- mapper and sequence layout
    pool: int = 8  # average-pool the 1024 frame embeddings in groups of this size -> 128
    prompt_tokens: int = 129  # prompt is truncated / right-padded with `pad_token_id` to this
    # --- language model: SmolLM2-135M (ModelConfig's defaults), tied to `<|endoftext|>` and `!` here
    sep_token_id: int = 0  # `<|endoftext|>`: separates clip 1, clip 2 and the prompt
    eos_token_id: int = 0  # `<|endoftext|>`: generation stops here
    pad_token_id: int = 17  # `!`: the model was trained attending to this padding

    # derived sizes, so no caller recomputes them
    @property
    def clip_samples(self) -> int:
        return self.sample_rate * self.clip_seconds

    @property
    def audio_dim(self) -> int:
        """Width of the encoder's output (768 for v0)."""
        return self.embed_dim * 2 ** (len(self.depths) - 1)

    @property
    def audio_tokens(self) -> int:
        """Positions one clip takes in the sequence: the clip latent + pooled frames (129)."""
        return 1 + self.spec_size * self.freq_ratio // self.pool

    @property
    def prefix_len(self) -> int:
        """clip 1, separator, clip 2, separator, prompt (389 for v0)."""
        return 2 * self.audio_tokens + 2 + self.prompt_tokens

    # What each preset changes: v0_s is v0's architecture; tiny has the same layout and tokenizer at
    # toy widths and builds in well under a second, for tests.
    PRESETS: ClassVar[dict[str, dict]] = {
        "v0": {},
        "v0_s": {},
        "tiny": dict(embed_dim=8, depths=(2, 2, 2, 2), num_heads=(1, 2, 2, 4), num_classes=16, hidden_size=64,
                     intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2),
    }

    @classmethod
    def v0(cls) -> "MellowConfig":
        return cls.preset("v0")

    @classmethod
    def tiny(cls) -> "MellowConfig":
        return cls.preset("tiny")
