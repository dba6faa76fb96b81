"""`mellow serve` with the tiny model: the openai client and raw HTTP against a server on a free
loopback port (started in a thread for each test, and once as the real command), answers equal to
`mellow ask`'s, batching, OpenAI-style errors, and shutdown. test_serve_limits.py holds what a
hostile or careless client may try."""

from __future__ import annotations

import base64
import json
import signal
import threading
import time

import pytest

pytest.register_assert_rewrite("serving")  # before its import: its checks report as a test's do
pytest_plugins = ["serving"]  # its fixtures: model_dir, model, clips

from conftest import write_tone  # noqa: E402
from serving import (  # noqa: E402
    DEADLINE, QUESTION, chat_body, events, mellow_ask, openai_client, post, request, running, serve_command,
)

from mellow_cli.runtime.options import DecodingOptions  # noqa: E402
from mellow_cli.serve.limits import ServeSettings  # noqa: E402


# --- answers --------------------------------------------------------------------------------------


def test_openai_client_answers_one_and_two_clips_as_mellow_ask(model, clips, model_dir):
    low, high = clips
    with running(model) as url:
        client = openai_client(url)
        for paths in ((low,), (low, high)):
            messages = chat_body(*paths)["messages"]
            whole = client.chat.completions.create(model="mellow", messages=messages, max_tokens=12)
            pieces = client.chat.completions.create(model="mellow", messages=messages, max_tokens=12, stream=True)
            streamed = "".join(c.choices[0].delta.content or "" for c in pieces if c.choices)
            expected = mellow_ask(*map(str, paths), QUESTION, "--model", str(model_dir), "--dtype",
                                  "float32", "--max-tokens", "12")
            assert whole.choices[0].message.content == expected == streamed
            assert whole.choices[0].finish_reason in ("stop", "length")
            assert whole.usage.prompt_tokens == model.cfg.prefix_len
            assert whole.usage.total_tokens == whole.usage.prompt_tokens + whole.usage.completion_tokens
            assert 1 <= whole.usage.completion_tokens <= 12


def test_seeded_sampling_equals_mellow_ask_sample(model, clips, model_dir):
    low, high = clips
    with running(model) as url:
        answer = openai_client(url).chat.completions.create(
            model="mellow", messages=chat_body(low, high)["messages"], max_tokens=16, temperature=0.9,
            top_p=0.95, seed=7).choices[0].message.content
    expected = mellow_ask(str(low), str(high), QUESTION, "--model", str(model_dir), "--dtype", "float32",
                          "--max-tokens", "16", "--sample", "--temperature", "0.9", "--top-p", "0.95", "--seed", "7")
    greedy = model.ask(str(low), QUESTION, audio2=str(high), options=DecodingOptions(max_tokens=16))
    assert answer == expected != greedy  # the sampler ran, with the seed `mellow ask` used


def test_stream_is_server_sent_events_ending_in_done(model, clips):
    with running(model) as url:
        r = request(url, "POST", "/v1/chat/completions",
                    chat_body(clips[0], max_tokens=9, stream=True, stream_options={"include_usage": True}))
        assert r.status == 200 and r.getheader("content-type").startswith("text/event-stream")
        data = events(r)
        _, whole = post(url, chat_body(clips[0], max_tokens=9))
    assert data[-1] == "[DONE]"
    chunks = [json.loads(d) for d in data[:-1]]
    assert all(c["object"] == "chat.completion.chunk" and c["id"] == chunks[0]["id"] for c in chunks)
    assert chunks[0]["choices"][0]["delta"]["role"] == "assistant"
    text = "".join(c["choices"][0]["delta"].get("content", "") for c in chunks if c["choices"])
    assert text == whole["choices"][0]["message"]["content"]
    assert [c["choices"][0]["finish_reason"] for c in chunks if c["choices"]][-1] == whole["choices"][0]["finish_reason"]
    assert chunks[-1]["choices"] == [] and chunks[-1]["usage"] == whole["usage"]


def test_choices_by_likelihood_return_probabilities(model, clips):
    options = ["a dog barking", "rain", "a tone"]
    with running(model) as url:
        status, body = post(url, chat_body(clips[0], mellow={"choices": options}))
        r = request(url, "POST", "/v1/chat/completions", chat_body(clips[0], mellow={"choices": options}, stream=True))
        streamed = [json.loads(d) for d in events(r)[:-1]]
        client = openai_client(url).chat.completions.create(
            model="mellow", messages=chat_body(clips[0])["messages"], extra_body={"mellow": {"choices": options}})
    expected = model.choose(str(clips[0]), QUESTION, options)
    assert status == 200
    assert body["choices"][0]["message"]["content"] == expected.choice
    scored = body["mellow"]["choices"]
    assert [s["choice"] for s in scored] == options
    assert [s["probability"] for s in scored] == [round(p, 6) for p in expected.probabilities]
    assert abs(sum(s["probability"] for s in scored) - 1) < 1e-4
    assert "".join(c["choices"][0]["delta"].get("content", "") for c in streamed) == expected.choice
    assert any(c.get("mellow", {}).get("choices") == scored for c in streamed)
    assert client.choices[0].message.content == expected.choice and client.model_extra["mellow"]["choices"] == scored


def test_models_and_health_name_the_model_without_its_path(model, model_dir):
    """/health needs no key: it names the model as it was called, never where its files are."""
    with running(model) as url:
        listed = openai_client(url).models.list()
        r = request(url, "GET", "/health")
        raw = r.read().decode()
        missing = request(url, "GET", "/v1/nothing")
    assert r.status == 200 and json.loads(raw) == {"status": "ok", "model": model_dir.name}
    assert [m.id for m in listed.data] == [model_dir.name]
    assert str(model_dir.parent) not in raw and "/" not in json.loads(raw)["model"]
    assert missing.status == 404 and "error" in json.loads(missing.read())


# --- batching -------------------------------------------------------------------------------------


def test_waiting_requests_form_one_batch_with_each_rows_own_options(model, clips):
    """Requests queued before the worker runs are answered as one batch, greedy, sampled and
    multiple-choice rows together, each exactly as it would be alone."""
    from mellow_cli.serve.worker import Batcher, Finished, Pending

    low, high = (model.read_clip(str(p)) for p in clips)
    sampled = DecodingOptions(max_tokens=10, sample=True, temperature=0.8, seed=3)
    rows = [(low, None, "q one", DecodingOptions(max_tokens=10), None),
            (high, low, "q two, longer than the first", DecodingOptions(max_tokens=4), None),
            (low, high, "q three", sampled, None),
            (high, None, "which?", DecodingOptions(), ("rain", "a tone"))]
    got = [[] for _ in rows]
    sizes = []
    batcher = Batcher(model, max_batch=8, on_batch=sizes.append)
    for out, (a, b, q, opts, choices) in zip(got, rows):
        batcher.submit(Pending(a, b, q, opts, emit=out.append, choices=choices))
    batcher.start()
    batcher.stop(DEADLINE)
    assert sizes == [4]
    assert all(isinstance(out[-1], Finished) for out in got)
    for out, (a, b, q, opts, choices) in zip(got[:3], rows[:3]):
        assert "".join(e for e in out if isinstance(e, str)) == model.ask(a, q, audio2=b, options=opts)
    assert got[1][-1].reason == "length" and got[1][-1].completion_tokens == 4
    assert got[3][0].probabilities == model.choose(high, "which?", ["rain", "a tone"]).probabilities


def test_a_batch_takes_choices_up_to_its_cap_of_tokens_and_leaves_the_rest_for_the_next(model, clips):
    from mellow_cli.serve.worker import Batcher, Finished, Pending

    low = model.read_clip(str(clips[0]))
    sizes, got = [], [[] for _ in range(4)]
    batcher = Batcher(model, max_batch=8, on_batch=sizes.append, max_choice_tokens=10)
    for out, tokens in zip(got, (6, 6, 3, 0)):  # as many tokens as the server counted for each
        batcher.submit(Pending(low, None, "which?", DecodingOptions(max_tokens=2), emit=out.append,
                               choices=("rain", "a tone") if tokens else None, choice_tokens=tokens))
    batcher.start()
    batcher.stop(DEADLINE)
    assert sizes == [1, 3]  # 6 + 6 is past 10: the second opens the next batch, with the rest
    assert all(isinstance(out[-1], Finished) for out in got)


def test_concurrent_requests_share_a_batch(model, clips):
    sizes, busy = [], threading.Event()

    def on_batch(n):
        sizes.append(n)
        busy.set()

    low, high = clips
    with running(model, on_batch=on_batch) as url:
        first = threading.Thread(target=post, args=(url, chat_body(low, question="a long one", max_tokens=1500)))
        first.start()
        assert busy.wait(DEADLINE)  # the worker is busy with the first: the next four wait together
        bodies = [chat_body(low, high, question=f"question {i}", max_tokens=6) for i in range(4)]
        results = [None] * 4

        def send(i):
            results[i] = post(url, bodies[i])

        threads = [threading.Thread(target=send, args=(i,)) for i in range(4)]
        for t in threads:
            t.start()
        for t in threads + [first]:
            t.join(DEADLINE)
    assert sizes == [1, 4]
    for i, (status, body) in enumerate(results):
        assert status == 200
        assert body["choices"][0]["message"]["content"] == model.ask(str(low), f"question {i}", audio2=str(high),
                                                                     options=DecodingOptions(max_tokens=6))


def test_a_client_that_does_not_read_or_leaves_blocks_no_one(model, clips):
    import socket

    with running(model) as url:
        port = int(url.rsplit(":", 1)[1])
        body = json.dumps(chat_body(clips[0], max_tokens=400, stream=True)).encode()
        raw = (b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
               b"Content-Length: %d\r\n\r\n" % len(body)) + body
        idle = socket.create_connection(("127.0.0.1", port), timeout=DEADLINE)
        idle.sendall(raw)  # ... and never reads
        gone = socket.create_connection(("127.0.0.1", port), timeout=DEADLINE)
        gone.sendall(raw)
        gone.recv(10)
        gone.close()  # leaves mid-answer
        start = time.monotonic()
        status, answer = post(url, chat_body(clips[1], max_tokens=5))
        assert status == 200 and answer["choices"][0]["message"]["content"]
        assert time.monotonic() - start < DEADLINE
        idle.close()
        again = post(url, chat_body(clips[1], max_tokens=5))
        assert again[0] == 200 and again[1]["choices"] == answer["choices"]


# --- errors ---------------------------------------------------------------------------------------


def _bad_requests(clip) -> list[tuple[str, object, int]]:
    good = chat_body(clip, max_tokens=3)
    text_only = {"model": "m", "messages": [{"role": "user", "content": "what do you hear?"}]}
    three = chat_body(clip, clip, clip)
    garbage = chat_body(clip)
    garbage["messages"][0]["content"][0]["input_audio"]["data"] = base64.b64encode(b"not audio at all" * 64).decode()
    not_b64 = chat_body(clip)
    not_b64["messages"][0]["content"][0]["input_audio"]["data"] = "%%%"
    bad_format = chat_body(clip)
    bad_format["messages"][0]["content"][0]["input_audio"]["format"] = "aac"
    last_not_user = {**good, "messages": good["messages"] + [{"role": "assistant", "content": "hi"}]}
    return [
        ("not JSON", b"{nope", 400), ("JSON but not an object", b"[1, 2]", 400),
        ("no messages", {"model": "m"}, 400), ("no audio", text_only, 400), ("three clips", three, 400),
        ("undecodable audio", garbage, 400), ("not base64", not_b64, 400), ("unknown format", bad_format, 400),
        ("no question", chat_body(clip, question="  "), 400), ("last message not the user's", last_not_user, 400),
        ("max_tokens as text", {**good, "max_tokens": "ten"}, 400),
        ("max_tokens 0", {**good, "max_tokens": 0}, 422), ("max_tokens huge", {**good, "max_tokens": 10**6}, 422),
        ("temperature 3", {**good, "temperature": 3}, 422), ("top_p 1.5", {**good, "top_p": 1.5}, 422),
        ("seed -1", {**good, "seed": -1}, 422), ("n 2", {**good, "n": 2}, 422),
        ("one choice", {**good, "mellow": {"choices": ["only"]}}, 422),
        # a strict type for every field: true is not 1, and a number is not a name
        ("n true", {**good, "n": True}, 400), ("n 1.0", {**good, "n": 1.0}, 400),
        ("stream as text", {**good, "stream": "yes"}, 400), ("model as a number", {**good, "model": 5}, 400),
        ("format as a list", _with_format(good, ["wav"]), 400), ("choices of numbers", {**good, "mellow": {"choices": [1, 2]}}, 400),
        ("max_tokens true", {**good, "max_tokens": True}, 400), ("messages as an object", {**good, "messages": {}}, 400),
    ]


def _with_format(body: dict, fmt) -> dict:
    changed = json.loads(json.dumps(body))
    changed["messages"][0]["content"][0]["input_audio"]["format"] = fmt
    return changed


def test_bad_requests_get_their_status_and_the_server_keeps_serving(model, clips):
    with running(model) as url:
        for name, body, status in _bad_requests(clips[0]):
            got, reply = post(url, body)
            assert got == status, (name, reply)
            assert set(reply["error"]) >= {"message", "type", "param", "code"} and reply["error"]["message"], name
            ok, answer = post(url, chat_body(clips[0], max_tokens=3))
            assert ok == 200 and answer["choices"][0]["message"]["content"], name


def test_api_key(model, clips):
    with running(model, ServeSettings(api_key="sesame")) as url:
        assert post(url, chat_body(clips[0], max_tokens=3))[0] == 401
        assert post(url, chat_body(clips[0], max_tokens=3), {"Authorization": "Bearer wrong"})[0] == 401
        assert request(url, "GET", "/v1/models").status == 401
        assert request(url, "GET", "/health").status == 200  # for load balancers, without the key
        from openai import AuthenticationError

        with pytest.raises(AuthenticationError):
            openai_client(url, "wrong").models.list()
        answer = openai_client(url, "sesame").chat.completions.create(
            model="m", messages=chat_body(clips[0])["messages"], max_tokens=3)
        assert answer.choices[0].message.content


def test_too_much_audio_is_413(model, clips, tmp_path):
    long_clip = write_tone(tmp_path / "long.wav", seconds=3.0)
    settings = ServeSettings(max_audio_seconds=2.0)
    with running(model, settings) as url:
        status, reply = post(url, chat_body(long_clip, max_tokens=3))
        assert status == 413 and "at most 2 s" in reply["error"]["message"]
        huge = chat_body(clips[0], max_tokens=3)
        huge["messages"][0]["content"][0]["input_audio"]["data"] = "A" * (settings.max_body_bytes + 4)
        status, reply = post(url, huge)
        assert status == 413 and reply["error"]["code"] == "request_too_large"
        assert post(url, chat_body(clips[0], max_tokens=3))[0] == 200


# --- the command ----------------------------------------------------------------------------------


def test_serve_command_listens_on_loopback_and_drains_on_sigterm(model_dir, clips):
    with serve_command(model_dir) as (url, server):
        assert url.startswith("http://127.0.0.1:")
        r = request(url, "POST", "/v1/chat/completions", chat_body(clips[0], max_tokens=800, stream=True))
        assert r.status == 200
        assert r.readline().startswith(b"data: ")  # the first event: the answer is under way
        server.send_signal(signal.SIGTERM)
        data = events(r)  # ... and still ends properly
        assert data[-1] == "[DONE]" and '"finish_reason": "length"' in data[-2]
        server.wait(DEADLINE)
        assert server.returncode in (0, -signal.SIGTERM)
