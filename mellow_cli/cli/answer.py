"""`mellow ask`, `compare` and `caption`: read the command line into jobs (one input, a recording
or a pair, or a batch of them) and the run's options, then hand them to the run (batch/run.py),
which hears each recording whole (io/spans.py), writes rows as they are answered (io/results.py)
and streams one answer to the terminal through render.py.
"""

from __future__ import annotations

import os
from typing import Annotated, List, Optional

import typer

from mellow_cli.cli import render
from mellow_cli.cli.options import Answering, RecursiveOpt, grouped
from mellow_cli.errors import UsageError
from mellow_cli.io.jobs import Job, jobs_for, read_pairs, read_questions


def _run(jobs: list[Job], verb: str, run: Answering, single: bool) -> None:
    """Answer `jobs` (batch/run.py; `single`: a recording or a pair named on the command line),
    the model loaded with a status line and one free answer streamed to the terminal; the exit
    code says whether every row was answered (1: some failed, 130: Ctrl-C)."""
    from mellow_cli.batch.run import answer

    plan = run.plan()
    tally = answer(jobs, verb, plan, run.loading.load, single=single, stream=render.stream_answer)
    if tally.interrupted:
        raise typer.Exit(130)
    if tally.failed:
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
    _run(jobs, "answered", run, single=single)


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

    from mellow_cli.store.loading import peek_family

    run.console.setup()
    family = peek_family(run.loading.model)
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
        jobs = [Job(audio1, audio2, prompt)]
    _run(jobs, "compared", run, single=pairs is None)


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
    from mellow_cli.store.loading import peek_family

    run.console.setup()
    prompt = prompt or peek_family(run.loading.model).caption_prompt
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
