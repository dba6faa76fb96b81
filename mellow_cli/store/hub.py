"""One file from the Hugging Face hub into the cache: pinned to a commit, verified.

huggingface_hub's public `get_hf_file_metadata` names the file's ETag, size and commit (and, when
it fails, why, in one line); its `hf_hub_download` fetches the file at that commit, resuming a
dropped connection within the call with an HTTP Range; our own check of the finished file against
the ETag (the sha256 of an LFS file, the git blob sha1 of a small one) decides whether it is kept.
A download that fails for good starts over on the next run: huggingface_hub writes each attempt
to a file of its own and deletes it on failure (so that processes whose file lock the filesystem
ignores cannot append to one file), and we keep no partial file either.

Network settings are read when a download starts, not at import: HF_ENDPOINT (a mirror),
HF_TOKEN (private or gated repos), HF_HUB_OFFLINE=1 (never touch the network).
"""

from __future__ import annotations

import contextlib
import errno
import os
import re
import shutil
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from mellow_cli.errors import ModelError
from mellow_cli.files import (
    check_space,
    disk_full,
    first_line,
    git_blob_sha1,
    megabytes,
    read_json,
    sha256,
    write_json_atomic,
)


@dataclass(frozen=True)
class _Remote:
    """What the hub says of one file before it is fetched."""

    etag: str  # sha256 (LFS) or git blob sha1, without quotes
    size: int | None
    commit: str  # the commit the revision named when asked: every byte comes from it


def _endpoint() -> str:
    return (os.environ.get("HF_ENDPOINT") or "https://huggingface.co").rstrip("/")


def offline() -> bool:
    return any(os.environ.get(v, "").strip().lower() in {"1", "true", "yes", "on"}
               for v in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"))


def download(repo: str, filename: str, revision: str, dest: Path, *, name: str, progress: bool,
             optional: bool = False, reserve_factor: int = 1) -> dict | None:
    """One file from the hub into `dest`, verified.

    The file comes to `<dest>.incoming-<pid>/` and is moved to `dest` only once its size and hash
    match the hub's ETag; a sidecar `<dest>.json` records it, so a later attempt (after a failed
    conversion, say) uses it without downloading again. `reserve_factor` 2 checks there is room
    for the converted copy too. Returns {path, repo, filename, revision, commit, etag, size,
    sha256}; None if `optional` and the repo has no such file."""
    if offline():
        raise offline_error(name)
    remote = _metadata(repo, filename, revision, name, optional)
    if remote is None:
        return None
    dest.parent.mkdir(parents=True, exist_ok=True)
    sidecar = dest.with_name(f"{dest.name}.json")
    if dest.is_file():  # downloaded and verified by an earlier attempt that stopped later on
        done = read_json(sidecar)
        if done and done.get("etag") == remote.etag and done.get("size") == dest.stat().st_size:
            return done
        dest.unlink()
    if remote.size is not None:
        check_space(dest.parent, remote.size * reserve_factor, name)
    # One folder per process: two processes fetching the same tokenizer never touch each other's
    # file. A process killed part-way leaves its folder to `mellow models rm`.
    incoming = dest.with_name(f"{dest.name}.incoming-{os.getpid()}")
    try:
        got = _fetch(repo, filename, remote, incoming, name, progress)
        digest = _verified(got, remote, repo, filename, name)
        os.replace(got, dest)
    finally:
        shutil.rmtree(incoming, ignore_errors=True)
    record = {"path": str(dest), "repo": repo, "filename": filename, "revision": revision,
              "commit": remote.commit, "etag": remote.etag, "size": dest.stat().st_size, "sha256": digest}
    write_json_atomic(sidecar, record)
    return record


def announced(repo: str, filename: str, revision: str, name: str) -> tuple[str | None, int | None, str]:
    """What the hub says of a file without fetching it: (its sha256, None for a small file whose
    ETag is a git sha1; its size; the commit `revision` names). A one-line ModelError when the hub
    cannot be asked (offline, unreachable) or has no such file."""
    if offline():
        raise offline_error(name)
    remote = _metadata(repo, filename, revision, name, optional=False)
    digest = remote.etag if re.fullmatch(r"[0-9a-f]{64}", remote.etag) else None
    return digest, remote.size, remote.commit


def _metadata(repo: str, filename: str, revision: str, name: str, optional: bool) -> _Remote | None:
    """The hub's ETag, size and commit for one file; a one-line ModelError for every failure."""
    from huggingface_hub import get_hf_file_metadata, hf_hub_url
    from huggingface_hub.errors import (
        EntryNotFoundError,
        GatedRepoError,
        HfHubHTTPError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    from mellow_cli.version import __version__

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
        raise unreachable(endpoint, name, first_line(e)) from None
    return _Remote((meta.etag or "").strip('"'), meta.size, meta.commit_hash or revision)


def _fetch(repo: str, filename: str, remote: _Remote, folder: Path, name: str, progress: bool) -> Path:
    """hf_hub_download of the file at `remote.commit` into `folder`; its path there."""
    from huggingface_hub import hf_hub_download
    from huggingface_hub.errors import HfHubHTTPError

    from mellow_cli.version import __version__

    try:
        with _progress_bars(progress):
            return Path(hf_hub_download(repo, filename, revision=remote.commit, local_dir=folder,
                                        endpoint=_endpoint(), etag_timeout=_timeout("HF_HUB_ETAG_TIMEOUT", 10.0),
                                        library_name="mellow-cli", library_version=__version__))
    except HfHubHTTPError as e:  # before OSError: it is one
        status = getattr(getattr(e, "response", None), "status_code", "?")
        raise interrupted(f"{repo}/{filename}", name, remote.size, f"HTTP {status}") from None
    except OSError as e:
        if e.errno in (errno.ENOSPC, errno.EDQUOT):
            raise disk_full(folder.parent, name) from None
        raise interrupted(f"{repo}/{filename}", name, remote.size, first_line(e.__cause__ or e)) from None
    except Exception as e:  # the connection dropped more often than hf_hub_download retries
        raise interrupted(f"{repo}/{filename}", name, remote.size, first_line(e)) from None


def _verified(path: Path, remote: _Remote, repo: str, filename: str, name: str) -> str:
    """The file's sha256, once its size and hash match what the hub announced; a damaged file is
    deleted and refused."""
    got = path.stat().st_size
    digest = sha256(path)
    problem = None
    if remote.size is not None and got != remote.size:
        problem = f"{got} bytes, expected {remote.size}"
    elif re.fullmatch(r"[0-9a-f]{64}", remote.etag) and digest != remote.etag:
        problem = f"sha256 {digest[:12]}…, expected {remote.etag[:12]}…"
    elif re.fullmatch(r"[0-9a-f]{40}", remote.etag) and git_blob_sha1(path) != remote.etag:
        problem = f"git sha1 differs from {remote.etag[:12]}…"
    if problem:
        path.unlink(missing_ok=True)
        raise ModelError(f"{repo}/{filename} arrived damaged ({problem}); the file is deleted: "
                         f"run `mellow models pull {name}` again to download it afresh")
    return digest


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


def interrupted(what: str, name: str, size: int | None, reason: str) -> ModelError:
    """A download that stopped for good (`what`: the file, as messages name it)."""
    return ModelError(f"download of {what} ({megabytes(size)}) stopped ({reason}): check the "
                      f"network and run `mellow models pull {name}` again")


def unreachable(host: str, name: str, reason: str) -> ModelError:
    """No connection to `host` at all: the network, not the file."""
    return ModelError(f"cannot reach {host} to download {name} ({reason}): check the network and run "
                      f"`mellow models pull {name}` again, or pass --model PATH")


def offline_error(name: str) -> ModelError:
    return ModelError(f"{name} is not in the cache and HF_HUB_OFFLINE is set: run "
                      f"`mellow models pull {name}` with network, or pass --model PATH")
