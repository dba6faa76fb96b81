"""What the layers below the CLI tell a person while they work, without knowing who listens.

Loading, conversion, the benchmarks and training say what they are doing (a note, a warning, a
failed item that does not stop the run) and how far along they are (a progress count) through the
functions here. By default these are plain `mellow: ...` lines on stderr and no bars, which is
what a script calling the Python API wants; the CLI installs its terminal renderer instead
(`use`), which draws bars and honours --quiet and --verbose. So no module below the CLI imports
the renderer, and each says what happened once, in one way.
"""

from __future__ import annotations

import contextlib
import sys
from collections.abc import Callable, Iterator

Advance = Callable[..., None]  # advance(n=1): n more of the total are done


class Reporter:
    """The plain reporter: one line per note on stderr, no progress bars."""

    def note(self, message: str) -> None:
        _line(f"mellow: {message}")

    def detail(self, message: str) -> None:
        """What a note summed up, one line each: said only when asked for (the CLI's -v)."""

    def warn(self, message: str) -> None:
        _line(f"mellow: warning: {message}")

    def error(self, message: str) -> None:
        """An item that failed while the others go on (the run's summary says how many)."""
        _line(f"mellow: error: {message}")

    @contextlib.contextmanager
    def progress(self, total: int | None, description: str = "") -> Iterator[Advance]:
        yield lambda n=1: None


def _line(text: str) -> None:
    sys.stderr.write(text + "\n")
    sys.stderr.flush()


_reporter: Reporter = Reporter()


def use(reporter: Reporter) -> Reporter:
    """Send every later event to `reporter`; returns the one it replaces."""
    global _reporter
    previous, _reporter = _reporter, reporter
    return previous


def note(message: str, enabled: bool = True) -> None:
    """What is being done (`converting v0 to safetensors (once)`); `enabled` False says nothing,
    for callers that were asked to be silent (`load_model(progress=False)`)."""
    if enabled:
        _reporter.note(message)


def detail(message: str) -> None:
    """One of the lines a note summed up (`-v` shows them)."""
    _reporter.detail(message)


def warn(message: str) -> None:
    _reporter.warn(message)


def error(message: str) -> None:
    _reporter.error(message)


def progress(total: int | None, description: str = "") -> contextlib.AbstractContextManager[Advance]:
    """A count of `total` steps; yields `advance(n=1)`."""
    return _reporter.progress(total, description)
