"""What a training run is told: its options, the two recipes that preset them, and the rule that
merges presets, explicit flags and a resumed run's own options.

`mellow` is this project's fine-tuning recipe (nanoGPT-like: AdamW, warmup, per-step cosine, global
clipping). `official` is the authors' (soham97/mellow, branch `training`: config/train_*.yaml,
training/trainer.py, utils/utils.py, data/audiotext_dataset.py, models/htsat.py): HTSAT frozen but
in train mode, Adam with coupled L2, a per-epoch cosine to 0, adaptive per-tensor clipping, their
prompt templates and text encoding, batch 4 with drop_last.

A preset fills every option the user did not set; an explicit flag always wins. Nothing here
imports torch: the CLI reads the presets to write its --help.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from mellow_cli.errors import UsageError
from mellow_cli.runtime.options import MAX_SEED


@dataclass(frozen=True)
class TrainOptions:
    """Everything a run depends on; saved in every checkpoint's trainer.json. The defaults are the
    `mellow` recipe."""

    data: str | tuple[str, ...] | None  # training rows: one file, or several read as one list
    out: str  # the run folder: checkpoints/, metrics.jsonl
    model: str = "v0"  # start from these weights (anything loading.load accepts)
    init: str | None = None  # or a config preset ("tiny", "v0") with fresh weights, or "pretrained"
    encoder_weights: str | None = None  # --init pretrained: the AudioSet HTSAT checkpoint (sed_model. keys)
    lm_weights: str = "HuggingFaceTB/SmolLM2-135M"  # --init pretrained: the language model's weights
    tokenizer: str | None = None  # folder with tokenizer.json [default: the model's, or the preset's]
    recipe: str = "mellow"  # the preset the options below started from (RECIPES)
    freeze: tuple[str, ...] = ()  # parts of FREEZABLE kept as they are
    encoder_mode: str = "eval"  # HTSAT's mode while training: eval, or train (SpecAugment, DropPath, bn0 batch stats)
    val: str | None = None  # validation rows, same formats
    val_fraction: float = 0.0  # or hold out this fraction of the training rows
    audio_root: str | None = None  # relative audio paths are relative to this folder
    skip_bad: bool = False  # drop rows that fail validation instead of stopping
    text: str = "mellow"  # prompt/answer text: mellow (fixed phrasing) or official (templates, end of text)
    second_clip: str = "first"  # a row without a second clip hears: first (clip 1 twice) or random (another clip)
    epochs: float = 1.0  # passes over the training rows (unless max_steps)
    max_steps: int | None = None  # optimizer steps; wins over epochs
    batch_size: int = 8  # rows per micro-batch per process
    drop_last: bool = False  # drop each epoch's last, short batch
    grad_accum: int = 1  # micro-batches per optimizer step
    optimizer: str = "adamw"  # adamw (decoupled decay, matrices only) or adam (coupled L2, every tensor)
    betas: tuple[float, float] = (0.9, 0.95)
    lr: float = 1e-4  # peak learning rate
    schedule: str = "step-cosine"  # step-cosine (warmup, then per step) or epoch-cosine (constant within an epoch)
    min_lr_ratio: float = 0.1  # the cosine ends at lr * this
    warmup_steps: int | None = None  # linear warmup [default: 5% of the steps]
    weight_decay: float = 0.01
    clip: str = "global"  # global (norm of all gradients) or adaptive (per-tensor running norms)
    grad_clip: float = 1.0  # global: max norm (0 disables); adaptive: the initial running L2 norm
    max_answer_tokens: int = 256  # answer tokens (with the end of text) beyond this are cut
    random_window: bool = True  # long training clips: a seeded random 10 s window per epoch
    seed: int = 0
    workers: int = 2  # DataLoader processes decoding waveforms
    device: str = "auto"
    save_every: int = 500  # checkpoint every N steps (and at the end)
    eval_every: int = 500  # validate every N steps (and at the end)
    log_every: int = 10  # a metrics row every N steps
    keep: int = 3  # keep the last K checkpoints (and the best)
    resume: bool = False  # continue the run in `out` from its last checkpoint
    trace: bool = False  # write the row indices each process consumed (tests)

    @property
    def frozen_parts(self) -> str:
        return ",".join(self.freeze) or "none"

    @property
    def data_files(self) -> tuple[str, ...]:
        if self.data is None:
            return ()
        return (self.data,) if isinstance(self.data, str) else tuple(self.data)


_DEFAULTS = TrainOptions(data=None, out="")

# The options a recipe sets. `mellow` is exactly the dataclass defaults (the run before recipes
# existed); `official` the authors' training release.
RECIPE_FIELDS = ("freeze", "encoder_mode", "text", "second_clip", "batch_size", "drop_last", "optimizer", "betas",
                 "lr", "schedule", "min_lr_ratio", "warmup_steps", "weight_decay", "clip", "grad_clip",
                 "max_answer_tokens")
RECIPES: dict[str, dict] = {
    "mellow": {f: getattr(_DEFAULTS, f) for f in RECIPE_FIELDS},
    "official": dict(
        freeze=("encoder",),  # freeze_audio_encoder_weights: True
        encoder_mode="train",  # model.train(): SpecAugment, DropPath 0.1, bn0 batch statistics
        text="official",  # data/template.py paraphrases and casing; ' <|endoftext|>' after prompt and answer
        second_clip="random",  # an empty filepath2 -> random.choice of the rows' first clips
        batch_size=4,
        drop_last=True,
        optimizer="adam",  # torch.optim.Adam, weight_decay on every trainable tensor (one group)
        betas=(0.9, 0.999),  # Adam's defaults, which they keep
        lr=1e-3,
        schedule="epoch-cosine",  # CosineAnnealingLR(T_max=num_epochs), stepped once per epoch
        min_lr_ratio=0.0,
        warmup_steps=0,  # warm_up_steps in their yaml is never read
        weight_decay=1e-4,
        clip="adaptive",  # GradNormTracker(initial_l2_norm=max_grad_norm, initial_max_norm=10x)
        grad_clip=0.5,  # max_grad_norm
        max_answer_tokens=250,  # op_text_len: tokens, ' <|endoftext|>' included
    ),
}
CHOICES = {"recipe": tuple(RECIPES), "encoder_mode": ("eval", "train"), "text": ("mellow", "official"),
           "second_clip": ("first", "random"), "optimizer": ("adamw", "adam"),
           "schedule": ("step-cosine", "epoch-cosine"), "clip": ("global", "adaptive")}

# Options a resumed run may change; every other one is the run's own.
RESUMABLE_CHANGES = {"epochs", "max_steps", "save_every", "eval_every", "log_every", "keep", "workers",
                     "device", "resume", "trace"}
# What --freeze names: the audio encoder, the language model (its token embeddings included); each
# family says which of its modules those are (models/family.py's parts).
FREEZABLE = ("encoder", "decoder")


# The range of each numeric option, (lowest, highest; None: unbounded): the CLI declares its flags
# with them and a checkpoint's saved options are checked against them. A learning rate above 1
# or a seed torch cannot take is a typo, refused before anything loads.
BOUNDS: dict[str, tuple[float, float | None]] = {
    "val_fraction": (0.0, 0.5), "epochs": (0.01, 1e6), "max_steps": (1, None), "batch_size": (1, None),
    "grad_accum": (1, None), "lr": (0.0, 1.0), "min_lr_ratio": (0.0, 1.0), "warmup_steps": (0, None),
    "weight_decay": (0.0, None), "grad_clip": (0.0, None), "max_answer_tokens": (2, None), "seed": (0, MAX_SEED),
    "workers": (0, None), "save_every": (1, None), "eval_every": (1, None), "log_every": (1, None),
    "keep": (1, None),
}


def limits(name: str) -> dict:
    """min= and max= for the option's typer.Option, from BOUNDS."""
    low, high = BOUNDS[name]
    return {"min": low, "max": high}


def options(recipe: str, **given) -> TrainOptions:
    """The recipe's preset, then every option in `given` that is not None (an explicit flag)."""
    if recipe not in RECIPES:
        raise UsageError(f"--recipe: unknown recipe {recipe!r}: use {' or '.join(RECIPES)}")
    for name, allowed in CHOICES.items():
        if given.get(name) is not None and given[name] not in allowed:
            raise UsageError(f"{flag(name)}: {given[name]!r} is not one of {', '.join(allowed)}")
    explicit = {k: v for k, v in given.items() if v is not None}
    return TrainOptions(**{"data": None, "out": "", **RECIPES[recipe], **explicit, "recipe": recipe})


def preset_help(name: str) -> str:
    """`[mellow: X; official: Y]` for an option's --help."""
    def show(v) -> str:
        if isinstance(v, tuple):
            return ",".join(map(str, v)) or "none"
        if v is None:
            return "auto"
        if isinstance(v, bool):
            return "yes" if v else "no"
        return f"{v:g}" if isinstance(v, float) else str(v)

    return "[" + "; ".join(f"{r}: {show(p[name])}" for r, p in RECIPES.items()) + "]"


def parse_freeze(text: str) -> tuple[str, ...]:
    """"none", "encoder", "decoder" or "encoder,decoder" -> the parts, in FREEZABLE's order."""
    parts = {p.strip() for p in text.split(",") if p.strip()} - {"none"}
    unknown = parts - set(FREEZABLE)
    if unknown:
        raise UsageError(f"--freeze: unknown part {sorted(unknown)[0]!r}: use encoder, decoder, "
                         "encoder,decoder or none")
    return tuple(p for p in FREEZABLE if p in parts)


def parse_betas(text: str) -> tuple[float, float]:
    try:
        b1, b2 = (float(x) for x in text.split(","))
    except ValueError:
        raise UsageError(f"--betas: expected two numbers like 0.9,0.999, got {text!r}") from None
    if not (0 <= b1 < 1 and 0 <= b2 < 1):
        raise UsageError(f"--betas: each must be in [0, 1), got {text!r}")
    return b1, b2


def resumed_options(saved: dict, given: TrainOptions) -> TrainOptions:
    """The run's own options, except those `given` sets to something other than the default:
    taken if a resume may change them, an error otherwise (never silently ignored)."""
    merged = {}
    for f in dataclasses.fields(TrainOptions):
        new = getattr(given, f.name)
        if f.name in ("out", "resume") or f.name not in saved:
            merged[f.name] = new
            continue
        old = tuple(saved[f.name]) if isinstance(saved[f.name], list) else saved[f.name]
        if new == getattr(_DEFAULTS, f.name):
            merged[f.name] = old
        elif new == old or f.name in RESUMABLE_CHANGES:
            merged[f.name] = new
        else:
            may = ", ".join(flag(n) for n in sorted(RESUMABLE_CHANGES - {"resume", "trace"}))
            raise UsageError(f"--resume: this run was started with {flag(f.name)} {old!r}, not {new!r}; a "
                             f"resumed run keeps its options (only {may} may change)")
    return TrainOptions(**merged)


def flag(name: str) -> str:
    return "--" + name.replace("_", "-")
