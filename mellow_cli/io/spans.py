"""Which spans of each recording a run hears, and reading them. By default a recording is heard
whole, walked in windows of the model's clip (`--window` and `--hop` choose others, from
`--offset`); `--offset`/`--duration` ask for one span instead. A pair is one clip of each unless
`--window` asks to walk its first recording. Knows no model: the clip's length is a number the
caller gives, and clips are read by the function it gives (a model's `read_clip`).
"""

from __future__ import annotations

import math
from collections import Counter
from dataclasses import dataclass, replace

from mellow_cli import events
from mellow_cli.errors import AudioError, UsageError
from mellow_cli.io.jobs import Job


@dataclass(frozen=True)
class Span:
    """The span options of a run, in seconds: `window`/`hop` walk each recording (None: the
    model's clip, a window apart), `offset`/`duration` choose one span (None: one clip)."""

    window: float | None = None
    hop: float | None = None
    offset: float = 0.0
    duration: float | None = None

    @property
    def walks(self) -> bool:
        """Whether each recording is heard whole, in windows (the default, or --window), rather
        than as the one span --offset/--duration choose."""
        return self.window is not None or (self.offset == 0 and self.duration is None)


def check(span: Span) -> None:
    """Span options that cannot go together, refused before any audio is read."""
    if span.window is not None and span.duration is not None:
        raise UsageError("--window walks each recording in windows and --duration asks for one span of it: give "
                         "one of the two")
    if span.hop is not None and not span.walks:
        which = "--duration" if span.duration is not None else "--offset without --window"
        walk = "" if span.duration is not None else " (or add --window SECONDS to walk from --offset on)"
        raise UsageError(f"--hop spaces the windows of a recording walked whole, and {which} asks for one span: "
                         f"leave out --hop{walk}")


def windows(duration: float, window: float, hop: float, start: float = 0.0) -> list[tuple[float, float]]:
    """(start, end) spans `window` seconds long every `hop` seconds from `start`, covering the
    recording; the last one ends with the recording, and none starts at or after its end (a hop
    longer than the window skips the audio between windows; an infinite hop gives one span). None
    at all when `start` is at or past the end. A tail under half a second after the previous
    window is dropped: tiled up to a clip it would be noise, not a sound."""
    spans = []
    while start < duration:
        spans.append((start, min(start + window, duration)))
        if start + window >= duration or start + hop >= duration:
            break
        start += hop
    if len(spans) > 1 and spans[-1][1] - spans[-1][0] < 0.5 and spans[-2][1] >= spans[-1][0]:
        spans.pop()
    return spans


def windowed(jobs: list[Job], window: float, hop: float, duration_of, start: float = 0.0) -> list[Job]:
    """Each job once per window of its first recording, from `start` (a second recording is heard
    whole beside each window: see clip_reader). A recording whose length cannot be read keeps one
    job without times, one whose length ends before `start` one job starting there: the decoding
    of either will fail, and its row carry the error."""
    out = []
    for job in jobs:
        try:
            spans = windows(duration_of(job.audio), window, hop, start)
        except AudioError:
            out.append(job)
            continue
        out += [replace(job, start=round(s, 3), end=round(e, 3)) for s, e in spans] or [replace(job, start=start)]
    return out


def cut(jobs: list[Job], span: Span, clip: float, model: str, duration_of) -> tuple[list[Job], float]:
    """The jobs as a model hearing `clip` seconds at once (`model` names it) will hear their
    recordings, and how long each span is: walked in windows of the clip (or --window, --hop
    apart, from --offset), or the one span --offset/--duration choose. A pair is one clip of each
    unless --window asks to walk its first recording: the model hears the two together, and
    windows of both would pair spans that do not belong together. Says on stderr which
    recordings were cut."""
    for flag, value in (("--window", span.window), ("--duration", span.duration)):
        if value is not None and value > clip:
            raise UsageError(f"{flag} {value:g}: {model} hears at most {clip:g} s at once")
    walks = span.walks
    length = (span.window or clip) if walks else (span.duration or clip)
    hop = (span.hop or length) if walks else math.inf
    parts = [part for job in jobs for part in windowed(
        [job], length, hop if span.window is not None or job.audio2 == job.audio else math.inf, duration_of,
        span.offset)]
    if walks:
        _say_how_heard(parts, duration_of, length, hop, span.offset, clip, span.window is not None)
    return parts, length


def clip_reader(read, length: float | None = None, span: Span = Span()):
    """job -> (clip1, clip2 or None), each read by `read(source, offset, duration)` (a model's
    `read_clip`). The first recording is heard from the job's `start` (the span's offset for a job
    the run could not cut: its recording fails again, and its row says why) for `length` seconds
    (None: one clip), the span the run cut for it. The second is heard over the one span the user
    chose for both, or, beside each window of a recording walked whole, from its own start: a
    reference not cut at times it may not reach. A clip paired with itself is decoded once (clip2
    None tells the model so)."""
    offset, duration = (0.0, None) if span.walks else (span.offset, span.duration)

    def decode(job: Job):
        first = read(job.audio, offset=offset if job.start is None else job.start, duration=length)
        second = None if job.audio2 == job.audio else read(job.audio2, offset=offset, duration=duration)
        return first, second

    return decode


CUT_LINES = 3  # recordings cut into windows named one a line; past that, one line counts them


def _say_how_heard(parts: list[Job], duration_of, length: float, hop: float, offset: float, clip: float,
                   asked: bool) -> None:
    """A note for each recording heard in several windows (`field.flac: 180 s heard as 18 windows
    of 10 s`) and each recording of a pair longer than the clip, of which only the start is
    heard; past CUT_LINES, one note counting them (each then a detail, said with -v)."""
    counts = Counter(j.audio for j in parts)
    walked = [audio for audio, n in counts.items() if n > 1]
    how = f"windows of {length:g} s" + (f" every {hop:g} s" if hop != length else "") + (
        f" from {offset:g} s" if offset else "")
    lines = [f"{audio}: {_seconds(duration_of(audio))} heard as {counts[audio]} {how}" for audio in walked]
    paired = dict.fromkeys(p for j in parts if j.audio2 != j.audio for p in (j.audio, j.audio2) if p not in counts
                           or counts[p] == 1)
    for path in paired:
        try:
            seconds = duration_of(path)
        except AudioError:  # its row says why
            continue
        if seconds > clip:
            hint = "" if asked else "; --window SECONDS walks the first of a pair"
            lines.append(f"{path}: {_seconds(seconds)}, of which one clip of {clip:g} s is heard, as one of a "
                         f"pair{hint}")
    if len(lines) > CUT_LINES:
        cuts = sum(counts[a] for a in walked)
        events.note(f"{len(lines)} recordings heard in part: {len(walked)} in {how} ({cuts} rows), "
                    f"{len(lines) - len(walked)} of pairs in their first {clip:g} s (-v names them)")
        for line in lines:
            events.detail(line)
    else:
        for line in lines:
            events.note(line)


def _seconds(value: float) -> str:
    return f"{value:.1f}".removesuffix(".0") + " s"
