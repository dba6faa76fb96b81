"""mellow train: the objective (answer tokens only, the golden training-view logits), the loop on the
tiny preset (learning, freezing, checkpoints, best and keep-last-K, metrics, bad rows), a resume
after a real SIGKILL that ends bit-identical, and two-process DDP under torchrun."""

from __future__ import annotations

import dataclasses
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import write_tone
from safetensors.torch import load_file
from test_cli_answers import mellow

from mellow_cli.train import runs, tasks, loop as train
from mellow_cli.models.mellow.config import MellowConfig
from mellow_cli.models.mellow.network import Mellow, tokenize_prompts
from mellow_cli.train.loop import TrainOptions

TINY = MellowConfig.tiny()
REPO = Path(__file__).resolve().parents[1]



pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def task_data(tmp_path_factory):
    """16 training and 8 validation rows of the synthetic tasks (every row has choices)."""
    out = tmp_path_factory.mktemp("tasks")
    train_path, val_path = tasks.make_tasks(out, rows=16, seed=0, val_rows=8)
    return train_path, val_path


@pytest.fixture(scope="module")
def tokenizer(smollm2_dir):
    from mellow_cli.runtime.tokenizer import Tokenizer

    return Tokenizer(smollm2_dir)


def options(task_data, smollm2_dir, out, **kw) -> TrainOptions:
    base = dict(data=str(task_data[0]), out=str(out), init="tiny", tokenizer=str(smollm2_dir), batch_size=2,
                workers=0, lr=1e-3, max_steps=2, save_every=100, eval_every=100, log_every=1, seed=3)
    return TrainOptions(**{**base, **kw})


def fresh_tiny(seed: int) -> Mellow:
    return train.fresh_model(TINY, seed)


def state_of(folder: Path) -> dict[str, torch.Tensor]:
    return load_file(str(folder / "model.safetensors"))


def metrics(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


# --- the objective -----------------------------------------------------------------------------


def batch_for(tokenizer, answers, seed=0, questions=None):
    g = torch.Generator().manual_seed(seed)
    n = len(answers)
    wav1 = 0.1 * torch.randn(n, TINY.clip_samples, generator=g)
    wav2 = 0.1 * torch.randn(n, TINY.clip_samples, generator=g)
    prompt = tokenize_prompts(tokenizer, questions or ["which is louder?"] * n, TINY)
    ids, mask = train.encode_answers(tokenizer, answers, TINY)
    return wav1, wav2, prompt, ids, mask


def test_answers_end_with_eos_and_padding_is_masked(tokenizer):
    ids, mask = train.encode_answers(tokenizer, ["the first", "a dog barks twice loudly"], TINY)
    short = tokenizer("the first", add_special_tokens=False)["input_ids"]
    assert ids[0, : len(short)].tolist() == short and ids[0, len(short)] == TINY.eos_token_id
    assert mask[0].tolist() == [True] * (len(short) + 1) + [False] * (ids.shape[1] - len(short) - 1)
    assert mask[1].all()
    cut, cut_mask = train.encode_answers(tokenizer, ["a dog barks twice loudly"], TINY, max_tokens=3)
    assert cut.shape == (1, 3) and cut_mask.all()


def test_answer_logits_are_the_full_forward_at_the_answer_positions(tokenizer):
    net = fresh_tiny(0).eval()
    wav1, wav2, prompt, ids, mask = batch_for(tokenizer, ["rises", "the second"])
    with torch.no_grad():
        prefix = net.prefix(wav1, wav2, prompt)
        each = net.embed_prefix(net.encode_audio(wav1), net.encode_audio(wav2), prompt)
        torch.testing.assert_close(prefix, each)
        # a one-clip row (its clip twice) among two-clip rows: its clip is encoded once, same prefix
        mixed = torch.stack([wav1[0], wav2[1]])
        each = net.embed_prefix(net.encode_audio(wav1), net.encode_audio(mixed), prompt)
        torch.testing.assert_close(net.prefix(wav1, mixed, prompt), each)
        logits = train.answer_logits(net.lm, prefix, ids)
        full = net.lm(inputs_embeds=torch.cat([prefix, net.lm.model.embed_tokens(ids)], 1)).logits
    assert logits.shape == (2, ids.shape[1], TINY.vocab_size)
    torch.testing.assert_close(logits, full[:, TINY.prefix_len - 1 : -1], rtol=1e-5, atol=1e-5)
    # the loss is the cross-entropy of exactly the answer tokens
    expected = torch.nn.functional.cross_entropy(full[:, TINY.prefix_len - 1 : -1][mask], ids[mask])
    with torch.no_grad():
        loss = train.answer_loss(net, wav1, wav2, prompt, ids, mask)
    torch.testing.assert_close(loss, expected, rtol=1e-5, atol=1e-5)


def test_loss_ignores_answer_padding_and_other_rows(tokenizer):
    net = fresh_tiny(1).eval()  # eval: no dropout, so two forward passes agree
    wav1, wav2, prompt, ids, mask = batch_for(tokenizer, ["one", "the first clip is much louder"])
    garbage = ids.clone()
    garbage[~mask] = 12345  # whatever sits in the padding
    loss, loss_garbage = (train.answer_loss(net, wav1, wav2, prompt, i, mask) for i in (ids, garbage))
    grads = torch.autograd.grad(loss, list(net.lm.parameters()))
    grads_garbage = torch.autograd.grad(loss_garbage, list(net.lm.parameters()))
    assert torch.equal(loss, loss_garbage)
    assert all(torch.equal(a, b) for a, b in zip(grads, grads_garbage))
    # the batch loss is the token-weighted mean of each row's own, unpadded loss
    with torch.no_grad():
        sums = [train.answer_loss(net, wav1[i : i + 1], wav2[i : i + 1], prompt[i : i + 1],
                                  ids[i : i + 1, : mask[i].sum()], mask[i : i + 1, : mask[i].sum()], "sum")
                for i in range(2)]
    torch.testing.assert_close(loss.detach(), sum(sums) / mask.sum(), rtol=1e-5, atol=1e-5)
    # the question is part of the input, not of the target: a different question moves the loss
    other = batch_for(tokenizer, ["one", "the first clip is much louder"], questions=["how many beeps?"] * 2)[2]
    with torch.no_grad():
        assert not torch.equal(train.answer_loss(net, wav1, wav2, other, ids, mask), loss.detach())


@pytest.mark.slow
def test_training_view_matches_the_golden_teacher_logits(golden_dir, smollm2_dir, golden):
    """The reference's logits with the answer fed after the prefix (golden `teacher_*`), from
    the two waveforms through our training path."""
    import numpy as np

    from mellow_cli.models.mellow.network import load_weights

    enc = load_file(golden_dir / "mellow_v0_golden_audio_encoder.fp16.safetensors")
    sd = {k: (v.float() if v.is_floating_point() else v) for k, v in enc.items()}
    sd.update({f"caption_decoder.lm.{k}": v for k, v in load_file(smollm2_dir / "lm.safetensors").items()})
    net = load_weights(Mellow.from_config(MellowConfig.v0(), "meta"), sd)
    wav = torch.from_numpy(np.stack([golden["wav1"], golden["wav2"]])).float()
    answer = torch.from_numpy(golden["teacher_answer_ids"])
    with torch.no_grad():
        prefix = net.prefix(wav, wav.flip(0), torch.from_numpy(golden["input_ids"]))
        top = train.answer_logits(net.lm, prefix, answer).topk(5, dim=-1)
    assert torch.equal(top.indices, torch.from_numpy(golden["teacher_top5_ids"]))
    assert (top.values - torch.from_numpy(golden["teacher_top5_logits"])).abs().max() <= 1e-3


def test_overfits_a_tiny_fixed_batch(tokenizer):
    torch.manual_seed(0)
    net = fresh_tiny(2)
    train.freeze(net, ())
    train.train_mode(net)
    opts = TrainOptions(data=None, out="", lr=1e-2, weight_decay=0.0)
    optimizer = train.optimizer_for(net, opts)
    batch = batch_for(tokenizer, ["the first", "three"])
    losses = []
    for _ in range(10):
        loss = train.answer_loss(net, *batch)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    assert losses[-1] < 0.3 * losses[0], losses


def test_schedule_warms_up_then_decays_to_the_floor():
    f = [train.lr_factor(s, warmup=4, total=20, min_ratio=0.1) for s in range(21)]
    assert f[:4] == [0.25, 0.5, 0.75, 1.0]
    assert all(a >= b for a, b in zip(f[3:], f[4:]))
    assert f[20] == pytest.approx(0.1)


def test_no_weight_decay_on_norms_and_biases():
    net = fresh_tiny(0)
    train.freeze(net, ())
    decay, no_decay = train.optimizer_for(net, TrainOptions(data=None, out="")).param_groups
    assert decay["weight_decay"] > 0 and no_decay["weight_decay"] == 0
    assert all(p.ndim >= 2 for p in decay["params"]) and all(p.ndim == 1 for p in no_decay["params"])
    names = {id(p): n for n, p in net.named_parameters()}
    assert any(names[id(p)].endswith("layer_norm.bias") for p in no_decay["params"])
    assert any(names[id(p)].endswith("embed_tokens.weight") for p in decay["params"])


# --- the loop ----------------------------------------------------------------------------------


@pytest.mark.parametrize("freeze, frozen_prefixes", [
    ((), ()),
    (("encoder",), ("audio_encoder.base.htsat.",)),
    (("decoder",), ("caption_decoder.lm.",)),
    (("encoder", "decoder"), ("audio_encoder.base.htsat.", "caption_decoder.lm.")),
])
def test_freeze_keeps_exactly_those_weights(task_data, smollm2_dir, tmp_path, freeze, frozen_prefixes):
    result = train.run(options(task_data, smollm2_dir, tmp_path / "run", freeze=freeze, max_steps=1))
    from mellow_cli.train import data

    start = fresh_tiny(3)  # what --init builds: fresh weights, bn0 and c2l fitted to the training clips
    train.calibrate_encoder(start, data.QADataset(data.read_rows(str(task_data[0])), TINY, seed=3))
    before = runs.model_state(start)
    after = state_of(result.checkpoint)
    assert set(before) == set(after)
    never = ("audio_encoder.base.htsat.head.", "audio_encoder.base.htsat.spectrogram_extractor.",
             "audio_encoder.base.htsat.logmel_extractor.", "audio_encoder.base.htsat.bn0.running",
             "audio_encoder.base.htsat.bn0.num_batches", "relative_position_index", "attn_mask")
    for key in before:
        unchanged = torch.equal(before[key], after[key])
        if key.startswith(frozen_prefixes) or any(n in key for n in never):
            assert unchanged, f"{key} changed although frozen"
        elif key.endswith(("weight", "bias")):
            assert not unchanged, f"{key} did not train"


def test_run_writes_checkpoints_metrics_and_best(task_data, smollm2_dir, tmp_path):
    run = tmp_path / "run"
    events = []
    result = train.run(options(task_data, smollm2_dir, run, val=str(task_data[1]), max_steps=4, save_every=3,
                               eval_every=2, keep=1, log_every=2), events.append)
    rows = metrics(run)
    train_rows = [r for r in rows if r["event"] == "train"]
    val_rows = [r for r in rows if r["event"] == "val"]
    assert [r["step"] for r in train_rows] == [2, 4] and [r["step"] for r in val_rows] == [2, 4]
    for r in train_rows:
        assert r["loss"] > 0 and r["lr"] > 0 and r["samples_per_s"] > 0 and r["time"] > 0
    for r in val_rows:
        assert r["val_loss"] > 0 and 0 <= r["val_accuracy"] <= 1 and r["val_choice_rows"] == 8
    best_step = min(val_rows, key=lambda r: r["val_loss"])["step"]
    # keep=1: the last checkpoint, plus the best one if it is another
    kept = sorted(p.name for p in (run / "checkpoints").iterdir())
    assert kept == sorted({"best", "last", "step-000004", runs.step_name(best_step)})
    assert (run / "checkpoints" / "best").resolve().name == runs.step_name(best_step)
    assert os.readlink(run / "checkpoints" / "last") == "step-000004"  # relative: the run folder may move
    assert result.checkpoint == run / "checkpoints" / "step-000004" and result.steps == 4
    trainer = json.loads((result.checkpoint / "trainer.json").read_text())
    assert trainer["step"] == 4 and trainer["options"]["batch_size"] == 2 and trainer["position"] == {"epoch": 0, "batch": 4}
    state = torch.load(result.checkpoint / "state.pt", weights_only=True)
    assert {"optimizer", "scheduler", "rng"} <= set(state)
    # every clip is decoded before step 1, with a progress event per clip: the training file's, then --val's
    checking = ("checking", "checked", "checked_all")
    checks = [e for e in events if e["event"] in checking]
    rows = [json.loads(x) for x in task_data[0].read_text().splitlines()]
    clips = len({r[k] for r in rows for k in ("audio1", "audio2") if k in r})
    assert checks[0] == {"event": "checking", "path": str(task_data[0]), "rows": len(rows), "clips": clips}
    first = checks[:next(i for i, e in enumerate(checks) if e["event"] == "checked_all") + 1]
    assert sum(e.get("clips", 0) for e in first[1:]) == clips and first[-1]["event"] == "checked_all"
    steps = [e["event"] for e in events if e["event"] not in checking]
    assert steps[:1] == ["start"] and steps[-1] == "done"
    names = [e["event"] for e in events]
    assert max(i for i, name in enumerate(names) if name in checking) < names.index("start")
    assert not list((run / "checkpoints").glob(".*"))  # no temporary folder left
    # each checkpoint is a model folder the other commands load
    clip = write_tone(tmp_path / "a.wav", 440)
    out = mellow("ask", str(clip), "which is louder?", "--model", str(run / "checkpoints" / "best"), "--choices",
                 "the first|the second", "-q")
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() in ("the first", "the second")


def test_last_is_the_newest_checkpoint_and_without_validation_so_is_best(task_data, smollm2_dir, tmp_path):
    run = tmp_path / "run"
    seen = []
    train.run(options(task_data, smollm2_dir, run, max_steps=3, save_every=1, keep=1),
              lambda e: seen.append(os.readlink(run / "checkpoints" / "last")) if e["event"] == "checkpoint" else None)
    assert seen == ["step-000001", "step-000002", "step-000003"]  # kept up to date at every save
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["best", "last", "step-000003"]
    assert os.readlink(run / "checkpoints" / "best") == "step-000003"
    clip = write_tone(tmp_path / "a.wav", 440)
    for alias in ("last", "best"):
        out = mellow("ask", str(clip), "which?", "--model", str(run / "checkpoints" / alias), "--choices", "a|b", "-q")
        assert out.returncode == 0 and out.stdout.strip() in ("a", "b"), out.stderr


def test_checkpoint_writing_is_atomic(smollm2_dir, tmp_path, monkeypatch):
    run = tmp_path / "run"
    runs.write_checkpoint(run, 1, fresh_tiny(4), smollm2_dir, {"step": 1}, {"rng": []})
    good = state_of(run / "checkpoints" / "step-000001")

    def dies(*args, **kwargs):
        raise OSError(28, "No space left on device")

    net = fresh_tiny(5)
    monkeypatch.setattr(runs.torch, "save", dies)
    from mellow_cli.errors import MellowError

    with pytest.raises(MellowError, match="step-000001: cannot write the checkpoint, the disk is full"):
        runs.write_checkpoint(run, 1, net, smollm2_dir, {"step": 1}, {})
    with pytest.raises(MellowError, match="step-000002: cannot write the checkpoint"):
        runs.write_checkpoint(run, 2, net, smollm2_dir, {"step": 2}, {})
    # the old checkpoint is whole and unchanged, the new one never appeared, nothing is left over
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["step-000001"]
    assert all(torch.equal(good[k], v) for k, v in state_of(run / "checkpoints" / "step-000001").items())


def test_a_full_disk_under_safetensors_names_the_file_and_what_to_do(smollm2_dir, tmp_path, monkeypatch):
    import safetensors.torch
    from safetensors import SafetensorError

    from mellow_cli.errors import MellowError

    def full(*args, **kwargs):
        raise SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)")

    monkeypatch.setattr(safetensors.torch, "save_file", full)
    run = tmp_path / "run"
    with pytest.raises(MellowError, match=r"step-000001: cannot write the checkpoint, the disk is full \(writing "
                       r"model.safetensors.*start the run again.*no checkpoint to resume from yet"):
        runs.write_checkpoint(run, 1, fresh_tiny(4), smollm2_dir, {"step": 1}, {})
    (run / "checkpoints" / "step-000001").mkdir()
    (run / "checkpoints" / "step-000001" / "trainer.json").write_text("{}")
    with pytest.raises(MellowError, match=r"step-000002: cannot write the checkpoint, the disk is full.*--resume"):
        runs.write_checkpoint(run, 2, fresh_tiny(4), smollm2_dir, {"step": 2}, {})


def test_a_file_size_limit_names_the_file(smollm2_dir, tmp_path, monkeypatch):
    import resource

    import safetensors.torch

    from mellow_cli.errors import MellowError

    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    net, run = fresh_tiny(4), tmp_path / "run"
    resource.setrlimit(resource.RLIMIT_FSIZE, (256 << 10, hard))  # Python ignores SIGXFSZ: writes fail with EFBIG
    try:
        with pytest.raises(MellowError, match="model.safetensors would pass the file size limit"):
            runs.write_checkpoint(run, 1, net, smollm2_dir, {"step": 1}, {})
        monkeypatch.setattr(safetensors.torch, "save_file", lambda tensors, path, metadata: open(path, "wb").close())
        with pytest.raises(MellowError, match=r"no space left for state.pt \(or a file size limit\)"):
            runs.write_checkpoint(run, 1, net, tmp_path, {"step": 1}, {"big": torch.zeros(1 << 17)})
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
    assert runs.checkpoints(run) == [] and not list((run / "checkpoints").iterdir())


def test_prune_keeps_the_last_k_and_the_best(tmp_path):
    for step in (1, 2, 3, 4, 5):
        folder = tmp_path / "checkpoints" / runs.step_name(step)
        folder.mkdir(parents=True)
        (folder / "trainer.json").write_text("{}")
    (tmp_path / "checkpoints" / ".step-000006.tmp-1").mkdir()  # a killed write: not a checkpoint
    runs.mark(tmp_path, tmp_path / "checkpoints" / "step-000002", "best")
    runs.prune(tmp_path, keep=2, best_step=2)
    assert [p.name for p in runs.checkpoints(tmp_path)] == ["step-000002", "step-000004", "step-000005"]
    assert (tmp_path / "checkpoints" / "best" / "trainer.json").is_file()
    runs.clean_stale(tmp_path)
    assert not (tmp_path / "checkpoints" / ".step-000006.tmp-1").exists()


# --- data problems and usage -------------------------------------------------------------------


def test_bad_rows_are_named_by_line_and_skip_bad_drops_them(task_data, smollm2_dir, tmp_path):
    lines = task_data[0].read_text().splitlines()
    good = [json.loads(x) for x in lines[:4]]
    for row in good:  # absolute paths: the file moves to tmp_path
        for key in ("audio1", "audio2"):
            if key in row:
                row[key] = str(task_data[0].parent / row[key])
    bad = [dict(good[0], audio1=str(tmp_path / "missing.wav")), dict(good[1], answer="")]
    rows = tmp_path / "rows.jsonl"
    rows.write_text("\n".join(json.dumps(r) for r in [good[0], bad[0], good[1], bad[1], *good[2:]]) + "\n")
    args = ["train", str(rows), "--init", "tiny", "--tokenizer", str(smollm2_dir), "--workers", "0",
            "-b", "2", "--max-steps", "1"]
    out = mellow(*args, "-o", str(tmp_path / "stopped"))
    assert out.returncode == 2  # a data file that cannot be trained on is a usage error
    errors = [line for line in out.stderr.splitlines() if line.startswith("mellow: error: ")]
    assert len(errors) == 1 and out.stderr.endswith(errors[0] + "\n")
    assert f"{rows}: line 2: audio1" in out.stderr and "missing.wav" in out.stderr
    assert f"{rows}: line 4: empty answer" in out.stderr and "--skip-bad" in out.stderr
    assert not (tmp_path / "stopped" / "checkpoints").exists()
    out = mellow(*args, "-o", str(tmp_path / "skipped"), "--skip-bad")
    assert out.returncode == 0, out.stderr
    assert "skipping 2 bad rows" in out.stderr and "4 rows" in out.stderr


def test_usage_errors_are_one_line(task_data, smollm2_dir, tmp_path):
    base = ["train", str(task_data[0]), "--init", "tiny", "--tokenizer", str(smollm2_dir), "--workers", "0",
            "-b", "2", "--max-steps", "1", "-o", str(tmp_path / "run")]
    cuda = mellow(*base, "--device", "cuda")
    if not torch.cuda.is_available():
        assert cuda.returncode == 1 and cuda.stderr.count("\n") == 1 and "no CUDA device" in cuda.stderr
    assert mellow(*base[:-2], "-o", str(tmp_path / "f"), "--freeze", "lm").returncode == 2
    assert mellow("train", "-o", str(tmp_path / "nothing"), "--resume").returncode == 2
    assert mellow(*base, "-q", "--val-fraction", "0.25").returncode == 0
    assert [r["val_choice_rows"] for r in metrics(tmp_path / "run") if r["event"] == "val"] == [4]
    again = mellow(*base)
    assert again.returncode == 2 and "already holds a run" in again.stderr and "--resume" in again.stderr
    changed = mellow("train", "-o", str(tmp_path / "run"), "--resume", "--lr", "0.5")
    assert changed.returncode == 2 and "lr" in changed.stderr


def test_offline_init_without_a_tokenizer_says_so_before_decoding_any_clip(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    rows = tmp_path / "rows.jsonl"  # clips that do not exist: decoding them first would fail on them
    rows.write_text(json.dumps({"audio1": "gone.wav", "question": "q?", "answer": "a"}) + "\n")
    out = mellow("train", str(rows), "--init", "tiny", "--workers", "0", "-o", str(tmp_path / "run"))
    assert out.returncode == 1 and out.stderr.count("\n") == 1, out.stderr
    assert "--tokenizer DIR" in out.stderr and "models pull" not in out.stderr and "gone.wav" not in out.stderr
    empty = tmp_path / "empty"
    empty.mkdir()
    out = mellow("train", str(rows), "--init", "tiny", "--tokenizer", str(empty), "-o", str(tmp_path / "run"))
    assert out.returncode == 2 and f"--tokenizer {empty}: no tokenizer.json" in out.stderr, out.stderr


@pytest.mark.parametrize("flag, value", [("--seed", "100000000000000000000000"), ("--seed", "-1"), ("--lr", "1e308"),
                                         ("--epochs", "1e308")])
def test_absurd_training_values_are_usage_errors(task_data, tmp_path, flag, value):
    out = mellow("train", str(task_data[0]), "--init", "tiny", "-o", str(tmp_path / "run"), flag, value)
    assert out.returncode == 2 and flag in out.stderr and "unexpected" not in out.stderr
    assert not (tmp_path / "run").exists()


def test_workers_are_capped_at_the_cores(task_data, tmp_path, monkeypatch):
    seen = []
    monkeypatch.setattr(train, "run", lambda opts, report: seen.append(opts))
    out = mellow("train", str(task_data[0]), "--init", "tiny", "-o", str(tmp_path / "run"), "--workers", "100000")
    assert out.returncode == 0 and seen[0].workers == os.cpu_count()
    assert f"--workers 100000: this machine has {os.cpu_count()} cores" in out.stderr


def test_threads_are_capped_at_the_cores(task_data, tmp_path, monkeypatch):
    monkeypatch.setattr(train, "run", lambda opts, report: None)
    before = torch.get_num_threads()
    try:
        out = mellow("train", str(task_data[0]), "--init", "tiny", "-o", str(tmp_path / "run"), "--threads", "100000")
        assert out.returncode == 0 and torch.get_num_threads() == os.cpu_count()
        assert f"--threads 100000: this machine has {os.cpu_count()} cores" in out.stderr
    finally:
        torch.set_num_threads(before)


def test_non_finite_training_stops_in_one_line_without_a_checkpoint(task_data, smollm2_dir, tmp_path):
    from mellow_cli.errors import MellowError

    with pytest.raises(MellowError, match=r"^step 1: the weights became NaN or infinite.*no checkpoint was written"):
        train.run(options(task_data, smollm2_dir, tmp_path / "weights", lr=1e308, max_steps=1))
    assert runs.checkpoints(tmp_path / "weights") == []
    with pytest.raises(MellowError, match=r"^step 2: the training loss is NaN or infinite"):
        train.run(options(task_data, smollm2_dir, tmp_path / "loss", lr=1e308, max_steps=3))
    assert runs.checkpoints(tmp_path / "loss") == []


# --- resume and DDP, for real ------------------------------------------------------------------


def test_run_folders_that_are_not_fit_are_refused(task_data, smollm2_dir, tmp_path):
    base = ["train", str(task_data[0]), "--init", "tiny", "--tokenizer", str(smollm2_dir), "--workers", "0",
            "-b", "2", "--max-steps", "1"]
    a_file = tmp_path / "notes.txt"
    a_file.write_text("mine\n")
    out = mellow(*base, "-o", str(a_file))
    assert out.returncode == 2 and "is a file" in out.stderr and a_file.read_text() == "mine\n"
    (tmp_path / "died").mkdir()
    (tmp_path / "died" / "metrics.jsonl").write_text('{"event": "train", "step": 1}\n')
    out = mellow(*base, "-o", str(tmp_path / "died"))
    assert out.returncode == 2 and "metrics.jsonl from an earlier run" in out.stderr


def test_resume_refuses_edited_rows_and_keeps_the_tokenizer_after_pruning(task_data, smollm2_dir, tmp_path):
    from mellow_cli.store.loading import TOKENIZER_FILES

    data = tmp_path / "rows.jsonl"
    data.write_text(task_data[0].read_text())
    run = tmp_path / "run"
    base = ["train", str(data), "--init", "tiny", "--tokenizer", str(smollm2_dir), "--workers", "0", "-b", "2",
            "--save-every", "1", "--keep", "1", "--audio-root", str(task_data[0].parent), "-o", str(run), "-q"]
    assert mellow(*base, "--max-steps", "2").returncode == 0
    assert mellow("train", "-o", str(run), "--resume", "--max-steps", "4", "-q").returncode == 0
    # step-2, the checkpoint the resume started from, is pruned; later ones still carry a tokenizer
    found = sorted(p.name for p in (run / "checkpoints").glob("step-*"))
    assert found == ["step-000004"]
    assert all((run / "checkpoints" / "step-000004" / f).is_file() for f in TOKENIZER_FILES)
    assert mellow("train", "-o", str(run), "--resume", "--max-steps", "5", "-q").returncode == 0
    data.write_text(data.read_text() + data.read_text().splitlines(keepends=True)[0])
    edited = mellow("train", "-o", str(run), "--resume", "--max-steps", "6")
    assert edited.returncode == 2 and "changed since" in edited.stderr


def test_resume_keeps_the_runs_own_tokenizer_when_the_original_is_gone(task_data, smollm2_dir, tmp_path):
    import shutil

    from mellow_cli.store.loading import TOKENIZER_FILES

    copy = tmp_path / "tokenizer-copy"
    shutil.copytree(smollm2_dir, copy, ignore=shutil.ignore_patterns("*.safetensors"))
    run = tmp_path / "run"
    assert mellow("train", str(task_data[0]), "--init", "tiny", "--tokenizer", str(copy), "--workers", "0", "-b", "2",
                  "--save-every", "1", "--keep", "1", "-o", str(run), "--max-steps", "2", "-q").returncode == 0
    own = {f: (run / "tokenizer" / f).read_bytes() for f in TOKENIZER_FILES}
    shutil.rmtree(copy)
    out = mellow("train", "-o", str(run), "--resume", "--max-steps", "4", "-q")
    assert out.returncode == 0, out.stderr
    assert {f: (run / "tokenizer" / f).read_bytes() for f in TOKENIZER_FILES} == own
    assert all((run / "checkpoints" / "step-000004" / f).read_bytes() == own[f] for f in TOKENIZER_FILES)


def test_the_runs_tokenizer_is_replaced_only_by_a_whole_one(smollm2_dir, tmp_path):
    from mellow_cli.errors import MellowError
    from mellow_cli.store.loading import TOKENIZER_FILES

    run = tmp_path / "run"
    runs.keep_tokenizer(run, smollm2_dir)
    before = {f: (run / "tokenizer" / f).read_bytes() for f in TOKENIZER_FILES}
    (tmp_path / "half").mkdir()
    (tmp_path / "half" / "tokenizer.json").write_text("{}")
    with pytest.raises(MellowError, match="half: no tokenizer_config.json"):
        runs.keep_tokenizer(run, tmp_path / "half")
    assert {f: (run / "tokenizer" / f).read_bytes() for f in TOKENIZER_FILES} == before
    assert sorted(p.name for p in run.iterdir()) == ["tokenizer"]


def test_a_trainer_json_that_is_not_a_record_is_one_line(tmp_path):
    from mellow_cli.errors import MellowError
    from mellow_cli.train.runs import read_trainer

    (tmp_path / "trainer.json").write_text("[1, 2]")
    with pytest.raises(MellowError, match="not a checkpoint's record"):
        read_trainer(tmp_path)


@pytest.fixture(scope="module")
def finished_run(task_data, smollm2_dir, tmp_path_factory):
    run = tmp_path_factory.mktemp("finished") / "run"
    train.run(options(task_data, smollm2_dir, run, max_steps=1))
    return run


@pytest.mark.parametrize("field, value", [
    ("position.epoch", "a"), ("position.batch", -1), ("step", 1.5), ("seconds", "soon"), ("world_size", 0),
    ("best.val_loss", "low"), ("best", [1]), ("options.lr", "abc"), ("options.batch_size", -3),
    ("options.freeze", ["wings"]), ("options.optimizer", "sgd"), ("options.betas", [0.9]), ("options.data", 3),
    ("options", "all"), ("inputs.sha256", [1]), ("inputs.sha256.data", 5), ("inputs.threads", "many"),
])
def test_a_hand_edited_trainer_json_is_one_line_naming_the_field(finished_run, tmp_path, field, value):
    import shutil

    run = tmp_path / "run"
    shutil.copytree(finished_run, run, symlinks=True)
    path = runs.checkpoints(run)[-1] / "trainer.json"
    record = json.loads(path.read_text())
    *parents, last = field.split(".")
    node = record
    for key in parents:
        node = node[key]
    node[last] = value
    path.write_text(json.dumps(record))
    out = mellow("train", "-o", str(run), "--resume", "--max-steps", "2")
    assert out.returncode == 1 and "unexpected" not in out.stderr and out.stderr.count("\n") == 1
    assert f"{path}: {field} " in out.stderr


def test_deeply_nested_trainer_json_is_one_line(tmp_path):
    from mellow_cli.errors import MellowError
    from mellow_cli.train.runs import read_trainer

    (tmp_path / "trainer.json").write_text("[" * 100_000 + "]" * 100_000)
    with pytest.raises(MellowError, match="unreadable trainer.json"):
        read_trainer(tmp_path)


@pytest.mark.skipif((os.cpu_count() or 1) < 2, reason="needs two cores for another thread count")
def test_resume_with_another_thread_count_warns(finished_run, tmp_path):
    import shutil

    run = tmp_path / "run"
    shutil.copytree(finished_run, run, symlinks=True)
    before = torch.get_num_threads()
    try:
        out = mellow("train", "-o", str(run), "--resume", "--max-steps", "2", "--threads", "2")
    finally:
        torch.set_num_threads(before)
    assert out.returncode == 0, out.stderr
    assert "resuming with 2 threads where the run used 1" in out.stderr and "--threads 1 makes it so" in out.stderr


def train_cmd(task_data, smollm2_dir, out: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "mellow_cli", "train", str(task_data[0]), "--val", str(task_data[1]),
            "--init", "tiny", "--tokenizer", str(smollm2_dir), "-o", str(out), "--seed", "7", "-b", "2",
            "--lr", "1e-3", "--log-every", "1", "-q", *extra]


def quiet_env() -> dict:
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}


@pytest.mark.slow
def test_resume_after_sigkill_ends_with_identical_weights(task_data, smollm2_dir, tmp_path):
    args = ("--max-steps", "8", "--save-every", "3", "--eval-every", "4", "--workers", "1")
    env = quiet_env()
    whole = subprocess.run(train_cmd(task_data, smollm2_dir, tmp_path / "whole", *args), env=env,
                           capture_output=True, text=True, timeout=600)
    assert whole.returncode == 0, whole.stderr

    killed = tmp_path / "killed"
    proc = subprocess.Popen(train_cmd(task_data, smollm2_dir, killed, *args), env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 300
    while not (killed / "checkpoints" / "step-000003").is_dir():
        assert proc.poll() is None and time.monotonic() < deadline, "no checkpoint appeared"
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    assert proc.wait() == -signal.SIGKILL
    assert not (killed / "checkpoints" / "step-000008").exists()  # it really stopped part-way

    resumed = subprocess.run([sys.executable, "-m", "mellow_cli", "train", "-o", str(killed), "--resume", "-q"],
                             env=env, capture_output=True, text=True, timeout=600)
    assert resumed.returncode == 0, resumed.stderr
    a, b = (state_of(run / "checkpoints" / "step-000008") for run in (tmp_path / "whole", killed))
    assert a.keys() == b.keys()
    different = [k for k in a if not torch.equal(a[k], b[k])]
    assert different == []
    losses = [[(r["step"], r["loss"]) for r in metrics(run) if r["event"] == "train"] for run in (tmp_path / "whole", killed)]
    assert losses[0] == losses[1] and len(losses[0]) == 8  # the killed run's extra rows were dropped
    opt_a, opt_b = (torch.load(run / "checkpoints" / "step-000008" / "state.pt", weights_only=True)["optimizer"]
                    for run in (tmp_path / "whole", killed))
    assert all(torch.equal(opt_a["state"][i]["exp_avg_sq"], opt_b["state"][i]["exp_avg_sq"]) for i in opt_a["state"])


@pytest.mark.slow
def test_torchrun_two_processes_split_the_rows_and_agree(task_data, smollm2_dir, tmp_path):
    run = tmp_path / "ddp"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
           *train_cmd(task_data, smollm2_dir, run, "--max-steps", "5", "--save-every", "5", "--eval-every", "5",
                      "--workers", "0", "--trace-indices")[1:]]
    done = subprocess.run(cmd, env=quiet_env(), capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    traces = [[json.loads(x) for x in (run / f"trace-rank{r}.jsonl").read_text().splitlines()] for r in (0, 1)]
    steps = [{t["step"]: t["indices"] for t in trace if "step" in t} for trace in traces]
    assert sorted(steps[0]) == sorted(steps[1]) == [1, 2, 3, 4, 5]
    # 16 rows, 2 a batch per process: each epoch (4 steps) the processes read disjoint halves
    epoch0 = [sum((steps[r][s] for s in (1, 2, 3, 4)), []) for r in (0, 1)]
    assert sorted(epoch0[0] + epoch0[1]) == list(range(16))
    finals = [next(t["final_sha256"] for t in trace if "final_sha256" in t) for trace in traces]
    assert finals[0] == finals[1]
    # only rank 0 wrote: one metrics row per step, one checkpoint, and it holds the agreed weights
    assert [r["step"] for r in metrics(run) if r["event"] == "train"] == [1, 2, 3, 4, 5]
    trainer = json.loads((run / "checkpoints" / "step-000005" / "trainer.json").read_text())
    assert trainer["world_size"] == 2 and trainer["options"]["batch_size"] == 2
    net = Mellow.from_config(TINY, "meta")
    from mellow_cli.models.mellow.network import load_weights

    net = load_weights(net, state_of(run / "checkpoints" / "step-000005"))
    assert runs.weights_digest(net) == finals[0]


def test_options_survive_a_round_trip_through_trainer_json(tmp_path):
    opts = TrainOptions(data="rows.jsonl", out=str(tmp_path), freeze=("encoder",), lr=3e-4, max_steps=9)
    saved = json.loads(json.dumps(dataclasses.asdict(opts)))
    again = train.resumed_options(saved, TrainOptions(data=None, out=str(tmp_path), resume=True, max_steps=20))
    assert again.freeze == ("encoder",) and again.lr == 3e-4 and again.data == "rows.jsonl"
    assert again.max_steps == 20 and again.resume


def test_rng_states_round_trip_through_a_weights_only_load(tmp_path):
    import random

    import numpy as np

    runs.seed_everything(11)
    torch.save({"rng": [runs.rng_state()]}, tmp_path / "state.pt")
    expected = (random.random(), np.random.rand(), torch.rand(3))
    runs.seed_everything(99)  # anything else in between
    runs.set_rng_state(torch.load(tmp_path / "state.pt", weights_only=True)["rng"][0])
    again = (random.random(), np.random.rand(), torch.rand(3))
    assert again[:2] == expected[:2] and torch.equal(again[2], expected[2])


def test_fresh_encoder_is_fitted_to_the_training_audio(task_data):
    """--init: bn0 gets each mel band's mean and variance over the training clips, and c2l is
    rescaled so each frame-embedding channel has mean 0 and variance 1 over them, so the random
    encoder no longer sees raw decibels and its frames differ between clips."""
    from mellow_cli.train import data

    rows = data.read_rows(str(task_data[0]))
    dataset = data.QADataset(rows, TINY, seed=0)
    net = fresh_tiny(0).eval()
    base = net.audio_encoder.base
    wav = torch.stack([dataset[i]["wav1"] for i in range(len(dataset))])
    with torch.no_grad():
        before = base(wav)
        train.calibrate_encoder(net, dataset, clips=len(dataset))
        after = base(wav)
        mel = base.htsat.log_mel(wav)[:, 0]  # (clips, frames, bands)
    assert torch.allclose(base.htsat.bn0.running_mean, mel.mean(dim=(0, 1)), atol=1e-3)
    assert torch.allclose(base.htsat.bn0.running_var, mel.reshape(-1, mel.shape[-1]).var(dim=0), rtol=1e-3)
    frames = after[:, 1:].flatten(0, 1)  # each distinct frame repeated the same number of times
    assert torch.allclose(frames.mean(dim=0), torch.zeros(TINY.audio_dim), atol=1e-4)
    assert torch.allclose(frames.std(dim=0), torch.ones(TINY.audio_dim), atol=1e-2)
    spread = lambda x: (x.std(dim=0).mean() / x.std()).item()  # across clips, against the whole  # noqa: E731
    assert spread(after[:, 1:]) > 5 * spread(before[:, 1:])
    assert spread(after[:, 0]) > 3 * spread(before[:, 0])
