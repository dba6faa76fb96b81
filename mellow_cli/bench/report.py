"""A benchmark report as table cells and lines of text (render.py draws them): the accuracy per
task, difficulty and sub-category, the overall figure, what it was measured on and which scorer
counted it (percentages with as many decimals as that scorer's script prints)."""

from __future__ import annotations

from mellow_cli.bench.scoring import Accuracy, Score

COLUMNS = ("table", "row", "accuracy %", "correct", "scored")


def _cells(table: str, row: str, acc: Accuracy) -> tuple[str, ...]:
    shown = "-" if acc.percent is None else f"{acc.percent:.{acc.decimals}f}"
    return (table, row, shown, str(acc.correct), str(acc.scored))


def rows(score: Score) -> list[tuple[str, ...]]:
    out = []
    for table, entries in score.groups.items():
        out += [_cells(table if i == 0 else "", name, acc) for i, (name, acc) in enumerate(entries)]
    out.append(_cells("overall", "", score.overall))
    return out


def title(report) -> str:
    meta = report.meta
    parts = [meta["benchmark"].upper(), f"model {meta['model'] or 'unknown'}", f"mode {meta['mode'] or 'unknown'}"]
    if meta.get("shard"):
        parts.append(f"shard {meta['shard']}")
    return " · ".join(parts) + f" · {meta['scored_with']}"


def notes(report) -> list[str]:
    """Lines under the table: the counts, what unanswered items would cost, and the fingerprint
    without which the figure cannot be compared with another."""
    s, meta = report.score, report.meta
    lines = [f"answered {s.answered}, unanswered {s.unanswered}, skipped {s.skipped} (of {s.items} items in the predictions)"]
    if s.every_item and (s.unanswered or s.skipped):
        lines.append(f"every item is in the denominator, the unanswered and skipped ones as wrong, as "
                     f"{meta['scored_with']} counts them")
    elif s.unanswered:
        strict = s.strict.percent
        lines.append(f"unanswered items are left out of the accuracy, as evaluation.py does; counted as wrong the "
                     f"overall would be {'-' if strict is None else f'{strict:.2f}'}%")
    if meta.get("data_sha256"):
        lines.append(f"data {meta['data']} sha256 {meta['data_sha256']}")
    predictions = meta["predictions"]
    lines.append(f"predictions {', '.join(predictions) if isinstance(predictions, list) else predictions}"
                 f" · {meta['wall_seconds']:.1f} s")
    return lines


def side_by_side(reports: list) -> tuple[tuple[str, ...], list[tuple[str, ...]]]:
    """Several models' reports on the same items as one table: a row per table entry, an
    accuracy column per model (each as its scorer prints it)."""
    columns = ("table", "row", *(_short(r.meta["model"]) for r in reports))
    first = rows(reports[0].score)
    others = [rows(r.score) for r in reports[1:]]
    table = []
    for i, cells in enumerate(first):
        table.append((cells[0], cells[1], cells[2], *(o[i][2] if i < len(o) else "-" for o in others)))
    return columns, table


def _short(model: str | None) -> str:
    """A model's column heading: its name, or a local checkpoint's or folder's own name."""
    import os

    if not model:
        return "unknown"
    return os.path.basename(os.path.normpath(model)) if os.path.exists(model) else model
