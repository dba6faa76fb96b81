"""The Mellow module: checkpoint layout, meta-device loading, pooling, tokenisation and sequence
layout (fast, tiny or meta); then parity with the reference's golden vectors (slow: real SmolLM2
weights and the golden audio-encoder weights)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file

from mellow_cli.runtime.options import DecodingOptions
from mellow_cli.models.mellow.config import MellowConfig
from mellow_cli.errors import ModelError
from mellow_cli.runtime.generate import generate_tokens, prefill
from mellow_cli.models.mellow.network import Mellow, load_weights, tokenize_prompts
from mellow_cli.models.weights import build_lm, key_report, load_lm

V0 = MellowConfig.v0()
TINY = MellowConfig.tiny()


@pytest.fixture(scope="module")
def tokenizer(smollm2_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(smollm2_dir)


@pytest.fixture(scope="module")
def tiny():
    torch.manual_seed(0)
    return Mellow.from_config(TINY, "cpu")


# --- layout and loading -------------------------------------------------------------------------


def test_v0_state_dict_matches_the_official_manifest(golden_dir):
    manifest = json.loads((golden_dir / "mellow_v0_state_dict_manifest.json").read_text())
    model = Mellow.from_config(V0, "meta")
    ours = {k: [list(t.shape), str(t.dtype).removeprefix("torch.")] for k, t in model.state_dict().items()}
    assert len(manifest) == 479
    assert sorted(set(ours) - set(manifest)) == []
    assert sorted(set(manifest) - set(ours)) == []
    assert ours == manifest


def test_v0_parameter_budget():
    model = Mellow.from_config(V0, "meta")
    assert model.lm.lm_head.weight is model.lm.model.embed_tokens.weight
    # The published 167,020,951 counts the reference's nn.Parameters (the tied head once). Its
    # torchlibrosa front end keeps the STFT kernels and mel matrix as frozen Parameters; ours
    # keeps them as buffers.
    frontend = sum(b.numel() for n, b in model.named_buffers() if "_extractor." in n)
    assert sum(p.numel() for p in model.parameters()) + frontend == 167_020_951


def test_lm_is_smollm2_135m():
    lm = Mellow.from_config(V0, "meta").lm
    c = lm.config
    assert (c.hidden_size, c.num_hidden_layers, c.num_attention_heads, c.num_key_value_heads) == (576, 30, 9, 3)
    assert c.rope_theta == 100000.0 and c.intermediate_size == 1536 and c.rms_norm_eps == 1e-5
    assert lm.lm_head.weight is lm.model.embed_tokens.weight  # tied, as SmolLM2
    # no pad token, as SmolLM2: `!` (the prompt padding) is an ordinary, trainable embedding row
    assert lm.model.embed_tokens.padding_idx is None


def official_style(model: Mellow) -> dict[str, torch.Tensor]:
    """A state dict as the published checkpoint stores it: `module.` prefix, separate head tensor."""
    sd = {f"module.{k}": v.clone() for k, v in model.state_dict().items()}
    assert sd["module.caption_decoder.lm.lm_head.weight"].data_ptr() != sd[
        "module.caption_decoder.lm.model.embed_tokens.weight"].data_ptr()
    return sd


def test_meta_build_then_assign_load_reproduces_the_model(tiny):
    wav = torch.randn(2, TINY.clip_samples)
    ids = torch.randint(0, TINY.vocab_size, (2, TINY.prompt_tokens))
    loaded = load_weights(Mellow.from_config(TINY, "meta"), official_style(tiny))
    assert not any(t.is_meta for t in [*loaded.parameters(), *loaded.buffers()])
    assert loaded.lm.lm_head.weight is loaded.lm.model.embed_tokens.weight  # still tied
    with torch.inference_mode():
        a, b = tiny.prefix(wav, wav.flip(0), ids), loaded.prefix(wav, wav.flip(0), ids)
        assert torch.equal(a, b)
        assert torch.equal(tiny.lm(inputs_embeds=a).logits, loaded.lm(inputs_embeds=b).logits)


def test_head_value_wins_when_checkpoint_stores_both(tiny):
    # the reference copies keys in order into a tied model: the head's tensor is the one used
    sd = official_style(tiny)
    sd["module.caption_decoder.lm.lm_head.weight"] += 1.0
    loaded = load_weights(Mellow.from_config(TINY, "meta"), sd)
    assert torch.equal(loaded.lm.model.embed_tokens.weight, sd["module.caption_decoder.lm.lm_head.weight"])


def test_bad_checkpoint_names_the_keys(tiny):
    sd = official_style(tiny)
    del sd["module.audio_encoder.projection.linear2.weight"]
    sd["module.extra.weight"] = torch.zeros(1)
    sd["module.audio_encoder.projection.linear1.weight"] = torch.zeros(3, 3)
    report = key_report(Mellow.from_config(TINY, "meta"), {k[7:]: v for k, v in sd.items()})
    assert report.missing == ["audio_encoder.projection.linear2.weight"]
    assert report.unexpected == ["extra.weight"]
    assert [m.split()[0] for m in report.mismatched] == ["audio_encoder.projection.linear1.weight"]
    with pytest.raises(ModelError, match="linear2.weight"):
        load_weights(Mellow.from_config(TINY, "meta"), sd)


def test_lm_alone_loads_without_head_key():
    torch.manual_seed(1)
    lm = build_lm(TINY)
    sd = {k: v.clone() for k, v in lm.state_dict().items() if k != "lm_head.weight"}
    loaded = load_lm(TINY, sd)
    assert loaded.lm_head.weight is loaded.model.embed_tokens.weight
    x = torch.randn(1, 5, TINY.hidden_size)
    with torch.inference_mode():
        assert torch.equal(lm(inputs_embeds=x).logits, loaded(inputs_embeds=x).logits)


# --- sequence ---------------------------------------------------------------------------------


def test_pool_matches_the_reference_avg_pool(tiny):
    frames = torch.randn(2, 1 + 1024, 16)
    expected = torch.cat([frames[:, :1], F.avg_pool2d(frames[:, 1:], kernel_size=(8, 1))], dim=1)
    pooled = tiny.pool(frames)
    assert pooled.shape == (2, TINY.audio_tokens, 16)
    torch.testing.assert_close(pooled, expected, rtol=0, atol=1e-6)


def test_prefix_layout(tiny):
    clip1, clip2 = torch.randn(2, 2, TINY.audio_tokens, TINY.hidden_size)
    ids = torch.randint(0, TINY.vocab_size, (2, TINY.prompt_tokens))
    with torch.inference_mode():
        prefix = tiny.embed_prefix(clip1, clip2, ids)
        sep = tiny.lm.model.embed_tokens.weight[TINY.sep_token_id]
        n = TINY.audio_tokens
        assert prefix.shape == (2, TINY.prefix_len, TINY.hidden_size)
        assert torch.equal(prefix[:, :n], clip1) and torch.equal(prefix[:, n + 1 : 2 * n + 1], clip2)
        assert torch.equal(prefix[:, n], sep.expand(2, -1))
        assert torch.equal(prefix[:, 2 * n + 1], sep.expand(2, -1))
        assert torch.equal(prefix[:, 2 * n + 2 :], tiny.lm.model.embed_tokens(ids))


def test_tokenize_reproduces_golden_input_ids(golden, tokenizer):
    prompts = []
    for row in golden["input_ids"]:
        ids = row.tolist()
        while ids and ids[-1] == V0.pad_token_id:
            ids.pop()
        prompts.append(tokenizer.decode(ids))
    assert prompts[0] == "what can you infer about the surroundings from the audio?"
    assert torch.equal(tokenize_prompts(tokenizer, prompts, V0), torch.from_numpy(golden["input_ids"]))


def test_tokenize_truncates_and_pads(tokenizer):
    ids = tokenize_prompts(tokenizer, ["word " * 300, "hi"], V0)
    assert ids.shape == (2, V0.prompt_tokens)
    assert ids[0].tolist() == tokenizer("word " * 300)["input_ids"][: V0.prompt_tokens]
    assert ids[1, 1:].eq(V0.pad_token_id).all()


# --- golden parity (real weights) ---------------------------------------------------------------


@pytest.fixture(scope="module")
def golden_model(golden_dir, smollm2_dir) -> Mellow:
    """v0 on meta, then the golden encoder weights (fp16 -> float32) and SmolLM2 assigned in."""
    enc = load_file(golden_dir / "mellow_v0_golden_audio_encoder.fp16.safetensors")
    sd = {k: (v.float() if v.is_floating_point() else v) for k, v in enc.items()}
    sd.update({f"caption_decoder.lm.{k}": v for k, v in load_file(smollm2_dir / "lm.safetensors").items()})
    return load_weights(Mellow.from_config(V0, "meta"), sd)


def golden_prefix_from_projection(model: Mellow, golden) -> torch.Tensor:
    clips = model.pool(torch.from_numpy(golden["projected_audio1"]))  # [wav1, wav2]
    return model.embed_prefix(clips, clips.flip(0), torch.from_numpy(golden["input_ids"]))


def max_diff(a: torch.Tensor, b) -> float:
    return (a - torch.as_tensor(b)).abs().max().item()


@pytest.mark.slow
@torch.inference_mode()
def test_golden_projection_and_prefix(golden_model, golden):
    projected = golden_model.audio_encoder.projection(torch.from_numpy(golden["embedding_audio1"]))
    assert max_diff(projected, golden["projected_audio1"]) < 1e-4
    assert max_diff(golden_prefix_from_projection(golden_model, golden), golden["prefix"]) < 1e-4


@pytest.mark.slow
@torch.inference_mode()
def test_golden_first_logits(golden_model, golden):
    prefix = torch.from_numpy(golden["prefix"])
    logits = first_logits(golden_model.lm, prefix)
    assert max_diff(logits, golden["first_logits"]) <= 1e-3
    assert torch.equal(logits.argmax(-1), torch.from_numpy(golden["first_logits"]).argmax(-1))


@pytest.mark.slow
@torch.inference_mode()
def test_golden_teacher_forced_top5(golden_model, golden):
    lm = golden_model.lm
    answer = torch.from_numpy(golden["teacher_answer_ids"])
    x = torch.cat([torch.from_numpy(golden["prefix"]), lm.model.embed_tokens(answer)], dim=1)
    # logits at the positions that predict the answer tokens: the last prefix position onwards
    logits = lm(inputs_embeds=x).logits[:, V0.prefix_len - 1 : -1]
    top = logits.topk(5, dim=-1)
    assert torch.equal(top.indices, torch.from_numpy(golden["teacher_top5_ids"]))
    assert max_diff(top.values, golden["teacher_top5_logits"]) <= 1e-3


def first_logits(lm, prefix):
    lm.setup_cache(prefix.shape[0], prefix.shape[1])
    return prefill(lm, prefix)


@pytest.mark.slow
def test_golden_greedy_ids(golden_model, golden):
    prefix = torch.from_numpy(golden["prefix"])
    steps = generate_tokens(golden_model.lm, prefix, DecodingOptions(max_tokens=40))
    assert torch.equal(torch.stack(list(steps), dim=1), torch.from_numpy(golden["greedy_ids"]))


@pytest.mark.slow
def test_golden_greedy_ids_with_the_matrices_prepared_in_float32(golden_model, golden):
    """--dtype float32 (fused q/k/v and gate/up) is still the exact path."""
    import copy

    from mellow_cli.runtime import precision

    lm = copy.deepcopy(golden_model.lm)
    precision.apply(lm, precision.EXACT)
    prefix = torch.from_numpy(golden["prefix"])
    with torch.inference_mode():
        assert max_diff(first_logits(lm, prefix), golden["first_logits"]) <= 1e-3
    steps = generate_tokens(lm, prefix, DecodingOptions(max_tokens=40))
    assert torch.equal(torch.stack(list(steps), dim=1), torch.from_numpy(golden["greedy_ids"]))


@pytest.mark.slow
@torch.inference_mode()
def test_golden_end_to_end_from_waveforms(golden_model, golden):
    wav = torch.from_numpy(np.stack([golden["wav1"], golden["wav2"]])).float()
    prefix = golden_model.prefix(wav, wav.flip(0), torch.from_numpy(golden["input_ids"]))
    assert max_diff(prefix, golden["prefix"]) < 1e-4
    logits = first_logits(golden_model.lm, prefix)
    assert max_diff(logits, golden["first_logits"]) <= 1e-3
    assert torch.equal(logits.argmax(-1), torch.from_numpy(golden["first_logits"]).argmax(-1))


@pytest.mark.slow
def test_real_weights_cached_greedy_equals_the_reference_loop(golden_model, tokenizer):
    """The golden greedy answer is all `!` (random encoder weights); this one is varied text."""
    texts = [
        " ".join(f"Day {i}: the dog barked at the mailman, and the cat slept in the sun." for i in range(1, 40)),
        "The history of Rome began in 753 BC, when, legend says, Romulus founded the city. " * 40,
    ]
    lm = golden_model.lm
    ids = torch.tensor([tokenizer(t)["input_ids"][: V0.prefix_len] for t in texts])
    with torch.inference_mode():
        x = lm.model.embed_tokens(ids)
    ours = torch.stack(list(generate_tokens(lm, x, DecodingOptions(max_tokens=20))), dim=1)
    reference = []
    with torch.inference_mode():  # the reference: the whole sequence again at every step
        for _ in range(20):
            reference.append(lm(inputs_embeds=x, logits_to_keep=1).logits[:, -1].argmax(dim=-1))
            x = torch.cat([x, lm.model.embed_tokens(reference[-1][:, None])], dim=1)
    assert torch.equal(ours, torch.stack(reference, dim=1))
    assert all(len(set(row.tolist())) > 5 for row in ours)


def test_meta_build_stays_off_torch_dynamo():
    """Building v0 on the meta device must not import torch._dynamo (1.3 s of start-up that
    meta-device init and constant buffers would otherwise cost every `mellow ask`)."""
    import subprocess
    import sys

    code = ("import sys, torch\nfrom mellow_cli.models.mellow.config import MellowConfig\nfrom mellow_cli.models.mellow.network import Mellow\n"
            "m = Mellow.from_config(MellowConfig.v0(), 'meta')\n"
            "assert m.lm.model.layers[0].mlp.up_proj.weight.is_meta\n"
            "print('torch._dynamo' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "False"
