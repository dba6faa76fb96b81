"""What the tests of `mellow serve` share: the tiny model with lively weights, two clips, the app
under uvicorn on a free loopback port (in a thread), the real command in a subprocess, and small
HTTP helpers (http.client and raw sockets, so every byte sent is the test's)."""

from __future__ import annotations

import base64
import contextlib
import http.client
import json
import os
import re
import socket
import subprocess
import sys
import threading
import time

import pytest
from conftest import write_tone

from mellow_cli.serve.app import build_app
from mellow_cli.serve.limits import ServeSettings
from mellow_cli.serve.http import bind, make_server

QUESTION = "what do you hear?"
DEADLINE = 60  # seconds any single wait in these tests may take


@pytest.fixture(scope="module")
def model_dir(tiny_model_dir, tmp_path_factory):
    """The tiny model with its language model's weights drawn larger (as in test_generate.py):
    the default draw answers "!" to everything, which would make every comparison below pass."""
    import shutil

    import torch
    from safetensors.torch import load_file, save_file

    out = tmp_path_factory.mktemp("lively_tiny")
    for f in tiny_model_dir.iterdir():
        shutil.copyfile(f, out / f.name)
    state = load_file(str(tiny_model_dir / "model.safetensors"))
    g = torch.Generator().manual_seed(0)
    for name, p in state.items():
        if name.startswith("caption_decoder.lm.") and p.ndim == 2:
            std = 1.0 if "embed" in name else 0.2
            state[name] = torch.randn(p.shape, generator=g) * std
    save_file(state, str(out / "model.safetensors"))
    return out


@pytest.fixture(scope="module")
def model(model_dir):
    from mellow_cli.api import load_model

    return load_model(str(model_dir), device="cpu", dtype="float32", progress=False)


@pytest.fixture(scope="module")
def clips(tmp_path_factory):
    d = tmp_path_factory.mktemp("serve_clips")
    return write_tone(d / "low.wav", 220), write_tone(d / "high.flac", 880)


@contextlib.contextmanager
def serving(model, settings=ServeSettings(), on_batch=None):
    """The app under uvicorn in a thread on a free 127.0.0.1 port: (its URL, the uvicorn server);
    stopped on the way out."""
    server = make_server(build_app(model, settings, on_batch))
    sock = bind("127.0.0.1", 0)
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + DEADLINE
    while not server.started:
        assert thread.is_alive() and time.monotonic() < deadline, "the server did not start"
        time.sleep(0.02)
    try:
        yield f"http://127.0.0.1:{sock.getsockname()[1]}", server
    finally:
        server.should_exit = True
        thread.join(DEADLINE)
        sock.close()
        assert not thread.is_alive(), "the server did not stop"


@contextlib.contextmanager
def running(model, settings=ServeSettings(), on_batch=None):
    """`serving`, for tests that need the URL only."""
    with serving(model, settings, on_batch) as (url, _):
        yield url


def b64(path) -> str:
    return base64.b64encode(path.read_bytes()).decode()


def audio_part(path) -> dict:
    return {"type": "input_audio", "input_audio": {"data": b64(path), "format": path.suffix[1:]}}


def chat_body(*paths, question=QUESTION, **extra) -> dict:
    content = [audio_part(p) for p in paths] + [{"type": "text", "text": question}]
    return {"model": "mellow", "messages": [{"role": "user", "content": content}], **extra}


def request(url: str, method: str, path: str, body=None, headers=None) -> http.client.HTTPResponse:
    host, port = url.removeprefix("http://").split(":")
    conn = http.client.HTTPConnection(host, int(port), timeout=DEADLINE)
    data = body if isinstance(body, (bytes, type(None))) else json.dumps(body).encode()
    conn.request(method, path, body=data, headers={"Content-Type": "application/json", **(headers or {})})
    return conn.getresponse()


def post(url: str, body, headers=None) -> tuple[int, dict]:
    r = request(url, "POST", "/v1/chat/completions", body, headers)
    return r.status, json.loads(r.read())


def events(response) -> list[str]:
    """The `data:` payloads of a server-sent event stream, in order."""
    text = response.read().decode()
    lines = [line for line in text.split("\n") if line]
    assert all(line.startswith("data: ") for line in lines), text
    return [line[len("data: "):] for line in lines]


def mellow_ask(*args: str) -> str:
    """`mellow ask ARGS` through the CLI's entry point, in this process: its stdout."""
    import io

    from mellow_cli.cli import main

    out = io.StringIO()
    with contextlib.redirect_stdout(out), pytest.raises(SystemExit) as e:
        main(["ask", *args, "-q"])
    assert e.value.code == 0
    return out.getvalue().removesuffix("\n")


def openai_client(url: str, key: str = "unused"):
    from openai import OpenAI

    return OpenAI(base_url=f"{url}/v1", api_key=key, max_retries=0, timeout=DEADLINE)


def port(url: str) -> int:
    return int(url.rsplit(":", 1)[1])


def raw_request(body: bytes, headers: bytes = b"") -> bytes:
    """A POST to /v1/chat/completions exactly as these bytes, on a socket of its own."""
    return (b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n" + headers
            + b"Content-Length: %d\r\n\r\n" % len(body) + body)


def json_reply(raw: bytes) -> tuple[int, dict]:
    """A raw HTTP response's status and JSON body (the response must be JSON)."""
    head, _, body = raw.partition(b"\r\n\r\n")
    assert b"content-type: application/json" in head.lower(), raw[:300]
    return int(head.split(b" ", 2)[1]), json.loads(body)


def read_all(sock: socket.socket) -> bytes:
    """Everything the server sends until it closes the connection."""
    data = b""
    while chunk := sock.recv(65536):
        data += chunk
    return data


def still_serving(url: str, model, clip) -> None:
    """/health is ok and a normal request gets `mellow ask`'s answer."""
    from mellow_cli.runtime.options import DecodingOptions

    r = request(url, "GET", "/health")
    assert r.status == 200 and json.loads(r.read())["status"] == "ok"
    status, answer = post(url, chat_body(clip, max_tokens=3))
    assert status == 200, answer
    assert answer["choices"][0]["message"]["content"] == model.ask(str(clip), QUESTION, options=DecodingOptions(max_tokens=3))


@contextlib.contextmanager
def serve_command(model_dir, *args: str):
    """`mellow serve` as a subprocess on a free port: (its URL, the process), once /health answers."""
    server = subprocess.Popen(
        [sys.executable, "-m", "mellow_cli", "serve", "--model", str(model_dir), "--port", "0",
         "--dtype", "float32", *args], stderr=subprocess.PIPE, text=True, env={**os.environ, "NO_COLOR": "1"})
    try:
        lines = []
        for line in server.stderr:
            lines.append(line)
            found = re.search(r"at (http://[^/\s]+)/v1", line)
            if found or len(lines) > 20:
                break
        assert found, "".join(lines)
        server.said = lines  # what it said before serving
        url = found.group(1)
        yield healthy(url, server), server
    finally:
        stop(server)


def healthy(url: str, server: subprocess.Popen) -> str:
    """`url` once the server's /health answers (an assertion if it dies or never does)."""
    deadline = time.monotonic() + DEADLINE
    while True:
        try:
            if request(url, "GET", "/health").status == 200:
                return url
        except OSError:
            assert server.poll() is None and time.monotonic() < deadline, "the server never answered"
            time.sleep(0.1)


def stop(server: subprocess.Popen) -> None:
    if server.poll() is None:
        server.kill()
        server.wait(DEADLINE)
    server.stderr.close()
