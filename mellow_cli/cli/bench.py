"""`mellow bench`: benchmarks (mellow_cli/bench/) behind one sub-command each."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from enum import Enum
from typing import Annotated, List, Optional

import typer

from mellow_cli.runtime.options import MAX_TOKENS
from mellow_cli.cli.options import BatchSizeOpt, Console, Loading, ShardOpt, grouped
from mellow_cli.errors import UsageError

bench_app = typer.Typer(help="Score a model on a benchmark or measure its speed.", no_args_is_help=True, rich_markup_mode=None)


class Mode(str, Enum):
    choices = "choices"
    generate = "generate"


class PromptStyle(str, Enum):
    plain = "plain"
    mellow = "mellow"


class MuchoScorer(str, Enum):  # bench/muchomusic.py SCORERS
    muchomusic = "muchomusic"
    mmau = "mmau"


class MmauScorer(str, Enum):  # bench/mmau.py SCORERS
    mmau = "mmau"
    mellow = "mellow"


class QaScorer(str, Enum):  # bench/qa.py SCORERS
    mmau = "mmau"
    mellow = "mellow"
    mellow_binary = "mellow-binary"


# Options of the multiple-choice benchmarks (mmau, qa), declared once.
ModeOpt = Annotated[Mode, typer.Option("--mode", help="choices: score each option's likelihood after the question and answer with the likeliest, so every answer names exactly one option (fast, the default); generate: greedy free text after the question and its lettered options, the protocol of the paper's run (an answer naming no option, or two, is wrong).")]
PredictionsOpt = Annotated[Optional[str], typer.Option("--predictions", "-o", help="Where the predictions go, in the official format (the items plus model_output) [default: DATA-MODEL-MODE.json in the current folder].")]
BenchResumeOpt = Annotated[bool, typer.Option("--resume", help="Keep the predictions already in the file (e.g. after Ctrl-C or a kill) and do only the rest.")]
BenchOverwriteOpt = Annotated[bool, typer.Option("--overwrite", help="Start the predictions file over. Only a file of this benchmark's predictions, written by mellow for this data file, is replaced; any other file is refused.")]
LimitOpt = Annotated[Optional[int], typer.Option("--limit", min=1, help="Only the first N items (of the shard, with --shard).")]
ScoreOnlyOpt = Annotated[Optional[List[str]], typer.Option("--score-only", metavar="PREDICTIONS.json", help="Score this predictions file (from any model; repeat for shards) without running a model.")]
MinAccuracyOpt = Annotated[Optional[float], typer.Option("--min-accuracy", min=0.0, max=100.0, metavar="PERCENT", help="Exit 1 when the overall accuracy is below this (for CI).")]
JsonOpt = Annotated[bool, typer.Option("--json", help="Print one JSON report (data SHA-256, model, revision, mode, counts, accuracies, wall time) instead of the table.")]
GenerateTokensOpt = Annotated[int, typer.Option("--max-tokens", min=1, max=MAX_TOKENS, help="Longest generated answer, in tokens (--mode generate; the Mellow reference's max_len).")]
PromptStyleOpt = Annotated[PromptStyle, typer.Option("--prompt-style", help="plain: the question and its lettered options as written, the clip paired with itself; mellow: as the Mellow authors' evaluation asks (lower-cased, end of text appended, an item without a second clip paired with one drawn from the file), the prompt of the paper's 52.11.")]


@dataclass(frozen=True)
class Benchmark:
    """The options of the multiple-choice benchmarks (mmau, qa), built once per run."""

    mode: ModeOpt = Mode.choices
    prompt_style: PromptStyleOpt = PromptStyle.plain
    predictions: PredictionsOpt = None
    resume: BenchResumeOpt = False
    overwrite: BenchOverwriteOpt = False
    limit: LimitOpt = None
    shard: ShardOpt = None
    batch_size: BatchSizeOpt = 8
    score_only: ScoreOnlyOpt = None
    min_accuracy: MinAccuracyOpt = None
    as_json: JsonOpt = False
    max_tokens: GenerateTokensOpt = 300
    loading: Loading = field(default_factory=Loading)
    console: Console = field(default_factory=Console)


@bench_app.command("mmau")
@grouped
def bench_mmau(
    data: Annotated[Optional[str], typer.Option("--data", help="mmau-test-mini.json (the official file; see docs/bench.md).")] = None,
    audio_dir: Annotated[Optional[str], typer.Option("--audio-dir", help="Folder the items' audio_id paths are relative to [default: the data file's folder]; a path not found there is looked for in the current folder.")] = None,
    scorer: Annotated[MmauScorer, typer.Option("--scorer", help="mmau: the benchmark's matcher (evaluation.py: the answer's words, no wrong option's; unanswered items left out); mellow: the Mellow authors' metrics/mmau.py (the text before ')' is the option letter; every item counts), the scorer of the paper's 52.11.")] = MmauScorer.mmau,
    *,
    run: Benchmark,
) -> None:
    """Score a model on MMAU with the benchmark's official matcher (evaluation.py) or, with
    --scorer mellow, the Mellow authors' metric.

    Predictions are written item by item; a clip that cannot be read is reported and counted as
    unanswered (exit 1 at the end), the others go on.

    \b
    Examples:
      mellow bench mmau --data mmau-test-mini.json --audio-dir mmau/
      mellow bench mmau --data mmau-test-mini.json --mode generate --resume
      mellow bench mmau --data mmau-test-mini.json --shard 2/4 --json > shard2.json
      mellow bench mmau --data mmau-test-mini.json --mode generate --prompt-style mellow --scorer mellow
      mellow bench mmau --data mmau-test-mini.json --model v0,samsone-134m,tinymu   # side by side
      mellow bench mmau --score-only predictions.json --min-accuracy 40
    """
    from mellow_cli.bench import mmau

    _bench(mmau, data, audio_dir, "--data FILE", scorer.value, run)


@bench_app.command("qa")
@grouped
def bench_qa(
    file: Annotated[Optional[str], typer.Argument(metavar="FILE", help="Questions as JSON lines: audio, optional audio2, question, choices, answer, optional id.", show_default=False)] = None,
    audio_root: Annotated[Optional[str], typer.Option("--audio-root", help="Folder the rows' audio paths are relative to [default: FILE's folder, as for `mellow ask --input`]; a path not found there is looked for in the current folder.")] = None,
    scorer: Annotated[QaScorer, typer.Option("--scorer", help="mmau: MMAU's matcher (evaluation.py); mellow: the Mellow authors' metrics/aqa.py letter rule (the text before ')' is the option letter, anything else counts as 'a'); mellow-binary: their yes/no rule (the answer is a substring of the output). The mellow scorers count every item.")] = QaScorer.mmau,
    *,
    run: Benchmark,
) -> None:
    """Score a model on any multiple-choice set in JSON lines, with MMAU's official matcher or
    one of the Mellow authors' metrics (--scorer).

    Rows with task, difficulty or sub-category keys also get an accuracy per value.

    \b
    Examples:
      mellow bench qa clotho-mcq.jsonl --audio-root clotho/
      mellow bench qa my-questions.jsonl --mode generate -o answers.json --min-accuracy 60
    """
    from mellow_cli.bench import qa

    _bench(qa, file, audio_root, "FILE", scorer.value, run)


@bench_app.command("muchomusic")
@grouped
def bench_muchomusic(
    data: Annotated[Optional[str], typer.Option("--data", help="muchomusic.csv (the published file; see docs/bench.md).")] = None,
    audio_dir: Annotated[Optional[str], typer.Option("--audio-dir", help="The folder laid out as the authors' data/: sdd/ and musiccaps/, each with its metadata CSV and audio/ [default: the data file's folder].")] = None,
    scorer: Annotated[MuchoScorer, typer.Option("--scorer", help="muchomusic: the authors' scorer (the letter the answer names, else the option it contains; every item counts); mmau: MMAU's matcher.")] = MuchoScorer.muchomusic,
    *,
    run: Benchmark,
) -> None:
    """Score a model on MuChoMusic (music understanding, 1,187 questions), asked as its authors
    ask ("Question: ... Options: (A) ... The correct answer is:"), each row's options in an order
    fixed by its identifier.

    \b
    Examples:
      mellow bench muchomusic --data muchomusic.csv --audio-dir data/ --model tinymu
      mellow bench muchomusic --data muchomusic.csv --audio-dir data/ --mode generate --model tinymu,v0
    """
    from mellow_cli.bench import muchomusic

    if run.prompt_style is not PromptStyle.plain:
        raise UsageError("bench muchomusic asks as its authors do: leave out --prompt-style")
    asked = run if run.score_only else dataclasses.replace(run, prompt_style="muchomusic")
    _bench(muchomusic, data, audio_dir, "--data FILE", scorer.value, asked)


def _bench(bench, data, audio_root, data_name: str, scorer_name: str, run: Benchmark) -> None:
    """Run (or only score) a multiple-choice benchmark, print its report, set the exit code."""
    import os

    from mellow_cli.bench import runner
    from mellow_cli.io.jobs import parse_shard

    run.console.setup()
    scorer = bench.SCORERS[scorer_name]
    prompt_style = getattr(run.prompt_style, "value", run.prompt_style)
    if run.score_only:
        if run.predictions or run.resume or run.overwrite or run.limit or run.shard or prompt_style != "plain":
            raise UsageError("--score-only scores finished predictions: leave out --predictions, --resume, --overwrite, "
                             "--limit, --shard and --prompt-style")
        report = runner.score_files(bench, run.score_only, data, scorer)
    else:
        if data is None:
            raise UsageError(f"give the benchmark's {data_name} (or --score-only PREDICTIONS.json)")
        shard_spec = parse_shard(run.shard)
        models = _models(run.loading.model)
        if len(models) > 1 and run.predictions:
            raise UsageError("--predictions names one file: with several --model, each model's predictions go "
                             "to DATA-MODEL-MODE.json in the current folder")
        settings = runner.Settings(mode=run.mode.value, prompt_style=prompt_style, batch_size=run.batch_size,
                                   limit=run.limit, shard=shard_spec, resume=run.resume, overwrite=run.overwrite,
                                   max_tokens=run.max_tokens)
        root = audio_root or os.path.dirname(os.path.abspath(data))
        reports = []
        for model in models:  # one after another, the same items; each model's file kept for --resume
            output = run.predictions or runner.default_predictions(data, model, run.mode.value, shard_spec,
                                                                   prompt_style)
            loading = dataclasses.replace(run.loading, model=model)
            reports.append(runner.run(bench, data, root, output, settings, loading.load, scorer))
        if len(reports) > 1:
            return _side_by_side(reports, run.min_accuracy, run.as_json)
        report = reports[0]
    _report(report, run.min_accuracy, run.as_json)


def _models(text: str) -> list[str]:
    """`--model a,b,c`: several models, in that order (a name holding a comma is a path: kept)."""
    import os

    if "," not in text or os.path.exists(text):
        return [text]
    names = [m.strip() for m in text.split(",")]
    if not all(names):
        raise UsageError(f"--model {text}: an empty name between commas")
    return names


def _side_by_side(reports, min_accuracy, as_json: bool) -> None:
    """One table, a column per model; --min-accuracy holds every model to it."""
    from mellow_cli.bench import report as text
    from mellow_cli.cli import render

    passed = None if min_accuracy is None else all(
        r.score.overall.percent is not None and r.score.overall.percent >= min_accuracy for r in reports)
    if as_json:
        render.result_json({"reports": [r.as_dict() for r in reports], "min_accuracy": min_accuracy, "passed": passed})
    else:
        columns, rows = text.side_by_side(reports)
        meta = reports[0].meta
        render.table(columns, rows, title=f"{meta['benchmark'].upper()} · mode {meta['mode']} · {meta['scored_with']}",
                     right=range(2, len(columns)))
        for r in reports:
            render.result_line(f"{r.meta['model']}: " + "; ".join(text.notes(r)))
    if passed is False:
        render.error(f"an overall accuracy is below --min-accuracy {min_accuracy:g}")
        raise typer.Exit(1)
    if any(r.score.unanswered for r in reports):
        raise typer.Exit(1)


def _report(report, min_accuracy, as_json: bool) -> None:
    from mellow_cli.cli import render
    from mellow_cli.bench import report as text

    overall = report.score.overall.percent
    passed = None if min_accuracy is None else overall is not None and overall >= min_accuracy
    if as_json:
        render.result_json({**report.as_dict(), "min_accuracy": min_accuracy, "passed": passed})
    else:
        render.table(text.COLUMNS, text.rows(report.score), title=text.title(report), right=(2, 3, 4))
        for line in text.notes(report):
            render.result_line(line)
    if passed is False:
        shown = "none (nothing was scored)" if overall is None else f"{overall:.2f}"
        render.error(f"overall accuracy {shown} is below --min-accuracy {min_accuracy:g}")
        raise typer.Exit(1)
    if report.score.unanswered:
        raise typer.Exit(1)


# bench speed's sizes, bounded so that a typo is a usage error before the model loads rather than
# hours of runs or a batch of clips that cannot fit in memory.
MAX_SPEED_RUNS = 1000
MAX_SPEED_BATCH = 256


@bench_app.command("speed")
@grouped
def bench_speed(
    tokens: Annotated[int, typer.Option("--tokens", min=2, max=MAX_TOKENS, help="Tokens per timed decode run (which ignores end of text) and at most per caption.")] = 64,
    repeat: Annotated[int, typer.Option("--repeat", min=1, max=MAX_SPEED_RUNS, help="Timed runs per figure; the median is shown. One warm-up run comes first.")] = 3,
    batch_size: Annotated[int, typer.Option("--batch-size", "-b", min=1, max=MAX_SPEED_BATCH, help="Clips per batch for the batched encoder and caption figures.")] = 8,
    prompts: Annotated[int, typer.Option("--prompts", min=0, max=MAX_SPEED_RUNS, help="Clips whose answers are compared with float32's (not with --dtype float32).")] = 8,
    skip_baseline: Annotated[bool, typer.Option("--skip-baseline", help="Do not race transformers' generate (saves importing it, a few seconds).")] = False,
    as_json: Annotated[bool, typer.Option("--json", help="Print one JSON object instead of the table.")] = False,
    quick: Annotated[bool, typer.Option("--quick", help="Each figure once, on 16 tokens, batches of 2 and 2 clips of agreement: about a minute for v0 on a laptop (the defaults take several). --tokens, --repeat, --batch-size, --prompts given beside it still win.")] = False,
    *,
    ctx: typer.Context,
    loading: Loading,
    console: Console,
) -> None:
    """Measure load time, encoder time, time to first token, prefill, tokens/s (beside
    transformers' generate on the same weights), batched captions/s, peak memory and, for a
    --dtype other than float32, how often the answers agree with float32's, on this machine.

    Everything runs in one process, after a warm-up; the audio is synthesized. It says how many
    steps it has first, then each step as it starts, with about how long the rest will take.
    With --model a,b,c each model is measured in turn, in the same way, and one table has a
    column per model and each decode's ratio to the first model's.

    \b
    Examples:
      mellow bench speed --model v0 --quick
      mellow bench speed --model v0 --threads 4
      mellow bench speed --model v0 --dtype int8
      mellow bench speed --model v0 --tokens 32 --repeat 5 --json > speed.json
      mellow bench speed --model v0,tinymu,samsone-134m --quick   # side by side
    """
    from mellow_cli.cli import render
    from mellow_cli.bench import speed
    from mellow_cli.bench.speed_plan import QUICK

    console.setup()
    if quick:  # QUICK's sizes for the options not given
        given = [(n, v) for n, v in (("tokens", tokens), ("repeat", repeat), ("batch_size", batch_size), ("prompts", prompts))]
        tokens, repeat, batch_size, prompts = (v if ctx.get_parameter_source(n).name != "DEFAULT" else getattr(QUICK, n)
                                               for n, v in given)
    reports = [speed.run(model, loading.device.value, loading.dtype.value, tokens=tokens, repeat=repeat, prompts=prompts,
                         batch_size=batch_size, baseline=not skip_baseline, log=render.info)
               for model in _models(loading.model)]  # one after another, each in the same way
    if as_json:
        render.result_json(reports[0].as_dict() if len(reports) == 1 else {"models": [r.as_dict() for r in reports]})
    elif len(reports) == 1:
        render.table(("measure", "value", "how"), speed.table_rows(reports[0]), title=speed.title(reports[0]), right=(1,),
                     footnote=speed.footnote(reports[0]))
    else:
        columns, rows = speed.side_by_side(reports)
        render.table(columns, rows, title=speed.title(reports[0], several=True),
                     right=range(1, len(columns) - 1), footnote=speed.footnote(reports[0]))
