"""Fine-tuning Mellow: the paper's objective, the training loop, checkpoints that resume bit for bit,
validation, and data-parallel training under torchrun.

Objective (arXiv 2503.08540, reference soham97/mellow `models/decoder.py`): next-token
cross-entropy on the answer tokens only, fed after the 389-position prefix (clip 1 · sep · clip 2 ·
sep · prompt padded with `!`). The answer is the tokenizer's ids without special tokens, then
`<|endoftext|>`, so the model learns where to stop. Logits are computed for the answer positions
alone (the vocabulary is 49152 wide).

The loop follows nanoGPT: AdamW (no weight decay on norms and biases), linear warmup then a cosine
decay to a tenth of the peak, gradient clipping, gradient accumulation, bf16 autocast on CUDA and
float32 on a CPU. Under torchrun every process holds a replica wrapped in DistributedDataParallel
(gloo on CPU, NCCL on GPU), reads its share of each epoch's seeded permutation, and only rank 0
writes checkpoints, metrics and progress.

A checkpoint (runs.py: the run folder) is a model folder (`mellow ask --model
RUN/checkpoints/step-000123` loads it) plus `trainer.json` and `state.pt` (optimizer, scheduler,
every process's RNG states). Resuming restores all of them and the position inside the epoch, so
an interrupted run ends with exactly the weights of an uninterrupted one. Nothing here prints:
`run` reports events to a callback (cli_train.py draws them), so a script can call it too.
"""

from __future__ import annotations

import contextlib
import dataclasses
import itertools
import json
import math
import os
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, DistributedSampler

from mellow_cli.config import MellowConfig
from mellow_cli.errors import MellowError, UsageError
from mellow_cli.runs import (
    CHECKPOINTS,
    METRICS,
    append_metrics,
    checkpoints,
    clean_stale,
    keep_tokenizer,
    mark_best,
    prune,
    read_trainer,
    rng_state,
    seed_everything,
    set_rng_state,
    step_name,
    truncate_metrics,
    weights_digest,
    write_checkpoint,
)

IGNORE = -100  # label of a position that is not an answer token (cross_entropy's ignore_index)
FREEZABLE = {  # --freeze part -> the module it freezes
    "encoder": "audio_encoder.base.htsat",  # HTSAT; c2l and the projection (the mapper) still train
    "decoder": "caption_decoder.lm",  # SmolLM2, its token embeddings (separator, prompt) included
}
UNUSED = ("audio_encoder.base.htsat.head",)  # in the checkpoint, never in the forward pass


@dataclass(frozen=True)
class TrainOptions:
    """Everything a run depends on; saved in every checkpoint's trainer.json."""

    data: str | None  # training rows: JSONL or ReasonAQA JSON (taken from the run when resuming)
    out: str  # the run folder: checkpoints/, metrics.jsonl
    model: str = "v0"  # start from these weights (anything loading.load accepts)
    init: str | None = None  # or a config preset ("tiny", "v0") with fresh random weights
    tokenizer: str | None = None  # folder with tokenizer.json [default: the model's, or the preset's]
    freeze: tuple[str, ...] = ()  # parts of FREEZABLE kept as they are
    val: str | None = None  # validation rows, same formats
    val_fraction: float = 0.0  # or hold out this fraction of the training rows
    audio_root: str | None = None  # relative audio paths are relative to this folder
    skip_bad: bool = False  # drop rows that fail validation instead of stopping
    epochs: float = 1.0  # passes over the training rows (unless max_steps)
    max_steps: int | None = None  # optimizer steps; wins over epochs
    batch_size: int = 8  # rows per micro-batch per process
    grad_accum: int = 1  # micro-batches per optimizer step
    lr: float = 1e-4  # peak learning rate
    min_lr_ratio: float = 0.1  # the cosine ends at lr * this
    warmup_steps: int | None = None  # linear warmup [default: 5% of the steps]
    weight_decay: float = 0.01  # AdamW, on matrices and embeddings only
    grad_clip: float = 1.0  # max global gradient norm; 0 disables
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


# Options a resumed run may change; every other one is the run's own.
RESUMABLE_CHANGES = {"epochs", "max_steps", "save_every", "eval_every", "log_every", "keep", "workers",
                     "device", "resume", "trace"}


@dataclass(frozen=True)
class TrainResult:
    steps: int
    checkpoint: Path  # the last checkpoint written
    best: Path | None  # the checkpoint with the lowest validation loss
    loss: float | None  # training loss over the last logging interval
    val_loss: float | None
    val_accuracy: float | None
    samples_per_s: float
    seconds: float  # training time of this process's share (since the run started, resumes included)


Event = dict
Report = Callable[[Event], None]


# --- the objective -------------------------------------------------------------------------------


def encode_answers(tokenizer, answers: list[str], cfg: MellowConfig, max_tokens: int = 256):
    """Answers -> ids (B, A) and mask (B, A): each answer's tokens and `<|endoftext|>`, cut to
    `max_tokens`, right-padded (the padding is never a label)."""
    rows = [(tokenizer(a, add_special_tokens=False)["input_ids"] + [cfg.eos_token_id])[:max_tokens] for a in answers]
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), cfg.pad_token_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.bool)
    for i, r in enumerate(rows):
        ids[i, : len(r)] = torch.tensor(r)
        mask[i, : len(r)] = True
    return ids, mask


def answer_logits(lm, prefix: torch.Tensor, answer_ids: torch.Tensor) -> torch.Tensor:
    """Teacher forcing: (B, A, vocab) logits predicting each answer token, from the last prefix
    position on. Right padding needs no attention mask: attention is causal, so padding only
    follows the tokens whose logits are read."""
    answer = lm.get_input_embeddings()(answer_ids[:, :-1])  # the last token predicts nothing we train
    x = torch.cat([prefix, answer.to(prefix.dtype)], dim=1)
    return lm(inputs_embeds=x, logits_to_keep=answer_ids.shape[1]).logits


def token_loss(logits: torch.Tensor, answer_ids: torch.Tensor, answer_mask: torch.Tensor,
               reduction: str = "mean") -> torch.Tensor:
    labels = answer_ids.masked_fill(~answer_mask, IGNORE)
    return F.cross_entropy(logits.float().flatten(0, 1), labels.flatten(), ignore_index=IGNORE, reduction=reduction)


def answer_loss(net, wav1, wav2, prompt_ids, answer_ids, answer_mask, reduction: str = "mean") -> torch.Tensor:
    """Cross-entropy of the answer tokens (mask True) given two clips and the padded prompt."""
    logits = answer_logits(net.lm, net.prefix(wav1, wav2, prompt_ids), answer_ids)
    return token_loss(logits, answer_ids, answer_mask, reduction)


class TrainingView(nn.Module):
    """What DistributedDataParallel wraps: its forward is the loss (DDP hooks into forward)."""

    def __init__(self, net):
        super().__init__()
        self.net = net

    def forward(self, wav1, wav2, prompt_ids, answer_ids, answer_mask):
        return answer_loss(self.net, wav1, wav2, prompt_ids, answer_ids, answer_mask)


# --- the model -----------------------------------------------------------------------------------


def fresh_model(cfg: MellowConfig, seed: int):
    """Random weights for a preset. The language model gets transformers' Llama init (normal,
    std 0.02): torch's default N(0, 1) embedding, tied to the output head, starts at a loss near 60."""
    from mellow_cli.model.mellow import Mellow

    torch.manual_seed(seed)
    net = Mellow.from_config(cfg, "cpu")
    for module in net.lm.modules():
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, std=0.02)
    return net


def build_model(opts: TrainOptions, progress: bool, checkpoint: Path | None = None):
    """(net on the CPU, tokenizer folder, name): a run's checkpoint when resuming, else --init's
    fresh weights or --model's."""
    from mellow_cli import loading

    if opts.init and checkpoint is None:
        try:
            cfg = MellowConfig.preset(opts.init)
        except KeyError as e:
            raise UsageError(f"--init: {e.args[0]}") from None
        tokenizer = Path(opts.tokenizer) if opts.tokenizer else loading.tokenizer_folder(cfg, opts.init, progress)
        return fresh_model(cfg, opts.seed), tokenizer, f"{opts.init} (fresh weights)"
    net, files = loading.load(str(checkpoint or opts.model), device="cpu", progress=progress)
    return net, Path(opts.tokenizer) if opts.tokenizer else files.tokenizer_dir, files.name


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


def freeze(net, parts: tuple[str, ...]) -> None:
    """requires_grad off for the frozen parts (and for weights the forward pass never uses)."""
    unknown = [p for p in parts if p not in FREEZABLE]
    if unknown:
        raise UsageError(f"--freeze: unknown part {unknown[0]!r}: use {', '.join(FREEZABLE)} or none")
    net.requires_grad_(True)
    for name in (*UNUSED, *(FREEZABLE[p] for p in parts)):
        net.get_submodule(name).requires_grad_(False)


def train_mode(net) -> None:
    """Training mode for the mapper's dropout; HTSAT stays in eval mode, so bn0 keeps the
    statistics it was loaded with (it has no other training-time behaviour here)."""
    net.train()
    net.audio_encoder.base.eval()


def parse_freeze(text: str) -> tuple[str, ...]:
    """"none", "encoder", "decoder" or "encoder,decoder" -> the parts, in FREEZABLE's order."""
    parts = {p.strip() for p in text.split(",") if p.strip()} - {"none"}
    unknown = parts - set(FREEZABLE)
    if unknown:
        raise UsageError(f"--freeze: unknown part {sorted(unknown)[0]!r}: use encoder, decoder, "
                         "encoder,decoder or none")
    return tuple(p for p in FREEZABLE if p in parts)


def optimizer_for(net, opts: TrainOptions) -> torch.optim.AdamW:
    """AdamW over the trainable weights; matrices and embeddings decay, norms and biases do not."""
    params = [p for p in net.parameters() if p.requires_grad]
    if not params:
        raise UsageError("--freeze leaves nothing to train")
    groups = [{"params": [p for p in params if p.ndim >= 2], "weight_decay": opts.weight_decay},
              {"params": [p for p in params if p.ndim < 2], "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=opts.lr, betas=(0.9, 0.95))


def lr_factor(step: int, warmup: int, total: int, min_ratio: float) -> float:
    """Linear warmup to 1, then a cosine down to min_ratio at `total`."""
    if step < warmup:
        return (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


# --- data ----------------------------------------------------------------------------------------


class EpochSampler(DistributedSampler):
    """DistributedSampler (seeded permutation per epoch, one share per process) that can start
    part-way through an epoch, for resuming."""

    def __init__(self, dataset, num_replicas: int, rank: int, seed: int):
        super().__init__(dataset, num_replicas=num_replicas, rank=rank, shuffle=True, seed=seed, drop_last=False)
        self.start = 0

    def set_position(self, epoch: int, start: int) -> None:
        self.set_epoch(epoch)
        self.start = start

    def __iter__(self):
        return itertools.islice(super().__iter__(), self.start, None)

    def __len__(self) -> int:
        return max(0, self.num_samples - self.start)


def read_checked(path: str, opts: TrainOptions, report: Report, world) -> list:
    """Every row of `path`, validated before the first step; bad rows stop the run (one line
    naming them by line number) unless --skip-bad. Under torchrun rank 0 checks the audio and
    tells the others which rows passed."""
    from mellow_cli import data

    rows = data.read_rows(path, audio_root=opts.audio_root)
    keep = None
    if world.main:
        clips = len({p for r in rows for p in (r.audio1, r.audio2) if p})
        report({"event": "checking", "path": path, "rows": len(rows), "clips": clips})
        good, bad = data.validate_rows(rows, check_audio=True,
                                       progress=lambda n: report({"event": "checked", "clips": n}))
        report({"event": "checked_all", "path": path})
        if bad and not opts.skip_bad:
            keep = data.describe_bad(path, bad) + " (pass --skip-bad to train without them)"
        else:
            if bad:
                report({"event": "note", "message": f"skipping {len(bad)} bad rows:\n{data.describe_bad(path, bad)}"})
            good_ids = {id(r) for r in good}
            keep = [i for i, r in enumerate(rows) if id(r) in good_ids]
    keep = world.broadcast(keep)
    if isinstance(keep, str):
        raise MellowError(keep)
    rows = [rows[i] for i in keep]
    if not rows:
        raise MellowError(f"{path}: no usable rows")
    return rows


def training_rows(opts: TrainOptions, report: Report, world) -> tuple[list, list]:
    """(train, val) rows, checked; before the model loads, so a bad file fails in seconds."""
    from mellow_cli import data

    train_rows = read_checked(opts.data, opts, report, world)
    val_rows = read_checked(opts.val, opts, report, world) if opts.val else []
    if not opts.val and opts.val_fraction > 0:
        train_rows, val_rows = data.split_val(train_rows, opts.val_fraction, opts.seed)
    return train_rows, val_rows


def datasets(opts: TrainOptions, cfg: MellowConfig, train_rows: list, val_rows: list):
    from mellow_cli import data

    train = data.QADataset(train_rows, cfg, seed=opts.seed, random_window=opts.random_window)
    val = data.QADataset(val_rows, cfg, seed=opts.seed, random_window=False) if val_rows else None
    return train, val


def loader(dataset, sampler, opts: TrainOptions, device: torch.device, seed: int) -> DataLoader:
    from mellow_cli import data

    # Its own generator: creating the iterator draws the workers' base seed from it, not from
    # torch's global RNG (which dropout uses, and which a resumed run must find untouched).
    generator = torch.Generator().manual_seed(seed)
    return DataLoader(dataset, batch_size=opts.batch_size, sampler=sampler, num_workers=opts.workers,
                      collate_fn=data.collate, generator=generator, pin_memory=device.type == "cuda")


# --- distributed ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class World:
    """This process's place under torchrun (rank 0 of 1 without it)."""

    rank: int = 0
    size: int = 1
    local_rank: int = 0

    @property
    def main(self) -> bool:
        return self.rank == 0

    def broadcast(self, obj):
        if self.size == 1:
            return obj
        box = [obj]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    def gather(self, obj) -> list:
        if self.size == 1:
            return [obj]
        out = [None] * self.size
        dist.all_gather_object(out, obj)
        return out

    def mean(self, value: float, device) -> float:
        if self.size == 1:
            return value
        t = torch.tensor([value], dtype=torch.float64, device=device)
        dist.all_reduce(t)
        return t.item() / self.size

    def sum(self, values: list[float], device) -> list[float]:
        if self.size == 1:
            return values
        t = torch.tensor(values, dtype=torch.float64, device=device)
        dist.all_reduce(t)
        return t.tolist()

    def barrier(self) -> None:
        if self.size > 1:
            dist.barrier()


def start_world(device_name: str) -> tuple[World, torch.device]:
    """Join the process group torchrun set up (WORLD_SIZE > 1), else run alone."""
    from mellow_cli.api import pick_device

    size = int(os.environ.get("WORLD_SIZE", "1"))
    device = pick_device(device_name)
    if size == 1:
        return World(), device
    if device.type == "mps":
        raise MellowError("torchrun: distributed training runs on cuda or cpu, not mps (pass --device cpu)")
    local = int(os.environ.get("LOCAL_RANK", "0"))
    if device.type == "cuda":
        device = torch.device("cuda", local)
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        # An hour, not torch's default: rank 0 alone checks every clip before the first step.
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo", timeout=timedelta(hours=1))
    return World(dist.get_rank(), dist.get_world_size(), local), device


def stop_world(world: World) -> None:
    if world.size > 1 and dist.is_initialized():
        dist.destroy_process_group()


# --- resuming ------------------------------------------------------------------------------------


def resumed_options(saved: dict, given: TrainOptions) -> TrainOptions:
    """The run's own options, except those `given` sets to something other than the default:
    taken if a resume may change them, an error otherwise (never silently ignored)."""
    defaults = TrainOptions(data=None, out=given.out)
    merged = {}
    for f in dataclasses.fields(TrainOptions):
        new = getattr(given, f.name)
        if f.name in ("out", "resume") or f.name not in saved:
            merged[f.name] = new
            continue
        old = tuple(saved[f.name]) if isinstance(saved[f.name], list) else saved[f.name]
        if new == getattr(defaults, f.name):
            merged[f.name] = old
        elif new == old or f.name in RESUMABLE_CHANGES:
            merged[f.name] = new
        else:
            may = ", ".join(_flag(n) for n in sorted(RESUMABLE_CHANGES - {"resume", "trace"}))
            raise UsageError(f"--resume: this run was started with {_flag(f.name)} {old!r}, not {new!r}; a "
                             f"resumed run keeps its options (only {may} may change)")
    return TrainOptions(**merged)


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


# --- validation ----------------------------------------------------------------------------------


@torch.no_grad()
def evaluate(net, dataset, tokenizer, opts: TrainOptions, world: World, device, autocast) -> dict:
    """Token-weighted answer loss over the validation rows, and accuracy on the rows that have
    choices (each choice scored by its likelihood with the end of text, as MellowModel.choose)."""
    from mellow_cli.generate import score_choices
    from mellow_cli.model.mellow import tokenize_prompts

    cfg = net.cfg
    net.eval()
    share = list(range(world.rank, len(dataset), world.size))
    loss_sum = tokens = correct = asked = 0.0
    for batch in loader(dataset, share, opts, device, opts.seed):
        wav1, wav2 = batch["wav1"].to(device), batch["wav2"].to(device)
        prompt = tokenize_prompts(tokenizer, batch["question"], cfg).to(device)
        ids, mask = encode_answers(tokenizer, batch["answer"], cfg, opts.max_answer_tokens)
        ids, mask = ids.to(device), mask.to(device)
        with autocast():
            prefix = net.prefix(wav1, wav2, prompt)
            loss_sum += token_loss(answer_logits(net.lm, prefix, ids), ids, mask, "sum").item()
        tokens += mask.sum().item()
        with_choices = [i for i, c in enumerate(batch["choices"]) if c]
        if with_choices:
            scored = score_choices(net.lm, tokenizer, prefix[with_choices].float(),
                                   [list(batch["choices"][i]) for i in with_choices],
                                   append_eos=True, eos_id=cfg.eos_token_id)
            for i, row in zip(with_choices, scored):
                picked = max(row, key=lambda s: s.logprob).text
                correct += _same_answer(picked, batch["answer"][i])
                asked += 1
    loss_sum, tokens, correct, asked = world.sum([loss_sum, tokens, correct, asked], device)
    train_mode(net)
    return {"val_loss": loss_sum / max(tokens, 1), "val_accuracy": correct / asked if asked else None,
            "val_choice_rows": int(asked)}


def _same_answer(a: str, b: str) -> bool:
    return a.strip().casefold() == b.strip().casefold()


# --- the loop ------------------------------------------------------------------------------------


@dataclass
class Position:
    """Where the run is: optimizer steps done, and the next micro-batch to read."""

    step: int = 0
    epoch: int = 0
    batch: int = 0  # micro-batches of `epoch` already consumed by this process
    seconds: float = 0.0  # training time so far, across resumes
    best_step: int | None = None
    best_val: float | None = None


def batches(dataset, sampler, opts, device, pos: Position, per_epoch: int) -> Iterator[tuple[int, int, dict]]:
    """(epoch, batch index, batch) from `pos` on, epoch after epoch, forever."""
    epoch, start = pos.epoch, pos.batch
    while True:
        dataset.set_epoch(epoch)
        sampler.set_position(epoch, start * opts.batch_size)
        for i, batch in enumerate(loader(dataset, sampler, opts, device, opts.seed + epoch), start):
            yield epoch, i, batch
        epoch, start = epoch + 1, 0


def run(opts: TrainOptions, report: Report | None = None) -> TrainResult:
    """Train as `opts` say; `report(event)` is called on rank 0 with progress events (dicts with
    an "event" key: start, step, train, val, checkpoint, note, done)."""
    world, device = start_world(opts.device)
    emit = (report or (lambda event: None)) if world.main else (lambda event: None)
    try:
        return _run(opts, world, device, emit)
    finally:
        stop_world(world)


@dataclass
class _Run:
    """Everything one run moves between its phases (set up once by `_setup`)."""

    opts: TrainOptions
    world: World
    device: torch.device
    emit: Report
    run_dir: Path
    net: nn.Module
    model: nn.Module  # TrainingView, wrapped in DistributedDataParallel under torchrun
    tokenizer: object
    tokenizer_dir: Path
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    train_set: object
    val_set: object | None
    sampler: EpochSampler
    autocast: Callable
    total: int  # optimizer steps of the whole run
    per_epoch: int  # micro-batches per epoch per process
    pos: Position
    checkpoint: Path | None = None  # the last one written
    last: dict = dataclasses.field(default_factory=lambda: {"loss": None, "val_loss": None, "val_accuracy": None,
                                                            "samples_per_s": 0.0})
    window: list = dataclasses.field(default_factory=lambda: [0.0, 0, 0, 0.0])  # loss, rows, steps, seconds since the last log


def _run(opts: TrainOptions, world: World, device: torch.device, emit: Report) -> TrainResult:
    r = _setup(opts, world, device, emit)
    stream = batches(r.train_set, r.sampler, r.opts, device, r.pos, r.per_epoch)
    trace = open(r.run_dir / f"trace-rank{world.rank}.jsonl", "a") if r.opts.trace else None
    try:
        while r.pos.step < r.total:
            consumed = _optimizer_step(r, stream)
            if trace:
                trace.write(json.dumps({"step": r.pos.step, "rank": world.rank, "indices": consumed}) + "\n")
                trace.flush()
            done = r.pos.step == r.total
            if r.pos.step % r.opts.log_every == 0 or done:
                _log(r)
            best = r.val_set is not None and (r.pos.step % r.opts.eval_every == 0 or done) and _validate(r)
            if r.pos.step % r.opts.save_every == 0 or done or best:
                r.checkpoint = _save(r)
                r.emit({"event": "checkpoint", "step": r.pos.step, "path": str(r.checkpoint), "best": best})
    finally:
        stream.close()
        if trace:
            trace.close()
    return _finish(r)


def _setup(opts: TrainOptions, world: World, device: torch.device, emit: Report) -> _Run:
    """Rows checked, model built (or restored), optimizer, schedule and sampler ready."""
    from mellow_cli.model.tokenizer import Tokenizer

    opts = _absolute(opts)
    run_dir = Path(opts.out)
    opts, resume_from = _prepare_run_dir(opts, run_dir, world)
    if opts.data is None:
        raise UsageError("give the training rows (DATA)")
    train_rows, val_rows = training_rows(opts, emit, world)
    seed_everything(opts.seed)
    net, tokenizer_dir, name = build_model(opts, world.main, resume_from)
    if world.main:
        keep_tokenizer(run_dir, tokenizer_dir)
    world.barrier()
    tokenizer_dir = run_dir / "tokenizer"
    train_set, val_set = datasets(opts, net.cfg, train_rows, val_rows)
    if opts.init and resume_from is None:
        calibrate_encoder(net, train_set)

    net = net.to(device)
    freeze(net, opts.freeze)
    train_mode(net)
    optimizer = optimizer_for(net, opts)
    sampler = EpochSampler(train_set, world.size, world.rank, opts.seed)
    per_epoch = math.ceil(sampler.num_samples / opts.batch_size)
    total = opts.max_steps or max(1, math.ceil(opts.epochs * per_epoch / opts.grad_accum))
    warmup = opts.warmup_steps if opts.warmup_steps is not None else max(1, total // 20)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: lr_factor(s, warmup, total, opts.min_lr_ratio))

    pos = Position()
    seed_everything(opts.seed + world.rank)  # dropout differs between processes
    if resume_from is not None:
        pos = _restore(resume_from, optimizer, scheduler, world)
        if world.main:
            truncate_metrics(run_dir, pos.step)
    model = TrainingView(net)
    if world.size > 1:
        from torch.nn.parallel import DistributedDataParallel

        model = DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
    bf16 = device.type == "cuda" and torch.cuda.is_bf16_supported()
    autocast = (lambda: torch.autocast("cuda", dtype=torch.bfloat16)) if bf16 else contextlib.nullcontext

    emit({"event": "start", "model": name, "device": str(device), "world_size": world.size,
          "parameters": sum(p.numel() for p in net.parameters()),
          "trainable": sum(p.numel() for p in net.parameters() if p.requires_grad),
          "frozen": opts.frozen_parts, "rows": len(train_set), "val_rows": len(val_set) if val_set else 0,
          "step": pos.step, "total": total, "rows_per_step": opts.batch_size * opts.grad_accum * world.size,
          "run_dir": str(run_dir), "resumed": resume_from is not None})
    return _Run(opts, world, device, emit, run_dir, net, model, Tokenizer(tokenizer_dir), tokenizer_dir, optimizer,
                scheduler, train_set, val_set, sampler, autocast, total, per_epoch, pos,
                checkpoint=resume_from)


def _optimizer_step(r: _Run, stream) -> list[int]:
    """grad_accum micro-batches, then one clipped AdamW step; returns the rows read."""
    t0 = time.perf_counter()
    step_loss, rows, consumed = 0.0, 0, []
    for micro in range(r.opts.grad_accum):
        epoch, index, batch = next(stream)
        consumed += batch["index"].tolist()
        # DDP averages gradients on the last micro-batch's backward only
        sync = micro == r.opts.grad_accum - 1 or r.world.size == 1
        with contextlib.nullcontext() if sync else r.model.no_sync():
            loss = _micro_step(r, batch)
            (loss / r.opts.grad_accum).backward()
        step_loss += loss.item() / r.opts.grad_accum
        rows += len(batch["answer"])
    if r.opts.grad_clip > 0:
        nn.utils.clip_grad_norm_([p for p in r.net.parameters() if p.requires_grad], r.opts.grad_clip)
    lr = r.optimizer.param_groups[0]["lr"]
    r.optimizer.step()
    r.scheduler.step()
    r.optimizer.zero_grad(set_to_none=True)

    pos = r.pos
    pos.step += 1
    pos.epoch, pos.batch = (epoch + 1, 0) if index + 1 == r.per_epoch else (epoch, index + 1)
    seconds = time.perf_counter() - t0
    pos.seconds += seconds
    w = r.window
    w[0], w[1], w[2], w[3] = w[0] + step_loss, w[1] + rows * r.world.size, w[2] + 1, w[3] + seconds
    r.last["lr"] = lr
    r.emit({"event": "step", "step": pos.step, "total": r.total, "loss": step_loss, "lr": lr, "eta": _eta(r)})
    return consumed


def _micro_step(r: _Run, batch: dict) -> torch.Tensor:
    from mellow_cli.model.mellow import tokenize_prompts

    cfg = r.net.cfg
    prompt = tokenize_prompts(r.tokenizer, batch["question"], cfg)
    ids, mask = encode_answers(r.tokenizer, batch["answer"], cfg, r.opts.max_answer_tokens)
    args = (batch["wav1"], batch["wav2"], prompt, ids, mask)
    with r.autocast():
        return r.model(*(a.to(r.device, non_blocking=True) for a in args))


def _eta(r: _Run) -> float:
    return (r.total - r.pos.step) * r.pos.seconds / max(1, r.pos.step)


def _log(r: _Run) -> None:
    """A metrics row for the steps since the last one: mean loss (over every process), lr, and
    samples/s over the time spent in steps (data waits included, validation not)."""
    loss, rows, steps, seconds = r.window
    r.last["loss"] = r.world.mean(loss / steps, r.device)
    r.last["samples_per_s"] = rows / seconds if seconds > 0 else 0.0
    pos = r.pos
    row = {"event": "train", "step": pos.step, "epoch": round(pos.epoch + pos.batch / r.per_epoch, 4),
           "loss": r.last["loss"], "lr": r.last["lr"], "samples_per_s": r.last["samples_per_s"],
           "time": round(pos.seconds, 3), "unix": time.time()}
    if r.world.main:
        append_metrics(r.run_dir, row)
    r.emit({**row, "total": r.total, "eta": _eta(r)})
    r.window[:] = [0.0, 0, 0, 0.0]


def _validate(r: _Run) -> bool:
    """Validation metrics logged; True when the loss is the run's best so far."""
    metrics = evaluate(r.net, r.val_set, r.tokenizer, r.opts, r.world, r.device, r.autocast)
    r.last.update(metrics)
    pos = r.pos
    best = pos.best_val is None or metrics["val_loss"] < pos.best_val
    if best:
        pos.best_val, pos.best_step = metrics["val_loss"], pos.step
    row = {"event": "val", "step": pos.step, **metrics, "best": best, "time": round(pos.seconds, 3),
           "unix": time.time()}
    if r.world.main:
        append_metrics(r.run_dir, row)
    r.emit(row)
    return best


def _finish(r: _Run) -> TrainResult:
    digest = _check_replicas(r.net, r.world, r.run_dir if r.opts.trace else None)
    result = TrainResult(steps=r.pos.step, checkpoint=r.checkpoint or checkpoints(r.run_dir)[-1],
                         best=r.run_dir / CHECKPOINTS / "best" if r.pos.best_step is not None else None,
                         loss=r.last["loss"], val_loss=r.last["val_loss"], val_accuracy=r.last["val_accuracy"],
                         samples_per_s=r.last["samples_per_s"], seconds=r.pos.seconds)
    r.emit({"event": "done", **dataclasses.asdict(result), "digest": digest})
    return result


def _absolute(opts: TrainOptions) -> TrainOptions:
    """Paths made absolute, so a run resumes from any working directory."""
    paths = {k: os.path.abspath(v) for k in ("data", "out", "val", "audio_root", "tokenizer")
             if (v := getattr(opts, k)) is not None}
    if os.path.exists(opts.model):
        paths["model"] = os.path.abspath(opts.model)
    return dataclasses.replace(opts, **paths)


def _prepare_run_dir(opts: TrainOptions, run_dir: Path, world: World) -> tuple[TrainOptions, Path | None]:
    """A new run needs a folder without checkpoints or metrics; --resume needs one with them, the
    same rows and the same number of processes."""
    if run_dir.exists() and not run_dir.is_dir():
        raise UsageError(f"{run_dir}: is a file; --out names the run's folder")
    found = checkpoints(run_dir) if run_dir.is_dir() else []
    if not opts.resume:
        if found:
            raise UsageError(f"{run_dir} already holds a run (last checkpoint {found[-1].name}): pass --resume "
                             "to continue it, or another --out")
        if (run_dir / METRICS).exists():
            raise UsageError(f"{run_dir} holds {METRICS} from an earlier run that left no checkpoint: delete it, "
                             "or choose another --out")
        if world.main:
            run_dir.mkdir(parents=True, exist_ok=True)
        world.barrier()
        return opts, None
    if not found:
        raise UsageError(f"{run_dir}: no checkpoint to resume from (a run folder holds {CHECKPOINTS}/step-*)")
    if world.main:
        clean_stale(run_dir)
    trainer = read_trainer(found[-1])
    if trainer.get("world_size", 1) != world.size:
        raise MellowError(f"{found[-1]} was written by {trainer.get('world_size', 1)} processes; resume it with "
                          f"the same number (torchrun --nproc-per-node {trainer.get('world_size', 1)})")
    opts = resumed_options(trainer.get("options", {}), opts)
    _check_same_inputs(trainer, opts, found[-1])
    return opts, found[-1]


def _inputs(opts: TrainOptions) -> dict:
    """What a bit-exact resume needs unchanged beside the options: the rows' bytes and the
    thread count (float sums are reordered by another one)."""
    from mellow_cli.files import sha256

    rows = {name: sha256(path) for name in ("data", "val") if (path := getattr(opts, name)) and os.path.isfile(path)}
    return {"sha256": rows, "threads": torch.get_num_threads()}


def _check_same_inputs(trainer: dict, opts: TrainOptions, checkpoint: Path) -> None:
    saved = trainer.get("inputs")
    if not isinstance(saved, dict):
        return  # written before inputs were recorded
    now = _inputs(opts)
    for name, digest in saved.get("sha256", {}).items():
        if now["sha256"].get(name) != digest:
            raise UsageError(f"--resume: {getattr(opts, name)} changed since {checkpoint.name} was written; the run's "
                             "epochs and positions refer to the old rows: restore them, or start a new run")
    if saved.get("threads") not in (None, now["threads"]):
        from mellow_cli import render

        render.warn(f"resuming with {now['threads']} threads where the run used {saved['threads']}: the result "
                    f"will not be bit-identical to an uninterrupted run (--threads {saved['threads']} makes it so)")


def _restore(checkpoint: Path, optimizer, scheduler, world: World) -> Position:
    trainer = read_trainer(checkpoint)
    try:
        state = torch.load(checkpoint / "state.pt", map_location="cpu", weights_only=True)
    except Exception as e:
        raise MellowError(f"{checkpoint / 'state.pt'}: cannot read the optimizer state ({e})") from None
    optimizer.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    set_rng_state(state["rng"][world.rank])
    p = trainer["position"]
    return Position(step=trainer["step"], epoch=p["epoch"], batch=p["batch"], seconds=trainer.get("seconds", 0.0),
                    best_step=trainer.get("best", {}).get("step"), best_val=trainer.get("best", {}).get("val_loss"))


def _save(r: _Run) -> Path:
    """Every process hands in its RNG state; rank 0 writes the checkpoint and prunes old ones."""
    from mellow_cli import __version__

    rngs = r.world.gather(rng_state())
    pos = r.pos
    path = r.run_dir / CHECKPOINTS / step_name(pos.step)
    if r.world.main:
        trainer = {"step": pos.step, "position": {"epoch": pos.epoch, "batch": pos.batch},
                   "seconds": pos.seconds, "world_size": r.world.size, "metrics": r.last,
                   "best": {"step": pos.best_step, "val_loss": pos.best_val},
                   "options": dataclasses.asdict(r.opts), "inputs": _inputs(r.opts), "mellow_cli": __version__,
                   "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
        state = {"optimizer": r.optimizer.state_dict(), "scheduler": r.scheduler.state_dict(), "rng": rngs}
        path = write_checkpoint(r.run_dir, pos.step, r.net, r.tokenizer_dir, trainer, state)
        if pos.best_step == pos.step:
            mark_best(r.run_dir, path)
        prune(r.run_dir, r.opts.keep, pos.best_step)
    r.world.barrier()
    return path


def _check_replicas(net, world: World, trace_dir: Path | None) -> str:
    """Every process must end with the same weights; a mismatch is a bug worth stopping for."""
    digest = weights_digest(net)
    if trace_dir is not None:
        with open(trace_dir / f"trace-rank{world.rank}.jsonl", "a") as f:
            f.write(json.dumps({"rank": world.rank, "final_sha256": digest}) + "\n")
    digests = world.gather(digest)
    if len(set(digests)) > 1:
        raise MellowError(f"the {world.size} processes ended with different weights: {digests}")
    return digest
