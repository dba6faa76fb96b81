"""Samsone's dimensions, as a frozen dataclass saved beside the weights (config.json).

Presets follow the authors' model specs (SamsungLabs/samsone, `inference/models.py`
`Samsone99M/134M/356M`, configs/Samsone*.yaml): the Whisper-tiny encoder (openai/whisper-tiny's
config), 50 pooled tokens a clip, and the base SmolLM2 the language model was loaded from
(HuggingFaceTB/SmolLM2-135M, cut to its first 20 layers for 99M; HuggingFaceTB/SmolLM2-360M),
with the vocabulary pruned to 34,111 tokens. `tiny` keeps the structure, the front end and the
vocabulary at toy widths, for tests.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from mellow_cli.models.config import ModelConfig


@dataclass(frozen=True)
class SamsoneConfig(ModelConfig):
    family: ClassVar[str] = "samsone"
    default_max_tokens: ClassVar[int] = 100  # the authors' max_new_tokens
    name: str = "samsone-134m"
    # --- audio in: Whisper's feature extractor (openai/whisper-tiny's preprocessor config)
    sample_rate: int = 16000  # Hz; every clip is resampled to this
    clip_seconds: int = 30  # a clip is its first 30 s, zero-padded to 30 s; the window length
    n_fft: int = 400  # STFT size = periodic Hann window length
    hop_length: int = 160  # 10 ms -> 3000 frames per clip
    n_mels: int = 80  # Slaney mel bands over 0 .. sample_rate / 2
    log_mel_range: float = 8.0  # log10 units kept below the clip's loudest bin (80 dB)
    # --- Whisper-tiny encoder
    audio_dim: int = 384
    audio_layers: int = 4
    audio_heads: int = 6
    audio_ffn: int = 1536
    # --- pooling: the encoder's frames averaged in equal groups to this many tokens a clip
    audio_tokens: int = 50
    # --- language model (SmolLM2 base, a Llama), vocabulary pruned
    vocab_size: int = 34111
    eos_token_id: int = 0  # model id of `<|endoftext|>` (pruned id 0 = tokenizer id 0): generation stops here

    # derived sizes, so no caller recomputes them
    @property
    def clip_samples(self) -> int:
        return self.sample_rate * self.clip_seconds

    @property
    def audio_frames(self) -> int:
        """Log-mel frames of one clip (3000): the centred STFT's last frame is dropped."""
        return self.clip_samples // self.hop_length

    @property
    def audio_positions(self) -> int:
        """Encoder outputs of one clip (1500): the second convolution has stride 2."""
        return self.audio_frames // 2

    # What each preset changes (the defaults are samsone-134m's).
    PRESETS: ClassVar[dict[str, dict]] = {
        "samsone-99m": dict(num_hidden_layers=20),
        "samsone-134m": {},
        # SmolLM2-360M's config.json (rope_theta 100000, like the 135M's): what the authors' Python
        # inference builds the model from; only their on-device export config says 10000
        "samsone-356m": dict(hidden_size=960, intermediate_size=2560, num_hidden_layers=32,
                             num_attention_heads=15, num_key_value_heads=5,
                             tokenizer="HuggingFaceTB/SmolLM2-360M"),
        "tiny": dict(audio_dim=16, audio_layers=2, audio_heads=2, audio_ffn=32, hidden_size=64,
                     intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                     num_key_value_heads=2),
    }
