"""The CLI shell: help, version, exit codes, one-line errors, and a fast start."""

from __future__ import annotations

import subprocess
import sys

import pytest
from typer.testing import CliRunner

from mellow_cli import __version__
from mellow_cli.cli import app

runner = CliRunner()
HEAVY = ("torch", "transformers", "numpy", "soundfile", "soxr", "rich")


def run(*args: str, stdin: bytes | None = None) -> subprocess.CompletedProcess:
    """The real entry point in a fresh interpreter: exit codes and stdout/stderr as a shell sees them."""
    return subprocess.run([sys.executable, "-m", "mellow_cli", *args], input=stdin, capture_output=True)


@pytest.mark.parametrize("command", [["ask"], ["compare"], ["caption"], ["train"], ["bench", "mmau"], ["bench", "speed"]])
def test_every_command_has_help_with_an_example(command):
    result = runner.invoke(app, [*command, "--help"])
    assert result.exit_code == 0, result.output
    assert "Example" in result.output
    assert f"mellow {' '.join(command)}" in result.output


def test_version():
    out = run("--version")
    assert out.returncode == 0
    assert out.stdout.decode().startswith(f"mellow {__version__} (Python ")


def test_help_imports_nothing_heavy():
    code = "import sys; sys.argv=['mellow','--help']\nfrom mellow_cli.cli import main\ntry: main()\nexcept SystemExit: pass"
    out = subprocess.run([sys.executable, "-X", "importtime", "-c", code], capture_output=True, text=True)
    imported = {line.split("|")[-1].strip().split(".")[0] for line in out.stderr.splitlines() if "|" in line}
    assert "typer" in imported  # the measurement itself works
    assert not imported & set(HEAVY), f"--help imported {sorted(imported & set(HEAVY))}"
    assert "Commands" in out.stdout


def test_usage_error_is_one_line_exit_2():
    out = run("ask", "--no-such-flag", "a.wav", "q")
    assert out.returncode == 2
    lines = out.stderr.decode().splitlines()
    assert len(lines) == 1 and lines[0].startswith("mellow: error: ")
    assert "--no-such-flag" in lines[0]
    assert out.stdout == b""


def test_ask_needs_audio_and_question():
    out = run("ask", "only-a-question")
    assert out.returncode == 2
    assert out.stderr.decode().startswith("mellow: error: ask takes AUDIO [AUDIO2] QUESTION")


@pytest.mark.parametrize("choices", ["dog", "dog||cat", ""])
def test_bad_choices_are_usage_errors(choices, tmp_path):
    out = run("ask", str(tmp_path / "x.wav"), "q", "--choices", choices)
    assert out.returncode == 2
    assert "--choices" in out.stderr.decode()


def test_missing_audio_is_one_line_error_naming_the_file(tmp_path):
    missing = tmp_path / "no such dir" / "köln café.wav"
    out = run("ask", str(missing), "what is this?")
    assert out.returncode == 1
    err = out.stderr.decode()
    assert err.count("\n") == 1, err
    assert err.startswith(f"mellow: error: {missing}: ")
    assert "Traceback" not in err
    assert out.stdout == b""


def test_non_audio_file_is_one_line_error(tmp_path):
    text = tmp_path / "notes.txt"
    text.write_text("not audio at all\n" * 20)
    out = run("compare", str(text), str(text))
    assert out.returncode == 1
    err = out.stderr.decode()
    assert err.count("\n") == 1 and err.startswith(f"mellow: error: {text}: "), err


def test_empty_stdin_is_an_error_naming_stdin():
    out = run("ask", "-", "what is this?", stdin=b"")
    assert out.returncode == 1
    err = out.stderr.decode()
    assert err.count("\n") == 1 and "stdin" in err, err


def test_unexpected_errors_have_no_traceback_unless_debug(monkeypatch):
    from mellow_cli.cli import answer, main

    def boom(*a, **k):
        raise ZeroDivisionError("kaboom")

    monkeypatch.setattr(answer, "_run", boom)
    with pytest.raises(SystemExit) as exit_info:
        main(["ask", "a.wav", "q"])
    assert exit_info.value.code == 1
    with pytest.raises(ZeroDivisionError):
        main(["ask", "a.wav", "q", "--debug"])


def test_unexpected_error_message_is_one_line(monkeypatch, capsys):
    from mellow_cli.cli import answer, main

    monkeypatch.setattr(answer, "_run", lambda *a, **k: 1 / 0)
    with pytest.raises(SystemExit):
        main(["ask", "a.wav", "q"])
    err = capsys.readouterr().err
    assert err.count("\n") == 1
    assert "ZeroDivisionError" in err and "--debug" in err


@pytest.mark.parametrize(
    "env, styled",
    [({"FORCE_COLOR": "1"}, True), ({"FORCE_COLOR": "1", "NO_COLOR": "1"}, False), ({}, False)],
    ids=["forced-terminal", "no-color", "not-a-terminal"],
)
def test_logs_are_plain_text_with_no_color_or_without_a_terminal(env, styled):
    import os

    clean = {k: v for k, v in os.environ.items() if k not in ("FORCE_COLOR", "NO_COLOR", "TTY_COMPATIBLE")}
    out = subprocess.run([sys.executable, "-c", "from mellow_cli.cli import render; render.info('loading model v0')"],
                         capture_output=True, text=True, env={**clean, **env})
    assert "loading model v0" in out.stderr
    assert ("\x1b[" in out.stderr) is styled


def test_a_clip_paired_with_itself_is_decoded_once():
    from mellow_cli.io.jobs import Job
    from mellow_cli.io.spans import clip_reader

    calls = []

    def read(p, **kw):
        calls.append(p)
        return f"clip:{p}"

    assert clip_reader(read)(Job("a.wav", "a.wav", "q")) == ("clip:a.wav", None)  # None: the model reuses clip 1
    assert calls == ["a.wav"]
    assert clip_reader(read)(Job("a.wav", "b.wav", "q")) == ("clip:a.wav", "clip:b.wav")
