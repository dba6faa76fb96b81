"""What every family's config is besides its own sizes: the SmolLM2 it holds (runtime/llama.py's
LMConfig fields), the tokenizer that model was trained with, and how a config is named by preset
and kept in config.json (models/family.py's config_dict adds which family it is).

A family's config is a frozen dataclass deriving from `ModelConfig`, with its own fields, each
with a comment, and `PRESETS`: for each preset name, the fields that differ from the defaults
(which are the published model's). nanoGPT and whisper keep a model's dimensions the same way.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import ClassVar

from mellow_cli.runtime.llama import LMConfig


@dataclass(frozen=True)
class ModelConfig(LMConfig):
    family: ClassVar[str] = ""  # models/family.py: whose network this config builds
    default_max_tokens: ClassVar[int] = 300  # an answer's budget when none is asked (its authors')
    PRESETS: ClassVar[dict[str, dict]] = {}  # preset name -> the fields that differ from the defaults

    tokenizer: str = "HuggingFaceTB/SmolLM2-135M"  # hub repo of the tokenizer (base, not Instruct)

    @classmethod
    def preset(cls, name: str):
        if name not in cls.PRESETS:
            raise KeyError(f"unknown {cls.__name__.removesuffix('Config')} preset {name!r}; known: {', '.join(cls.PRESETS)}")
        return cls(**{"name": name, **cls.PRESETS[name]})

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict):
        """From config.json's contents: unknown keys (another release's) are left out, and lists
        become the tuples the fields hold."""
        known = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: (tuple(v) if isinstance(v, list) else v) for k, v in d.items() if k in known})
