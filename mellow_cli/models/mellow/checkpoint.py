"""Mellow's published checkpoint layout: what `mellow models export` writes for a Mellow model.

The authors exchange plain `torch.save(model.state_dict())` files (mellow-training,
training/trainer.py `_save_model_state`): their evaluation loads one with
`load_state_dict(..., strict=True)`, and their `resume_checkpoint` reads
`torch.load(path)["state_dict"]` (loaded with strict=False), hence the optional wrapper. The
published v0.ckpt has the same layout: 479 keys, buffers included (STFT kernels, mel matrix, bn0
statistics, Swin `relative_position_index` and `attn_mask`), and `lm_head.weight` stored beside the
token embedding it is tied to (docs/models.md, tests/golden/mellow_v0_state_dict_manifest.json).

Their `Mellow` (models/mellow.py) is parameterised only by the language model's hub name and the
projection width: HTSAT is built from the module-level models/config.py (window 8, dims 96..768,
527 classes) and `c2l` is `Linear(527, 768)`. So only a model of the v0 architecture fits it;
`tiny` and other sizes are refused. Our network keeps the official module names and stores every
persistent buffer, so its state dict already is the official one: exporting checks that against
the v0 layout, gives each tensor the official dtype, and writes the file atomically.
"""

from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING

from mellow_cli.errors import ModelError
from mellow_cli.models.config import ModelConfig
from mellow_cli.models.mellow.config import MellowConfig

if TYPE_CHECKING:
    import torch
    from torch import nn

def official_layout() -> dict[str, tuple[tuple[int, ...], "torch.dtype"]]:
    """Every key of the official v0 state dict with its shape and dtype, read from our v0 network
    built on the meta device (no storage); the tests hold it to the golden manifest."""
    from mellow_cli.models.mellow.network import Mellow
    from mellow_cli.models.weights import layout_of

    return layout_of(Mellow.from_config(MellowConfig.v0(), device="meta").state_dict(keep_vars=True))


def check_exportable(cfg: MellowConfig, label: str) -> None:
    """The authors' class holds the v0 architecture only (see the module docstring)."""
    v0 = MellowConfig.v0()
    differ = [f.name for f in dataclasses.fields(cfg)
              if f.name != "name" and getattr(cfg, f.name) != getattr(v0, f.name)]
    shared = {f.name for f in dataclasses.fields(ModelConfig)}
    differ.sort(key=lambda name: name in shared)  # Mellow's own sizes first: they say the most
    if differ:
        more = f" (+{len(differ) - 4} more)" if len(differ) > 4 else ""
        raise ModelError(f"{label}: a Mellow {cfg.name} model cannot be exported to the official layout, which "
                         f"holds the v0 architecture only (it differs in {', '.join(differ[:4])}{more})")


def official_state(model: "nn.Module", label: str) -> dict[str, "torch.Tensor"]:
    """The model's state dict in the official layout: every key (the tied head included, sharing
    the embedding's storage as a tied model's `state_dict()` does), official dtypes."""
    from mellow_cli.models.weights import compare_layouts, layout_of

    layout = official_layout()
    state = model.state_dict()
    report = compare_layouts(layout_of(state), layout, same_dtype=lambda a, b: True)
    if not report.ok:
        raise ModelError(f"{label}: its network does not have the official layout ({report.describe(limit=3)})")
    cast: dict[int, "torch.Tensor"] = {}  # tied names keep sharing one tensor after a cast
    out = {}
    for key, (_, dtype) in layout.items():
        t = state[key]
        out[key] = t if t.dtype == dtype else cast.setdefault(id(t), t.to(dtype))
    return out


def exported(model: "nn.Module", label: str, wrap: str | None) -> dict:
    """What torch.save writes for `model`: the official state dict, bare (their evaluation) or
    under "state_dict" (their resume)."""
    check_exportable(model.cfg, label)
    state = official_state(model, label)
    return {"state_dict": state} if wrap == "state_dict" else state
