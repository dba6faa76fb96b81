"""`mellow models pull NAME --from FILE`: a published model whose file is already on disk (copied
to a machine without network, say), taken into the cache exactly as a download of it would be:
checked, converted once, named NAME (`models list`, `models path NAME`, `--model NAME` offline).

The file is checked against the sha256 this mellow-cli can know for it, first found wins:

    the catalogue's pin  >  the record of an earlier download of the same file
      >  the hub's (its ETag is the sha256 of an LFS file, at the pinned commit; asked unless offline)

A release asset has no hub to ask, and a catalogue entry may pin nothing: then nothing is known,
and the command says so in one line and checks only what the conversion checks (the family's
layout, every tensor's shape). What was checked is recorded in the model's source.json, with the
file's own sha256, size and path. The user's file is read, never moved or deleted.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from mellow_cli.errors import MellowError, ModelError, UsageError
from mellow_cli.events import note, warn
from mellow_cli.files import cache_dir, sha256
from mellow_cli.models.catalogue import PUBLISHED, ModelSource
from mellow_cli.models.family import Family
from mellow_cli.store import hub
from mellow_cli.store.cache import ModelFiles, cached, lock, recorded_origin
from mellow_cli.store.conversion import megabyte_bar
from mellow_cli.store.loading import cache_errors, convert_published, published_target
from mellow_cli.store.tokenizers import TOKENIZER_FILES, tokenizer_beside, tokenizer_folder


@dataclass(frozen=True)
class Known:
    """What the file must be, and how we know."""

    sha256: str
    size: int | None
    where: str  # "pinned in the catalogue", ...
    commit: str | None = None  # the hub commit it was announced at


def adopt(src: ModelSource, path: str | Path, *, force: bool = False, progress: bool = True,
          arch: Family | None = None) -> ModelFiles:
    """The published model `src` made from `path` instead of a download; a cached copy stays
    unless `force`."""
    if src.kind != "published":
        raise UsageError(f"--from brings the file of a published model ({', '.join(PUBLISHED)}); {src.name} is "
                         "not one: pass the file itself as --model, or `mellow models pull FILE`")
    path = Path(path).expanduser().resolve()
    if not path.is_file():
        raise UsageError(f"--from {path}: no such file")
    folder = cache_dir() / "models" / src.key
    with cache_errors(src.name), lock(src.key, progress):
        if not force:
            files, _ = cached(src, folder, verify=False)
            if files is not None:
                note(f"{src.name} is already in the cache ({folder}); --force replaces it with {path}", progress)
                return files
        target = published_target(src, arch, _tokenizer(path), progress)
        known = _known(src, folder, progress)
        size = path.stat().st_size
        if known is not None and known.size is not None and size != known.size:
            raise ModelError(f"{path}: {size} bytes, not the {known.size} of {_file(src)} {known.where}: not the "
                             f"file of {src.name}; nothing is kept")
        with megabyte_bar(f"{src.name}: checking {path.name} (MB)", size, progress) as advance:
            digest = sha256(path, advance)
        if known is not None and digest != known.sha256:
            raise ModelError(f"{path}: sha256 {digest[:12]}…, not the {known.sha256[:12]}… of {_file(src)} "
                             f"{known.where}: not the file of {src.name}; nothing is kept")
        if known is None:
            warn(f"{path}: not checked against a known sha256 ({_why_unknown(src)}); only its layout is checked. "
                 f"Its sha256, {digest}, is recorded")
        else:
            note(f"{path}: sha256 matches {_file(src)} {known.where}", progress)
        origin = {"repo": src.repo, "filename": src.filename, "revision": src.revision,
                  "commit": known.commit if known else None, "url": src.url, "sha256": digest, "size": size,
                  "from": str(path), "checked": known.where if known else None}
        return convert_published(src, folder, target, path, str(path), origin, progress)


def _file(src: ModelSource) -> str:
    return src.url or f"{src.repo}/{src.filename}"


def _known(src: ModelSource, folder: Path, progress: bool) -> Known | None:
    """The sha256 the file must have, if this mellow-cli can know it (the module's docstring)."""
    if src.sha256:
        return Known(src.sha256, None, "pinned in the catalogue")
    first = recorded_origin(folder, src)
    if first is not None:
        return Known(first["sha256"], first["size"], "recorded when it was first downloaded", first.get("commit"))
    if src.url is not None or hub.offline():
        return None
    try:
        digest, size, commit = hub.announced(src.repo, src.filename, src.revision, src.name)
    except MellowError as e:  # no network on this machine: the usual reason to bring a file
        note(f"cannot ask the hub for the sha256 of {_file(src)} ({e})", progress)
        return None
    return None if digest is None else Known(digest, size, f"announced by the hub at {commit[:8]}", commit)


def _why_unknown(src: ModelSource) -> str:
    if src.url is not None:
        return f"a release names none, this mellow-cli pins none for {src.name}, and it was never downloaded here"
    return (f"this mellow-cli pins none for {src.name}, and the hub could not be asked"
            + (" (HF_HUB_OFFLINE)" if hub.offline() else ""))


def _tokenizer(path: Path):
    """The tokenizer of a published model: its files beside the checkpoint, else the cache's
    pinned copy (downloaded if it may be); offline without either, the error says both ways."""
    def find(cfg, name: str, progress: bool) -> Path:
        beside = tokenizer_beside(path.parent)
        if beside is not None:
            return beside
        try:
            return tokenizer_folder(cfg, name, progress)
        except ModelError as e:
            raise ModelError(f"{e}; or put {' and '.join(TOKENIZER_FILES)} of {cfg.tokenizer} beside {path}") from None

    return find

