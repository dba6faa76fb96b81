"""The run folder `mellow train` leaves behind, and the state that makes a run resumable.

    RUN_DIR/
      metrics.jsonl                 one JSON object per event (train, val), appended as they happen
      checkpoints/step-000123/      a model folder (`--model` loads it) plus the trainer's state:
        model.safetensors           weights under the official key names, the tied head once
        config.json                 the model's config (models/family.py's config_dict)
        tokenizer.json, tokenizer_config.json
        trainer.json                step, place in the epoch, metrics, best, options
        state.pt                    optimizer, scheduler, every process's RNG states (plain
                                    tensors and tuples: torch.load(weights_only=True) reads it)
      checkpoints/last -> step-...  the newest checkpoint (a copy where symlinks fail)
      checkpoints/best -> step-...  the lowest validation loss; without validation, the newest

A checkpoint is written in a hidden folder and renamed into place, so a crash or a SIGKILL leaves
the previous checkpoints whole and at most a `.step-*.tmp-*` folder, removed on resume.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import random
import shutil
from pathlib import Path

import numpy as np
import torch

from mellow_cli.errors import MellowError
from mellow_cli.files import first_line, text_lines
from mellow_cli.models.family import config_dict

CHECKPOINTS = "checkpoints"
METRICS = "metrics.jsonl"


# --- RNG state -----------------------------------------------------------------------------------


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def rng_state() -> dict:
    """This process's RNG states as plain tensors and tuples (torch.load(weights_only=True) reads
    them back)."""
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    state = {"python": random.getstate(), "numpy": (kind, torch.from_numpy(keys.astype(np.int64)), pos, has_gauss, gauss),
             "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    kind, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


# --- checkpoints ---------------------------------------------------------------------------------


def step_name(step: int) -> str:
    return f"step-{step:06d}"


def checkpoints(run_dir: Path) -> list[Path]:
    """Complete checkpoints (a folder appears only once whole), oldest first."""
    root = run_dir / CHECKPOINTS
    found = [p for p in root.glob("step-*") if p.is_dir() and not p.is_symlink() and (p / "trainer.json").is_file()]
    return sorted(found, key=lambda p: int(p.name.split("-")[1]))


def model_state(net) -> dict[str, torch.Tensor]:
    """The weights under the official key names, a tensor tied to another (the language model's
    head, its token embedding) once, under its first name, as loading writes them."""
    seen, out = set(), {}
    for k, v in net.state_dict().items():
        if v.numel() and v.data_ptr() in seen:
            continue
        seen.add(v.data_ptr())
        out[k] = v.detach().to("cpu", copy=True).contiguous()
    return out


def write_checkpoint(run_dir: Path, step: int, net, tokenizer_dir: Path, trainer: dict, state: dict) -> Path:
    """RUN/checkpoints/step-NNNNNN/: written in a hidden folder, then renamed into place."""
    root = run_dir / CHECKPOINTS
    root.mkdir(parents=True, exist_ok=True)
    final = root / step_name(step)
    tmp = root / f".{final.name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        _write_files(tmp, net, tokenizer_dir, trainer, state)
        if final.exists():  # the same step written again (a best checkpoint at a save step)
            shutil.rmtree(final)
        os.replace(tmp, final)
        _fsync_dir(root)
    except _Unwritten as e:
        raise _write_failed(run_dir, final, e.name, e.error) from None
    except OSError as e:
        raise _write_failed(run_dir, final, None, e) from None
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return final


class _Unwritten(Exception):
    """One file of a checkpoint that could not be written, and why."""

    def __init__(self, name: str, error: Exception):
        super().__init__(name)
        self.name, self.error = name, error


def _write_files(tmp: Path, net, tokenizer_dir: Path, trainer: dict, state: dict) -> None:
    from safetensors import SafetensorError
    from safetensors.torch import save_file

    from mellow_cli.store.loading import OPTIONAL_TOKENIZER_FILES, TOKENIZER_FILES

    writers = {
        "model.safetensors": lambda p: save_file(model_state(net), str(p), metadata={"format": "pt"}),
        "config.json": lambda p: p.write_text(json.dumps(config_dict(net.cfg), indent=2) + "\n"),
        **{f: (lambda p, f=f: shutil.copyfile(tokenizer_dir / f, p))
           for f in (*TOKENIZER_FILES, *OPTIONAL_TOKENIZER_FILES) if (tokenizer_dir / f).is_file()},
        "state.pt": lambda p: torch.save(state, p),
        "trainer.json": lambda p: p.write_text(json.dumps(trainer, indent=2) + "\n"),
    }
    for name, write in writers.items():
        try:
            write(tmp / name)
            with open(tmp / name, "rb") as fh:
                os.fsync(fh.fileno())
        except (OSError, RuntimeError, SafetensorError) as e:  # torch and safetensors wrap the OS error
            raise _Unwritten(name, e) from None


def _write_failed(run_dir: Path, final: Path, name: str | None, e: Exception) -> MellowError:
    """A checkpoint that could not be written, in one line naming it and the file. torch reports
    a full disk or a file size limit as an "enforce fail ... unexpected pos" from its zip writer
    and safetensors as "(os error N)", so the free space is looked at too."""
    import errno
    import re

    code = getattr(e, "errno", None) or next((int(m) for m in re.findall(r"os error (\d+)", str(e))), None)
    free = shutil.disk_usage(final.parent).free if final.parent.exists() else None
    file = name or "its folder"
    if code in (errno.ENOSPC, errno.EDQUOT) or (free is not None and free < 64 << 20):
        then = ("run again with --resume" if checkpoints(run_dir) else
                f"start the run again, after deleting {run_dir / METRICS} (there is no checkpoint to resume from yet)")
        room = "" if free is None else f"; {free / 1e6:.0f} MB free"
        return MellowError(f"{final}: cannot write the checkpoint, the disk is full (writing {file}{room}); "
                           f"free some space and {then}")
    if code == errno.EFBIG:
        return MellowError(f"{final}: cannot write the checkpoint, {file} would pass the file size limit (ulimit -f)")
    if "unexpected pos" in str(e):
        return MellowError(f"{final}: cannot write the checkpoint, no space left for {file} (or a file size limit)")
    reason = e.strerror if isinstance(e, OSError) and e.strerror else first_line(e)
    return MellowError(f"{final}: cannot write the checkpoint ({file}: {reason})")


def keep_tokenizer(run_dir: Path, source: Path, resumed: bool = False) -> Path:
    """RUN/tokenizer/: the run's own copy of its tokenizer, which every checkpoint copies from.
    A resumed run would otherwise copy from the checkpoint it resumed from, which `--keep` later
    deletes, and every checkpoint after that would lack a tokenizer. A resumed run keeps the copy
    it has (the folder it came from may be gone or changed since); otherwise the copy is replaced
    by `source`'s files, and only once all of them are copied."""
    from mellow_cli.store.loading import OPTIONAL_TOKENIZER_FILES, TOKENIZER_FILES

    own = run_dir / "tokenizer"
    if (resumed and all((own / f).is_file() for f in TOKENIZER_FILES)) or source.resolve() == own.resolve():
        return own
    missing = [f for f in TOKENIZER_FILES if not (source / f).is_file()]
    if missing:
        raise MellowError(f"{source}: no {missing[0]}: not a tokenizer folder")
    tmp, old = run_dir / f".tokenizer.tmp-{os.getpid()}", run_dir / f".tokenizer.old-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        for f in (*TOKENIZER_FILES, *OPTIONAL_TOKENIZER_FILES):
            if (source / f).is_file():
                shutil.copyfile(source / f, tmp / f)
        if own.exists():
            os.replace(own, old)
        os.replace(tmp, own)
    except OSError as e:
        raise MellowError(f"{own}: cannot copy the tokenizer ({e.strerror or e})") from None
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
        shutil.rmtree(old, ignore_errors=True)
    return own


def _fsync_dir(path: Path) -> None:
    with contextlib.suppress(OSError):
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def mark(run_dir: Path, checkpoint: Path, name: str) -> Path:
    """RUN/checkpoints/NAME -> step-NNNNNN (`last`, `best`): a relative symlink, made aside and
    renamed over the old one, so a reader always finds a whole checkpoint there; a copy where
    symlinks are not allowed."""
    alias = run_dir / CHECKPOINTS / name
    tmp = alias.with_name(f".{name}.tmp-{os.getpid()}")
    try:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
        tmp.symlink_to(checkpoint.name, target_is_directory=True)
        if alias.is_dir() and not alias.is_symlink():
            shutil.rmtree(alias)
        os.replace(tmp, alias)
    except OSError:
        shutil.rmtree(tmp, ignore_errors=True)
        shutil.copytree(checkpoint, tmp)
        if alias.is_symlink():
            alias.unlink()
        elif alias.exists():
            shutil.rmtree(alias)
        os.replace(tmp, alias)
    return alias


def prune(run_dir: Path, keep: int, best_step: int | None) -> None:
    """Delete all but the last `keep` checkpoints, never the best one."""
    found = checkpoints(run_dir)
    for old in found[: max(0, len(found) - keep)]:
        if best_step is None or old.name != step_name(best_step):
            shutil.rmtree(old, ignore_errors=True)


def clean_stale(run_dir: Path) -> None:
    """Half-written checkpoints left by a killed run."""
    for stale in (run_dir / CHECKPOINTS).glob(".*.tmp-*"):
        if stale.is_dir() and not stale.is_symlink():
            shutil.rmtree(stale, ignore_errors=True)
        else:
            stale.unlink(missing_ok=True)


def read_trainer(checkpoint: Path) -> dict:
    try:
        data = json.loads((checkpoint / "trainer.json").read_text())
    except (OSError, ValueError, RecursionError) as e:
        raise MellowError(f"{checkpoint}: unreadable trainer.json ({first_line(e)})") from None
    if not isinstance(data, dict):  # its fields are checked by checkpoint.read_record
        raise MellowError(f"{checkpoint}: trainer.json is not a checkpoint's record (a JSON object with step and "
                          "position)")
    return data


def append_metrics(run_dir: Path, row: dict) -> None:
    with open(run_dir / METRICS, "a", encoding="utf-8") as f:
        f.write(json.dumps(row) + "\n")


def truncate_metrics(run_dir: Path, step: int) -> None:
    """Drop the rows a killed run logged after the checkpoint it resumes from."""
    path = run_dir / METRICS
    if not path.is_file():
        return
    rows = []
    for line in text_lines(path.read_text(encoding="utf-8")):
        with contextlib.suppress(ValueError):
            if json.loads(line).get("step", 0) <= step:
                rows.append(line)
    tmp = path.with_name(f".{METRICS}.tmp-{os.getpid()}")
    tmp.write_text("".join(r + "\n" for r in rows), encoding="utf-8")
    os.replace(tmp, path)


def weights_digest(net) -> str:
    h = hashlib.sha256()
    for name, t in sorted(net.state_dict().items()):
        h.update(name.encode())
        h.update(t.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()
