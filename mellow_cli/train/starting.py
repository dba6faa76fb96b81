"""Where a run's weights start: a model (`--model`), fresh random weights of a preset (`--init
tiny|v0`, with the encoder fitted to the training audio), or the authors' starting point (`--init
pretrained`).

`--init pretrained` follows the official training release (soham97/mellow, branch `training`,
models/mellow.py `AudioEncoder` and models/decoder.py): HTSAT from the AudioSet checkpoint
(`HTSAT_AudioSet_Saved_1.ckpt`, a Lightning checkpoint whose `state_dict` keys carry the
`sed_model.` prefix, loaded strictly), the SmolLM2-135M base language model, and a fresh c2l and
projection (the projection's two matrices Xavier-uniform, as their `Projection.init_weight`). The
encoder's sizes are read from the checkpoint; the language model's are SmolLM2-135M's (v0).
Weights are named by a local file or `REPO:FILE` on the hub; a bare hub repo means its
`model.safetensors`.
"""

from __future__ import annotations

import dataclasses
import math
import re
from pathlib import Path

import torch
from torch import nn

from mellow_cli.models.mellow.config import MellowConfig
from mellow_cli.errors import ModelError, UsageError
from mellow_cli.train.recipe import TrainOptions

HTSAT_PREFIX = "sed_model."  # the AudioSet checkpoint's key prefix (the reference strips key[10:])


def fresh_model(cfg: MellowConfig, seed: int):
    """Random weights for a preset. The language model gets transformers' Llama init (normal,
    std 0.02): torch's default N(0, 1) embedding, tied to the output head, starts at a loss near 60."""
    from mellow_cli.models.mellow.network import Mellow

    torch.manual_seed(seed)
    net = Mellow.from_config(cfg, "cpu")
    for module in net.lm.modules():
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, std=0.02)
    return net


def _preset(init: str) -> MellowConfig:
    """The config --init names (pretrained: v0's, whose encoder sizes the checkpoint then sets)."""
    try:
        return MellowConfig.v0() if init == "pretrained" else MellowConfig.preset(init)
    except KeyError as e:
        raise UsageError(f"--init: {e.args[0]}") from None


def start_tokenizer(opts: TrainOptions, progress: bool, checkpoint: Path | None = None) -> Path | None:
    """The tokenizer folder a new run reads, found before any audio is decoded, so a missing one
    fails in a second rather than after every clip was checked: --tokenizer, or with --init the
    preset's from the cache or the hub. None: the model's own (--model, or the checkpoint a
    resumed run continues from)."""
    from mellow_cli.store import loading
    from mellow_cli.store.hub import offline

    if checkpoint is not None:
        return None
    if opts.tokenizer:
        folder = Path(opts.tokenizer)
        if not folder.is_dir():
            raise UsageError(f"--tokenizer {folder}: no such folder (it should hold tokenizer.json)")
        missing = [f for f in loading.TOKENIZER_FILES if not (folder / f).is_file()]
        if missing:
            raise UsageError(f"--tokenizer {folder}: no {missing[0]} in this folder: not a tokenizer folder")
        return folder
    if not opts.init:
        return None
    _check_pretrained(opts)
    cfg = _preset(opts.init)
    try:
        return loading.tokenizer_folder(cfg, opts.init, progress)
    except ModelError as e:
        # The hub's hint (`mellow models pull <preset>`) does not apply: a preset is not a model
        # one can pull. What is missing is the tokenizer, and --tokenizer gives it.
        why = "HF_HUB_OFFLINE is set" if offline() else re.split(r"[:;,] (?:check the network and )?run `mellow",
                                                                     str(e))[0]
        raise ModelError(f"--init {opts.init} needs the {cfg.tokenizer} tokenizer, which is not in the cache ({why}): "
                         "pass --tokenizer DIR (a folder with tokenizer.json), or run once with network") from None


def build_model(opts: TrainOptions, progress: bool, checkpoint: Path | None = None, tokenizer: Path | None = None):
    """(net on the CPU, tokenizer folder, name): a run's checkpoint when resuming, else --init's
    fresh weights (or the authors' pretrained parts) or --model's. `tokenizer`: start_tokenizer's
    answer, when the caller looked it up already."""
    from mellow_cli.store import loading

    if opts.init == "pretrained" and checkpoint is None:
        return pretrained_model(opts, progress, tokenizer)
    if checkpoint is None and tokenizer is None:
        tokenizer = start_tokenizer(opts, progress)
    if opts.init and checkpoint is None:
        return fresh_model(_preset(opts.init), opts.seed), tokenizer, f"{opts.init} (fresh weights)"
    net, files = loading.load(str(checkpoint or opts.model), device="cpu", progress=progress)
    # A checkpoint carries the run's tokenizer; the --tokenizer it started with may be gone since.
    return net, tokenizer or files.tokenizer_dir, files.name


def calibrate_encoder(net, dataset, clips: int = 64) -> None:
    """Fresh weights: fit two of the encoder's affine maps to the training audio, from `clips`
    clips spread over the rows (the same on every process), as a data-dependent init.

    bn0 gets each mel band's mean and variance of the log-mel. HTSAT trains with bn0 in eval mode,
    and a fresh bn0's statistics (0, 1) would hand it raw decibels, mostly the -100 dB floor.

    c2l (classes -> frame embedding) is rescaled so that each output channel has mean 0 and
    variance 1 over the clips' frames. A random c2l adds a large constant to every frame (the
    sigmoid class scores sit near 0.5), which the mapper's LayerNorm keeps, so clips differ by
    only ~6% of the frame vectors and the language model long ignores the audio; centred, the
    differences between clips are what it sees."""
    base = net.audio_encoder.base
    htsat = base.htsat
    picks = torch.linspace(0, len(dataset) - 1, min(clips, len(dataset))).long().tolist()
    with torch.no_grad():
        wav = torch.stack([dataset[i]["wav1"] for i in picks])
        mel = htsat.log_mel(wav)  # (n, 1, frames, bands)
        per_band = mel.transpose(0, 3).reshape(mel.shape[3], -1)
        htsat.bn0.running_mean.copy_(per_band.mean(dim=1))
        htsat.bn0.running_var.copy_(per_band.var(dim=1))
        frames = base.c2l(htsat(wav)[1]).flatten(0, 1)  # (n * time tokens, audio_dim)
        mean, std = frames.mean(dim=0), frames.std(dim=0).clamp_min(1e-6)
        base.c2l.weight.div_(std[:, None])
        base.c2l.bias.sub_(mean).div_(std)


def pretrained_model(opts: TrainOptions, progress: bool, tokenizer: Path | None = None):
    """(net, tokenizer folder, name) from the pretrained HTSAT and language model."""
    from mellow_cli.models.mellow.network import load_lm

    _check_pretrained(opts)
    htsat = htsat_state(opts.encoder_weights, progress)
    cfg = dataclasses.replace(htsat_config(htsat, opts.encoder_weights), name="pretrained")
    net = fresh_model(cfg, opts.seed)
    _load_strict(net.audio_encoder.base.htsat, htsat, opts.encoder_weights)
    for linear in (net.audio_encoder.projection.linear1, net.audio_encoder.projection.linear2):
        nn.init.xavier_uniform_(linear.weight)
    lm = {k: (v.float() if v.is_floating_point() else v) for k, v in _weights(opts.lm_weights, progress).items()}
    try:
        net.caption_decoder.lm = load_lm(cfg, lm)
    except ModelError as e:
        raise ModelError(f"{opts.lm_weights}: {e}") from None
    tokenizer = tokenizer or start_tokenizer(opts, progress)
    return net, tokenizer, f"pretrained HTSAT ({opts.encoder_weights}) + {opts.lm_weights}"


def _check_pretrained(opts: TrainOptions) -> None:
    if opts.init == "pretrained" and not opts.encoder_weights:
        raise UsageError("--init pretrained needs --encoder-weights: the AudioSet HTSAT checkpoint "
                         "(HTSAT_AudioSet_Saved_1.ckpt, keys sed_model.*)")


def htsat_state(name: str, progress: bool) -> dict[str, torch.Tensor]:
    """The HTSAT tensors of the AudioSet checkpoint, `sed_model.` stripped."""
    raw = _weights(name, progress)
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


def _load_strict(module: nn.Module, sd: dict[str, torch.Tensor], name: str) -> None:
    from mellow_cli.models.mellow.network import key_report

    report = key_report(module, sd)
    if not report.ok:
        raise ModelError(f"{name}: does not fit HTSAT: {report.describe()}")
    with torch.no_grad():
        module.load_state_dict(sd, strict=True)


def _weights(name: str, progress: bool) -> dict:
    """A state dict from a local file (.safetensors or a torch.save pickle, read weights-only), a
    folder holding model.safetensors, or the hub (REPO:FILE, or REPO for its model.safetensors)."""
    path = Path(name).expanduser()
    if path.is_dir():
        path = path / "model.safetensors"
    elif not path.exists():
        path = _download(name, progress)
    if not path.is_file():
        raise ModelError(f"{path}: no such file")
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            return load_file(str(path))
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        first = (str(e).strip().splitlines() or [e.__class__.__name__])[0][:200]
        raise ModelError(f"{path}: cannot read the weights ({first})") from None


def _download(name: str, progress: bool) -> Path:
    from mellow_cli.store.hub import download
    from mellow_cli.store.loading import cache_dir

    repo, _, filename = name.partition(":")
    if not re.fullmatch(r"[\w.-]+/[\w.-]+", repo):
        raise UsageError(f"{name}: no such file, and not a hub name (REPO or REPO:FILE)")
    filename = filename or "model.safetensors"
    dest = cache_dir() / "downloads" / repo.replace("/", "--") / filename
    if not dest.is_file():
        download(repo, filename, "main", dest, name=name, progress=progress)
    return dest
