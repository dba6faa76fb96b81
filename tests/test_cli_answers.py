"""ask / compare / caption through the real entry point, with the tiny model from a local folder
or, where only the CLI's behaviour is checked, a model whose answers the test scripts (fakes.py):
stdout carries only answers, stderr only logs and errors, exit codes say what happened."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
from conftest import write_tone
from fakes import ScriptedModel, install

from mellow_cli.models.family import family

COMPARE_PROMPT = family("mellow").compare_prompt


def mellow(*args: str) -> subprocess.CompletedProcess:
    """`mellow ARGS` in this process (the model loads fast once torch is imported), through the
    same `main` as the console script, with what a shell would see."""
    import contextlib
    import io

    from mellow_cli.cli import main

    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            main(list(args))
            code = 0
        except SystemExit as e:
            code = e.code
    return subprocess.CompletedProcess(args, code, out.getvalue(), err.getvalue())


@pytest.fixture(scope="module")
def clips(tmp_path_factory):
    d = tmp_path_factory.mktemp("clips")
    return write_tone(d / "low tone.wav", 220), write_tone(d / "hôhe.flac", 880)


@pytest.fixture
def scripted(monkeypatch):
    """scripted(answers=[...], picks=[...]): the model every --model loads in this test."""
    return lambda **script: install(monkeypatch, ScriptedModel(**script))


def test_ask_streams_the_answer_to_stdout(scripted, clips):
    model = scripted(answers=[["a low", " hum"]])
    out = mellow("ask", str(clips[0]), "what do you hear?", "--model", "any", "--max-tokens", "5", "-q")
    assert out.returncode == 0, out.stderr
    assert out.stdout == "a low hum\n"
    assert out.stderr == ""  # -q: nothing but results
    (asked,) = model.asked
    assert asked.prompt == "what do you hear?" and asked.audio2 is None  # one clip: paired with itself
    assert [load["name"] for load in model.loaded_as] == ["any"]


def test_ask_json_is_one_parseable_object(scripted, clips):
    scripted(answers=["the second"])
    out = mellow("ask", str(clips[0]), str(clips[1]), "which is higher?", "--model", "any", "--max-tokens", "5",
                 "--format", "json")
    assert out.returncode == 0, out.stderr
    row = json.loads(out.stdout)
    assert row["audio"] == str(clips[0]) and row["audio2"] == str(clips[1])
    assert row["question"] == "which is higher?"
    assert (row["answer"], row["model"]) == ("the second", "scripted")
    assert "loading model" in out.stderr  # progress went to stderr, not into the JSON


def test_greedy_text_and_json_agree(tiny_model_dir, clips):
    args = ("ask", str(clips[0]), "q", "--model", str(tiny_model_dir), "--max-tokens", "6", "-q")
    text = mellow(*args).stdout
    as_json = json.loads(mellow(*args, "--format", "json").stdout)
    assert text == as_json["answer"] + "\n"


def test_choices_print_exactly_one_choice(scripted, clips):
    scripted(picks=["cat", "car"])
    out = mellow("ask", str(clips[0]), "what is it?", "--choices", "dog| cat |car", "--model", "any", "-q")
    assert out.returncode == 0, out.stderr
    assert out.stdout == "cat\n"
    out = mellow("ask", str(clips[0]), "what is it?", "--choices", "dog|cat|car", "--model", "any",
                 "-q", "--format", "json")
    row = json.loads(out.stdout)
    assert row["choices"] == ["dog", "cat", "car"]
    assert row["scores"] == {"dog": 0.15, "cat": 0.15, "car": 0.7}
    assert row["answer"] == "car"


def test_choices_from_the_model_are_real_probabilities(tiny_model_dir, clips):
    out = mellow("ask", str(clips[0]), "what is it?", "--choices", "dog|cat|car", "--model", str(tiny_model_dir),
                 "-q", "--format", "json")
    row = json.loads(out.stdout)
    assert abs(sum(row["scores"].values()) - 1) < 1e-4
    assert row["answer"] in {"dog", "cat", "car"}


def test_audio_from_stdin(tiny_model_dir, clips):
    data = clips[1].read_bytes()
    piped = subprocess.run([sys.executable, "-m", "mellow_cli", "ask", "-", "q", "--model", str(tiny_model_dir),
                            "--max-tokens", "5", "-q"], input=data, capture_output=True)
    direct = mellow("ask", str(clips[1]), "q", "--model", str(tiny_model_dir), "--max-tokens", "5", "-q")
    assert piped.returncode == 0, piped.stderr
    assert piped.stderr == b""
    assert piped.stdout.decode() == direct.stdout


def test_compare_uses_both_clips(scripted, clips):
    model = scripted(answers=["the second is higher"])
    out = mellow("compare", str(clips[0]), str(clips[1]), "--model", "any", "--max-tokens", "5", "-q",
                 "--format", "json")
    assert out.returncode == 0, out.stderr
    row = json.loads(out.stdout)
    assert row["question"] == COMPARE_PROMPT == "explain the difference between the two audios in detail."
    assert row["answer"] == "the second is higher"
    (asked,) = model.asked
    assert asked.prompt == COMPARE_PROMPT and asked.audio2 is not None  # the model heard the second clip


def test_caption_goes_on_past_a_bad_file_and_exits_1(scripted, clips, tmp_path):
    bad = tmp_path / "broken.wav"
    bad.write_bytes(b"RIFF....WAVEfmt nonsense")
    model = scripted(answers=["a low tone", "a high tone"])
    out = mellow("caption", str(clips[0]), str(bad), str(clips[1]), "--model", "any", "--max-tokens", "4",
                 "--format", "jsonl", "-q")
    assert out.returncode == 1
    rows = [json.loads(line) for line in out.stdout.splitlines()]
    assert [r["audio"] for r in rows] == [str(clips[0]), str(bad), str(clips[1])]
    assert [r["error"] is None for r in rows] == [True, False, True]
    assert rows[1]["answer"] is None and "not an audio file" in rows[1]["error"]
    assert [rows[0]["answer"], rows[2]["answer"]] == ["a low tone", "a high tone"]
    assert len(model.asked) == 2  # the broken file never reached the model
    assert out.stderr.count("\n") == 1 and out.stderr.startswith(f"mellow: error: {bad}: ")


def test_missing_model_folder_is_one_line(clips, tmp_path):
    out = mellow("ask", str(clips[0]), "q", "--model", str(tmp_path / "nowhere" / "model.ckpt"), "-q")
    assert out.returncode == 1
    assert out.stderr.count("\n") == 1 and out.stderr.startswith(f"mellow: error: {tmp_path}")
    assert "Traceback" not in out.stderr


def test_cuda_requested_without_cuda_is_one_line(tiny_model_dir, clips):
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    out = mellow("ask", str(clips[0]), "q", "--model", str(tiny_model_dir), "--device", "cuda", "-q")
    assert out.returncode == 1
    assert out.stderr.strip().startswith("mellow: error: --device cuda: no CUDA device")


def test_dtype_float16_on_cpu(tiny_model_dir, clips):
    out = mellow("ask", str(clips[0]), "q", "--model", str(tiny_model_dir), "--max-tokens", "4", "-q", "--dtype", "float16")
    assert out.returncode == 0, out.stderr
    ref = mellow("ask", str(clips[0]), "q", "--model", str(tiny_model_dir), "--max-tokens", "4", "-q")
    assert out.stdout == ref.stdout


def test_caption_stops_once_when_the_model_cannot_load(clips, tmp_path):
    out = mellow("caption", str(clips[0]), str(clips[1]), "--model", str(tmp_path / "missing.ckpt"), "-q")
    assert out.returncode == 1
    assert out.stderr.count("mellow: error:") == 1, out.stderr
    assert out.stdout == ""


def test_unwritable_cache_is_one_line(tiny_model_dir, clips, tmp_path, monkeypatch):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    monkeypatch.setenv("MELLOW_HOME", str(blocker / "cache"))
    ckpt = tmp_path / "model.ckpt"  # a local .ckpt is converted into the cache, which cannot exist
    import torch
    from safetensors.torch import load_file

    torch.save(load_file(str(tiny_model_dir / "model.safetensors")), ckpt)
    out = mellow("ask", str(clips[0]), "q", "--model", str(ckpt), "-q")
    assert out.returncode == 1
    assert out.stderr.count("\n") == 1 and out.stderr.startswith("mellow: error: ")
    assert "unexpected" not in out.stderr


def test_caption_a_folder_to_a_csv_file(tiny_model_dir, clips, tmp_path):
    import csv

    out_file = tmp_path / "captions.csv"
    folder = clips[0].parent
    out = mellow("caption", str(folder), "--model", str(tiny_model_dir), "--max-tokens", "4", "--format", "csv",
                 "--output", str(out_file), "--batch-size", "1")
    assert out.returncode == 0, out.stderr
    assert out.stdout == ""
    rows = list(csv.DictReader(out_file.open()))
    assert sorted(r["audio"] for r in rows) == sorted(str(c) for c in clips)
    assert all(r["error"] == "" and r["model"] == str(tiny_model_dir) for r in rows)
    assert "captioned 2 of 2 rows" in out.stderr


def test_caption_list_on_stdin_batched_equals_one_by_one(tiny_model_dir, clips, monkeypatch):
    import io

    monkeypatch.setattr("sys.stdin", io.StringIO(f"{clips[0]}\n{clips[1]}\n"))
    batched = mellow("caption", "@-", "--model", str(tiny_model_dir), "--max-tokens", "5", "-q", "--batch-size", "2")
    single = [mellow("caption", str(c), "--model", str(tiny_model_dir), "--max-tokens", "5", "-q").stdout for c in clips]
    assert batched.returncode == 0, batched.stderr
    assert batched.stdout == "".join(f"{c}\t{s}" for c, s in zip(clips, single))


@pytest.mark.parametrize("command", [("ask", "what is it?"), ("caption",), ("compare",)])
def test_verbose_times_each_stage_on_stderr_and_leaves_stdout_alone(tiny_model_dir, clips, command):
    audio = [str(clips[0]), str(clips[1])] if command[0] == "compare" else [str(clips[0])]
    args = (command[0], *audio, *command[1:], "--model", str(tiny_model_dir), "--max-tokens", "5")
    quiet, verbose = mellow(*args, "-q"), mellow(*args, "-v")
    assert verbose.returncode == 0, verbose.stderr
    assert verbose.stdout == quiet.stdout  # results only
    line = next(x for x in verbose.stderr.splitlines() if x.startswith("timings: "))
    assert [part.split()[0] for part in line.removeprefix("timings: ").split("; ")] == ["load", "encode", "prefill",
                                                                                        "decode"]
    assert line.endswith("tok/s") and "timings" not in mellow(*args).stderr  # only with -v
