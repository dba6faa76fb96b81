"""Our model -> the authors' checkpoint: what `mellow models export` writes.

The authors exchange plain `torch.save(model.state_dict())` files (mellow-training,
training/trainer.py `_save_model_state`): their evaluation loads one with
`load_state_dict(..., strict=True)`, and their `resume_checkpoint` reads
`torch.load(path)["state_dict"]` (loaded with strict=False), hence the optional wrapper. The
published v0.ckpt has the same layout: 479 keys, buffers included (STFT kernels, mel matrix, bn0
statistics, Swin `relative_position_index` and `attn_mask`), and `lm_head.weight` stored beside the
token embedding it is tied to (docs/models.md, tests/golden/mellow_v0_state_dict_manifest.json).

Their `Mellow` (models/mellow.py) is parameterised only by the language model's hub name and the
projection width: HTSAT is built from the module-level models/config.py (window 8, dims 96..768,
527 classes) and `c2l` is `Linear(527, 768)`. So only a model of the v0 architecture fits it;
`tiny` and other sizes are refused. Our network keeps the official module names and stores every
persistent buffer, so its state dict already is the official one: exporting checks that against
the v0 layout, gives each tensor the official dtype, and writes the file atomically.
"""

from __future__ import annotations

import dataclasses
import errno
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from mellow_cli.models.mellow.config import MellowConfig
from mellow_cli.errors import ModelError, UsageError
from mellow_cli.events import note
from mellow_cli.files import first_line, megabytes

if TYPE_CHECKING:
    import torch
    from torch import nn

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


def official_layout() -> dict[str, tuple[tuple[int, ...], "torch.dtype"]]:
    """Every key of the official v0 state dict with its shape and dtype, read from our v0 network
    built on the meta device (no storage); the tests hold it to the golden manifest."""
    from mellow_cli.models.mellow.network import Mellow, layout_of

    return layout_of(Mellow.from_config(MellowConfig.v0(), device="meta").state_dict(keep_vars=True))


def check_exportable(cfg: MellowConfig, label: str) -> None:
    """The authors' class holds the v0 architecture only (see the module docstring)."""
    v0 = MellowConfig.v0()
    differ = [f.name for f in dataclasses.fields(cfg)
              if f.name != "name" and getattr(cfg, f.name) != getattr(v0, f.name)]
    if differ:
        more = f" (+{len(differ) - 4} more)" if len(differ) > 4 else ""
        raise ModelError(f"{label}: a Mellow {cfg.name} model cannot be exported to the official layout, which "
                         f"holds the v0 architecture only (it differs in {', '.join(differ[:4])}{more})")


def official_state(model: "nn.Module", label: str) -> dict[str, "torch.Tensor"]:
    """The model's state dict in the official layout: every key (the tied head included, sharing
    the embedding's storage as a tied model's `state_dict()` does), official dtypes."""
    from mellow_cli.models.mellow.network import compare_layouts, layout_of

    layout = official_layout()
    state = model.state_dict()
    report = compare_layouts(layout_of(state), layout, same_dtype=lambda a, b: True)
    if not report.ok:
        raise ModelError(f"{label}: its network does not have the official layout ({report.describe(limit=3)})")
    cast: dict[int, "torch.Tensor"] = {}  # tied names keep sharing one tensor after a cast
    out = {}
    for key, (_, dtype) in layout.items():
        t = state[key]
        out[key] = t if t.dtype == dtype else cast.setdefault(id(t), t.to(dtype))
    return out


def export(model_name: str, output: str | os.PathLike, options: ExportOptions = ExportOptions()) -> ExportResult:
    """Load any model `loading.resolve` understands and write it as the authors' checkpoint."""
    from mellow_cli.store import loading

    if options.wrap not in (None, *WRAPS):
        raise UsageError(f"--wrap {options.wrap}: expected one of {', '.join(WRAPS)}")
    path = Path(output).expanduser()
    check_target(path, options.overwrite)
    model, files = loading.load(model_name, progress=options.progress)
    check_exportable(files.config, model_name)
    state = official_state(model, model_name)
    obj = {"state_dict": state} if options.wrap == "state_dict" else state
    save_atomic(obj, path, overwrite=options.overwrite, progress=options.progress)
    return ExportResult(path, len(state), path.stat().st_size, options.wrap)


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
    state = obj.get("state_dict", obj)
    storages = {t.untyped_storage().data_ptr(): t.untyped_storage().nbytes() for t in state.values()}
    return sum(storages.values())


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
