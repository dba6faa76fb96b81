"""A training checkpoint's contents and the rules for starting or resuming a run folder.

runs.py owns the folder layout and writes the files; this module decides what goes in them:
trainer.json (step, place in the epoch, seconds, metrics, best, the options, the inputs' digests)
and state.pt (optimizer, scheduler, the adaptive clipping's running norms when used, every
process's RNG states). Restoring all of them and the position inside the epoch makes an
interrupted run end with exactly the weights of an uninterrupted one.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import time
import types
import typing
from dataclasses import dataclass
from pathlib import Path

import torch

from mellow_cli.errors import MellowError, UsageError
from mellow_cli.train.recipe import BOUNDS, CHOICES, FREEZABLE, TrainOptions, resumed_options
from mellow_cli.train.runs import (
    CHECKPOINTS,
    METRICS,
    checkpoints,
    clean_stale,
    mark,
    prune,
    read_trainer,
    rng_state,
    set_rng_state,
    step_name,
    write_checkpoint,
)
from mellow_cli.train.world import World


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
    trainer = read_record(found[-1])
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
        from mellow_cli import events

        events.warn(f"resuming with {now['threads']} threads where the run used {saved['threads']}: the result "
                    f"will not be bit-identical to an uninterrupted run (--threads {saved['threads']} makes it so)")


# --- trainer.json as read back: every field the resume uses has the type it was written with ----


def read_record(checkpoint: Path) -> dict:
    """`checkpoint`'s trainer.json, every field a resume reads checked (a hand-edited file is a
    one-line error naming the file and the field, never a crash half-way into the resume)."""
    trainer = read_trainer(checkpoint)
    where = checkpoint / "trainer.json"
    _expect(where, "step", trainer.get("step"), int, 0)
    for key in ("epoch", "batch"):
        _expect(where, f"position.{key}", _expect(where, "position", trainer.get("position"), dict).get(key), int, 0)
    _expect(where, "seconds", trainer.get("seconds", 0.0), float, 0)
    _expect(where, "world_size", trainer.get("world_size", 1), int, 1)
    best = _expect(where, "best", trainer.get("best", {}), dict)
    _expect(where, "best.step", best.get("step"), int | None, 0)
    _expect(where, "best.val_loss", best.get("val_loss"), float | None)
    _check_options(where, _expect(where, "options", trainer.get("options", {}), dict))
    inputs = _expect(where, "inputs", trainer.get("inputs"), dict | None) or {}
    for name, digest in _expect(where, "inputs.sha256", inputs.get("sha256", {}), dict).items():
        _expect(where, f"inputs.sha256.{name}", digest, str)
    _expect(where, "inputs.threads", inputs.get("threads"), int | None, 1)
    return trainer


def _check_options(where: Path, saved: dict) -> None:
    """The saved options: each of the type TrainOptions declares, within recipe.BOUNDS, one of
    recipe.CHOICES."""
    hints = typing.get_type_hints(TrainOptions)
    for name, value in saved.items():
        if name not in hints:
            continue  # an option of another version: resumed_options leaves it out
        low, high = BOUNDS.get(name, (None, None))
        _expect(where, f"options.{name}", value, hints[name], low, high)
        allowed = CHOICES.get(name) or (FREEZABLE if name == "freeze" else None)
        given = value if name == "freeze" else [value]
        if allowed and not all(v in allowed for v in given):
            raise MellowError(f"{where}: options.{name} is {value!r}, not one of {', '.join(allowed)}")
        if name == "betas" and not all(0 <= b < 1 for b in value):
            raise MellowError(f"{where}: options.betas is {value!r}; each must be in [0, 1)")


def _expect(where: Path, field: str, value, kind, low=None, high=None):
    """`value` itself when it is of `kind` (a type hint: int, float, str, dict, X | None, tuple[X,
    ...]) and, if a number, within [low, high]; else a MellowError naming the file and the field."""
    from mellow_cli.io.inputs import json_kind

    if not _fits(value, kind):
        found = json_kind(value)
        raise MellowError(f"{where}: {field} is {json.dumps(value)[:40]} ({'an' if found == 'object' else 'a'} "
                          f"{found}), not {_kind_name(kind)}")
    number = isinstance(value, (int, float)) and not isinstance(value, bool)
    if number and ((low is not None and value < low) or (high is not None and value > high)):
        span = f"at least {low:g}" if high is None else f"in [{low:g}, {high:g}]"
        raise MellowError(f"{where}: {field} is {value!r}, not {span}")
    return value


def _fits(value, kind) -> bool:
    args = typing.get_args(kind)
    if isinstance(kind, types.UnionType) or typing.get_origin(kind) is typing.Union:
        return any(_fits(value, k) for k in args)
    if typing.get_origin(kind) is tuple:
        if not isinstance(value, (list, tuple)):
            return False
        if len(args) == 2 and args[1] is Ellipsis:
            return all(_fits(v, args[0]) for v in value)
        return len(value) == len(args) and all(_fits(v, k) for v, k in zip(value, args))
    if kind is type(None):
        return value is None
    if kind is bool:
        return isinstance(value, bool)
    if kind in (int, float):  # JSON writes a whole float as 1.0, and an int is a float
        whole = isinstance(value, int) or (kind is float and isinstance(value, float) and math.isfinite(value))
        return whole and not isinstance(value, bool)
    return isinstance(value, kind)


def _kind_name(kind) -> str:
    names = {int: "a whole number", float: "a number", str: "a string", bool: "true or false", dict: "an object",
             type(None): "null"}
    if kind in names:
        return names[kind]
    if typing.get_origin(kind) is tuple:
        return "a list"
    return " or ".join(_kind_name(k) for k in typing.get_args(kind))


def restore(checkpoint: Path, world: World) -> tuple[Position, dict]:
    """The position and state.pt of `checkpoint`, this process's RNG states already set."""
    trainer = read_record(checkpoint)
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
    from mellow_cli.version import __version__

    rngs = world.gather(rng_state())
    path = run_dir / CHECKPOINTS / step_name(pos.step)
    if world.main:
        trainer = {"step": pos.step, "position": {"epoch": pos.epoch, "batch": pos.batch},
                   "seconds": pos.seconds, "world_size": world.size, "metrics": metrics,
                   "best": {"step": pos.best_step, "val_loss": pos.best_val},
                   "options": dataclasses.asdict(opts), "inputs": _inputs(opts), "mellow_cli": __version__,
                   "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
        path = write_checkpoint(run_dir, pos.step, net, tokenizer_dir, trainer, {**state, "rng": rngs})
        mark(run_dir, path, "last")
        # Without validation nothing ranks the checkpoints: `best` is the newest, so that
        # `--model RUN/checkpoints/best` works for every run.
        if pos.best_step == pos.step or not (opts.val or opts.val_fraction):
            mark(run_dir, path, "best")
        prune(run_dir, opts.keep, pos.best_step)
    world.barrier()
    return path
