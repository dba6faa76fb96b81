"""Our SmolLM2 module against transformers' LlamaForCausalLM: same keys, same logits."""

from __future__ import annotations

import pytest
import torch

from mellow_cli.models.mellow.config import MellowConfig
from mellow_cli.runtime.llama import LlamaForCausalLM, init_rotary, transformers_twin
from mellow_cli.runtime.tokenizer import Tokenizer

TINY = MellowConfig.tiny()


def test_same_keys_and_logits_as_transformers_on_random_weights():
    torch.manual_seed(0)
    ours = LlamaForCausalLM(TINY).eval()
    ref = transformers_twin(ours)
    assert type(ref).__module__.startswith("transformers.")
    assert ours.state_dict().keys() == ref.state_dict().keys()
    x = torch.randn(2, 40, TINY.hidden_size)
    with torch.no_grad():
        torch.testing.assert_close(ours(inputs_embeds=x).logits, ref(inputs_embeds=x).logits, atol=1e-5, rtol=1e-5)
        ids = torch.randint(0, TINY.vocab_size, (1, 7))
        torch.testing.assert_close(ours(input_ids=ids, logits_to_keep=1).logits, ref(input_ids=ids).logits[:, -1:],
                                   atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("keep", [1, 3])
def test_the_last_layer_computes_only_the_kept_positions_and_caches_every_one(keep):
    torch.manual_seed(1)
    lm = LlamaForCausalLM(TINY).eval()
    x = torch.randn(2, 9, TINY.hidden_size)
    rows = []  # positions through the last layer's MLP, per call
    lm.model.layers[-1].mlp.register_forward_hook(lambda module, args, out: rows.append(args[0].shape[1]))

    def run(logits_to_keep):
        lm.setup_cache(2, 16)
        first = lm(inputs_embeds=x[:, :5], start=0, logits_to_keep=logits_to_keep).logits  # a prefill
        later = lm(inputs_embeds=x[:, 5:], start=5, logits_to_keep=logits_to_keep).logits  # after a cached prefix
        caches = [layer.self_attn.kv_cache for layer in lm.model.layers]
        cached = [t.clone() for cache in caches for t in (cache.k, cache.v)]
        return first, later, cached

    with torch.no_grad():
        first, later, cached = run(0)
        assert rows == [5, 4]
        rows.clear()
        first_kept, later_kept, cached_kept = run(keep)
    assert rows == [keep, keep]
    torch.testing.assert_close(first_kept, first[:, -keep:], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(later_kept, later[:, -keep:], atol=1e-5, rtol=1e-5)
    for got, expected in zip(cached_kept, cached):
        assert torch.equal(got, expected)


def test_head_is_tied_to_the_embedding():
    lm = LlamaForCausalLM(TINY)
    assert lm.lm_head.weight is lm.model.embed_tokens.weight


def test_meta_build_then_rotary_init_matches_a_normal_build():
    normal = LlamaForCausalLM(TINY)
    with torch.device("meta"):
        empty = LlamaForCausalLM(TINY)
    empty.load_state_dict(normal.state_dict(), assign=True)
    init_rotary(empty)
    assert torch.equal(empty.model.rotary_emb.inv_freq, normal.model.rotary_emb.inv_freq)


@pytest.mark.slow
def test_real_smollm2_logits_match_transformers(smollm2_dir):
    from safetensors.torch import load_file

    cfg = MellowConfig.v0()
    weights = load_file(str(smollm2_dir / "lm.safetensors"))
    weights["lm_head.weight"] = weights["model.embed_tokens.weight"]
    ours = LlamaForCausalLM(cfg).eval()
    ours.load_state_dict(weights, strict=True)
    ref = transformers_twin(ours)
    tok = Tokenizer(smollm2_dir)
    ids = torch.tensor([tok.encode("The sound of rain on a tin roof is")])
    with torch.no_grad():
        a, b = ours(input_ids=ids).logits, ref(input_ids=ids).logits
    assert (a - b).abs().max() < 1e-3
    assert torch.equal(a.argmax(-1), b.argmax(-1))


@pytest.mark.slow
def test_tokenizer_matches_transformers(smollm2_dir):
    from transformers import AutoTokenizer

    ours, ref = Tokenizer(smollm2_dir), AutoTokenizer.from_pretrained(str(smollm2_dir))
    for text in ["caption the audio.", "a dog barks 3 times — 日本語 🐶", "<|endoftext|>x<|im_start|>", "  two  spaces "]:
        ids = ours(text)["input_ids"]
        assert ids == ref(text)["input_ids"]
        assert ours.decode(ids) == ref.decode(ids)
