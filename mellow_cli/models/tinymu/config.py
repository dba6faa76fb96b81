"""TinyMU's dimensions, as a frozen dataclass saved beside the weights (config.json).

`tinymu` is the published model (Hugging Face `AndreasXi/TinyMU`; the authors' code
xiquan-li/TinyMU, src/config/train_tinymu.yaml, src/models/matpac/model.py `general_config`, and
the SmolLM2-135M base config its language model was fine-tuned from). `tiny` keeps the structure,
the front end and the tokenizer at toy widths, for tests.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from mellow_cli.models.config import ModelConfig


@dataclass(frozen=True)
class TinyMUConfig(ModelConfig):
    family: ClassVar[str] = "tinymu"
    default_max_tokens: ClassVar[int] = 300  # the authors' demo answer length (max_len)
    name: str = "tinymu"
    # --- audio in and the log-mel front end (torchaudio's MelSpectrogram as MATPAC++ sets it up)
    sample_rate: int = 16000  # Hz; every clip is resampled to this
    clip_seconds: int = 10  # a clip is its first 10 s, not padded; the window length
    n_fft: int = 400  # STFT size = periodic Hann window length (25 ms)
    hop_length: int = 160  # 10 ms, uncentred frames: 998 for 10 s
    n_mels: int = 80  # Slaney mel bands (Slaney-normalised) over fmin .. fmax
    fmin: float = 50.0
    fmax: float = 8000.0
    log_offset: float = 2.0**-23  # added before the natural log: float32's machine epsilon
    lms_mean: float = -7.056  # fixed normalisation of the log-mel (MATPAC++'s training statistics)
    lms_std: float = 4.193
    # --- MATPAC++ encoder: a ViT-B over 16 x 16 log-mel patches
    patch_size: int = 16
    chunk_frames: int = 992  # frames one encoder pass sees (62 patch columns); longer audio is chunked
    encoder_dim: int = 768
    encoder_depth: int = 12
    encoder_heads: int = 12
    encoder_mlp: int = 3072
    encoder_norm_eps: float = 1e-6
    # --- projector: one token per patch column, its frequency patches side by side
    projector_hidden: int = 2048
    # --- prompt and language model (SmolLM2-135M base, a Llama, fully fine-tuned)
    prompt_tokens: int = 129  # prompt positions: truncated to this; shorter prompts count as this long
    sep_token_id: int = 0  # `<|endoftext|>` between the audio and the prompt
    eos_token_id: int = 0  # `<|endoftext|>`: generation stops here
    pad_token_id: int = 17  # `!`: fills the prompt to prompt_tokens, masked from every later token

    # derived sizes, so no caller recomputes them
    @property
    def clip_samples(self) -> int:
        return self.sample_rate * self.clip_seconds

    @property
    def freq_patches(self) -> int:
        """Patch rows over the mel bands (5)."""
        return self.n_mels // self.patch_size

    @property
    def chunk_columns(self) -> int:
        """Patch columns in one full chunk (62)."""
        return self.chunk_frames // self.patch_size

    @property
    def audio_dim(self) -> int:
        """Width of one audio token before the projector: a column's patches side by side (3840)."""
        return self.freq_patches * self.encoder_dim

    def audio_tokens(self, samples: int) -> int:
        """Tokens a clip of `samples` samples gives: one per 16 frames (160 ms), the last partial."""
        frames = 1 + (max(samples, self.n_fft) - self.n_fft) // self.hop_length
        return -(-frames // self.patch_size)

    # What each preset changes: tiny keeps the front end, chunking, prompt and tokenizer at toy
    # widths and builds in well under a second, for tests.
    PRESETS: ClassVar[dict[str, dict]] = {
        "tinymu": {},
        "tiny": dict(encoder_dim=32, encoder_depth=2, encoder_heads=2, encoder_mlp=64, projector_hidden=48,
                     hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                     num_key_value_heads=2),
    }

    @classmethod
    def tinymu(cls) -> "TinyMUConfig":
        return cls.preset("tinymu")

    @classmethod
    def tiny(cls) -> "TinyMUConfig":
        return cls.preset("tiny")
