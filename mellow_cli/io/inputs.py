"""What the user hands over, read and checked: audio paths (files, folders, globs, @lists),
text files and stdin, JSON lines and JSON lists, and answer choices. Every reader refuses bad
input with a one-line UsageError naming the file and the problem; ask, caption and compare
(cli/answer.py), the training data (data.py) and the benchmarks' item files (bench/) all read
through here.

Paths follow whisper and llm: files as given, folders (audio files inside, sorted; `recursive`
descends), globs the shell left unexpanded, `@list.txt` (one path per line, `#` comments) and
`@-` (that list on stdin); a lone `-` stays `-`, audio bytes on stdin. A path that does not exist
is kept: its row will carry the error, and the others go on.
"""

from __future__ import annotations

import glob
import json
import os
import sys
from pathlib import Path
from typing import IO, Iterable, Sequence

from mellow_cli.errors import UsageError
from mellow_cli.files import text_lines

# Names a folder's files are taken by without a look inside: what libsndfile reads, and the
# containers FFmpeg reads that phones, cameras and browsers write (audio.py tries FFmpeg when
# libsndfile fails). A folder's other files are taken when either opens them as audio.
AUDIO_EXTENSIONS = {".wav", ".flac", ".ogg", ".oga", ".mp3", ".aif", ".aiff", ".au", ".caf", ".w64", ".rf64",
                    ".opus", ".m4a", ".m4b", ".aac", ".mp4", ".m4v", ".mov", ".webm", ".mkv", ".mka", ".wma",
                    ".asf", ".amr", ".3gp", ".3g2", ".ac3", ".mp2", ".wv", ".ape", ".avi", ".ts"}


def expand_inputs(args: Iterable[str], recursive: bool = False, stdin: IO[str] | None = None,
                  skipped: list[tuple[str, str]] | None = None) -> list[str]:
    """The audio paths the arguments name, in order, duplicates kept (a user may mean them).
    A folder's files that no reader opens as audio are left out, and added to `skipped` as
    (the folder as given, the file)."""
    return _expand(args, recursive, stdin, lists=(), skipped=[] if skipped is None else skipped)


def _expand(args: Iterable[str], recursive: bool, stdin: IO[str] | None, lists: tuple[str, ...],
            from_glob: bool = False, skipped: list | None = None) -> list[str]:
    paths: list[str] = []
    for arg in args:
        if arg.startswith("@") and len(arg) > 1 and not from_glob:
            paths += _expand_list(arg[1:], recursive, stdin, lists, skipped)
        elif arg != "-" and os.path.isdir(arg):
            paths += _audio_in(Path(arg), recursive, arg, skipped)
        elif arg != "-" and not from_glob and not os.path.exists(arg) and glob.has_magic(arg):
            matches = sorted(glob.glob(arg, recursive=recursive))
            if not matches:
                raise UsageError(f"{arg}: no files match this pattern")
            paths += _expand(matches, recursive, stdin, lists, from_glob=True, skipped=skipped)  # a file named @x is a file
        else:
            paths.append(arg)
    return paths


def _expand_list(name: str, recursive: bool, stdin: IO[str] | None, lists: tuple[str, ...],
                 skipped: list | None) -> list[str]:
    """The paths of one @list; a list that names itself, directly or through others, is refused."""
    ident = name if name == "-" else os.path.realpath(name)
    if ident in lists:
        raise UsageError(f"@{name}: the list includes itself (through {' -> '.join('@' + n for n in lists)})"
                         if len(lists) > 1 else f"@{name}: the list includes itself")
    return _expand(_read_list(name, stdin), recursive, stdin, lists + (ident,), skipped=skipped)


def _read_list(name: str, stdin: IO[str] | None) -> list[str]:
    """Paths from a list file (`-` for stdin): one per line, blank lines and `#` comments skipped."""
    text = read_text(name, "list of paths", stdin)
    return [line.strip() for line in text_lines(text) if line.strip() and not line.lstrip().startswith("#")]


def _audio_in(folder: Path, recursive: bool, arg: str, skipped: list | None) -> list[str]:
    walk = folder.rglob("*") if recursive else folder.iterdir()
    found, others = [], []
    for path in sorted(str(p) for p in walk if p.is_file()):
        taken = os.path.splitext(path)[1].lower() in AUDIO_EXTENSIONS or _opens_as_audio(path)
        (found if taken else others).append(path)
    if not found:
        hint = "" if recursive else " (add --recursive to look in subfolders)"
        held = f", only {len(others)} file{'s' if len(others) > 1 else ''} no reader opens as audio" if others else ""
        raise UsageError(f"{arg}: no audio files in this folder{held}{hint}")
    if skipped is not None:
        skipped += [(arg, path) for path in others]
    return found


def _opens_as_audio(path: str) -> bool:
    """Whether libsndfile or FFmpeg opens a file as audio, from its header."""
    from mellow_cli.errors import AudioError
    from mellow_cli.io.audio import audio_duration

    try:
        audio_duration(path)
    except AudioError:
        return False
    return True


# --- ask's AUDIO [AUDIO2] QUESTION -----------------------------------------------------------------


def one_recording(arg: str) -> bool:
    """An argument naming one recording as itself (or `-`): not a folder, a glob or an @list."""
    if arg == "-":
        return True
    return not arg.startswith("@") and not os.path.isdir(arg) and not (glob.has_magic(arg) and not os.path.exists(arg))


def _names_audio(arg: str) -> bool:
    """Whether an argument reads as a recording or a batch of them, rather than a word."""
    return (arg == "-" or arg.startswith("@") or os.path.exists(arg) or glob.has_magic(arg)
            or os.path.splitext(arg)[1].lower() in AUDIO_EXTENSIONS)


def split_question(args: Sequence[str]) -> tuple[list[str], str]:
    """`mellow ask`'s arguments -> (the audio arguments, the question), checked before any model
    loads. Refused (UsageError): no question; a question that is a recording or a folder (left
    out); words of a question left unquoted (`ask bee.ogg is there a bee`: "is", "there", "a" name
    no file and do not look like one); one recording mixed with a folder, glob or @list, which is
    neither a pair nor a batch."""
    import shlex

    if len(args) < 2:
        raise UsageError("ask takes AUDIO [AUDIO2] QUESTION: one or two audio files, then the question (or --input FILE)")
    audio, question = list(args[:-1]), args[-1]
    if not question.strip():
        raise UsageError("the question is empty")
    if question == "-" or (os.path.splitext(question)[1].lower() in AUDIO_EXTENSIONS and " " not in question.strip()):
        raise UsageError(f"the question is {question!r}, an audio file's name: ask takes AUDIO [AUDIO2] QUESTION, "
                         "with the question last")
    if os.path.isdir(question):
        raise UsageError(f"the question is {question!r}, a folder: ask takes AUDIO [AUDIO2] QUESTION, with the "
                         "question last")
    words = len(audio)
    while words > 1 and not _names_audio(audio[words - 1]):
        words -= 1
    if words < len(audio):
        loose = audio[words:]
        said = shlex.join(["mellow", "ask", *audio[:words], " ".join(loose + [question])])
        raise UsageError(f"{', '.join(loose)}: no such file{'s' if len(loose) > 1 else ''}; if {'they are words' if len(loose) > 1 else 'it is a word'} "
                         f"of the question, quote the question: {said}")
    single = [a for a in audio if one_recording(a)]
    many = [a for a in audio if not one_recording(a)]
    if single and many:
        kind = "an @list" if many[0].startswith("@") else "a folder" if os.path.isdir(many[0]) else "a glob"
        raise UsageError(f"{single[0]} is one recording and {many[0]} {kind}: ask takes one or two recordings, or a "
                         "batch (folders, globs, @lists, or three or more files) asked about one by one; to pair "
                         f"{single[0]} with each recording, give the pairs as --input lines with audio and audio2")
    return audio, question


CHOICES_RULE = 'needs at least two non-empty choices: one string like "dog|cat", or a list of strings'


def parse_choices(value: object, where: str) -> tuple[str, ...] | None:
    """Choices as a user writes them (`--choices`, a questions file, training rows, bench qa
    data) -> the stripped choices, or None when none were given (None: no option, a missing or
    null field). Anything else that is not at least two non-empty strings, "" and [] included, is
    a UsageError naming `where`."""
    items = read_choices(value, where)
    if items is not None and choices_problem(items):
        raise UsageError(f"{where}: {CHOICES_RULE}")
    return items


def read_choices(value: object, where: str) -> tuple[str, ...] | None:
    """The choices split on "|" and stripped, their count not yet checked (training keeps a row
    with too few for `validate_rows` to report with the row's other problems)."""
    if value is None:
        return None
    items = value.split("|") if isinstance(value, str) else value
    if not isinstance(items, list) or not all(isinstance(c, str) for c in items):
        raise UsageError(f"{where}: {CHOICES_RULE}")
    return tuple(c.strip() for c in items)


def choices_problem(items: Sequence[str]) -> str | None:
    """What is wrong with stripped choices, or None: the one rule every reader of choices keeps."""
    return None if len(items) >= 2 and all(items) else CHOICES_RULE


# A list, questions, pairs or data file this large was not written for this tool (and /dev/zero
# or an endless pipe would fill the memory): refused instead of read without end.
MAX_TEXT_BYTES = 1 << 30


def read_text(name: str, what: str = "file", stdin: IO[str] | None = None) -> str:
    """A UTF-8 text file's contents (`-`: stdin), or a one-line UsageError naming the file and
    what is wrong: the one reader behind every list, questions, pairs, data and predictions file.
    Devices (which never end) and anything over MAX_TEXT_BYTES are refused."""
    try:
        text = _read_stdin(stdin or sys.stdin) if name == "-" else _read_file(name, what)
    except FileNotFoundError:
        raise UsageError(f"{name}: no such {what}") from None
    except IsADirectoryError:
        raise UsageError(f"{name}: is a folder, not a {what}") from None
    except OSError as e:
        raise UsageError(f"{name}: cannot read the {what} ({e.strerror or e})") from None
    except UnicodeDecodeError:
        raise UsageError(f"{name}: not a UTF-8 text file") from None
    if text is None:
        raise UsageError(f"{name}: larger than {MAX_TEXT_BYTES >> 30} GiB, too large for a {what}")
    return text.removeprefix("\ufeff")  # a byte-order mark, as spreadsheet programs write


def _read_file(name: str, what: str) -> str | None:
    """The text of a regular file or a pipe, None past MAX_TEXT_BYTES."""
    import stat

    with open(name, "rb") as f:
        mode = os.fstat(f.fileno()).st_mode
        if stat.S_ISDIR(mode):
            raise IsADirectoryError
        if not (stat.S_ISREG(mode) or stat.S_ISFIFO(mode)):
            raise UsageError(f"{name}: a device, not a {what} (it never ends)")
        data = f.read(MAX_TEXT_BYTES + 1)
    return data.decode("utf-8") if len(data) <= MAX_TEXT_BYTES else None


def _read_stdin(stream: IO[str]) -> str | None:
    """Standard input's text, None past MAX_TEXT_BYTES characters."""
    parts, size = [], 0
    while chunk := stream.read(1 << 20):
        parts.append(chunk)
        size += len(chunk)
        if size > MAX_TEXT_BYTES:
            return None
    return "".join(parts)


def json_lines(name: str, stdin: IO[str] | None = None, text: str | None = None):
    """(line number, object) for each non-blank line of a JSON-lines file (`-`: stdin; `text`:
    its contents, already read); a line that is not a JSON object is a UsageError naming the file
    and the line."""
    text = read_text(name, "file", stdin) if text is None else text
    for number, line in enumerate(text_lines(text), 1):
        if not line.strip():
            continue
        obj = _loads(line, f"{name}: line {number}")
        if not isinstance(obj, dict):
            raise UsageError(f"{name}: line {number}: expected a JSON object, got {json_kind(obj)}")
        yield number, obj


def json_list(name: str, what: str = "file", text: str | None = None) -> list:
    """A file holding one JSON list (`text`: its contents, already read), or a one-line
    UsageError saying what is wrong with it. A list spans many lines: the error gives the text
    line an editor can jump to."""
    text = read_text(name, what) if text is None else text
    data = _loads(text, name, located=True)
    if not isinstance(data, list):
        raise UsageError(f"{name}: expected a JSON list of items, found a JSON {json_kind(data)}")
    return data


def _loads(text: str, where: str, located: bool = False):
    """json.loads, with every way it refuses a text as a one-line UsageError naming `where`;
    `located` adds the line and column of a syntax error (a text of many lines)."""
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        place = f" at line {e.lineno}, column {e.colno}" if located else ""
        raise UsageError(f"{where}: not JSON ({e.msg}{place})") from None
    except RecursionError:
        raise UsageError(f"{where}: JSON nested too deeply") from None
    except ValueError:  # an integer longer than Python converts (sys.get_int_max_str_digits)
        raise UsageError(f"{where}: a number longer than {sys.get_int_max_str_digits()} digits") from None


def json_kind(value: object) -> str:
    """What a message calls a JSON value's type."""
    return {dict: "object", list: "list", str: "string", bool: "boolean", type(None): "null"}.get(
        type(value), "number")
