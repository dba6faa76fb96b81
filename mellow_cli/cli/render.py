"""Everything the user sees: results on stdout, logs, progress and errors on stderr.

The only module that imports Rich, and only when something is first drawn, so `mellow --help`
never pays for it. Rich already honours NO_COLOR and writes plain text when the stream is not a
terminal; errors bypass Rich entirely so they stay exactly one line however wide the terminal.
"""

from __future__ import annotations

import contextlib
import json
import os
import sys
import time
from typing import Callable, Iterable, Iterator

from mellow_cli import events
from mellow_cli.io.outputs import STDOUT, writing

QUIET, NORMAL, VERBOSE = 0, 1, 2
_level = NORMAL
_consoles: dict[str, object] = {}


def configure(quiet: bool = False, verbose: bool = False) -> None:
    """Set the verbosity, forget earlier timings, and take over what the layers below report
    (events.py): their notes, warnings and progress are drawn here from now on."""
    global _level
    _level = QUIET if quiet else VERBOSE if verbose else NORMAL
    _spent.clear()
    events.use(_Terminal())


def verbose() -> bool:
    return _level >= VERBOSE


def quiet() -> bool:
    return _level < NORMAL


# --- -v: where a command's time went --------------------------------------------------------------

STAGES = ("load", "encode", "prefill", "decode", "score")  # in the order a command meets them
_spent: dict[str, list] = {}  # stage -> [seconds, tokens]


def spent(stage: str, seconds: float, tokens: int = 0) -> None:
    """Add to a stage's time (and, for decode, its tokens); shown by `timings` with -v."""
    total = _spent.setdefault(stage, [0.0, 0])
    total[0] += seconds
    total[1] += tokens


@contextlib.contextmanager
def timed(stage: str) -> Iterator[None]:
    start = time.perf_counter()
    try:
        yield
    finally:
        spent(stage, time.perf_counter() - start)


def timings() -> None:
    """With -v, one line on stderr at the end of a command: load, encode, prefill and decode
    times, and decode tokens per second (stdout keeps the results alone)."""
    if _level < VERBOSE or not _spent:
        return
    parts = []
    for stage in sorted(_spent, key=lambda s: STAGES.index(s) if s in STAGES else len(STAGES)):
        seconds, tokens = _spent[stage]
        rate = f", {tokens} tokens, {tokens / seconds:.1f} tok/s" if tokens and seconds > 0 else ""
        parts.append(f"{stage} {seconds:.2f} s{rate}")
    debug("timings: " + "; ".join(parts))


def _console(stream: str):
    """A Rich console on stdout or stderr, made on first use."""
    if stream not in _consoles:
        from rich.console import Console

        _consoles[stream] = Console(stderr=(stream == "stderr"), highlight=False, soft_wrap=True,
                                    color_system=None if _no_color() else "auto")
    return _consoles[stream]


def _no_color() -> bool:
    # Rich's own NO_COLOR handling drops colours but keeps styles such as dim, and still animates
    # spinners; the convention (no-color.org), and docs/cli.md, is no escape codes at all.
    return bool(os.environ.get("NO_COLOR"))


ERROR_LINES = 3  # of a message listing many problems (bad rows, say), those shown


def error(message: str) -> None:
    """`mellow: error: <message>` on one line of stderr, whatever the verbosity. A message of
    several lines is a list of problems: the first few, then how many more, so that the line
    stays readable; a closing hint in parentheses is kept, it says what to do."""
    sys.stderr.write(f"mellow: error: {_one_line(str(message))}\n")
    sys.stderr.flush()


def _one_line(message: str) -> str:
    import re

    lines = [" ".join(line.split()) for line in message.splitlines() if line.strip()]
    if len(lines) <= ERROR_LINES + 1:
        return "; ".join(lines)
    hint = re.search(r" (\([^()]*\))$", lines[-1])
    # A list may end in its own count of what it left out ("... and 7 more bad rows").
    counted = re.match(r"\.\.\. and (\d+) more", lines[-1])
    more = len(lines) - ERROR_LINES + (int(counted.group(1)) - 1 if counted else 0)
    return "; ".join(lines[:ERROR_LINES]) + f"; and {more} more" + (f" {hint.group(1)}" if hint else "")


def warn(message: str) -> None:
    if _level >= NORMAL:
        sys.stderr.write(f"mellow: warning: {message}\n")
        sys.stderr.flush()


def info(message: str) -> None:
    """Progress notes (loading the model, where it came from) on stderr; hidden by --quiet."""
    if _level >= NORMAL:
        _console("stderr").print(message, style="dim", markup=False)


def debug(message: str) -> None:
    if _level >= VERBOSE:
        _console("stderr").print(message, style="dim", markup=False)


@contextlib.contextmanager
def status(message: str) -> Iterator[None]:
    """A spinner on stderr while something slow happens (only on a terminal, never with -q or
    NO_COLOR: then a plain line, or nothing with -q)."""
    console = _console("stderr") if _level >= NORMAL else None
    if console is None or not console.is_terminal or _no_color():
        if console is not None:
            info(message)
        yield
        return
    with console.status(message):
        yield


@contextlib.contextmanager
def progress(total: int | None, description: str = "") -> Iterator["Callable[[int], None]"]:
    """Progress on stderr while a batch runs (count, rate, ETA); yields `advance(n=1)`. On a
    terminal (without -q and NO_COLOR) a bar redrawn in place; elsewhere (a log file, nohup, CI)
    plain lines, spaced as ProgressLines says."""
    console = _console("stderr")
    if _level < NORMAL:
        yield lambda n=1: None
        return
    if not console.is_terminal or _no_color():
        lines = ProgressLines(total, description)
        yield lines.advance
        return
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        TaskProgressColumn,
        TextColumn,
        TimeElapsedColumn,
        TimeRemainingColumn,
    )

    class Rate(TextColumn):
        def render(self, task):
            speed = task.finished_speed or task.speed
            return super().render(task) if speed is None else f"{speed:.2f}/s"

    columns = [TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TaskProgressColumn(),
               Rate(""), TimeElapsedColumn(), TextColumn("eta"), TimeRemainingColumn()]
    with Progress(*columns, console=console, transient=False) as bar:
        task = bar.add_task(description, total=total)
        yield lambda n=1: bar.advance(task, n)


LINES_PER_RUN = 10  # plain progress lines a run of known length prints, besides one a minute
LINE_EVERY_SECONDS = 60.0
LINE_GAP_SECONDS = 10.0  # rows come in batches: a tenth reached this soon after a line waits for the next


class ProgressLines:
    """Progress where no bar can be drawn: a line after the first step, at every tenth of the
    total (or as soon after as LINE_GAP_SECONDS have passed since the last line), at the last, and at least once a
    minute while steps complete, each with the count, the rate and the time left (`captioned:
    120 of 1080 (11%), 2.05/s, eta 0:07:48`), so a log shows a run is alive and when it will end,
    as whisper's line per file does. A count of one step says nothing the end does not."""

    def __init__(self, total: int | None, description: str, clock: Callable[[], float] = time.monotonic):
        self.total, self.description, self.clock = total, description, clock
        self.done = 0
        self.started = self.last = clock()
        self.step = max(1, -(-total // LINES_PER_RUN)) if total else None
        self.due = False  # a tenth was reached since the last line

    def advance(self, n: int = 1) -> None:
        before, self.done = self.done, self.done + n
        now = self.clock()
        self.due = self.due or (self.step is not None and before // self.step != self.done // self.step)
        if self.total == 1:
            return
        if (before == 0 or self.done == self.total or now - self.last >= LINE_EVERY_SECONDS
                or (self.due and now - self.last >= LINE_GAP_SECONDS)):
            self.last, self.due = now, False
            info(self.line(now))

    def line(self, now: float) -> str:
        elapsed = now - self.started
        rate = self.done / elapsed if elapsed > 0 else None
        head = f"{self.description}: {self.done}" if self.description else str(self.done)
        if not self.total:
            return head + (f", {rate:.2f}/s" if rate else "")
        text = f"{head} of {self.total} ({100 * self.done // self.total}%)"
        if rate:
            left = max(0, self.total - self.done) / rate
            text += f", {rate:.2f}/s, eta {_clock(left)}"
        return text


def _clock(seconds: float) -> str:
    minutes, secs = divmod(round(seconds), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}:{minutes:02d}:{secs:02d}"


class Live:
    """What `live` yields: `update(done, text="")` moves the bar and replaces the text after it;
    `log(text)` prints a line that stays."""

    def __init__(self, bar=None, task=None):
        self._bar, self._task = bar, task

    def update(self, done: int, text: str = "") -> None:
        if self._bar is not None:
            self._bar.update(self._task, completed=done, **({"text": text} if text else {}))
        elif text:  # not a terminal: the text becomes a log line
            info(text)

    def log(self, text: str) -> None:
        if self._bar is not None:
            self._bar.console.print(text, style="dim", markup=False, highlight=False)
        else:
            info(text)


@contextlib.contextmanager
def live(total: int, done: int = 0, description: str = "") -> Iterator[Live]:
    """A bar with a line of text after it (training: step, loss, lr, samples/s, ETA) on stderr.
    On a terminal it redraws in place; elsewhere (a log file, CI) each text is one plain line."""
    console = _console("stderr")
    if _level < NORMAL or not console.is_terminal or _no_color():
        yield Live()
        return
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn

    with Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                  TextColumn("{task.fields[text]}"), console=console, transient=False) as bar:
        yield Live(bar, bar.add_task(description, total=total, completed=done, text=""))


def stream_answer(pieces: Iterable[str]) -> str:
    """Write text pieces to stdout as they arrive, then a newline; return the whole text.

    Plain writes with a flush per piece: they reach a pipe as soon as they are decoded, and on a
    terminal they appear token by token.
    """
    out = sys.stdout
    parts = []
    with writing(STDOUT):
        for piece in pieces:
            parts.append(piece)
            out.write(piece)
            out.flush()
        out.write("\n")
        out.flush()
    return "".join(parts)


def result_line(text: str) -> None:
    with writing(STDOUT):
        sys.stdout.write(text + "\n")
        sys.stdout.flush()


def result_json(obj) -> None:
    with writing(STDOUT):
        sys.stdout.write(json.dumps(obj, ensure_ascii=False) + "\n")
        sys.stdout.flush()


def table(columns: Iterable[str], rows: Iterable[Iterable[object]], title: str | None = None,
          right: Iterable[int] = (), footnote: str | None = None, whole: Iterable[int] = ()) -> None:
    """A table of results on stdout (plain text when stdout is not a terminal), with an optional
    title above and footnote below. Cells are shown as written, never read as Rich markup;
    `right` holds the indexes of right-aligned columns, `whole` those of columns whose cells are
    names never folded (on a narrow terminal the others fold instead)."""
    from rich import box
    from rich.table import Table
    from rich.text import Text

    right, whole = set(right), set(whole)
    grid = Table(title=Text(title) if title else None, title_justify="left", box=box.SIMPLE_HEAD,
                 caption=Text(footnote) if footnote else None, caption_justify="left")
    for i, name in enumerate(columns):
        grid.add_column(Text(name), justify="right" if i in right else "left", overflow="fold", no_wrap=i in whole)
    for row in rows:
        grid.add_row(*(Text(str(cell)) for cell in row))
    with writing(STDOUT):
        _console("stdout").print(grid)


class _Terminal(events.Reporter):
    """The layers' events, drawn as the CLI draws its own: notes as its info lines (hidden by
    --quiet), details only with --verbose, progress as a bar on a terminal."""

    def note(self, message: str) -> None:
        info(message)

    def detail(self, message: str) -> None:
        debug(message)

    def warn(self, message: str) -> None:
        warn(message)

    def error(self, message: str) -> None:
        error(message)

    def progress(self, total: int | None, description: str = ""):
        return progress(total, description)
