"""Where a run's weights start: a model of any family (`--model`), fresh random weights of a Mellow
preset (`--init tiny|v0`, with the encoder fitted to the training audio), or Mellow's authors'
starting point (`--init pretrained`, which the family assembles: models/mellow/training.py says
how Mellow's is made); and what a family's model cannot be trained with.
Weights are named by a local file or `REPO:FILE` on the hub; a bare hub repo means its
`model.safetensors`.
"""

from __future__ import annotations

import re
from pathlib import Path

import torch

from mellow_cli.errors import ModelError, UsageError
from mellow_cli.models.family import Family, family
from mellow_cli.train.recipe import TrainOptions

# The family whose presets `--init` names (fresh weights, or its authors' starting point), and
# whose authors' recipe `--recipe official` is.
INIT_FAMILY = "mellow"


def check_family(opts: TrainOptions, fam: Family) -> None:
    """The official recipe and its text are Mellow's authors' (other families train with ours),
    and a random second clip needs a family that hears two."""
    if fam.name != INIT_FAMILY:
        if opts.recipe == "official":
            raise UsageError(f"--recipe official is {_init_family().title}'s authors' recipe; a {fam.title} model "
                             "trains with --recipe mellow")
        if opts.text == "official":
            raise UsageError(f"--text official is {_init_family().title}'s authors' text; a {fam.title} model trains "
                             "with --text mellow")
    if opts.second_clip == "random" and fam.most_clips == 1:
        raise UsageError(f"--second-clip random gives a question a second clip; {fam.title} takes 1 clip a question")


def fresh_model(cfg, seed: int):
    """Random weights for a preset (models.weights.fresh_weights)."""
    from mellow_cli.models.family import family_of
    from mellow_cli.models.weights import fresh_weights

    return fresh_weights(family_of(cfg), cfg, seed)


def _preset(init: str):
    """The config --init names (pretrained: the published one's, whose encoder sizes the
    checkpoint then sets)."""
    try:
        return _init_family().config("v0" if init == "pretrained" else init)
    except KeyError as e:
        raise UsageError(f"--init: {e.args[0]}") from None


def _init_family() -> Family:
    return family(INIT_FAMILY)


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
    """Fresh weights: the family fits its encoder to `clips` clips spread over the rows (the same
    on every process), as a data-dependent init (models/family.py's calibrate)."""
    from mellow_cli.models.family import family_of

    picks = torch.linspace(0, len(dataset) - 1, min(clips, len(dataset))).long().tolist()
    wav = torch.stack([dataset[i]["wav1"] for i in picks])
    family_of(net.cfg).calibrate(net, wav)


def pretrained_model(opts: TrainOptions, progress: bool, tokenizer: Path | None = None):
    """(net, tokenizer folder, name) from the family's pretrained encoder and language model."""
    _check_pretrained(opts)
    names = (opts.encoder_weights, opts.lm_weights)
    net = _init_family().pretrained(_weights(opts.encoder_weights, progress),
                                    lambda: _weights(opts.lm_weights, progress), names, opts.seed)
    tokenizer = tokenizer or start_tokenizer(opts, progress)
    return net, tokenizer, f"pretrained encoder ({opts.encoder_weights}) + {opts.lm_weights}"


def _check_pretrained(opts: TrainOptions) -> None:
    if opts.init == "pretrained" and not opts.encoder_weights:
        raise UsageError(f"--init pretrained needs --encoder-weights: {_init_family().pretrained_encoder}")


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
