"""`POST /ask`, the form upload for shell users (`curl -F file=@x.wav -F question=...`): the same
answers as `mellow ask`, and every limit of the JSON endpoint kept for it (the key, a clip's header
read before its samples, the text cap, the body's size), its refusals in the same JSON shape."""

from __future__ import annotations

import json
import shutil
import subprocess
import uuid

import pytest

pytest.register_assert_rewrite("serving")  # before its import: its checks report as a test's do
pytest_plugins = ["serving"]  # its fixtures: model_dir, model, clips

from conftest import write_tone  # noqa: E402
from serving import DEADLINE, QUESTION, port, request, running, still_serving  # noqa: E402

from mellow_cli.runtime.options import DecodingOptions  # noqa: E402
from mellow_cli.serve.limits import ServeSettings  # noqa: E402


def form(*fields: tuple) -> tuple[bytes, str]:
    """A multipart/form-data body of (name, text) and (name, filename, bytes) fields, and its
    Content-Type, as curl -F writes them."""
    boundary = uuid.uuid4().hex
    parts = []
    for field in fields:
        if len(field) == 3:
            name, filename, data = field
            head = f'Content-Disposition: form-data; name="{name}"; filename="{filename}"\r\n' \
                   "Content-Type: application/octet-stream\r\n"
        else:
            (name, text), head = field, f'Content-Disposition: form-data; name="{field[0]}"\r\n'
            data = text.encode() if isinstance(text, str) else text
        parts.append(f"--{boundary}\r\n{head}\r\n".encode() + data + b"\r\n")
    return b"".join(parts) + f"--{boundary}--\r\n".encode(), f"multipart/form-data; boundary={boundary}"


def ask(url: str, *fields: tuple, headers: dict | None = None) -> tuple[int, dict]:
    body, kind = form(*fields)
    r = request(url, "POST", "/ask", body, {"Content-Type": kind, **(headers or {})})
    return r.status, json.loads(r.read())


def upload(path) -> tuple:
    return ("file", path.name, path.read_bytes())


def test_an_upload_is_answered_as_mellow_ask_answers(model, clips):
    low, high = clips
    with running(model) as url:
        one = ask(url, upload(low), ("question", QUESTION), ("max_tokens", "4"))
        two = ask(url, upload(low), upload(high), ("question", QUESTION), ("max_tokens", "4"))
        picked = ask(url, upload(high), ("question", QUESTION), ("choices", "car | rain|birds"))
    options = DecodingOptions(max_tokens=4)
    assert one == (200, {"model": one[1]["model"], "audio": ["low.wav"], "question": QUESTION,
                         "answer": model.ask(str(low), QUESTION, options=options),
                         "finish_reason": one[1]["finish_reason"], "usage": one[1]["usage"]})
    assert two[0] == 200 and two[1]["answer"] == model.ask(str(low), QUESTION, audio2=str(high), options=options)
    assert two[1]["audio"] == ["low.wav", "high.flac"]
    expected = model.choose(str(high), QUESTION, ["car", "rain", "birds"])
    status, answer = picked
    assert status == 200 and answer["answer"] == expected.choice and answer["choices"] == ["car", "rain", "birds"]
    assert answer["scores"] == pytest.approx(dict(zip(["car", "rain", "birds"], expected.probabilities)), abs=1e-6)


@pytest.mark.skipif(shutil.which("curl") is None, reason="needs curl")
def test_the_documented_curl_line_works(model, clips, tmp_path):
    dog = shutil.copyfile(clips[0], tmp_path / "dog.wav")
    with running(model) as url:
        done = subprocess.run(["curl", "-s", "-F", f"file=@{dog}", "-F", "question=is there a dog barking?",
                               "-F", "max_tokens=3", f"localhost:{port(url)}/ask"],
                              capture_output=True, text=True, timeout=DEADLINE)
    answer = json.loads(done.stdout)
    assert answer["answer"] == model.ask(str(dog), "is there a dog barking?", options=DecodingOptions(max_tokens=3))


def _bad_forms(clip, long_clip):
    data = clip.read_bytes()
    question = ("question", QUESTION)
    return [
        ("no file", [question], 400, None),
        ("three files", [upload(clip)] * 3 + [question], 400, None),
        ("no question", [upload(clip)], 400, None),
        ("an empty question", [upload(clip), ("question", "  ")], 400, None),
        ("the question twice", [upload(clip), question, question], 400, None),
        ("an unknown field", [upload(clip), question, ("max_token", "3")], 400, None),
        ("text as a file", [upload(clip), ("question", "q.txt", b"what?")], 400, None),
        ("a file as text", [("file", data), question], 400, None),
        ("a question not UTF-8", [upload(clip), ("question", b"\xff\xfe")], 400, "invalid_text"),
        ("max_tokens not a number", [upload(clip), question, ("max_tokens", "ten")], 400, None),
        ("max_tokens out of range", [upload(clip), question, ("max_tokens", "0")], 422, None),
        ("temperature not finite", [upload(clip), question, ("temperature", "nan")], 400, None),
        ("one choice", [upload(clip), question, ("choices", "car")], 422, None),
        ("not audio", [("file", "x.wav", b"not audio at all"), question], 400, "invalid_audio"),
        ("too long", [upload(long_clip), question], 413, "audio_too_long"),
        ("too much text", [upload(clip), ("question", "x" * 70_000)], 413, "text_too_long"),
    ]


def test_bad_uploads_get_their_status_in_json_and_the_server_keeps_serving(model, clips, tmp_path):
    long_clip = write_tone(tmp_path / "long.wav", seconds=3.0)
    with running(model, ServeSettings(max_audio_seconds=2.0)) as url:
        for name, fields, status, code in _bad_forms(clips[0], long_clip):
            got, reply = ask(url, *fields)
            assert got == status, (name, reply)
            assert set(reply["error"]) == {"message", "type", "param", "code"} and reply["error"]["message"], name
            assert code is None or reply["error"]["code"] == code, (name, reply)
        for body, kind in [(json.dumps({"question": QUESTION}).encode(), "application/json"),
                           (b"--x\r\nno end", "multipart/form-data; boundary=x"),
                           (b"nothing", "multipart/form-data; boundary=x"),
                           (b"--x\r\n\r\nno disposition\r\n--x--\r\n", "multipart/form-data; boundary=x")]:
            r = request(url, "POST", "/ask", body, {"Content-Type": kind})
            assert r.status == 400 and json.loads(r.read())["error"]["code"] == "bad_form", body
        still_serving(url, model, clips[0])


def test_an_upload_keeps_the_key_and_the_body_cap(model, clips):
    settings = ServeSettings(api_key="sesame", max_audio_seconds=1.0)
    with running(model, settings) as url:
        fields = (upload(clips[0]), ("question", QUESTION), ("max_tokens", "2"))
        assert ask(url, *fields)[0] == 401
        assert ask(url, *fields, headers={"Authorization": "Bearer sesame"})[0] == 413  # 2 s > 1 s, by its header
        huge = ("file", "huge.wav", b"\0" * (settings.max_body_bytes + 1))
        status, reply = ask(url, huge, ("question", QUESTION), headers={"Authorization": "Bearer sesame"})
        assert status == 413 and reply["error"]["code"] == "request_too_large"
