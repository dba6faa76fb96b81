"""What training needs to know of Mellow: which modules `--freeze` names, the encoder's modules
that train in eval mode, fitting a fresh encoder to the training audio, and the authors'
starting point (`--init pretrained`): HTSAT from its AudioSet checkpoint and a SmolLM2.

The pretrained start follows the official training release (soham97/mellow, branch `training`,
models/mellow.py `AudioEncoder` and models/decoder.py): HTSAT from `HTSAT_AudioSet_Saved_1.ckpt`,
a Lightning checkpoint whose `state_dict` keys carry the `sed_model.` prefix, loaded strictly; the
SmolLM2-135M base language model; a fresh c2l and projection (the projection's two matrices
Xavier-uniform, as their `Projection.init_weight`). The encoder's sizes are read from the
checkpoint; the language model's are SmolLM2-135M's (v0).
"""

from __future__ import annotations

import dataclasses
import math
import re

import torch
from torch import nn

from mellow_cli.errors import ModelError
from mellow_cli.models.mellow.config import MellowConfig

PARTS = {  # --freeze part -> the module it freezes
    "encoder": "audio_encoder.base.htsat",  # HTSAT; c2l and the projection (the mapper) still train
    "decoder": "caption_decoder.lm",  # SmolLM2, its token embeddings (separator, prompt) included
}
UNUSED = ("audio_encoder.base.htsat.head",)  # in the checkpoint, never in the forward pass
HTSAT_PREFIX = "sed_model."  # the AudioSet checkpoint's key prefix (the reference strips key[10:])


def encoder(net) -> nn.Module:
    """HTSAT and c2l: in eval mode while the rest trains, unless the recipe trains them as the
    authors' model does (bn0 then normalises with each batch's statistics)."""
    return net.audio_encoder.base


def calibrate(net, wav: torch.Tensor) -> None:
    """Fresh weights: fit two of the encoder's affine maps to the training audio `wav` (n, samples),
    as a data-dependent init.

    bn0 gets each mel band's mean and variance of the log-mel. HTSAT trains with bn0 in eval mode,
    and a fresh bn0's statistics (0, 1) would hand it raw decibels, mostly the -100 dB floor.

    c2l (classes -> frame embedding) is rescaled so that each output channel has mean 0 and
    variance 1 over the clips' frames. A random c2l adds a large constant to every frame (the
    sigmoid class scores sit near 0.5), which the mapper's LayerNorm keeps, so clips differ by
    only ~6% of the frame vectors and the language model long ignores the audio; centred, the
    differences between clips are what it sees."""
    base = net.audio_encoder.base
    htsat = base.htsat
    with torch.no_grad():
        mel = htsat.log_mel(wav)  # (n, 1, frames, bands)
        per_band = mel.transpose(0, 3).reshape(mel.shape[3], -1)
        htsat.bn0.running_mean.copy_(per_band.mean(dim=1))
        htsat.bn0.running_var.copy_(per_band.var(dim=1))
        frames = base.c2l(htsat(wav)[1]).flatten(0, 1)  # (n * time tokens, audio_dim)
        mean, std = frames.mean(dim=0), frames.std(dim=0).clamp_min(1e-6)
        base.c2l.weight.div_(std[:, None])
        base.c2l.bias.sub_(mean).div_(std)


def pretrained(encoder_weights: dict, lm_weights, names: tuple[str, str], fresh) -> nn.Module:
    """The authors' starting point from the AudioSet HTSAT checkpoint's contents and a SmolLM2's
    state dict, `lm_weights()` (`names`: where each came from, for messages); `fresh(cfg)` builds
    random weights."""
    from mellow_cli.models.weights import key_report, load_lm

    encoder_name, lm_name = names
    htsat = htsat_state(encoder_weights, encoder_name)
    cfg = dataclasses.replace(htsat_config(htsat, encoder_name), name="pretrained")
    net = fresh(cfg)
    report = key_report(net.audio_encoder.base.htsat, htsat)
    if not report.ok:
        raise ModelError(f"{encoder_name}: does not fit HTSAT: {report.describe()}")
    with torch.no_grad():
        net.audio_encoder.base.htsat.load_state_dict(htsat, strict=True)
    for linear in (net.audio_encoder.projection.linear1, net.audio_encoder.projection.linear2):
        nn.init.xavier_uniform_(linear.weight)
    lm = {k: (v.float() if v.is_floating_point() else v) for k, v in lm_weights().items()}
    try:
        net.caption_decoder.lm = load_lm(cfg, lm)
    except ModelError as e:
        raise ModelError(f"{lm_name}: {e}") from None
    return net


def htsat_state(raw: dict, name: str) -> dict[str, torch.Tensor]:
    """The HTSAT tensors of the AudioSet checkpoint, `sed_model.` stripped."""
    raw = raw.get("state_dict", raw) if isinstance(raw, dict) else raw
    sd = {k[len(HTSAT_PREFIX):]: v for k, v in raw.items() if k.startswith(HTSAT_PREFIX) and torch.is_tensor(v)}
    if not sd:
        raise ModelError(f"{name}: no {HTSAT_PREFIX}* keys: not the AudioSet HTSAT checkpoint")
    return sd


def htsat_config(sd: dict[str, torch.Tensor], name: str) -> MellowConfig:
    """v0 with the encoder's sizes read from its tensors (so a smaller HTSAT loads too)."""
    try:
        proj = sd["patch_embed.proj.weight"]
        depths = tuple(1 + max(int(m.group(2)) for k in sd if (m := re.match(r"layers\.(\d+)\.blocks\.(\d+)\.", k))
                               and int(m.group(1)) == i)
                       for i in range(1 + max(int(k.split(".")[1]) for k in sd if k.startswith("layers."))))
        tables = [sd[f"layers.{i}.blocks.0.attn.relative_position_bias_table"] for i in range(len(depths))]
        window = (math.isqrt(tables[0].shape[0]) + 1) // 2
        return dataclasses.replace(MellowConfig.v0(), embed_dim=proj.shape[0], patch_size=proj.shape[-1],
                                   depths=depths, num_heads=tuple(t.shape[1] for t in tables),
                                   window_size=window, num_classes=sd["tscam_conv.weight"].shape[0])
    except (KeyError, ValueError, IndexError) as e:
        raise ModelError(f"{name}: not an HTSAT state dict ({e.__class__.__name__}: {e})") from None
