"""Benchmarks behind `mellow bench`: one module per benchmark (speed.py: how fast a model runs
on this machine).

Multiple-choice benchmarks are one small module each, a reader: mmau.py (the official MMAU JSON),
qa.py (any JSON lines of audio / question / choices / answer). Such a module has `NAME`,
`read(path, audio_root) -> list[items.Item]`, `key(record)`, `GROUPS` (keys that get an accuracy
table), `SCORE_REQUIRED` (keys scoring needs) and `SCORERS` (what `--scorer` offers). Everything
else is shared: items.py (the item, the prompt and the option texts), runner.py (shard, limit,
resume, the prediction loop), predictions.py (the official predictions file, written item by
item), scoring.py (the official matcher and the accuracy tables), mellow.py (the Mellow authors'
prompt and scorers) and report.py (the table's cells).
"""
