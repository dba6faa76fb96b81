"""The loop every multiple-choice benchmark shares: choose the items to do (shard, limit, what a
predictions file already holds), predict them batch by batch, write each prediction as it comes,
then score the predictions file with the official matcher.

Two ways to answer (`mode`):
- "generate": greedy decoding of the prompt (question + lettered options, items.prompt), the
  protocol of the paper's MMAU run; the free text is the prediction, so an answer that names no
  option, or two, is wrong under the official matcher;
- "choices": the likelihood of each option (items.candidates) after the same prompt; the most
  likely option's text is the prediction, so every answer names exactly one option.

Two prompts (`prompt_style`): "plain" asks the question and its lettered options as written, the
clip paired with itself; "mellow" asks as the Mellow authors' evaluation does (mellow.py: lower-
cased, end of text appended, a clip drawn from the file as the second one).

A clip that cannot be read (missing, corrupt) is reported, written with `error` instead of
`model_output`, counted as unanswered, and the run goes on.

The score is always that of the predictions file as it ends up, exactly what the scorer's script
(evaluation.py, or the authors' metrics/mmau.py or metrics/aqa.py) would print for it.
"""

from __future__ import annotations

import os
import re
import time
from dataclasses import dataclass
from typing import Callable, Iterator

from mellow_cli import events
from mellow_cli.batch import loop
from mellow_cli.io.jobs import take_shard
from mellow_cli.io import outputs
from mellow_cli.errors import MellowError, UsageError
from mellow_cli.bench import items as common
from mellow_cli.bench import mellow, muchomusic, predictions
from mellow_cli.bench.scoring import OFFICIAL, OUTPUT_KEY, Score, Scorer, score

MODES = ("choices", "generate")
# --prompt-style -> the prompt of an item (muchomusic: that benchmark's authors' own)
PROMPTS = {"plain": common.prompt, "mellow": mellow.prompt, "muchomusic": muchomusic.prompt}


class Interrupted(MellowError):
    """Ctrl-C during a run: the predictions so far are saved; exit 130 as for any interrupt."""

    exit_code = 130


@dataclass(frozen=True)
class Settings:
    mode: str = "choices"  # "choices" or "generate" (see the module docstring)
    prompt_style: str = "plain"  # "plain" or "mellow" (see the module docstring)
    batch_size: int = 8  # items answered together
    limit: int | None = None  # only the first N items (after --shard)
    shard: tuple[int, int] | None = None  # (I, N): every N-th item from the I-th
    resume: bool = False  # keep what the predictions file holds, do the rest
    overwrite: bool = False  # start over a predictions file proved to be one of ours for this data
    max_tokens: int = 300  # longest generated answer (the reference's max_len)


@dataclass(frozen=True)
class Report:
    """One benchmark run or scoring, as the CLI prints it and `--json` writes it."""

    score: Score
    meta: dict  # benchmark, data, data_sha256, predictions, model, revision, mode, ... (as_dict)

    def as_dict(self) -> dict:
        return {**self.meta, "score": self.score.as_dict()}


def default_predictions(data: str, model: str, mode: str, shard: tuple[int, int] | None,
                        prompt_style: str = "plain") -> str:
    """`<data name>-<model>-<mode>[-mellow][-shardIofN].json` in the current folder: a second run
    of the same command finds its own file (for --resume), another model, mode or prompt does not."""
    stem = os.path.splitext(os.path.basename(data))[0]
    slug = re.sub(r"[^A-Za-z0-9._-]+", "_", os.path.basename(os.path.normpath(model))) or "model"
    style = "" if prompt_style == "plain" else f"-{prompt_style}"
    part = f"-shard{shard[0]}of{shard[1]}" if shard else ""
    return f"{stem}-{slug}-{mode}{style}{part}.json"


def run(bench, data: str, audio_root: str, output: str, settings: Settings, load_model: Callable,
        scorer: Scorer = OFFICIAL) -> Report:
    """Predict the selected items of `data` into `output` and score the result with `scorer`."""
    started = time.perf_counter()
    if scorer.letters and settings.mode == "choices":
        raise UsageError(f"--scorer {scorer.name} reads the option letter of a generated answer, and --mode choices "
                         "records the option's text: use --mode generate")
    if os.path.exists(output) and os.path.samefile(output, data):
        raise UsageError(f"{output}: the predictions would overwrite the data file; choose another --predictions")
    all_items = bench.read(data, audio_root)
    if settings.prompt_style == "mellow":
        all_items = mellow.pair_clips(all_items)
    outside = common.answers_outside_choices(all_items)
    if outside:
        events.warn(f"{data}: {outside} item(s) have an answer that is not one of their choices")
    with outputs.held(output):  # one run per predictions file
        existing, complete = _existing(output, settings.resume, bench, all_items, settings)
        selected = take_shard(all_items, settings.shard)[: settings.limit]
        done = {bench.key(r) for r in existing if OUTPUT_KEY in r}
        todo = [item for item in selected if item.key not in done]
        redo = {item.key for item in todo}
        kept = [r for r in existing if bench.key(r) not in redo]
        if existing:
            events.note(f"resuming: {len(selected) - len(todo)} of {len(selected)} items already in {output}")
        model_name = revision = None
        if todo:
            model = load_model()
            model_name, revision = model.name, model.revision
            others = {r["model"] for r in kept if r.get("model") not in (None, model.name)}
            if others:
                raise UsageError(f"{output}: holds predictions of model {others.pop()}; resume with that model "
                                 "or write to another --predictions file")
            _predict_into(output, kept, model, todo, settings)
        else:
            events.note("nothing left to predict")
            if not complete:  # close the list a killed run left open, so evaluation.py can read it
                predictions.Writer(output, kept).close()
    records, _ = predictions.read(output)
    result = score(records, bench.GROUPS, scorer)
    meta = {
        "benchmark": bench.NAME,
        "scorer": scorer.name,
        "scored_with": scorer.source,
        "data": data,
        "data_sha256": common.sha256(data),
        "audio_root": audio_root,
        "predictions": output,
        "model": model_name or _common_value(records, "model"),
        "revision": revision,
        "mode": settings.mode,
        "prompt_style": settings.prompt_style,
        "items_in_data": len(all_items),
        "items_selected": len(selected),
        "predicted_now": len(todo),
        "limit": settings.limit,
        "shard": f"{settings.shard[0]}/{settings.shard[1]}" if settings.shard else None,
        "wall_seconds": round(time.perf_counter() - started, 3),
    }
    return Report(result, meta)


def _existing(output: str, resume: bool, bench, data_items: list, settings: Settings) -> tuple[list[dict], bool]:
    """(records, complete): what a --resume keeps, checked against the data, the mode and the
    prompt style, and whether the file's list is closed. Without --resume an existing file is
    refused rather than overwritten (a benchmark run can take hours)."""
    if not os.path.exists(output) or os.path.getsize(output) == 0:
        return [], False
    if settings.resume and settings.overwrite:
        raise UsageError("--resume keeps the predictions and --overwrite discards them: give one")
    if settings.overwrite:
        _prove_ours(output, bench, data_items)
        return [], False
    if not settings.resume:
        raise UsageError(f"{output}: already holds predictions; add --resume to keep them and do the rest, "
                         f"--overwrite to start over, or score them as they are with --score-only {output} "
                         "(or choose another --predictions)")
    records, complete = predictions.read(output)
    by_key = {item.key: item for item in data_items}
    for index, record in enumerate(records):
        at = f"{output}: item [{index}]"
        try:
            item = by_key.get(bench.key(record))
        except KeyError:
            raise UsageError(f"{at} has no id; is this a predictions file of this benchmark?") from None
        if item is None:
            raise UsageError(f"{at} (id {bench.key(record)}) is not in the data file: predictions of another file?")
        if any(record.get(k) != item.record.get(k) for k in ("question", "choices", "answer")):
            raise UsageError(f"{at} (id {item.key}) differs from the data file: predictions of another revision?")
        if record.get("mode", settings.mode) != settings.mode:
            raise UsageError(f"{at} was predicted with --mode {record['mode']}; resume with the same mode "
                             "or write to another --predictions file")
        if record.get("prompt_style", "plain") != settings.prompt_style:  # files before --prompt-style: plain
            raise UsageError(f"{at} was predicted with --prompt-style {record.get('prompt_style', 'plain')}; resume "
                             "with the same prompt style or write to another --predictions file")
        predictions.check_output(record, index, output)
    return records, complete


def _prove_ours(output: str, bench, data_items: list) -> None:
    """--overwrite replaces only what a run of ours wrote for this data file: a predictions list
    (whole, or cut short by a kill) whose every item has an id of the data and the keys our
    writer adds (mode, model). Anything else (the data itself, another tool's predictions, a file
    that only happens to have the name) is refused untouched."""
    hint = "not replaced: choose another --predictions, or move it away yourself"
    try:
        records, _ = predictions.read(output)
    except UsageError as e:
        raise UsageError(f"{e}; {hint}") from None
    keys = {item.key for item in data_items}
    for index, record in enumerate(records):
        try:
            known = bench.key(record) in keys
        except (KeyError, TypeError):
            known = False
        if not known or not {"mode", "model"} <= record.keys():
            raise UsageError(f"{output}: item [{index}] is not a prediction mellow made for {bench.NAME} from this "
                             f"data file; {hint}")


def _predict_into(output: str, kept: list[dict], model, todo: list, settings: Settings) -> None:
    writer = predictions.Writer(output, kept)
    done = unanswered = 0
    try:
        with events.progress(len(todo), f"{settings.mode}") as advance:
            for item, record in predict(model, todo, settings):
                if OUTPUT_KEY not in record:
                    events.error(f"item {item.key}: {record['error']} (counted as unanswered)")
                    unanswered += 1
                writer.write(record)
                done += 1
                advance()
    except KeyboardInterrupt:
        writer.close()
        raise Interrupted(f"interrupted after {done} of {len(todo)} items; predictions so far are in {output}, "
                          "run the same command with --resume to go on") from None
    writer.close()
    if unanswered:
        events.warn(f"{unanswered} of {len(todo)} items could not be answered (their audio failed)")


def predict(model, todo: list, settings: Settings) -> Iterator[tuple[object, dict]]:
    """(item, record) per item, in order: the item's record plus `model_output` (or `error`),
    `settings.batch_size` items at a time; the next batch's audio decodes meanwhile."""
    from mellow_cli.runtime.options import DecodingOptions

    options = DecodingOptions(max_tokens=settings.max_tokens)  # greedy: the reference's decoding

    def decode(item):
        first = model.read_clip(item.audio)
        second = None if item.audio2 is None else model.read_clip(item.audio2)
        return first, second

    prompt = PROMPTS[settings.prompt_style]

    def pose(item):  # --mode choices scores each lettered option; generate answers freely
        candidates = None if settings.mode == "generate" else common.candidates(item.choices)
        return prompt(item.question, item.choices), candidates

    tags = {"mode": settings.mode, "prompt_style": settings.prompt_style, "model": model.name}
    for item, result, err in loop.answer_in_batches(model, todo, decode, settings.batch_size, pose, options):
        base = {k: v for k, v in item.record.items() if k not in predictions.OURS}
        if err is None:
            yield item, {**base, OUTPUT_KEY: _prediction(item, result), **tags}
        else:
            yield item, {**base, **tags, "error": err.problem}


def _prediction(item, result) -> str:
    """The generated text, or the text of the most probable option (its lettered candidate won)."""
    if isinstance(result, str):
        return result
    return item.choices[max(range(len(result.probabilities)), key=result.probabilities.__getitem__)]


def score_files(bench, paths: list[str], data: str | None = None, scorer: Scorer = OFFICIAL) -> Report:
    """`--score-only`: score one or more predictions files (e.g. one per shard) from any model
    with `scorer`. With `data`, every prediction must belong to it (same id, question, choices
    and answer)."""
    started = time.perf_counter()
    records: list[dict] = []
    for path in paths:
        found, complete = predictions.read(path)
        if not found and not complete:
            raise UsageError(f"{path}: the file is empty")
        if not complete:
            events.warn(f"{path}: the list is not closed (an interrupted run?); scoring the {len(found)} whole items")
        for index, record in enumerate(found):
            common.check_record(record, index, path, bench.SCORE_REQUIRED)
            predictions.check_output(record, index, path)
        records += found
    ids = [str(r["id"]) for r in records if "id" in r]
    common.check_unique(ids, " + ".join(paths), name=lambda i: f"prediction {i}")
    if data is not None:
        _check_against(bench, records, data)
    if scorer.letters and any(r.get("mode") == "choices" for r in records):
        events.warn(f"--scorer {scorer.name} reads the option letter of a generated answer; the predictions of "
                    "--mode choices hold the option's text, which it counts wrong")
    meta = {
        "benchmark": bench.NAME,
        "scorer": scorer.name,
        "scored_with": scorer.source,
        "data": data,
        "data_sha256": common.sha256(data) if data else None,
        "predictions": paths if len(paths) > 1 else paths[0],
        "model": _common_value(records, "model"),
        "revision": None,
        "mode": _common_value(records, "mode"),
        "prompt_style": _common_value(records, "prompt_style"),
    }
    result = score(records, bench.GROUPS, scorer)
    meta["wall_seconds"] = round(time.perf_counter() - started, 3)
    return Report(result, meta)


def _check_against(bench, records: list[dict], data: str) -> None:
    by_key = {item.key: item for item in bench.read(data, os.path.dirname(os.path.abspath(data)))}
    for index, record in enumerate(records):
        try:
            item = by_key.get(bench.key(record))
        except KeyError:
            item = None
        if item is None or any(record.get(k) != item.record.get(k) for k in ("question", "choices", "answer")):
            raise UsageError(f"prediction {index} (id {record.get('id')}) is not an item of {data} as it stands: "
                             "predictions of another file or revision?")


def _common_value(records: list[dict], key: str):
    """The value all records share under `key` (our `model`, `mode`), else None."""
    values = {r.get(key) for r in records}
    return values.pop() if len(values) == 1 else None
