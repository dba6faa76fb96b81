"""Model names: the published models users can type, and `resolve`, which turns what the user
typed (`v0`, `v0_s`, a checkpoint file or folder, a hub id `user/repo[@revision]`) into a
`ModelSource`. Touches no network and reads no weights.
"""

from __future__ import annotations

import hashlib
import os
import re
from dataclasses import dataclass
from pathlib import Path

from mellow_cli.errors import ModelError, UsageError
from mellow_cli.files import slug

# The published weights, pinned to one commit of https://huggingface.co/soham97/mellow so every
# user gets the same bytes. This sha is the one other public Mellow tools pin; to move it, take
# the sha from the repo's "History" tab or `huggingface_hub.HfApi().model_info("soham97/mellow").sha`.
# Every download also records the commit and sha256 it received (models/<name>/source.json), and
# later runs use exactly those bytes.
MELLOW_REPO = "soham97/mellow"
MELLOW_REVISION = "83672db0dae28764e283210d5bb732621e903d8a"

CHECKPOINT_SUFFIXES = (".ckpt", ".pt", ".pth")
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+(@[\w./-]+)?$")


@dataclass(frozen=True)
class Published:
    """A model name users can type, and where its weights live."""

    repo: str  # hub repo id
    filename: str  # the official-layout .ckpt in that repo
    revision: str  # commit sha (or branch) to download
    preset: str  # the family's config preset the checkpoint was trained with
    about: str = ""  # one line for `mellow models list --available`
    family: str = "mellow"  # models/family.py: whose network and checkpoint layout


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
    family: str = "mellow"  # of a published model


def _names() -> str:
    return ", ".join(PUBLISHED)


def resolve(name_or_path: str | os.PathLike) -> ModelSource:
    """What the user typed -> where the model comes from. An empty name or a revision that is not
    one is a usage error; a name that matches nothing is a ModelError."""
    text = str(name_or_path).strip()
    if not text:
        raise UsageError(f"no model given: pass {_names()}, a checkpoint file or folder, or a hub id user/repo")
    if text in PUBLISHED:
        pub = PUBLISHED[text]
        return ModelSource(text, "published", text, repo=pub.repo, filename=pub.filename,
                           revision=pub.revision, preset=pub.preset, family=pub.family)
    path = Path(text).expanduser()
    if path.exists():
        return _local_source(text, path.resolve())
    looks_like_path = (
        text.startswith((".", "~", "/", "\\")) or "\\" in text or text.count("/") > 1
        or text.lower().endswith((*CHECKPOINT_SUFFIXES, ".safetensors"))
    )
    if _HUB_ID.match(text) and not looks_like_path:
        return _hub_source(text)
    if looks_like_path or os.sep in text:
        raise ModelError(f"{text}: no such file or folder: pass a checkpoint (.ckpt, .pt, .pth, "
                         f".safetensors), a model folder, {_names()}, or a hub id user/repo")
    raise ModelError(f"unknown model {text!r}: use {_names()}, a local checkpoint file or folder, "
                     "or a hub id user/repo")


def _hub_source(text: str) -> ModelSource:
    repo, _, revision = text.partition("@")
    if revision and not _good_revision(revision):
        raise UsageError(f"{text}: {revision!r} is not a revision (a branch, tag or commit, without '..', "
                         "a leading '.' or '/' in a part)")
    key = repo.replace("/", "--") + (f"@{slug(revision)}" if revision else "")
    return ModelSource(text, "hub", key, repo=repo, revision=revision or "main")


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
