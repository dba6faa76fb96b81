"""mellow train with every family: the training view is teacher-forced inference (rows of other
lengths, TinyMU's query), `mellow train --model DIR` learns a repeated batch of MusicSkills rows and
its checkpoint loads back as a model of that family that answers it, --resume ends where an
uninterrupted run does, --freeze freezes the family's own modules, and rows a family cannot take
are named."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import write_tone
from safetensors.torch import load_file
from test_cli_answers import mellow

from mellow_cli.errors import UsageError
from mellow_cli.models.family import family
from mellow_cli.runtime.generate import Session
from mellow_cli.runtime.prefix import Prefix
from mellow_cli.train import data, loop
from mellow_cli.train.view import row_logits

FAMILIES = ("mellow", "tinymu", "samsone")
QUESTION, ANSWER = "What is playing?", "A Tone!"
SAID = {"tinymu": "A Tone!", "samsone": "a tone!"}  # Samsone learns and says its answers lower-cased


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def metrics(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


# --- the training view -------------------------------------------------------------------------


def teacher_forced(lm, row, ids: list[int]) -> torch.Tensor:
    """Inference's logits predicting each of `ids`, fed one by one after `row` (generate.Session)."""
    with torch.inference_mode():
        session = Session(lm, Prefix.of([row]), len(ids))
        logits = [session.first()[0]]
        for token in ids[:-1]:
            logits.append(session.step(torch.tensor([token]))[0])
    return torch.stack(logits)


@pytest.mark.parametrize("name", FAMILIES)
def test_the_training_view_is_teacher_forced_inference(name, smollm2_dir):
    fam = family(name)
    cfg = fam.config("tiny")
    torch.manual_seed(0)
    net = fam.build(cfg).eval()
    tokenizer = fam.tokenizer(smollm2_dir, cfg)
    rate, rng = fam.sample_rate(cfg), np.random.default_rng(0)
    clips = [[torch.from_numpy(fam.clip((0.1 * rng.standard_normal(int(rate * s))).astype(np.float32), cfg))]
             for s in (3, 9)]
    prompts = [fam.prompt_ids(tokenizer, q, cfg) for q in ("what is this?", "Describe it! now, in more words, please")]
    answers = [tokenizer(a, add_special_tokens=False)["input_ids"] + [cfg.eos_token_id]
               for a in ("a dog barks", "rain on a tin roof, loud!")]
    width = max(map(len, answers))
    ids = torch.tensor([a + [0] * (width - len(a)) for a in answers])
    with torch.no_grad():
        rows = fam.training_rows(net, clips, prompts)
        logits = row_logits(net.lm, rows, ids)
    if name != "mellow":  # rows of other lengths in one batch, TinyMU's each with its query
        assert rows[0].length != rows[1].length
        assert all((r.query is not None) == (name == "tinymu") for r in rows)
    for row, answer, got in zip(rows, answers, logits):
        torch.testing.assert_close(got[: len(answer)], teacher_forced(net.lm, row, answer), rtol=1e-4, atol=1e-4)


# --- mellow train --model DIR ------------------------------------------------------------------


@pytest.fixture(scope="module")
def music_rows(tmp_path_factory) -> Path:
    """Four rows of MusicSkills' JSON (one tone each, paths relative to the file), one question
    and one answer: every step of batch 4 sees the same batch."""
    folder = tmp_path_factory.mktemp("musicskills")
    items = []
    for i in range(4):
        write_tone(folder / f"tone{i}.wav", 300.0 + 100 * i)
        items.append({"file_name": f"tone{i}.wav", "input_text": QUESTION, "target_text": ANSWER,
                      "dataset": "tones", "task": "captioning"})
    path = folder / "tones.json"
    path.write_text(json.dumps(items))
    return path


def train_cli(data_path: Path, model: Path, run: Path, *args: str):
    return mellow("train", str(data_path), "--model", str(model), "-o", str(run), "-b", "4", "--workers", "0",
                  "--lr", "1e-2", "--warmup-steps", "0", "--log-every", "1", "--save-every", "100", "-q", *args)


@pytest.mark.parametrize("name", ["tinymu", "samsone"])
def test_a_family_learns_a_repeated_batch_and_its_checkpoint_answers(name, family_model_dir, music_rows, tmp_path):
    from mellow_cli.api import load_model

    run, val = tmp_path / "run", tmp_path / "val.jsonl"
    val.write_text(json.dumps({"audio": str(music_rows.parent / "tone1.wav"), "question": QUESTION, "answer": ANSWER,
                               "choices": [ANSWER, "Rain on a roof."]}) + "\n")
    started = train_cli(music_rows, family_model_dir(name), run, "--max-steps", "4", "--val", str(val))
    assert started.returncode == 0, started.stderr
    resumed = mellow("train", "-o", str(run), "--resume", "--max-steps", "8", "-q")
    assert resumed.returncode == 0, resumed.stderr
    losses = [m["loss"] for m in metrics(run) if m["event"] == "train"]
    assert len(losses) == 8 and losses[-1] < 0.05 * losses[0], losses
    checked = [m for m in metrics(run) if m["event"] == "val"]
    assert [m["step"] for m in checked] == [4, 8] and checked[1]["val_loss"] < 0.05 * checked[0]["val_loss"]
    assert checked[1]["val_accuracy"] == 1.0 and checked[1]["val_choice_rows"] == 1
    last = run / "checkpoints" / "last"
    assert json.loads((last / "config.json").read_text())["family"] == name
    model = load_model(str(last), dtype="float32", progress=False)
    assert model.family.name == name
    assert model.ask(str(music_rows.parent / "tone0.wav"), QUESTION) == SAID[name]


@pytest.mark.parametrize("name", ["tinymu", "samsone"])
def test_a_resumed_family_run_ends_with_the_uninterrupted_weights(name, family_model_dir, music_rows, tmp_path):
    """A run stopped after its step-2 checkpoint (the later one removed, as a crash leaves it)
    and resumed ends with the uninterrupted run's weights and losses (dropout included)."""
    import shutil

    run = tmp_path / "run"
    assert train_cli(music_rows, family_model_dir(name), run, "--max-steps", "4", "--save-every", "2").returncode == 0
    end = run / "checkpoints" / "step-000004"
    whole, losses = load_file(end / "model.safetensors"), [m["loss"] for m in metrics(run)]
    shutil.rmtree(end)
    resumed = mellow("train", "-o", str(run), "--resume", "-q")
    assert resumed.returncode == 0, resumed.stderr
    again = load_file(end / "model.safetensors")
    assert whole.keys() == again.keys() and all(torch.equal(whole[k], again[k]) for k in whole)
    assert [m["loss"] for m in metrics(run)] == losses


@pytest.mark.parametrize("name", ["tinymu", "samsone"])
@pytest.mark.parametrize("part", ["encoder", "decoder"])
def test_freeze_freezes_the_familys_own_modules(name, part, family_model_dir, music_rows, tmp_path):
    fam = family(name)
    model = family_model_dir(name)
    result = loop.run(loop.TrainOptions(data=str(music_rows), out=str(tmp_path / "run"), model=str(model),
                                        freeze=(part,), batch_size=4, workers=0, lr=1e-2, max_steps=1))
    before, after = load_file(model / "model.safetensors"), load_file(result.checkpoint / "model.safetensors")
    frozen = fam.parts()[part] + "."
    weights = dict(fam.build(fam.config("tiny"), "meta").named_parameters())  # the rest are buffers
    assert before.keys() == after.keys()
    for key in before:
        kept = key.startswith(frozen) or key in fam.fixed() or key not in weights
        assert torch.equal(before[key], after[key]) == kept, f"{key} {'changed' if kept else 'did not train'}"


# --- rows --------------------------------------------------------------------------------------


def test_musicskills_rows_are_read_as_training_rows(tmp_path):
    items = [{"file_name": "audio/a.wav", "input_text": "What Genre is This?", "target_text": "Jazz, with a Sax.",
              "dataset": "MusicCaps", "task": "QA"},
             {"file_name": "/abs/b.wav", "input_text": "Describe it.", "target_text": 3, "dataset": "FMA"}]
    path = tmp_path / "MusicCaps_train.json"
    path.write_text(json.dumps(items))
    a, b = data.read_rows(path)
    assert (a.audio1, a.audio2, a.question, a.answer, a.choices, a.id) == (
        str(tmp_path / "audio" / "a.wav"), None, "What Genre is This?", "Jazz, with a Sax.", None, None)
    assert (b.audio1, b.answer, b.where, b.source) == ("/abs/b.wav", "3", "item [1]", str(path))
    assert data.read_rows(path, audio_root="/data/music")[0].audio1 == "/data/music/audio/a.wav"
    path.write_text(json.dumps([{**items[0], "file_name": ["a.wav"]}]))
    with pytest.raises(UsageError, match=r"MusicCaps_train\.json: item \[0\]: \"file_name\" must be a string"):
        data.read_rows(path)


def test_rows_a_family_cannot_take_are_named_and_skip_bad_drops_them(family_model_dir, music_rows, tmp_path):
    rows = json.loads(music_rows.read_text())
    two_clips = {"audio1": str(music_rows.parent / "tone0.wav"), "audio2": str(music_rows.parent / "tone1.wav"),
                 "question": "which is higher?", "answer": "the second"}
    bad = tmp_path / "rows.jsonl"
    bad.write_text("".join(json.dumps(r) + "\n" for r in [two_clips, *(
        {"audio": str(music_rows.parent / r["file_name"]), "question": r["input_text"], "answer": r["target_text"]}
        for r in rows)]))
    out = train_cli(bad, family_model_dir("tinymu"), tmp_path / "run", "--max-steps", "1")
    assert out.returncode == 2
    assert out.stderr.strip() == (f"mellow: error: {bad}: line 1: TinyMU takes 1 clip a question, not 2 (pass --skip-bad to "
                                  "train without them)")
    skipped = train_cli(bad, family_model_dir("tinymu"), tmp_path / "skipped", "--max-steps", "1", "--skip-bad")
    assert skipped.returncode == 0, skipped.stderr
    # Samsone's pruned vocabulary has no byte tokens outside ASCII's printable range
    unspellable = tmp_path / "unspellable.json"
    unspellable.write_text(json.dumps([rows[0], {**rows[1], "target_text": "a\x01tone"}]))
    out = train_cli(unspellable, family_model_dir("samsone"), tmp_path / "samsone", "--max-steps", "1",
                    "--data-root", str(music_rows.parent))
    assert out.returncode == 2 and "unspellable.json: item [1]: Samsone's vocabulary cannot spell" in out.stderr
    assert len(out.stderr.strip().splitlines()) == 1


@pytest.mark.parametrize("flag", [("--recipe", "official"), ("--text", "official"), ("--second-clip", "random")])
def test_mellows_authors_recipe_is_refused_for_other_families(flag, family_model_dir, music_rows, tmp_path):
    out = train_cli(music_rows, family_model_dir("tinymu"), tmp_path / "run", "--max-steps", "1", *flag)
    assert out.returncode == 2 and len(out.stderr.strip().splitlines()) == 1
    assert "TinyMU" in out.stderr and flag[0] in out.stderr
