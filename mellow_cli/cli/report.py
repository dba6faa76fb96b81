"""`mellow report`: a page to look at, made from files a run already wrote, with no model loaded:
the result rows of ask, compare or caption (jsonl, json, csv, tsv) drawn as `-f html` draws
them, or benchmark predictions files scored and set side by side.
"""

from __future__ import annotations

import os
from enum import Enum
from typing import Annotated, List, Optional

import typer

from mellow_cli.cli.options import DebugOpt, OverwriteOpt, QuietOpt, setup
from mellow_cli.errors import UsageError

ROW_FORMATS = {".jsonl": "jsonl", ".ndjson": "jsonl", ".csv": "csv", ".tsv": "tsv"}  # else a JSON list


class ReportScorer(str, Enum):  # bench/mmau.py and bench/qa.py SCORERS
    mmau = "mmau"
    mellow = "mellow"
    mellow_binary = "mellow-binary"


def report(
    files: Annotated[List[str], typer.Argument(metavar="FILE...", help="Result rows of ask, compare or caption (.jsonl, .json, .csv, .tsv; several files, such as shards, make one page), or the predictions files of mellow bench (.json; one per model, side by side).", show_default=False)],
    output: Annotated[Optional[str], typer.Option("--output", "-o", help="Where the page goes [default: standard output].")] = None,
    overwrite: OverwriteOpt = False,
    scorer: Annotated[ReportScorer, typer.Option("--scorer", help="For predictions: mmau, the benchmark's matcher (evaluation.py); mellow or mellow-binary, the Mellow authors' metrics (as mellow bench --scorer).")] = ReportScorer.mmau,
    title: Annotated[Optional[str], typer.Option("--title", help="The page's title [default: from what it shows].")] = None,
    quiet: QuietOpt = False,
    debug: DebugOpt = False,
) -> None:
    """Make a self-contained HTML page of a run's rows or of benchmark predictions.

    Rows get the picture of each recording's audio with every window's answer on its timeline (a
    table of recordings when there are several); predictions get the accuracy per task,
    difficulty and sub-category as bars, each file a model, and every item's outputs.

    \b
    Examples:
      mellow report night.jsonl -o night.html
      mellow report part1.jsonl part2.jsonl part3.jsonl -o field.html
      mellow report mmau-v0-choices.json mmau-v0_s-choices.json -o models.html
    """
    from mellow_cli.cli import render
    from mellow_cli.io import outputs

    setup(quiet, False, None)
    if output is not None:
        for path in files:
            if os.path.exists(output) and os.path.exists(path) and os.path.samefile(output, path):
                raise UsageError(f"{output}: is one of the files read; write the page to another file")
    kinds = {path: _read(path) for path in files}
    if len({kind for kind, _ in kinds.values()}) > 1:
        raise UsageError("give either result rows or benchmark predictions files, not both")
    kind = next(iter(kinds.values()))[0]
    if kind == "rows" and not any(rows for _, rows in kinds.values()):
        raise UsageError(f"{files[0]}: holds no rows" if len(files) == 1 else "none of the files holds rows")
    if kind == "predictions":
        from mellow_cli.bench import charts

        page = charts.page(files, scorer.value, title)
    else:
        page = _rows_page([row for _, rows in kinds.values() for row in rows], files, output, title)
    opened = outputs.open_rows(output, "html", (), overwrite=overwrite)
    try:
        opened.stream.write(page)
        opened.stream.flush()
    finally:
        opened.close()
    if output is not None:
        render.info(f"wrote {output}")


def _read(path: str) -> tuple[str, list[dict]]:
    """("rows" or "predictions", the records of `path`)."""
    from mellow_cli.bench import charts, predictions
    from mellow_cli.io import readback

    fmt = ROW_FORMATS.get(os.path.splitext(path)[1].lower())
    if fmt is not None:
        records = readback.read_rows(path, fmt)
    elif (one := readback.read_one_input(path)) is not None:  # -f json of one recording or pair
        records = one
    else:
        records, _ = predictions.read(path)  # a list written one item a line: -f json rows, or predictions
        if charts.is_predictions(records):
            return "predictions", records
        records = [readback.check_row(r, f"{path}: item [{i}]") for i, r in enumerate(records)]
    if not records and fmt is None:
        raise UsageError(f"{path}: holds no rows")
    return "rows", records  # a rows file may be empty (a shard that got none): the others draw


def _rows_page(rows: list[dict], files: list[str], output: Optional[str], title: Optional[str]) -> str:
    """The page of `rows`. A run's paths are relative to the folder it ran in: a recording not
    found from here is looked for beside the rows file that names it."""
    from mellow_cli.cli import render
    from mellow_cli.io.html import rows_page

    located = {}
    folders = [os.path.dirname(os.path.abspath(path)) for path in files]
    for audio in {r["audio"] for r in rows} | {r.get("audio2") for r in rows if r.get("audio2")}:
        if not os.path.isabs(audio) and not os.path.exists(audio):
            beside = [os.path.join(folder, audio) for folder in folders if os.path.exists(os.path.join(folder, audio))]
            if beside:
                located[audio] = beside[0]
    with render.status("drawing the recordings"):
        return rows_page(rows, folder=os.path.dirname(output or ""), title=title, located=located)
