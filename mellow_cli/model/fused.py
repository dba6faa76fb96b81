"""The language model's forward in C (step.c), built on this machine: over a few new tokens as
one call (decode steps, one token in every row of the cache, and answer choices after a
prefill), and, between torch's products, over many (a prefill's attention and elementwise work).

A decode step in eager torch is ~25 small operations per layer of a few microseconds each around
the matrix-vector products; at 135M parameters that overhead is a third of the step. step.c does
the same arithmetic as llama.py's forward in one call, reading the prepared matrices (float16,
bfloat16 or int8 weights; float32 activations, sums and KV cache) where `prepare` put them, and
writing keys and values into the same cache the torch prefill filled. Choices go to slots of
their own after their row's prefix, so the prefix's cache is shared instead of copied per
choice. float32 (the exact path) never uses it.

Prefills (and the many tokens of a batch's choices) are bound by arithmetic, where oneDNN's
products are the fast ones: step.c does the rest of such a layer. `Attend` is its attention
for many queries (any precision but float32), `PrefillLayer` the passes between a layer's
bfloat16 products (norms, rotary and the cache, attention, SwiGLU, residual sums), replacing
~20 torch operations that were two fifths of a prefill.

It is compiled once per machine with the system's C compiler for the CPU it runs on
(`-march=native`), and kept in the cache beside the models, keyed by the source and the CPU. No
compiler, a failed build, or a build that disagrees with float32 arithmetic on a small random
model: torch's forward is used, as everywhere else, and `mellow env` says which runs.
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import shutil
import subprocess
import tempfile
from pathlib import Path

import torch

SOURCE = Path(__file__).with_name("step.c")
PER_LAYER = 12  # pointers per layer, step.c's enum
# How far the step's logits may be from float32 arithmetic on the same rounded weights, relative to
# the largest logit: float32 sums in another order differ in the last bits; int8 also rounds the
# activations to 16 bits (step.c), about 1e-4 on a small random model, while rounding the
# weights to 8 bits moves logits by 1e-2. A wrong index or a lost term moves them by far more.
BOUNDS = {"float16": 1e-5, "bfloat16": 1e-5, "int8": 1e-3}
ATTENTION_BOUND = 1e-5  # the same for attention, which is float32 throughout (step.c: ~3e-7)
# And for a bfloat16 prefill through PrefillLayer against torch's layers (see prefill_error):
# 0 measured; a norm over one element too few moves it by 2e-2, truncating instead of rounding
# to bfloat16 by 1e-2, SwiGLU without SiLU by 0.2.
PREFILL_BOUND = 2e-3
# From how many tokens FusedStep runs them through the layers' bfloat16 products rather than its
# one call: the products path has a fixed cost (~60 ms for v0, mostly the float16 head widened to
# float32 for several positions) that the one call's ~4 ms a token repays from about 24 tokens.
PRODUCTS_FROM = 32
KINDS = {torch.float16: 0, torch.bfloat16: 1, torch.int8: 2}


class _Dims(ctypes.Structure):
    _fields_ = [(name, ctypes.c_int64) for name in
                ("layers", "hidden", "heads", "kv_heads", "head_dim", "intermediate", "vocab", "max_len",
                 "kind", "threads")] + [("eps", ctypes.c_double)]


_library: list = []  # [(the loaded library or None, what happened)], once per process


def library():
    """step.c compiled for this CPU, loaded and checked, or None where that cannot be done."""
    if not _library:
        lib, how = _build()
        if lib is not None and not _agrees(lib):
            lib, how = None, "the C step built here disagreed with float32 arithmetic, so torch's runs"
        _library.append((lib, how))
    return _library[0][0]


def status() -> str:
    """Which decode step a half-precision or int8 model runs here, and why (`mellow env`)."""
    library()
    return _library[0][1]


def prefill_status() -> str:
    """What a prefill's attention and layers run on here (`mellow env`)."""
    lib = library()
    if lib is None:
        return "torch's (" + status().removeprefix("torch's (")
    if not lib.mellow_attention_native():
        return "torch's (step.c's 16-lane vectors are not this CPU's registers: torch's kernels are the faster)"
    return ("step.c's attention for every precision but float32; its passes between the products "
            "where several rows multiply in bfloat16")


def attach(lm) -> "FusedStep | None":
    """A fused step for this prepared language model, or None (the torch step then runs)."""
    if not FusedStep.supports(lm):
        return None
    lib = library()
    return FusedStep(lm, lib) if lib is not None else None


def _build():
    """(library, what happened): step.c built (or found built) and loaded, or (None, why not)."""
    if os.environ.get("MELLOW_FUSED_STEP", "1").strip() == "0":
        return None, "torch's (MELLOW_FUSED_STEP=0)"
    compiler = shutil.which(os.environ.get("CC", "cc")) or shutil.which("gcc") or shutil.which("clang")
    if compiler is None:
        return None, "torch's (no C compiler found to build the one-call step; set CC)"
    from mellow_cli.files import cache_dir
    from mellow_cli.precision import machine_key

    key = hashlib.sha256(SOURCE.read_bytes() + machine_key().encode() + compiler.encode()).hexdigest()[:16]
    target = cache_dir() / "kernels" / f"step-{key}.so"
    if not target.exists():
        try:
            compile_step(compiler, target)
        except subprocess.CalledProcessError as e:
            last = (e.stderr or b"").decode(errors="replace").strip().splitlines()[-1:] or ["no message"]
            return None, f"torch's ({compiler} could not build the one-call step: {last[0]})"
        except (OSError, subprocess.SubprocessError) as e:
            return None, f"torch's (building the one-call step failed: {e})"
    try:
        lib = load_library(target)
    except OSError as e:
        return None, f"torch's (the one-call step would not load: {e})"
    return lib, f"one call into C ({target}, built with {compiler} for this CPU)"


def compile_step(compiler: str, target: Path, march: str = "native") -> None:
    """Build step.c into `target` for `march` (raises what the compiler run raises)."""
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
        built = Path(tmp) / "step.so"
        # -fno-math-errno lets expf vectorize; the sums stay in source order except where step.c
        # marks a loop `omp simd` (reordered as torch's own kernels reorder them).
        command = [compiler, "-O3", f"-march={march}", "-fopenmp", "-shared", "-fPIC", "-std=gnu11",
                   "-fno-math-errno", str(SOURCE), "-o", str(built), "-lm"]
        subprocess.run(command, check=True, capture_output=True, timeout=120)
        os.replace(built, target)  # whole or not at all, if another process builds it too


def load_library(path: Path):
    """A built step.c, its functions typed."""
    lib = ctypes.CDLL(str(path))
    lib.mellow_scratch_floats.restype = ctypes.c_int64
    lib.mellow_scratch_floats.argtypes = [ctypes.POINTER(_Dims), ctypes.c_int64, ctypes.c_int64]
    lib.mellow_forward.restype = None
    lib.mellow_forward.argtypes = [ctypes.POINTER(_Dims), ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64,
                                   *[ctypes.c_void_p] * 4, ctypes.c_int64, *[ctypes.c_void_p] * 4]
    lib.mellow_attention_scratch_floats.restype = ctypes.c_int64
    lib.mellow_attention_scratch_floats.argtypes = [ctypes.c_int64] * 7
    lib.mellow_attention.restype = None
    lib.mellow_attention.argtypes = [ctypes.c_void_p, *[ctypes.c_int64] * 3, *[ctypes.c_void_p] * 6,
                                     *[ctypes.c_int64] * 4, ctypes.c_void_p, ctypes.c_int64, ctypes.c_void_p,
                                     ctypes.c_int64]
    lib.mellow_attention_native.restype = ctypes.c_int
    lib.mellow_attention_native.argtypes = []
    for name, args in (("mellow_add_norm", [ctypes.c_void_p] * 3 + [ctypes.c_double] + [ctypes.c_void_p] * 2
                        + [ctypes.c_int64] * 3),
                       ("mellow_rotate_store", [ctypes.c_void_p, ctypes.c_int64] + [ctypes.c_void_p] * 3
                        + [ctypes.c_int64] * 3 + [ctypes.c_void_p] * 5 + [ctypes.c_int64] * 2),
                       ("mellow_swiglu", [ctypes.c_void_p] * 2 + [ctypes.c_int64] * 3)):
        getattr(lib, name).restype = None
        getattr(lib, name).argtypes = args
    return lib


def _agrees(lib) -> bool:
    """Whether the built library gives, on a small random model in float16 and in int8, the
    logits that float32 arithmetic gives on the same rounded weights, for decode steps of two rows
    and for choices, and torch's results for a prefill's attention and bfloat16 layers (a
    compiler that miscompiles step.c must not change answers)."""
    from mellow_cli.config import MellowConfig

    cfg = MellowConfig(vocab_size=96, hidden_size=64, intermediate_size=80, num_hidden_layers=2,
                       num_attention_heads=4, num_key_value_heads=2)
    generator = torch.Generator().manual_seed(0)
    state = random_state(cfg, generator)
    prompt = torch.randn(2, 5, cfg.hidden_size, generator=generator)
    return (all(_error(lib, cfg, state, prompt, name) < BOUNDS[name] for name in ("float16", "int8"))
            and attention_error(Attend(lib)) < ATTENTION_BOUND and prefill_error(lib) < PREFILL_BOUND)


def random_state(cfg, generator: torch.Generator) -> dict[str, torch.Tensor]:
    """Random weights for a LlamaForCausalLM of `cfg`: norms and embeddings of unit scale,
    matrices of 0.1, so the activations stay in range through a few layers."""
    from mellow_cli.model.llama import LlamaForCausalLM

    shapes = {k: tuple(v.shape) for k, v in LlamaForCausalLM(cfg).state_dict().items()}
    return {name: torch.randn(shape, generator=generator) * (1.0 if "norm" in name or "embed" in name else 0.1)
            for name, shape in shapes.items()}


def _twins(cfg, state: dict, name: str):
    """(a model prepared in `name`, a float32 model holding the same rounded weights)."""
    from mellow_cli.model.llama import LlamaForCausalLM
    from mellow_cli.precision import Precision, apply, head_maker, maker

    precision = Precision(name, name, name, "float32")

    def rounded(matrix) -> torch.nn.Parameter:
        return torch.nn.Parameter(matrix.q.float() * matrix.scale[:, None] if name == "int8" else matrix.weight.float())

    prepared, exact = LlamaForCausalLM(cfg), LlamaForCausalLM(cfg)
    for lm in (prepared, exact):
        lm.load_state_dict(state)
        lm.eval()
    apply(prepared, precision, fused=False)
    for module in exact.model.layers.modules():
        if isinstance(module, torch.nn.Linear):
            module.weight = rounded(maker(precision)(module.weight))
    exact.lm_head.weight = rounded(head_maker(precision)(exact.lm_head.weight))
    if name != "int8":  # the token embeddings are the head's rows; int8 keeps the float32 table
        exact.model.embed_tokens.weight = exact.lm_head.weight
    return prepared, exact


@torch.inference_mode()
def _error(lib, cfg, state: dict, prompt: torch.Tensor, name: str, steps: int = 3) -> float:
    """The largest difference between the library's logits and float32 arithmetic on the same
    rounded weights, relative to the largest logit: `steps` decode steps of every row of `prompt`
    (B, P, hidden) after its prefill, then choices of several lengths after each row's prefix,
    from the same cache as float32's."""
    prepared, exact = _twins(cfg, state, name)
    fused = FusedStep(prepared, lib)
    batch, length = prompt.shape[:2]

    def same_cache(extra: int) -> None:
        prepared.setup_cache(batch, length + extra)
        for mine, theirs in zip(prepared.model.layers, exact.model.layers):
            k = theirs.self_attn.kv_cache.k[:, :, :length]
            mine.self_attn.kv_cache.k[:, :, :length] = k
            mine.self_attn.kv_cache.v[:, :, :length] = theirs.self_attn.kv_cache.v[:, :, :length]

    def error(got: torch.Tensor, expected: torch.Tensor) -> float:
        return float((got - expected).abs().max() / expected.abs().max())

    exact.setup_cache(batch, length + steps)
    token = exact(inputs_embeds=prompt, start=0).logits[:, -1].argmax(-1)
    same_cache(steps)
    worst = 0.0
    for pos in range(length, length + steps):
        expected = exact(input_ids=token[:, None], start=pos).logits[:, -1]
        worst = max(worst, error(fused(token, pos)[:, -1], expected))
        token = expected.argmax(-1)

    ids = [[5, 7, 9], [11], [13, 15], [17, 19, 21, 23]]
    row_of = [i * batch // len(ids) for i in range(len(ids))]
    exact.setup_cache(batch, length)
    exact(inputs_embeds=prompt, start=0)
    same_cache(fused.slots_needed(row_of, ids))
    for (r, tokens), got in zip(zip(row_of, ids), fused.choices(row_of, ids, length)):
        if len(tokens) > 1:
            exact.setup_cache(1, length + len(tokens))
            exact(inputs_embeds=prompt[r, None], start=0)
            worst = max(worst, error(got, exact(input_ids=torch.tensor([tokens[:-1]]), start=length).logits[0]))
    return worst


@torch.inference_mode()
def attention_error(attend: "Attend") -> float:
    """The largest difference between `attend` and torch's attention over the same cache, relative
    to the largest output, for a prefill (queries from position 0) and for queries after three
    cached positions, with two rows and two query heads per key/value head."""
    import torch.nn.functional as F

    from mellow_cli.model.llama import KVCache

    generator = torch.Generator().manual_seed(1)
    batch, heads, kv_heads, head_dim, tokens = 2, 4, 2, 16, 21
    worst = 0.0
    for start in (0, 3):
        qk = torch.randn(batch, tokens, heads + kv_heads, head_dim, generator=generator)
        cache = KVCache(batch, kv_heads, start + tokens + 2, head_dim, torch.float32, "cpu")
        cache.k.normal_(generator=generator)
        cache.v.normal_(generator=generator)
        k, v = cache.k[:, :, : start + tokens], cache.v[:, :, : start + tokens]
        mask = torch.ones(tokens, start + tokens, dtype=torch.bool).tril(diagonal=start)
        expected = F.scaled_dot_product_attention(qk[:, :, :heads].transpose(1, 2), k, v, attn_mask=mask,
                                                  enable_gqa=True).transpose(1, 2).reshape(batch, tokens, -1)
        got = attend(qk, heads, cache, start)
        worst = max(worst, float((got - expected).abs().max() / expected.abs().max()))
    return worst


def prefill_error(lib) -> float:
    """The median over three small random models of `_prefill_error`. Both sides round to
    bfloat16 at the same points, so they differ only where a float32 sum summed in another order
    rounds the other way: a rare flip of one bfloat16 step (0.4% of an element) that then
    spreads (up to ~1e-3 here, in one model of six), where a wrong index, a lost term or a wrong
    rounding moves every model by 1e-2 or more. The median keeps one flip from failing a
    correct build."""
    return sorted(_prefill_error(lib, seed) for seed in (2, 3, 4))[1]


@torch.inference_mode()
def _prefill_error(lib, seed: int) -> float:
    """The largest difference between a prefill through PrefillLayer and through torch's layers,
    on the same small random model in bfloat16, relative to the largest value: of the final
    hidden states and of the keys and values cached, and of the final hidden states of answer
    choices after the prefill (PrefillLayer.tokens)."""
    from mellow_cli.config import MellowConfig
    from mellow_cli.model.llama import LlamaForCausalLM
    from mellow_cli.precision import Precision, apply, packed_available

    # 88: SwiGLU runs in 16-lane vectors and a tail
    cfg = MellowConfig(vocab_size=96, hidden_size=64, intermediate_size=88, num_hidden_layers=2,
                       num_attention_heads=4, num_key_value_heads=2)
    generator = torch.Generator().manual_seed(seed)
    lm = LlamaForCausalLM(cfg)
    lm.load_state_dict(random_state(cfg, generator))
    apply(lm.eval(), Precision("bfloat16", "bfloat16", "bfloat16", "bfloat16",
                               packed=packed_available(torch.bfloat16)), fused=False)
    prompt = torch.randn(2, 21, cfg.hidden_size, generator=generator)

    def run(layer_pass):
        for layer in lm.model.layers:
            layer.prefill = layer_pass
        lm.setup_cache(2, 23)
        hidden = lm.hidden(inputs_embeds=prompt, start=0)
        return [hidden] + [t.clone() for layer in lm.model.layers for t in (layer.self_attn.kv_cache.k,
                                                                             layer.self_attn.kv_cache.v)]

    layer_pass = PrefillLayer(lib, Attend(lib))
    expected, got = run(None), run(layer_pass)
    worst = max(float((g - e).abs().max() / e.abs().max()) for g, e in zip(got, expected))

    # Choices through the layer pass, each row's after its prefix in slots of its own, against
    # torch's layers on a copy of the row's cache per choice.
    row_of, ids = [0, 1, 1, 1], [[5, 7, 9], [11, 13], [17, 19, 21, 23], [25]]
    flat, row, pos, slot, group = choice_layout(row_of, ids, 21)
    cos, sin = lm.model.rotary_emb.span(0, 23 + 5, torch.float32)
    lm.setup_cache(2, 21 + 5)
    lm.hidden(inputs_embeds=prompt, start=0)
    prefix = [(layer.self_attn.kv_cache.k.clone(), layer.self_attn.kv_cache.v.clone()) for layer in lm.model.layers]
    x = lm.embed(torch.tensor(flat))[None]
    for layer in lm.model.layers:
        x = layer_pass.tokens(layer, x, cos, sin, torch.tensor([pos, row, slot, group]), 21)
    got = lm.model.norm(x)[0].split([len(t) - 1 for t in ids])
    run(None)
    for r, tokens, mine in zip(row_of, ids, got):
        if len(tokens) > 1:
            for layer, (k, v) in zip(lm.model.layers, prefix):
                layer.self_attn.kv_cache.k, layer.self_attn.kv_cache.v = k[r, None].clone(), v[r, None].clone()
            expected = lm.hidden(torch.tensor([tokens[:-1]]), start=21)[0]
            worst = max(worst, float((mine - expected).abs().max() / expected.abs().max()))
    return worst


def attention(lib=None) -> "Attend | None":
    """step.c's attention for several queries where the library is here and its vectors are the
    CPU's own (else torch's flash kernel is the faster one), or None."""
    lib = lib or library()
    return Attend(lib) if lib is not None and lib.mellow_attention_native() else None


class Attend:
    """Attention for many queries through step.c's mellow_attention: what Attention.forward's
    scaled_dot_product_attention computes, in float32, in about half its time at a prefix's sizes
    (`__call__`, a prefill), and the attention of answer choices after a shared prefix (`run`)."""

    def __init__(self, lib):
        self.lib = lib
        self.scratch = torch.empty(0)

    def __call__(self, qk: torch.Tensor, heads: int, cache, start: int,
                 dtype: torch.dtype = torch.float32) -> torch.Tensor | None:
        """The rotated q and k of the new positions start.. of every cache row, (B, T, heads +
        kv_heads, head_dim), the number of query heads and the layer's KVCache (already holding
        positions 0 .. start+T-1) -> (B, T, heads * head_dim) in `dtype` (float32, or bfloat16
        rounded as a bfloat16 product rounds its inputs), or None where the tensors are not
        float32 in the layout step.c reads (torch's attention then runs)."""
        batch, tokens, _, head_dim = qk.shape
        if qk.dtype != torch.float32 or qk.device.type != "cpu" or qk.stride(0) != tokens * qk.stride(1):
            return None
        t = torch.arange(tokens).repeat(batch)
        rows = torch.arange(batch).repeat_interleave(tokens)
        none = torch.zeros_like(t)
        out = self.run(qk.view(batch * tokens, -1, head_dim), heads, cache, rows, start + t + 1, none, none, batch, dtype)
        return None if out is None else out.view(batch, tokens, -1)

    def run(self, qk: torch.Tensor, heads: int, cache, rows: torch.Tensor, seen: torch.Tensor, hole_from: torch.Tensor,
            hole_to: torch.Tensor, runs: int, dtype: torch.dtype) -> torch.Tensor | None:
        """step.c's mellow_attention (it says what rows, seen and the hole are) for qk (N, heads +
        kv_heads, head_dim) -> (N, heads * head_dim), or None where the tensors are not in the
        layout it reads. `runs`: how many stretches of consecutive tokens share a cache row."""
        n, _, head_dim = qk.shape
        k, v = cache.k, cache.v
        if (head_dim % 16 or qk.dtype != torch.float32 or k.dtype != torch.float32 or qk.device.type != "cpu"
                or qk.stride(2) != 1 or qk.stride(1) != head_dim or not (k.is_contiguous() and v.is_contiguous())):
            return None
        kv_heads, max_len = k.shape[1], k.shape[2]
        threads = torch.get_num_threads()
        index = torch.stack([rows, seen, hole_from, hole_to]).to(torch.int64).contiguous()
        need = self.lib.mellow_attention_scratch_floats(n, runs, kv_heads, head_dim, int(seen.max()), heads, threads)
        if self.scratch.numel() < need:
            self.scratch = torch.empty(need)
        out = torch.empty(n, heads * head_dim, dtype=dtype)
        self.lib.mellow_attention(qk.data_ptr(), qk.stride(0), n, runs, *(i.data_ptr() for i in index), k.data_ptr(),
                                  v.data_ptr(), kv_heads, max_len, heads, head_dim, out.data_ptr(),
                                  int(dtype == torch.bfloat16), self.scratch.data_ptr(), threads)
        return out


class PrefillLayer:
    """A decoder layer over many positions (a prefill, or many answer choices' tokens) where its
    products take and give bfloat16 (several rows of a bfloat16-prefill precision): the four
    products as prepared, and between them step.c's passes (norms, rotary and the cache,
    attention, SwiGLU, the residual sums) instead of torch's ~20 elementwise operations, with
    bfloat16 where the products round their inputs and outputs anyway. DecoderLayer.forward calls
    it for a prefill, FusedStep for many choice tokens; None: torch's layer runs."""

    def __init__(self, lib, attend: Attend):
        self.lib, self.attend = lib, attend

    def __call__(self, layer, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, start: int) -> torch.Tensor | None:
        """DecoderLayer.forward's arguments (cos and sin: RotaryEmbedding.span of the new
        positions): every row's next positions start.. of its own cache row."""
        cache = layer.self_attn.kv_cache
        batch, tokens, _ = x.shape
        if not self.fits(layer, x, cos, sin):
            return None
        t = torch.arange(tokens).repeat(batch)
        index = torch.stack([t, torch.arange(batch).repeat_interleave(tokens), start + t])
        d = layer.self_attn.head_dim
        heads = layer.self_attn.sizes[0] // d
        return self._layer(layer, x, cos, sin, index, lambda qk: self.attend(qk.view(batch, tokens, -1, d), heads, cache,
                                                                           start, torch.bfloat16))

    def tokens(self, layer, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, index: torch.Tensor,
               visible: int) -> torch.Tensor:
        """x (1, N, hidden), N tokens placed as step.c's mellow_forward places them: index rows
        pos, row, slot, group (int64, (4, N)), cos and sin the whole rotary tables."""
        attn = layer.self_attn
        cache, d = attn.kv_cache, attn.head_dim
        heads, n = attn.sizes[0] // d, x.shape[1]
        pos, rows, slot, group = index
        # A token sees its row's prefix and its own choice's slots: not the slots between them,
        # which hold the row's earlier choices (FusedStep.choices lays them out so).
        first = torch.full((int(group.max()) + 1,), 1 << 62).scatter_reduce(0, group, slot, "amin")[group]
        runs = int((rows[1:] != rows[:-1]).sum()) + 1

        def attend(qk: torch.Tensor) -> torch.Tensor:
            return self.attend.run(qk.view(n, -1, d), heads, cache, rows, slot + 1, torch.full_like(slot, visible),
                                   first, runs, torch.bfloat16)

        return self._layer(layer, x, cos, sin, index, attend)

    @staticmethod
    def fits(layer, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> bool:
        """Whether the tensors are float32, on the CPU, in the layout step.c reads."""
        cache = layer.self_attn.kv_cache
        return (x.dtype == torch.float32 and x.device.type == "cpu" and layer.self_attn.head_dim % 16 == 0
                and cache.k.dtype == torch.float32 and cache.k.is_contiguous() and cache.v.is_contiguous()
                and cos.is_contiguous() and sin.is_contiguous())

    def _layer(self, layer, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, index: torch.Tensor,
               attend) -> torch.Tensor:
        """The layer, with k and v stored at (row, slot) = index[1], index[2], rotary row index[0]
        of cos and sin, and `attend` (rotated q and k -> the heads' outputs in bfloat16)."""
        attn, mlp, lib = layer.self_attn, layer.mlp, self.lib
        cache, d = attn.kv_cache, attn.head_dim
        heads, kv_heads = attn.sizes[0] // d, attn.sizes[1] // d
        batch, tokens, hidden = x.shape
        n, threads, eps = batch * tokens, torch.get_num_threads(), layer.input_layernorm.eps
        # Every tensor C reads is held by a name until the call returns: a temporary's memory
        # could be handed back (and written by the allocator) while C reads it.
        x = x.contiguous()
        index = index.contiguous()
        normed = torch.empty(batch, tokens, hidden, dtype=torch.bfloat16)
        lib.mellow_add_norm(x.data_ptr(), None, layer.input_layernorm.weight.data_ptr(), eps, x.data_ptr(),
                            normed.data_ptr(), n, hidden, threads)
        qkv = _bfloat16(attn.qkv(normed))
        qk = torch.empty(batch, tokens, heads + kv_heads, d)
        lib.mellow_rotate_store(qkv.data_ptr(), n, index[0].data_ptr(), index[1].data_ptr(), index[2].data_ptr(),
                                heads, kv_heads, d, cos.data_ptr(), sin.data_ptr(), qk.data_ptr(), cache.k.data_ptr(),
                                cache.v.data_ptr(), cache.k.shape[2], threads)
        mixed = attend(qk)
        out = _bfloat16(attn.out(mixed))
        summed = torch.empty_like(x)
        lib.mellow_add_norm(x.data_ptr(), out.data_ptr(), layer.post_attention_layernorm.weight.data_ptr(), eps,
                            summed.data_ptr(), normed.data_ptr(), n, hidden, threads)
        gate_up = _bfloat16(mlp.gate_up(normed))
        inter = gate_up.shape[-1] // 2
        acted = torch.empty(batch, tokens, inter, dtype=torch.bfloat16)
        lib.mellow_swiglu(gate_up.data_ptr(), acted.data_ptr(), n, inter, threads)
        down = _bfloat16(mlp.down(acted))
        lib.mellow_add_norm(summed.data_ptr(), down.data_ptr(), None, 0.0, summed.data_ptr(), None, n, hidden, threads)
        return summed


def choice_layout(row_of: list[int], ids: list[list[int]], length: int) -> tuple[list[int], ...]:
    """Where FusedStep.choices puts each choice's tokens but the last, as lists (token, row, pos,
    slot, group) for step.c: choice i follows the prefix of cache row row_of[i] (rotary positions
    length, length+1, ..), in slots of its own after the prefix and the row's earlier choices."""
    flat, row, pos, slot, group = [], [], [], [], []
    used: dict[int, int] = {}
    for i, (r, tokens) in enumerate(zip(row_of, ids)):
        for j, token in enumerate(tokens[:-1]):
            flat.append(token)
            row.append(r)
            pos.append(length + j)
            slot.append(length + used.get(r, 0))
            used[r] = used.get(r, 0) + 1
            group.append(i)
    return flat, row, pos, slot, group


def _bfloat16(product: torch.Tensor) -> torch.Tensor:
    """A product's output as PrefillLayer reads it (its matrices give bfloat16 for bfloat16)."""
    if product.dtype != torch.bfloat16:
        raise ValueError(f"a bfloat16 product gave {product.dtype}: PrefillLayer is for bfloat16 prefills")
    return product.contiguous()


def decode_seconds(stack: list[tuple], head, heads: int, kv_heads: int, layers: int, positions: int,
                   timer) -> float | None:
    """What a decode step at `positions` cached positions takes through step.c for a model of
    `layers` layers like those of `stack` (prepared (qkv, o, gate_up, down) matrices) and output
    head `head`, or None where step.c cannot run them. `timer(fn)` times a call; the layers of
    `stack` stand for all `layers`, and the head is timed apart (once with it, once without) so
    that it is counted once. For precision.measure, which compares this with torch's kernels."""
    lib = library()
    stored = [_stored(m) for ms in stack for m in ms] + [_stored(head)]
    if lib is None or any(s is None for s in stored) or len({w.dtype for w, _ in stored}) != 1:
        return None
    hidden, intermediate = stored[-1][0].shape[1], stored[2][0].shape[0] // 2
    head_dim = hidden // heads
    dims = _Dims(len(stack), hidden, heads, kv_heads, head_dim, intermediate, stored[-1][0].shape[0],
                 positions + 1, KINDS[stored[0][0].dtype], torch.get_num_threads(), 1e-5)
    norm = torch.ones(hidden)
    caches = [torch.zeros(2, kv_heads, positions + 1, head_dim) for _ in stack]
    table = _pointer_table(stored, [(norm, norm, k, v) for k, v in caches], norm)
    w = stored[-1][0]
    rotary = torch.zeros(positions + 1, head_dim)
    x, logits = torch.randn(hidden), torch.empty(dims.vocab)
    scratch = torch.empty(lib.mellow_scratch_floats(ctypes.byref(dims), 1, positions))
    index = torch.tensor([[0], [positions], [positions], [0]])

    def step(vocab: int) -> float:
        dims.vocab = vocab
        return timer(lambda: lib.mellow_forward(ctypes.byref(dims), table, x.data_ptr(), 1, *(i.data_ptr() for i in index),
                                                positions, rotary.data_ptr(), rotary.data_ptr(), scratch.data_ptr(),
                                                logits.data_ptr()))

    whole, without_head = step(w.shape[0]), step(1)
    return without_head * layers / len(stack) + (whole - without_head)


def _pointer_table(stored: list, layers: list[tuple], final_norm: torch.Tensor):
    """The pointers step.c's mellow_forward reads, in its order (PER_LAYER a layer, then three):
    `stored` is `_stored` of every matrix in `LlamaForCausalLM.matrices` order, `layers` each
    layer's (input norm, post-attention norm, k cache, v cache)."""
    def address(t: torch.Tensor | None) -> int:
        return 0 if t is None else t.data_ptr()

    pointers, it = [], iter(stored)
    for norms_and_cache in layers:
        mats = [next(it) for _ in range(4)]
        pointers += [address(w) for w, _ in mats] + [address(scale) for _, scale in mats]
        pointers += [address(t) for t in norms_and_cache]
    head, scale = next(it)
    pointers += [address(final_norm), address(head), address(scale)]
    assert len(pointers) == PER_LAYER * len(layers) + 3
    return (ctypes.c_void_p * len(pointers))(*pointers)


def _stored(matrix) -> tuple[torch.Tensor, torch.Tensor | None] | None:
    """(weights, per-row scales or None) of a prepared matrix step.c can read, else None."""
    from mellow_cli.precision import Dense, Int8Matrix

    if isinstance(matrix, Int8Matrix):
        return matrix.q, matrix.scale
    if isinstance(matrix, Dense) and matrix.weight.dtype in (torch.float16, torch.bfloat16) \
            and matrix.decode == matrix.weight.dtype:
        return matrix.weight, None
    return None


class FusedStep:
    """One prepared language model's forward over a few new tokens through step.c, on the cache
    that `lm.setup_cache` made (re-read whenever the cache changes): decode steps of any number
    of rows (`__call__`) and the scoring of answer choices after a prefill (`choices`)."""

    def __init__(self, lm, lib):
        self.lm, self.lib = lm, lib
        stored = [_stored(m) for m in lm.matrices()]
        kinds = {KINDS[w.dtype] for w, _ in stored}
        if len(kinds) != 1:
            raise ValueError("matrices of several kinds")
        self.weights = stored  # kept alive with their pointers
        c = lm.config
        self.dims = _Dims(c.num_hidden_layers, c.hidden_size, c.num_attention_heads, c.num_key_value_heads,
                          c.hidden_size // c.num_attention_heads, c.intermediate_size, c.vocab_size, 0,
                          kinds.pop(), torch.get_num_threads(), c.rms_norm_eps)
        self._cache_key, self._caches = None, None
        self.scratch = torch.empty(0)

    @staticmethod
    def supports(lm) -> bool:
        if not lm.prepared or lm.model.embed_tokens.weight.device.type != "cpu":
            return False
        if lm.model.embed_tokens.weight.dtype != torch.float32:
            return False
        if lm.config.hidden_size // lm.config.num_attention_heads > 512:  # step.c's rotate holds a head on the stack
            return False
        stored = [_stored(m) for m in lm.matrices()]
        return all(s is not None for s in stored) and len({w.dtype for w, _ in stored}) == 1

    def _cache(self):
        """The layers' caches (one float32 tensor each for k and v, rows contiguous), or None;
        the pointers step.c reads, re-read when `setup_cache` or `select_cache_rows` changed them
        (all layers change together, so the first layer's tell)."""
        first = self.lm.model.layers[0].self_attn.kv_cache
        key = None if first is None else (id(first), first.k.data_ptr(), first.v.data_ptr())
        if key == self._cache_key:
            return self._caches
        self._cache_key, self._caches = key, None
        caches = [layer.self_attn.kv_cache for layer in self.lm.model.layers]
        if first is None or any(not (c.k.is_contiguous() and c.v.is_contiguous()) or c.k.dtype != torch.float32
                                for c in caches):
            return None
        self.dims.max_len = caches[0].k.shape[2]
        layers = [(layer.input_layernorm.weight, layer.post_attention_layernorm.weight, cache.k, cache.v)
                  for layer, cache in zip(self.lm.model.layers, caches)]
        self.pointers = _pointer_table(self.weights, layers, self.lm.model.norm.weight)
        self.cos, self.sin = self.lm.model.rotary_emb.span(0, self.dims.max_len, torch.float32)
        self._caches = caches
        return caches

    def forward(self, ids: torch.Tensor, row: list[int], pos: list[int], slot: list[int], group: list[int],
                visible: int) -> torch.Tensor:
        """Tokens `ids` (T,) through the model (step.c's mellow_forward says what row, pos, slot,
        group and visible mean) -> float32 logits (T, vocab). The caller keeps every row, slot and
        position inside the cache."""
        if self._cache() is None:
            raise ValueError("the KV cache is not float32 rows step.c can read: run torch's forward")
        self.dims.threads = torch.get_num_threads()
        tokens = len(ids)
        x = self.lm.embed(ids).float().contiguous()
        layers = self.lm.model.layers
        if tokens >= PRODUCTS_FROM and layers[0].prefill is not None and layers[0].prefill.fits(layers[0], x, self.cos,
                                                                                                 self.sin):
            # Many tokens (choices of a batch): bound by arithmetic, as a prefill is, so through the
            # layers' bfloat16 products where the model has them (PrefillLayer.tokens).
            index = torch.tensor([pos, row, slot, group], dtype=torch.int64)
            x = x[None]
            for layer in layers:
                x = layer.prefill.tokens(layer, x, self.cos, self.sin, index, visible)
            return self.lm.head(self.lm.model.norm(x))[0].float()
        logits = torch.empty(tokens, self.dims.vocab)
        need = self.lib.mellow_scratch_floats(ctypes.byref(self.dims), tokens, visible)
        if self.scratch.numel() < need:
            self.scratch = torch.empty(need)
        index = torch.tensor([row, pos, slot, group], dtype=torch.int64)
        self.lib.mellow_forward(ctypes.byref(self.dims), self.pointers, x.data_ptr(), tokens,
                                index[0].data_ptr(), index[1].data_ptr(), index[2].data_ptr(), index[3].data_ptr(),
                                visible, self.cos.data_ptr(), self.sin.data_ptr(), self.scratch.data_ptr(),
                                logits.data_ptr())
        return logits

    def takes(self, input_ids: torch.Tensor | None, inputs_embeds: torch.Tensor | None, start: int | None) -> bool:
        """Whether a forward call is a decode step this can run: one token in each row of the
        cache, at a position inside it."""
        if input_ids is None or inputs_embeds is not None or start is None or input_ids.shape[1] != 1:
            return False
        caches = self._cache()
        return caches is not None and caches[0].k.shape[0] == input_ids.shape[0] and start < caches[0].k.shape[2]

    def __call__(self, tokens: torch.Tensor, pos: int) -> torch.Tensor:
        """The next token of every cache row, (B,), at position `pos` -> float32 logits (B, 1, vocab)."""
        rows = list(range(len(tokens)))
        return self.forward(tokens, rows, [pos] * len(rows), [pos] * len(rows), rows, pos)[:, None]

    def choices(self, row_of: list[int], ids: list[list[int]], length: int) -> list[torch.Tensor]:
        """After a prefill of `length` positions: float32 logits (len(ids[i]) - 1, vocab) after
        each token but the last of each choice i, which follows the prefix of cache row
        row_of[i]. A row's choices take slots of their own after its prefix, each seeing the
        prefix and its own earlier tokens, so the prefix's cache is shared, not copied; the cache
        needs `length` plus the most tokens any row's choices have."""
        flat, row, pos, slot, group = choice_layout(row_of, ids, length)
        if not flat:
            return [torch.empty(0, self.dims.vocab) for _ in ids]
        logits = self.forward(torch.tensor(flat), row, pos, slot, group, length)
        return list(logits.split([max(len(t) - 1, 0) for t in ids]))

    def slots_needed(self, row_of: list[int], ids: list[list[int]]) -> int:
        """The most cache slots past the prefix that `choices` uses in any one row."""
        used: dict[int, int] = {}
        for r, tokens in zip(row_of, ids):
            used[r] = used.get(r, 0) + max(len(tokens) - 1, 0)
        return max(used.values(), default=0)
