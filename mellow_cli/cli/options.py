"""Options and helpers shared by every `mellow` command module (answer.py, bench.py,
train.py, serve.py, ...): each option is declared once here. Options that travel together
are frozen dataclasses (option groups: Loading, Decoding, Rows, Output, Console); `grouped`
spreads a group's options into a command's signature for Typer, which has no groups of its own,
and hands the command the group built from them. Nothing heavy is imported at module level.
"""

from __future__ import annotations

import dataclasses
import functools
import inspect
import typing
from dataclasses import dataclass
from enum import Enum
from typing import Annotated, Optional

import typer

from mellow_cli.runtime.options import MAX_SEED, MAX_TOKENS


class Device(str, Enum):
    auto = "auto"
    cpu = "cpu"
    cuda = "cuda"
    mps = "mps"


class Dtype(str, Enum):
    auto = "auto"
    float32 = "float32"
    float16 = "float16"
    bfloat16 = "bfloat16"
    int8 = "int8"


class Format(str, Enum):
    text = "text"
    json = "json"
    jsonl = "jsonl"
    csv = "csv"
    tsv = "tsv"
    srt = "srt"
    vtt = "vtt"
    html = "html"


def _from_settings(key: str, kind):
    """An option callback: when the flag was not given, the value comes from MELLOW_<KEY> or the
    config file (settings.py), else the signature's default stays."""

    def callback(ctx: typer.Context, param: typer.CallbackParam, value):
        if ctx.resilient_parsing or ctx.get_parameter_source(param.name).name != "DEFAULT":
            return value
        from mellow_cli import settings

        found = settings.lookup(key)
        if found.source == "built-in":
            return str.__str__(value) if isinstance(value, InForce) else value
        return kind(found.value)

    return callback


class InForce(str):
    """A built-in default that `--help` shows as the default in force: Typer prints a default
    with str(), and MELLOW_<KEY> or the config file may have set another, which the command will
    use. As a value it is the built-in text; the callback above hands commands a plain str."""

    def __new__(cls, key: str, builtin: str):
        made = super().__new__(cls, builtin)
        made.key = key
        return made

    def __str__(self) -> str:
        from mellow_cli import settings
        from mellow_cli.errors import MellowError

        try:
            found = settings.lookup(self.key)
        except MellowError:  # a broken config file: the command itself will say so
            return str.__str__(self)
        return found.value if found.source == "built-in" else f"{found.value} ({found.source})"


DEFAULT_MODEL = InForce("model", "v0")


def _dtype(name: str):
    return Dtype(name)


# An offset beyond any recording (~115 days) is a usage error before any work (options.py in the
# runtime bounds answers and seeds the same way).
MAX_SECONDS = 1e7

# Options shared by every command that runs the model: declared once, used by each signature.
ModelOpt = Annotated[str, typer.Option("--model", "-m", callback=_from_settings("model", str), help="Model: a published name (v0, v0_s, tinymu, samsone-134m, ...: `mellow models list --available`), a local checkpoint file or folder, or a hub id user/repo. The default shown is the one in force: v0, unless MELLOW_MODEL or `mellow config set model` names another.")]
DeviceOpt = Annotated[Device, typer.Option("--device", callback=_from_settings("device", Device), help="Where the model runs; auto picks cuda, then mps, then cpu. Default: auto, or MELLOW_DEVICE, or `mellow config set device`.")]
DtypeOpt = Annotated[Dtype, typer.Option("--dtype", callback=_from_settings("dtype", _dtype), help="Precision of the language model. auto (default): the fastest of float32, float16 and bfloat16 on this CPU, timed once and kept in the cache (bfloat16 on CUDA). float32: the exact path, token for token the reference. float16/bfloat16: half-size weights, may part from float32 at near ties. int8: 8-bit weights (a quarter of float32's bytes), logits close to float32's. Default also MELLOW_DTYPE or `mellow config set dtype`.")]
ThreadsOpt = Annotated[Optional[int], typer.Option("--threads", min=1, help="CPU threads for torch [default: all cores].")]
SeedOpt = Annotated[Optional[int], typer.Option("--seed", min=0, max=MAX_SEED, help="Seed for --sample, so a sampled answer can be repeated.")]
QuietOpt = Annotated[bool, typer.Option("--quiet", "-q", help="Print only results and errors.")]
VerboseOpt = Annotated[bool, typer.Option("--verbose", "-v", help="More detail on stderr.")]
DebugOpt = Annotated[bool, typer.Option("--debug", help="Show the full traceback when something fails.")]
MaxTokensOpt = Annotated[Optional[int], typer.Option("--max-tokens", min=1, max=MAX_TOKENS, help="Longest answer, in tokens [default: the model's own, its authors' answer length].", show_default=False)]
SampleOpt = Annotated[bool, typer.Option("--sample/--greedy", help="Sample the answer instead of the default greedy decoding (which matches the reference).")]
TemperatureOpt = Annotated[float, typer.Option("--temperature", min=0.0, max=100.0, help="Sampling temperature (with --sample).")]
TopPOpt = Annotated[float, typer.Option("--top-p", min=0.0, max=1.0, help="Nucleus sampling mass (with --sample).")]
OffsetOpt = Annotated[float, typer.Option("--offset", min=0.0, max=MAX_SECONDS, help="Hear one span of each recording, from this many seconds (one clip long, or --duration); with --window, walk the recording from there.")]
DurationOpt = Annotated[Optional[float], typer.Option("--duration", min=0.01, max=MAX_SECONDS, help="Hear one span of each recording, this many seconds from --offset (at most the model's clip; Mellow tiles a shorter one to its 10 s).")]
FormatOpt = Annotated[Optional[Format], typer.Option("--format", "-f", show_default=False, help="Output format [default: what --output's name says (.jsonl, .json, .csv, .tsv, .srt, .vtt, .html, .txt), else text]. text: the answer (in a batch after the recording's path, and with start and end times when recordings are heard in windows); json: one object for one recording or pair (its windows inside), an array of rows for a batch; jsonl, csv, tsv: one row per answer with audio, audio2, start, end, question, answer, model, revision, error (and id, choices, scores when used); srt, vtt: timed captions, one per window; html: one page to look at, the audio's picture with each answer on its timeline (a table of recordings for several), the rows inside.")]
# Batch runs: many inputs, one row each.
RecursiveOpt = Annotated[bool, typer.Option("--recursive", "-r", help="Look for audio in subfolders too.")]
OutputOpt = Annotated[Optional[str], typer.Option("--output", "-o", help="Write rows to this file instead of stdout.")]
OutputDirOpt = Annotated[Optional[str], typer.Option("--output-dir", "-d", metavar="DIR", help="One file per recording in DIR, named after it (night.flac -> DIR/night.srt; text: .txt), as whisper writes subtitles. Files that hold anything are refused unless --overwrite.")]
BatchSizeOpt = Annotated[int, typer.Option("--batch-size", "-b", min=1, help="Rows answered together; the next batch's audio is decoded meanwhile.")]
OverwriteOpt = Annotated[bool, typer.Option("--overwrite", help="Replace what --output (or the files of --output-dir) already holds (without it, a file that holds anything is refused unless --resume).")]
ResumeOpt = Annotated[bool, typer.Option("--resume", help="With --output (jsonl, csv or tsv): keep the rows already there and do only the rest, e.g. after Ctrl-C or a kill.")]
ShardOpt = Annotated[Optional[str], typer.Option("--shard", metavar="I/N", help="Do only every N-th row from the I-th (1 <= I <= N), so N processes can share one list.")]
WindowOpt = Annotated[Optional[float], typer.Option("--window", min=0.5, max=MAX_SECONDS, help="Walk each recording in windows this many seconds long (at most the model's clip) [default: the model's clip, 10 s for Mellow].")]
HopOpt = Annotated[Optional[float], typer.Option("--hop", min=0.1, max=MAX_SECONDS, help="Seconds from one window's start to the next [default: the window length].")]


def setup(quiet: bool, verbose: bool, threads: Optional[int]) -> None:
    from mellow_cli.cli import render

    render.configure(quiet=quiet, verbose=verbose)
    if threads:
        import torch

        torch.set_num_threads(at_most_cores("--threads", threads))


def at_most_cores(flag: str, count: int) -> int:
    """`count` threads or processes, at most one per core: far more than cores only slows torch
    down, and thousands crash OpenMP or exhaust the process table."""
    import os

    from mellow_cli.cli import render

    cores = os.cpu_count() or 1
    if count > cores:
        render.warn(f"{flag} {count}: this machine has {cores} cores; using {cores}")
    return min(count, cores)


def decoding(max_tokens: int, sample: bool, temperature: float, top_p: float, seed: Optional[int]):
    from mellow_cli.runtime.options import DecodingOptions

    return DecodingOptions(max_tokens=max_tokens, sample=sample, temperature=temperature, top_p=top_p, seed=seed)


def load_model(model: str, device: Device, dtype: Dtype):
    from mellow_cli.cli import render
    from mellow_cli.api import load_model

    with render.status(f"loading model {model}"), render.timed("load"):
        # -q: no download bars or notes either, only results and errors
        loaded = load_model(model, device=device.value, dtype=dtype.value, progress=not render.quiet())
    if render.verbose():
        _time_stages(loaded.net)
    return loaded


def _time_stages(net) -> None:
    """-v: forward hooks time the audio encoder and each call of the language model, so the
    timings need nothing from the model code: a call on the prefix's embeddings is the prefill,
    one new token per row a decode step, several tokens per row the scoring of choices."""
    import time

    from mellow_cli.cli import render

    started = {}

    def lm_stage(kwargs) -> tuple[str, int]:
        if kwargs.get("inputs_embeds") is not None:
            return "prefill", 0
        ids = kwargs.get("input_ids")
        return ("decode", ids.numel()) if ids is not None and ids.shape[-1] == 1 else ("score", 0)

    def watch(module, stage_of) -> None:
        def before(mod, args, kwargs):
            started[id(mod)] = (*stage_of(kwargs), time.perf_counter())

        def after(mod, args, kwargs, output):
            stage, tokens, start = started.pop(id(mod))
            render.spent(stage, time.perf_counter() - start, tokens)

        module.register_forward_pre_hook(before, with_kwargs=True)
        module.register_forward_hook(after, with_kwargs=True)

    from mellow_cli.models.family import family_of

    watch(family_of(net.cfg).audio_module(net), lambda kwargs: ("encode", 0))
    watch(net.lm, lm_stage)


# --- option groups --------------------------------------------------------------------------------


@dataclass(frozen=True)
class Console:
    """What every command prints and how many threads torch takes."""

    threads: ThreadsOpt = None
    quiet: QuietOpt = False
    verbose: VerboseOpt = False
    debug: DebugOpt = False  # main reads it from the arguments, before any command runs

    def setup(self) -> None:
        setup(self.quiet, self.verbose, self.threads)


@dataclass(frozen=True)
class Loading:
    """Which model, on which device, in which precision."""

    model: ModelOpt = DEFAULT_MODEL
    device: DeviceOpt = Device.auto
    dtype: DtypeOpt = Dtype.auto

    def load(self):
        return load_model(self.model, self.device, self.dtype)


@dataclass(frozen=True)
class Decoding:
    """How a free answer is decoded."""

    max_tokens: MaxTokensOpt = None
    sample: SampleOpt = False
    temperature: TemperatureOpt = 1.0
    top_p: TopPOpt = 0.8
    seed: SeedOpt = None

    def options(self):
        return decoding(self.max_tokens, self.sample, self.temperature, self.top_p, self.seed)


@dataclass(frozen=True)
class Rows:
    """Which rows a run answers and how: batches, shards, resuming, windows, the span of each clip."""

    batch_size: BatchSizeOpt = 8
    shard: ShardOpt = None
    resume: ResumeOpt = False
    window: WindowOpt = None
    hop: HopOpt = None
    offset: OffsetOpt = 0.0
    duration: DurationOpt = None


@dataclass(frozen=True)
class Output:
    """Where the rows go and in which format."""

    output: OutputOpt = None
    output_dir: OutputDirOpt = None
    fmt: FormatOpt = None  # None: what --output's name says, else text
    overwrite: OverwriteOpt = False

    def destination(self, resume: bool):
        """Where the run's rows go (io/results.py settles the format there: --format, else what
        --output's name says, else text)."""
        from mellow_cli.io.results import Destination

        return Destination(self.output, self.output_dir, None if self.fmt is None else self.fmt.value,
                           self.overwrite, resume)


@dataclass(frozen=True)
class Answering:
    """Every option ask, compare and caption share, built once per command."""

    output: Output
    rows: Rows
    decoding: Decoding
    loading: Loading
    console: Console

    def plan(self):
        """The run's options as the core takes them (batch/run.py's Plan)."""
        from mellow_cli.batch.run import Plan
        from mellow_cli.io.spans import Span

        rows = self.rows
        return Plan(model=self.loading.model, span=Span(rows.window, rows.hop, rows.offset, rows.duration),
                    to=self.output.destination(rows.resume), decoding=self.decoding.options(),
                    batch_size=rows.batch_size, shard=rows.shard)


def _is_group(kind) -> bool:
    return isinstance(kind, type) and dataclasses.is_dataclass(kind)


def _spread(group) -> list[inspect.Parameter]:
    """A group's options as keyword parameters, nested groups spread too, in declaration order."""
    hints = typing.get_type_hints(group, include_extras=True)
    params = []
    for f in dataclasses.fields(group):
        kind = hints[f.name]
        params += _spread(kind) if _is_group(kind) else [
            inspect.Parameter(f.name, inspect.Parameter.KEYWORD_ONLY, default=f.default, annotation=kind)]
    return params


def _gather(group, values: dict):
    """The group built from (and taking out of) the parsed option values."""
    hints = typing.get_type_hints(group, include_extras=True)
    return group(**{f.name: _gather(hints[f.name], values) if _is_group(hints[f.name]) else values.pop(f.name)
                    for f in dataclasses.fields(group)})


def grouped(command):
    """Typer reads a command's options from its signature: each parameter of `command` typed as
    an option group is replaced there by the group's options, and the command is called with the
    group built from their values. An option is then declared once however many commands take it."""
    own = inspect.signature(command, eval_str=True).parameters.values()
    groups = {p.name: p.annotation for p in own if _is_group(p.annotation)}
    params = []
    for p in own:
        params += _spread(p.annotation) if p.name in groups else [p.replace(kind=inspect.Parameter.KEYWORD_ONLY)]

    @functools.wraps(command)
    def wrapper(**values):
        built = {name: _gather(group, values) for name, group in groups.items()}
        return command(**values, **built)

    wrapper.__signature__ = inspect.Signature(params)
    wrapper.__annotations__ = {p.name: p.annotation for p in params}
    return wrapper
