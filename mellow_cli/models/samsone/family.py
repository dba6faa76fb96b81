"""Samsone behind the family interface: one or more clips at 16 kHz (their channels' mean, their
first 30 s, padded to 30 s), Whisper-tiny's encoder, 50 pooled tokens per clip, the projector,
`sep · clip · sep · clip · sep · prompt answer: ` in a pruned 34,111-token vocabulary, and the
published `samsone_*_model_bf16.ckpt` (`{"state_dict": {"audio_lm.<key>": ...}}`).
"""

from __future__ import annotations

import re
from typing import TYPE_CHECKING, Any

from mellow_cli.errors import ModelError, UsageError
from mellow_cli.models.family import Family

if TYPE_CHECKING:
    import numpy as np
    from torch import nn

    from mellow_cli.models.samsone.config import SamsoneConfig

_LAYER = re.compile(r"text_model\.model\.model\.layers\.(\d+)\.")


class SamsoneFamily(Family):
    name = "samsone"
    title = "Samsone"
    most_clips = None  # any number, heard in the order given
    default_preset = "samsone-134m"
    caption_prompt = "describe the audio."  # as written after normalisation; a question works too
    compare_prompt = "what is the difference between the two audios?"

    def config(self, preset: str) -> "SamsoneConfig":
        from mellow_cli.models.samsone.config import SamsoneConfig

        return SamsoneConfig.preset(preset)

    def config_from_dict(self, data: dict) -> "SamsoneConfig":
        from mellow_cli.models.samsone.config import SamsoneConfig

        return SamsoneConfig.from_dict(data)

    def config_for(self, obj: Any) -> "SamsoneConfig":
        """The published size a checkpoint holds, told by its tensors: SmolLM2-360M's width, or
        135M's with 20 layers (99M) or all 30 (134M)."""
        state = obj.get("state_dict", {}) if isinstance(obj, dict) else {}
        sep = state.get("audio_lm.sep_token")
        layers = {int(m.group(1)) for k in state if (m := _LAYER.match(k.removeprefix("audio_lm.")))}
        if sep is not None and sep.shape[-1] == 960:
            return self.config("samsone-356m")
        return self.config("samsone-99m" if layers and max(layers) + 1 == 20 else "samsone-134m")

    def build(self, cfg: "SamsoneConfig", device="cpu") -> "nn.Module":
        from mellow_cli.models.samsone.network import Samsone

        return Samsone.from_config(cfg, device)

    def fill(self, net: "nn.Module", state: dict) -> "nn.Module":
        from mellow_cli.models.samsone.network import load_weights

        return load_weights(net, state)

    def owns(self, obj: Any) -> bool:
        from mellow_cli.models.samsone.checkpoint import sniff

        return sniff(obj) is not None

    def published_state(self, obj: Any, label: str) -> dict:
        from mellow_cli.models.samsone.checkpoint import read_published

        try:
            return read_published(obj)
        except ModelError as e:
            raise ModelError(f"{label}: {e}") from None

    def export(self, net: "nn.Module", label: str, wrap: str | None = None) -> dict:
        from mellow_cli.models.samsone.checkpoint import export

        if wrap is not None:
            raise UsageError(f"{label}: --wrap applies to Mellow checkpoints; Samsone's layout is its own")
        if not net.cfg.name.startswith("samsone-"):
            raise ModelError(f"{label}: a Samsone {net.cfg.name} model cannot be exported to the published layout, "
                             "which holds the published sizes only")
        return export(net.state_dict(), net.cfg)

    def tokenizer(self, folder, cfg: "SamsoneConfig"):
        from mellow_cli.models.samsone.vocabulary import ModelTokenizer
        from mellow_cli.runtime.tokenizer import Tokenizer

        return ModelTokenizer(Tokenizer(folder))

    def prompt_ids(self, tokenizer, text: str, cfg: "SamsoneConfig") -> list[int]:
        from mellow_cli.models.samsone.prompt import prompt_ids

        return prompt_ids(tokenizer, text)

    def clip(self, wave: "np.ndarray", cfg: "SamsoneConfig") -> "np.ndarray":
        from mellow_cli.models.samsone.clip import fit_clip

        return fit_clip(wave[None], cfg)

    def parts(self) -> dict[str, str]:
        return {"encoder": "audio_encoder.encoder.encoder", "decoder": "text_model.model"}

    def fixed(self) -> tuple[str, ...]:
        # Whisper's fixed sinusoids (requires_grad=False in Whisper itself)
        return ("audio_encoder.encoder.encoder.embed_positions.weight",)
