"""The fast path answers as the exact path does, for every family: the default dtype (auto) and
int8 run the language model through the one-call C step (runtime/step.c, including
SmolLM2-360M's shapes: hidden 960, 15 heads, 5 key/value heads) and pick the same `--choices`
answer as float32 on at least 95% of 60 synthetic questions.

The language model is the real SmolLM2-135M (SmolLM2-360M's shapes with random weights for
samsone-356m); each family's encoder and projector are random. The clips are encoded once, in
float32, and every dtype's model reads those same audio tokens (from the model's clip cache), so
only the language model's arithmetic differs, and the encoders, most of the cost, run a third as
often."""

from __future__ import annotations

import shutil
from collections import OrderedDict

import numpy as np
import pytest
import torch

from mellow_cli.api import Model, Question
from mellow_cli.models.family import family
from mellow_cli.runtime import fused, precision
from mellow_cli.runtime.llama import LMConfig
from mellow_cli.runtime.options import DecodingOptions

CPU = torch.device("cpu")
ITEMS = 60
AGREE = 57  # 95% of ITEMS

# (question, choices) asked in turn about the synthetic clips
ASKED = [
    ("is there a sound?", ["yes", "no"]),
    ("which is it, louder or quieter than speech?", ["louder", "quieter"]),
    ("what instrument is playing?", ["piano", "violin", "drums", "flute"]),
    ("is this noise or a tone?", ["noise", "a tone"]),
    ("how many clicks are there?", ["one", "two", "three", "many"]),
    ("is the pitch high or low?", ["high", "low"]),
    ("what do you hear?", ["a dog barking", "rain", "a siren", "music"]),
    ("is it indoors or outdoors?", ["indoors", "outdoors"]),
    ("does the sound change over time?", ["yes", "no"]),
    ("what is the genre?", ["rock", "jazz", "classical", "electronic"]),
]


def clips(rate: int, n: int = ITEMS) -> list[np.ndarray]:
    """n different clips at `rate`: tones, noise and clicks of 1 to 10 s."""
    rng = np.random.default_rng(0)
    out = []
    for i in range(n):
        t = np.arange(int(rate * rng.uniform(1, 10))) / rate
        kind = i % 3
        if kind == 0:
            wave = rng.uniform(0.05, 0.5) * np.sin(2 * np.pi * rng.uniform(80, 6000) * t)
        elif kind == 1:
            wave = rng.uniform(0.01, 0.3) * rng.standard_normal(len(t))
        else:
            wave = np.zeros(len(t))
            wave[rng.integers(0, len(t), rng.integers(1, 12))] = rng.uniform(0.3, 0.9)
        out.append(wave.astype(np.float32))
    return out


def real_lm_state(smollm2_dir, tokenizer) -> dict:
    """SmolLM2-135M's weights, the table cut to the family's vocabulary (Samsone's is pruned)."""
    from safetensors.torch import load_file

    state = load_file(str(smollm2_dir / "lm.safetensors"))
    vocabulary = getattr(tokenizer, "vocabulary", None)
    if vocabulary is not None:
        state["model.embed_tokens.weight"] = state["model.embed_tokens.weight"][list(vocabulary.to_tokenizer)]
    state["lm_head.weight"] = state["model.embed_tokens.weight"]
    return state


def model(name: str, preset: str, dtype: str, smollm2_dir, real: bool) -> Model:
    """The family's `preset` network, seeded (so its encoder is the same in every dtype), its
    language model SmolLM2-135M's where `real`, prepared in `dtype` as load_model prepares it."""
    fam = family(name)
    cfg = fam.config(preset)
    torch.manual_seed(0)
    net = fam.build(cfg).eval()
    tokenizer = fam.tokenizer(smollm2_dir, cfg)
    if real:
        net.lm.load_state_dict(real_lm_state(smollm2_dir, tokenizer))
    chosen = precision.named(dtype, CPU)
    fam.prepare(net, CPU, chosen)
    precision.apply(net.lm, chosen)
    return Model(net, tokenizer, name=preset, precision=chosen)


def counted(lm) -> list[int]:
    """Every call of the model's one-call forward (the C step, or its bfloat16 layer passes for
    many tokens at once), noted by its number of tokens."""
    calls, inner = [], lm.fused.forward

    def forward(ids, row, *args, **kwargs):
        calls.append(len(row))
        return inner(ids, row, *args, **kwargs)

    lm.fused.forward = forward
    return calls


def picks(m: Model, batch: int = 10) -> list[str]:
    rate = m.family.sample_rate(m.cfg)
    questions = [Question(c, None, ASKED[i % len(ASKED)][0]) for i, c in enumerate(clips(rate))]
    choices = [ASKED[i % len(ASKED)][1] for i in range(ITEMS)]
    out = []
    for i in range(0, ITEMS, batch):
        out += [r.choice for r in m.choose_batch(questions[i:i + batch], choices[i:i + batch])]
    return out


def agreement(name: str, preset: str, smollm2_dir, real: bool) -> None:
    exact = model(name, preset, "float32", smollm2_dir, real)
    assert exact.net.lm.fused is None  # the reference: torch's float32 forward
    exact._clip_cache = ITEMS + 1  # every clip's tokens kept, for the other dtypes
    expected = picks(exact)
    heard = exact._clips
    assert len(heard) == ITEMS
    del exact
    assert len(set(expected)) > 2  # the questions do tell the answers apart
    for dtype in ("auto", "int8"):
        fast = model(name, preset, dtype, smollm2_dir, real)
        fast._clips, fast._clip_cache = OrderedDict(heard), ITEMS + 1
        if fast.precision.name == "float32":  # auto chose the exact path on this CPU: nothing to compare
            continue
        lm = fast.net.lm
        assert lm.fused is not None, fused.status()
        stored = torch.int8 if fast.precision.store == "int8" else precision.DTYPES[fast.precision.store]
        assert lm.fused.dims.kind == fused.KINDS[stored]  # step.c reads the matrices as stored
        calls = counted(lm)
        got = picks(fast)
        assert calls, "the choices never went through the one-call forward"
        same = sum(a == b for a, b in zip(expected, got))
        assert same >= AGREE, f"{preset} {fast.precision.describe()}: {same}/{ITEMS} picks as float32's"
        del calls[:]
        fast.ask(clips(fast.family.sample_rate(fast.cfg), 1)[0], "what is this?", options=DecodingOptions(max_tokens=4))
        assert 1 in calls  # the answer's decode steps, one token a call
        del fast, lm


@pytest.mark.slow
@pytest.mark.parametrize("name, preset", [("mellow", "v0"), ("tinymu", "tinymu"), ("samsone", "samsone-134m")])
def test_the_fast_path_picks_as_float32_with_smollm2(name, preset, smollm2_dir):
    agreement(name, preset, smollm2_dir, real=True)


@pytest.mark.slow
def test_the_fast_path_picks_as_float32_at_smollm2_360m_shapes(smollm2_dir):
    agreement("samsone", "samsone-356m", smollm2_dir, real=False)


@pytest.mark.parametrize("dtype", ["float16", "bfloat16", "int8"])
def test_the_c_step_is_float32_arithmetic_at_smollm2_360m_shapes(dtype):
    """Hidden 960, 15 heads of 64, 5 key/value heads, SmolLM2-360M's MLP (two layers of its 32)."""
    if shutil.which("cc") is None and shutil.which("gcc") is None:
        pytest.skip("no C compiler")
    lib = fused.library()
    assert lib is not None, fused.status()
    cfg = LMConfig(vocab_size=512, hidden_size=960, intermediate_size=2560, num_hidden_layers=2,
                   num_attention_heads=15, num_key_value_heads=5)
    generator = torch.Generator().manual_seed(0)
    prompt = torch.randn(2, 7, cfg.hidden_size, generator=generator)
    assert fused._error(lib, cfg, fused.random_state(cfg, generator), prompt, dtype, steps=4) < fused.BOUNDS[dtype]
