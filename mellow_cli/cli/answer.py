"""`mellow ask`, `compare` and `caption`: one question streamed to the terminal, or many rows
written as they are answered (to stdout, `-o FILE` or a file per recording), with --resume,
--shard and --window.
"""

from __future__ import annotations

from collections import Counter
from typing import Annotated, List, Optional

import typer

from mellow_cli.api import CAPTION_PROMPT, COMPARE_PROMPT, Question
from mellow_cli.cli.options import Answering, Format, RecursiveOpt, grouped
from mellow_cli.errors import UsageError
from mellow_cli.io.jobs import Job, fields_for, jobs_for, parse_shard, read_pairs, read_questions, row, take_shard, windowed


def _interactive(run: Answering) -> bool:
    """One answer for a person at a terminal: streamed (text) or one object (json)."""
    out, rows = run.output, run.rows
    return (out.fmt in (Format.text, Format.json) and out.output is None and out.output_dir is None
            and rows.window is None and rows.shard is None and not rows.resume)


def _answer_one(job, run: Answering) -> None:
    """One question at a terminal: open the recordings first (a missing or unreadable file fails
    in milliseconds), load the model, decode the clips as the model hears them, then stream the
    answer, or print the chosen choice or one JSON object."""
    from mellow_cli import batch
    from mellow_cli.cli import render
    from mellow_cli.io.audio import audio_duration

    for path in dict.fromkeys((job.audio, job.audio2)):
        audio_duration(path)
    model = run.loading.load()
    clips = batch.clip_decoder(model.read_clip, run.rows.offset, run.rows.duration)(job)
    question = Question(clips[0], clips[1], job.question)
    if job.choices:
        picked = model.choose_batch([question], [job.choices])[0]
        answer, scores = picked.choice, picked.as_dict()
    elif run.output.fmt is Format.json:
        answer, scores = model.ask_batch([question], run.decoding.options())[0], None
    else:
        render.stream_answer(model.stream(clips[0], job.question, audio2=clips[1], options=run.decoding.options()))
        return
    if run.output.fmt is Format.json:
        record = row(job, answer=answer, scores=scores, model=model.name, revision=model.revision)
        render.result_json({k: record[k] for k in fields_for([job])})
    else:
        render.result_line(answer)


def _check_run(jobs, run: Answering) -> None:
    """Options that cannot go together, refused before any audio is read."""
    out, rows = run.output, run.rows
    fmt = out.fmt.value
    if out.fmt in (Format.srt, Format.vtt):
        if rows.window is None:
            raise UsageError(f"--format {fmt} needs --window (one timed caption per window)")
        if out.output_dir is None and len({j.audio for j in jobs}) != 1:
            raise UsageError(f"--format {fmt} holds one recording's captions: with several, give --output-dir DIR "
                             "for a file each")
    if rows.window is not None and (rows.offset or rows.duration):
        raise UsageError("--window covers the whole recording: leave out --offset and --duration")
    if rows.resume and out.overwrite:
        raise UsageError("--resume keeps the rows in --output and --overwrite replaces them: give one of the two")
    if out.output_dir is not None:
        # Shards of windows would share a recording's file between processes.
        clash = ("--output" if out.output is not None else "--resume (it works with --output)" if rows.resume
                 else "--shard (with --window)" if rows.shard and rows.window is not None else None)
        if clash:
            raise UsageError(f"--output-dir writes a file per recording: leave out {clash}")


def _run_batch(jobs, verb: str, run: Answering) -> None:
    """Many rows: window, shard and resume the job list, answer it batch by batch, write each row
    as it is done (to --output, or a file per recording in --output-dir), report failed files on
    stderr, end with a summary line and an exit code."""
    import os

    from mellow_cli.io import outputs
    from mellow_cli.cli import render
    from mellow_cli.io.audio import audio_duration

    out, rows = run.output, run.rows
    _check_run(jobs, run)
    shard_spec = parse_shard(rows.shard)
    paths = None if out.output_dir is None else outputs.per_input_paths(out.output_dir, [j.audio for j in jobs],
                                                                        out.fmt.value, out.overwrite)
    if rows.window is not None:
        jobs = windowed(jobs, rows.window, rows.hop or rows.window, audio_duration)
    jobs = take_shard(jobs, shard_spec)
    fields = fields_for(jobs)
    if paths is not None:
        sink = outputs.FilePerInput(paths, out.fmt.value, fields, out.overwrite)
        _write_rows(sink, _answers(run, jobs), verb, len(jobs), None)
        files = sink.files()
        render.info(f"wrote {len(files)} file{'' if len(files) == 1 else 's'} to {out.output_dir}")
        return
    opened = outputs.open_rows(out.output, out.fmt.value, fields, resume=rows.resume, overwrite=out.overwrite)
    try:
        left = Counter(opened.done)
        todo = []
        for job, (key, _) in zip(jobs, outputs.numbered_keys(row(j) for j in jobs)):
            if left[key] > 0:
                left[key] -= 1
            else:
                todo.append(job)
        if opened.done:
            render.info(f"resuming: {len(jobs) - len(todo)} of {len(jobs)} rows already in {out.output}")
        if not todo:
            render.info("nothing left to do")
            return
        results = _answers(run, todo, check=lambda model: opened.check_model(model.name, out.output))
        writer = outputs.writer(out.fmt.value, opened.stream, many=len(jobs) > 1, fields=fields,
                                append=opened.append, folder=os.path.dirname(out.output or ""))
        _write_rows(writer, results, verb, len(todo), out.output if out.fmt.value in outputs.RESUMABLE else None)
    finally:
        opened.close()


def _answers(run: Answering, jobs, check=None):
    """(row, error) per job, the model loaded first (and `check`ed against the output's rows)."""
    from mellow_cli import batch

    model = run.loading.load()
    if check is not None:
        check(model)
    return batch.answer_rows(model, jobs, run.decoding.options(), run.rows.batch_size,
                             batch.clip_decoder(model.read_clip, run.rows.offset, run.rows.duration))


def _write_rows(writer, results, verb: str, total: int, resumable: str | None) -> None:
    """Write each (row, error) as it comes, errors to stderr; a summary line and the exit code."""
    from mellow_cli.cli import render

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
      mellow ask field.flac "is a bird singing?" --window 10 --choices "yes|no" -f csv
    """
    from mellow_cli.io import inputs

    run.console.setup()
    run = run.resolved()
    choice_list = inputs.parse_choices(choices, "--choices")
    if input_file is not None:
        if args:
            raise UsageError("give either --input FILE or AUDIO [AUDIO2] QUESTION, not both")
        jobs = read_questions(input_file, choice_list)
        if not jobs:
            raise UsageError(f"{input_file}: no questions in the file")
    else:
        audio, question = inputs.split_question(args or [])
        pair = len(audio) <= 2 and all(inputs.one_recording(a) for a in audio)
        if pair:
            jobs = [Job(audio[0], audio[-1], question, tuple(choice_list) if choice_list else None)]
        else:
            jobs = jobs_for(inputs.expand_inputs(audio, recursive), question, choice_list)
        if pair and _interactive(run):
            return _answer_one(jobs[0], run)
    _run_batch(jobs, "answered", run)


@grouped
def compare(
    audio1: Annotated[Optional[str], typer.Argument(metavar="A", help="First recording (or - for stdin).", show_default=False)] = None,
    audio2: Annotated[Optional[str], typer.Argument(metavar="B", help="Second recording.", show_default=False)] = None,
    prompt: Annotated[str, typer.Option("--prompt", "-p", help="What to ask about the pair.")] = COMPARE_PROMPT,
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
    if pairs is not None:
        if audio1 or audio2:
            raise UsageError("give either --pairs FILE or A B, not both")
        jobs = read_pairs(pairs, prompt)
        if not jobs:
            raise UsageError(f"{pairs}: no pairs in the file")
    else:
        if audio1 is None or audio2 is None:
            raise UsageError("compare takes two recordings, A and B (or --pairs FILE)")
        jobs = [Job(audio1, audio2, prompt)]
        if _interactive(run):
            return _answer_one(jobs[0], run)
    _run_batch(jobs, "compared", run)


@grouped
def caption(
    audio: Annotated[List[str], typer.Argument(metavar="AUDIO...", help="Recordings: files, folders, globs, @list.txt (one path per line), @- (that list on stdin), or - (audio on stdin).", show_default=False)],
    prompt: Annotated[str, typer.Option("--prompt", "-p", help="The instruction given with each clip.")] = CAPTION_PROMPT,
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
      mellow caption night.flac --window 10 --format srt > night.srt
      mellow caption nights/*.flac --window 10 -f srt --output-dir subs/
      mellow caption big/ -r -f jsonl -o part2.jsonl --shard 2/4 --resume
    """
    from mellow_cli.io import inputs

    run.console.setup()
    run = run.resolved()
    _run_batch(jobs_for(inputs.expand_inputs(audio, recursive), prompt), "captioned", run)
