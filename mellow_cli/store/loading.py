"""Making a model local and building the network from it: the entry points the CLI, the API,
training and bench call.

`pull` makes a model local (catalogue.resolve says where it comes from; hub.py downloads,
conversion.py turns a published `.ckpt` into tensors once, model_cache.py writes and checks the
folder); `load` builds the network on the meta device and adopts the folder's safetensors through
mmap (pytorch-labs/gpt-fast's recipe), so a cached model starts in a fraction of a second and never
touches the network. The cache's listing and removal (model_cache.py) are reached from here too,
so callers need one module for the model cache. The network settings (a mirror, a token,
offline) are hub.py's, read when a download starts.
"""

from __future__ import annotations

import contextlib
import errno
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

from mellow_cli.models.catalogue import CHECKPOINT_SUFFIXES, PUBLISHED, ModelSource, resolve
from mellow_cli.models.family import Family, families, family, family_of, read_config
from mellow_cli.store.conversion import (
    check_safetensors_layout,
    conversion_bar,
    expected_layout,
    fit,
    read_checkpoint,
)
from mellow_cli.errors import MellowError, ModelError
from mellow_cli.events import note
from mellow_cli.files import cache_dir, disk_full, first_line, sha256, slug
from mellow_cli.store import release
from mellow_cli.store.hub import download, offline, offline_error
from mellow_cli.store.cache import (
    CONFIG_FILE,
    WEIGHTS_FILE,
    ModelFiles,
    cached,
    cached_models,
    checkpoint_config,
    downloads_dir,
    lock,
    model_path,
    partial_downloads,
    recorded_origin,
    remove,
    write_folder,
)
from mellow_cli.store.tokenizers import (
    OPTIONAL_TOKENIZER_FILES,
    TOKENIZER_FILES,
    tokenizer_beside,
    tokenizer_folder,
)

if TYPE_CHECKING:
    from torch import nn

# What other modules import from here: the entry points, and the cache and tokenizer names they
# need beside them (`mellow models`, `mellow env`, bench speed, training), so one import serves.
__all__ = ["CONFIG_FILE", "OPTIONAL_TOKENIZER_FILES", "PUBLISHED", "TOKENIZER_FILES",
           "WEIGHTS_FILE", "cache_dir", "cached_models", "load", "model_path", "partial_downloads",
           "pull", "remove", "resolve", "tokenizer_folder"]


def _default_config():
    """A model without a config.json of its own is the published Mellow (v0), as every model was
    before there were other families."""
    return family("mellow").config("v0")


# --- public entry points -------------------------------------------------------------------------


def pull(name_or_path: str | ModelSource, *, force: bool = False, progress: bool = True,
         arch: Family | None = None) -> ModelFiles:
    """Make a model local without running it: download, verify (full sha256 of cached files),
    convert once. `force` discards the cached copy first. (adopt.py takes a published model's
    file already on disk instead of downloading it.)"""
    src = name_or_path if isinstance(name_or_path, ModelSource) else resolve(name_or_path)
    return _ensure(src, verify=True, force=force, progress=progress, arch=arch)


def peek_config(name_or_path: str):
    """A model's config without reading its weights or touching the network: a published name's
    preset, a folder's (the cache's, or the user's) config.json, the config beside a checkpoint;
    None where only reading the checkpoint would tell (one not converted yet). For what must be
    known before a model loads: which family answers, how long its clips are."""
    try:
        src = resolve(name_or_path)
    except MellowError:
        return None
    if src.kind == "published":
        return family(src.family).config(src.preset)
    folders = [src.path if src.kind == "folder" else cache_dir() / "models" / src.key if src.key else None]
    if src.kind in ("checkpoint", "safetensors"):
        folders.append(src.path.parent)  # a config.json of ours beside it (cache.checkpoint_config)
    for folder in folders:
        if folder is not None and (folder / CONFIG_FILE).is_file():
            return read_config(folder / CONFIG_FILE, strict=False)
    return None


def peek_family(name_or_path: str) -> Family:
    """The family of the model asked for, known before it loads (peek_config); Mellow's where
    only reading the checkpoint would tell."""
    cfg = peek_config(name_or_path)
    return family("mellow") if cfg is None else family_of(cfg)


def load(name_or_path: str | ModelSource, *, device: str = "cpu", progress: bool = True,
         arch: Family | None = None) -> tuple["nn.Module", ModelFiles]:
    """The network with its weights, in eval mode, and the files it came from.

    Cached models load without network: the safetensors are mmapped and adopted by a network built
    on the meta device, so nothing is initialised twice and pages come in as they are used."""
    from mellow_cli.runtime.memory import keep_freed_blocks

    keep_freed_blocks()  # a process that runs a model makes and frees large tensors all along
    _without_nnpack_where_it_cannot_run()
    src = name_or_path if isinstance(name_or_path, ModelSource) else resolve(name_or_path)
    files = _ensure(src, verify=False, force=False, progress=progress, arch=arch)
    model = load_weights(files, arch=arch)
    if device != "cpu":
        model = model.to(device)
    return model, files


def _without_nnpack_where_it_cannot_run() -> None:
    """On an x86 CPU without AVX2, torch's first convolution tries NNPACK, which needs it, and
    prints a warning of its own ("Could not initialize NNPACK! Reason: Unsupported hardware.") into
    our output. Telling torch not to try changes nothing else there: NNPACK could not run."""
    import platform

    import torch

    if platform.machine().lower() in ("x86_64", "amd64") and torch.backends.cpu.get_cpu_capability() == "DEFAULT":
        torch.backends.nnpack.set_flags(False)


def load_weights(files: ModelFiles, *, arch: Family | None = None) -> "nn.Module":
    """Build `files.config` on meta and adopt `files.weights` (mmap, no copy). `arch`: the family
    whose network to build (default: the config's)."""
    from safetensors.torch import load_file

    arch = arch or family_of(files.config)
    model = arch.build(files.config, "meta")
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


# --- making a model local ------------------------------------------------------------------------


def _ensure(src: ModelSource, *, verify: bool, force: bool, progress: bool,
            arch: Family | None) -> ModelFiles:
    """The model's files, made local first if needed. An OSError on the way (a cache folder that
    cannot be written, a checkpoint that cannot be read) becomes a one-line ModelError."""
    with cache_errors(src.name):
        if src.kind == "folder":
            return _local_folder(src, progress)
        if src.kind == "safetensors":
            return _local_safetensors(src, progress)
        folder = cache_dir() / "models" / src.key
        with lock(src.key, progress):
            if not force:
                files, problem = cached(src, folder, verify)
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
                raise offline_error(src.name)
            if src.kind == "checkpoint":
                return _convert_local_checkpoint(src, folder, arch, progress)
            if src.kind == "published":
                return _pull_published(src, folder, arch, progress)
            return _pull_hub_folder(src, folder, arch, progress)


@contextlib.contextmanager
def cache_errors(name: str) -> Iterator[None]:
    """An OSError while making `name` local (a cache folder that cannot be written, a file that
    cannot be read, a full disk) as a one-line ModelError."""
    try:
        yield
    except OSError as e:
        if e.errno in (errno.ENOSPC, errno.EDQUOT):
            raise disk_full(cache_dir(), name) from None
        where = f" {e.filename}" if e.filename else ""
        raise ModelError(f"{name}: cannot use{where} ({e.strerror or first_line(e)}): check its permissions, "
                         "or set MELLOW_HOME to a writable folder") from None


def _pull_published(src: ModelSource, folder: Path, arch: Family | None, progress: bool) -> ModelFiles:
    target = published_target(src, arch, tokenizer_folder, progress)  # before downloading: a broken build fails in a second
    raw = _download_published(src, folder, progress)
    origin = {k: raw[k] for k in ("repo", "filename", "revision", "commit", "sha256", "size", "url") if k in raw}
    files = convert_published(src, folder, target, Path(raw["path"]), src.url or f"{src.repo}/{src.filename}",
                              origin, progress)
    for done in (Path(raw["path"]), Path(raw["path"] + ".json")):  # the safetensors copy replaces it
        done.unlink(missing_ok=True)
    return files


def published_target(src: ModelSource, arch: Family | None, tokenizer, progress: bool) -> tuple:
    """What a published model's file becomes: (its config, family, expected layout, tokenizer
    folder); `tokenizer(cfg, name, progress)` finds the tokenizer."""
    cfg = family(src.family).config(src.preset)
    arch = arch or family_of(cfg)
    return cfg, arch, expected_layout(arch.build(cfg, "meta")), tokenizer(cfg, src.name, progress)


def convert_published(src: ModelSource, folder: Path, target: tuple, path: Path, label: str, origin: dict,
                      progress: bool) -> ModelFiles:
    """A published model's file, read by its family, written once as the cache's model folder."""
    cfg, arch, expected, tokenizer = target
    note(f"{src.name}: converting {src.filename} to safetensors (once)", progress)
    state = fit(_published_state(arch, read_checkpoint(path, label=label), label), expected, cfg, label=label)
    with conversion_bar(src.name, 2 * _nbytes(state), progress) as advance:
        return write_folder(folder, src, state, cfg, tokenizer, origin, advance=advance)


def _download_published(src: ModelSource, folder: Path, progress: bool) -> dict:
    """A published file, verified, in downloads/: from the hub (checked against its ETag), or from
    its plain address (checked against the sha256 the catalogue pins, else against the one
    recorded when this model was first downloaded, if it was)."""
    dest = downloads_dir(src.repo) / src.filename
    if src.url is None:
        return download(src.repo, src.filename, src.revision, dest, name=src.name, progress=progress,
                        reserve_factor=2)
    expected = None
    if src.sha256:
        expected = release.Expected(src.sha256, None, "pinned in the catalogue",
                                    f"run `mellow models pull {src.name}` again; if this repeats, the file at "
                                    "that address is not the one this mellow-cli knows")
    elif (first := recorded_origin(folder, src)) is not None:
        expected = release.Expected(first["sha256"], first["size"], "recorded at its first download",
                                    "the file at that address has changed since; if you trust the new one, "
                                    f"`mellow models rm {src.name}` forgets the record")
    raw = release.download(src.url, dest, name=src.name, progress=progress, reserve_factor=2, expected=expected)
    return {**raw, "repo": src.repo, "filename": src.filename, "revision": src.revision, "commit": None}


def _convert_local_checkpoint(src: ModelSource, folder: Path, arch: Family | None, progress: bool) -> ModelFiles:
    obj = read_checkpoint(src.path, label=src.name)
    cfg = checkpoint_config(src.path)
    if cfg is None:  # no config.json of ours beside it: the published model of the file's family
        owner = arch or next((f for f in families() if f.owns(obj)), None) or family("mellow")
        cfg = owner.config_for(obj)
    arch = arch or family_of(cfg)
    expected = expected_layout(arch.build(cfg, "meta"))
    tokenizer = tokenizer_beside(src.path.parent) or tokenizer_folder(cfg, src.name, progress)
    note(f"{src.name}: converting to safetensors in the cache (once)", progress)
    stat = src.path.stat()
    state = fit(_published_state(arch, obj, src.name), expected, cfg, label=src.name)
    with conversion_bar(src.name, stat.st_size + 2 * _nbytes(state), progress) as advance:
        origin = {"path": str(src.path), "size": stat.st_size, "mtime_ns": stat.st_mtime_ns,
                  "sha256": sha256(src.path, advance)}
        return write_folder(folder, src, state, cfg, tokenizer, origin, advance=advance)


def _published_state(arch: Family, obj, label: str) -> dict:
    """The family's reading of a published file; a file of another family is named as such."""
    if not arch.owns(obj):
        other = next((f for f in families() if f is not arch and f.owns(obj)), None)
        if other is not None:
            raise ModelError(f"{label}: a {other.title} checkpoint, not a {arch.title} one: pass it as a "
                             f"{other.title} model (`mellow models list --available` names them)")
    return arch.published_state(obj, label)


def _nbytes(state: dict) -> int:
    return sum(t.numel() * t.element_size() for t in state.values())


def _pull_hub_folder(src: ModelSource, folder: Path, arch: Family | None, progress: bool) -> ModelFiles:
    downloads = downloads_dir(src.repo) / slug(src.revision)
    conf = download(src.repo, CONFIG_FILE, src.revision, downloads / CONFIG_FILE, name=src.name,
                    progress=False, optional=True)
    commit = conf["commit"] if conf else src.revision  # every later file from the same commit
    cfg = _default_config() if conf is None else read_config(Path(conf["path"]), strict=True)
    expected = expected_layout((arch or family_of(cfg)).build(cfg, "meta"))
    raw = download(src.repo, WEIGHTS_FILE, commit, downloads / WEIGHTS_FILE, name=src.name,
                   progress=progress, optional=True)
    if raw is None:
        raise ModelError(f"{src.repo} has no {WEIGHTS_FILE} at revision {src.revision}: a mellow model repo "
                         f"holds {WEIGHTS_FILE} and {CONFIG_FILE}; for a .ckpt in the official layout, "
                         "download it and pass its path")
    check_safetensors_layout(Path(raw["path"]), expected, cfg, label=f"{src.repo}/{WEIGHTS_FILE}")
    tokenizer = downloads / "tokenizer"
    own = [download(src.repo, f, commit, tokenizer / f, name=src.name, progress=False, optional=True)
           for f in (*TOKENIZER_FILES, *OPTIONAL_TOKENIZER_FILES)]
    if not all(own[: len(TOKENIZER_FILES)]):
        tokenizer = tokenizer_folder(cfg, src.name, progress)
    origin = {k: raw[k] for k in ("repo", "revision", "commit", "sha256", "size")}
    origin["filename"] = None
    origin["revision"] = src.revision
    files = write_folder(folder, src, None, cfg, tokenizer, origin, weights_file=Path(raw["path"]))
    shutil.rmtree(downloads, ignore_errors=True)
    return files


# --- models used in place ------------------------------------------------------------------------


def _local_folder(src: ModelSource, progress: bool) -> ModelFiles:
    folder = src.path
    weights = folder / WEIGHTS_FILE
    if not weights.is_file():
        ckpts = sorted(p for p in folder.iterdir() if p.suffix.lower() in CHECKPOINT_SUFFIXES)
        hint = f"; to use the checkpoint inside, pass {ckpts[0]}" if len(ckpts) == 1 else ""
        raise ModelError(f"{src.name}: no {WEIGHTS_FILE} in this folder{hint} (a model folder holds "
                         f"{WEIGHTS_FILE}, {CONFIG_FILE} and the tokenizer files)")
    config = folder / CONFIG_FILE
    cfg = read_config(config, strict=True) if config.is_file() else _default_config()
    tokenizer = tokenizer_beside(folder) or tokenizer_folder(cfg, src.name, progress)
    return ModelFiles(src.name, cfg, weights, tokenizer, folder, None)


def _local_safetensors(src: ModelSource, progress: bool) -> ModelFiles:
    cfg = checkpoint_config(src.path) or _default_config()
    tokenizer = tokenizer_beside(src.path.parent) or tokenizer_folder(cfg, src.name, progress)
    return ModelFiles(src.name, cfg, src.path, tokenizer, None, None)
