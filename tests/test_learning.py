"""The proof that `mellow train` learns: the `tiny` preset, from fresh weights, trained on this
CPU on the synthetic tasks of mellow_cli.train.tasks, answers questions about held-out clips far above
chance. It runs the commands a user would: `python -m mellow_cli.train.tasks`' generator, `mellow train`,
then `mellow ask --input` with the best checkpoint on the held-out rows.

Slow: about RUN_MINUTES on two cores. docs/training.md shows the same run's curve.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections import defaultdict
from pathlib import Path

import pytest

from mellow_cli.train import tasks

REPO = Path(__file__).resolve().parents[1]
ROWS, VAL_ROWS, SEED = 2000, 400, 0
# HTSAT stays frozen at its random (bn0- and c2l-fitted) weights, as the reference's training
# config freezes its pretrained one: the mapper and the language model learn to read a fixed
# feature map. Steps are 1.7x cheaper, and the held-out accuracy leaves chance within ~300 steps;
# training HTSAT too, runs of the same length stayed on the answer prior for 400-700 steps.
TRAIN_ARGS = ("--init", "tiny", "--freeze", "encoder", "--lr", "3e-3", "--batch-size", "16",
              "--warmup-steps", "30", "--max-steps", "800", "--eval-every", "100", "--save-every", "100",
              "--workers", "1", "--seed", str(SEED))
RUN_MINUTES = 15


def mellow(*args: str, cwd: Path | None = None, timeout: float) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    done = subprocess.run([sys.executable, "-m", "mellow_cli", *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=timeout)
    assert done.returncode == 0, done.stderr[-3000:]
    return done


def accuracy_by_task(answers: list[dict], truth: dict[str, dict]) -> dict[str, float]:
    right: dict[str, list[bool]] = defaultdict(list)
    for row in answers:
        expected = truth[row["id"]]
        # The input's own answer stays under its name; the model's pick is the prediction.
        assert row["error"] is None and row["answer"] == expected["answer"], row
        assert row["prediction"] in expected["choices"], row
        right[expected["task"]].append(row["prediction"] == expected["answer"])
        right["all"].append(row["prediction"] == expected["answer"])
    return {task: sum(r) / len(r) for task, r in right.items()}


@pytest.mark.slow
def test_tiny_learns_the_synthetic_tasks(tmp_path, smollm2_dir):
    data = tmp_path / "tasks"
    train_path, val_path = tasks.make_tasks(data, rows=ROWS, seed=SEED, val_rows=VAL_ROWS)
    val_rows = [json.loads(line) for line in val_path.read_text().splitlines()]
    run = tmp_path / "run"
    mellow("train", str(train_path), "--val", str(val_path), "--tokenizer", str(smollm2_dir), "-o", str(run),
           "-q", *TRAIN_ARGS, timeout=3 * RUN_MINUTES * 60)

    best = run / "checkpoints" / "best"
    truth = {r["id"]: r for r in val_rows}

    def answer(*dtype: str) -> list[dict]:
        answered = mellow("ask", "--input", "val.jsonl", "--model", str(best), "--format", "jsonl", "-q", *dtype,
                          cwd=data, timeout=600)
        answers = [json.loads(line) for line in answered.stdout.splitlines()]
        assert len(answers) == VAL_ROWS
        return answers

    exact = answer("--dtype", "float32")
    accuracy = accuracy_by_task(exact, truth)
    chance = {task: tasks.chance_accuracy([r for r in val_rows if task in ("all", r["task"])])
              for task in accuracy}
    print("\n".join(f"{task:>7}: held-out accuracy {accuracy[task]:.3f}, chance {chance[task]:.3f}"
                    for task in sorted(accuracy)))

    # `mellow ask --dtype float32` scores the choices in the arithmetic the training loop's
    # validation uses: the same figure
    trainer = json.loads((best / "trainer.json").read_text())
    assert trainer["metrics"]["val_accuracy"] == pytest.approx(accuracy["all"], abs=0.006)
    # Counting beeps needs the clip itself: every count is equally likely, so the best answer
    # without listening scores 0.25. 0.6 over 100 held-out rows is 8 standard deviations above it.
    assert accuracy["beeps"] >= 0.6, accuracy
    # Overall above chance (0.4375; 0.5 is 2.5 standard deviations over 400 rows). The two-clip
    # tasks stay at chance this early: docs/training.md, "Proof that it learns".
    assert accuracy["all"] >= 0.5, accuracy

    # The default precision (whatever `--dtype auto` picks on this CPU) parts from float32 only at
    # near ties: the same pick on nearly every row, and the same held-out accuracy within a few rows.
    default = answer()
    picked = {row["id"]: row["prediction"] for row in exact}
    same = sum(row["prediction"] == picked[row["id"]] for row in default) / VAL_ROWS
    print(f"default dtype picks as float32 does on {same:.3f} of the rows")
    assert same >= 0.95
    assert accuracy_by_task(default, truth)["all"] == pytest.approx(accuracy["all"], abs=0.02)
