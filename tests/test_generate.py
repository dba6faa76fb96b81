"""Generation on a tiny random SmolLM2 (MellowConfig.tiny): the cached loop against the reference's
full-recompute loop, batching, stopping, streaming text, sampling, choice scoring and the
float16-weights option."""

from __future__ import annotations

import copy

import pytest
import torch

from mellow_cli.runtime.options import DecodingOptions
from mellow_cli.models.mellow.config import MellowConfig
from mellow_cli.runtime import precision
from mellow_cli.runtime.generate import (
    TextStream,
    decode_one_token,
    generate,
    generate_tokens,
    prefill,
    score_choices,
    stream,
)
from mellow_cli.models.weights import build_lm

CFG = MellowConfig.tiny()
NEVER = -1  # an eos id no token can match: generation runs to max_tokens


@pytest.fixture(scope="module")
def lm():
    torch.manual_seed(0)
    lm = build_lm(CFG)
    with torch.no_grad():
        # Default init gives a model that repeats one token (the tied head echoes the input
        # embedding). Larger weights make the layers matter: varied tokens, and top-1 margins of a
        # few hundredths, far above rounding differences between cached and full computation.
        lm.model.embed_tokens.weight.normal_(0.0, 1.0)
        for name, p in lm.named_parameters():
            if p.ndim == 2 and "embed" not in name:
                p.normal_(0.0, 0.2)
    return lm


@pytest.fixture(scope="module")
def tokenizer(smollm2_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(smollm2_dir)


def prefixes(batch: int, seed: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(batch, CFG.prefix_len, CFG.hidden_size, generator=g)


def run(lm, prefix, eos_id=NEVER, **options) -> torch.Tensor:
    steps = list(generate_tokens(lm, prefix, DecodingOptions(**options), eos_id=eos_id))
    return torch.stack(steps, dim=1)


@torch.inference_mode()
def reference_greedy(lm, prefix, max_tokens, eos_id=NEVER) -> torch.Tensor:
    """The reference's loop (wrapper.py `_generate_batch`): the whole sequence every step."""
    x, out = prefix, []
    for _ in range(max_tokens):
        token = lm(inputs_embeds=x, logits_to_keep=1).logits[:, -1].argmax(dim=-1)
        out.append(token)
        x = torch.cat([x, lm.model.embed_tokens(token[:, None])], dim=1)
        if (torch.stack(out, dim=1) == eos_id).any(dim=1).all():
            break
    return torch.stack(out, dim=1)


def test_cached_greedy_equals_full_recompute(lm):
    prefix = prefixes(2)
    ours = run(lm, prefix, max_tokens=24)
    assert torch.equal(ours, reference_greedy(lm, prefix, 24))
    assert len(set(ours[0].tolist())) > 3  # a real sequence, not one token repeated


def test_batch_of_different_prompts_equals_each_alone(lm, tokenizer):
    prefix = prefixes(3, seed=2)
    options = DecodingOptions(max_tokens=16)
    batch = run(lm, prefix, max_tokens=16)
    texts = generate(lm, tokenizer, prefix, options)
    for i in range(3):
        assert torch.equal(batch[i], run(lm, prefix[i : i + 1], max_tokens=16)[0])
        assert texts[i] == generate(lm, tokenizer, prefix[i : i + 1], options)[0]
    assert len(set(texts)) == 3


def test_max_tokens_respected(lm, tokenizer):
    prefix = prefixes(2)
    assert run(lm, prefix, max_tokens=7).shape == (2, 7)
    assert run(lm, prefix, max_tokens=1).shape == (2, 1)
    ids = run(lm, prefix, max_tokens=5)[0].tolist()
    text = generate(lm, tokenizer, prefix[:1], DecodingOptions(max_tokens=5), eos_id=NEVER)[0]
    assert text == tokenizer.decode(ids)


def test_eos_stops_and_cuts_text(lm, tokenizer):
    prefix = prefixes(2)
    free = run(lm, prefix, max_tokens=20)
    row0 = free[0].tolist()
    # pick a token row 0 emits at step 3 (and not before) as the stop token
    step = next(i for i in range(3, 20) if row0[i] not in row0[:i])
    eos = row0[step]
    one = run(lm, prefix[:1], eos_id=eos, max_tokens=20)
    assert one.shape[1] == step + 1  # a lone row stops right after its eos
    both = run(lm, prefix, eos_id=eos, max_tokens=20)
    row1_end = next((i for i, t in enumerate(free[1].tolist()) if t == eos), None)
    # the batch runs until every row is done (or max_tokens)
    assert both.shape[1] == (20 if row1_end is None else max(step, row1_end) + 1)
    texts = generate(lm, tokenizer, prefix, DecodingOptions(max_tokens=20), eos_id=eos)
    assert texts[0] == tokenizer.decode(row0[:step])
    assert texts[1] == tokenizer.decode(free[1].tolist()[:row1_end])


def test_streamed_pieces_join_to_the_final_text(lm, tokenizer):
    prefix = prefixes(2, seed=3)
    options = DecodingOptions(max_tokens=40)
    pieces = {0: [], 1: []}
    for row, piece in stream(lm, tokenizer, prefix, options, eos_id=NEVER):
        pieces[row].append(piece)
    ids = run(lm, prefix, max_tokens=40)
    for row in (0, 1):
        assert len(pieces[row]) > 1
        assert "".join(pieces[row]) == tokenizer.decode(ids[row].tolist())


def test_text_stream_never_splits_a_character(tokenizer):
    text = "a cat 🐈 meows, 鳥が鳴く, café ♪"
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    assert len(ids) > len(text.split())  # some characters take several byte tokens
    row = TextStream(tokenizer)
    pieces = [row.push(i) for i in ids] + [row.flush()]
    assert "".join(pieces) == text
    assert not any("\ufffd" in p for p in pieces)


def test_text_stream_drops_a_character_cut_at_the_end(tokenizer):
    ids = tokenizer("a cat 🐈", add_special_tokens=False)["input_ids"]
    whole = TextStream(tokenizer)
    assert "".join([whole.push(i) for i in ids] + [whole.flush()]) == "a cat 🐈"
    cut = ids[:-1]  # the answer stopped (max_tokens) inside the emoji's bytes
    assert tokenizer.decode(cut).endswith("\ufffd")
    row = TextStream(tokenizer)
    assert "".join([row.push(i) for i in cut] + [row.flush()]) == "a cat "


def test_same_seed_same_sample_different_seed_differs(lm):
    prefix = prefixes(2)
    hot = dict(sample=True, temperature=3.0, top_p=1.0, max_tokens=20)
    a = run(lm, prefix, seed=7, **hot)
    assert torch.equal(a, run(lm, prefix, seed=7, **hot))
    assert not torch.equal(a, run(lm, prefix, seed=8, **hot))
    assert not torch.equal(a, run(lm, prefix, max_tokens=20))  # really sampling, not greedy


def test_sampling_limits_reduce_to_greedy(lm):
    prefix = prefixes(2)
    greedy = run(lm, prefix, max_tokens=12)
    assert torch.equal(run(lm, prefix, sample=True, top_k=1, seed=1, max_tokens=12), greedy)
    assert torch.equal(run(lm, prefix, sample=True, top_p=1e-6, seed=1, max_tokens=12), greedy)


@torch.inference_mode()
def teacher_forced_logprob(lm, prefix_row, ids) -> float:
    embeds = lm.model.embed_tokens(torch.tensor([ids]))
    logits = lm(inputs_embeds=torch.cat([prefix_row[None], embeds], dim=1)).logits[0]
    logprobs = logits[CFG.prefix_len - 1 : -1].log_softmax(dim=-1)
    return float(logprobs.gather(-1, torch.tensor(ids)[:, None]).sum())


def test_score_choices_equals_teacher_forcing(lm, tokenizer):
    prefix = prefixes(2)
    choices = ["a dog barks", "rain", "a car passes by on a wet street"]
    scores = score_choices(lm, tokenizer, prefix, choices)
    for row in range(2):
        assert [s.text for s in scores[row]] == choices
        for s in scores[row]:
            ids = tokenizer(s.text, add_special_tokens=False)["input_ids"]
            expected = teacher_forced_logprob(lm, prefix[row], ids)
            assert s.tokens == len(ids)
            assert s.logprob == pytest.approx(expected, abs=1e-4)
            assert s.mean_logprob == pytest.approx(expected / len(ids), abs=1e-4)
    assert scores[0][0].logprob != scores[1][0].logprob  # each row uses its own prefix


def test_score_choices_per_row_and_eos(lm, tokenizer):
    prefix = prefixes(2)
    per_row = [["yes", "no"], ["one", "two", "three"]]
    scores = score_choices(lm, tokenizer, prefix, per_row, append_eos=True, eos_id=CFG.eos_token_id)
    assert [[s.text for s in row] for row in scores] == per_row
    ids = tokenizer("three", add_special_tokens=False)["input_ids"] + [CFG.eos_token_id]
    assert scores[1][2].logprob == pytest.approx(teacher_forced_logprob(lm, prefix[1], ids), abs=1e-4)
    assert scores[1][2].tokens == len(ids)



def test_many_long_choices_hold_logits_for_a_few_positions_at_a_time(lm, monkeypatch):
    """100 choices of up to 64 tokens: the logits over the vocabulary are made a bounded number
    of positions at a time (never choices x longest at once), and each score is still teacher
    forcing's."""
    from mellow_cli.runtime import generate as gen

    g = torch.Generator().manual_seed(5)
    ids = [torch.randint(1, CFG.vocab_size, (n,), generator=g).tolist() for n in [64] + [3, 9, 1, 17] * 24 + [2, 5, 40]]
    prefix = prefixes(2)
    row_of = torch.tensor([i % 2 for i in range(len(ids))])
    positions = []
    real_head = type(lm).head
    monkeypatch.setattr(type(lm), "head", lambda self, h, keep=0: positions.append(h.shape[0] * h.shape[1])
                        or real_head(self, h, keep))
    with torch.inference_mode():
        got = gen._choice_logprobs(lm, prefix, row_of, ids)
    assert len(positions) > 1 and max(positions) <= gen.POSITIONS_AT_ONCE
    for i in (0, 1, 3, 4, len(ids) - 1):
        expected = teacher_forced_logprob(lm, prefix[row_of[i]], ids[i])
        assert got[i].shape == (len(ids[i]),) and float(got[i].sum()) == pytest.approx(expected, abs=1e-4)

def prepared(lm, name: str):
    copy_ = copy.deepcopy(lm)
    precision.apply(copy_, precision.named(name, torch.device("cpu")))
    return copy_


def prefill_and_step(m, prefix, token=None):
    m.setup_cache(prefix.shape[0], prefix.shape[1] + 1)
    first = prefill(m, prefix)
    token = first.argmax(-1) if token is None else token
    return first, decode_one_token(m, token, prefix.shape[1]), token


@torch.inference_mode()
def test_float32_prepared_matrices_give_the_modules_logits(lm):
    """Fused q/k/v and gate/up (what every command runs) against the modules (what trains)."""
    fused = prepared(lm, "float32")
    assert fused.prepared and not lm.prepared
    assert fused.model.layers[0].self_attn.q_proj.weight.numel() == 0  # the fused matrix is the one copy
    prefix = prefixes(2)
    first, second, token = prefill_and_step(lm, prefix)
    first_f, second_f, _ = prefill_and_step(fused, prefix, token)
    # The same sums up to rounding order (oneDNN's packed kernel where the CPU has it): logits of
    # up to ~35 here agree to a few units in the sixth significant digit.
    assert torch.allclose(first, first_f, atol=1e-4) and torch.allclose(second, second_f, atol=1e-4)
    ids = [torch.stack(list(generate_tokens(m, prefix, DecodingOptions(max_tokens=12), eos_id=NEVER)), 1)
           for m in (lm, fused)]
    assert torch.equal(*ids)


@pytest.mark.parametrize("name, stored, tolerance", [
    ("float16", torch.float16, 1e-2), ("bfloat16", torch.bfloat16, 3e-2), ("int8", None, 5e-2)])
@torch.inference_mode()
def test_smaller_weights_stay_close_to_float32(lm, name, stored, tolerance):
    small = prepared(lm, name)
    gate_up = small.model.layers[0].mlp.gate_up
    floats = 2 * CFG.intermediate_size * CFG.hidden_size
    if stored is not None:
        assert gate_up.weight.dtype == stored and gate_up.nbytes == 2 * floats
    else:
        assert gate_up.nbytes == floats + 4 * 2 * CFG.intermediate_size  # a byte per weight, a scale per row
    assert small.model.embed_tokens.weight.dtype == torch.float32  # prefix and token embeddings exact
    prefix = prefixes(2)
    first, second, token = prefill_and_step(lm, prefix)
    first_s, second_s, _ = prefill_and_step(small, prefix, token)
    for full, approx in ((first, first_s), (second, second_s)):
        assert approx.dtype == torch.float32
        assert (approx - full).abs().max() < tolerance * full.abs().max()
        assert not torch.equal(approx, full)  # really computed differently


@pytest.mark.parametrize("temperature", [1e-40, 1e-300, 5e-324])
@pytest.mark.parametrize("top_p, top_k", [(1.0, 0), (0.8, 0), (1.0, 5)])
def test_a_tiny_temperature_samples_the_top_token(temperature, top_p, top_k):
    from mellow_cli.runtime.generate import next_token

    logits = torch.tensor([[1.0, 3.0, 2.0, -50.0], [0.5, -1.0, 0.25, 0.0]])
    opts = DecodingOptions(sample=True, temperature=temperature, top_p=top_p, top_k=top_k)
    token = next_token(logits, opts, torch.Generator().manual_seed(0))
    assert token.tolist() == [1, 0]


def test_non_finite_logits_are_one_line_and_never_a_token():
    from mellow_cli.errors import ModelError
    from mellow_cli.runtime.generate import next_token

    for sample in (False, True):
        with pytest.raises(ModelError, match="NaN or infinite"):
            next_token(torch.tensor([[0.0, float("nan")]]), DecodingOptions(sample=sample))
