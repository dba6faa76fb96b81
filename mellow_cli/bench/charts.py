"""Benchmark predictions as a page: each file scored as `bench --score-only` scores it (runner.py),
its accuracy per task, difficulty and sub-category drawn as bars, several files (one per model,
as `bench --model a,b,c` writes them) side by side, and every item with each model's output and
whether it was right. The page is the shell of io/html.py with its own script (page/bench.js).
"""

from __future__ import annotations

import os
from typing import Sequence

from mellow_cli.bench import mmau, predictions, qa, runner
from mellow_cli.bench.scoring import OUTPUT_KEY
from mellow_cli.errors import UsageError

BENCHES = (mmau, qa)
SHOWN = ("task", "difficulty", "sub-category", "category", "dataset")  # an item's groups, when it has them


def is_predictions(records: Sequence[dict]) -> bool:
    """Records of a benchmark's predictions file rather than result rows: each carries the mode
    it was predicted in, and its output or why there is none."""
    return bool(records) and all(isinstance(r, dict) and "mode" in r and (OUTPUT_KEY in r or "error" in r)
                                 for r in records)


def bench_of(records: Sequence[dict]):
    """MMAU's files name their audio `audio_id`; any other set is `bench qa`'s."""
    return mmau if all("audio_id" in r for r in records) else qa


def page(paths: Sequence[str], scorer_name: str = "mmau", title: str | None = None) -> str:
    """The page comparing the predictions files `paths` (one column of bars per file)."""
    from mellow_cli.io.html import asset, shell

    files = [(path, predictions.read(path)[0]) for path in paths]
    bench = bench_of([r for _, records in files for r in records])
    if scorer_name not in bench.SCORERS:
        raise UsageError(f"--scorer {scorer_name} does not score {bench.NAME}: use {', '.join(bench.SCORERS)}")
    scorer = bench.SCORERS[scorer_name]
    models, items = [], {}
    for column, (path, records) in enumerate(files):
        report = runner.score_files(bench, [path], None, scorer)
        models.append(_model(path, report))
        for record, right in zip(records, report.score.flags):
            item = items.setdefault(bench.key(record), _item(bench.key(record), record, len(files)))
            item["outputs"][column] = record.get(OUTPUT_KEY, None)
            item["right"][column] = right
            item["errors"][column] = record.get("error")
    _label(models)
    data = {"title": title or f"{bench.NAME.upper()} · {', '.join(m['label'] for m in models)}",
            "benchmark": bench.NAME, "scorer": scorer.source, "models": models, "items": list(items.values())}
    return shell("bench", data["title"], data, [asset("bench.js")])


def _model(path: str, report) -> dict:
    s, meta = report.score, report.meta
    return {"file": os.path.basename(path), "model": meta["model"], "mode": meta["mode"],
            "prompt_style": meta["prompt_style"], "overall": s.overall.as_dict(), "strict": s.strict.as_dict(),
            "counts": s.as_dict()["counts"],
            "groups": {name: [[value, *acc.as_dict().values()] for value, acc in rows] for name, rows in s.groups.items()}}


def _item(key: str, record: dict, files: int) -> dict:
    return {"key": key, "question": record.get("question"), "choices": record.get("choices"),
            "answer": record.get("answer"), "groups": {g: record[g] for g in SHOWN if record.get(g) is not None},
            "outputs": [None] * files, "right": [None] * files, "errors": [None] * files}


def _label(models: list[dict]) -> None:
    """Each column's name: its model, with the mode or the file where two would read the same."""
    for m in models:
        m["label"] = m["model"] or os.path.splitext(m["file"])[0]
    for extra in (lambda m: m["mode"], lambda m: m["file"]):
        names = [m["label"] for m in models]
        for m in models:
            if names.count(m["label"]) > 1 and extra(m):
                m["label"] = f"{m['label']} ({extra(m)})"
