"""Small helpers for the model cache's files: where the cache is, names, hashes, atomic JSON, and
the one-line messages that mention them."""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import contextlib
import stat
from collections.abc import Callable, Iterator
from pathlib import Path

from mellow_cli.errors import MellowError, ModelError


def cache_dir() -> Path:
    """Root of everything mellow keeps: MELLOW_HOME if set, else the platform's user cache."""
    home = os.environ.get("MELLOW_HOME")
    if home:
        return Path(home).expanduser()
    import platformdirs

    return Path(platformdirs.user_cache_dir("mellow", appauthor=False))


def slug(text: str) -> str:
    # No leading dots: a slug names a folder, and "." or ".." would name another one.
    return re.sub(r"[^\w.-]+", "-", text).strip("-").lstrip(".") or "model"


def beside_or_here(folder: str, path: str) -> str:
    """A relative path that a data file names (a row's audio), as every reader of such files finds
    it: under `folder` (the data file's own, or the root the user gave) first, so that a file and
    its audio can move together; else under the current folder, where a list written for
    `mellow ask --input` was once looked up. Neither holding it: the first, which the error names.
    A data file in the current folder gives its paths back as written."""
    path = os.path.expanduser(path)
    if not folder or os.path.isabs(path) or os.path.abspath(folder) == os.getcwd():
        return path
    beside = os.path.normpath(os.path.join(folder, path))
    return path if not os.path.exists(beside) and os.path.exists(path) else beside


def glob_escape(text: str) -> str:
    return re.sub(r"([*?\[])", r"[\1]", text)


def sha256(path: Path | str, advance: Callable[[int], None] | None = None) -> str:
    """The file's sha256, in hex; `advance(nbytes)` after each 4 MB read, for a progress bar."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 22):
            h.update(chunk)
            if advance is not None:
                advance(len(chunk))
    return h.hexdigest()


def git_blob_sha1(path: Path) -> str:
    h = hashlib.sha1(f"blob {path.stat().st_size}\0".encode())
    with open(path, "rb") as f:
        while chunk := f.read(1 << 22):
            h.update(chunk)
    return h.hexdigest()


def read_json(path: Path) -> dict | None:
    """A small JSON object this program keeps (read_table), None where there is none to use."""
    try:
        return read_table(path, "json")
    except MellowError:
        return None


# What a settings or record file of this program holds is a few kilobytes: a larger one was not
# written by it (and a device such as /dev/zero, or a pipe, would be read without end).
TABLE_BYTES = 1 << 20


def read_table(path: Path, syntax: str) -> dict | None:
    """The table in a small file of settings or records (`syntax` "json": an object; "toml"),
    None where there is no file: the one reader of such files. Anything but a regular file of at
    most TABLE_BYTES of UTF-8 that parses, nested no deeper than the parser goes (Python's
    recursion limit), is a MellowError naming the file and what is wrong with it. A pipe or a
    device is never opened for reading: it could block or never end."""
    try:
        mode = os.stat(path).st_mode
        if stat.S_ISREG(mode):  # else not even opened: opening a device may do something
            # Not blocking: a pipe put there since is then seen by fstat, never waited on.
            with open(os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0)), "rb") as f:
                mode = os.fstat(f.fileno()).st_mode
                data = f.read(TABLE_BYTES + 1) if stat.S_ISREG(mode) else b""
    except FileNotFoundError:
        return None
    except OSError as e:
        raise MellowError(f"{path}: cannot read it ({e.strerror or e})") from None
    if not stat.S_ISREG(mode):
        raise MellowError(f"{path}: {_kind(mode)}, not a file")
    if len(data) > TABLE_BYTES:
        raise MellowError(f"{path}: larger than {TABLE_BYTES >> 20} MiB, not a file of this program's")
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError:
        raise MellowError(f"{path}: not UTF-8 text") from None
    try:
        table = _toml().loads(text) if syntax == "toml" else json.loads(text)
    except RecursionError:
        raise MellowError(f"{path}: nested too deeply") from None
    except ValueError as e:  # TOMLDecodeError and JSONDecodeError are ValueErrors
        raise MellowError(f"{path}: not valid {syntax.upper()} ({first_line(e)})") from None
    if not isinstance(table, dict):
        raise MellowError(f"{path}: not a JSON object")
    return table


def _toml():
    try:
        import tomllib
    except ImportError:  # Python 3.10
        import tomli as tomllib
    return tomllib


def _kind(mode: int) -> str:
    return "a folder" if stat.S_ISDIR(mode) else "a pipe" if stat.S_ISFIFO(mode) else "a device or socket"


@contextlib.contextmanager
def cache_lock(name: str, on_wait: Callable[[], None]) -> Iterator[None]:
    """Hold the cache's lock `name` (a file in <cache>/.locks) for the block, so that one process
    at a time does the work it guards; `on_wait` runs once if another process holds it, before
    waiting for it. A cache that cannot be written (shared, on a read-only mount) has no locks:
    the block runs unguarded, as it would anyway serve only what it has."""
    from filelock import FileLock, Timeout

    locks = cache_dir() / ".locks"
    try:
        locks.mkdir(parents=True, exist_ok=True)
        held = FileLock(str(locks / f"{name}.lock"))
        try:
            held.acquire(timeout=0.5)
        except Timeout:
            on_wait()
            held.acquire()
    except OSError:
        yield
        return
    try:
        yield
    finally:
        held.release()


def write_json_atomic(path: Path, data: dict) -> None:
    write_text_atomic(path, json.dumps(data, indent=2) + "\n")


def write_text_atomic(path: Path, text: str) -> None:
    """`text` as the whole of `path`, or the file as it was: written first to a file created for
    it beside `path` (never one already there, which might be a link leading elsewhere), then
    renamed over it."""
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.unlink(missing_ok=True)  # left by an earlier process of this id; a link goes, not what it names
    try:
        with open(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666), "w", encoding="utf-8") as f:
            f.write(text)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def text_lines(text: str) -> list[str]:
    """The lines of a text, split at "\n" only (a "\r" before it dropped): str.splitlines() also
    splits at U+2028, U+2029, U+0085 and other characters that a JSON string or a CSV field holds
    as text, and would cut such a row in two."""
    lines = text.split("\n")
    if lines[-1] == "":
        lines.pop()
    return [line[:-1] if line.endswith("\r") else line for line in lines]


def megabytes(n: int | None) -> str:
    """A size for messages: "670.1 MB", "?" when unknown (cli_models.py uses it too)."""
    return "?" if n is None else f"{n / 1e6:.1f} MB"


def first_line(e: BaseException | str) -> str:
    text = str(e).strip() or type(e).__name__
    return text.splitlines()[0][:200]


def few(items, shown: int = 3) -> str:
    """`a, b, c and 7 more`: a long list named in a line that stays short."""
    items = [str(i) for i in items]
    if len(items) > shown + 1:
        return f"{', '.join(items[:shown])} and {len(items) - shown} more"
    return " and ".join(filter(None, [", ".join(items[:-1]), items[-1] if items else ""]))


def check_space(folder: Path, needed: int, name: str) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    free = shutil.disk_usage(folder).free
    if free < needed:
        raise disk_full(folder, name, needed, free)


def disk_full(folder: Path, name: str, needed: int | None = None, free: int | None = None) -> ModelError:
    amount = f" (needs {megabytes(needed)}, {megabytes(free)} free)" if needed is not None else ""
    return ModelError(f"not enough disk space in {folder} for {name}{amount}: free some space, or set "
                      "MELLOW_HOME to a folder on a disk with room")


class FilePages:
    """Drops pages of tensors memory-mapped from `path` (`__call__`): after the language model's
    matrices are converted (precision.py), the float32 originals are never read again, and their
    resident memory goes now instead of when the whole file is unmapped. Only whole pages inside
    the tensors and inside a mapping of `path` itself are dropped (as /proc/self/maps shows them):
    a later read would see the file's bytes again, never zeros, and memory of our own is never
    touched. The mappings are read once, at the first call (a load releases its weights layer by
    layer, ~100 calls, and the file's mappings stay put while its tensors live). Elsewhere (not
    Linux) this does nothing."""

    def __init__(self, path: Path):
        self.path = path
        self._spans: list[tuple[int, int]] | None = None
        self._libc = None

    def __call__(self, tensors) -> int:
        """Bytes dropped."""
        import ctypes
        import mmap

        if self._spans is None:
            try:
                maps = Path("/proc/self/maps").read_text().splitlines()
                self._libc = ctypes.CDLL(None, use_errno=True)
            except OSError:
                maps = []
            target = str(Path(self.path).resolve())
            self._spans = [tuple(int(a, 16) for a in parts[0].split("-"))
                           for parts in (line.split(maxsplit=5) for line in maps)
                           if len(parts) == 6 and parts[5] == target]
        page, dropped = mmap.PAGESIZE, 0
        for t in tensors:
            start, end = t.data_ptr(), t.data_ptr() + t.numel() * t.element_size()
            first, last = -(-start // page) * page, end // page * page  # whole pages inside the tensor
            if last > first and any(low <= first and last <= high for low, high in self._spans):
                if self._libc.madvise(ctypes.c_void_p(first), ctypes.c_size_t(last - first), 4) == 0:  # MADV_DONTNEED
                    dropped += last - first
        return dropped
