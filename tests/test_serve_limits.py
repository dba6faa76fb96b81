"""What a hostile or careless client may try against `mellow serve`, each followed by a check that
/health and a normal request still get their answers: choices past their caps, text no tokenizer
takes, clips that decode to far more than they weigh, clients that hang up or trickle, bodies the
JSON parser refuses, a full or missing temporary folder, too many requests, ambiguous lengths, and
the server stopping mid-answer. The memory one request may cost is measured on the real command."""

from __future__ import annotations

import base64
import errno
import io
import json
import socket
import threading
import time

import pytest

pytest.register_assert_rewrite("serving")  # before its import: its checks report as a test's do
pytest_plugins = ["serving"]  # its fixtures: model_dir, model, clips

from serving import (  # noqa: E402
    DEADLINE, QUESTION, chat_body, events, json_reply, port, post, raw_request, read_all, request, running,
    serve_command, serving, still_serving,
)

from mellow_cli.serve.limits import ServeSettings  # noqa: E402


def audio_bytes(data: bytes, fmt: str = "flac") -> dict:
    return {"type": "input_audio", "input_audio": {"data": base64.b64encode(data).decode(), "format": fmt}}


def encoded(frames, rate: int, fmt: str = "FLAC") -> bytes:
    import soundfile as sf

    buf = io.BytesIO()
    sf.write(buf, frames, rate, format=fmt)
    return buf.getvalue()


def choices_of(sizes: list[int]) -> list[str]:
    """Distinct choices of these many tokens each, the end of text counted: two digits, then
    " rain"s (SmolLM2's tokenizer takes each digit and each " rain" as one token)."""
    return [f"{i:02d}" + " rain" * (n - 3) for i, n in enumerate(sizes)]


def scored_tokens(tokenizer, choices: list[str]) -> list[int]:
    return [len(tokenizer(c, add_special_tokens=False)["input_ids"]) + 1 for c in choices]


def tones(channels: int, rate: int, seconds: float):
    """A quiet tone in every channel (FLAC keeps it small)."""
    import numpy as np

    t = np.arange(int(rate * seconds)) / rate
    return np.stack([0.1 * np.sin(2 * np.pi * (200 + 50 * c) * t) for c in range(channels)], axis=1).astype("float32")


# --- choices: bounded cost -------------------------------------------------------------------------


def test_choices_past_their_token_caps_are_refused_and_the_largest_allowed_are_scored(model, clips):
    """Two choices of 100,000 characters took a server to 24 GB: a choice, a request's choices and
    its text are capped, each refused with its own code; the most a request may send is scored."""
    settings = ServeSettings()
    longest, total = settings.max_choice_tokens, settings.max_request_choice_tokens
    most = choices_of([longest] + [(total - longest) // 99] * 99)
    assert max(scored_tokens(model.tokenizer, most)) == longest and total - 99 < sum(scored_tokens(model.tokenizer, most)) <= total
    with running(model, settings) as url:
        cases = [
            (choices_of([longest + 1, 5]), 422, "choice_too_long"),
            (choices_of([longest] + [(total - longest) // 99 + 1] * 99), 422, "choices_too_long"),
            (["x" * 40_000, "y" * 40_000], 413, "text_too_long"),  # refused before any encoding
        ]
        for choices, status, code in cases:
            got, reply = post(url, chat_body(clips[0], mellow={"choices": choices}))
            assert (got, reply["error"]["code"]) == (status, code), reply
            still_serving(url, model, clips[0])
        got, reply = post(url, chat_body(clips[0], mellow={"choices": most}))
    assert got == 200, reply
    assert reply["choices"][0]["message"]["content"] == model.choose(str(clips[0]), QUESTION, most).choice


def test_one_request_with_the_most_choices_and_clips_allowed_stays_within_its_memory(model_dir, model, clips):
    """The real command, the resident memory it reaches answering one request at every cap at
    once: two clips that decode to nearly `max_clip_samples` each (8 channels at 96 kHz, 10 s)
    and 100 choices of `max_request_choice_tokens` in all, the longest at `max_choice_tokens`."""
    from mellow_cli.runtime.tokenizer import Tokenizer

    settings = ServeSettings()
    clip = encoded(tones(8, 96000, 10), 96000)
    longest, total = settings.max_choice_tokens, settings.max_request_choice_tokens
    choices = choices_of([longest] + [(total - longest) // 99] * 99)
    assert total - 99 < sum(scored_tokens(Tokenizer(model_dir), choices)) <= total
    content = [audio_bytes(clip), audio_bytes(clip), {"type": "text", "text": QUESTION}]
    body = {"model": "m", "messages": [{"role": "user", "content": content}], "mellow": {"choices": choices}}
    warm = {**body, "mellow": {"choices": ["a", "b"]}}
    with serve_command(model_dir) as (url, server):
        assert post(url, warm)[0] == 200  # the model's and the allocator's first-use memory
        before = _memory(server.pid)["VmRSS"]
        with open(f"/proc/{server.pid}/clear_refs", "w") as f:
            f.write("5")  # the peak (VmHWM) starts again from now
        status, reply = post(url, body)
        peak = _memory(server.pid)["VmHWM"]
        assert status == 200, reply
        assert reply["choices"][0]["message"]["content"] in choices
        still_serving(url, model, clips[0])
    grew = (peak - before) / 2**20
    print(f"one request at every cap: resident memory {before / 2**20:.0f} MB -> peak {peak / 2**20:.0f} MB "
          f"(+{grew:.0f} MB)")
    assert grew < 250


def _memory(pid: int) -> dict[str, int]:
    """VmRSS and VmHWM of a process, in bytes."""
    with open(f"/proc/{pid}/status") as f:
        return {k: int(v.split()[0]) * 1024 for k, _, v in (line.partition(":") for line in f) if k in ("VmRSS", "VmHWM")}


# --- text that cannot be encoded --------------------------------------------------------------------


def test_text_no_tokenizer_takes_fails_its_own_request_only(model, clips):
    """A lone surrogate ("\\ud800" is valid JSON, not text) in a question or a choice: 400 for that
    request, while the requests answered in the same batch get their answers."""
    sizes, busy = [], threading.Event()

    def on_batch(n):
        sizes.append(n)
        busy.set()

    bad_question = chat_body(clips[0], question="what \ud800 is it?", max_tokens=3)
    bad_choice = chat_body(clips[0], mellow={"choices": ["rain", "a tone \udc00"]})
    good = chat_body(clips[1], question="question one", max_tokens=6)
    results = {}
    with running(model, on_batch=on_batch) as url:
        long = request(url, "POST", "/v1/chat/completions", chat_body(clips[0], max_tokens=4096, stream=True))
        assert busy.wait(DEADLINE) and long.readline().startswith(b"data: ")  # the worker is busy: the rest wait
        threads = [threading.Thread(target=lambda k=k, b=b: results.__setitem__(k, post(url, b)))
                   for k, b in (("question", bad_question), ("choice", bad_choice), ("good", good))]
        for t in threads:
            t.start()
        time.sleep(0.5)
        long.close()  # ... its client leaves; the others form the next batch
        for t in threads:
            t.join(DEADLINE)
        still_serving(url, model, clips[0])
    for key in ("question", "choice"):
        status, reply = results[key]
        assert (status, reply["error"]["code"]) == (400, "invalid_text"), reply
        assert "lone surrogate" in reply["error"]["message"]
    from mellow_cli.runtime.options import DecodingOptions

    assert results["good"][0] == 200
    assert results["good"][1]["choices"][0]["message"]["content"] == model.ask(
        str(clips[1]), "question one", options=DecodingOptions(max_tokens=6))


def test_a_row_that_fails_a_batch_is_answered_alone_and_fails_alone(model, clips):
    """Past the server's checks, a failure inside a batch (here text the tokenizer refuses, sent
    to the worker directly, and clips whose scores are not finite) reaches only the row that
    caused it: the others are answered, again if need be."""
    from mellow_cli.runtime.options import DecodingOptions
    from mellow_cli.serve.worker import Batcher, Failed, Finished, Pending

    low = model.read_clip(str(clips[0]))
    broken = low.copy()
    broken[::7] = float("nan")  # scores that are not finite, in this row only
    rows = [("first", None, low), ("bad \ud800", None, low), ("third", None, low), ("which?", ("rain", "a tone"), low),
            ("bad \udc00 choice", ("rain", "x \udc00"), low), ("first", None, broken), ("which?", ("rain", "a tone"), broken)]
    got = [[] for _ in rows]
    batcher = Batcher(model)
    for out, (question, choices, clip) in zip(got, rows):  # each with its own clip, as requests have
        batcher.submit(Pending(clip.copy(), None, question, DecodingOptions(max_tokens=5), emit=out.append,
                               choices=choices))
    batcher.start()
    batcher.stop(DEADLINE)
    for i in (1, 4, 5, 6):
        assert len(got[i]) == 1 and isinstance(got[i][0], Failed), got[i]
    assert "NaN" in got[5][0].message and "NaN" in got[6][0].message
    for i in (0, 2):
        assert isinstance(got[i][-1], Finished)
        assert "".join(e for e in got[i] if isinstance(e, str)) == model.ask(low, rows[i][0], options=DecodingOptions(max_tokens=5))
    assert got[3][0].probabilities == model.choose(low, "which?", ["rain", "a tone"]).probabilities


# --- audio that decodes to far more than it weighs ---------------------------------------------------


def test_a_clip_whose_header_promises_too_many_samples_is_refused_before_decoding(model, clips, monkeypatch):
    """56 KB of FLAC declaring 8 channels at 655,350 Hz decode to 210 MB: refused from its header."""
    from mellow_cli.io import audio

    import numpy as np

    bomb = encoded(np.zeros((655350 * 2, 8), dtype="int16"), 655350)  # silence: a few kilobytes
    assert len(bomb) < 100_000
    decoded = []
    real_read = audio.sf.SoundFile.read
    monkeypatch.setattr(audio.sf.SoundFile, "read", lambda self, *a, **k: decoded.append(self.channels)
                        or real_read(self, *a, **k))
    body = {"model": "m", "messages": [{"role": "user", "content": [audio_bytes(bomb), {"type": "text", "text": "q"}]}]}
    with running(model) as url:
        status, reply = post(url, body)
        assert (status, reply["error"]["code"]) == (413, "audio_too_large"), reply
        assert "8 channels at 655350 Hz" in reply["error"]["message"]
        assert 8 not in decoded
        still_serving(url, model, clips[0])


def test_clips_decode_a_few_at_a_time(model, clips, monkeypatch):
    """Six requests of two clips each at once: at most `max_decoding` clips decode together."""
    from mellow_cli.io import audio

    lock, now, most = threading.Lock(), [0], [0]
    real_load = audio.load_clip

    def load(*args, **kwargs):
        with lock:
            now[0] += 1
            most[0] = max(most[0], now[0])
        time.sleep(0.2)  # long enough for the others to pile up, if they may
        try:
            return real_load(*args, **kwargs)
        finally:
            with lock:
                now[0] -= 1

    monkeypatch.setattr(audio, "load_clip", load)
    results = []
    with running(model, ServeSettings(max_decoding=2)) as url:
        threads = [threading.Thread(target=lambda: results.append(post(url, chat_body(*clips, max_tokens=2))))
                   for _ in range(6)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(DEADLINE)
    assert [status for status, _ in results] == [200] * 6
    assert most[0] == 2


# --- clients that leave ------------------------------------------------------------------------------


def test_a_client_that_hangs_up_before_its_whole_answer_stops_costing(model, clips, monkeypatch):
    """A non-streamed 4096-token request whose client leaves is cancelled as a stream is: the
    worker stops its decode steps, and the next request is answered at once."""
    from mellow_cli.runtime import generate

    steps = []
    real_step = generate.decode_one_token
    monkeypatch.setattr(generate, "decode_one_token", lambda *a: steps.append(1) or real_step(*a))
    with running(model) as url:
        gone = socket.create_connection(("127.0.0.1", port(url)), timeout=DEADLINE)
        gone.sendall(raw_request(json.dumps(chat_body(clips[0], question="a long one", max_tokens=4096)).encode()))
        _wait_for(lambda: len(steps) >= 10)  # the long answer is under way
        gone.close()
        still_serving(url, model, clips[1])
        taken = len(steps)
    assert taken < 200  # not thousands: its steps ended when its client left


# --- bodies the parser refuses, and failures of the machine --------------------------------------------


@pytest.mark.parametrize("make", [lambda clip: b"[" * 100_000 + b"]" * 100_000,
                                  lambda clip: _json_with(clip, "max_tokens", "7" * 5000),
                                  lambda clip: _json_with(clip, "temperature", "NaN"),
                                  lambda clip: _json_with(clip, "top_p", "Infinity")],
                         ids=["deep nesting", "a 5000-digit integer", "NaN", "Infinity"])
def test_bodies_the_json_parser_refuses_are_400_in_json(model, clips, make):
    body = make(clips[0])
    with running(model) as url:
        status, reply = post(url, body)
        assert status == 400 and reply["error"]["type"] == "invalid_request_error", reply
        still_serving(url, model, clips[0])


def _json_with(clip, key: str, literal: str) -> bytes:
    """A whole request whose `key` is `literal`, as written (no JSON encoder writes these)."""
    return json.dumps({**chat_body(clip, max_tokens=3), key: "@"}).encode().replace(b'"@"', literal.encode())


def test_an_internal_error_is_a_json_500_without_its_traceback(model, clips, monkeypatch):
    from mellow_cli.serve import app as serve

    monkeypatch.setattr(serve, "parse_chat", lambda body, max_tokens: 1 / 0)
    with running(model) as url:
        r = request(url, "POST", "/v1/chat/completions", chat_body(clips[0], max_tokens=3))
        text = r.read().decode()
        assert r.status == 500 and "Traceback" not in text and "ZeroDivision" not in text
        assert json.loads(text)["error"]["type"] == "server_error"
        monkeypatch.undo()
        still_serving(url, model, clips[0])


def test_clips_are_decoded_in_memory_and_a_full_disk_is_507(model, clips, monkeypatch, tmp_path):
    """Nothing is written to $TMPDIR (here a folder that does not exist); a disk that fills while
    answering is a JSON 507, and the next request is answered."""
    import tempfile

    from mellow_cli.io import audio

    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path / "no such folder"))
    with running(model) as url:
        still_serving(url, model, clips[0])
        real_load, calls = audio.load_clip, []

        def full(*args, **kwargs):
            calls.append(1)
            if len(calls) == 1:
                raise OSError(errno.ENOSPC, "No space left on device")
            return real_load(*args, **kwargs)

        monkeypatch.setattr(audio, "load_clip", full)
        status, reply = post(url, chat_body(clips[0], max_tokens=3))
        assert (status, reply["error"]["code"]) == (507, "disk_full"), reply
        still_serving(url, model, clips[0])


# --- too many requests, ambiguous lengths, slow and idle connections ------------------------------------


def test_a_full_queue_is_503_with_retry_after(model, clips):
    with serving(model, ServeSettings(max_queue=2)) as (url, server):
        state = server.config.app.state.mellow
        body = raw_request(json.dumps(chat_body(clips[0], max_tokens=4096, stream=True)).encode())
        held = [socket.create_connection(("127.0.0.1", port(url)), timeout=DEADLINE) for _ in range(2)]
        for sock in held:
            sock.sendall(body)  # one answered, one waiting for the worker
        _wait_for(lambda: state.in_hand == 2)
        r = request(url, "POST", "/v1/chat/completions", chat_body(clips[0], max_tokens=3))
        reply = json.loads(r.read())
        assert r.status == 503 and reply["error"]["code"] == "server_busy" and int(r.getheader("Retry-After")) > 0
        for sock in held:
            sock.close()
        _wait_for(lambda: state.in_hand == 0)  # both clients left: both count out
        still_serving(url, model, clips[0])


def _wait_for(condition) -> None:
    deadline = time.monotonic() + DEADLINE
    while not condition():
        assert time.monotonic() < deadline, "never happened"
        time.sleep(0.02)


def test_a_body_with_two_lengths_or_no_http_at_all_is_refused_in_json(model, clips):
    body = json.dumps(chat_body(clips[0], max_tokens=3)).encode()
    # A valid chunked body that also declares a Content-Length: which one a proxy in front read
    # decides where it thinks the next request starts.
    both = raw_request(b"", b"Transfer-Encoding: chunked\r\n").replace(b"Content-Length: 0", b"Content-Length: %d" % len(body))
    both += b"%x\r\n%s\r\n0\r\n\r\n" % (len(body), body)
    with running(model) as url:
        for raw, code in ((both, "ambiguous_length"), (b"NOT HTTP AT ALL\r\n\r\n", "bad_request")):
            sock = socket.create_connection(("127.0.0.1", port(url)), timeout=DEADLINE)
            sock.sendall(raw)
            status, reply = json_reply(read_all(sock))  # ... and the connection is closed
            assert (status, reply["error"]["code"]) == (400, code), reply
            still_serving(url, model, clips[0])


def test_a_client_sending_its_head_or_body_too_slowly_is_cut_off(model, clips):
    settings = ServeSettings(head_seconds=1.0, body_seconds=1.0)
    with running(model, settings) as url:
        slow_head = socket.create_connection(("127.0.0.1", port(url)), timeout=DEADLINE)
        slow_head.sendall(b"POST /v1/chat/completions HTTP/1.1\r\n")
        slow_body = socket.create_connection(("127.0.0.1", port(url)), timeout=DEADLINE)
        slow_body.sendall(raw_request(b" " * 1000)[:-990])  # the head, and 10 bytes of its body
        sent = 0
        try:
            for sent in range(40):  # a byte every 1/4 s: 10 s at most
                slow_head.sendall(b"X")
                time.sleep(0.25)
        except OSError:
            pass  # closed by the server
        head_reply = read_all(slow_head)
        assert sent < 39 and json_reply(head_reply)[1]["error"]["code"] == "timeout"
        status, reply = json_reply(read_all(slow_body))
        assert (status, reply["error"]["code"]) == (408, "timeout"), reply
        still_serving(url, model, clips[0])


def test_idle_connections_past_the_cap_are_closed_oldest_first(model, clips):
    with running(model, ServeSettings(max_idle_connections=4, head_seconds=DEADLINE)) as url:
        idle = []
        for _ in range(12):
            idle.append(socket.create_connection(("127.0.0.1", port(url)), timeout=DEADLINE))
            time.sleep(0.02)  # in order
        closed = []
        for sock in idle:
            sock.settimeout(1.0)
            try:
                closed.append(sock.recv(1) == b"")
            except socket.timeout:
                closed.append(False)
        assert closed == [True] * 8 + [False] * 4
        still_serving(url, model, clips[0])


# --- stopping ---------------------------------------------------------------------------------------


def test_a_stream_cut_by_shutdown_still_ends_with_its_last_chunk_and_done(model, clips):
    with serving(model, ServeSettings(grace_seconds=3.0)) as (url, server):
        r = request(url, "POST", "/v1/chat/completions",
                    chat_body(clips[0], max_tokens=4096, stream=True, stream_options={"include_usage": True}))
        assert r.readline().startswith(b"data: ")
        server.should_exit = True
        data = events(r)
    assert data[-1] == "[DONE]"
    last, usage = json.loads(data[-3]), json.loads(data[-2])["usage"]
    assert last["choices"][0]["finish_reason"] == "length" and 0 < usage["completion_tokens"] < 4096
