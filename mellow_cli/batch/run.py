"""A run of ask, compare or caption, from the jobs and the run's options to the rows written.

What can be refused is refused before the model loads: a question with more clips than the
model's family takes, span options that cannot go together, the destination (its format, what it
holds, --resume's proof) and, for one input, a recording that cannot be read. Then the model says
how long a clip it hears, the recordings are cut into spans (and shards), and the rows are
answered batch by batch and written as they come; one free answer for a person at a terminal is
streamed instead. The caller loads the model (and shows it loading) and shows the streamed answer.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, field
from typing import Callable, Iterable

from mellow_cli import events
from mellow_cli.batch import loop
from mellow_cli.errors import UsageError
from mellow_cli.io import results, spans
from mellow_cli.io.audio import audio_duration
from mellow_cli.io.jobs import Job, fields_for, parse_shard, take_shard
from mellow_cli.io.results import Destination, Tally
from mellow_cli.io.spans import Span
from mellow_cli.runtime.options import DecodingOptions
from mellow_cli.store.loading import peek_family


@dataclass(frozen=True)
class Plan:
    """How a run answers: which model (as the user named it: its family is known before it loads),
    the spans heard, where the rows go, how answers are decoded, rows per batch, and the shard
    (`I/N`) this process does."""

    model: str
    span: Span = field(default_factory=Span)
    to: Destination = field(default_factory=Destination)
    decoding: DecodingOptions = field(default_factory=DecodingOptions)
    batch_size: int = 8
    shard: str | None = None


def answer(jobs: list[Job], verb: str, plan: Plan, load: Callable[[], object], *, single: bool = False,
           stream: Callable[[Iterable[str]], object] | None = None) -> Tally:
    """Answer `jobs` (`single`: one recording or pair named on the command line, not a batch) as
    `plan` says and write their rows; `verb` names the work in the summary (`captioned 3 of 4
    rows`). `load()` gives the model; `stream(pieces)`, where given, writes one free answer for a
    terminal as it is decoded. The tally says how the writing ended."""
    _check_clips(jobs, plan.model)
    spans.check(plan.span)
    shard = parse_shard(plan.shard)
    target = results.destination(plan.to, jobs, fields_for(jobs))
    duration_of = functools.cache(audio_duration)
    if single:  # a missing or broken file fails in milliseconds, not after the model loads
        for path in dict.fromkeys((jobs[0].audio, jobs[0].audio2)):
            duration_of(path)
    if target.by_recording:
        jobs = take_shard(jobs, shard)
    target.open()
    try:
        model = load()
        target.check_model(model.name)
        cut, length = spans.cut(jobs, plan.span, model.family.clip_seconds(model.cfg), model.name, duration_of)
        times = plan.span.window is not None or len(cut) > len(jobs)
        mine = cut if target.by_recording else take_shard(cut, shard)
        todo = target.left(mine)
        if mine and not todo:
            events.note("nothing left to do")
            return Tally(0)
        if not mine:  # fewer rows than shards: this one's output is written all the same, empty
            events.note(f"--shard {plan.shard}: no rows fall to this shard ({len(cut)} in all)")
        read = spans.clip_reader(model.read_clip, length, plan.span)
        if stream is not None and single and len(todo) == 1 and not times and not todo[0].choices \
                and target.terminal_text:
            first, second = read(todo[0])
            stream(model.stream(first, todo[0].question, audio2=second, options=plan.decoding))
            return Tally(1, 1)
        rows = loop.answer_rows(model, todo, plan.decoding, plan.batch_size, read)
        return target.write(rows, verb, len(todo), many=not single, times=times)
    finally:
        target.close()


def _check_clips(jobs: list[Job], model: str) -> None:
    """A question with more clips than the model's family takes, refused before it loads (the
    model would refuse it too, after loading)."""
    family = peek_family(model)
    most = family.most_clips
    if most is not None and any(len({j.audio, j.audio2}) > most for j in jobs):
        raise UsageError(f"{model}: {family.title} takes {most} clip{'s' if most > 1 else ''} a question, not more")
