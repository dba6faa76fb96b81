"""The `mellow` command: parse arguments, call the core (api.py), hand results to render.py.

Nothing heavy is imported at module level: torch, transformers and numpy load inside the commands
that need them, so `mellow --help` answers at once. Every user-facing failure is a MellowError,
printed by `main` as one line on stderr; only --debug shows a traceback.
"""

from __future__ import annotations

import sys
from enum import Enum
from typing import Annotated, List, Optional

import typer

from . import __version__
from .api import (  # api imports torch only inside its functions
    CAPTION_PROMPT,
    COMPARE_PROMPT,
)
from .cli_bench import bench_app
from .cli_models import models_app
from .cli_options import (
    AnswerFormat,
    DebugOpt,
    Device,
    DeviceOpt,
    DtypeOpt,
    DurationOpt,
    FormatOpt,
    MaxTokensOpt,
    ModelOpt,
    OffsetOpt,
    QuietOpt,
    SampleOpt,
    SeedOpt,
    TemperatureOpt,
    ThreadsOpt,
    TopPOpt,
    VerboseOpt,
    decoding,
    load_model,
    open_output,
    setup,
)
from .cli_train import train
from .errors import MellowError, UsageError

app = typer.Typer(
    name="mellow",
    help="Ask questions about sounds. Answers come from Mellow, a small audio-language model "
    "that runs on a laptop CPU.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    rich_markup_mode=None,
    context_settings={"help_option_names": ["-h", "--help"]},
)


def _load_clips(paths: list[str], offset: float, duration: Optional[float]):
    """Decode every clip before the model loads, so a bad file fails in milliseconds. A clip
    named twice (one clip paired with itself) is decoded once."""
    from .audio import load_clip

    decoded = {p: load_clip(p, offset=offset, duration=duration) for p in dict.fromkeys(paths)}
    return [decoded[p] for p in paths]


def _answer(model_name, device, dtype, clips, paths, prompt, opts, fmt: AnswerFormat, choices=None) -> None:
    """Load the model, answer one prompt about one pair of clips, print the result."""
    from . import render

    model = load_model(model_name, device, dtype)
    record = {"audio": paths[0], "audio2": paths[1], "question": prompt, "model": model.name}
    if choices:
        scored = model.choose(clips[0], clips[1], prompt, choices)
        if fmt is AnswerFormat.json:
            render.result_json({**record, "answer": scored.choice, "choices": scored.as_dict()})
        else:
            render.result_line(scored.choice)
        return
    if fmt is AnswerFormat.json:
        render.result_json({**record, "answer": model.ask(clips[0], clips[1], prompt, opts)})
    else:
        render.stream_answer(model.stream(clips[0], clips[1], prompt, opts))


@app.command(no_args_is_help=True)
def ask(
    args: Annotated[List[str], typer.Argument(metavar="AUDIO [AUDIO2] QUESTION", help="One or two audio files (or - for audio on stdin), then the question.", show_default=False)],
    choices: Annotated[Optional[str], typer.Option("--choices", "-c", help='Answer by picking one of these, separated by "|": the model scores each and names exactly one.')] = None,
    model: ModelOpt = "v0",
    max_tokens: MaxTokensOpt = 300,
    sample: SampleOpt = False,
    temperature: TemperatureOpt = 1.0,
    top_p: TopPOpt = 0.8,
    offset: OffsetOpt = 0.0,
    duration: DurationOpt = None,
    fmt: FormatOpt = AnswerFormat.text,
    device: DeviceOpt = Device.auto,
    dtype: DtypeOpt = None,
    threads: ThreadsOpt = None,
    seed: SeedOpt = None,
    quiet: QuietOpt = False,
    verbose: VerboseOpt = False,
    debug: DebugOpt = False,
) -> None:
    """Ask a question about one or two recordings; the answer streams to stdout.

    Mellow always listens to two clips: with one AUDIO, that clip is paired with itself.

    \b
    Examples:
      mellow ask dog.wav "is there a dog barking?"
      mellow ask a.wav b.wav "which clip is louder?"
      mellow ask street.flac "what is the main sound?" --choices "car|rain|birds"
      cat clip.mp3 | mellow ask - "what do you hear?"
    """
    setup(quiet, verbose, threads)
    if len(args) < 2 or len(args) > 3:
        raise UsageError("ask takes AUDIO [AUDIO2] QUESTION: one or two audio files, then the question")
    paths, question = args[:-1], args[-1]
    if not question.strip():
        raise UsageError("the question is empty")
    paths = paths if len(paths) == 2 else [paths[0], paths[0]]
    choice_list = _split_choices(choices)
    clips = _load_clips(paths, offset, duration)
    _answer(model, device, dtype, clips, paths, question, decoding(max_tokens, sample, temperature, top_p, seed), fmt, choice_list)


def _split_choices(choices: Optional[str]) -> Optional[list[str]]:
    if choices is None:
        return None
    items = [c.strip() for c in choices.split("|")]
    if len(items) < 2 or not all(items):
        raise UsageError('--choices needs at least two non-empty choices separated by "|", e.g. "dog|cat"')
    return items


@app.command(no_args_is_help=True)
def compare(
    audio1: Annotated[str, typer.Argument(metavar="A", help="First recording (or - for stdin).", show_default=False)],
    audio2: Annotated[str, typer.Argument(metavar="B", help="Second recording.", show_default=False)],
    prompt: Annotated[str, typer.Option("--prompt", "-p", help="What to ask about the pair.")] = COMPARE_PROMPT,
    model: ModelOpt = "v0",
    max_tokens: MaxTokensOpt = 300,
    sample: SampleOpt = False,
    temperature: TemperatureOpt = 1.0,
    top_p: TopPOpt = 0.8,
    offset: OffsetOpt = 0.0,
    duration: DurationOpt = None,
    fmt: FormatOpt = AnswerFormat.text,
    device: DeviceOpt = Device.auto,
    dtype: DtypeOpt = None,
    threads: ThreadsOpt = None,
    seed: SeedOpt = None,
    quiet: QuietOpt = False,
    verbose: VerboseOpt = False,
    debug: DebugOpt = False,
) -> None:
    """Describe how two recordings differ.

    \b
    Examples:
      mellow compare before.wav after.wav
      mellow compare a.wav b.wav --prompt "explain the difference between the two audios in few words."
    """
    setup(quiet, verbose, threads)
    paths = [audio1, audio2]
    clips = _load_clips(paths, offset, duration)
    _answer(model, device, dtype, clips, paths, prompt, decoding(max_tokens, sample, temperature, top_p, seed), fmt)


class BatchFormat(str, Enum):
    text = "text"
    json = "json"
    jsonl = "jsonl"
    csv = "csv"
    tsv = "tsv"


@app.command(no_args_is_help=True)
def caption(
    audio: Annotated[List[str], typer.Argument(metavar="AUDIO...", help="Recordings: files, folders, globs, @list.txt (one path per line), @- (that list on stdin), or - (audio on stdin).", show_default=False)],
    prompt: Annotated[str, typer.Option("--prompt", "-p", help="The instruction given with each clip.")] = CAPTION_PROMPT,
    recursive: Annotated[bool, typer.Option("--recursive", "-r", help="Look for audio in subfolders too.")] = False,
    output: Annotated[Optional[str], typer.Option("--output", "-o", help="Write results to this file instead of stdout.")] = None,
    fmt: Annotated[BatchFormat, typer.Option("--format", "-f", help="text: captions (path<TAB>caption for several files); json, jsonl, csv, tsv: one row per file with audio, question, answer, model, revision, error.")] = BatchFormat.text,
    batch_size: Annotated[int, typer.Option("--batch-size", "-b", min=1, help="Clips captioned together; the next batch is decoded meanwhile.")] = 8,
    model: ModelOpt = "v0",
    max_tokens: MaxTokensOpt = 300,
    sample: SampleOpt = False,
    temperature: TemperatureOpt = 1.0,
    top_p: TopPOpt = 0.8,
    offset: OffsetOpt = 0.0,
    duration: DurationOpt = None,
    device: DeviceOpt = Device.auto,
    dtype: DtypeOpt = None,
    threads: ThreadsOpt = None,
    seed: SeedOpt = None,
    quiet: QuietOpt = False,
    verbose: VerboseOpt = False,
    debug: DebugOpt = False,
) -> None:
    """Write a one-sentence caption for each recording.

    A file that cannot be read is reported on stderr (and in its row's error field) and the
    others are still captioned; the exit code is then 1.

    \b
    Examples:
      mellow caption rain.wav
      mellow caption field/ --recursive --format jsonl -o captions.jsonl
      find . -name '*.flac' | mellow caption @- --format csv
    """
    from . import batch, render
    from .audio import load_clip

    setup(quiet, verbose, threads)
    paths = batch.expand_inputs(audio, recursive)
    opts = decoding(max_tokens, sample, temperature, top_p, seed)
    loaded = load_model(model, device, dtype)
    stream = open_output(output)
    writer = batch.RowWriter(fmt.value, stream, many=len(paths) > 1)
    failed = 0
    try:
        decode = lambda path: load_clip(path, offset=offset, duration=duration)  # noqa: E731
        for result, err in batch.caption_rows(loaded, paths, prompt, opts, batch_size, decode):
            if err is not None:
                render.error(str(err))
                failed += 1
            writer.write(result)
    finally:
        writer.close()
        if stream is not sys.stdout:
            stream.close()
    if len(paths) > 1:
        render.info(f"captioned {len(paths) - failed} of {len(paths)} files" + (f", {failed} failed" if failed else ""))
    if failed:
        raise typer.Exit(1)


# Commands that live in their own modules, in the order --help lists them.
app.command()(train)
app.add_typer(bench_app, name="bench")
app.add_typer(models_app, name="models")


def _version(value: bool) -> None:
    if value:
        typer.echo(f"mellow {__version__}")
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
    from . import render

    click = _click_exceptions()
    argv = sys.argv[1:] if argv is None else argv
    debug = "--debug" in argv
    try:
        # Without standalone mode click returns a command's typer.Exit code instead of raising it.
        result = app(args=argv, prog_name="mellow", standalone_mode=False)
        code = result if isinstance(result, int) else 0
    except typer.Exit as e:
        code = e.exit_code
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
