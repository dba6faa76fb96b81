"""mellow train --recipe official: the presets and the override rule, the authors' adaptive
clipping on a hand-computed case, HTSAT's train mode, --init pretrained from small stand-ins, and
an official-recipe run on official-format data that resumes bit-exact with Adam's state as theirs."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from test_cli_answers import mellow

from mellow_cli.train import recipe, tasks, loop as train
from mellow_cli.models.mellow.config import MellowConfig
from mellow_cli.errors import ModelError, UsageError
from mellow_cli.models.mellow.htsat import HTSAT
from mellow_cli.train.optim import AdaptiveClip
from mellow_cli.train.recipe import TrainOptions, options

TINY = MellowConfig.tiny()


pytestmark = pytest.mark.usefixtures("one_torch_thread")


# --- presets -----------------------------------------------------------------------------------


def test_mellow_preset_is_the_dataclass_defaults_and_official_is_theirs():
    assert options("mellow") == TrainOptions(data=None, out="")
    o = options("official")
    assert (o.optimizer, o.betas, o.lr, o.weight_decay) == ("adam", (0.9, 0.999), 1e-3, 1e-4)
    assert (o.schedule, o.min_lr_ratio, o.warmup_steps, o.clip, o.grad_clip) == ("epoch-cosine", 0.0, 0, "adaptive", 0.5)
    assert (o.freeze, o.encoder_mode, o.text, o.second_clip) == (("encoder",), "train", "official", "random")
    assert (o.batch_size, o.drop_last, o.max_answer_tokens, o.recipe) == (4, True, 250, "official")


def test_explicit_options_override_the_preset():
    o = options("official", lr=5e-4, batch_size=2, freeze=(), drop_last=False, text=None)
    assert (o.lr, o.batch_size, o.freeze, o.drop_last) == (5e-4, 2, (), False)
    assert (o.optimizer, o.text, o.weight_decay) == ("adam", "official", 1e-4)  # the rest stays the preset's
    with pytest.raises(UsageError, match="--recipe"):
        options("nanogpt")
    with pytest.raises(UsageError, match="--clip"):
        options("official", clip="sometimes")


def test_help_shows_both_presets():
    out = mellow("train", "--help")
    text = " ".join(out.stdout.split())
    for shown in ("[mellow: 0.0001; official: 0.001]", "[mellow: adamw; official: adam]",
                  "[mellow: 0.9,0.95; official: 0.9,0.999]", "[mellow: 8; official: 4]",
                  "[mellow: global; official: adaptive]", "[mellow: 256; official: 250]",
                  "[mellow: eval; official: train]", "[mellow: first; official: random]", "--data-root"):
        assert shown in text, shown


# --- adaptive clipping -------------------------------------------------------------------------


def test_adaptive_clipping_on_a_hand_computed_case():
    a, b, frozen = (torch.nn.Parameter(torch.zeros(n)) for n in (2, 1, 3))
    a.grad, b.grad = torch.tensor([3.0, 4.0]), torch.tensor([0.1])
    clip = AdaptiveClip(0.5)  # running norms start at (0.5, 5.0)
    total, scale = clip([("a", a), ("b", b), ("frozen", frozen)])
    # a: L2 5 > 2.5 x 0.5 -> scale 1.25 / 5; 5 enters the running norm capped at 1.25 x 2.5
    assert scale == pytest.approx(0.25) and total == pytest.approx(math.sqrt(25.01))
    assert clip.running["a"] == pytest.approx((0.995 * 0.5 + 0.005 * 3.125, 0.995 * 5 + 0.005 * 4))
    assert clip.running["b"] == pytest.approx((0.995 * 0.5 + 0.005 * 0.1, 0.995 * 5 + 0.005 * 0.1))
    assert "frozen" not in clip.running  # no gradient, no running norm
    torch.testing.assert_close(a.grad, torch.tensor([0.75, 1.0]))
    torch.testing.assert_close(b.grad, torch.tensor([0.025]))
    # the largest entry limits too: 30 > 2.5 x 10 x initial
    c = torch.nn.Parameter(torch.zeros(2))
    c.grad = torch.tensor([0.0, 30.0])
    clip = AdaptiveClip(4.0)
    assert clip([("c", c)])[1] == pytest.approx(min(10 / 30, 100 / 30))
    clip.load_state_dict(json.loads(json.dumps(clip.state_dict())))  # survives state.pt
    assert clip.running["c"] == pytest.approx((0.995 * 4 + 0.005 * 25, 0.995 * 40 + 0.005 * 30))


# --- HTSAT in train mode -----------------------------------------------------------------------


def test_htsat_train_mode_augments_and_eval_mode_does_not():
    torch.manual_seed(0)
    htsat = HTSAT(TINY)
    blocks = [b for stage in htsat.layers for b in stage.blocks]
    assert blocks[0].drop == 0 and blocks[-1].drop == pytest.approx(0.1)
    wav = 0.1 * torch.randn(2, TINY.clip_samples)
    with torch.no_grad():
        htsat.eval()
        first, again = htsat(wav)[1], htsat(wav)[1]
        assert torch.equal(first, again)
        stats = htsat.bn0.running_mean.clone()
        htsat.train()
        a, b = htsat(wav)[1], htsat(wav)[1]
    assert not torch.equal(a, b) and not torch.equal(a, first)  # SpecAugment and DropPath draw anew
    assert not torch.equal(htsat.bn0.running_mean, stats)  # bn0 learns batch statistics
    from mellow_cli.models.mellow.htsat import spec_augment

    torch.manual_seed(1)
    x = spec_augment(torch.ones(3, 1, 1001, 64))
    zero_frames = (x[:, 0] == 0).all(dim=2).sum(dim=1)  # per clip: at most 2 stripes of < 64 frames
    zero_bands = (x[:, 0] == 0).all(dim=1).sum(dim=1)
    assert (zero_frames <= 126).all() and (zero_bands <= 14).all() and (x == 0).any()


# --- --init pretrained -------------------------------------------------------------------------


def test_init_pretrained_loads_the_audioset_htsat_and_the_smollm2_base(smollm2_dir, tmp_path):
    torch.manual_seed(5)
    htsat = HTSAT(TINY)
    ckpt = tmp_path / "HTSAT_AudioSet_Saved_1.ckpt"
    torch.save({"state_dict": {f"sed_model.{k}": v for k, v in htsat.state_dict().items()}, "epoch": 3}, ckpt)
    opts = options("official", data=None, out=str(tmp_path / "run"), init="pretrained", encoder_weights=str(ckpt),
                   lm_weights=str(smollm2_dir / "lm.safetensors"), tokenizer=str(smollm2_dir))
    net, tokenizer, _ = train.build_model(opts, progress=False)
    assert tokenizer == smollm2_dir
    assert (net.cfg.embed_dim, net.cfg.depths, net.cfg.num_heads, net.cfg.num_classes) == (8, (2, 2, 2, 2), (1, 2, 2, 4), 16)
    assert net.cfg.hidden_size == 576 and net.audio_encoder.projection.linear1.weight.shape == (576, 64)
    for k, v in htsat.state_dict().items():
        assert torch.equal(net.audio_encoder.base.htsat.state_dict()[k], v), k
    lm = load_file(smollm2_dir / "lm.safetensors")
    assert all(torch.equal(net.lm.state_dict()[k], v) for k, v in lm.items())
    assert net.lm.lm_head.weight is net.lm.model.embed_tokens.weight
    w = net.audio_encoder.projection.linear2.weight  # Xavier-uniform: bound sqrt(6 / (576 + 576))
    assert w.abs().max() <= math.sqrt(6 / 1152) and w.abs().max() > 0.9 * math.sqrt(6 / 1152)
    # a checkpoint that is not the AudioSet HTSAT is one line naming it
    bad = tmp_path / "other.ckpt"
    torch.save({"state_dict": {"model.x": torch.zeros(1)}}, bad)
    with pytest.raises(ModelError, match="other.ckpt: no sed_model"):
        train.build_model(options("official", init="pretrained", encoder_weights=str(bad), out=""), progress=False)
    with pytest.raises(UsageError, match="--encoder-weights"):
        train.build_model(options("official", init="pretrained", out=""), progress=False)


# --- an official run ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def official_data(tmp_path_factory):
    """The synthetic tasks' clips in the official format, over two files in their own folder,
    Windows separators in half the paths, and the audio under a separate data root."""
    root = tmp_path_factory.mktemp("tasks")
    train_path, _ = tasks.make_tasks(root, rows=16, seed=0, val_rows=4)
    rows = [json.loads(x) for x in train_path.read_text().splitlines()]
    keywords = ["caption first audio", "explain the difference in few words", "Which One? emo_emo_emo", None]
    out = []
    for i, r in enumerate(rows):
        path = r["audio1"].replace("/", "\\") if i % 2 else r["audio1"]
        keyword = keywords[i % 4]
        out.append({"filepath1": path, "filepath2": r.get("audio2", ""), "caption1": f"A Sound, Answer {r['answer']}",
                    "caption2": "", "input": keyword or r["question"], "answer": r["answer"].title()})
    folder = root / "lists"
    folder.mkdir()
    (folder / "a.json").write_text(json.dumps(out[:10]))
    (folder / "b.json").write_text(json.dumps(out[10:]))
    return folder / "a.json", folder / "b.json", root


def official_args(official_data, smollm2_dir, out: Path, *extra: str) -> list[str]:
    a, b, root = official_data
    return ["train", str(a), str(b), "--data-root", str(root), "--recipe", "official", "--init", "tiny",
            "--tokenizer", str(smollm2_dir), "--workers", "0", "-o", str(out), "--seed", "4", "-q", *extra]


def test_official_run_resumes_bit_exact_with_theirs_optimizer_state(official_data, smollm2_dir, tmp_path):
    whole = tmp_path / "whole"
    # 16 rows, batch 4, drop_last: 4 steps an epoch, so 6 steps cross into epoch 2 (the cosine's second value)
    done = mellow(*official_args(official_data, smollm2_dir, whole, "--max-steps", "6", "--save-every", "3",
                                 "--log-every", "1"))
    assert done.returncode == 0, done.stderr
    last = whole / "checkpoints" / "step-000006"
    trainer = json.loads((last / "trainer.json").read_text())
    o = trainer["options"]
    assert (o["recipe"], o["optimizer"], o["lr"], o["betas"], o["weight_decay"], o["clip"]) == \
        ("official", "adam", 1e-3, [0.9, 0.999], 1e-4, "adaptive")
    assert trainer["position"] == {"epoch": 1, "batch": 2} and len(o["data"]) == 2
    state = torch.load(whole / "checkpoints" / "step-000003" / "state.pt", weights_only=True)
    (group,) = state["optimizer"]["param_groups"]  # torch's Adam, one group: L2 on every tensor
    assert (group["lr"], tuple(group["betas"]), group["weight_decay"]) == (1e-3, (0.9, 0.999), 1e-4)
    assert group["decoupled_weight_decay"] is False  # coupled L2, as torch.optim.Adam
    assert state["clip"] and all(len(v) == 2 for v in state["clip"].values())
    lrs = [r["lr"] for r in map(json.loads, (whole / "metrics.jsonl").read_text().splitlines()) if r["event"] == "train"]
    assert lrs == [1e-3] * 4 + [pytest.approx(0.5e-3)] * 2  # per-epoch cosine over 2 epochs, to 0
    # HTSAT frozen, yet its bn0 statistics moved (train mode); the mapper trained
    start, end = (load_file(whole / "checkpoints" / s / "model.safetensors") for s in ("step-000003", "step-000006"))
    htsat = "audio_encoder.base.htsat."
    assert torch.equal(start[htsat + "patch_embed.proj.weight"], end[htsat + "patch_embed.proj.weight"])
    assert not torch.equal(start[htsat + "bn0.running_mean"], end[htsat + "bn0.running_mean"])
    assert not torch.equal(start["audio_encoder.projection.linear1.weight"], end["audio_encoder.projection.linear1.weight"])

    # the same run stopped after step 3, resumed from there
    cut = tmp_path / "cut"
    shutil.copytree(whole, cut)
    shutil.rmtree(cut / "checkpoints" / "step-000006")
    resumed = mellow("train", "-o", str(cut), "--resume", "-q")
    assert resumed.returncode == 0, resumed.stderr
    a, b = (load_file(run / "checkpoints" / "step-000006" / "model.safetensors") for run in (whole, cut))
    assert [k for k in a if not torch.equal(a[k], b[k])] == []
    sa, sb = (torch.load(run / "checkpoints" / "step-000006" / "state.pt", weights_only=True) for run in (whole, cut))
    assert sa["clip"] == sb["clip"]
    assert all(torch.equal(sa["optimizer"]["state"][i]["exp_avg_sq"], sb["optimizer"]["state"][i]["exp_avg_sq"])
               for i in sa["optimizer"]["state"])


def test_official_flags_override_and_are_saved(official_data, smollm2_dir, tmp_path):
    run = tmp_path / "run"
    done = mellow(*official_args(official_data, smollm2_dir, run, "--max-steps", "1", "--lr", "5e-4", "-b", "2",
                                 "--second-clip", "first"))
    assert done.returncode == 0, done.stderr
    o = json.loads((run / "checkpoints" / "step-000001" / "trainer.json").read_text())["options"]
    assert (o["lr"], o["batch_size"], o["second_clip"], o["optimizer"], o["drop_last"]) == (5e-4, 2, "first", "adam", True)
    again = mellow("train", "-o", str(run), "--resume", "--recipe", "mellow", "--lr", "1e-3")
    assert again.returncode == 2 and "--lr" in again.stderr and again.stderr.count("\n") == 1
    tiny_batch = mellow(*official_args(official_data, smollm2_dir, tmp_path / "big", "--max-steps", "1", "-b", "64"))
    assert tiny_batch.returncode == 2 and "no full batch" in tiny_batch.stderr


def test_resume_keeps_an_old_run_s_options(tmp_path):
    """A trainer.json written before recipes existed resumes as the mellow recipe."""
    saved = {"data": "rows.jsonl", "out": str(tmp_path), "lr": 3e-4, "batch_size": 8}
    again = recipe.resumed_options(saved, options("mellow", out=str(tmp_path), resume=True))
    assert (again.recipe, again.optimizer, again.lr, again.data) == ("mellow", "adamw", 3e-4, "rows.jsonl")
