"""Tokenizer folders: which files make one, the pinned tokenizer the published models were trained
with, and where a model's tokenizer comes from (beside its weights, the cache, or the hub).

Cache layout: tokenizers/<owner>--<repo>/<revision>/ holds the files as downloaded.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from mellow_cli.errors import ModelError
from mellow_cli.files import cache_dir, slug
from mellow_cli.store.hub import download, offline

# The tokenizer the published model was trained with (base SmolLM2, not Instruct), pinned.
TOKENIZER_REPO = "HuggingFaceTB/SmolLM2-135M"
TOKENIZER_REVISION = "93efa2f097d58c2a74874c7e644dbc9b0cee75a2"
# Tokenizers that are the pinned one under another name. SmolLM2-360M (Samsone's 356M language
# model) has a tokenizer.json identical to 135M's: one BPE vocabulary and merge list for every
# SmolLM2 size. Models naming it use the pinned 135M files, so they need no second
# download and never an unpinned "main".
SAME_TOKENIZER = {"HuggingFaceTB/SmolLM2-360M": TOKENIZER_REPO}
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json")
OPTIONAL_TOKENIZER_FILES = ("special_tokens_map.json",)


def tokenizer_beside(folder: Path) -> Path | None:
    """`folder` if it holds a tokenizer's files, else None."""
    return folder if all((folder / f).is_file() for f in TOKENIZER_FILES) else None


def tokenizer_folder(cfg: Any, name: str, progress: bool) -> Path:
    """The tokenizer files of cfg.tokenizer (at the pinned revision for SmolLM2), from the cache or
    the hub."""
    repo = SAME_TOKENIZER.get(cfg.tokenizer, cfg.tokenizer)
    revision = TOKENIZER_REVISION if repo == TOKENIZER_REPO else "main"
    folder = cache_dir() / "tokenizers" / repo.replace("/", "--") / slug(revision)
    if tokenizer_beside(folder):
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
