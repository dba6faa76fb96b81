"""The cache's model folders: what a complete one holds, writing one so that a crash never leaves
half of it, checking one before it is used, listing and removing them.

Cache layout (files.cache_dir(): MELLOW_HOME, else platformdirs.user_cache_dir("mellow")):

    models/<key>/             one complete model folder per model, itself usable as --model <folder>
        model.safetensors     weights under the official key names, tied tensors stored once
        config.json           the family's config (models/family.py's config_dict)
        tokenizer.json, tokenizer_config.json[, special_tokens_map.json]
        source.json           origin (repo, file, revision, commit, sha256, size; the url of a
                              release asset, whose sha256 and size, recorded at the first
                              download, every later download must match) and the
                              size/sha256/mtime of model.safetensors, checked before every load
    downloads/<owner>--<repo>/               <file>: verified downloads awaiting conversion (hub.py,
                                             or release.py for a release asset, with <file>.json
                                             recording its sha256); <file>.incoming-<pid>/: a
                                             download under way
    .locks/<key>.lock         two processes never write the same model at once
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mellow_cli.models.catalogue import ModelSource, resolve
from mellow_cli.models.family import config_dict, config_from_dict, read_config
from mellow_cli.errors import ModelError, UsageError
from mellow_cli.events import note
from mellow_cli.files import (
    cache_dir,
    cache_lock,
    check_space,
    disk_full,
    first_line,
    glob_escape,
    read_json,
    sha256,
    slug,
    write_json_atomic,
)
from mellow_cli.store.tokenizers import OPTIONAL_TOKENIZER_FILES, TOKENIZER_FILES

WEIGHTS_FILE = "model.safetensors"
CONFIG_FILE = "config.json"
SOURCE_FILE = "source.json"


@dataclass(frozen=True)
class ModelFiles:
    """A model ready to load: everything local, checked."""

    name: str
    config: Any  # the family's config dataclass
    weights: Path  # safetensors, official key names
    tokenizer_dir: Path  # tokenizer.json + tokenizer_config.json
    folder: Path | None  # the model folder (in the cache, or the user's), None for a lone file
    revision: str | None  # hub commit (or release tag) the weights came from; None for local files


@dataclass(frozen=True)
class CachedModel:
    """One entry of `mellow models list`."""

    name: str
    folder: Path
    size: int  # bytes on disk
    origin: str  # repo/file, or the local path it was converted from
    revision: str | None  # hub commit or release tag, None for local conversions
    created: str


# --- listing and removing ------------------------------------------------------------------------


def model_path(name_or_path: str) -> Path:
    """The folder (or file) a model loads from; ModelError if it is not in the cache."""
    src = resolve(name_or_path)
    if src.key is None:
        return src.path
    folder = cache_dir() / "models" / src.key
    if not (folder / SOURCE_FILE).is_file():
        raise ModelError(f"{src.name} is not in the cache: run `mellow models pull {src.name}`")
    return folder


def cached_models() -> list[CachedModel]:
    """Every complete model folder in the cache, by name."""
    root = cache_dir() / "models"
    found = []
    for folder in sorted(root.iterdir()) if root.is_dir() else []:
        record = read_json(folder / SOURCE_FILE)
        if not folder.is_dir() or folder.name.startswith(".") or record is None:
            continue
        origin = record.get("source", {})
        where = (origin.get("path") or origin.get("url")
                 or f"{origin.get('repo')}/{origin.get('filename') or ''}".rstrip("/"))
        if origin.get("from"):  # a published file brought from disk (adopt.py)
            where += f" (from {origin['from']})"
        found.append(CachedModel(name=record.get("name", folder.name), folder=folder,
                                 size=_tree_size(folder), origin=where,
                                 revision=_revision(origin), created=record.get("created", "")))
    return found


def partial_downloads() -> list[tuple[Path, int]]:
    """Downloads that stopped part-way or await conversion."""
    root = cache_dir() / "downloads"
    return [(p, p.stat().st_size) for p in sorted(root.rglob("*")) if p.is_file()] if root.is_dir() else []


def remove(name: str) -> int:
    """Delete a cached model (and its partial downloads); returns the bytes freed."""
    folder, src = _cached_folder_for(name)
    try:
        return _remove(folder, src)
    except OSError as e:
        raise ModelError(f"{e.filename or folder}: cannot delete it ({e.strerror or e}); is the cache read-only?") from None


def _remove(folder: Path, src: ModelSource | None) -> int:
    freed = 0
    with lock(folder.name):
        for path in [folder, *(_download_leftovers(src) if src is not None else [])]:
            if path.is_dir():
                freed += _tree_size(path)
                shutil.rmtree(path)
            elif path.exists():
                freed += path.stat().st_size
                path.unlink()
    return freed


def _cached_folder_for(name: str) -> tuple[Path, ModelSource | None]:
    for entry in cached_models():  # by the name it was pulled under (works for deleted local files)
        if entry.name == name or entry.folder.name == name:
            with contextlib.suppress(ModelError):
                return entry.folder, resolve(name)
            return entry.folder, None
    src = resolve(name)
    if src.key is None:
        raise UsageError(f"{name} is used in place, not cached: there is nothing to remove")
    folder = cache_dir() / "models" / src.key
    if not folder.is_dir() and not _download_leftovers(src):
        raise ModelError(f"{name} is not in the cache (`mellow models list` shows what is)")
    return folder, src


def downloads_dir(repo: str) -> Path:
    return cache_dir() / "downloads" / repo.replace("/", "--")


def _download_leftovers(src: ModelSource) -> list[Path]:
    """Partial or unconverted downloads of this model (files; a folder for a hub model)."""
    if src.kind == "hub":
        folder = downloads_dir(src.repo) / slug(src.revision)
        return [folder] if folder.is_dir() else []
    if src.kind == "published":
        return list(downloads_dir(src.repo).glob(f"{glob_escape(src.filename)}*"))
    return []


# --- checking a cached folder --------------------------------------------------------------------


def cached(src: ModelSource, folder: Path, verify: bool) -> tuple[ModelFiles | None, str | None]:
    """The cached folder if it is complete, of the same origin, and its weights pass the checks.

    Returns (files, None), (None, None) when absent or outdated, (None, problem) when damaged.
    Size is checked on every load; the sha256 (about 1 s for v0) when the file's mtime moved since
    it was recorded, and always with verify (`mellow models pull`)."""
    record = read_json(folder / SOURCE_FILE)
    if record is None or not _same_origin(record, src):
        return None, None
    weights = folder / WEIGHTS_FILE
    expected = record.get("weights", {})
    try:
        stat = weights.stat()
    except FileNotFoundError:
        return None, f"{WEIGHTS_FILE} is missing"
    if stat.st_size != expected.get("size"):
        return None, f"{WEIGHTS_FILE} is {stat.st_size} bytes, expected {expected.get('size')}"
    if verify or stat.st_mtime_ns != expected.get("mtime_ns"):
        if sha256(weights) != expected.get("sha256"):
            return None, f"{WEIGHTS_FILE} fails its sha256 check"
        if stat.st_mtime_ns != expected.get("mtime_ns"):
            record["weights"]["mtime_ns"] = stat.st_mtime_ns
            with contextlib.suppress(OSError):  # a read-only cache still loads
                write_json_atomic(folder / SOURCE_FILE, record)
    missing = [f for f in (CONFIG_FILE, *TOKENIZER_FILES) if not (folder / f).is_file()]
    if missing:
        return None, f"{missing[0]} is missing"
    try:
        cfg = config_from_dict(json.loads((folder / CONFIG_FILE).read_text()))
    except (ValueError, TypeError, ModelError) as e:
        return None, f"{CONFIG_FILE} is unreadable ({first_line(e)})"
    return ModelFiles(src.name, cfg, weights, folder, folder, _revision(record.get("source", {}))), None


def _same_origin(record: dict, src: ModelSource) -> bool:
    origin = record.get("source", {})
    if src.kind == "checkpoint":
        try:
            stat = src.path.stat()
        except OSError:
            return False
        beside = checkpoint_config(src.path)  # without one, the config the conversion found stands
        return (origin.get("path") == str(src.path) and origin.get("size") == stat.st_size
                and origin.get("mtime_ns") == stat.st_mtime_ns
                and (beside is None or record.get("config") == _jsonable(beside.to_dict())))
    return (origin.get("repo") == src.repo and origin.get("filename") == src.filename
            and origin.get("revision") == src.revision and origin.get("url") == src.url
            and (src.sha256 is None or origin.get("sha256") == src.sha256))


def recorded_origin(folder: Path, src: ModelSource) -> dict | None:
    """What the cached folder records of the published file it was made from (sha256, size), if
    it was made from `src`'s file (its address, or its hub repo, file and revision): a later
    download of it, or a copy brought from disk, must be the same file. A folder whose weights are
    damaged still says so; without a folder there is no record."""
    origin = (read_json(folder / SOURCE_FILE) or {}).get("source")
    if not isinstance(origin, dict) or src.kind != "published":
        return None
    same = (origin.get("url") == src.url if src.url is not None else
            (origin.get("repo"), origin.get("filename"), origin.get("revision")) == (src.repo, src.filename, src.revision))
    return origin if same and isinstance(origin.get("sha256"), str) and isinstance(origin.get("size"), int) else None


def _revision(origin: dict) -> str | None:
    """The hub commit the weights came from, or the release tag that pins them."""
    return origin.get("commit") or (origin.get("revision") if origin.get("url") else None)


def checkpoint_config(path: Path) -> Any:
    """The config.json of ours beside a lone checkpoint, or None (one from a reference repo, which
    nothing reads, is ignored): without one, the checkpoint's family says what it is."""
    beside = path.parent / CONFIG_FILE
    return read_config(beside, strict=False) if beside.is_file() else None


# --- writing a folder ----------------------------------------------------------------------------


def write_folder(folder: Path, src: ModelSource, state: dict | None, cfg: Any,
                 tokenizer: Path, origin: dict, *, weights_file: Path | None = None,
                 advance: Callable[[int], None] | None = None) -> ModelFiles:
    """Write a complete model folder beside `folder`, then swap it in: a crash leaves either the
    old folder or the new one, never half of one. The weights are `state`, or `weights_file`
    moved in; `advance(nbytes)` follows the write and the hash of the weights."""
    from safetensors.torch import save_file

    from mellow_cli.version import __version__

    folder.parent.mkdir(parents=True, exist_ok=True)
    for stale in folder.parent.glob(f".{glob_escape(folder.name)}.tmp-*"):  # an earlier crash (we hold the lock)
        shutil.rmtree(stale, ignore_errors=True)
    tmp = folder.parent / f".{folder.name}.tmp-{os.getpid()}"
    tmp.mkdir()
    try:
        weights = tmp / WEIGHTS_FILE
        if state is not None:
            size = sum(t.numel() * t.element_size() for t in state.values())
            check_space(tmp, size, src.name)
            save_file(state, str(weights), metadata={"format": "pt"})
            if advance is not None:
                advance(size)
        else:
            os.replace(weights_file, weights)
        with open(weights, "rb+") as f:
            os.fsync(f.fileno())
        for f in (*TOKENIZER_FILES, *OPTIONAL_TOKENIZER_FILES):
            if (tokenizer / f).is_file():
                shutil.copyfile(tokenizer / f, tmp / f)
        (tmp / CONFIG_FILE).write_text(json.dumps(config_dict(cfg), indent=2) + "\n")
        stat = weights.stat()
        record = {
            "name": src.name,
            "kind": src.kind,
            "source": origin,
            "config": cfg.to_dict(),
            "weights": {"file": WEIGHTS_FILE, "size": stat.st_size, "sha256": sha256(weights, advance),
                        "mtime_ns": stat.st_mtime_ns},
            "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "mellow_cli": __version__,
        }
        write_json_atomic(tmp / SOURCE_FILE, record)
        _swap_in(tmp, folder)
    except OSError as e:
        if e.errno in (errno.ENOSPC, errno.EDQUOT):
            raise disk_full(folder.parent, src.name) from None
        raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return ModelFiles(src.name, cfg, folder / WEIGHTS_FILE, folder, folder, _revision(origin))


def _swap_in(new: Path, folder: Path) -> None:
    old = folder.parent / f".{folder.name}.old-{os.getpid()}"
    if folder.exists():
        os.replace(folder, old)
    os.replace(new, folder)
    shutil.rmtree(old, ignore_errors=True)


# --- small helpers -------------------------------------------------------------------------------


def lock(key: str, progress: bool = False) -> contextlib.AbstractContextManager[None]:
    """Hold the cache's lock for one model; waits (with a note) while another process has it."""
    return cache_lock(key, lambda: note(f"{key}: waiting for another mellow process to finish with it", progress))


def _jsonable(data: dict) -> dict:
    """As it reads back from JSON (tuples become lists), for comparing with a stored record."""
    return json.loads(json.dumps(data))


def _tree_size(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())
