"""The one-call decode step (model/step.c through model/fused.py): the arithmetic of the torch
step on the same rounded weights, used only where it applies, and torch's step wherever it cannot
be built or does not agree."""

import ctypes
import platform
import shutil
from dataclasses import replace

import pytest
import torch

from mellow_cli.runtime import matrices, precision
from mellow_cli.runtime.options import DecodingOptions
from mellow_cli.models.mellow.config import MellowConfig
from mellow_cli.runtime.generate import _choice_logprobs, generate_tokens
from mellow_cli.runtime import choices, fused, kernels, passes
from mellow_cli.runtime.llama import LlamaForCausalLM

needs_compiler = pytest.mark.skipif(shutil.which("cc") is None and shutil.which("gcc") is None,
                                    reason="no C compiler")
CFG = MellowConfig(vocab_size=120, hidden_size=96, intermediate_size=112, num_hidden_layers=3,
                   num_attention_heads=6, num_key_value_heads=2)


@pytest.fixture(autouse=True)
def fresh_library(monkeypatch):
    """Each test builds (or finds) the library in its own cache folder and checks it anew."""
    monkeypatch.setattr(fused, "_library", [])
    monkeypatch.setattr(passes, "_checked", [])


def random_state(cfg: MellowConfig, seed: int = 0) -> dict:
    return fused.random_state(cfg, torch.Generator().manual_seed(seed))


def prepared(name: str, state: dict, cfg: MellowConfig = CFG) -> LlamaForCausalLM:
    lm = LlamaForCausalLM(cfg)
    lm.load_state_dict(state)
    precision.apply(lm.eval(), precision.named(name, torch.device("cpu")))
    return lm


@needs_compiler
@pytest.mark.parametrize("name", ["float16", "bfloat16", "int8"])
def test_step_is_float32_arithmetic_on_the_rounded_weights(name):
    lib = fused.library()
    assert lib is not None, fused.status()
    prompt = torch.randn(1, 7, CFG.hidden_size, generator=torch.Generator().manual_seed(1))
    assert fused._error(lib, CFG, random_state(CFG), prompt, name, steps=6) < fused.BOUNDS[name]


@needs_compiler
@pytest.mark.skipif(platform.machine() not in ("x86_64", "AMD64"), reason="x86 instruction sets")
@pytest.mark.parametrize("march", ["haswell", "x86-64"])  # AVX2 with F16C, and the plain loops
@pytest.mark.parametrize("cc", ["cc", "clang"])  # clang before 15 has no _Float16 on x86
def test_builds_for_other_instruction_sets_agree_too(march, cc, tmp_path):
    compiler = shutil.which(cc) or (shutil.which("gcc") if cc == "cc" else None)
    if compiler is None:
        pytest.skip(f"no {cc} here")
    kernels.compile_step(compiler, tmp_path / f"step-{march}.so", march=march)
    lib = fused.load_library(tmp_path / f"step-{march}.so")
    prompt = torch.randn(2, 7, CFG.hidden_size, generator=torch.Generator().manual_seed(1))
    for name in ("float16", "bfloat16", "int8"):
        assert fused._error(lib, CFG, random_state(CFG), prompt, name, steps=4) < fused.BOUNDS[name]
    assert passes.attention_error(passes.Attend(lib)) < passes.ATTENTION_BOUND
    assert passes.prefill_error(lib) < passes.PREFILL_BOUND


@needs_compiler
def test_a_compiler_without_march_native_or_openmp_builds_the_step_for_one_thread(tmp_path, monkeypatch):
    """As Apple's clang: -march=native and -fopenmp refused. -mcpu=native and no OpenMP build a
    library that agrees, and `mellow env` says it runs on one thread."""
    gcc = shutil.which("cc") or shutil.which("gcc")
    seen = tmp_path / "commands"
    fake = tmp_path / "apple-cc"
    fake.write_text(f"""#!/bin/sh
echo "$@" >> {seen}
for a in "$@"; do
  case "$a" in
    -march=native) echo "clang: error: the clang compiler does not support '-march=native'" >&2; exit 1;;
    -fopenmp) echo "clang: error: unsupported option '-fopenmp'" >&2; exit 1;;
  esac
done
for a in "$@"; do [ "$a" = "-mcpu=native" ] && a="-march=native"; set -- "$@" "$a"; shift; done
exec {gcc} "$@"
""")
    fake.chmod(0o755)
    monkeypatch.setenv("CC", str(fake))
    lib = fused.library()
    assert lib is not None, fused.status()
    assert not lib.mellow_openmp() and "one thread, as the compiler has no OpenMP" in fused.status()
    tried = [line.split()[1:3] for line in seen.read_text().splitlines()]
    assert tried == [["-march=native", "-fopenmp"], ["-mcpu=native", "-fopenmp"], ["-march=native", "-shared"],
                     ["-mcpu=native", "-shared"]]
    prompt = torch.randn(2, 7, CFG.hidden_size, generator=torch.Generator().manual_seed(1))
    for name in ("float16", "int8"):
        assert fused._error(lib, CFG, random_state(CFG), prompt, name, steps=4) < fused.BOUNDS[name]
    assert passes.attention_error(passes.Attend(lib)) < passes.ATTENTION_BOUND


@needs_compiler
def test_prefill_attention_is_torchs_and_its_bfloat16_output_rounds_what_bfloat16_dots_give():
    lib = fused.library()
    assert lib is not None, fused.status()
    attend = passes.Attend(lib)
    assert passes.attention_error(attend) < passes.ATTENTION_BOUND
    from mellow_cli.runtime.llama import KVCache

    generator = torch.Generator().manual_seed(3)
    qk = torch.randn(3, 40, 12, 64, generator=generator)  # SmolLM2's heads: 9 for q, 3 for k
    cache = KVCache(3, 3, 50, 64, torch.float32, "cpu")
    cache.k.normal_(generator=generator)
    cache.v.normal_(generator=generator)
    exact = attend(qk, 9, cache, 5)
    assert exact.shape == (3, 40, 9 * 64)
    # With AVX512-BF16 the dot products take bfloat16 (passes.bfloat16_dots), else float32's.
    # The sums go in another order than torch's: a rare element rounds one bfloat16 step apart
    # (measured: 1 in 69,120 against bfloat16_dots; 54% of them differ from float32's rounded).
    expected = (passes.bfloat16_dots(qk, 9, cache, 5) if lib.mellow_attention_bf16_dots() else exact).bfloat16()
    got = attend(qk, 9, cache, 5, torch.bfloat16)
    assert float((got != expected).float().mean()) < 1e-3
    assert float((got.float() - expected.float()).abs().max()) <= 2**-8 * float(expected.float().abs().max())
    assert attend(qk.bfloat16(), 9, cache, 5) is None  # not a layout it reads: torch's runs


@needs_compiler
@pytest.mark.parametrize("intermediate", [112, 100])  # SwiGLU in whole 16-lane vectors, and with a tail
def test_a_bfloat16_prefill_runs_its_layers_in_c_and_matches_torchs_layers(intermediate):
    lib = fused.library()
    assert lib is not None, fused.status()
    assert passes.prefill_error(lib) < passes.PREFILL_BOUND
    cfg = replace(CFG, intermediate_size=intermediate)
    lm = prepared("bfloat16", random_state(cfg), cfg)
    layer_pass = lm.model.layers[0].prefill
    if not lib.mellow_attention_native():
        assert layer_pass is None
        pytest.skip("no 16-lane vectors here: torch's layers run")
    assert isinstance(layer_pass, passes.PrefillLayer)
    calls = []
    for layer in lm.model.layers:
        layer.prefill = lambda *args: calls.append(1) or layer_pass(*args)
    prompt = torch.randn(2, 9, CFG.hidden_size, generator=torch.Generator().manual_seed(4))
    with torch.inference_mode():
        lm.setup_cache(2, 12)
        got = lm(inputs_embeds=prompt, start=0).logits
        assert len(calls) == cfg.num_hidden_layers
        lm(input_ids=torch.tensor([[1], [2]]), start=9)  # a decode step: not a prefill
        assert len(calls) == cfg.num_hidden_layers
        for layer in lm.model.layers:  # torch's layers, with the attention the C layers take
            layer.prefill = None
            if lib.mellow_attention_bf16_dots():
                layer.self_attn.attend = passes.bfloat16_dots
        lm.setup_cache(2, 12)
        expected = lm(inputs_embeds=prompt, start=0).logits
    assert float((got - expected).abs().max() / expected.abs().max()) < passes.PREFILL_BOUND


@needs_compiler
@pytest.mark.parametrize("name", ["float16", "bfloat16", "float16+bfloat16"])  # step.c's attention, its layers too
def test_a_prefill_keeping_its_last_positions_gives_their_states_and_caches_every_one(name):
    lm = LlamaForCausalLM(CFG)
    lm.load_state_dict(random_state(CFG))
    store, _, prefill = name.partition("+")  # float16 weights with a bfloat16 copy, as auto on such a CPU
    precision.apply(lm.eval(), precision.Precision(name, store, store, prefill or store))
    prompt = torch.randn(1, 9, CFG.hidden_size, generator=torch.Generator().manual_seed(5))

    def run(keep):  # the hidden states: the head multiplies one position of a row in another dtype
        lm.setup_cache(1, 12)
        hidden = lm.hidden(inputs_embeds=prompt, start=0, keep=keep)
        return hidden, [t.clone() for layer in lm.model.layers for t in (layer.self_attn.kv_cache.k,
                                                                        layer.self_attn.kv_cache.v)]

    with torch.inference_mode():
        full, cache = run(0)
        for keep in (1, 3):  # one query sees every key; several need the causal mask's last rows
            kept, kept_cache = run(keep)
            # float16's last layer then multiplies one position as a decode step does, in float16
            # rather than widened to float32: the same values to float16's rounding. A bfloat16
            # prefill's stays on its bfloat16 products.
            # Without step.c's passes (a CPU whose vectors are not 16 lanes), torch's layers hand
            # the float16+bfloat16 copy's last layer one float32 position, which it multiplies as
            # a decode step does, in float16: the values then differ by bfloat16's rounding.
            native = bool(fused.library().mellow_attention_native())
            bound = 2e-3 if name == "float16" and keep == 1 else 1e-2 if keep == 1 and prefill and not native else 1e-6
            assert float((kept - full[:, -keep:]).abs().max()) <= bound * float(full.abs().max())
            assert all(torch.equal(a, b) for a, b in zip(kept_cache, cache))


@needs_compiler
def test_which_precisions_take_the_c_prefill():
    lib = fused.library()
    assert lib is not None, fused.status()
    native = bool(lib.mellow_attention_native())
    state = random_state(CFG)
    for name, attends, layers in (("float32", False, False), ("float16", native, False),
                                  ("int8", native, False), ("bfloat16", native, native)):
        layer = prepared(name, state).model.layers[1]
        assert (layer.self_attn.attend is not None, layer.prefill is not None) == (attends, layers), name


@needs_compiler
def test_a_library_whose_prefill_pass_is_wrong_is_refused(monkeypatch):
    built, _ = fused._build()

    class Broken:  # the real library but for SwiGLU, which writes zeros
        def __getattr__(self, name):
            return getattr(built, name)

        def mellow_swiglu(self, gate_up, out, n, inter, threads):
            ctypes.memset(out, 0, n * inter * 2)

        def mellow_attention_native(self):  # checked on every CPU, where the check would run
            return 1

    monkeypatch.setattr(fused, "_build", lambda: (Broken(), "one call into C (a broken one)"))
    assert fused.library() is not None  # the decode step does not use it
    assert passes.attention() is None
    assert "disagreed" in passes.prefill_status()
    layer = prepared("bfloat16", random_state(CFG)).model.layers[0]
    assert layer.prefill is None and layer.self_attn.attend is None


@needs_compiler
def test_a_step_that_does_nothing_is_refused_and_torch_steps_instead(monkeypatch):
    class Idle:
        def mellow_scratch_floats(self, *args):
            return 1 << 16

        def mellow_forward(self, *args):
            pass  # leaves the logits as torch.empty made them

    monkeypatch.setattr(fused, "_build", lambda: (Idle(), "one call into C (a fake)"))
    assert fused.library() is None
    assert "disagreed" in fused.status()
    assert prepared("float16", random_state(CFG)).fused is None


@needs_compiler
def test_generation_runs_the_fused_step_and_gives_the_rounded_float32_tokens():
    state = random_state(CFG, seed=3)
    lm = prepared("float16", state)
    assert lm.fused is not None
    calls = []

    class Counting:  # the same step, counted
        def __init__(self, inner):
            self.inner = inner

        def takes(self, *args):
            return self.inner.takes(*args)

        def __call__(self, token, pos):
            calls.append(pos)
            return self.inner(token, pos)

    lm.fused = Counting(lm.fused)
    prefix = torch.randn(1, 6, CFG.hidden_size, generator=torch.Generator().manual_seed(4))
    options = DecodingOptions(max_tokens=12)
    got = [int(t) for t in generate_tokens(lm, prefix, options, eos_id=-1)]
    assert calls == list(range(6, 6 + 11))  # every step after the prefill's first token

    lm.fused = None  # the torch step on the same prepared weights
    eager = [int(t) for t in generate_tokens(lm, prefix, options, eos_id=-1)]
    assert got == eager


@needs_compiler
def test_decode_steps_of_any_rows_take_the_fused_forward_and_the_exact_path_never():
    state = random_state(CFG)
    assert prepared("float32", state).fused is None  # the exact path stays torch's
    lm = prepared("int8", state)
    assert lm.fused is not None
    lm.setup_cache(2, 16)
    assert lm.fused.takes(torch.tensor([[1], [2]]), None, 5)  # a step of two rows
    assert not lm.fused.takes(torch.tensor([[1]]), None, 5)  # one token for a cache of two rows
    assert not lm.fused.takes(torch.tensor([[1, 2], [3, 4]]), None, 5)  # several positions: torch's
    assert not lm.fused.takes(None, torch.zeros(2, 1, CFG.hidden_size), 5)  # embeddings (a prefill)
    assert not lm.fused.takes(torch.tensor([[1], [2]]), None, 16)  # past the cache: never written out of it


@needs_compiler
def test_a_batch_decodes_the_same_tokens_fused_or_not():
    lm = prepared("float16", random_state(CFG, seed=5))
    prefix = torch.randn(3, 6, CFG.hidden_size, generator=torch.Generator().manual_seed(6))
    options = DecodingOptions(max_tokens=10)
    got = torch.stack(list(generate_tokens(lm, prefix, options, eos_id=-1)))
    lm.fused = None
    assert torch.equal(got, torch.stack(list(generate_tokens(lm, prefix, options, eos_id=-1))))


@needs_compiler
@pytest.mark.parametrize("name", ["float16", "int8"])
def test_choices_score_alike_fused_or_not_without_copying_the_cache(name, monkeypatch):
    lm = prepared(name, random_state(CFG, seed=7))
    prefix = torch.randn(2, 6, CFG.hidden_size, generator=torch.Generator().manual_seed(8))
    row_of = torch.tensor([0, 0, 0, 1, 1])
    ids = [[3, 4, 5], [6], [7, 8], [9, 10, 11, 12], [13, 14]]
    copies = []
    monkeypatch.setattr(type(lm), "select_cache_rows", lambda self, index: copies.append(index))
    got = _choice_logprobs(lm, prefix, row_of, ids)
    assert copies == []  # each choice read its row's prefix in place
    monkeypatch.undo()
    lm.fused = None
    expected = _choice_logprobs(lm, prefix, row_of, ids)
    for g, e, t in zip(got, expected, ids):
        assert g.shape == (len(t),)
        # torch's several-row products round the activations to half precision; step.c's keep
        # float32: the same choice wins, the log-probabilities agree to the third digit
        assert torch.allclose(g, e, atol=2e-2), (g, e)
    assert [int(torch.stack([g.sum() for g in got[:3]]).argmax())] == [int(torch.stack([e.sum() for e in expected[:3]]).argmax())]



@needs_compiler
def test_choices_of_many_tokens_go_a_few_at_a_time_and_score_as_all_at_once(monkeypatch):
    """Logits over the vocabulary for at most CHOICE_TOKENS_AT_ONCE tokens a call, each group of
    choices reusing the slots of the one before: the numbers of one call for all (step.c's sums
    over a weight row differ in the last bits with the tokens beside them; a wrong slot or a
    choice seeing another's tokens moves them by far more)."""
    lm = prepared("int8", random_state(CFG, seed=12))
    assert lm.fused is not None, fused.status()
    prefix = torch.randn(2, 6, CFG.hidden_size, generator=torch.Generator().manual_seed(13))
    generator = torch.Generator().manual_seed(14)
    ids = [torch.randint(0, CFG.vocab_size, (n,), generator=generator).tolist() for n in [5, 1, 9, 2, 12, 7] * 4]
    row_of = torch.tensor([i % 2 for i in range(len(ids))])
    whole = _choice_logprobs(lm, prefix, row_of, ids)
    calls = []
    real_forward = fused.FusedStep.forward
    monkeypatch.setattr(fused.FusedStep, "forward", lambda self, ids, *a, **k: calls.append(len(ids)) or real_forward(self, ids, *a, **k))
    monkeypatch.setattr(choices, "CHOICE_TOKENS_AT_ONCE", 12)
    monkeypatch.setattr(choices.choice_chunks, "__defaults__", (12,))
    parts = _choice_logprobs(lm, prefix, row_of, ids)
    assert len(calls) > 1 and max(calls) <= 12 and sum(calls) == sum(len(t) - 1 for t in ids)
    assert lm.fused.slots_needed(row_of.tolist(), ids) <= 12
    assert all(torch.allclose(w, p, rtol=0, atol=1e-4) for w, p in zip(whole, parts))

@needs_compiler
def test_many_choice_tokens_go_through_the_bfloat16_layers_and_score_as_torchs_layers(monkeypatch):
    lm = prepared("bfloat16", random_state(CFG, seed=9))
    assert lm.fused is not None, fused.status()
    if lm.model.layers[0].prefill is None:
        pytest.skip("no 16-lane vectors here: the C step scores every choice")
    prefix = torch.randn(3, 6, CFG.hidden_size, generator=torch.Generator().manual_seed(10))
    generator = torch.Generator().manual_seed(11)
    ids = [torch.randint(0, CFG.vocab_size, (n,), generator=generator).tolist() for n in (5, 1, 7, 3, 9, 6, 4, 8)]
    row_of = torch.tensor([0, 0, 0, 1, 1, 2, 2, 2])
    assert sum(len(t) - 1 for t in ids) >= fused.PRODUCTS_FROM
    layer_passes, copies = [], []
    real_tokens = passes.PrefillLayer.tokens
    monkeypatch.setattr(passes.PrefillLayer, "tokens", lambda *a: layer_passes.append(1) or real_tokens(*a))
    monkeypatch.setattr(type(lm), "select_cache_rows", lambda self, index: copies.append(index))
    got = _choice_logprobs(lm, prefix, row_of, ids)
    assert len(layer_passes) == CFG.num_hidden_layers and copies == []
    monkeypatch.undo()
    lm.fused = None  # torch's layers, each choice on a copy of its row's cache
    dots = passes.bfloat16_dots if fused.library().mellow_attention_bf16_dots() else None
    for layer in lm.model.layers:  # with the attention the C layers take
        layer.prefill, layer.self_attn.attend = None, dots
    expected = _choice_logprobs(lm, prefix, row_of, ids)
    for g, e, t in zip(got, expected, ids):
        assert g.shape == (len(t),)
        assert torch.allclose(g, e, atol=1e-2), (g, e)


def test_env_says_what_a_prefill_runs_on(monkeypatch):
    from mellow_cli.cli import env as cli_env

    said = cli_env.report()["prefill"]
    lib = fused.library()
    assert said.startswith("step.c's" if lib is not None and lib.mellow_attention_native() else "torch's"), said
    monkeypatch.setattr(fused, "_library", [])
    monkeypatch.setattr(passes, "_checked", [])
    monkeypatch.setenv("MELLOW_FUSED_STEP", "0")
    assert cli_env.report()["prefill"] == "torch's (MELLOW_FUSED_STEP=0)"


def test_switched_off_or_without_a_compiler_torch_steps(monkeypatch):
    monkeypatch.setenv("MELLOW_FUSED_STEP", "0")
    assert fused.library() is None and "MELLOW_FUSED_STEP=0" in fused.status()
    assert prepared("float16", random_state(CFG)).fused is None

    monkeypatch.setattr(fused, "_library", [])
    monkeypatch.delenv("MELLOW_FUSED_STEP")
    monkeypatch.setenv("CC", "/no/such/compiler")
    monkeypatch.setattr(shutil, "which", lambda name: None)
    assert fused.library() is None and "no C compiler" in fused.status()


def test_a_compiler_that_fails_is_reported_in_one_line(monkeypatch, tmp_path):
    failing = tmp_path / "cc"
    failing.write_text("#!/bin/sh\necho 'cc: error: unsupported option' >&2\nexit 1\n")
    failing.chmod(0o755)
    monkeypatch.setenv("CC", str(failing))
    assert fused.library() is None
    assert "could not build" in fused.status() and "unsupported option" in fused.status()
    assert "\n" not in fused.status()


@needs_compiler
def test_decode_seconds_times_the_matrices_step_c_reads_and_declines_the_others():
    calls = []

    def timer(fn):
        fn()
        calls.append(fn)
        return 0.002 if len(calls) % 2 else 0.001  # with the head, then without

    def stack(make):
        g = torch.Generator().manual_seed(0)
        w = lambda r, c: torch.randn(r, c, generator=g) * 0.02  # noqa: E731
        return [(make(w(64 + 2 * 32, 64)), make(w(64, 64)), make(w(2 * 80, 64)), make(w(64, 80))) for _ in range(2)], \
            make(w(120, 64))

    half = matrices.maker(precision.Precision("float16", "float16", "float16", "float32"))
    layers, head = stack(half)
    # two timed layers stand for six; the head (0.002 - 0.001) counts once
    assert fused.decode_seconds(layers, head, 4, 2, 6, 10, timer) == pytest.approx(0.001 * 3 + 0.001)
    assert len(calls) == 2
    layers, head = stack(matrices.Int8Matrix)
    assert fused.decode_seconds(layers, head, 4, 2, 6, 10, timer) is not None
    layers, head = stack(matrices.maker(precision.EXACT))
    assert fused.decode_seconds(layers, head, 4, 2, 6, 10, timer) is None  # oneDNN-packed float32
