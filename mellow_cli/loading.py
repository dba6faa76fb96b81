"""Model names -> hub -> user cache -> safetensors -> network.

`resolve` turns what the user typed (`v0`, `v0_s`, a checkpoint file or folder, a hub id
`user/repo[@revision]`) into a `ModelSource`; `pull` makes it local, converting a published `.ckpt`
once into a model folder of ours; `load` builds the network on the meta device and adopts the
folder's safetensors through mmap (pytorch-labs/gpt-fast's recipe), so a cached model starts in a
fraction of a second and never touches the network.

The published checkpoints (hub repo soham97/mellow, see docs/models.md) are plain state dicts saved
with `torch.save`. A pickle can name any Python callable, so they are read only with
`torch.load(weights_only=True)`: anything besides tensors and plain containers is refused before
it can run.

Cache layout (MELLOW_HOME, else platformdirs.user_cache_dir("mellow")):

    models/<key>/             one complete model folder per model, itself usable as --model <folder>
        model.safetensors     weights under the official key names, tied tensors stored once
        config.json           MellowConfig.to_dict()
        tokenizer.json, tokenizer_config.json[, special_tokens_map.json]
        source.json           origin (repo, file, revision, commit, sha256, size) and the
                              size/sha256/mtime of model.safetensors, checked before every load
    tokenizers/<owner>--<repo>/<revision>/   tokenizer files as downloaded
    downloads/<owner>--<repo>/               <file>.<etag>.part: partial downloads, resumed by the
                                             next attempt; <file>: verified, awaiting conversion
    .locks/<key>.lock         two processes never write the same model at once

Network settings are read when a download starts, not at import: HF_ENDPOINT (a mirror),
HF_TOKEN (private or gated repos), HF_HUB_OFFLINE=1 (never touch the network).
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import os
import re
import shutil
import time
import warnings
import zipfile
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .config import MellowConfig
from .errors import ModelError
from .files import (
    check_space,
    disk_full,
    first_line,
    glob_escape,
    note,
    read_json,
    sha256,
    slug,
    write_json_atomic,
)
from .hub import download, offline

if TYPE_CHECKING:
    import torch
    from torch import nn

# The published weights, pinned to one commit of https://huggingface.co/soham97/mellow so every
# user gets the same bytes. This sha is the one other public Mellow tools pin (it could not be
# checked from this offline build machine); to move it, take the sha from the repo's "History" tab
# or `huggingface_hub.HfApi().model_info("soham97/mellow").sha`. Every download also records the
# commit and sha256 it received (models/<name>/source.json), and later runs use exactly those bytes.
MELLOW_REPO = "soham97/mellow"
MELLOW_REVISION = "83672db0dae28764e283210d5bb732621e903d8a"
# The tokenizer the published model was trained with (base SmolLM2, not Instruct), pinned.
TOKENIZER_REPO = "HuggingFaceTB/SmolLM2-135M"
TOKENIZER_REVISION = "93efa2f097d58c2a74874c7e644dbc9b0cee75a2"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json")
OPTIONAL_TOKENIZER_FILES = ("special_tokens_map.json",)

CHECKPOINT_SUFFIXES = (".ckpt", ".pt", ".pth")
WEIGHTS_FILE = "model.safetensors"
CONFIG_FILE = "config.json"
SOURCE_FILE = "source.json"
# Fields only a MellowConfig has together: tells our config.json from a transformers one.
_OUR_CONFIG_FIELDS = {"embed_dim", "depths", "hidden_size", "vocab_size", "prompt_tokens"}
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+(@[\w./-]+)?$")


@dataclass(frozen=True)
class Published:
    """A model name users can type, and where its weights live."""

    repo: str  # hub repo id
    filename: str  # the official-layout .ckpt in that repo
    revision: str  # commit sha (or branch) to download
    preset: str  # MellowConfig.preset name the checkpoint was trained with
    about: str = ""  # one line for `mellow models list --available`


# Tests add entries (a `tiny` model on a local fake hub); the CLI's names are these two.
PUBLISHED: dict[str, Published] = {
    "v0": Published(MELLOW_REPO, "v0.ckpt", MELLOW_REVISION, "v0", "the paper's model (167M parameters, ~670 MB download)"),
    "v0_s": Published(MELLOW_REPO, "v0_s.ckpt", MELLOW_REVISION, "v0_s", "the second published variant, same architecture and size"),
}


@dataclass(frozen=True)
class ModelSource:
    """Where a model comes from, as `resolve` understood the user's words."""

    name: str  # as the user wrote it; every message names the model this way
    kind: str  # "published" | "hub" (a folder of ours on the hub) | "checkpoint" | "safetensors" | "folder"
    key: str | None  # folder under <cache>/models; None for local models used in place
    repo: str | None = None
    filename: str | None = None
    revision: str | None = None
    path: Path | None = None
    preset: str | None = None


@dataclass(frozen=True)
class ModelFiles:
    """A model ready to load: everything local, checked."""

    name: str
    config: MellowConfig
    weights: Path  # safetensors, official key names
    tokenizer_dir: Path  # tokenizer.json + tokenizer_config.json
    folder: Path | None  # the model folder (in the cache, or the user's), None for a lone file
    revision: str | None  # hub commit the weights came from; None for local files


@dataclass(frozen=True)
class CachedModel:
    """One entry of `mellow models list`."""

    name: str
    folder: Path
    size: int  # bytes on disk
    origin: str  # repo/file, or the local path it was converted from
    revision: str | None  # hub commit, None for local conversions
    created: str


@dataclass(frozen=True)
class Architecture:
    """The seam between loading and the network: build empty, then adopt a state dict."""

    empty: Callable[[MellowConfig], "nn.Module"]  # on the meta device: shapes, no storage
    fill: Callable[["nn.Module", dict], "nn.Module"]  # strict assign-load, re-tie, fill buffers


def mellow_architecture() -> Architecture:
    from .model.mellow import Mellow, load_weights

    return Architecture(empty=lambda cfg: Mellow.from_config(cfg, device="meta"), fill=load_weights)


# --- names -> sources --------------------------------------------------------------------------


def cache_dir() -> Path:
    """Root of everything mellow keeps: MELLOW_HOME if set, else the platform's user cache."""
    home = os.environ.get("MELLOW_HOME")
    if home:
        return Path(home).expanduser()
    import platformdirs

    return Path(platformdirs.user_cache_dir("mellow", appauthor=False))


def _names() -> str:
    return ", ".join(PUBLISHED)


def resolve(name_or_path: str | os.PathLike) -> ModelSource:
    """What the user typed -> where the model comes from. Touches no network, reads no weights."""
    text = str(name_or_path).strip()
    if not text:
        raise ModelError(f"no model given: pass {_names()}, a checkpoint file or folder, or a hub id user/repo")
    if text in PUBLISHED:
        pub = PUBLISHED[text]
        return ModelSource(text, "published", text, repo=pub.repo, filename=pub.filename,
                           revision=pub.revision, preset=pub.preset)
    path = Path(text).expanduser()
    if path.exists():
        return _local_source(text, path.resolve())
    looks_like_path = (
        text.startswith((".", "~", "/", "\\")) or "\\" in text or text.count("/") > 1
        or text.lower().endswith((*CHECKPOINT_SUFFIXES, ".safetensors"))
    )
    if _HUB_ID.match(text) and not looks_like_path:
        repo, _, revision = text.partition("@")
        if revision and not _good_revision(revision):
            raise ModelError(f"{text}: {revision!r} is not a revision (a branch, tag or commit, without '..', "
                             "a leading '.' or '/' in a part)")
        key = repo.replace("/", "--") + (f"@{slug(revision)}" if revision else "")
        return ModelSource(text, "hub", key, repo=repo, revision=revision or "main")
    if looks_like_path or os.sep in text:
        raise ModelError(f"{text}: no such file or folder: pass a checkpoint (.ckpt, .pt, .pth, "
                         f".safetensors), a model folder, {_names()}, or a hub id user/repo")
    raise ModelError(f"unknown model {text!r}: use {_names()}, a local checkpoint file or folder, "
                     "or a hub id user/repo")


def _good_revision(revision: str) -> bool:
    """A git ref or commit as the hub takes it; never one that could climb out of a cache folder."""
    parts = revision.split("/")
    return ".." not in revision and all(p and not p.startswith(".") for p in parts)


def _local_source(text: str, path: Path) -> ModelSource:
    if path.is_dir():
        return ModelSource(text, "folder", None, path=path)
    suffix = path.suffix.lower()
    if suffix in CHECKPOINT_SUFFIXES:
        digest = hashlib.sha1(str(path).encode()).hexdigest()[:10]
        return ModelSource(text, "checkpoint", f"local--{slug(path.stem)}-{digest}", path=path)
    if suffix == ".safetensors":
        return ModelSource(text, "safetensors", None, path=path)
    raise ModelError(f"{text}: not a model file: expected a .ckpt, .pt, .pth or .safetensors "
                     "checkpoint, or a model folder")


# --- public entry points -------------------------------------------------------------------------


def pull(name_or_path: str | ModelSource, *, force: bool = False, progress: bool = True,
         arch: Architecture | None = None) -> ModelFiles:
    """Make a model local without running it: download, verify (full sha256 of cached files),
    convert once. `force` discards the cached copy first."""
    src = name_or_path if isinstance(name_or_path, ModelSource) else resolve(name_or_path)
    return _ensure(src, verify=True, force=force, progress=progress, arch=arch)


def load(name_or_path: str | ModelSource, *, device: str = "cpu", progress: bool = True,
         arch: Architecture | None = None) -> tuple["nn.Module", ModelFiles]:
    """The network with its weights, in eval mode, and the files it came from.

    Cached models load without network: the safetensors are mmapped and adopted by a network built
    on the meta device, so nothing is initialised twice and pages come in as they are used."""
    src = name_or_path if isinstance(name_or_path, ModelSource) else resolve(name_or_path)
    files = _ensure(src, verify=False, force=False, progress=progress, arch=arch)
    model = load_weights(files, arch=arch)
    if device != "cpu":
        model = model.to(device)
    return model, files


def load_weights(files: ModelFiles, *, arch: Architecture | None = None) -> "nn.Module":
    """Build `files.config` on meta and adopt `files.weights` (mmap, no copy)."""
    from safetensors.torch import load_file

    arch = arch or mellow_architecture()
    model = arch.empty(files.config)
    try:
        state = load_file(str(files.weights))
    except Exception as e:  # SafetensorError, OSError: a damaged or foreign file
        raise ModelError(f"{files.weights}: not a readable safetensors file ({first_line(e)}): "
                         f"run `mellow models pull {files.name} --force`, or pass another file") from None
    try:
        return arch.fill(model, state).eval()
    except ModelError as e:
        raise ModelError(f"{files.weights}: {e} (is {CONFIG_FILE} the config these weights were "
                         "trained with?)") from None


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
        where = origin.get("path") or f"{origin.get('repo')}/{origin.get('filename') or ''}".rstrip("/")
        found.append(CachedModel(name=record.get("name", folder.name), folder=folder,
                                 size=_tree_size(folder), origin=where,
                                 revision=origin.get("commit"), created=record.get("created", "")))
    return found


def partial_downloads() -> list[tuple[Path, int]]:
    """Downloads that stopped part-way (resumed by the next pull) or await conversion."""
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
    with _lock(folder.name):
        if folder.is_dir():
            freed += _tree_size(folder)
            shutil.rmtree(folder)
        for leftover in _download_leftovers(src) if src is not None else []:
            if leftover.is_dir():
                freed += _tree_size(leftover)
                shutil.rmtree(leftover)
            else:
                freed += leftover.stat().st_size
                leftover.unlink()
    return freed


def _cached_folder_for(name: str) -> tuple[Path, ModelSource | None]:
    root = cache_dir() / "models"
    for entry in cached_models():  # by the name it was pulled under (works for deleted local files)
        if entry.name == name or entry.folder.name == name:
            with contextlib.suppress(ModelError):
                return entry.folder, resolve(name)
            return entry.folder, None
    src = resolve(name)
    if src.key is None:
        raise ModelError(f"{name} is used in place, not cached: there is nothing to remove")
    folder = root / src.key
    if not folder.is_dir() and not _download_leftovers(src):
        raise ModelError(f"{name} is not in the cache (`mellow models list` shows what is)")
    return folder, src


def _download_leftovers(src: ModelSource) -> list[Path]:
    """Partial or unconverted downloads of this model (files; a folder for a hub model)."""
    if src.kind == "hub":
        folder = _downloads(src.repo) / slug(src.revision)
        return [folder] if folder.is_dir() else []
    if src.kind == "published":
        return list(_downloads(src.repo).glob(f"{glob_escape(src.filename)}*"))
    return []


# --- making a model local ------------------------------------------------------------------------


def _ensure(src: ModelSource, *, verify: bool, force: bool, progress: bool,
            arch: Architecture | None) -> ModelFiles:
    """The model's files, made local first if needed. An OSError on the way (a cache folder that
    cannot be written, a checkpoint that cannot be read) becomes a one-line ModelError."""
    try:
        if src.kind == "folder":
            return _local_folder(src, progress)
        if src.kind == "safetensors":
            return _local_safetensors(src, progress)
        folder = cache_dir() / "models" / src.key
        with _lock(src.key, progress):
            if not force:
                files, problem = _cached(src, folder, verify)
                if files is not None:
                    return files
                if problem:
                    if offline() and src.kind != "checkpoint":
                        raise ModelError(f"{src.name}: the cached copy is damaged ({problem}): run "
                                         f"`mellow models pull {src.name}` with network to download it again")
                    again = "converting it again" if src.kind == "checkpoint" else "fetching it again"
                    note(f"{src.name}: the cached copy is damaged ({problem}); {again}", progress)
            if offline() and src.kind != "checkpoint":
                if force:
                    raise ModelError(f"cannot fetch {src.name} again while HF_HUB_OFFLINE is set: unset it, "
                                     "or drop --force to use the cached copy")
                raise ModelError(f"{src.name} is not in the cache and HF_HUB_OFFLINE is set: run "
                                 f"`mellow models pull {src.name}` with network, or pass --model PATH")
            arch = arch or mellow_architecture()
            if src.kind == "checkpoint":
                return _convert_local_checkpoint(src, folder, arch, progress)
            if src.kind == "published":
                return _pull_published(src, folder, arch, progress)
            return _pull_hub_folder(src, folder, arch, progress)
    except OSError as e:
        if e.errno in (errno.ENOSPC, errno.EDQUOT):
            raise disk_full(cache_dir(), src.name) from None
        where = f" {e.filename}" if e.filename else ""
        raise ModelError(f"{src.name}: cannot use{where} ({e.strerror or first_line(e)}): check its permissions, "
                         "or set MELLOW_HOME to a writable folder") from None


def _cached(src: ModelSource, folder: Path, verify: bool) -> tuple[ModelFiles | None, str | None]:
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
        cfg = MellowConfig.from_dict(json.loads((folder / CONFIG_FILE).read_text()))
    except (ValueError, TypeError) as e:
        return None, f"{CONFIG_FILE} is unreadable ({first_line(e)})"
    origin = record.get("source", {})
    return ModelFiles(src.name, cfg, weights, folder, folder, origin.get("commit")), None


def _same_origin(record: dict, src: ModelSource) -> bool:
    origin = record.get("source", {})
    if src.kind == "checkpoint":
        try:
            stat = src.path.stat()
        except OSError:
            return False
        return (origin.get("path") == str(src.path) and origin.get("size") == stat.st_size
                and origin.get("mtime_ns") == stat.st_mtime_ns
                and record.get("config") == _jsonable(_checkpoint_config(src.path).to_dict()))
    return (origin.get("repo") == src.repo and origin.get("filename") == src.filename
            and origin.get("revision") == src.revision)


def _pull_published(src: ModelSource, folder: Path, arch: Architecture, progress: bool) -> ModelFiles:
    cfg = MellowConfig.preset(src.preset)
    expected = _expected_layout(cfg, arch)  # before downloading: a broken build fails in a second
    tokenizer = tokenizer_folder(cfg, src.name, progress)
    raw = download(src.repo, src.filename, src.revision, _downloads(src.repo) / src.filename,
                   name=src.name, progress=progress, reserve_factor=2)
    note(f"{src.name}: converting {src.filename} to safetensors (once)", progress)
    state = _read_checkpoint(raw["path"], label=f"{src.repo}/{src.filename}")
    state = _fit(state, expected, cfg, label=f"{src.repo}/{src.filename}")
    origin = {k: raw[k] for k in ("repo", "filename", "revision", "commit", "sha256", "size")}
    files = _write_folder(folder, src, state, cfg, tokenizer, origin)
    for done in (Path(raw["path"]), Path(raw["path"] + ".json")):  # the safetensors copy replaces it
        done.unlink(missing_ok=True)
    return files


def _pull_hub_folder(src: ModelSource, folder: Path, arch: Architecture, progress: bool) -> ModelFiles:
    downloads = _downloads(src.repo) / slug(src.revision)
    conf = download(src.repo, CONFIG_FILE, src.revision, downloads / CONFIG_FILE, name=src.name,
                    progress=False, optional=True)
    commit = conf["commit"] if conf else src.revision  # every later file from the same commit
    if conf is None:
        cfg = MellowConfig.v0()
    else:
        cfg = _read_config(Path(conf["path"]), strict=True)
    expected = _expected_layout(cfg, arch)
    raw = download(src.repo, WEIGHTS_FILE, commit, downloads / WEIGHTS_FILE, name=src.name,
                   progress=progress, optional=True)
    if raw is None:
        raise ModelError(f"{src.repo} has no {WEIGHTS_FILE} at revision {src.revision}: a mellow model repo "
                         f"holds {WEIGHTS_FILE} and {CONFIG_FILE}; for a .ckpt in the official layout, "
                         "download it and pass its path")
    _check_safetensors_layout(Path(raw["path"]), expected, cfg, label=f"{src.repo}/{WEIGHTS_FILE}")
    tokenizer = downloads / "tokenizer"
    own = [download(src.repo, f, commit, tokenizer / f, name=src.name, progress=False, optional=True)
           for f in (*TOKENIZER_FILES, *OPTIONAL_TOKENIZER_FILES)]
    if not all(own[: len(TOKENIZER_FILES)]):
        tokenizer = tokenizer_folder(cfg, src.name, progress)
    origin = {k: raw[k] for k in ("repo", "revision", "commit", "sha256", "size")}
    origin["filename"] = None
    origin["revision"] = src.revision
    files = _write_folder(folder, src, None, cfg, tokenizer, origin, weights_file=Path(raw["path"]))
    shutil.rmtree(downloads, ignore_errors=True)
    return files


def _convert_local_checkpoint(src: ModelSource, folder: Path, arch: Architecture, progress: bool) -> ModelFiles:
    cfg = _checkpoint_config(src.path)
    expected = _expected_layout(cfg, arch)
    tokenizer = _tokenizer_beside(src.path.parent) or tokenizer_folder(cfg, src.name, progress)
    note(f"{src.name}: converting to safetensors in the cache (once)", progress)
    stat = src.path.stat()
    state = _fit(_read_checkpoint(src.path, label=src.name), expected, cfg, label=src.name)
    origin = {"path": str(src.path), "size": stat.st_size, "mtime_ns": stat.st_mtime_ns,
              "sha256": sha256(src.path)}
    return _write_folder(folder, src, state, cfg, tokenizer, origin)


def _local_folder(src: ModelSource, progress: bool) -> ModelFiles:
    folder = src.path
    weights = folder / WEIGHTS_FILE
    if not weights.is_file():
        ckpts = sorted(p for p in folder.iterdir() if p.suffix.lower() in CHECKPOINT_SUFFIXES)
        hint = f"; to use the checkpoint inside, pass {ckpts[0]}" if len(ckpts) == 1 else ""
        raise ModelError(f"{src.name}: no {WEIGHTS_FILE} in this folder{hint} (a model folder holds "
                         f"{WEIGHTS_FILE}, {CONFIG_FILE} and the tokenizer files)")
    config = folder / CONFIG_FILE
    cfg = _read_config(config, strict=True) if config.is_file() else MellowConfig.v0()
    tokenizer = _tokenizer_beside(folder) or tokenizer_folder(cfg, src.name, progress)
    return ModelFiles(src.name, cfg, weights, tokenizer, folder, None)


def _local_safetensors(src: ModelSource, progress: bool) -> ModelFiles:
    cfg = _checkpoint_config(src.path)
    tokenizer = _tokenizer_beside(src.path.parent) or tokenizer_folder(cfg, src.name, progress)
    return ModelFiles(src.name, cfg, src.path, tokenizer, None, None)


def _checkpoint_config(path: Path) -> MellowConfig:
    """A lone checkpoint is v0 unless a config.json of ours sits beside it (one from the reference
    repo, which nothing reads, is ignored)."""
    beside = path.parent / CONFIG_FILE
    return (_read_config(beside, strict=False) if beside.is_file() else None) or MellowConfig.v0()


def _read_config(path: Path, *, strict: bool) -> MellowConfig | None:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        if not strict:
            return None
        raise ModelError(f"{path}: unreadable config ({first_line(e)}): fix or remove it") from None
    if not isinstance(data, dict) or not _OUR_CONFIG_FIELDS <= set(data):
        if not strict:
            return None
        raise ModelError(f"{path}: not a mellow config (it lacks {', '.join(sorted(_OUR_CONFIG_FIELDS))}): "
                         "write it with MellowConfig.to_dict()")
    try:
        return MellowConfig.from_dict(data)
    except (TypeError, ValueError) as e:
        raise ModelError(f"{path}: bad mellow config ({first_line(e)})") from None


def _tokenizer_beside(folder: Path) -> Path | None:
    return folder if all((folder / f).is_file() for f in TOKENIZER_FILES) else None


def tokenizer_folder(cfg: MellowConfig, name: str, progress: bool) -> Path:
    """The tokenizer files of cfg.tokenizer (at the pinned revision for SmolLM2), from the cache or
    the hub."""
    repo = cfg.tokenizer
    revision = TOKENIZER_REVISION if repo == TOKENIZER_REPO else "main"
    folder = cache_dir() / "tokenizers" / repo.replace("/", "--") / slug(revision)
    if _tokenizer_beside(folder):
        return folder
    if offline():
        raise ModelError(f"the tokenizer of {name} ({repo}) is not in the cache and HF_HUB_OFFLINE is "
                         f"set: run `mellow models pull {name}` with network, or pass --model PATH")
    for f in TOKENIZER_FILES:
        if not (folder / f).is_file():
            download(repo, f, revision, folder / f, name=name, progress=False)
    for f in OPTIONAL_TOKENIZER_FILES:
        if not (folder / f).is_file():
            download(repo, f, revision, folder / f, name=name, progress=False, optional=True)
    return folder


def _downloads(repo: str) -> Path:
    return cache_dir() / "downloads" / repo.replace("/", "--")


# --- checkpoints ---------------------------------------------------------------------------------


def _read_checkpoint(path: Path | str, *, label: str) -> dict[str, "torch.Tensor"]:
    """A plain state dict from a torch.save'd file, never running the pickle's code.

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
    return _state_dict_of(obj, label)


def _is_pickle(path: Path) -> bool:
    """A zip written by torch.save, or a bare pickle (protocol 2+ starts with PROTO, 0x80)."""
    with open(path, "rb") as f:
        return f.read(1) == b"\x80" or zipfile.is_zipfile(path)


def _state_dict_of(obj: Any, label: str) -> dict[str, "torch.Tensor"]:
    import torch

    if isinstance(obj, Mapping) and not any(isinstance(v, torch.Tensor) for v in obj.values()):
        for key in ("state_dict", "model", "module"):  # a training checkpoint that wraps one
            if isinstance(obj.get(key), Mapping):
                obj = obj[key]
                break
    if not isinstance(obj, Mapping):
        raise ModelError(f"{label}: not a state dict (it holds a {type(obj).__name__}): save "
                         "model.state_dict(), not the model")
    state = {}
    for key, value in obj.items():
        if not isinstance(value, torch.Tensor):
            raise ModelError(f"{label}: not a plain state dict: {key!r} holds a {type(value).__name__}")
        state[key[len("module."):] if key.startswith("module.") else key] = value
    return state


@dataclass(frozen=True)
class _Layout:
    """What the network expects: every state-dict key with its shape and dtype, and which
    parameter names share one tensor (the LM head and the token embedding)."""

    shapes: dict[str, tuple[tuple[int, ...], "torch.dtype"]]
    tied: list[list[str]]

    @property
    def stored(self) -> dict[str, tuple[tuple[int, ...], "torch.dtype"]]:
        """The keys we store: each tied group once, under its first name."""
        dropped = {name for group in self.tied for name in group[1:]}
        return {k: v for k, v in self.shapes.items() if k not in dropped}


def _expected_layout(cfg: MellowConfig, arch: Architecture) -> _Layout:
    from mellow_cli.model.mellow import layout_of

    model = arch.empty(cfg)
    shapes = layout_of(model.state_dict(keep_vars=True))
    groups: dict[int, list[str]] = {}
    for name, param in model.named_parameters(remove_duplicate=False):
        groups.setdefault(id(param), []).append(name)
    return _Layout(shapes, [g for g in groups.values() if len(g) > 1])


def _fit(state: dict, layout: _Layout, cfg: MellowConfig, *, label: str) -> dict:
    """Check a state dict against the network, fold tied keys into one, match dtypes.

    Tied keys: the reference copies key by key into a tied model, so the last key of a group (the
    LM head) is the value both names end up with; keep that one, under the group's first name."""
    from mellow_cli.model.mellow import layout_of

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


def _fold_tied(entries: dict, layout: _Layout) -> dict:
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


def _raise_on_mismatch(label: str, cfg: MellowConfig, found: dict, layout: _Layout) -> None:
    from mellow_cli.model.mellow import compare_layouts

    # a float checkpoint of another precision is converted on load, so only the kind must match
    report = compare_layouts(found, layout.stored, same_dtype=lambda a, b: _kind(a) == _kind(b))
    if not report.ok:
        raise ModelError(f"{label} does not fit the Mellow {cfg.name} network ({report.describe(limit=3)}): pass a "
                         f"checkpoint of this model (official soham97/mellow layout), or put the {CONFIG_FILE} "
                         "it was trained with beside it")


def _kind(dtype) -> str:
    return "float" if dtype.is_floating_point else "complex" if dtype.is_complex else "int"


def _check_safetensors_layout(path: Path, layout: _Layout, cfg: MellowConfig, *, label: str) -> None:
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


def _write_folder(folder: Path, src: ModelSource, state: dict | None, cfg: MellowConfig,
                  tokenizer: Path, origin: dict, *, weights_file: Path | None = None) -> ModelFiles:
    """Write a complete model folder beside `folder`, then swap it in: a crash leaves either the
    old folder or the new one, never half of one."""
    from safetensors.torch import save_file

    from . import __version__

    folder.parent.mkdir(parents=True, exist_ok=True)
    for stale in folder.parent.glob(f".{glob_escape(folder.name)}.tmp-*"):  # an earlier crash (we hold the lock)
        shutil.rmtree(stale, ignore_errors=True)
    tmp = folder.parent / f".{folder.name}.tmp-{os.getpid()}"
    tmp.mkdir()
    try:
        weights = tmp / WEIGHTS_FILE
        if state is not None:
            if weights_file is None:
                size = sum(t.numel() * t.element_size() for t in state.values())
                check_space(tmp, size, src.name)
            save_file(state, str(weights), metadata={"format": "pt"})
        else:
            os.replace(weights_file, weights)
        with open(weights, "rb+") as f:
            os.fsync(f.fileno())
        for f in (*TOKENIZER_FILES, *OPTIONAL_TOKENIZER_FILES):
            if (tokenizer / f).is_file():
                shutil.copyfile(tokenizer / f, tmp / f)
        (tmp / CONFIG_FILE).write_text(json.dumps(cfg.to_dict(), indent=2) + "\n")
        stat = weights.stat()
        record = {
            "name": src.name,
            "kind": src.kind,
            "source": origin,
            "config": cfg.to_dict(),
            "weights": {"file": WEIGHTS_FILE, "size": stat.st_size, "sha256": sha256(weights),
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
    return ModelFiles(src.name, cfg, folder / WEIGHTS_FILE, folder, folder, origin.get("commit"))


def _swap_in(new: Path, folder: Path) -> None:
    old = folder.parent / f".{folder.name}.old-{os.getpid()}"
    if folder.exists():
        os.replace(folder, old)
    os.replace(new, folder)
    shutil.rmtree(old, ignore_errors=True)


# --- small helpers -------------------------------------------------------------------------------


@contextlib.contextmanager
def _lock(key: str, progress: bool = False) -> Iterator[None]:
    from filelock import FileLock, Timeout

    locks = cache_dir() / ".locks"
    try:
        locks.mkdir(parents=True, exist_ok=True)
        lock = FileLock(str(locks / f"{key}.lock"))
        try:
            lock.acquire(timeout=0.5)
        except Timeout:
            note(f"{key}: waiting for another mellow process to finish with it", progress)
            lock.acquire()
    except OSError:  # a read-only cache (shared, or on a read-only mount) still serves what it has
        yield
        return
    try:
        yield
    finally:
        lock.release()


def _jsonable(data: dict) -> dict:
    """As it reads back from JSON (tuples become lists), for comparing with a stored record."""
    return json.loads(json.dumps(data))


def _tree_size(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())


