"""Result files: where the rows of `-o` and `--output-dir` go for ask, compare and caption, and the
lock that bench's predictions file takes too. How a row looks in each format is formats.py's.

A result file is precious (a batch run can take hours), so opening one follows three rules:
- one writer at a time: the file is locked (flock) while a run writes it, and a second run that
  names the same file is refused at once instead of silently interleaving or clobbering rows;
- a file that already holds something is left alone unless the user said `--resume` (keep its
  rows, do the rest) or `--overwrite` (start over);
- `--resume` first proves the file is this run's kind of output: the same format and the same
  fields (jsonl: every line an object with exactly these keys, in this order; csv/tsv: this
  header), written by the same model. Until that proof nothing is changed, not even a cut last line.
"""

from __future__ import annotations

import contextlib
import csv
import io
import json
import os
import sys
from collections import Counter
from dataclasses import dataclass, field
from typing import IO, Iterable, Sequence

from mellow_cli.errors import MellowError, UsageError
from mellow_cli.files import text_lines
from mellow_cli.io.formats import RowWriter, check_format

RESUMABLE = ("jsonl", "csv", "tsv")


# --- what makes two rows the same work ------------------------------------------------------------


def row_key(r: dict) -> tuple:
    """What makes a row the same work on a second run: its id (and window) if it has one, else its
    inputs. Ids are compared as text (1 and "1" are one id) and paths as normalised paths."""
    start = r.get("start")
    # A span from 0 is the clip a row without times heard (one clip from the start, as every row
    # of a SPANLESS file did): the same work.
    at = "" if start in (None, "") or float(start) == 0 else f"{float(start):.3f}"
    if r.get("id") not in (None, ""):
        return ("id", str(r["id"]), at)
    return (_path(r.get("audio")), _path(r.get("audio2")), r.get("question") or "", at)


def _path(value) -> str:
    return os.path.normpath(value) if value else ""


def numbered_keys(rows: Iterable[dict]) -> list[tuple]:
    """Each row's key with its occurrence: the same clip named twice is two rows of work, and a
    resumed run counts how many of each are already done."""
    seen: Counter = Counter()
    out = []
    for r in rows:
        key = row_key(r)
        out.append((key, seen[key]))
        seen[key] += 1
    return out


# --- opening a result file ------------------------------------------------------------------------


@dataclass
class Opened:
    """A result file opened for writing: the stream (at its end), whether rows are appended to
    rows already there, and what those rows hold."""

    stream: IO[str]
    append: bool = False
    done: Counter = field(default_factory=Counter)  # row key -> how many such rows the file holds
    models: set = field(default_factory=set)  # the models that wrote them
    created: str | None = None  # the path, when this run created the file
    fields: tuple | None = None  # the fields of the rows it holds, where an older layout's (SPANLESS)

    def close(self) -> None:
        """Close the file; one this run created and never wrote to (it failed before its first
        row) is removed, rather than left behind empty."""
        if self.created:
            with contextlib.suppress(OSError):
                self.stream.flush()
                if os.path.getsize(self.created) == 0:
                    os.remove(self.created)
        self.stream.close()

    def keep(self) -> None:
        """The file is this run's finished output, rows or none (an empty shard's): close()
        leaves it even empty."""
        self.created = None

    def check_model(self, name: str, path: str) -> None:
        """Resumed rows must come from the model that writes the rest."""
        others = sorted(m for m in self.models if m and m != name)
        if others:
            raise UsageError(f"{path}: holds rows written by model {others[0]}; resume with --model {others[0]}, "
                             "or write to another --output")


def open_rows(path: str | None, fmt: str, fields: Sequence[str], *, resume: bool = False,
              overwrite: bool = False) -> Opened:
    """Open `path` for result rows under the rules above (None: stdout). Every refusal is a
    UsageError naming the file, raised before a byte of it changes."""
    check_format(fmt)
    if resume and path is None:
        raise UsageError("--resume needs --output: the file whose rows are kept")
    if resume and fmt not in RESUMABLE:
        raise UsageError(f"--resume needs rows a later run can read back, and {fmt} cannot be: write the output as "
                         f"{', '.join(RESUMABLE)} (a file named .jsonl, .csv or .tsv)")
    if path is None:
        return Opened(_Named(STDOUT, sys.stdout, owned=False))
    if not path.strip():
        raise UsageError("--output is empty: name a file (or leave it out for stdout)")
    if os.path.isdir(path):
        raise UsageError(f"{path}: is a folder; --output takes a file name")
    if os.path.exists(path) and not os.path.isfile(path):  # a pipe or a device: just write to it
        if resume:
            raise UsageError(f"{path}: is not a regular file, so there are no rows to resume from")
        return Opened(_text_stream(path, os.open(path, os.O_WRONLY | os.O_APPEND)))
    existed = os.path.exists(path)
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o666)
    except OSError as e:
        raise MellowError(f"{path}: cannot write the output ({e.strerror or e})") from None
    try:
        lock(fd, path)
        opened = _take(fd, path, fmt, fields, resume, overwrite)
        opened.created = None if existed else path
    except BaseException:
        os.close(fd)
        if not existed:
            with contextlib.suppress(OSError):
                os.remove(path)
        raise
    return opened


@contextlib.contextmanager
def held(path: str):
    """Hold `path`'s lock for the block (a file another writer replaces under its own lock, as
    bench's predictions). A file created only to be locked is removed again if still empty."""
    existed = os.path.exists(path)
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o666)
    except IsADirectoryError:
        raise UsageError(f"{path}: is a folder; name a file") from None
    except OSError as e:
        raise MellowError(f"{path}: cannot write ({e.strerror or e})") from None
    try:
        lock(fd, path)
        yield
    finally:
        os.close(fd)
        if not existed:
            with contextlib.suppress(OSError):
                if os.path.getsize(path) == 0:
                    os.remove(path)


def lock(fd: int, path: str) -> None:
    """Hold an exclusive lock on the open file `fd` until it is closed; refuse at once if another
    process holds one. Where the platform has no flock, files are not locked."""
    try:
        import fcntl
    except ImportError:
        return
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        raise UsageError(f"{path}: another mellow run is writing this file; give each run (each --shard) "
                         "its own --output") from None
    except OSError:
        return  # a file system without locks (some network mounts): write unlocked


def _take(fd: int, path: str, fmt: str, fields: Sequence[str], resume: bool, overwrite: bool) -> Opened:
    size = os.fstat(fd).st_size
    if size and not (resume or overwrite):
        keep = "add --resume to keep its rows and do the rest, " if fmt in RESUMABLE else "add "
        raise UsageError(f"{path}: already holds {_size(size)}; {keep}--overwrite to replace it, or choose another "
                         "--output")
    if size and overwrite:
        os.ftruncate(fd, 0)
        size = 0
    if not size:
        return Opened(_text_stream(path, fd))
    data = os.pread(fd, size, 0)
    keep, rows, layout = _our_rows(path, data, fmt, fields)
    stream = _text_stream(path, fd)
    stream.seek(keep)
    if keep < size:  # a last row cut short by a kill is done again; it goes once the resume is under way
        stream.before_write = lambda: os.ftruncate(fd, keep)
    return Opened(stream, append=keep > 0, done=Counter(key for key, _ in numbered_keys(rows)),
                  models={r.get("model") for r in rows}, fields=None if layout == tuple(fields) else layout)


def _text_stream(path: str, fd: int) -> IO[str]:
    return _Named(path, io.TextIOWrapper(io.FileIO(fd, "w", closefd=True), encoding="utf-8", newline=""))


STDOUT = "standard output"  # how messages name it


@contextlib.contextmanager
def writing(path: str):
    """Write errors inside the block as one line naming the file, so a full disk says which file it
    could not finish. On stdout a reader that went away is left to main's quiet exit."""
    try:
        yield
    except OSError as e:
        if path == STDOUT and isinstance(e, BrokenPipeError):
            raise
        raise MellowError(f"{path}: cannot write the output ({e.strerror or e})") from None


class _Named(io.TextIOBase):
    """A text stream whose write errors name the file; closing it closes the file only if it is
    the run's own (never stdout)."""

    def __init__(self, path: str, inner: IO[str], owned: bool = True):
        self.path, self.inner, self.owned = path, inner, owned
        self.before_write = None  # done once, at the first write (nothing changes before a row comes)

    def write(self, text: str) -> int:
        with writing(self.path):
            if self.before_write is not None:
                self.before_write()
                self.before_write = None
            return self.inner.write(text)

    def flush(self) -> None:
        with writing(self.path):
            self.inner.flush()

    def seek(self, offset: int, whence: int = 0) -> int:
        return self.inner.seek(offset, whence)

    def close(self) -> None:
        if self.owned:
            with contextlib.suppress(OSError):
                self.inner.close()


def _size(n: int) -> str:
    return f"{n} bytes" if n < 10_000 else f"{n / 1e6:.1f} MB"


# Rows written before every row said which span of its recording was heard had no start and end;
# such a file resumes in its own layout (each of its rows heard one clip from the recording's start).
SPANLESS = ("start", "end")


def _our_rows(path: str, data: bytes, fmt: str, fields: Sequence[str]) -> tuple[int, list[dict], tuple]:
    """(bytes to keep, rows, their fields: `fields`, or those without SPANLESS) when `data` is an
    output of this kind of run; otherwise a UsageError that says why and leaves the file as it
    is. Only the last row may be cut short."""
    hint = f"is it the output of an earlier run with these options and --format {fmt}?"
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError:
        raise UsageError(f"{path}: not a UTF-8 text file; {hint}") from None
    whole = text[: text.rfind("\n") + 1] if fmt == "jsonl" else text[: _records_end(text)]
    if not whole.strip():
        raise UsageError(f"{path}: holds no whole line; {hint}")
    keep = len(whole.encode("utf-8"))

    def read(layout: tuple) -> list[dict]:
        return _jsonl_rows(path, whole, layout, hint) if fmt == "jsonl" else _csv_rows(path, whole, fmt, layout, hint)

    try:
        return keep, read(tuple(fields)), tuple(fields)
    except UsageError as refused:
        older = tuple(f for f in fields if f not in SPANLESS)
        try:
            return keep, read(older), older
        except UsageError:
            raise refused from None


def _records_end(text: str) -> int:
    """Where the last whole CSV/TSV record of `text` ends: after its last newline outside quotes
    (a quoted field may hold newlines, and a doubled quote inside one keeps the count even)."""
    end = start = 0
    for i, part in enumerate(text.split('"')):
        if i % 2 == 0 and (newline := part.rfind("\n")) >= 0:
            end = start + newline + 1
        start += len(part) + 1
    return end


def _jsonl_rows(path: str, whole: str, fields: Sequence[str], hint: str) -> list[dict]:
    rows = []
    for number, line in enumerate(text_lines(whole), 1):
        try:
            obj = json.loads(line)
        except (ValueError, RecursionError):
            obj = None
        if not isinstance(obj, dict) or list(obj) != list(fields):
            raise UsageError(f"{path}: line {number} is not a row of this run (fields "
                             f"{', '.join(fields)}); {hint}")
        rows.append(obj)
    return rows


def _csv_rows(path: str, whole: str, fmt: str, fields: Sequence[str], hint: str) -> list[dict]:
    # Read as the csv module reads a file (newline=""): a newline inside a quoted field is text.
    delimiter = "," if fmt == "csv" else "\t"
    reader = csv.reader(io.StringIO(whole, newline=""), delimiter=delimiter)
    try:
        if next(reader) != list(fields):
            raise UsageError(f"{path}: its header is not this run's ({delimiter.join(fields)}); {hint}")
        rows = []
        for cells in reader:
            if len(cells) != len(fields):
                raise UsageError(f"{path}: line {reader.line_num} has {len(cells)} columns, not {len(fields)}; "
                                 f"{hint}")
            rows.append(dict(zip(fields, cells)))
    except csv.Error as e:
        raise UsageError(f"{path}: line {reader.line_num} is not {fmt.upper()} ({e}); {hint}") from None
    return rows


def writer(fmt: str, stream: IO[str], *, many: bool = True, fields: Sequence[str] = (), append: bool = False,
           folder: str = ".", times: bool = False):
    """The writer of a run's rows in `fmt`: formats.RowWriter (`many`: a batch's rows, not one
    input's; `times`: text shows each row's span), or for html the page of them all
    (html.PageWriter; `folder` is where the page goes, for its paths to the audio)."""
    if fmt == "html":
        from mellow_cli.io.html import PageWriter

        return PageWriter(stream, fields, folder)
    return RowWriter(fmt, stream, many=many, fields=fields, append=append, times=times)


# --- a file per recording (--output-dir) ----------------------------------------------------------

EXTENSIONS = {"text": "txt"}  # the file name's extension, where it is not the format's name


def per_input_paths(folder: str, inputs: Sequence[str], fmt: str, overwrite: bool = False) -> dict[str, str]:
    """Where each recording's rows go with --output-dir: DIR/<its name without extension>.<format>,
    as whisper names its subtitles. Refused at once (UsageError), before any work: audio on stdin
    (it has no name), two recordings with one name, a recording given twice, and files that
    already hold anything, unless `overwrite`."""
    from mellow_cli.files import few

    if not folder.strip():
        raise UsageError("--output-dir is empty: name a folder")
    if os.path.exists(folder) and not os.path.isdir(folder):
        raise UsageError(f"{folder}: is a file; --output-dir names a folder")
    paths: dict[str, str] = {}
    owner: dict[str, str] = {index_path(folder): "the index"} if fmt == "html" else {}
    for audio in inputs:
        if audio == "-":
            raise UsageError("--output-dir names each file after its recording, and audio on stdin (-) has no name: "
                             "use -o FILE")
        if audio in paths:
            raise UsageError(f"{audio}: given twice; --output-dir writes one file per recording")
        path = os.path.join(folder, f"{os.path.splitext(os.path.basename(audio))[0]}.{EXTENSIONS.get(fmt, fmt)}")
        if path in owner:
            raise UsageError(f"{owner[path]} and {audio} would both be written to {path}: rename one, or use -o FILE")
        paths[audio], owner[path] = path, audio
    files = [*paths.values(), *([index_path(folder)] if fmt == "html" else [])]
    taken = [p for p in files if os.path.isdir(p) or (os.path.isfile(p) and os.path.getsize(p))]
    if taken and not overwrite:
        raise UsageError(f"{few(taken)} already exist{'s' if len(taken) == 1 else ''}; add --overwrite to replace "
                         f"{'it' if len(taken) == 1 else 'them'}, or choose another --output-dir")
    return paths


def index_path(folder: str) -> str:
    """Where --output-dir's html index goes, beside the pages it links."""
    return os.path.join(folder, "index.html")


class FilePerInput:
    """Rows to a file per recording (per_input_paths): each file is opened by open_rows (locked,
    emptied first with `overwrite`) when its recording's first row comes and closed after its
    last, so the files of a long run appear one by one. A recording's rows come together (its
    windows in order); text files hold the answers alone, one a line. html pages get an index,
    written by `close()` with the rows of every page written."""

    def __init__(self, paths: dict[str, str], fmt: str, fields: Sequence[str], overwrite: bool = False):
        self.paths, self.fmt, self.fields, self.overwrite = paths, fmt, tuple(fields), overwrite
        self.written: list[str] = []
        self._opened: Opened | None = None
        self._writer = None
        self._rows: list[dict] = []  # for the html index

    def write(self, r: dict) -> None:
        path = self.paths[r["audio"]]
        if not self.written or self.written[-1] != path:
            self._close_file()
            os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
            self._opened = open_rows(path, self.fmt, self.fields, overwrite=self.overwrite)
            self._writer = writer(self.fmt, self._opened.stream, many=False, fields=self.fields,
                                  folder=os.path.dirname(path))
            self.written.append(path)
        self._writer.write(r)
        if self.fmt == "html":
            self._rows.append(r)

    def files(self) -> list[str]:
        """The files written (one whose rows all failed, in text, is removed empty)."""
        return [p for p in self.written if os.path.isfile(p)]

    def close(self) -> None:
        try:
            self._close_file()
        finally:
            if self._rows:
                self._write_index()

    def _write_index(self) -> None:
        from mellow_cli.io.html import rows_page

        folder = os.path.dirname(self.written[0])
        pages = {audio: os.path.relpath(path, folder) for audio, path in self.paths.items() if path in self.written}
        opened = open_rows(index_path(folder), "html", self.fields, overwrite=self.overwrite)
        try:
            opened.stream.write(rows_page([{k: r.get(k) for k in self.fields} for r in self._rows],
                                          folder=folder, pages=pages))
        finally:
            opened.close()
        self.written.append(index_path(folder))

    def _close_file(self) -> None:
        if self._writer is not None:
            try:
                self._writer.close()
            finally:
                self._opened.close()
                self._writer = self._opened = None
