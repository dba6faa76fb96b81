"""What a person running `mellow serve` sets and sees: the name clients are given (--alias, never a
path), one access line per request on stderr (-q silences them), a server-side cap on max_tokens,
the install line that works from a clone, and docs/serve.md's openai example run as written."""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import subprocess
import sys

import pytest

pytest.register_assert_rewrite("serving")  # before its import: its checks report as a test's do
pytest_plugins = ["serving"]  # its fixtures: model_dir, model, clips

from serving import (  # noqa: E402
    DEADLINE,
    QUESTION,
    chat_body,
    healthy,
    openai_client,
    post,
    request,
    running,
    serve_command,
    stop,
)

from mellow_cli.runtime.options import DecodingOptions  # noqa: E402
from mellow_cli.serve.limits import ServeSettings  # noqa: E402

# --- the model's name -------------------------------------------------------------------------------


def test_alias_names_the_model_everywhere_a_client_looks(model, model_dir, clips):
    with running(model, ServeSettings(alias="birds")) as url:
        health = json.loads(request(url, "GET", "/health").read())
        listed = [m.id for m in openai_client(url).models.list().data]
        status, answer = post(url, chat_body(clips[0], max_tokens=2))
        page = request(url, "GET", "/").read().decode()
    assert health["model"] == "birds" and listed == ["birds"] and status == 200 and answer["model"] == "birds"
    assert "mellow · birds" in page and str(model_dir) not in page


def test_without_alias_the_page_names_the_model_without_its_path(model, model_dir):
    """The page at / needs no key, as /health: it must not tell where the server's files are."""
    with running(model) as url:
        page = request(url, "GET", "/").read().decode()
    assert f"mellow · {model_dir.name}" in page and str(model_dir.parent) not in page


# --- max_tokens: the server's cap -------------------------------------------------------------------


def test_max_tokens_is_capped_by_the_server_and_defaults_under_the_cap(model, clips):
    with running(model, ServeSettings(max_tokens=5)) as url:
        status, unnamed = post(url, chat_body(clips[0]))
        over, refused = post(url, chat_body(clips[0], max_tokens=6))
        at, named = post(url, chat_body(clips[0], max_tokens=5))
    expected = model.ask(str(clips[0]), QUESTION, options=DecodingOptions(max_tokens=5))
    assert status == 200 and unnamed["choices"][0]["message"]["content"] == expected
    assert unnamed["usage"]["completion_tokens"] <= 5
    assert over == 422 and refused["error"]["param"] == "max_tokens" and "--max-tokens" in refused["error"]["message"]
    assert at == 200 and named["choices"][0]["message"]["content"] == expected
    with running(model) as url:  # by default: 300 when unnamed, up to 4096 when named
        status, answer = post(url, chat_body(clips[0], max_tokens=4096, temperature=0.0))
        assert status == 200 and post(url, chat_body(clips[0], max_tokens=4097))[0] == 422


# --- the command: access lines, --alias, install ------------------------------------------------------


def _stopped(server) -> list[str]:
    """The rest of the command's stderr, once SIGTERM has stopped it."""
    server.send_signal(signal.SIGTERM)
    server.wait(DEADLINE)
    return server.stderr.read().splitlines()


def test_each_request_is_one_access_line_unless_quiet(model_dir, clips):
    with serve_command(model_dir, "--alias", "birds") as (url, server):
        status, answer = post(url, chat_body(clips[0], max_tokens=3))
        assert request(url, "GET", "/nowhere").status == 404
        lines = _stopped(server)
    usage = answer["usage"]
    assert status == 200 and answer["model"] == "birds"
    chat = [line for line in lines if line.startswith("POST /v1/chat/completions ")]
    assert len(chat) == 1 and re.fullmatch(
        rf"POST /v1/chat/completions 200 \d+\.\d\ds {usage['prompt_tokens']}\+{usage['completion_tokens']} tokens",
        chat[0]), lines
    assert any(re.fullmatch(r"GET /health 200 \d+\.\d\ds", line) for line in lines), lines
    assert any(re.fullmatch(r"GET /nowhere 404 \d+\.\d\ds", line) for line in lines), lines

    with _quiet_server(model_dir) as (url, server):
        assert post(url, chat_body(clips[0], max_tokens=2))[0] == 200
        assert _stopped(server) == []


@contextlib.contextmanager
def _quiet_server(model_dir):
    """`mellow serve -q`, which says nothing, not even where it listens: on a port found free."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        free = s.getsockname()[1]
    server = subprocess.Popen(
        [sys.executable, "-m", "mellow_cli", "serve", "--model", str(model_dir), "--port", str(free),
         "--dtype", "float32", "-q"], stderr=subprocess.PIPE, text=True, env={**os.environ, "NO_COLOR": "1"})
    try:
        yield healthy(f"http://127.0.0.1:{free}", server), server
    finally:
        stop(server)


def test_serve_command_names_the_alias_and_the_model_it_stands_for(model_dir):
    with serve_command(model_dir, "--alias", "birds") as (url, server):
        said = server.said[-1]
    assert said.startswith(f"serving birds ({model_dir}) at {url}/v1"), said
    from mellow_cli.cli import main

    with pytest.raises(SystemExit) as e:
        main(["serve", "--alias", " ", "--port", "0"])
    assert e.value.code == 2


def test_serve_without_the_extra_names_an_install_line_that_works_from_a_clone(monkeypatch, capsys):
    import tomllib
    from pathlib import Path

    from mellow_cli.cli import main
    from mellow_cli.cli.serve import SERVE_REQUIREMENTS

    monkeypatch.setitem(sys.modules, "uvicorn", None)  # import uvicorn -> ImportError
    with pytest.raises(SystemExit) as e:
        main(["serve", "--port", "0"])
    err = capsys.readouterr().err
    assert e.value.code == 1 and err.count("\n") == 1
    assert 'pip install ".[serve]"' in err and "mellow-cli[serve]" not in err
    assert all(f'"{r}"' in err for r in SERVE_REQUIREMENTS)
    project = tomllib.loads((Path(__file__).parents[1] / "pyproject.toml").read_text())["project"]
    assert list(SERVE_REQUIREMENTS) == [r.split("#")[0].strip() for r in project["optional-dependencies"]["serve"]]


def test_docs_install_lines_work_from_a_clone():
    from pathlib import Path

    root = Path(__file__).parents[1]
    for doc in ("docs/serve.md", "docs/cli.md", "README.md"):
        assert "mellow-cli[serve]" not in (root / doc).read_text(), doc


# --- docs/serve.md's openai example ------------------------------------------------------------------


def test_the_openai_example_of_the_docs_runs_as_written(model, tmp_path, monkeypatch, capsys):
    """Its three answers come out on three lines (the streamed one ends with its own newline)."""
    from pathlib import Path

    from conftest import write_tone

    text = (Path(__file__).parents[1] / "docs/serve.md").read_text()
    code = re.search(r"### The openai Python client\n\n```python\n(.*?)```", text, re.S).group(1)
    for name, freq in (("a.wav", 220), ("b.wav", 440), ("rain.flac", 660), ("street.wav", 880)):
        write_tone(tmp_path / name, freq)
    monkeypatch.chdir(tmp_path)
    with running(model) as url:
        exec(compile(code.replace("http://127.0.0.1:8080/v1", f"{url}/v1"), "serve.md", "exec"), {})
    out = capsys.readouterr().out
    assert re.search(r"\n(car|rain|birds) \[\{'choice': 'car'", out), out
