"""Fine-tuning a model of any family: the training loop, validation, and data-parallel training
under torchrun.

The run is put together from one module per concern: recipe.py (the options and the two recipes
that preset them), objective.py (the loss), optim.py (optimizer, schedule, clipping), starting.py
(the weights a run starts from), data.py and datasets.py (rows, datasets, the seeded order), view.py
(the training view of each row's prefix and answer), checkpoint.py
(what a checkpoint holds, starting and resuming a run folder) and world.py (torchrun).

The loop follows nanoGPT: gradient accumulation, bf16 autocast on CUDA and float32 on a CPU, a
metrics row every few steps, validation and checkpoints on their own schedules. Under torchrun
every process holds a replica wrapped in DistributedDataParallel (gloo on CPU, NCCL on GPU), reads
its share of each epoch's seeded permutation, and only rank 0 writes checkpoints, metrics and
progress. Nothing here prints: `run` reports events to a callback (cli_train.py draws them), so a
script can call it too.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from mellow_cli.train import checkpoint as ckpt
from mellow_cli.train.checkpoint import Position
from mellow_cli.errors import MellowError, UsageError
from mellow_cli.train.objective import (  # noqa: F401  (the objective's names, re-exported)
    IGNORE,
    TrainingView,
    answer_logits,
    answer_loss,
    encode_answers,
    encode_prompts,
    row_logits,
    rows_loss,
    token_loss,
)
from mellow_cli.train.optim import (  # noqa: F401
    AdaptiveClip,
    clip_gradients,
    freeze,
    lr_factor,
    optimizer_for,
    scheduler_for,
    train_mode,
)
from mellow_cli.train.recipe import (  # noqa: F401
    FREEZABLE,
    RESUMABLE_CHANGES,
    TrainOptions,
    parse_freeze,
    resumed_options,
)
from mellow_cli.train.runs import (
    CHECKPOINTS,
    append_metrics,
    checkpoints,
    keep_tokenizer,
    seed_everything,
    truncate_metrics,
    weights_digest,
)
from mellow_cli.train.starting import (  # noqa: F401
    build_model,
    calibrate_encoder,
    check_family,
    fresh_model,
    start_tokenizer,
)
from mellow_cli.train.datasets import EpochSampler, datasets, for_family, loader, training_rows
from mellow_cli.train.world import World, start_world, stop_world


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


# One thing a run reports, a JSON-able dict with an "event" key naming its kind: checking /
# checked / checked_all (the data's clips read, train_data.py), note, start (model, rows, steps),
# step (each optimizer step: loss, lr, eta), train and val (the metrics rows of metrics.jsonl),
# checkpoint (path, best), done (TrainResult's fields). `mellow train --json` prints them as they
# are, one a line; cli_train.py draws them otherwise.
Event = dict[str, object]
Report = Callable[[Event], None]


@dataclass
class Interval:
    """What the steps since the last metrics row add up to."""

    loss: float = 0.0  # the sum of their losses
    rows: int = 0  # training rows, over every process
    steps: int = 0
    seconds: float = 0.0  # time spent in them (data waits included, validation not)


# --- validation ----------------------------------------------------------------------------------


@torch.no_grad()
def evaluate(net, dataset, tokenizer, opts: TrainOptions, world: World, device, autocast) -> dict:
    """Token-weighted answer loss over the validation rows, and accuracy on the rows that have
    choices (each choice scored by its likelihood with the end of text, as Model.choose)."""
    from mellow_cli.models.family import family_of
    from mellow_cli.runtime.generate import score_choices
    from mellow_cli.runtime.prefix import Prefix

    cfg = net.cfg
    family = family_of(cfg)
    net.eval()
    share = list(range(world.rank, len(dataset), world.size))
    loss_sum = tokens = correct = asked = 0.0
    for batch in loader(dataset, share, opts, device, opts.seed):
        prompts = encode_prompts(family, tokenizer, batch["question"], cfg, opts.text)
        ids, mask = encode_answers(tokenizer, batch["answer"], cfg, opts.max_answer_tokens, opts.text)
        ids, mask = ids.to(device), mask.to(device)
        with autocast():
            rows = family.training_rows(net, _on(device, batch["clips"]), prompts)
            loss_sum += token_loss(row_logits(net.lm, rows, ids), ids, mask, "sum").item()
        tokens += mask.sum().item()
        with_choices = [i for i, c in enumerate(batch["choices"]) if c]
        if with_choices:
            prefix = Prefix.of([rows[i] for i in with_choices]).to(torch.float32)
            scored = score_choices(net.lm, tokenizer, prefix,
                                   [list(batch["choices"][i]) for i in with_choices],
                                   append_eos=True, eos_id=cfg.eos_token_id)
            for i, row in zip(with_choices, scored):
                picked = max(row, key=lambda s: s.logprob).text
                correct += _same_answer(picked, batch["answer"][i])
                asked += 1
    loss_sum, tokens, correct, asked = world.sum([loss_sum, tokens, correct, asked], device)
    train_mode(net, opts.encoder_mode)
    return {"val_loss": loss_sum / max(tokens, 1), "val_accuracy": correct / asked if asked else None,
            "val_choice_rows": int(asked)}


def _same_answer(a: str, b: str) -> bool:
    return a.strip().casefold() == b.strip().casefold()


def _on(device, clips: list) -> list[list[torch.Tensor]]:
    """Each row's clips on `device`."""
    return [[c.to(device, non_blocking=True) for c in row] for row in clips]


# --- the loop ------------------------------------------------------------------------------------


def batches(dataset, sampler, opts, device, pos: Position) -> Iterator[tuple[int, int, dict]]:
    """(epoch, batch index, batch) from `pos` on, epoch after epoch, forever."""
    epoch, start = pos.epoch, pos.batch
    while True:
        dataset.set_epoch(epoch)
        sampler.set_position(epoch, start * opts.batch_size)
        for i, batch in enumerate(loader(dataset, sampler, opts, device, opts.seed + epoch, opts.drop_last), start):
            yield epoch, i, batch
        epoch, start = epoch + 1, 0


def run(opts: TrainOptions, report: Report | None = None) -> TrainResult:
    """Train as `opts` say; `report(event)` is called on rank 0 with each Event as it happens."""
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
    family: object  # models/family.py's Family of the net
    model: nn.Module  # TrainingView, wrapped in DistributedDataParallel under torchrun
    tokenizer: object  # the family's, in model ids
    tokenizer_dir: Path
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    clip: AdaptiveClip | None  # the adaptive clipping's running norms (None: global clipping)
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
    interval: Interval = dataclasses.field(default_factory=Interval)  # since the last metrics row


def _run(opts: TrainOptions, world: World, device: torch.device, emit: Report) -> TrainResult:
    r = _setup(opts, world, device, emit)
    stream = batches(r.train_set, r.sampler, r.opts, device, r.pos)
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
    from mellow_cli.models.family import family_of

    opts = ckpt.absolute(opts)
    run_dir = Path(opts.out)
    opts, resume_from = ckpt.prepare_run_dir(opts, run_dir, world)
    if opts.data is None:
        raise UsageError("give the training rows (DATA)")
    tokenizer_dir = start_tokenizer(opts, world.main, resume_from)  # before any clip is decoded
    train_rows, val_rows = training_rows(opts, emit, world)
    seed_everything(opts.seed)
    net, tokenizer_dir, name = build_model(opts, world.main, resume_from, tokenizer_dir)
    if world.main:
        keep_tokenizer(run_dir, tokenizer_dir, resumed=resume_from is not None)
    world.barrier()
    tokenizer_dir = run_dir / "tokenizer"
    family = family_of(net.cfg)
    check_family(opts, family)
    tokenizer = family.tokenizer(tokenizer_dir, net.cfg)
    train_rows, val_rows = (for_family(rows, family, tokenizer, net.cfg, opts, emit) for rows in (train_rows, val_rows))
    train_set, val_set = datasets(opts, net.cfg, train_rows, val_rows)
    if opts.init and opts.init != "pretrained" and resume_from is None:
        calibrate_encoder(net, train_set)

    net = net.to(device)
    freeze(net, opts.freeze)
    train_mode(net, opts.encoder_mode)
    optimizer = optimizer_for(net, opts)
    sampler = EpochSampler(train_set, world.size, world.rank, opts.seed, opts.drop_last)
    per_epoch = (math.floor if opts.drop_last else math.ceil)(sampler.num_samples / opts.batch_size)
    if per_epoch == 0:
        raise UsageError(f"{len(train_set)} training rows make no full batch of {opts.batch_size} per process "
                         "(--drop-last): use a smaller --batch-size")
    total = opts.max_steps or max(1, math.ceil(opts.epochs * per_epoch / opts.grad_accum))
    scheduler = scheduler_for(optimizer, opts, total, max(1, per_epoch // opts.grad_accum))
    clip = AdaptiveClip(opts.grad_clip) if opts.clip == "adaptive" else None

    pos = Position()
    seed_everything(opts.seed + world.rank)  # dropout differs between processes
    if resume_from is not None:
        pos, state = ckpt.restore(resume_from, world)
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        if clip is not None:
            clip.load_state_dict(state.get("clip", {}))
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
    return _Run(opts, world, device, emit, run_dir, net, family, model, tokenizer, tokenizer_dir, optimizer,
                scheduler, clip, train_set, val_set, sampler, autocast, total, per_epoch, pos,
                checkpoint=resume_from)


def _optimizer_step(r: _Run, stream) -> list[int]:
    """grad_accum micro-batches, then one clipped optimizer step; returns the rows read."""
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
    if not math.isfinite(r.world.sum([step_loss], r.device)[0]):  # every process stops together
        raise MellowError(f"step {r.pos.step + 1}: the training loss is NaN or infinite; stopped before the "
                          f"weights took that step ({_last_good(r)}); a lower --lr may help")
    clip_gradients(r.net, r.opts, r.clip)
    lr = r.optimizer.param_groups[0]["lr"]
    r.optimizer.step()
    r.scheduler.step()
    r.optimizer.zero_grad(set_to_none=True)

    pos = r.pos
    pos.step += 1
    pos.epoch, pos.batch = (epoch + 1, 0) if index + 1 == r.per_epoch else (epoch, index + 1)
    seconds = time.perf_counter() - t0
    pos.seconds += seconds
    span = r.interval
    span.loss, span.rows, span.steps, span.seconds = (span.loss + step_loss, span.rows + rows * r.world.size,
                                                      span.steps + 1, span.seconds + seconds)
    r.last["lr"] = lr
    r.emit({"event": "step", "step": pos.step, "total": r.total, "loss": step_loss, "lr": lr, "eta": _eta(r)})
    return consumed


def _micro_step(r: _Run, batch: dict) -> torch.Tensor:
    cfg = r.net.cfg
    prompts = encode_prompts(r.family, r.tokenizer, batch["question"], cfg, r.opts.text)
    ids, mask = encode_answers(r.tokenizer, batch["answer"], cfg, r.opts.max_answer_tokens, r.opts.text)
    with r.autocast():
        return r.model(_on(r.device, batch["clips"]), prompts, ids.to(r.device, non_blocking=True),
                       mask.to(r.device, non_blocking=True))


def _eta(r: _Run) -> float:
    return (r.total - r.pos.step) * r.pos.seconds / max(1, r.pos.step)


def _log(r: _Run) -> None:
    """A metrics row for the steps since the last one: mean loss (over every process), lr, and
    samples/s over the time spent in steps (data waits included, validation not)."""
    span = r.interval
    r.last["loss"] = r.world.mean(span.loss / span.steps, r.device)
    r.last["samples_per_s"] = span.rows / span.seconds if span.seconds > 0 else 0.0
    pos = r.pos
    row = {"event": "train", "step": pos.step, "epoch": round(pos.epoch + pos.batch / r.per_epoch, 4),
           "loss": r.last["loss"], "lr": r.last["lr"], "samples_per_s": r.last["samples_per_s"],
           "time": round(pos.seconds, 3), "unix": time.time()}
    if r.world.main:
        append_metrics(r.run_dir, row)
    r.emit({**row, "total": r.total, "eta": _eta(r)})
    r.interval = Interval()


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


def _last_good(r: _Run) -> str:
    return f"the last checkpoint is {r.checkpoint}" if r.checkpoint else "no checkpoint was written"


def _save(r: _Run) -> Path:
    # A finite loss can still come with an update that overflows the weights: such weights are
    # never saved as a checkpoint (every process holds the same ones, so all stop together).
    if not all(torch.isfinite(p).all() for p in r.net.parameters()):
        raise MellowError(f"step {r.pos.step}: the weights became NaN or infinite, so no checkpoint is written for "
                          f"it ({_last_good(r)}); a lower --lr may help")
    state = {"optimizer": r.optimizer.state_dict(), "scheduler": r.scheduler.state_dict()}
    if r.clip is not None:
        state["clip"] = r.clip.state_dict()
    return ckpt.save(r.run_dir, r.net, r.tokenizer_dir, r.opts, r.pos, r.world, r.last, state)
