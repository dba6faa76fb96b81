"""One file from a plain HTTPS address (a GitHub release asset) into the cache: pinned by the
release tag in its address, its sha256 recorded at the first download and checked at every later
one.

The hub names a file's sha256 before it is fetched (hub.py checks against it); a release host
names none. So a sha256 the catalogue pins is checked before the file is kept; without one, the
first download is recorded as it arrived (its sha256 and size go into the model's source.json),
and every later download of the same address (a repair, `pull --force`) must match that record:
a file replaced under the same tag is refused, not silently adopted.

A connection that drops resumes within the call from where it stopped (HTTP Range, with If-Range
so that a file replaced meanwhile starts over instead of being spliced); a download that fails for
good keeps nothing, and the next run starts afresh. The file comes to `<dest>.incoming-<pid>/`
and is moved to `dest` only once checked, with a sidecar `<dest>.json` so that a conversion that
fails later does not download it again. httpx2, huggingface_hub's own HTTP client, does the
talking (proxies from HTTPS_PROXY and the like, as everywhere). HF_HUB_OFFLINE=1 means no network
here too: it is the one switch for every download.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit

from mellow_cli.errors import ModelError
from mellow_cli.events import note
from mellow_cli.files import check_space, disk_full, first_line, read_json, sha256, write_json_atomic
from mellow_cli.store.conversion import megabyte_bar
from mellow_cli.store.hub import interrupted, offline, offline_error, unreachable

# Seconds to wait before each further attempt after a dropped connection or a server error
# (the file resumes where it stopped); a download that fails this often stops for good.
RETRY_DELAYS = (1.0, 2.0, 4.0, 8.0)
# The statuses a later attempt may get past: the server, not the address, is at fault.
_PASSING = {408, 425, 429, 500, 502, 503, 504}


@dataclass(frozen=True)
class Expected:
    """What the file must be, known before it is fetched."""

    sha256: str
    size: int | None
    where: str  # how we know, for messages: "pinned in the catalogue", "recorded at its first download"
    otherwise: str  # what to do if the file is another one, for messages


class _Retry(Exception):
    """An attempt that stopped part-way; a later one may resume it."""


def download(url: str, dest: Path, *, name: str, progress: bool, expected: Expected | None = None,
             reserve_factor: int = 1) -> dict:
    """The file at `url` into `dest`, checked against `expected` when given. `reserve_factor` 2
    checks there is room for the converted copy too. Returns {path, url, size, sha256}."""
    if offline():
        raise offline_error(name)
    dest.parent.mkdir(parents=True, exist_ok=True)
    sidecar = dest.with_name(f"{dest.name}.json")
    earlier = _earlier(dest, sidecar, url, expected)
    if earlier is not None:
        return earlier
    sidecar.unlink(missing_ok=True)
    dest.unlink(missing_ok=True)
    # One folder per process; a process killed part-way leaves its folder to `mellow models rm`,
    # and no later run reads it.
    incoming = dest.with_name(f"{dest.name}.incoming-{os.getpid()}")
    shutil.rmtree(incoming, ignore_errors=True)
    try:
        incoming.mkdir()
        part = incoming / dest.name
        size, digest = _fetch(url, part, name, progress, dest.parent, reserve_factor)
        _check(url, size, digest, expected)
        os.replace(part, dest)
    except OSError as e:
        if e.errno in (errno.ENOSPC, errno.EDQUOT):
            raise disk_full(dest.parent, name) from None
        raise
    finally:
        shutil.rmtree(incoming, ignore_errors=True)
    record = {"path": str(dest), "url": url, "size": size, "sha256": digest}
    write_json_atomic(sidecar, record)
    return record


def _earlier(dest: Path, sidecar: Path, url: str, expected: Expected | None) -> dict | None:
    """A download an earlier run finished and checked (then stopped before converting it), if
    its bytes still hash to what was recorded and `expected` allows it."""
    done = read_json(sidecar)
    if not (done and dest.is_file() and done.get("url") == url and done.get("size") == dest.stat().st_size):
        return None
    if expected is not None and done.get("sha256") != expected.sha256:
        return None
    return done if sha256(dest) == done.get("sha256") else None


def _check(url: str, size: int, digest: str, expected: Expected | None) -> None:
    if expected is None:
        return
    problem = None
    if expected.size is not None and size != expected.size:
        problem = f"{size} bytes, not the {expected.size} {expected.where}"
    elif digest != expected.sha256:
        problem = f"sha256 {digest[:12]}…, not the {expected.sha256[:12]}… {expected.where}"
    if problem:
        raise ModelError(f"{url} arrived with {problem}; nothing is kept: {expected.otherwise}")


def _fetch(url: str, path: Path, name: str, progress: bool, room: Path, reserve_factor: int) -> tuple[int, str]:
    """GET `url` into `path`, resuming a dropped connection; (bytes, sha256). `room`: the folder
    whose disk must hold `reserve_factor` times the file."""
    import httpx2

    from mellow_cli.version import __version__

    state = _Download()
    headers = {"User-Agent": f"mellow-cli/{__version__}", "Accept-Encoding": "identity"}
    timeout = httpx2.Timeout(30.0, connect=10.0)
    note(f"{name}: downloading {url}", progress)
    with contextlib.ExitStack() as stack:
        client = stack.enter_context(httpx2.Client(follow_redirects=True, timeout=timeout, headers=headers))
        out = stack.enter_context(open(path, "wb"))
        advance = None
        for attempt in range(len(RETRY_DELAYS) + 1):
            if attempt:
                time.sleep(RETRY_DELAYS[attempt - 1])
            try:
                with client.stream("GET", url, headers=state.resume_headers()) as response:
                    state.start(response, out, url)
                    if advance is None:
                        if state.total is not None:
                            check_space(room, state.total * reserve_factor, name)
                        filename = urlsplit(url).path.rsplit("/", 1)[-1]
                        advance = stack.enter_context(megabyte_bar(f"{name}: downloading {filename} (MB)",
                                                                   state.total, progress))
                    for chunk in response.iter_raw():  # as they arrive: a drop loses none
                        state.write(out, chunk)
                        advance(len(chunk))
                    state.finish()
                    return state.received, state.hash.hexdigest()
            except _Retry as e:
                reason = str(e)
            except httpx2.RemoteProtocolError:  # the body ended before its announced length
                reason = f"short read: {state.so_far()}"
            except httpx2.ConnectError as e:
                if state.received == 0 and state.total is None:  # never reached: retrying will not help
                    raise unreachable(url, name, first_line(e)) from None
                reason = f"cannot reconnect after {state.so_far()}: {first_line(e)}"
            except httpx2.UnsupportedProtocol as e:
                raise ModelError(f"{url}: not an address mellow can download from ({first_line(e)})") from None
            except httpx2.TransportError as e:  # reset, timeout, a proxy giving up
                reason = f"connection dropped after {state.so_far()}: {first_line(e)}"
            except httpx2.HTTPError as e:  # too many redirects, a malformed address: no retry helps
                raise ModelError(f"{url}: {first_line(e)}") from None
        raise interrupted(url, name, state.total, reason)


class _Download:
    """What has arrived so far, and how the next request resumes it."""

    def __init__(self):
        self.received = 0
        self.total: int | None = None  # as the server announced it
        self.etag: str | None = None  # a strong one, for If-Range
        self.hash = hashlib.sha256()

    def so_far(self) -> str:
        return f"{self.received} of {self.total if self.total is not None else '?'} bytes"

    def resume_headers(self) -> dict:
        if not self.received:
            return {}
        headers = {"Range": f"bytes={self.received}-"}
        if self.etag:
            headers["If-Range"] = self.etag  # a changed file comes whole (200), never spliced
        return headers

    def start(self, response, out, url: str) -> None:
        """Take the response's status and headers: resume, start over, or stop."""
        status = response.status_code
        if status >= 400:
            if status == 416 and self.received:  # what we hold is no prefix of the file: start over
                self._restart(out)
                raise _Retry("HTTP 416")
            if status in _PASSING:
                raise _Retry(f"HTTP {status}")
            raise ModelError(f"{url}: HTTP {status} ({_phrase(status)}){_hint(status)}")
        if status == 206 and self.received:
            start, total = _content_range(response.headers.get("content-range", ""))
            if start != self.received:
                self._restart(out)
                raise _Retry(f"the server resumed at byte {start}, not {self.received}")
            self.total = total if total is not None else self.total
            return
        self._restart(out)  # 200: the whole file, from its first byte
        length = response.headers.get("content-length")
        self.total = int(length) if length and length.isdigit() else None
        etag = response.headers.get("etag")
        self.etag = etag if etag and not etag.startswith("W/") else None

    def write(self, out, chunk: bytes) -> None:
        out.write(chunk)
        self.hash.update(chunk)
        self.received += len(chunk)

    def finish(self) -> None:
        if self.total is not None and self.received != self.total:
            raise _Retry(f"short read: {self.so_far()}")

    def _restart(self, out) -> None:
        out.seek(0)
        out.truncate()
        self.received = 0
        self.hash = hashlib.sha256()


def _content_range(value: str) -> tuple[int | None, int | None]:
    """`bytes 100-999/1000` -> (100, 1000); the total may be `*` (unknown)."""
    try:
        unit, _, rest = value.partition(" ")
        span, _, total = rest.partition("/")
        return int(span.split("-")[0]), (None if total.strip() == "*" else int(total))
    except ValueError:
        return None, None


def _phrase(status: int) -> str:
    from http import HTTPStatus

    with contextlib.suppress(ValueError):
        return HTTPStatus(status).phrase.lower()
    return "error"


def _hint(status: int) -> str:
    if status == 404:
        return ": the release has no such file (a newer mellow-cli may know where it moved)"
    if status in (401, 403):
        return ": the host refused it (a rate limit or a proxy): try again later"
    return ""

