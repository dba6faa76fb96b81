"""Many inputs in one run: what the user named -> a list of clips, and result rows -> a writer
that puts each row out as soon as it is done.

Inputs follow whisper and llm: files as given, folders (audio files inside, sorted; `recursive`
descends), globs the shell left unexpanded, `@list.txt` (one path per line, `#` comments) and
`@-` (that list on stdin); a lone `-` stays `-`, audio bytes on stdin. A path that does not exist
is kept: its row will carry the error, and the others go on.

Rows are plain dicts with the same keys in every format, so a script can parse any of them back.
"""

from __future__ import annotations

import csv
import glob
import json
import os
import sys
from pathlib import Path
from typing import IO, Iterable

from .errors import UsageError

AUDIO_EXTENSIONS = {".wav", ".flac", ".ogg", ".oga", ".mp3", ".aif", ".aiff", ".au", ".caf", ".w64", ".rf64"}
FIELDS = ("audio", "audio2", "question", "answer", "model", "revision", "error")
FORMATS = ("text", "json", "jsonl", "csv", "tsv")


def expand_inputs(args: Iterable[str], recursive: bool = False, stdin: IO[str] | None = None) -> list[str]:
    """The audio paths the arguments name, in order, duplicates kept (a user may mean them)."""
    paths: list[str] = []
    for arg in args:
        if arg.startswith("@") and len(arg) > 1:
            paths += expand_inputs(_read_list(arg[1:], stdin), recursive)
        elif arg != "-" and os.path.isdir(arg):
            paths += _audio_in(Path(arg), recursive, arg)
        elif arg != "-" and not os.path.exists(arg) and glob.has_magic(arg):
            matches = sorted(glob.glob(arg, recursive=recursive))
            if not matches:
                raise UsageError(f"{arg}: no files match this pattern")
            paths += expand_inputs(matches, recursive)
        else:
            paths.append(arg)
    return paths


def _read_list(name: str, stdin: IO[str] | None) -> list[str]:
    """Paths from a list file (`-` for stdin): one per line, blank lines and `#` comments skipped."""
    try:
        text = (stdin or sys.stdin).read() if name == "-" else Path(name).read_text(encoding="utf-8")
    except OSError as e:
        raise UsageError(f"@{name}: cannot read the list ({e.strerror or e})") from None
    except UnicodeDecodeError:
        raise UsageError(f"@{name}: not a text file of paths") from None
    return [line.strip() for line in text.splitlines() if line.strip() and not line.lstrip().startswith("#")]


def _audio_in(folder: Path, recursive: bool, arg: str) -> list[str]:
    walk = folder.rglob("*") if recursive else folder.iterdir()
    found = sorted(str(p) for p in walk if p.suffix.lower() in AUDIO_EXTENSIONS and p.is_file())
    if not found:
        hint = "" if recursive else " (add --recursive to look in subfolders)"
        raise UsageError(f"{arg}: no audio files in this folder{hint}")
    return found


def row(audio: str, question: str, *, audio2: str | None = None, answer: str | None = None,
        model: str | None = None, revision: str | None = None, error: str | None = None) -> dict:
    return {"audio": audio, "audio2": audio2, "question": question, "answer": answer,
            "model": model, "revision": revision, "error": error}


class RowWriter:
    """Writes result rows in one format and flushes each, so `tail -f` and pipes see them at once.

    text: the answer alone, or `path<TAB>answer` when the run has several inputs; failed rows are
    left out (their error went to stderr). json: one array, closed by `close()`. jsonl: one object
    per line. csv/tsv: a header, then one line per row with every field.
    """

    def __init__(self, fmt: str, stream: IO[str], many: bool = True):
        if fmt not in FORMATS:
            raise UsageError(f"unknown format {fmt!r}: use {', '.join(FORMATS)}")
        self.fmt, self.stream, self.many = fmt, stream, many
        self._first = True
        self._csv = None
        if fmt in ("csv", "tsv"):
            self._csv = csv.DictWriter(stream, FIELDS, delimiter="," if fmt == "csv" else "\t",
                                       lineterminator="\n", extrasaction="ignore")
            self._csv.writeheader()
        elif fmt == "json":
            stream.write("[")

    def write(self, r: dict) -> None:
        if self.fmt == "text":
            if r["error"] is None:
                self.stream.write(f"{r['audio']}\t{r['answer']}\n" if self.many else f"{r['answer']}\n")
        elif self.fmt == "jsonl":
            self.stream.write(json.dumps(r, ensure_ascii=False) + "\n")
        elif self.fmt == "json":
            self.stream.write(("\n" if self._first else ",\n") + json.dumps(r, ensure_ascii=False))
        else:
            self._csv.writerow({k: ("" if v is None else v) for k, v in r.items()})
        self._first = False
        self.stream.flush()

    def close(self) -> None:
        if self.fmt == "json":
            self.stream.write("\n]\n" if not self._first else "]\n")
        self.stream.flush()


def _decode_all(paths: list[str], decode) -> list[tuple[object, object]]:
    """(clip, None) or (None, AudioError) per path: one bad file never stops the others."""
    from .errors import AudioError

    out = []
    for path in paths:
        try:
            out.append((decode(path), None))
        except AudioError as e:
            out.append((None, e))
    return out


def decoded_chunks(paths: list[str], decode, size: int):
    """Yield (paths, decoded) chunk by chunk, decoding chunk i+1 on a worker thread while the
    caller runs the model on chunk i. At most two chunks of audio are in memory at once."""
    from concurrent.futures import ThreadPoolExecutor

    chunks = [paths[i : i + size] for i in range(0, len(paths), size)]
    with ThreadPoolExecutor(max_workers=1) as pool:
        pending = pool.submit(_decode_all, chunks[0], decode) if chunks else None
        for i, chunk in enumerate(chunks):
            decoded = pending.result()
            pending = pool.submit(_decode_all, chunks[i + 1], decode) if i + 1 < len(chunks) else None
            yield chunk, decoded


def caption_rows(model, paths: list[str], prompt: str, options, batch_size: int, decode):
    """One row per path, in order, captioned `batch_size` clips at a time (each clip paired with
    itself, as for a one-clip question). Rows of files that failed carry the error."""
    for chunk, decoded in decoded_chunks(paths, decode, batch_size):
        good = [clip for clip, err in decoded if err is None]
        answers = iter(model.ask_batch([(clip, None, prompt) for clip in good], options))
        for path, (clip, err) in zip(chunk, decoded):
            yield row(path, prompt, audio2=path, answer=None if err else next(answers),
                      model=model.name, revision=model.revision, error=err.problem if err else None), err


# --- sharing a run out, and picking it up again ---------------------------------------------------


def parse_shard(text: str | None) -> tuple[int, int] | None:
    """`--shard I/N` (1 <= I <= N) -> (I, N); None when no shard was asked for."""
    if text is None:
        return None
    try:
        i, n = (int(part) for part in text.split("/"))
    except ValueError:
        raise UsageError(f"--shard {text}: expected I/N, e.g. 1/4 (the first of four shards)") from None
    if not 1 <= i <= n:
        raise UsageError(f"--shard {text}: I must be between 1 and N")
    return i, n


def take_shard(items: list, shard: tuple[int, int] | None) -> list:
    """Every N-th item from the I-th: shards are disjoint, cover the list, differ in size by at
    most one, and depend only on the list's order, so N processes given the same inputs and
    `--shard 1/N` ... `--shard N/N` share the work exactly."""
    if shard is None:
        return items
    i, n = shard
    return items[i - 1 :: n]


RESUMABLE = ("jsonl", "csv", "tsv")


def row_key(r: dict) -> tuple:
    """What makes a row the same work on a second run: its id if it has one, else its inputs."""
    if r.get("id") not in (None, ""):
        return ("id", str(r["id"]))
    start = r.get("start")
    return (r.get("audio") or "", r.get("audio2") or "", r.get("question") or "",
            "" if start in (None, "") else f"{float(start):.3f}")


def rows_done(path: str, fmt: str) -> set[tuple]:
    """Keys of the rows an earlier run already wrote to `path` (for --resume). A last line cut
    short by a kill is removed from the file, so that row is simply done again."""
    import os

    if fmt not in RESUMABLE:
        raise UsageError(f"--resume needs --format {', '.join(RESUMABLE)} (rows a later run can read back)")
    if not os.path.exists(path):
        return set()
    with open(path, "r+", encoding="utf-8", newline="") as f:
        text = f.read()
        if text and not text.endswith("\n"):
            text = text[: text.rfind("\n") + 1]
            f.seek(0)
            f.truncate(len(text.encode("utf-8")))
    if fmt == "jsonl":
        rows = []
        for number, line in enumerate(text.splitlines(), 1):
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError:
                raise UsageError(f"{path}: line {number} is not JSON; is this the output of an earlier run?") from None
    else:
        rows = list(csv.DictReader(text.splitlines(), delimiter="," if fmt == "csv" else "\t"))
    return {row_key(r) for r in rows}
