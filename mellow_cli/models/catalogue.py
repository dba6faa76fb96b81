"""Model names: the published models users can type (Mellow's `v0` and `v0_s`, `tinymu`,
`samsone-99m`/`-134m`/`-356m`), where each one's weights come from and under what terms, and
`resolve`, which turns what the user typed (one of those, a checkpoint file or folder, a hub id
`user/repo[@revision]`) into a `ModelSource`. Touches no network and reads no weights.
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

# TinyMU's whole model is one file, tinymu.pt (encoder, projector and language model); the
# encoder-only file beside it serves the authors' code only to build its network before
# tinymu.pt overwrites every weight, so it is never fetched. The authors' demo downloads the repo
# unpinned; this commit is the one third-party TinyMU tools pin (it could not be checked against
# the hub when it was written: check it before moving it).
TINYMU_REPO = "AndreasXi/TinyMU"
TINYMU_REVISION = "0735fc50bc8b881d687dedccdd48b742927611b3"

# Samsone's checkpoints are assets of a GitHub release, pinned by the tag in their address (the
# address the authors' own download code uses). A release host announces no checksum, so the
# first download's sha256 and size are recorded and every later download must match them; a
# `sha256` filled in below is checked before a file is kept at all.
SAMSONE_REPO = "SamsungLabs/samsone"
SAMSONE_TAG = "v1.0.0"

# Every model's weights are its authors'. Neither the TinyMU nor the Samsone project states a
# licence for its weights: the table says so rather than guessing terms. Mellow's authors license
# their code under MIT.
NO_LICENCE = "no licence stated"
MELLOW_TERMS = "code MIT"

CHECKPOINT_SUFFIXES = (".ckpt", ".pt", ".pth")
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+(@[\w./-]+)?$")


@dataclass(frozen=True)
class Published:
    """A model name users can type, and where its weights live."""

    repo: str  # hub repo id; for a release asset, the GitHub owner/repo it belongs to
    filename: str  # the file in the authors' layout
    revision: str  # hub commit sha (or branch); for a release asset, its tag
    preset: str  # the family's config preset the checkpoint was trained with
    about: str = ""  # what it is good at, one line for `mellow models list --available`
    family: str = "mellow"  # models/family.py: whose network and checkpoint layout
    url: str | None = None  # a plain HTTPS file (a release asset) instead of the hub
    sha256: str | None = None  # the file's, when known: checked before a download is kept
    parameters: int | None = None  # distinct parameters of the published model
    download_mb: int | None = None  # about how much one downloads
    terms: str = ""  # under what terms the weights are published, in a few words


def release_asset(repo: str, tag: str, filename: str, **fields) -> Published:
    """A GitHub release asset: its address names the tag, which pins it."""
    url = f"https://github.com/{repo}/releases/download/{tag}/{filename}"
    return Published(repo, filename, tag, url=url, **fields)


def _samsone(size: str, parameters: int, download_mb: int, mmau: str) -> Published:
    return release_asset(SAMSONE_REPO, SAMSONE_TAG, f"samsone_{size}_model_bf16.ckpt", preset=f"samsone-{size}",
                         family="samsone", parameters=parameters, download_mb=download_mb, terms=NO_LICENCE,
                         about=f"sound, speech, music; MMAU {mmau}")


# Tests add entries (`tiny` models on local fake servers); these are the names the CLI knows.
PUBLISHED: dict[str, Published] = {
    "v0": Published(MELLOW_REPO, "v0.ckpt", MELLOW_REVISION, "v0", "sounds; comparing two clips",
                    parameters=167_020_951, download_mb=670, terms=MELLOW_TERMS),
    "v0_s": Published(MELLOW_REPO, "v0_s.ckpt", MELLOW_REVISION, "v0_s", "as v0 (its second variant)",
                      parameters=167_020_951, download_mb=670, terms=MELLOW_TERMS),
    "tinymu": Published(TINYMU_REPO, "tinymu.pt", TINYMU_REVISION, "tinymu", "music: genre, mood, instruments",
                        family="tinymu", parameters=229_054_592, download_mb=920, terms=NO_LICENCE),
    "samsone-99m": _samsone("99m", 99_213_504, 200, "58.1"),
    "samsone-134m": _samsone("134m", 134_614_464, 270, "61.3"),
    "samsone-356m": _samsone("356m", 356_883_264, 715, "62.0"),
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
    url: str | None = None  # a published model's plain HTTPS address (a release asset)
    sha256: str | None = None  # a published file's pinned sha256, when known


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
                           revision=pub.revision, preset=pub.preset, family=pub.family, url=pub.url,
                           sha256=pub.sha256)
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
