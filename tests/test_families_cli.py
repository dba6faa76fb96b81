"""The published names of every family through the commands users type, offline: each model is
placed in the cache as a download would leave it (its tiny preset's weights, written by the
cache's own writer under the published name and origin), then asked with HF_HUB_OFFLINE=1, so
nothing here can reach a network."""

from __future__ import annotations

import json

import pytest
from conftest import write_tone
from test_cli_answers import mellow

from mellow_cli.models.catalogue import resolve
from mellow_cli.models.family import family
from mellow_cli.store import cache
from mellow_cli.store.tokenizers import TOKENIZER_FILES


def place(name: str, tokenizer_dir) -> None:
    """`name` in the cache as if pulled: its family's tiny weights, under the published origin."""
    import torch

    from mellow_cli.files import cache_dir
    from mellow_cli.train.runs import model_state

    src = resolve(name)
    fam = family(src.family)
    cfg = fam.config("tiny")
    torch.manual_seed(0)
    state = model_state(fam.build(cfg))
    origin = {"repo": src.repo, "filename": src.filename, "revision": src.revision, "url": src.url,
              "commit": src.revision, "sha256": src.sha256 or "0" * 64, "size": 1}
    cache.write_folder(cache_dir() / "models" / src.key, src, state, cfg, tokenizer_dir, origin)


@pytest.fixture
def offline(monkeypatch, smollm2_dir):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert all((smollm2_dir / f).is_file() for f in TOKENIZER_FILES)
    for name in ("tinymu", "samsone-134m"):
        place(name, smollm2_dir)


@pytest.fixture
def recordings(tmp_path):
    return [write_tone(tmp_path / f"{n}.wav", freq, seconds=3) for n, freq in (("song", 330), ("a", 440), ("b", 660))]


def test_ask_tinymu_about_a_song(offline, recordings):
    out = mellow("ask", "--model", "tinymu", "-q", "--max-tokens", "5", str(recordings[0]), "what genre is this?")
    assert out.returncode == 0 and out.stdout.endswith("\n") and out.stderr == "", out.stderr


def test_tinymu_refuses_two_clips_and_compare_in_one_line(offline, recordings):
    two = mellow("ask", "--model", "tinymu", str(recordings[1]), str(recordings[2]), "which clip is louder?")
    assert two.returncode == 2 and two.stderr == "mellow: error: tinymu: TinyMU takes 1 clip a question, not more\n"
    pair = mellow("compare", "--model", "tinymu", str(recordings[1]), str(recordings[2]))
    assert pair.returncode == 2 and pair.stderr.count("\n") == 1 and "cannot compare" in pair.stderr


def test_ask_samsone_about_two_clips(offline, recordings):
    out = mellow("ask", "--model", "samsone-134m", "-q", "--max-tokens", "5", str(recordings[1]), str(recordings[2]),
                 "which clip is louder?", "-f", "json")
    assert out.returncode == 0, out.stderr
    row = json.loads(out.stdout)
    assert row["audio2"] == str(recordings[2]) and row["model"] == "samsone-134m"


def test_caption_a_folder_with_samsone_and_resume(offline, recordings, tmp_path):
    target = tmp_path / "out.jsonl"
    args = ("caption", "--model", "samsone-134m", "-q", "--max-tokens", "4", str(recordings[0].parent), "-f", "jsonl",
            "-o", str(target), "--resume")
    first = mellow(*args)
    assert first.returncode == 0, first.stderr
    rows = [json.loads(line) for line in target.read_text().splitlines()]
    assert len(rows) == 3 and {r["question"] for r in rows} == {family("samsone").caption_prompt}
    again = mellow(*args[:-1], "--resume", "-v")
    assert again.returncode == 0 and target.read_text().count("\n") == 3


def test_serve_tinymu_answers_the_openai_client(offline, recordings):
    import base64

    from serving import openai_client, serve_command

    with serve_command("tinymu") as (url, _):
        data = base64.b64encode(recordings[0].read_bytes()).decode()
        reply = openai_client(url).chat.completions.create(
            model="tinymu", max_tokens=4,
            messages=[{"role": "user", "content": [
                {"type": "input_audio", "input_audio": {"data": data, "format": "wav"}},
                {"type": "text", "text": "what genre is this?"}]}])
        assert reply.choices[0].message.content is not None and reply.model == "tinymu"
