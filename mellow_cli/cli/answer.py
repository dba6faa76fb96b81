"""`mellow ask`, `compare` and `caption`: one input (a recording, or a pair) or a batch of them,
each recording heard whole: one longer than the model's clip is walked in windows of that clip
(the model's family says how long; `--window`/`--hop` choose others), unless --offset/--duration
ask for one span. One answer is streamed to the terminal; rows are written as they are answered
(to stdout, `-o FILE` or a file per recording), with --resume and --shard.
"""

from __future__ import annotations

import math
import os
from collections import Counter
from typing import Annotated, List, Optional

import typer

from mellow_cli.cli import render
from mellow_cli.cli.options import Answering, Format, RecursiveOpt, grouped
from mellow_cli.errors import AudioError, UsageError
from mellow_cli.io.jobs import Job, fields_for, jobs_for, parse_shard, read_pairs, read_questions, row, take_shard, windowed


def _walks(run: Answering) -> bool:
    """Whether each recording is heard whole, in windows (the default, or --window), rather than
    as the one span --offset/--duration choose."""
    rows = run.rows
    return rows.window is not None or (rows.offset == 0 and rows.duration is None)


def _check_run(jobs, run: Answering) -> None:
    """Options that cannot go together, refused before any audio is read."""
    out, rows = run.output, run.rows
    fmt = out.fmt.value
    if out.fmt in (Format.srt, Format.vtt) and out.output_dir is None and len({j.audio for j in jobs}) != 1:
        raise UsageError(f"--format {fmt} holds one recording's captions: with several, give --output-dir DIR "
                         "for a file each")
    if rows.window is not None and rows.duration is not None:
        raise UsageError("--window walks each recording in windows and --duration asks for one span of it: give "
                         "one of the two")
    if rows.hop is not None and not _walks(run):
        span = "--duration" if rows.duration is not None else "--offset without --window"
        walk = "" if rows.duration is not None else " (or add --window SECONDS to walk from --offset on)"
        raise UsageError(f"--hop spaces the windows of a recording walked whole, and {span} asks for one span: "
                         f"leave out --hop{walk}")
    if rows.resume and out.overwrite:
        raise UsageError("--resume keeps the rows in --output and --overwrite replaces them: give one of the two")
    if out.output_dir is not None:
        clash = ("--output" if out.output is not None else "--resume (it works with --output)" if rows.resume
                 else None)
        if clash:
            raise UsageError(f"--output-dir writes a file per recording: leave out {clash}")


def _run(jobs: list[Job], verb: str, run: Answering, single: bool) -> None:
    """Answer `jobs`: one input (`single`: a recording or a pair named on the command line) or a
    batch. What can be refused is refused before the model loads: the options, the output (its
    format, what it holds, --resume's proof) and, for one input, a recording that cannot be read.
    Then the model says how long a clip it hears, the recordings are cut into windows (and
    shards), and the rows are answered batch by batch and written as they come; one clip for a
    person at a terminal is streamed instead."""
    import functools

    from mellow_cli.io import outputs
    from mellow_cli.io.audio import audio_duration

    out, rows = run.output, run.rows
    _check_run(jobs, run)
    shard = parse_shard(rows.shard)
    duration_of = functools.cache(audio_duration)
    paths = None if out.output_dir is None else outputs.per_input_paths(out.output_dir, [j.audio for j in jobs],
                                                                        out.fmt.value, out.overwrite)
    if single:  # a missing or broken file fails in milliseconds, not after the model loads
        for path in dict.fromkeys((jobs[0].audio, jobs[0].audio2)):
            duration_of(path)
    fields = fields_for(jobs)
    if paths is not None:
        # Shards by recording, not by window: each recording's file is one process's.
        jobs = take_shard(jobs, shard)
        model = run.loading.load()
        jobs, length = _cut(jobs, model, run, duration_of)
        sink = outputs.FilePerInput(paths, out.fmt.value, fields, out.overwrite)
        _write_rows(sink, _answers(model, run, jobs, length), verb, len(jobs), None)
        files = sink.files()
        render.info(f"wrote {len(files)} file{'' if len(files) == 1 else 's'} to {out.output_dir}")
        return
    opened = outputs.open_rows(out.output, out.fmt.value, fields, resume=rows.resume, overwrite=out.overwrite)
    try:
        model = run.loading.load()
        opened.check_model(model.name, out.output)
        cut, length = _cut(jobs, model, run, duration_of)
        times = rows.window is not None or len(cut) > len(jobs)
        cut = take_shard(cut, shard)
        left = Counter(opened.done)
        todo = []
        for job, (key, _) in zip(cut, outputs.numbered_keys(row(j) for j in cut)):
            if left[key] > 0:
                left[key] -= 1
            else:
                todo.append(job)
        if opened.done:
            render.info(f"resuming: {len(cut) - len(todo)} of {len(cut)} rows already in {out.output}")
        if not todo:
            render.info("nothing left to do")
            return
        if (single and len(cut) == 1 and not times and not todo[0].choices and out.fmt is Format.text
                and out.output is None):
            return _stream(model, run, todo[0], length)
        writer = outputs.writer(out.fmt.value, opened.stream, many=not single, fields=fields, append=opened.append,
                                folder=os.path.dirname(out.output or ""), times=times)
        resumable = out.output if out.fmt.value in outputs.RESUMABLE else None
        _write_rows(writer, _answers(model, run, todo, length), verb, len(todo), resumable)
    finally:
        opened.close()


def _cut(jobs: list[Job], model, run: Answering, duration_of) -> tuple[list[Job], float]:
    """The jobs as the model will hear their recordings, and how long each span is: walked in
    windows of the model's clip (or --window, --hop apart, from --offset), or the one span
    --offset/--duration choose. A pair is one clip of each unless --window asks to walk its
    first recording: the model hears the two together, and windows of both would pair spans
    that do not belong together. Says on stderr which recordings were cut."""
    rows = run.rows
    clip = model.family.clip_seconds(model.cfg)
    for flag, value in (("--window", rows.window), ("--duration", rows.duration)):
        if value is not None and value > clip:
            raise UsageError(f"{flag} {value:g}: {model.name} hears at most {clip:g} s at once")
    walks = _walks(run)
    length = (rows.window or clip) if walks else (rows.duration or clip)
    hop = (rows.hop or length) if walks else math.inf
    cut = [part for job in jobs for part in windowed(
        [job], length, hop if rows.window is not None or job.audio2 == job.audio else math.inf, duration_of,
        rows.offset)]
    if walks:
        _say_how_heard(cut, duration_of, length, hop, rows.offset, clip, rows.window is not None)
    return cut, length


CUT_LINES = 3  # recordings cut into windows named one a line; past that, one line counts them


def _say_how_heard(cut: list[Job], duration_of, length: float, hop: float, offset: float, clip: float,
                   asked: bool) -> None:
    """A line on stderr for each recording heard in several windows (`field.flac: 180 s heard as
    18 windows of 10 s`) and each recording of a pair longer than the clip, of which only the
    start is heard; past CUT_LINES, one line counting them (each then said with -v)."""
    counts = Counter(j.audio for j in cut)
    walked = [audio for audio, n in counts.items() if n > 1]
    how = f"windows of {length:g} s" + (f" every {hop:g} s" if hop != length else "") + (
        f" from {offset:g} s" if offset else "")
    lines = [f"{audio}: {_seconds(duration_of(audio))} heard as {counts[audio]} {how}" for audio in walked]
    paired = dict.fromkeys(p for j in cut if j.audio2 != j.audio for p in (j.audio, j.audio2) if p not in counts
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
        render.info(f"{len(lines)} recordings heard in part: {len(walked)} in {how} ({cuts} rows), "
                    f"{len(lines) - len(walked)} of pairs in their first {clip:g} s (-v names them)")
        for line in lines:
            render.debug(line)
    else:
        for line in lines:
            render.info(line)


def _seconds(value: float) -> str:
    return f"{value:.1f}".removesuffix(".0") + " s"


def _stream(model, run: Answering, job: Job, length: float) -> None:
    """One free answer for a person at a terminal, written as it is decoded."""
    clips = _decoder(model, run, length)(job)
    render.stream_answer(model.stream(clips[0], job.question, audio2=clips[1], options=run.decoding.options()))


def _decoder(model, run: Answering, length: float):
    """How each job's clips are read: its span of the first recording; the second from its start
    beside a walk, or over the same span when --offset/--duration chose one."""
    from mellow_cli import batch

    walk = _walks(run)
    return batch.clip_decoder(model.read_clip, length, 0.0 if walk else run.rows.offset,
                              None if walk else run.rows.duration)


def _answers(model, run: Answering, jobs: list[Job], length: float):
    """(row, error) per job, answered `--batch-size` at a time."""
    from mellow_cli import batch

    return batch.answer_rows(model, jobs, run.decoding.options(), run.rows.batch_size, _decoder(model, run, length))


def _write_rows(writer, results, verb: str, total: int, resumable: str | None) -> None:
    """Write each (row, error) as it comes, errors to stderr; a summary line and the exit code."""
    written = failed = 0
    try:
        with render.progress(total, verb) as advance:
            for result, err in results:
                if err is not None:
                    render.error(str(err))
                    failed += 1
                writer.write(result)
                written += 1
                advance()
    except KeyboardInterrupt:
        where = f" to {resumable}; add --resume to continue" if resumable else ""
        render.error(f"interrupted after {written} of {total} rows{where}")
        raise typer.Exit(130) from None
    finally:
        writer.close()
    if total > 1:
        render.info(f"{verb} {written - failed} of {total} rows" + (f", {failed} failed" if failed else ""))
    if failed:
        raise typer.Exit(1)


@grouped
def ask(
    args: Annotated[Optional[List[str]], typer.Argument(metavar="AUDIO [AUDIO2] QUESTION", help="One or two audio files (or - for audio on stdin), then the question. A folder, glob, @list.txt or @- (paths on stdin), or three or more files, asks the question about each recording in turn.", show_default=False)] = None,
    choices: Annotated[Optional[str], typer.Option("--choices", "-c", help='Answer by picking one of these, separated by "|": the model scores each and names exactly one.')] = None,
    input_file: Annotated[Optional[str], typer.Option("--input", "-i", help="Questions as JSON lines (- for stdin): audio, optional audio2, question, optional choices (list or \"a|b\"), optional id. Other fields come back in each row; a gold answer stays, and the model's goes under prediction.")] = None,
    recursive: RecursiveOpt = False,
    *,
    run: Answering,
) -> None:
    """Ask a question about one or two recordings; the answer streams to stdout.

    Mellow always listens to two clips: with one AUDIO, that clip is paired with itself.

    \b
    Examples:
      mellow ask dog.wav "is there a dog barking?"
      mellow ask a.wav b.wav "which clip is louder?"
      mellow ask street.flac "what is the main sound?" --choices "car|rain|birds"
      cat clip.mp3 | mellow ask - "what do you hear?"
      mellow ask --input questions.jsonl --format jsonl -o answers.jsonl --resume
      mellow ask field.flac "is a bird singing?" --choices "yes|no" -o field.csv
    """
    from mellow_cli.io import inputs

    run.console.setup()
    run = run.resolved()
    choice_list = inputs.parse_choices(choices, "--choices")
    single = False
    if input_file is not None:
        if args:
            raise UsageError("give either --input FILE or AUDIO [AUDIO2] QUESTION, not both")
        jobs = read_questions(input_file, choice_list)
        if not jobs:
            raise UsageError(f"{input_file}: no questions in the file")
    else:
        audio, question = inputs.split_question(args or [])
        single = len(audio) <= 2 and all(inputs.one_recording(a) for a in audio)
        if single:
            jobs = [Job(audio[0], audio[-1], question, tuple(choice_list) if choice_list else None)]
        else:
            jobs = jobs_for(_recordings(audio, recursive), question, choice_list)
    _check_clips(jobs, run)
    _run(jobs, "answered", run, single=single)


def _check_clips(jobs, run: Answering) -> None:
    """A question with more clips than the model's family takes, refused before it loads (the
    model would refuse it too, after loading)."""
    family = _family(run)
    most = family.most_clips
    if most is not None and any(len({j.audio, j.audio2}) > most for j in jobs):
        raise UsageError(f"{run.loading.model}: {family.title} takes {most} clip{'s' if most > 1 else ''} a question, "
                         "not more")


@grouped
def compare(
    audio1: Annotated[Optional[str], typer.Argument(metavar="A", help="First recording (or - for stdin).", show_default=False)] = None,
    audio2: Annotated[Optional[str], typer.Argument(metavar="B", help="Second recording.", show_default=False)] = None,
    prompt: Annotated[Optional[str], typer.Option("--prompt", "-p", help="What to ask about the pair [default: the model's own difference prompt; Mellow's is \"explain the difference between the two audios in detail.\"].", show_default=False)] = None,
    pairs: Annotated[Optional[str], typer.Option("--pairs", help="Many pairs: a CSV or TSV with a header naming audio1 and audio2 (optional prompt and id columns), or JSON lines (.jsonl); - for stdin.")] = None,
    *,
    run: Answering,
) -> None:
    """Describe how two recordings differ.

    \b
    Examples:
      mellow compare before.wav after.wav
      mellow compare a.wav b.wav --prompt "explain the difference between the two audios in few words."
      mellow compare --pairs pairs.csv --format jsonl -o differences.jsonl
    """

    run.console.setup()
    run = run.resolved()
    family = _family(run)
    if family.most_clips == 1:
        raise UsageError(f"{run.loading.model}: {family.title} takes one clip a question, so it cannot compare two "
                         "recordings: ask about each (mellow ask, mellow caption)")
    prompt = prompt or family.compare_prompt
    if pairs is not None:
        if audio1 or audio2:
            raise UsageError("give either --pairs FILE or A B, not both")
        jobs = read_pairs(pairs, prompt)
        if not jobs:
            raise UsageError(f"{pairs}: no pairs in the file")
    else:
        if audio1 is None or audio2 is None:
            raise UsageError("compare takes two recordings, A and B (or --pairs FILE)")
        return _run([Job(audio1, audio2, prompt)], "compared", run, single=True)
    _run(jobs, "compared", run, single=False)


@grouped
def caption(
    audio: Annotated[List[str], typer.Argument(metavar="AUDIO...", help="Recordings: files, folders, globs, @list.txt (one path per line), @- (that list on stdin), or - (audio on stdin).", show_default=False)],
    prompt: Annotated[Optional[str], typer.Option("--prompt", "-p", help="The instruction given with each clip [default: the model's own caption prompt; Mellow's is \"caption the audio.\"].", show_default=False)] = None,
    recursive: RecursiveOpt = False,
    *,
    run: Answering,
) -> None:
    """Write a one-sentence caption for each recording.

    A file that cannot be read is reported on stderr (and in its row's error field) and the
    others are still captioned; the exit code is then 1. Ctrl-C stops after the row being
    written (exit 130); run the same command with --resume to go on.

    \b
    Examples:
      mellow caption rain.wav
      mellow caption field/ --recursive --format jsonl -o captions.jsonl
      find . -name '*.flac' | mellow caption @- --format csv
      mellow caption night.flac --format srt > night.srt
      mellow caption nights/*.flac -f srt --output-dir subs/
      mellow caption big/ -r -f jsonl -o part2.jsonl --shard 2/4 --resume
    """
    from mellow_cli.io import inputs

    run.console.setup()
    run = run.resolved()
    prompt = prompt or _family(run).caption_prompt
    single = len(audio) == 1 and inputs.one_recording(audio[0])
    _run(jobs_for(_recordings(audio, recursive), prompt), "captioned", run, single=single)


SKIPPED_NAMES = 3  # files a folder's skip line names; the rest are counted


def _recordings(args: list[str], recursive: bool) -> list[str]:
    """The recordings the arguments name, with a line on stderr for each folder whose files
    include some no reader opens as audio: how many, and the first few."""
    from mellow_cli.io import inputs

    skipped: list[tuple[str, str]] = []
    paths = inputs.expand_inputs(args, recursive, skipped=skipped)
    for folder in dict.fromkeys(f for f, _ in skipped):
        names = [os.path.relpath(p, folder) for f, p in skipped if f == folder]
        more = f" and {len(names) - SKIPPED_NAMES} more" if len(names) > SKIPPED_NAMES else ""
        render.info(f"{folder}: skipped {len(names)} file{'s' if len(names) > 1 else ''} no reader opens as audio "
                    f"({', '.join(names[:SKIPPED_NAMES])}{more})")
    return paths


def _family(run: Answering):
    """The family of the model asked for, known before it loads (its name, or its folder's
    config); Mellow's where only reading the checkpoint would tell."""
    from mellow_cli.models.family import family, family_of
    from mellow_cli.store.loading import peek_config

    cfg = peek_config(run.loading.model)
    return family("mellow") if cfg is None else family_of(cfg)
