"""Checkpoints in, tensors fit for the network out: reading a torch.save'd `.ckpt` safely,
checking its keys and shapes against the network, folding tied tensors into one, and the progress
bar of the one-time conversion to safetensors. What a family's published file holds, and how its
keys map to the network's, is the family's (models/family.py's published_state).

A pickle can name any Python callable, so checkpoints are read only with
`torch.load(weights_only=True)`: anything besides tensors and plain containers is refused before
it can run.
"""

from __future__ import annotations

import contextlib
import errno
import re
import warnings
import zipfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from mellow_cli.errors import ModelError
from mellow_cli.files import first_line
from mellow_cli.store.cache import CONFIG_FILE

if TYPE_CHECKING:
    import torch
    from torch import nn


def read_checkpoint(path: Path | str, *, label: str) -> Any:
    """What a torch.save'd file holds (tensors in plain containers), never running the pickle's code.

    `weights_only=True` rebuilds tensors and plain containers and refuses every other global the
    pickle names, before calling it. Zip-format files (torch >= 1.6) are mmapped."""
    import pickle

    import torch

    path = Path(path)
    try:
        with warnings.catch_warnings():  # our one-line errors say what matters; torch's advice does not apply
            warnings.simplefilter("ignore")
            obj = torch.load(path, map_location="cpu", weights_only=True, mmap=zipfile.is_zipfile(path))
    except pickle.UnpicklingError as e:
        culprit = re.search(r"GLOBAL ([\w.]+)", str(e))
        if culprit:
            raise ModelError(f"{label}: refused: the checkpoint holds a pickled Python object "
                             f"({culprit.group(1)}) that could run code when loaded; only plain state dicts "
                             "of tensors are accepted (re-save it with torch.save(model.state_dict()) where "
                             "you trust it)") from None
        if "Weights only load failed" in str(e) and _is_pickle(path):
            raise ModelError(f"{label}: refused: its pickle uses instructions the safe loader does not "
                             "accept, so it is not a plain torch.save'd state dict (re-save it with "
                             "torch.save(model.state_dict()) where you trust it)") from None
        raise ModelError(f"{label}: not a readable PyTorch checkpoint: download it again or pass "
                         "another file") from None
    except OSError as e:
        if e.errno in (errno.ENOSPC, errno.EDQUOT):
            raise
        raise ModelError(f"{label}: cannot read it ({first_line(e)})") from None
    except Exception as e:  # truncated zip, not a pickle at all, ...
        raise ModelError(f"{label}: not a readable PyTorch checkpoint ({first_line(e)}): "
                         "download it again or pass another file") from None
    return obj


def _is_pickle(path: Path) -> bool:
    """A zip written by torch.save, or a bare pickle (protocol 2+ starts with PROTO, 0x80)."""
    with open(path, "rb") as f:
        return f.read(1) == b"\x80" or zipfile.is_zipfile(path)


@dataclass(frozen=True)
class Layout:
    """What the network expects: every state-dict key with its shape and dtype, and which
    parameter names share one tensor (the LM head and the token embedding)."""

    shapes: dict[str, tuple[tuple[int, ...], "torch.dtype"]]
    tied: list[list[str]]

    @property
    def stored(self) -> dict[str, tuple[tuple[int, ...], "torch.dtype"]]:
        """The keys we store: each tied group once, under its first name."""
        dropped = {name for group in self.tied for name in group[1:]}
        return {k: v for k, v in self.shapes.items() if k not in dropped}


def expected_layout(empty: "nn.Module") -> Layout:
    """The layout of a network built on the meta device (shapes only, no storage)."""
    from mellow_cli.models.weights import layout_of

    shapes = layout_of(empty.state_dict(keep_vars=True))
    groups: dict[int, list[str]] = {}
    for name, param in empty.named_parameters(remove_duplicate=False):
        groups.setdefault(id(param), []).append(name)
    return Layout(shapes, [g for g in groups.values() if len(g) > 1])


def fit(state: dict, layout: Layout, cfg, *, label: str) -> dict:
    """Check a state dict against the network, fold tied keys into one, match dtypes.

    Tied keys: the reference copies key by key into a tied model, so the last key of a group (the
    LM head) is the value both names end up with; keep that one, under the group's first name."""
    from mellow_cli.models.weights import layout_of

    state = _fold_tied(state, layout)
    _raise_on_mismatch(label, cfg, layout_of(state), layout)
    fitted = {}
    seen_storages = set()
    for key, (shape, dtype) in layout.stored.items():
        t = state[key]
        if t.dtype != dtype:
            t = t.to(dtype)
        t = t.contiguous()
        ptr = t.untyped_storage().data_ptr() if t.numel() else None
        if ptr is not None and ptr in seen_storages:  # safetensors stores no shared memory
            t = t.clone()
        seen_storages.add(ptr)
        fitted[key] = t
    return fitted


def _fold_tied(entries: dict, layout: Layout) -> dict:
    """A copy with each tied group under its first name only, holding the group's last present
    entry (the LM head's, as the reference's key-by-key copy ends up using)."""
    entries = dict(entries)
    for group in layout.tied:
        present = [entries[n] for n in group if n in entries]
        for n in group:
            entries.pop(n, None)
        if present:
            entries[group[0]] = present[-1]
    return entries


def _raise_on_mismatch(label: str, cfg, found: dict, layout: Layout) -> None:
    from mellow_cli.models.family import family_of
    from mellow_cli.models.weights import compare_layouts

    # a float checkpoint of another precision is converted on load, so only the kind must match
    report = compare_layouts(found, layout.stored, same_dtype=lambda a, b: _kind(a) == _kind(b))
    if not report.ok:
        title = family_of(cfg).title
        raise ModelError(f"{label} does not fit the {title} {cfg.name} network ({report.describe(limit=3)}): pass a "
                         f"{title} checkpoint in its authors' layout, or put the {CONFIG_FILE} it was trained with "
                         "beside it")


def _kind(dtype) -> str:
    return "float" if dtype.is_floating_point else "complex" if dtype.is_complex else "int"


def check_safetensors_layout(path: Path, layout: Layout, cfg, *, label: str) -> None:
    """Keys and shapes from a safetensors header (no tensor is read)."""
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            found = {k: (tuple(f.get_slice(k).get_shape()), _st_dtype(f.get_slice(k).get_dtype()))
                     for k in f.keys()}
    except Exception as e:
        raise ModelError(f"{label}: not a readable safetensors file ({first_line(e)})") from None
    _raise_on_mismatch(label, cfg, _fold_tied(found, layout), layout)


def _st_dtype(name: str):
    import torch

    return {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
            "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8,
            "U8": torch.uint8, "BOOL": torch.bool}.get(name, torch.float32)


@contextlib.contextmanager
def conversion_bar(name: str, total_bytes: int, enabled: bool) -> Iterator[Callable[[int], None]]:
    """The progress of the conversion's passes through the weights (hashing the checkpoint,
    writing the safetensors, hashing them): a v0 conversion reads and writes about 2 GB, seconds
    to a minute depending on the disk. Yields `advance(nbytes)`."""
    with megabyte_bar(f"{name}: converting to safetensors (MB)", total_bytes, enabled) as advance:
        yield advance


@contextlib.contextmanager
def megabyte_bar(description: str, total_bytes: int | None, enabled: bool) -> Iterator[Callable[[int], None]]:
    """A progress count (events.progress) in megabytes over `total_bytes` (None: unknown).
    Yields `advance(nbytes)`; the bar is full when the block ends without an error."""
    from mellow_cli import events

    if not enabled:
        yield lambda nbytes: None
        return
    total = None if total_bytes is None else max(1, round(total_bytes / 1e6))
    seen, shown = [0], [0]
    with events.progress(total, description) as advance:
        def advance_bytes(nbytes: int) -> None:
            seen[0] += nbytes
            now = seen[0] // 1_000_000 if total is None else min(total, seen[0] * total // max(1, total_bytes))
            if now > shown[0]:
                advance(now - shown[0])
                shown[0] = now

        yield advance_bytes
        if total is not None and shown[0] < total:
            advance(total - shown[0])
