"""Our model -> its authors' checkpoint: what `mellow models export` writes. Each family says what
its authors' code loads (models/family.py's export); this module checks the target and writes the
file atomically.
"""

from __future__ import annotations

import errno
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from mellow_cli.errors import ModelError, UsageError
from mellow_cli.events import note
from mellow_cli.files import first_line, megabytes

if TYPE_CHECKING:
    pass

WRAPS = ("state_dict",)  # {"state_dict": ...}: what the authors' resume_checkpoint reads
BIG = 64 * 1024 * 1024  # files at least this size get a progress bar on stderr


@dataclass(frozen=True)
class ExportOptions:
    wrap: str | None = None  # None: a bare state dict (their evaluation); "state_dict": wrapped (their resume)
    overwrite: bool = False  # replace an existing output file
    progress: bool = True  # notes and the progress bar on stderr


@dataclass(frozen=True)
class ExportResult:
    path: Path
    keys: int  # state-dict entries written (479 for v0)
    bytes: int  # size of the file
    wrap: str | None


def export(model_name: str, output: str | os.PathLike, options: ExportOptions = ExportOptions()) -> ExportResult:
    """Load any model `loading.resolve` understands and write it as its authors' checkpoint."""
    from mellow_cli.models.family import family_of
    from mellow_cli.store import loading

    if options.wrap not in (None, *WRAPS):
        raise UsageError(f"--wrap {options.wrap}: expected one of {', '.join(WRAPS)}")
    path = Path(output).expanduser()
    check_target(path, options.overwrite)
    model, files = loading.load(model_name, progress=options.progress)
    obj = family_of(files.config).export(model, model_name, options.wrap)
    save_atomic(obj, path, overwrite=options.overwrite, progress=options.progress)
    return ExportResult(path, len(_tensors(obj)), path.stat().st_size, options.wrap)


def check_target(path: Path, overwrite: bool) -> None:
    """Usage errors about -o, before any model is read."""
    if path.suffix.lower() not in (".ckpt", ".pt", ".pth"):
        raise UsageError(f"{path}: the output must be a .ckpt (or .pt, .pth) file")
    if path.is_dir():
        raise UsageError(f"{path}: is a folder; -o takes the checkpoint file to write")
    if not path.parent.is_dir():
        raise UsageError(f"{path}: no such folder {path.parent}")
    if path.exists() and not path.is_file():  # a device or a pipe: replacing it is never meant
        raise UsageError(f"{path}: is not a regular file; -o takes the checkpoint file to write")
    if path.exists() and not overwrite:
        raise UsageError(f"{path}: exists; pass --overwrite to replace it")


def save_atomic(obj: dict, path: Path, *, overwrite: bool, progress: bool) -> None:
    """torch.save into a hidden file beside `path`, fsync, then rename: a crash or a full disk
    leaves the old file (or none), never half of one. Without `overwrite` a file that appeared
    meanwhile is not replaced either (a hard link refuses an existing name)."""
    import torch

    size = _tensor_bytes(obj)
    free = shutil.disk_usage(path.parent).free
    if free < size:
        raise ModelError(f"{path}: not enough disk space (needs {megabytes(size)}, {megabytes(free)} free)")
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        with open(tmp, "wb") as f, _bar(size, path, progress) as bar:
            torch.save(obj, _Counted(f, bar))
            f.flush()
            os.fsync(f.fileno())
        _move(tmp, path, overwrite)
    except OSError as e:
        if e.errno in (errno.ENOSPC, errno.EDQUOT):
            raise ModelError(f"{path}: not enough disk space to write it") from None
        raise ModelError(f"{path}: cannot write it ({e.strerror or first_line(e)})") from None
    finally:
        tmp.unlink(missing_ok=True)


def _move(tmp: Path, path: Path, overwrite: bool) -> None:
    if overwrite:
        os.replace(tmp, path)
        return
    try:
        os.link(tmp, path)
    except FileExistsError:
        raise UsageError(f"{path}: exists; pass --overwrite to replace it") from None
    except OSError:  # a filesystem without hard links: the check before writing has to do
        if path.exists():
            raise UsageError(f"{path}: exists; pass --overwrite to replace it") from None
        os.replace(tmp, path)


def _tensor_bytes(obj: dict) -> int:
    """Bytes of the distinct storages in `obj` (tied tensors count once, as torch.save stores them)."""
    storages = {t.untyped_storage().data_ptr(): t.untyped_storage().nbytes() for t in _tensors(obj)}
    return sum(storages.values())


def _tensors(obj) -> list:
    """The tensors in a checkpoint's nested dicts, one entry per key (a state dict's entries)."""
    import torch

    if isinstance(obj, torch.Tensor):
        return [obj]
    return [t for v in obj.values() for t in _tensors(v)] if isinstance(obj, dict) else []


class _Counted:
    """A writable file that moves a progress bar; torch.save writes its zip records through it."""

    def __init__(self, f, bar):
        self.f, self.bar = f, bar

    def write(self, data) -> int:
        n = self.f.write(data)
        if self.bar is not None:
            self.bar.update(n)
        return n

    def flush(self) -> None:
        self.f.flush()


def _bar(size: int, path: Path, progress: bool):
    """A byte-count bar on stderr for big files; nothing (a null context yielding None) otherwise."""
    import contextlib

    if not progress or size < BIG:
        return contextlib.nullcontext()
    from huggingface_hub.utils import tqdm  # the bar downloads draw too, with the same off switch

    note(f"writing {path} ({megabytes(size)})")
    return tqdm(total=size, unit="B", unit_scale=True, desc=path.name, leave=False)
