"""`mellow bench speed` through the CLI with the tiny model: every figure present, positive and
finite, the ratio consistent with the two rates, the baseline optional, errors one line. Nothing
here asserts a wall-clock figure: other processes can slow any run, so only the relations between
figures measured in one run are stable enough to check."""

from __future__ import annotations

import dataclasses
import json
import re
import math

import pytest
import torch
from test_cli_answers import mellow

from mellow_cli.bench import speed
from mellow_cli.runtime import fused

FIELDS = {
    "model", "revision", "device", "dtype", "decode_step", "threads", "torch_version", "tokens", "repeat", "batch_size",
    "fetched_first", "load_first_s", "load_cached_s", "encoder_ms_per_clip", "encoder_ms_per_clip_batched",
    "time_to_first_token_s", "prefill_ms", "decode_tok_s", "decode_gb_s", "captions_per_s",
    "peak_rss_one_question_mb", "peak_rss_mb", "baseline", "baseline_prefill_ms", "baseline_decode_tok_s", "decode_ratio", "peak_rss_with_baseline_mb",
    "agreement_prompts", "same_greedy", "same_choice", "max_logit_diff",
}
BASELINE = {"baseline_prefill_ms", "baseline_decode_tok_s", "decode_ratio", "peak_rss_with_baseline_mb"}
MEASURES = {"load_first_s", "load_cached_s", "encoder_ms_per_clip", "encoder_ms_per_clip_batched",
            "time_to_first_token_s", "prefill_ms", "decode_tok_s", "decode_gb_s", "captions_per_s",
            "peak_rss_one_question_mb", "peak_rss_mb"}
QUICK = ("--tokens", "4", "--repeat", "1", "--batch-size", "2")


def bench(model_dir, *args: str):
    return mellow("bench", "speed", "--model", str(model_dir), *QUICK, *args)


@pytest.fixture(scope="module")
def measured(tiny_model_dir) -> dict:
    out = bench(tiny_model_dir, "--json", "--prompts", "2")
    assert out.returncode == 0, out.stderr
    assert "Traceback" not in out.stderr
    return json.loads(out.stdout)


def positive(value) -> bool:
    return isinstance(value, (int, float)) and math.isfinite(value) and value > 0


def test_json_has_every_field_and_only_them(measured):
    assert set(measured) == FIELDS
    assert FIELDS == {f.name for f in dataclasses.fields(speed.SpeedReport)}  # the schema is this list


def test_every_figure_is_positive_and_finite(measured):
    bad = {k: measured[k] for k in MEASURES | BASELINE if not positive(measured[k])}
    assert not bad, bad
    assert measured["tokens"] == 4 and measured["repeat"] == 1 and measured["batch_size"] == 2
    assert measured["device"] == "cpu" and measured["dtype"]  # auto: what this CPU runs fastest
    assert measured["threads"] >= 1 and measured["fetched_first"] is False  # a folder is used in place
    assert measured["baseline"].startswith("transformers ")


def test_ratio_is_ours_over_transformers(measured):
    assert measured["decode_ratio"] == pytest.approx(measured["decode_tok_s"] / measured["baseline_decode_tok_s"])
    # a peak only grows
    assert measured["peak_rss_with_baseline_mb"] >= measured["peak_rss_mb"] >= measured["peak_rss_one_question_mb"]


def test_agreement_with_float32_is_reported_unless_float32_ran(measured, tiny_model_dir):
    if measured["dtype"] != "float32":  # auto chose a half precision on this CPU
        assert measured["agreement_prompts"] == 2
        for key in ("same_greedy", "same_choice"):
            assert 0 <= measured[key] <= 1
        assert measured["max_logit_diff"] > 0  # really computed differently
    out = bench(tiny_model_dir, "--json", "--skip-baseline", "-q", "--dtype", "float32")
    exact = json.loads(out.stdout)
    assert exact["dtype"] == "float32" and exact["agreement_prompts"] == 0 and exact["same_greedy"] is None
    assert exact["decode_step"] == "torch"  # the exact path never runs step.c


def test_int8_agrees_with_float32_on_the_tiny_model(tiny_model_dir):
    out = bench(tiny_model_dir, "--json", "--skip-baseline", "-q", "--dtype", "int8", "--prompts", "2")
    report = json.loads(out.stdout)
    assert report["dtype"].startswith("int8") and report["agreement_prompts"] == 2
    assert report["decode_step"] == ("c" if fused.library() is not None else "torch")
    assert 0 < report["max_logit_diff"] < 1 and report["same_choice"] == 1.0


def test_skip_baseline_leaves_the_baseline_out(tiny_model_dir):
    out = bench(tiny_model_dir, "--json", "--skip-baseline", "-q")
    assert out.returncode == 0, out.stderr
    assert out.stderr == ""  # -q: nothing but the result
    report = json.loads(out.stdout)
    assert {k for k in BASELINE | {"baseline"} if report[k] is not None} == set()
    assert all(positive(report[k]) for k in MEASURES)


def test_table_names_each_measure(tiny_model_dir):
    out = bench(tiny_model_dir)
    assert out.returncode == 0, out.stderr
    for measure in ("load, first", "load, cached", "encoder, 1 clip", "encoder, batch of 2", "time to first token",
                    "decode, mellow", "decode, transformers", "decode ratio", "captions, batch of 2",
                    "peak RSS, one question", "peak RSS",
                    "page cache"):
        assert measure in out.stdout, measure
    assert "tok/s" in out.stdout and "clips/s" in out.stdout
    assert out.stdout.count("{") == 0  # a table, not JSON
    assert "loading" in out.stderr  # progress notes go to stderr


def test_bad_model_is_one_line_error(tmp_path):
    out = bench(tmp_path / "no such model")
    assert out.returncode == 1
    assert out.stdout == ""
    lines = out.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("mellow: error: ") and "no such model" in lines[0]


def test_the_race_is_fair_same_prefix_same_tokens(tiny_model_dir):
    """Both loops decode exactly the tokens asked for, over the same prefix, and agree on them:
    the baseline is the same computation, not a different one."""
    from mellow_cli.api import load_model
    model = load_model(str(tiny_model_dir), device="cpu", dtype="float32", progress=False)
    clip = speed.synth_clips(1, model.cfg.clip_samples, model.cfg.sample_rate, seed=3)[0]
    prefix = model.prefix([(clip, None, speed.QUESTION)])
    ours = speed.ours(model.net.lm, prefix, 6)
    theirs = speed.hf_generate(speed.baseline_lm(str(tiny_model_dir), prefix.embeds.device), prefix.embeds, 6)
    assert ours.ids.shape == theirs.ids.shape == (1, 6)
    eos = model.cfg.eos_token_id  # transformers is kept from choosing it (min_new_tokens); ours is not
    assert eos in ours.ids or torch.equal(ours.ids, theirs.ids)
    assert positive(ours.step_s) and positive(theirs.step_s) and positive(theirs.first_token_s)


def test_every_call_gets_new_clips():
    """The encoder, first-token and caption figures never come from the model's clip cache."""
    from types import SimpleNamespace

    from mellow_cli.models.mellow.config import MellowConfig

    from mellow_cli.models.family import family_of

    cfg = MellowConfig.tiny()
    take = speed.clip_maker(SimpleNamespace(cfg=cfg, family=family_of(cfg)))
    first, second = take(2), take(1)
    clips = [*first, *second]
    assert all(c.shape == (cfg.clip_samples,) and c.dtype.name == "float32" for c in clips)
    assert len({c.tobytes() for c in clips}) == 3


# --- the steps, counted first, and the time the rest takes -------------------------------------


def test_quick_runs_each_figure_once_and_says_each_step_out_of_the_whole(tiny_model_dir):
    out = mellow("bench", "speed", "--model", str(tiny_model_dir), "--quick", "--tokens", "4", "--json", "--skip-baseline")
    assert out.returncode == 0, out.stderr
    got = json.loads(out.stdout)
    assert (got["tokens"], got["repeat"], got["batch_size"]) == (4, 1, 2)  # --tokens given beside --quick wins
    assert got["agreement_prompts"] in (0, 2)  # 2 unless auto chose float32 here
    said = [line.removeprefix("mellow: ") for line in out.stderr.splitlines()]
    total = int(said[0].split()[0])
    assert said[0].startswith(f"{total} steps: loading the model twice; encoder, one clip;")
    numbered = [line for line in said if line.startswith("step ")]
    if got["agreement_prompts"] == 0:  # the plan shrank by the agreement step, and said so
        total -= 1
        assert any(line.startswith(f"{total} steps: auto chose float32") for line in said)
    assert [line.split()[1] for line in numbered] == [f"{i}/{total}:" for i in range(1, total + 1)]
    assert all("left)" not in line for line in numbered[:3])  # nothing is estimated before the first figures
    assert all(line.endswith(" left)") and "(about " in line for line in numbered[3:])
    assert said[-1].startswith("done in ")


def test_the_estimate_is_the_sum_of_the_steps_left():
    from mellow_cli.bench import speed_plan as plan

    sizes = plan.Sizes(tokens=10, repeat=2, batch_size=4, prompts=3, baseline=True)
    lines = []
    progress = plan.Progress(sizes, agreement=True, log=lines.append, clock=iter([0.0, 80.0]).__next__)
    assert lines == ["8 steps: loading the model twice; encoder, one clip; time to first token; encoder, batch of 4; "
                     "captions, batch of 4; importing transformers for the baseline (float32); decode, 10 tokens, "
                     "2 runs each, racing transformers; agreement with float32 over 3 clips"]
    progress.start(plan.LOAD)
    assert lines[-1] == "step 1/8: loading the model twice"
    figures = plan.Figures(load=1.0, clip=0.5, first_token=2.0, step=0.1)
    progress.know(figures)
    progress.start(plan.CAPTIONS)
    # captions 3 x (4 x 0.5 + 2 + 2 x 10 x 0.1) = 18; baseline 2 + 3 = 5; decode 2 x 3 x 3 = 18;
    # agreement 1 + 3 x 2 x (3 + 2) = 31: 72 s
    assert lines[-1] == "step 5/8: captions, batch of 4 (about 72 s left)"
    progress.skip(plan.AGREEMENT, "float32 needs no agreement")
    progress.start(plan.DECODE)
    assert lines[-2:] == ["7 steps: float32 needs no agreement", "step 7/7: decode, 10 tokens, 2 runs each, racing transformers (about 18 s left)"]
    progress.done()
    assert lines[-1] == "done in 80 s" and plan.duration(4000) == "1 h 7 min" and plan.duration(600) == "10 min"


def test_several_models_side_by_side(tiny_model_dir, family_model_dir):
    """`--model a,b`: each model measured in turn, one table with a column per model and each
    decode's ratio to the first's; --json gives every model's report."""
    tinymu = family_model_dir("tinymu")
    models = f"{tiny_model_dir},{tinymu}"
    out = mellow("bench", "speed", "--model", models, *QUICK, "--skip-baseline", "--prompts", "0", "--json")
    assert out.returncode == 0, out.stderr
    reports = json.loads(out.stdout)["models"]
    assert [r["model"] for r in reports] == [str(tiny_model_dir), str(tinymu)]
    assert all(positive(r["decode_tok_s"]) for r in reports)

    out = mellow("bench", "speed", "--model", models, *QUICK, "--skip-baseline", "--prompts", "0")
    assert out.returncode == 0, out.stderr
    header = next(line for line in out.stdout.splitlines() if line.strip().startswith("measure"))
    assert header.index(tiny_model_dir.name) < header.index(tinymu.name) < header.index("how")
    ratio = next(line for line in out.stdout.splitlines() if line.strip().startswith("decode vs"))
    ratios = [cell for cell in ratio.split() if re.fullmatch(r"\d+\.\d\dx", cell)]
    assert len(ratios) == 2 and ratios[0] == "1.00x"  # the first model against itself, then the second
