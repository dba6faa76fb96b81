"""Progress where no bar can be drawn (a log file, nohup, CI): plain lines with the count, the
rate and the time left, spaced so that a long run shows it is alive without flooding the log."""

from __future__ import annotations

import pytest
from conftest import write_tone
from fakes import ScriptedModel, install
from test_cli_answers import mellow

from mellow_cli.cli import render


class Clock:
    def __init__(self):
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def said(monkeypatch) -> list[str]:
    """The lines render.info is given, in order."""
    lines: list[str] = []
    monkeypatch.setattr(render, "info", lines.append)
    return lines


def test_lines_come_at_the_first_row_every_tenth_and_once_a_minute(said):
    clock = Clock()
    lines = render.ProgressLines(1000, "captioned", clock=clock)
    for _ in range(250):
        clock.now += 0.5
        lines.advance()
    assert said == ["captioned: 1 of 1000 (0%), 2.00/s, eta 0:08:20",
                    "captioned: 100 of 1000 (10%), 2.00/s, eta 0:07:30",
                    "captioned: 200 of 1000 (20%), 2.00/s, eta 0:06:40"]
    said.clear()
    clock.now += 61  # a slow row: a minute without a line gets one
    lines.advance()
    assert said == ["captioned: 251 of 1000 (25%), 1.35/s, eta 0:09:15"]


def test_an_unknown_total_gives_the_count_and_the_rate(said):
    clock = Clock()
    lines = render.ProgressLines(None, "v0: converting (MB)", clock=clock)
    clock.now += 2
    lines.advance(10)
    assert said == ["v0: converting (MB): 10, 5.00/s"]


def test_a_batch_whose_stderr_is_a_file_logs_its_progress(monkeypatch, tmp_path):
    for i in range(12):
        write_tone(tmp_path / f"clip{i:02d}.wav", 200 + 50 * i, seconds=0.5)
    install(monkeypatch, ScriptedModel(answers=[f"answer {i}" for i in range(24)]))
    out = mellow("caption", str(tmp_path), "--model", "any", "-f", "jsonl")
    assert out.returncode == 0, out.stderr
    lines = [line for line in out.stderr.splitlines() if line.startswith("captioned: ")]
    # The rows of a batch come together, seconds apart at most: the first and the last are said.
    assert [line.split(" (")[0] for line in lines] == ["captioned: 1 of 12", "captioned: 12 of 12"]
    assert all("/s, eta " in line for line in lines)
    assert mellow("caption", str(tmp_path), "--model", "any", "-f", "jsonl", "-q").stderr == ""  # -q: none


@pytest.mark.parametrize("total", [3, 10, 11])
def test_a_short_run_still_ends_on_a_line(said, total):
    lines = render.ProgressLines(total, "answered", clock=Clock())
    for _ in range(total):
        lines.advance()
    assert said[-1].startswith(f"answered: {total} of {total} (100%)")


def test_tenths_reached_in_a_burst_wait_and_one_row_says_nothing(said):
    clock = Clock()
    lines = render.ProgressLines(100, "answered", clock=clock)
    for i in range(50):
        clock.now += 0.01 if i % 25 else 20  # batches of 25 rows, 20 s each
        lines.advance()
    assert [line.split(" (")[0] for line in said] == ["answered: 1 of 100", "answered: 26 of 100"]
    said.clear()
    render.ProgressLines(1, "answered", clock=clock).advance()
    assert said == []
