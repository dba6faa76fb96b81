"""Every command held to the one exit-code table of docs/cli.md: 2 for a usage error (a wrong
command line, an output or run folder that already exists, a data file that cannot be used), 1
for a failure (an input, the model or the environment), each one line on stderr naming the
problem, never a traceback and never "unexpected"."""

from __future__ import annotations

import json
import re
from pathlib import Path
from types import SimpleNamespace

import pytest
from conftest import write_tone
from test_cli_answers import mellow

from mellow_cli.store.loading import TOKENIZER_FILES

DOCS = Path(__file__).resolve().parents[1] / "docs" / "cli.md"


@pytest.fixture(scope="module")
def f(tmp_path_factory):
    """The files the cases below name: good ones, bad ones and outputs that already exist."""
    d = tmp_path_factory.mktemp("exit_codes")
    clip = write_tone(d / "clip.wav", 440)
    (d / "empty").mkdir()
    (d / "taken.jsonl").write_text('{"mine": true}\n')
    (d / "not-json.jsonl").write_text("this is not json\n")
    (d / "pairs.csv").write_text("first,second\na.wav,b.wav\n")
    qa = d / "qa.jsonl"
    qa.write_text(json.dumps({"id": "1", "audio": str(clip), "question": "which?", "choices": ["a", "b"],
                              "answer": "a"}) + "\n")
    (d / "qa-predictions.json").write_text("[]\n")
    scored = d / "scored.json"  # one wrong prediction: accuracy 0
    scored.write_text(json.dumps([{"id": "1", "audio": str(clip), "question": "which?", "choices": ["a", "b"],
                                   "answer": "a", "model_output": "b"}]))
    run = d / "run"
    (run / "checkpoints" / "step-000001").mkdir(parents=True)
    (run / "checkpoints" / "step-000001" / "trainer.json").write_text("{}")
    tokenizer = d / "tokenizer"  # enough for the check a new run makes before reading its rows
    tokenizer.mkdir()
    for name in TOKENIZER_FILES:
        (tokenizer / name).write_text("{}")
    rows = d / "rows.jsonl"
    rows.write_text(json.dumps({"audio1": str(clip), "question": "q?", "answer": "a"}) + "\n")
    answers = d / "answers.jsonl"  # what `mellow ask -f jsonl` writes
    answers.write_text(json.dumps({"audio": str(clip), "audio2": str(clip), "question": "q?", "answer": "a",
                                   "model": "v0", "revision": None, "error": None}) + "\n")
    return SimpleNamespace(dir=d, clip=str(clip), missing=str(d / "missing.wav"), empty=str(d / "empty"),
                           taken=str(d / "taken.jsonl"), not_json=str(d / "not-json.jsonl"),
                           pairs=str(d / "pairs.csv"), qa=str(qa), predictions=str(d / "qa-predictions.json"),
                           scored=str(scored), run=str(run), rows=str(rows), tokenizer=str(tokenizer),
                           answers=str(answers))


# (command, arguments, the exit code, what the one line says)
USAGE = [
    ("ask", lambda f: ["ask", f.clip], "ask takes AUDIO [AUDIO2] QUESTION"),
    ("ask", lambda f: ["ask", f.clip, "q?", "-f", "jsonl", "-o", f.taken, "-m", "unused"], "already holds"),
    ("ask", lambda f: ["ask", "--input", f.not_json, "-m", "unused"], "line 1: not JSON"),
    ("compare", lambda f: ["compare", f.clip], "compare takes two recordings"),
    ("compare", lambda f: ["compare", "--pairs", f.pairs, "-m", "unused"], "columns audio1 and audio2"),
    ("caption", lambda f: ["caption", f.empty, "-m", "unused"], "no audio files in this folder"),
    ("caption", lambda f: ["caption", f.clip, "-f", "jsonl", "-o", f.taken, "-m", "unused"], "already holds"),
    ("caption", lambda f: ["caption", f.clip, "--window", "5", "--duration", "1"], "give one of the two"),
    ("report", lambda f: ["report", f.taken], "not a result row"),
    ("report", lambda f: ["report", f.answers, "-o", f.taken], "already holds"),
    ("train", lambda f: ["train", f.rows, "--init", "tiny", "-o", f.run], "already holds a run"),
    ("train", lambda f: ["train", f.not_json, "--init", "tiny", "--tokenizer", f.tokenizer, "-o",
                         str(Path(f.dir) / "new")], "not JSON"),
    ("train", lambda f: ["train", f.rows, "--lr", "2", "-o", str(Path(f.dir) / "new")], "--lr"),
    ("bench", lambda f: ["bench", "qa", f.not_json, "-m", "unused"], "line 1: not JSON"),
    ("bench", lambda f: ["bench", "qa", f.qa, "-o", f.predictions, "-m", "unused"], "already holds predictions"),
    ("bench", lambda f: ["bench", "mmau"], "--data FILE"),
    ("bench", lambda f: ["bench", "speed", "--tokens", "1"], "--tokens"),
    ("models", lambda f: ["models", "export", "v0", "-o", f.taken], "must be a .ckpt"),
    ("models", lambda f: ["models", "rm"], "Missing argument"),
    ("config", lambda f: ["config", "set", "colour", "blue"], "unknown setting"),
    ("env", lambda f: ["env", "--yaml"], "No such option"),
    ("serve", lambda f: ["serve", "--port", "70000"], "--port"),
]

FAILURE = [
    ("ask", lambda f: ["ask", f.missing, "q?", "-m", "unused"], "missing.wav"),
    ("compare", lambda f: ["compare", f.clip, f.missing, "-m", "unused"], "missing.wav"),
    ("caption", lambda f: ["caption", f.clip, "-m", str(Path(f.dir) / "no-model")], "no-model"),
    ("report", lambda f: ["report", f.answers, "-o", str(Path(f.dir) / "no-folder" / "page.html")],
     "cannot write the output"),
    ("train", lambda f: ["train", f.rows, "--init", "tiny", "--workers", "0", "-o", str(Path(f.dir) / "offline")],
     "--tokenizer DIR"),
    ("bench", lambda f: ["bench", "qa", "--score-only", f.scored, "--min-accuracy", "50"], "below --min-accuracy"),
    ("models", lambda f: ["models", "rm", "v0_s"], "v0_s"),
    ("serve", lambda f: ["serve", "-m", str(Path(f.dir) / "no-model")], "no-model"),
    ("config", lambda f: ["config", "get"], "not valid TOML"),
    ("env", lambda f: ["env"], "not valid TOML"),
]


def _one_line(out, code: int, says: str) -> None:
    assert out.returncode == code, (out.returncode, out.stderr)
    errors = [line for line in out.stderr.splitlines() if line.startswith("mellow: error: ")]
    assert len(errors) == 1 and says in errors[0], out.stderr
    assert "Traceback" not in out.stderr and "unexpected" not in out.stderr


@pytest.mark.parametrize("command, args, says", USAGE, ids=[f"{c}-{i}" for i, (c, _, _) in enumerate(USAGE)])
def test_usage_errors_exit_2(f, command, args, says):
    _one_line(mellow(*args(f)), 2, says)


@pytest.mark.parametrize("command, args, says", FAILURE, ids=[c for c, _, _ in FAILURE])
def test_failures_exit_1(f, monkeypatch, command, args, says):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # nothing here may reach the network
    if command in ("config", "env"):  # what fails for them is the config file
        broken = Path(f.dir) / "broken.toml"
        broken.write_text("model = [\n")
        monkeypatch.setenv("MELLOW_CONFIG", str(broken))
    _one_line(mellow(*args(f)), 1, says)


def test_every_command_is_held_to_the_table():
    """Each command of `mellow --help` has a usage error and a failure above, and docs/cli.md's
    table names the codes they exit with."""
    from mellow_cli.cli import app

    commands = {c.name or c.callback.__name__ for c in app.registered_commands} | {g.name for g in app.registered_groups}
    assert commands == {c for c, _, _ in USAGE} == {c for c, _, _ in FAILURE}
    table = DOCS.read_text().split("## Exit codes", 1)[1].split("\n## ", 1)[0]
    assert {int(code) for code in re.findall(r"^\| (\d+) \|", table, re.M)} == {0, 1, 2, 130, 141}


def test_many_bad_rows_are_the_first_few_and_a_count(capsys):
    from mellow_cli.train import data
    from mellow_cli.cli import render

    bad = [data.BadRow(f"line {i}", "empty answer") for i in range(2, 32)]  # 30 bad rows
    render.error(data.describe_bad("rows.jsonl", bad) + " (pass --skip-bad to train without them)")
    err = capsys.readouterr().err
    assert err == ("mellow: error: rows.jsonl: line 2: empty answer; rows.jsonl: line 3: empty answer; rows.jsonl: "
                   "line 4: empty answer; and 27 more (pass --skip-bad to train without them)\n")
    render.error("a.jsonl: line 1: no question\na.jsonl: line 5: no answer")
    assert capsys.readouterr().err == "mellow: error: a.jsonl: line 1: no question; a.jsonl: line 5: no answer\n"
