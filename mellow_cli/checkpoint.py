"""A training checkpoint's contents and the rules for starting or resuming a run folder.

runs.py owns the folder layout and writes the files; this module decides what goes in them:
trainer.json (step, place in the epoch, seconds, metrics, best, the options, the inputs' digests)
and state.pt (optimizer, scheduler, the adaptive clipping's running norms when used, every
process's RNG states). Restoring all of them and the position inside the epoch makes an
interrupted run end with exactly the weights of an uninterrupted one.
"""

from __future__ import annotations

import dataclasses
import os
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from mellow_cli.errors import MellowError, UsageError
from mellow_cli.recipe import TrainOptions, resumed_options
from mellow_cli.runs import (
    CHECKPOINTS,
    METRICS,
    checkpoints,
    clean_stale,
    mark_best,
    prune,
    read_trainer,
    rng_state,
    set_rng_state,
    step_name,
    write_checkpoint,
)
from mellow_cli.world import World


@dataclass
class Position:
    """Where the run is: optimizer steps done, and the next micro-batch to read."""

    step: int = 0
    epoch: int = 0
    batch: int = 0  # micro-batches of `epoch` already consumed by this process
    seconds: float = 0.0  # training time so far, across resumes
    best_step: int | None = None
    best_val: float | None = None


def absolute(opts: TrainOptions) -> TrainOptions:
    """Paths made absolute, so a run resumes from any working directory."""
    paths = {k: os.path.abspath(v) for k in ("out", "val", "audio_root", "tokenizer", "encoder_weights")
             if (v := getattr(opts, k)) is not None and (k != "encoder_weights" or os.path.exists(v))}
    if isinstance(opts.data, str):
        paths["data"] = os.path.abspath(opts.data)
    elif opts.data is not None:
        paths["data"] = tuple(os.path.abspath(p) for p in opts.data)
    for k in ("model", "lm_weights"):
        if os.path.exists(getattr(opts, k)):
            paths[k] = os.path.abspath(getattr(opts, k))
    return dataclasses.replace(opts, **paths)


def prepare_run_dir(opts: TrainOptions, run_dir: Path, world: World) -> tuple[TrainOptions, Path | None]:
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


def _input_files(opts: TrainOptions) -> dict[str, str]:
    """{name: path} of the rows: "data" (then "data#2", ...) and "val"."""
    files = {("data" if i == 0 else f"data#{i + 1}"): p for i, p in enumerate(opts.data_files)}
    if opts.val:
        files["val"] = opts.val
    return files


def _inputs(opts: TrainOptions) -> dict:
    """What a bit-exact resume needs unchanged beside the options: the rows' bytes and the
    thread count (float sums are reordered by another one)."""
    from mellow_cli.files import sha256

    rows = {name: sha256(path) for name, path in _input_files(opts).items() if os.path.isfile(path)}
    return {"sha256": rows, "threads": torch.get_num_threads()}


def _check_same_inputs(trainer: dict, opts: TrainOptions, checkpoint: Path) -> None:
    saved = trainer.get("inputs")
    if not isinstance(saved, dict):
        return  # written before inputs were recorded
    now, files = _inputs(opts), _input_files(opts)
    for name, digest in saved.get("sha256", {}).items():
        if now["sha256"].get(name) != digest:
            raise UsageError(f"--resume: {files.get(name, name)} changed since {checkpoint.name} was written; the "
                             "run's epochs and positions refer to the old rows: restore them, or start a new run")
    if saved.get("threads") not in (None, now["threads"]):
        from mellow_cli import render

        render.warn(f"resuming with {now['threads']} threads where the run used {saved['threads']}: the result "
                    f"will not be bit-identical to an uninterrupted run (--threads {saved['threads']} makes it so)")


def restore(checkpoint: Path, world: World) -> tuple[Position, dict]:
    """The position and state.pt of `checkpoint`, this process's RNG states already set."""
    trainer = read_trainer(checkpoint)
    try:
        state = torch.load(checkpoint / "state.pt", map_location="cpu", weights_only=True)
    except Exception as e:
        raise MellowError(f"{checkpoint / 'state.pt'}: cannot read the optimizer state ({e})") from None
    set_rng_state(state["rng"][world.rank])
    p = trainer["position"]
    pos = Position(step=trainer["step"], epoch=p["epoch"], batch=p["batch"], seconds=trainer.get("seconds", 0.0),
                   best_step=trainer.get("best", {}).get("step"), best_val=trainer.get("best", {}).get("val_loss"))
    return pos, state


def save(run_dir: Path, net, tokenizer_dir: Path, opts: TrainOptions, pos: Position, world: World,
         metrics: dict, state: dict) -> Path:
    """Every process hands in its RNG state; rank 0 writes the checkpoint (state.pt: `state` and
    the RNG states) and prunes old ones."""
    from mellow_cli import __version__

    rngs = world.gather(rng_state())
    path = run_dir / CHECKPOINTS / step_name(pos.step)
    if world.main:
        trainer = {"step": pos.step, "position": {"epoch": pos.epoch, "batch": pos.batch},
                   "seconds": pos.seconds, "world_size": world.size, "metrics": metrics,
                   "best": {"step": pos.best_step, "val_loss": pos.best_val},
                   "options": dataclasses.asdict(opts), "inputs": _inputs(opts), "mellow_cli": __version__,
                   "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
        path = write_checkpoint(run_dir, pos.step, net, tokenizer_dir, trainer, {**state, "rng": rngs})
        if pos.best_step == pos.step:
            mark_best(run_dir, path)
        prune(run_dir, opts.keep, pos.best_step)
    world.barrier()
    return path
