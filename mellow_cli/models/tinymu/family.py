"""TinyMU behind the family interface: one clip at 16 kHz (its first channel, its first 10 s),
MATPAC++, the projector, `audio · sep · prompt` with the prompt's `!` padding as the rotary
positions it takes, and the published `tinymu.pt` (`{"model": state_dict}`).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from mellow_cli.errors import ModelError, UsageError
from mellow_cli.models.family import Family

if TYPE_CHECKING:
    import numpy as np
    from torch import nn

    from mellow_cli.models.tinymu.config import TinyMUConfig


def first_channel(frames: "np.ndarray") -> "np.ndarray":
    """The authors' loader reads `waveform[0]`: the first channel, not a downmix."""
    return frames[:, 0]


class TinyMUFamily(Family):
    name = "tinymu"
    title = "TinyMU"
    most_clips = 1
    default_preset = "tinymu"
    caption_prompt = "Describe the music you hear."
    mono = staticmethod(first_channel)

    def config(self, preset: str) -> "TinyMUConfig":
        from mellow_cli.models.tinymu.config import TinyMUConfig

        return TinyMUConfig.preset(preset)

    def config_from_dict(self, data: dict) -> "TinyMUConfig":
        from mellow_cli.models.tinymu.config import TinyMUConfig

        return TinyMUConfig.from_dict(data)

    def build(self, cfg: "TinyMUConfig", device="cpu") -> "nn.Module":
        from mellow_cli.models.tinymu.network import TinyMU

        return TinyMU.from_config(cfg, device)

    def fill(self, net: "nn.Module", state: dict) -> "nn.Module":
        from mellow_cli.models.tinymu.network import load_weights

        return load_weights(net, state)

    def owns(self, obj: Any) -> bool:
        from mellow_cli.models.tinymu.checkpoint import sniff

        return sniff(obj) is not None

    def published_state(self, obj: Any, label: str) -> dict:
        from mellow_cli.models.tinymu.checkpoint import read_published

        return read_published(obj, source=label)

    def export(self, net: "nn.Module", label: str, wrap: str | None = None) -> dict:
        from mellow_cli.models.tinymu.checkpoint import export

        if wrap is not None:
            raise UsageError(f"{label}: --wrap applies to Mellow checkpoints; TinyMU's layout is its own")
        if net.cfg.name != self.default_preset:
            raise ModelError(f"{label}: a TinyMU {net.cfg.name} model cannot be exported to the published layout, "
                             "which holds the tinymu architecture only")
        return export(net.state_dict(), net.cfg)

    def tokenizer(self, folder, cfg: "TinyMUConfig"):
        from mellow_cli.models.tinymu.prompt import BangTokenizer
        from mellow_cli.runtime.tokenizer import Tokenizer

        return BangTokenizer(Tokenizer(folder))

    def prompt_ids(self, tokenizer, text: str, cfg: "TinyMUConfig") -> list[int]:
        return tokenizer.encode(text)[: cfg.prompt_tokens]

    def clip(self, wave: "np.ndarray", cfg: "TinyMUConfig") -> "np.ndarray":
        from mellow_cli.models.tinymu.clip import fit_clip

        return fit_clip(wave, cfg).numpy()

    def parts(self) -> dict[str, str]:
        return {"encoder": "audio_encoder.enc", "decoder": "text_decoder.lm"}

    def fixed(self) -> tuple[str, ...]:
        # MATPAC's position table, a frozen Parameter in the authors' model
        return ("audio_encoder.enc.pos_embed",)
