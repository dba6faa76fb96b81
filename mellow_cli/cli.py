"""The `mellow` command: parse arguments, call the core (api.py), hand results to render.py.

Nothing heavy is imported at module level: torch, transformers and numpy load inside the commands
that need them, so `mellow --help` answers at once. Every user-facing failure is a MellowError,
printed by `main` as one line on stderr; only --debug shows a traceback.
"""

from __future__ import annotations

import sys
from collections import Counter
from typing import Annotated, List, Optional

import typer

from . import __version__
from .api import (  # api imports torch only inside its functions
    CAPTION_PROMPT,
    COMPARE_PROMPT,
    Question,
)
from .cli_bench import bench_app
from .cli_env import config_app, env
from .cli_models import models_app
from .cli_options import Answering, Format, RecursiveOpt, grouped
from .cli_serve import serve
from .cli_train import train
from .errors import MellowError, UsageError

app = typer.Typer(
    name="mellow",
    help="Ask questions about sounds. Answers come from Mellow, a small audio-language model "
    "that runs on a laptop CPU.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    rich_markup_mode=None,
    context_settings={"help_option_names": ["-h", "--help"]},
)


def _plain(arg: str) -> bool:
    """One recording named as itself (or `-`), not a folder, a glob or an @list."""
    import glob
    import os

    if arg == "-":
        return True
    return not arg.startswith("@") and not os.path.isdir(arg) and not (glob.has_magic(arg) and not os.path.exists(arg))


def _interactive(run: Answering) -> bool:
    """One answer for a person at a terminal: streamed (text) or one object (json)."""
    out, rows = run.output, run.rows
    return (out.fmt in (Format.text, Format.json) and out.output is None and out.output_dir is None
            and rows.window is None and rows.shard is None and not rows.resume)


def _answer_one(job, run: Answering) -> None:
    """One question at a terminal: decode the clips first (a bad file fails in milliseconds),
    load the model, then stream the answer, or print the chosen choice or one JSON object."""
    from . import batch, render

    clips = batch.clip_decoder(run.rows.offset, run.rows.duration)(job)
    model = run.loading.load()
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
        record = batch.row(job, answer=answer, scores=scores, model=model.name, revision=model.revision)
        render.result_json({k: record[k] for k in batch.fields_for([job])})
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
    from . import batch, formats, outputs, render
    from .audio import audio_duration

    out, rows = run.output, run.rows
    _check_run(jobs, run)
    shard_spec = batch.parse_shard(rows.shard)
    paths = None if out.output_dir is None else outputs.per_input_paths(out.output_dir, [j.audio for j in jobs],
                                                                        out.fmt.value, out.overwrite)
    if rows.window is not None:
        jobs = batch.windowed(jobs, rows.window, rows.hop or rows.window, audio_duration)
    jobs = batch.take_shard(jobs, shard_spec)
    fields = batch.fields_for(jobs)
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
        for job, (key, _) in zip(jobs, outputs.numbered_keys(batch.row(j) for j in jobs)):
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
        writer = formats.RowWriter(out.fmt.value, opened.stream, many=len(jobs) > 1, fields=fields,
                                   append=opened.append)
        _write_rows(writer, results, verb, len(todo), out.output if out.fmt.value in outputs.RESUMABLE else None)
    finally:
        opened.close()


def _answers(run: Answering, jobs, check=None):
    """(row, error) per job, the model loaded first (and `check`ed against the output's rows)."""
    from . import batch

    model = run.loading.load()
    if check is not None:
        check(model)
    return batch.answer_rows(model, jobs, run.decoding.options(), run.rows.batch_size,
                             batch.clip_decoder(run.rows.offset, run.rows.duration))


def _write_rows(writer, results, verb: str, total: int, resumable: str | None) -> None:
    """Write each (row, error) as it comes, errors to stderr; a summary line and the exit code."""
    from . import render

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


def _forgotten_question(text: str) -> str | None:
    """What the question names when it is an input, not a question (`mellow ask a.wav b.wav`, or
    `mellow ask a.wav clips/`, with the question left out); None for a question."""
    import os

    from .inputs import AUDIO_EXTENSIONS

    if text == "-" or (os.path.splitext(text)[1].lower() in AUDIO_EXTENSIONS and " " not in text.strip()):
        return "an audio file's name"
    return "a folder" if os.path.isdir(text) else None


@app.command(no_args_is_help=True)
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
    from . import batch, inputs

    run.console.setup()
    choice_list = inputs.parse_choices(choices, "--choices")
    if input_file is not None:
        if args:
            raise UsageError("give either --input FILE or AUDIO [AUDIO2] QUESTION, not both")
        jobs = batch.read_questions(input_file, choice_list)
        if not jobs:
            raise UsageError(f"{input_file}: no questions in the file")
    else:
        if not args or len(args) < 2:
            raise UsageError("ask takes AUDIO [AUDIO2] QUESTION: one or two audio files, then the question (or --input FILE)")
        audio, question = args[:-1], args[-1]
        if not question.strip():
            raise UsageError("the question is empty")
        if forgotten := _forgotten_question(question):
            raise UsageError(f"the question is {question!r}, {forgotten}: ask takes AUDIO [AUDIO2] QUESTION, with "
                             "the question last")
        pair = len(audio) <= 2 and all(_plain(a) for a in audio)
        if pair:
            jobs = [batch.Job(audio[0], audio[-1], question, tuple(choice_list) if choice_list else None)]
        else:
            jobs = batch.jobs_for(inputs.expand_inputs(audio, recursive), question, choice_list)
        if pair and _interactive(run):
            return _answer_one(jobs[0], run)
    _run_batch(jobs, "answered", run)


@app.command(no_args_is_help=True)
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
    from . import batch

    run.console.setup()
    if pairs is not None:
        if audio1 or audio2:
            raise UsageError("give either --pairs FILE or A B, not both")
        jobs = batch.read_pairs(pairs, prompt)
        if not jobs:
            raise UsageError(f"{pairs}: no pairs in the file")
    else:
        if audio1 is None or audio2 is None:
            raise UsageError("compare takes two recordings, A and B (or --pairs FILE)")
        jobs = [batch.Job(audio1, audio2, prompt)]
        if _interactive(run):
            return _answer_one(jobs[0], run)
    _run_batch(jobs, "compared", run)


@app.command(no_args_is_help=True)
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
    from . import batch, inputs

    run.console.setup()
    _run_batch(batch.jobs_for(inputs.expand_inputs(audio, recursive), prompt), "captioned", run)


# Commands that live in their own modules, in the order --help lists them.
app.command()(serve)
app.command()(train)
app.add_typer(bench_app, name="bench")
app.add_typer(models_app, name="models")
app.add_typer(config_app, name="config")
app.command()(env)


def _version(value: bool) -> None:
    if value:
        import platform
        from importlib import metadata

        try:
            torch = metadata.version("torch")
        except metadata.PackageNotFoundError:
            torch = "not installed"
        typer.echo(f"mellow {__version__} (Python {platform.python_version()}, torch {torch}); `mellow env` tells more")
        raise typer.Exit()


@app.callback()
def _root(
    version: Annotated[Optional[bool], typer.Option("--version", callback=_version, is_eager=True, help="Print the version and exit.")] = None,
) -> None:
    """Ask questions about sounds, caption and compare recordings, from the command line."""


def _click_exceptions():
    try:  # recent Typer vendors its own copy of click
        from typer._click import exceptions
    except ImportError:
        from click import exceptions
    return exceptions


def main(argv: Optional[list[str]] = None) -> None:
    """Entry point: run the app, turning every failure into one line on stderr and an exit code."""
    from . import outputs, render

    click = _click_exceptions()
    argv = sys.argv[1:] if argv is None else argv
    render.configure()  # each run starts from the defaults (and no timings), even in one process
    debug = "--debug" in argv
    try:
        # Without standalone mode click returns a command's typer.Exit code instead of raising it.
        result = app(args=argv, prog_name="mellow", standalone_mode=False)
        code = result if isinstance(result, int) else 0
        render.timings()  # -v: where the time went, on stderr
        with outputs.writing(outputs.STDOUT):  # a result still buffered fails here, while it can be said
            sys.stdout.flush()
    except typer.Exit as e:
        code = e.exit_code
    except (SystemExit, BrokenPipeError) as e:
        if isinstance(e, SystemExit) and not isinstance(e.__context__, BrokenPipeError):
            raise
        # Click turns a closed stdout into exit 1 (the flush above raises it as is). The reader
        # went away (`mellow caption *.wav | head -1`): stop quietly, as Unix filters do, with the
        # status a shell reports for SIGPIPE; stdout goes to /dev/null so the interpreter's flush
        # at exit cannot complain.
        import os

        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        code = 141
    except (typer.Abort, KeyboardInterrupt):
        render.error("interrupted")
        code = 130
    except click.NoArgsIsHelpError as e:  # bare `mellow` or `mellow ask`: the help, as usual
        e.show()
        code = e.exit_code
    except click.ClickException as e:  # usage errors: one line, with where to look
        hint = f" (see: {e.ctx.command_path} --help)" if getattr(e, "ctx", None) else ""
        render.error(e.format_message() + hint)
        code = e.exit_code
    except MellowError as e:
        if debug:
            raise
        render.error(str(e))
        code = e.exit_code
    except Exception as e:  # a bug: still one line; the traceback only with --debug
        if debug:
            raise
        render.error(f"unexpected {type(e).__name__}: {e} (run again with --debug for the traceback)")
        code = 1
    sys.exit(code)
