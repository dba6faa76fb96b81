"""One file from the Hugging Face hub into the cache: pinned to a commit, resumable, verified.

Network settings are read when a download starts, not at import: HF_ENDPOINT (a mirror),
HF_TOKEN (private or gated repos), HF_HUB_OFFLINE=1 (never touch the network).
"""

from __future__ import annotations

import contextlib
import errno
import os
import re
from collections.abc import Iterator
from pathlib import Path

from .errors import ModelError
from .files import (
    check_space,
    disk_full,
    first_line,
    git_blob_sha1,
    glob_escape,
    megabytes,
    note,
    read_json,
    sha256,
    slug,
    write_json_atomic,
)


def _endpoint() -> str:
    return (os.environ.get("HF_ENDPOINT") or "https://huggingface.co").rstrip("/")


def offline() -> bool:
    return any(os.environ.get(v, "").strip().lower() in {"1", "true", "yes", "on"}
               for v in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"))


def download(repo: str, filename: str, revision: str, dest: Path, *, name: str, progress: bool,
             optional: bool = False, reserve_factor: int = 1) -> dict | None:
    """One file from the hub into `dest`, resumable and verified.

    Bytes go to `<dest>.<etag>.part`; an interrupted download keeps it, and the next attempt asks
    for the rest with an HTTP Range (huggingface_hub's `http_get` also resumes within one attempt
    when the connection drops). The finished file is checked against the hub's ETag (the sha256
    of an LFS file, the git blob sha1 of a small one) and only then renamed to `dest`.
    Returns {path, repo, filename, revision, commit, etag, size, sha256}; None if `optional` and
    the repo has no such file."""
    from huggingface_hub import get_hf_file_metadata, hf_hub_url
    from huggingface_hub.errors import (
        EntryNotFoundError,
        GatedRepoError,
        HfHubHTTPError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )
    from huggingface_hub.file_download import http_get
    from huggingface_hub.utils import build_hf_headers

    from . import __version__

    if offline():
        raise ModelError(f"{name} is not in the cache and HF_HUB_OFFLINE is set: run "
                         f"`mellow models pull {name}` with network, or pass --model PATH")
    endpoint = _endpoint()
    url = hf_hub_url(repo, filename, revision=revision, endpoint=endpoint)
    try:
        meta = get_hf_file_metadata(url, timeout=_timeout("HF_HUB_ETAG_TIMEOUT", 10.0),
                                    library_name="mellow-cli", library_version=__version__)
    except EntryNotFoundError:
        if optional:
            return None
        raise ModelError(f"{repo} has no file {filename} at revision {revision}: check the model name") from None
    except RevisionNotFoundError:
        raise ModelError(f"{repo} has no revision {revision!r}: check the name after @") from None
    except GatedRepoError:
        raise ModelError(f"{repo} is gated: accept its terms on the hub, then set HF_TOKEN to a token "
                         "of that account") from None
    except RepositoryNotFoundError:
        raise ModelError(f"no model repo {repo} on {endpoint} (or it is private: set HF_TOKEN to a "
                         "token that can read it)") from None
    except HfHubHTTPError as e:
        status = getattr(getattr(e, "response", None), "status_code", "?")
        hint = "set HF_TOKEN to a token that can read it" if status in (401, 403) else "try again later"
        raise ModelError(f"{endpoint} answered HTTP {status} for {repo}/{filename}: {hint}") from None
    except Exception as e:  # connection refused, DNS, timeout, proxy: the network, not the file
        raise ModelError(f"cannot reach {endpoint} to download {name} ({first_line(e)}): check the "
                         f"network and run `mellow models pull {name}` again, or pass --model PATH") from None

    etag = (meta.etag or "").strip('"')
    size = meta.size
    commit = meta.commit_hash or revision
    dest.parent.mkdir(parents=True, exist_ok=True)
    sidecar = dest.with_name(f"{dest.name}.json")
    if dest.is_file():  # downloaded and verified by an earlier attempt that stopped later on
        done = read_json(sidecar)
        if done and done.get("etag") == etag and done.get("size") == dest.stat().st_size:
            return done
        dest.unlink()
    part = dest.with_name(f"{dest.name}.{slug(etag)[:64] or 'noetag'}.part")
    for stale in dest.parent.glob(f"{glob_escape(dest.name)}.*.part"):
        if stale != part:
            stale.unlink(missing_ok=True)
    have = part.stat().st_size if part.exists() else 0
    if size is not None and have > size:
        part.unlink()
        have = 0
    if size is not None:
        check_space(dest.parent, (size - have) + size * (reserve_factor - 1), name)
    if have:
        note(f"{name}: resuming {filename} at {megabytes(have)} of {megabytes(size)}", progress)
    headers = build_hf_headers(library_name="mellow-cli", library_version=__version__)
    # Download from the commit the metadata came from, so a push in between cannot mix files.
    pinned = hf_hub_url(repo, filename, revision=commit, endpoint=endpoint)
    try:
        with _progress_bars(progress), open(part, "ab") as f:
            http_get(pinned, f, resume_size=have, headers=headers, expected_size=size,
                     displayed_filename=filename)
    except HfHubHTTPError as e:  # before OSError: it is one
        status = getattr(getattr(e, "response", None), "status_code", "?")
        done = part.stat().st_size if part.exists() else 0
        raise _interrupted(repo, filename, name, done, size, f"HTTP {status}") from None
    except OSError as e:
        if e.errno in (errno.ENOSPC, errno.EDQUOT):
            raise disk_full(dest.parent, name) from None
        done = part.stat().st_size if part.exists() else 0
        raise _interrupted(repo, filename, name, done, size, e) from None
    except Exception as e:  # the connection dropped more often than http_get retries
        done = part.stat().st_size if part.exists() else 0
        raise _interrupted(repo, filename, name, done, size, e) from None

    got = part.stat().st_size
    digest = sha256(part)
    problem = None
    if size is not None and got != size:
        problem = f"{got} bytes, expected {size}"
    elif re.fullmatch(r"[0-9a-f]{64}", etag) and digest != etag:
        problem = f"sha256 {digest[:12]}…, expected {etag[:12]}…"
    elif re.fullmatch(r"[0-9a-f]{40}", etag) and git_blob_sha1(part) != etag:
        problem = f"git sha1 differs from {etag[:12]}…"
    if problem:
        part.unlink(missing_ok=True)
        raise ModelError(f"{repo}/{filename} arrived damaged ({problem}); the partial file is deleted: "
                         f"run `mellow models pull {name}` again to download it afresh")
    os.replace(part, dest)
    record = {"path": str(dest), "repo": repo, "filename": filename, "revision": revision,
              "commit": commit, "etag": etag, "size": got, "sha256": digest}
    write_json_atomic(sidecar, record)
    return record


def _timeout(var: str, default: float) -> float:
    try:
        return float(os.environ.get(var, default))
    except ValueError:
        return default


@contextlib.contextmanager
def _progress_bars(enabled: bool) -> Iterator[None]:
    """huggingface_hub draws the download bar (tqdm, on stderr); switch it off for --quiet."""
    from huggingface_hub.utils import (
        are_progress_bars_disabled,
        disable_progress_bars,
        enable_progress_bars,
    )

    was_disabled = are_progress_bars_disabled()
    if not enabled and not was_disabled:
        disable_progress_bars()
    try:
        yield
    finally:
        if not enabled and not was_disabled:
            enable_progress_bars()


def _interrupted(repo: str, filename: str, name: str, done: int, size: int | None, why) -> ModelError:
    reason = why if isinstance(why, str) else first_line(why)
    return ModelError(f"download of {repo}/{filename} stopped at {megabytes(done)} of {megabytes(size)} ({reason}): "
                      f"check the network and run `mellow models pull {name}` again; it resumes where it stopped")
