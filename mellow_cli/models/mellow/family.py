"""Mellow behind the family interface: two clips at 32 kHz, each tiled or cut to 10 s, HTSAT, the
mapper, `clip · sep · clip · sep · prompt` padded to 129 prompt tokens, the published plain state
dict (soham97/mellow `v0.ckpt`).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any, Sequence

from mellow_cli.errors import ModelError
from mellow_cli.models.family import Family, PrefixRow

if TYPE_CHECKING:
    import numpy as np
    import torch
    from torch import nn

    from mellow_cli.models.mellow.config import MellowConfig

# The language model's keys in a Mellow state dict (after an optional DataParallel `module.`);
# other families name theirs otherwise.
_LM_PREFIX = "caption_decoder."
# Fields only a MellowConfig has together: tells our config.json from a transformers one.
_CONFIG_FIELDS = {"embed_dim", "depths", "hidden_size", "vocab_size", "prompt_tokens"}


def fit_clip(wav: "np.ndarray", n_samples: int) -> "np.ndarray":
    """Exactly `n_samples`: a short clip is repeated end to end and cut, a long one cropped to its
    first `n_samples`. The tiling is the reference's `repeat(ceil(n_target / n))[:n_target]`."""
    import numpy as np

    wav = np.asarray(wav, dtype=np.float32)
    if wav.ndim != 1 or len(wav) == 0:
        raise ValueError(f"fit_clip needs a non-empty 1-D waveform, got shape {wav.shape}")
    if len(wav) < n_samples:
        wav = np.tile(wav, math.ceil(n_samples / len(wav)))
    return np.ascontiguousarray(wav[:n_samples])


class MellowFamily(Family):
    name = "mellow"
    title = "Mellow"
    most_clips = 2
    default_preset = "v0"
    caption_prompt = "caption the audio."  # the reference's captioning example
    compare_prompt = "explain the difference between the two audios in detail."  # ... and its difference one
    pretrained_encoder = "the AudioSet HTSAT checkpoint (HTSAT_AudioSet_Saved_1.ckpt, keys sed_model.*)"

    def config(self, preset: str) -> "MellowConfig":
        from mellow_cli.models.mellow.config import MellowConfig

        return MellowConfig.preset(preset)

    def config_from_dict(self, data: dict) -> "MellowConfig":
        from mellow_cli.models.mellow.config import MellowConfig

        return MellowConfig.from_dict(data)

    def is_config(self, data: dict) -> bool:
        return data.get("family", self.name) == self.name and _CONFIG_FIELDS <= set(data)

    def build(self, cfg: "MellowConfig", device="cpu") -> "nn.Module":
        from mellow_cli.models.mellow.network import Mellow

        return Mellow.from_config(cfg, device=device)

    def fill(self, net: "nn.Module", state: dict) -> "nn.Module":
        from mellow_cli.models.mellow.network import load_weights

        return load_weights(net, state)

    def owns(self, obj: Any) -> bool:
        state = _unwrapped(obj)
        return isinstance(state, Mapping) and any(
            isinstance(k, str) and k.removeprefix("module.").startswith(_LM_PREFIX) for k in state)

    def published_state(self, obj: Any, label: str) -> dict:
        """A plain state dict, bare or under "state_dict" (the authors' resume checkpoints), with
        or without DataParallel's `module.` prefix."""
        import torch

        state = _unwrapped(obj)
        if not isinstance(state, Mapping):
            raise ModelError(f"{label}: not a state dict (it holds a {type(state).__name__}): save "
                             "model.state_dict(), not the model")
        out = {}
        for key, value in state.items():
            if not isinstance(value, torch.Tensor):
                raise ModelError(f"{label}: not a plain state dict: {key!r} holds a {type(value).__name__}")
            out[key.removeprefix("module.")] = value
        return out

    def export(self, net: "nn.Module", label: str, wrap: str | None = None) -> dict:
        from mellow_cli.models.mellow.checkpoint import exported

        return exported(net, label, wrap)

    def prompt_ids(self, tokenizer, text: str, cfg: "MellowConfig") -> list[int]:
        from mellow_cli.models.mellow.network import tokenize_prompts

        return tokenize_prompts(tokenizer, [text], cfg)[0].tolist()

    def clip(self, wave: "np.ndarray", cfg: "MellowConfig") -> "np.ndarray":
        return fit_clip(wave, cfg.clip_samples)

    def encode(self, net: "nn.Module", clips: Sequence["torch.Tensor"]) -> list["torch.Tensor"]:
        import torch

        return list(net.encode_audio(torch.stack(list(clips))))

    def prefix_row(self, net: "nn.Module", clips: Sequence["torch.Tensor"], prompt_ids: list[int]) -> PrefixRow:
        """Mellow always hears two clips: one clip is heard beside itself."""
        import torch

        first, second = clips[0], clips[-1]
        ids = torch.tensor([prompt_ids], device=first.device)
        return PrefixRow(net.embed_prefix(first[None], second[None], ids)[0])

    def training_rows(self, net: "nn.Module", clips: Sequence[Sequence["torch.Tensor"]],
                      prompt_ids: Sequence[list[int]]) -> list[PrefixRow]:
        """Every row's clips through the encoder as one batch (`Mellow.prefix`; a one-clip row's
        clip once): under --encoder-mode train bn0 normalises with that batch's statistics, as
        the recipes were measured."""
        import torch

        first = torch.stack([row[0] for row in clips])
        second = first if all(row[-1] is row[0] for row in clips) else torch.stack([row[-1] for row in clips])
        ids = torch.tensor(list(prompt_ids), device=first.device)
        return [PrefixRow(embeds) for embeds in net.prefix(first, second, ids)]

    def prepare(self, net: "nn.Module", device: "torch.device", precision, release=None) -> None:
        """On a GPU a half precision covers the mapper as well as the language model; on a CPU a
        bfloat16 prefill covers HTSAT's linears (htsat.pack_linears); the front end stays float32."""
        from mellow_cli.models.mellow.htsat import pack_linears
        from mellow_cli.runtime.matrices import DTYPES

        if device.type != "cpu" and precision.name != "float32":
            net.audio_encoder.projection.to(DTYPES[precision.name])
            net.caption_decoder.to(DTYPES[precision.name])
        if device.type == "cpu":
            pack_linears(net.audio_encoder.base.htsat, precision, release)

    def parts(self) -> dict[str, str]:
        from mellow_cli.models.mellow.training import PARTS

        return PARTS

    def unused(self) -> tuple[str, ...]:
        from mellow_cli.models.mellow.training import UNUSED

        return UNUSED

    def frozen_encoder(self, net: "nn.Module") -> "nn.Module":
        from mellow_cli.models.mellow.training import encoder

        return encoder(net)

    def calibrate(self, net: "nn.Module", clips: "torch.Tensor") -> None:
        from mellow_cli.models.mellow.training import calibrate

        calibrate(net, clips)

    def pretrained(self, encoder_weights: dict, lm_weights, names: tuple[str, str], seed: int) -> "nn.Module":
        from mellow_cli.models.mellow.training import pretrained
        from mellow_cli.models.weights import fresh_weights

        return pretrained(encoder_weights, lm_weights, names, lambda cfg: fresh_weights(self, cfg, seed))


def _unwrapped(obj: Any) -> Any:
    """A training checkpoint's state dict: the object itself, or what it holds under one of the
    keys training code wraps one in."""
    import torch

    if isinstance(obj, Mapping) and not any(isinstance(v, torch.Tensor) for v in obj.values()):
        for key in ("state_dict", "model", "module"):
            if isinstance(obj.get(key), Mapping):
                return obj[key]
    return obj
