"""TinyMU's published checkpoint layout: reading `tinymu.pt` into our key names, and writing ours
back in that layout.

The authors save `{"model": state_dict, "optimizer": ..., "config": ..., "epoch": ...}` and load
only `["model"]`, strictly (xiquan-li/TinyMU, src/train_accelerate.py `main`,
`get_model_and_tokenizer`). Its 430 keys are our network's 429 plus `text_decoder.embed_fn.weight`,
a second name the authors register for the token embedding; with the tied head that is three keys
for one tensor. Their strict load copies the keys in order into that one shared table, so the
last of them, `embed_fn`, is the value in use if a file ever held three different ones.

The same Hugging Face repo holds `matpac_plus_as_48_1_map_enconly.pt`, the MATPAC++ encoder
alone, which the authors' code needs only to build the model before `tinymu.pt` overwrites it.
Given in its place, it is named in the error. Reading the file (safely, `weights_only=True`) is
the caller's; these functions see what `torch.load` returned.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch

from mellow_cli.errors import ModelError
from mellow_cli.models.weights import normalize_state_dict
from mellow_cli.models.tinymu.config import TinyMUConfig

LM = "text_decoder.lm."
ENCODER = "audio_encoder.enc."
ALIAS = "text_decoder.embed_fn.weight"
EMBED = LM + "model.embed_tokens.weight"
HEAD = LM + "lm_head.weight"
WHOLE_FILE = "tinymu.pt"
ENCODER_FILE = "matpac_plus_as_48_1_map_enconly.pt"
WHOLE = "a TinyMU checkpoint"
ENCODER_ALONE = f"the MATPAC++ encoder alone ({ENCODER_FILE}), not the whole TinyMU model ({WHOLE_FILE})"


def sniff(obj) -> str | None:
    """What this is, if it is one of TinyMU's published files (wrapped or a bare state dict):
    "a TinyMU checkpoint", or the MATPAC++-only file; None for anything else."""
    keys = _keys(_state_of(obj))
    if any(k.startswith(LM) for k in keys) and any(k.startswith(ENCODER) for k in keys):
        return WHOLE
    if _encoder_alone(keys):
        return ENCODER_ALONE
    return None


def read_published(obj, source: str | None = None) -> dict[str, torch.Tensor]:
    """What `torch.load(tinymu.pt, weights_only=True)` returned (or its "model" state dict alone)
    -> the state dict in our network's key names. Anything else is a ModelError of one line
    saying what it is, prefixed by `source` (the file's name) when given."""
    what = sniff(obj)
    if what != WHOLE:
        raise _error(source, what or _foreign(obj))
    state = _state_of(obj)
    damaged = [k for k, v in state.items() if not (isinstance(k, str) and isinstance(v, torch.Tensor))]
    if damaged:
        raise _error(source, f"a damaged TinyMU checkpoint: {damaged[0]!r} does not hold a tensor")
    state = dict(state)
    if ALIAS in state:
        state[HEAD] = state.pop(ALIAS)  # the value in use: see the module's docstring
    return normalize_state_dict(state, prefix=LM)


def export(state: Mapping[str, torch.Tensor], cfg: TinyMUConfig) -> dict:
    """Our state dict -> the object the authors' code loads: {"model": the 430 keys in their
    order, float32, the embedding, head and `embed_fn` one tensor}. `torch.save` it as tinymu.pt."""
    from mellow_cli.models.weights import compare_layouts, layout_of
    from mellow_cli.models.tinymu.network import TinyMU

    state = normalize_state_dict(state, prefix=LM)
    expected = layout_of(TinyMU.from_config(cfg, "meta").state_dict(keep_vars=True))
    report = compare_layouts(layout_of(state), expected, same_dtype=lambda a, b: a.is_floating_point == b.is_floating_point)
    if not report.ok:
        raise ModelError(f"cannot export as TinyMU {cfg.name}: {report.describe()}")
    table = state[EMBED].float()
    model = {k: table if k in (EMBED, HEAD) else state[k].float() for k in expected}
    model[ALIAS] = table
    return {"model": model}


def _state_of(obj):
    """The state dict inside a published object: its "model" entry, or the object itself."""
    if isinstance(obj, Mapping) and isinstance(obj.get("model"), Mapping):
        return obj["model"]
    return obj


def _keys(state) -> list[str]:
    """The state dict's names, without the `module.` a DataParallel wrapper adds."""
    return [k.removeprefix("module.") for k in state if isinstance(k, str)] if isinstance(state, Mapping) else []


def _encoder_alone(keys: list[str]) -> bool:
    return any("student_encoder.blocks." in k for k in keys) and not any("text_decoder." in k for k in keys)


def _foreign(obj) -> str:
    """A few words on what a file that is not TinyMU's holds."""
    keys = _keys(_state_of(obj))
    if not isinstance(obj, Mapping):
        return f"not a TinyMU checkpoint: it holds a {type(obj).__name__}, not a dict of tensors"
    inner = obj.get("state_dict") if isinstance(obj.get("state_dict"), Mapping) else obj
    if any(str(k).startswith("audio_lm.") for k in inner):
        return "a Samsone checkpoint, not TinyMU"
    if any(k.startswith("caption_decoder.lm.") for k in keys):
        return "a Mellow checkpoint, not TinyMU"
    has_lm, has_encoder = (any(k.startswith(prefix) for k in keys) for prefix in (LM, ENCODER))
    if has_lm or has_encoder:
        return f"an incomplete TinyMU checkpoint: no {'audio encoder' if has_lm else 'language model'} keys"
    top = ", ".join(repr(k) for k in list(obj)[:4]) or "nothing"
    return f"not a TinyMU checkpoint ({WHOLE_FILE} holds {{'model': state dict}}; this holds {top})"


def _error(source: str | None, message: str) -> ModelError:
    return ModelError(f"{source}: {message}" if source else message)
