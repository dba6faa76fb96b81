"""The seam where a model family plugs in: what every layer above asks of a family, and the one
prefix row it hands the runtime.

A family (Mellow, TinyMU, Samsone) is an audio encoder, a projector into a SmolLM2's width and a
way of laying clips and a prompt before the language model; its folder under models/ owns all of
that, and nothing outside it names an encoder, a sample rate or a checkpoint key. The layers above
(the API, the store, training, the benchmarks, the server) only call the methods of `Family`, and
the runtime only sees `PrefixRow`s: embeddings it caches, and where the answer's positions start.
llama.cpp keeps its audio encoders behind one interface the same way (tools/mtmd/models/).
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any, Sequence

from mellow_cli.runtime.prefix import PrefixRow  # noqa: F401  (what a family hands the runtime)

if TYPE_CHECKING:
    from pathlib import Path

    import numpy as np
    import torch
    from torch import nn


class Family:
    """What a model family provides. Each folder under models/ has one instance, `FAMILY`, in
    its `__init__.py`; `family(name)` finds it. A method a family cannot offer raises ModelError."""

    name: str = ""  # as config.json's "family" names it
    title: str = ""  # as messages name it
    most_clips: int | None = 2  # clips one question can take; None: any number
    caption_prompt: str = ""  # what `mellow caption` asks by default
    compare_prompt: str = ""  # and `mellow compare` (a family of one clip a question has none)

    # --- configuration ---------------------------------------------------------------------------

    def config(self, preset: str) -> Any:
        """A named preset of this family's config dataclass (KeyError if unknown)."""
        raise NotImplementedError

    def config_from_dict(self, data: dict) -> Any:
        raise NotImplementedError

    default_preset = ""  # the published model a checkpoint without a config of ours is taken for

    def config_for(self, obj: Any) -> Any:
        """The config of a published checkpoint read without one of ours beside it (a family with
        several published sizes tells them apart by the tensors' shapes)."""
        return self.config(self.default_preset)

    def is_config(self, data: dict) -> bool:
        """Whether a config.json's contents are this family's."""
        return data.get("family", "mellow") == self.name

    # --- the network -----------------------------------------------------------------------------

    def build(self, cfg: Any, device: "str | torch.device" = "cpu") -> "nn.Module":
        """The network of `cfg`: random weights on a real device, no storage at all on "meta"
        (then `fill`). It has `.cfg`, `.lm` (the LlamaForCausalLM) and the methods below use it."""
        raise NotImplementedError

    def fill(self, net: "nn.Module", state: dict) -> "nn.Module":
        """Adopt `state` (our key names; tied tensors once) strictly, without copying; re-tie,
        rebuild what a checkpoint does not hold. ModelError naming keys if anything differs."""
        raise NotImplementedError

    # --- checkpoints in the authors' layout ------------------------------------------------------

    def published_state(self, obj: Any, label: str) -> dict:
        """What `torch.load(weights_only=True)` read from the authors' file -> our state dict;
        ModelError in one line for anything else (naming what it is, where that can be told)."""
        raise NotImplementedError

    def owns(self, obj: Any) -> bool:
        """Whether a loaded checkpoint is in this family's published layout (cheap, by keys)."""
        raise NotImplementedError

    def export(self, net: "nn.Module", label: str, wrap: str | None = None) -> Any:
        """A loaded network -> exactly the object its authors' code loads (`wrap` "state_dict":
        under that key, as training code saves one, where the family's layout allows it)."""
        raise NotImplementedError

    # --- text ------------------------------------------------------------------------------------

    def tokenizer(self, folder: "Path", cfg: Any):
        """The tokenizer in the language model's ids (runtime.tokenizer.Tokenizer's interface)."""
        from mellow_cli.runtime.tokenizer import Tokenizer

        return Tokenizer(folder)

    def prompt_ids(self, tokenizer, text: str, cfg: Any) -> list[int]:
        raise NotImplementedError

    def choice_text(self, text: str) -> str:
        """An answer choice as the model would write it (Samsone lower-cases its answers)."""
        return text

    # --- audio -----------------------------------------------------------------------------------

    def sample_rate(self, cfg: Any) -> int:
        return cfg.sample_rate

    def clip_seconds(self, cfg: Any) -> float:
        """How much audio one clip holds: longer recordings are heard in windows this long."""
        return cfg.clip_seconds

    # (samples, channels) -> (samples,): how this family made its training audio mono; None:
    # the average of the channels (io/audio.py's to_mono).
    mono = None

    def clip(self, wave: "np.ndarray", cfg: Any) -> "np.ndarray":
        """A mono waveform at the family's rate -> exactly what the encoder takes for one clip."""
        raise NotImplementedError

    def encode(self, net: "nn.Module", clips: Sequence["torch.Tensor"]) -> list["torch.Tensor"]:
        """Each clip's audio tokens (n, hidden), already in the language model's width. A clip's
        tokens never depend on the other clips in the call. Default: the network's own."""
        return net.encode_clips(list(clips))

    def prefix_row(self, net: "nn.Module", clips: Sequence["torch.Tensor"], prompt_ids: list[int]) -> PrefixRow:
        """One question: its clips' tokens (1 to `most_clips` of them) and its prompt. Default:
        the network lays it out."""
        return net.prefix_row(list(clips), prompt_ids)

    # --- running ---------------------------------------------------------------------------------

    def prepare(self, net: "nn.Module", device: "torch.device", precision, release=None) -> None:
        """Whatever the family runs in another precision than float32 besides the language model
        (which the runtime prepares): its projector on a GPU, say. Default: nothing."""

    def audio_module(self, net: "nn.Module") -> "nn.Module":
        """The module that turns clips into tokens (timed by -v as "encode")."""
        return net.audio_encoder

    # --- training --------------------------------------------------------------------------------

    def parts(self) -> dict[str, str]:
        """What `--freeze` can name ("encoder", "decoder") -> the module path it freezes."""
        raise NotImplementedError

    def unused(self) -> tuple[str, ...]:
        """Modules in the checkpoint that the forward pass never uses (never trained)."""
        return ()

    def fixed(self) -> tuple[str, ...]:
        """Parameters the network holds fixed whatever `--freeze` says (position tables its
        authors never train)."""
        return ()

    def training_rows(self, net: "nn.Module", clips: Sequence[Sequence["torch.Tensor"]],
                      prompt_ids: Sequence[list[int]]) -> list[PrefixRow]:
        """A training batch, with gradients: each question's clips (1 to `most_clips` waveforms,
        as `clip` gives them) and prompt ids -> its row, exactly as `prefix_row` lays it out for
        an answer. Default: every clip encoded on its own (`encode`), then `prefix_row`."""
        encoded = iter(self.encode(net, [c for row in clips for c in row]))
        return [self.prefix_row(net, [next(encoded) for _ in row], ids) for row, ids in zip(clips, prompt_ids)]

    def frozen_encoder(self, net: "nn.Module") -> "nn.Module":
        """The encoder modules that stay in eval mode while the rest trains (unless the recipe
        trains the encoder as its authors did). Default: the whole audio module."""
        return self.audio_module(net)

    def calibrate(self, net: "nn.Module", clips: "torch.Tensor") -> None:
        """Fresh weights: fit the encoder to a sample of the training clips (n, samples), as a
        data-dependent init. Default: nothing."""

    pretrained_encoder = ""  # what --encoder-weights names for `pretrained`, for messages

    def pretrained(self, encoder_weights: dict, lm_weights, names: tuple[str, str], seed: int) -> "nn.Module":
        """The authors' training starting point (`--init pretrained`) from the encoder checkpoint's
        contents and `lm_weights()`, the language model's state dict (read once the encoder's
        passed its checks)."""
        from mellow_cli.errors import ModelError

        raise ModelError(f"{self.title} has no pretrained starting point to train from: fine-tune a published "
                         "model with --model instead")


_FAMILIES = {
    "mellow": "mellow_cli.models.mellow",
    "tinymu": "mellow_cli.models.tinymu",
    "samsone": "mellow_cli.models.samsone",
}


def family(name: str) -> Family:
    """The family called `name` (config.json's "family"); ModelError if there is none."""
    from mellow_cli.errors import ModelError

    if name not in _FAMILIES:
        raise ModelError(f"unknown model family {name!r}: this mellow-cli knows {', '.join(_FAMILIES)}")
    return importlib.import_module(_FAMILIES[name]).FAMILY


def families() -> list[Family]:
    return [family(name) for name in _FAMILIES]


def family_of(cfg: Any) -> Family:
    """The family a config belongs to (each config class names it)."""
    return family(cfg.family)


def config_dict(cfg: Any) -> dict:
    """A config as config.json holds it: its fields, and which family it is."""
    return {"family": cfg.family, **cfg.to_dict()}


def config_from_dict(data: dict) -> Any:
    """A config.json's contents -> that family's config (one without "family" is Mellow's, as
    every config.json was before there were others); ModelError for an unknown family."""
    return family(data.get("family", "mellow")).config_from_dict(data)


def read_config(path: "Path", *, strict: bool) -> Any:
    """A config.json of ours, of any family; with strict, anything else is a ModelError, without
    it None."""
    import json

    from mellow_cli.errors import ModelError
    from mellow_cli.files import first_line

    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        if not strict:
            return None
        raise ModelError(f"{path}: unreadable config ({first_line(e)}): fix or remove it") from None
    if not isinstance(data, dict) or not any(f.is_config(data) for f in families()):
        if not strict:
            return None
        raise ModelError(f"{path}: not a mellow config (none of the model families it knows wrote it): "
                         "write it with config_dict(cfg) (mellow_cli.models.family)")
    try:
        return config_from_dict(data)
    except (TypeError, ValueError) as e:
        raise ModelError(f"{path}: bad mellow config ({first_line(e)})") from None
