"""Samsone's published checkpoint layout (`samsone_{99m,134m,356m}_model_bf16.ckpt`, GitHub
release v1.0.0 of SamsungLabs/samsone): what `torch.load(path, weights_only=True)` gives is
`{"state_dict": {"audio_lm.<key>": tensor}}`, every key under the Lightning module's `audio_lm.`
(the authors refuse any other key), loaded strictly. One pruned embedding is stored under three
names: the token table, the tied output head and `text_model.embedding_layer` (the same module
registered twice); the authors copy them in that order into one Parameter, so the last wins.
Tensors keep the dtype they are stored in (bfloat16 by the file names; the golden file float16).
"""

from __future__ import annotations

from collections.abc import Mapping

from mellow_cli.errors import ModelError

PREFIX = "audio_lm."
EMBED = "text_model.model.model.embed_tokens.weight"
HEAD = "text_model.model.lm_head.weight"
ALIAS = "text_model.embedding_layer.weight"  # not a module of ours: the table under a third name
TIED = (EMBED, HEAD, ALIAS)  # the order the authors' strict load copies them in


def sniff(obj) -> str | None:
    """"a Samsone checkpoint" when `obj` has the published layout, else None (cheap: keys only)."""
    sd = obj.get("state_dict") if isinstance(obj, dict) else None
    if isinstance(sd, dict) and sd and all(isinstance(k, str) and k.startswith(PREFIX) for k in sd):
        return "a Samsone checkpoint"
    return None


def read_published(obj) -> dict:
    """The loaded published file -> the network's state dict (the three tied names become the
    embedding and head, holding the value the authors' load ends with). ModelError otherwise,
    saying what the file is."""
    import torch

    if sniff(obj) is None:
        raise ModelError(f"not a Samsone checkpoint: {describe(obj)}")
    sd = obj["state_dict"]
    bad = [k for k, v in sd.items() if not isinstance(v, torch.Tensor)]
    if bad:
        raise ModelError(f"a damaged Samsone checkpoint: {bad[0]!r} holds a {type(sd[bad[0]]).__name__}, not a tensor")
    state = {k[len(PREFIX):]: v for k, v in sd.items()}
    missing = [PREFIX + k for k in TIED if k not in state]
    if missing:
        raise ModelError(f"a damaged Samsone checkpoint: no {', '.join(missing)}")
    table = state.pop(ALIAS)
    state[EMBED] = state[HEAD] = table
    return state


def export(state: Mapping, cfg) -> dict:
    """The network's state dict -> the object the authors' code loads: every key of a
    `cfg`-sized network in its order, `audio_lm.`-prefixed, the table under all three names, each
    tensor in its own dtype (one tensor, stored once by torch.save)."""
    from mellow_cli.models.samsone.network import Samsone

    order = list(Samsone.from_config(cfg, "meta").state_dict())
    state = dict(state)
    state.setdefault(HEAD, state.get(EMBED))  # a table saved once (our cache) stands for the head too
    unknown, missing = sorted(set(state) - set(order)), [k for k in order if state.get(k) is None]
    if unknown or missing:
        raise ModelError(f"cannot export as Samsone {cfg.name}: "
                         + "; ".join(f"{len(keys)} {what}: {', '.join(keys[:3])}"
                                     for what, keys in (("missing", missing), ("unexpected", unknown)) if keys))
    table = state[EMBED]
    out = {PREFIX + k: (table if k in TIED else state[k]) for k in order}
    out[PREFIX + ALIAS] = table
    return {"state_dict": out}


def describe(obj) -> str:
    """One phrase for what a loaded checkpoint object is, from its structure alone."""
    if not isinstance(obj, dict):
        return f"a {type(obj).__name__}, not a dictionary of tensors"
    keys = [k for k in obj if isinstance(k, str)]
    if "state_dict" in obj:
        inner = obj["state_dict"]
        if not isinstance(inner, dict) or not inner:
            return "its 'state_dict' is empty or not a dictionary"
        stray = next((k for k in inner if not (isinstance(k, str) and k.startswith(PREFIX))), None)
        return f"its 'state_dict' key {stray!r} is not under {PREFIX!r} (a Lightning checkpoint of another model?)"
    if "model" in obj and isinstance(obj["model"], dict):
        return "a {'model': state_dict} checkpoint (TinyMU's layout), not Samsone's {'state_dict': ...}"
    if any(k.removeprefix("module.").startswith(("caption_decoder.", "audio_encoder.base.")) for k in keys):
        return "a Mellow checkpoint (a plain state dict), not Samsone's {'state_dict': ...}"
    if not keys:
        return "an empty dictionary"
    return f"a dictionary with keys {', '.join(map(repr, keys[:3]))}{', ...' if len(keys) > 3 else ''}, not Samsone's {{'state_dict': ...}}"
