"""The language model's forward in C (step.c), built on this machine: over a few new tokens as
one call (decode steps, one token in every row of the cache, and answer choices after a
prefill); over many, between torch's products, see passes.py.

A decode step in eager torch is ~25 small operations per layer of a few microseconds each around
the matrix-vector products; at 135M parameters that overhead is a third of the step. step.c does
the same arithmetic as llama.py's forward in one call, reading the prepared matrices (float16,
bfloat16 or int8 weights; float32 activations, sums and KV cache) where `prepare` put them, and
writing keys and values into the same cache the torch prefill filled. Choices go to slots of
their own after their row's prefix, so the prefix's cache is shared instead of copied per
choice. float32 (the exact path) never uses it.

Prefills (and the many tokens of a batch's choices) are bound by arithmetic, where oneDNN's
products are the fast ones: step.c does the rest of such a layer, through passes.py. This
module loads and checks the library for both.

It is compiled once per machine with the system's C compiler for the CPU it runs on
(`-march=native`), and kept in the cache beside the models, keyed by the source and the CPU
(kernels.py, which also decides whether a library found there may be loaded at all). No
compiler, a failed build, a library that will not load, or a build that disagrees with float32
arithmetic on a small random model: torch's forward is used, as everywhere else, and `mellow env`
says which runs.
"""

from __future__ import annotations

import ctypes
import os
import shutil
from pathlib import Path

import torch

from mellow_cli.runtime.choices import choice_chunks, choice_layout

PER_LAYER = 12  # pointers per layer, step.c's enum
# How far the step's logits may be from float32 arithmetic on the same rounded weights, relative to
# the largest logit: float32 sums in another order differ in the last bits; int8 also rounds the
# activations to 16 bits (step.c), about 1e-4 on a small random model, while rounding the
# weights to 8 bits moves logits by 1e-2. A wrong index or a lost term moves them by far more.
BOUNDS = {"float16": 1e-5, "bfloat16": 1e-5, "int8": 1e-3}
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


def attach(lm) -> "FusedStep | None":
    """A fused step for this prepared language model, or None (the torch step then runs)."""
    if not FusedStep.supports(lm):
        return None
    lib = library()
    return FusedStep(lm, lib) if lib is not None else None


def _build():
    """(library, what happened): step.c built, or found built and ours (model/kernels.py), and
    loaded; or (None, why not). What was found in the cache and not loaded, or a library that
    would not load, is said in one line on stderr."""
    if os.environ.get("MELLOW_FUSED_STEP", "1").strip() == "0":
        return None, "torch's (MELLOW_FUSED_STEP=0)"
    compiler = shutil.which(os.environ.get("CC", "cc")) or shutil.which("gcc") or shutil.which("clang")
    if compiler is None:
        return None, "torch's (no C compiler found to build the one-call step; set CC)"
    from mellow_cli.events import note
    from mellow_cli.files import cache_dir, first_line
    from mellow_cli.runtime.kernels import step_library
    from mellow_cli.runtime.machine import cpu_key

    target, how, said = step_library(compiler, cache_dir() / "kernels", cpu_key())
    lib = None
    if target is not None:
        try:
            lib = load_library(target)
        except (OSError, AttributeError) as e:  # not a library, or not of this step.c
            how = f"torch's (the one-call step would not load: {first_line(e)})"
            said.append(how)
    if said:
        note("; ".join(said))
    if lib is None:
        return None, how
    one_thread = "" if lib.mellow_openmp() else "; one thread, as the compiler has no OpenMP"
    return lib, f"one call into C ({target}, built with {compiler} for this CPU{one_thread})"


def load_library(path: Path):
    """A built step.c, its functions typed."""
    lib = ctypes.CDLL(str(path))
    lib.mellow_scratch_floats.restype = ctypes.c_int64
    lib.mellow_scratch_floats.argtypes = [ctypes.POINTER(_Dims), ctypes.c_int64, ctypes.c_int64]
    lib.mellow_forward.restype = None
    lib.mellow_forward.argtypes = [ctypes.POINTER(_Dims), ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64,
                                   *[ctypes.c_void_p] * 4, ctypes.c_int64, *[ctypes.c_void_p] * 5]
    lib.mellow_attention_scratch_floats.restype = ctypes.c_int64
    lib.mellow_attention_scratch_floats.argtypes = [ctypes.c_int64] * 7
    lib.mellow_attention.restype = None
    lib.mellow_attention.argtypes = [ctypes.c_void_p, *[ctypes.c_int64] * 3, *[ctypes.c_void_p] * 6,
                                     *[ctypes.c_int64] * 4, ctypes.c_void_p, ctypes.c_int64, ctypes.c_void_p,
                                     ctypes.c_int64]
    for name in ("mellow_attention_native", "mellow_attention_bf16_dots", "mellow_openmp"):
        getattr(lib, name).restype = ctypes.c_int
        getattr(lib, name).argtypes = []
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
    and for choices (a compiler that miscompiles step.c must not change answers; passes.py
    checks its own part of it)."""
    from mellow_cli.runtime.llama import LMConfig

    cfg = LMConfig(vocab_size=96, hidden_size=64, intermediate_size=80, num_hidden_layers=2,
                   num_attention_heads=4, num_key_value_heads=2)
    generator = torch.Generator().manual_seed(0)
    state = random_state(cfg, generator)
    prompt = torch.randn(2, 5, cfg.hidden_size, generator=generator)
    return all(_error(lib, cfg, state, prompt, name) < BOUNDS[name] for name in ("float16", "int8"))


def random_state(cfg, generator: torch.Generator) -> dict[str, torch.Tensor]:
    """Random weights for a LlamaForCausalLM of `cfg`: norms and embeddings of unit scale,
    matrices of 0.1, so the activations stay in range through a few layers."""
    from mellow_cli.runtime.llama import LlamaForCausalLM

    shapes = {k: tuple(v.shape) for k, v in LlamaForCausalLM(cfg).state_dict().items()}
    return {name: torch.randn(shape, generator=generator) * (1.0 if "norm" in name or "embed" in name else 0.1)
            for name, shape in shapes.items()}


def _twins(cfg, state: dict, name: str):
    """(a model prepared in `name`, a float32 model holding the same rounded weights)."""
    from mellow_cli.runtime.llama import LlamaForCausalLM
    from mellow_cli.runtime.matrices import Precision, head_maker, maker, prepare

    precision = Precision(name, name, name, "float32")

    def rounded(matrix) -> torch.nn.Parameter:
        return torch.nn.Parameter(matrix.q.float() * matrix.scale[:, None] if name == "int8" else matrix.weight.float())

    prepared, exact = LlamaForCausalLM(cfg), LlamaForCausalLM(cfg)
    for lm in (prepared, exact):
        lm.load_state_dict(state)
        lm.eval()
    prepare(prepared, precision)
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
                                                positions, None, rotary.data_ptr(), rotary.data_ptr(),
                                                scratch.data_ptr(), logits.data_ptr()))

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
    from mellow_cli.runtime.matrices import Dense, Int8Matrix

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

    def forward(self, ids: torch.Tensor | None, row: list[int], pos: list[int], slot: list[int], group: list[int],
                visible: int, seen: list[int] | None = None, embeds: torch.Tensor | None = None,
                products: bool | None = None) -> torch.Tensor:
        """Tokens `ids` (T,) (or their embeddings `embeds`, (T, hidden)) through the model
        (step.c's mellow_forward says what row, pos, slot, group, visible and seen mean: `seen`
        None, every token sees `visible` positions of its row) -> float32 logits (T, vocab). The
        caller keeps every row, slot and position inside the cache. `products`: through the
        layers' bfloat16 products where the model has them (None: from PRODUCTS_FROM tokens on)."""
        if self._cache() is None:
            raise ValueError("the KV cache is not float32 rows step.c can read: run torch's forward")
        self.dims.threads = torch.get_num_threads()
        x = (self.lm.embed(ids) if embeds is None else embeds).float().contiguous()
        tokens = len(x)
        layers = self.lm.model.layers
        if products is None:
            products = tokens >= PRODUCTS_FROM
        if products and layers[0].prefill is not None and layers[0].prefill.fits(layers[0], x, self.cos, self.sin):
            # Many tokens (choices of a batch): bound by arithmetic, as a prefill is, so through the
            # layers' bfloat16 products where the model has them (passes.PrefillLayer.tokens).
            index = torch.tensor([pos, row, slot, group], dtype=torch.int64)
            x = x[None]
            for layer in layers:
                x = layer.prefill.tokens(layer, x, self.cos, self.sin, index, visible if seen is None else seen)
            return self.lm.head(self.lm.model.norm(x))[0].float()
        logits = torch.empty(tokens, self.dims.vocab)
        need = self.lib.mellow_scratch_floats(ctypes.byref(self.dims), tokens, visible)
        if self.scratch.numel() < need:
            self.scratch = torch.empty(need)
        index = torch.tensor([row, pos, slot, group, seen or [visible] * tokens], dtype=torch.int64)
        self.lib.mellow_forward(ctypes.byref(self.dims), self.pointers, x.data_ptr(), tokens,
                                index[0].data_ptr(), index[1].data_ptr(), index[2].data_ptr(), index[3].data_ptr(),
                                visible, None if seen is None else index[4].data_ptr(), self.cos.data_ptr(),
                                self.sin.data_ptr(), self.scratch.data_ptr(), logits.data_ptr())
        return logits

    def ready(self) -> bool:
        """Whether the KV cache set up now is one step.c reads."""
        return self._cache() is not None

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

    def choices(self, row_of: list[int], ids: list[list[int]], length, positions=None,
                products: bool | None = None) -> list[torch.Tensor]:
        """After a prefill of `length` positions (or each cache row's, a list; `positions`: each
        row's first answer position, as choice_layout says): float32 logits (len(ids[i]) - 1,
        vocab) after each token but the last of each choice i, which follows the prefix of cache
        row row_of[i]. A row's choices take slots of their own after its prefix, each seeing the
        prefix and its own earlier tokens, so the prefix's cache is shared, not copied; the cache
        needs the longest prefix plus the most tokens any row's choices have. `products`: see
        forward."""
        flat, row, pos, slot, group = choice_layout(row_of, ids, length, positions)
        if not flat:
            return [torch.empty(0, self.dims.vocab) for _ in ids]
        lengths = length if isinstance(length, (list, tuple)) else None
        seen = None if lengths is None else [lengths[r] for r in row]
        logits = self.forward(torch.tensor(flat), row, pos, slot, group, length if lengths is None else max(lengths),
                              seen, products=products)
        return list(logits.split([max(len(t) - 1, 0) for t in ids]))

    def choice_logprobs(self, row_of: list[int], ids: list[list[int]], length, positions=None) -> list[torch.Tensor]:
        """Per choice i, the log-probabilities of its tokens after the first (len(ids[i]) - 1 of
        them), as `choices` gives their logits: the choices go a few at a time (choice_chunks), so
        the logits over the vocabulary exist for CHOICE_TOKENS_AT_ONCE tokens at most, and each
        group reuses the slots of the one before. Every group takes the path the whole would."""
        products = sum(len(t) - 1 for t in ids) >= PRODUCTS_FROM
        out = []
        for chunk in choice_chunks(ids):
            chosen = [ids[i] for i in chunk]
            logits = self.choices([row_of[i] for i in chunk], chosen, length, positions, products)
            for tokens, rows in zip(chosen, logits):
                out.append(rows.log_softmax(dim=-1).gather(-1, torch.tensor(tokens[1:])[:, None])[:, 0])
        return out

    def slots_needed(self, row_of: list[int], ids: list[list[int]]) -> int:
        """The most cache slots past the prefix that `choices` of one of choice_chunks' groups
        uses in any one row."""
        used: dict[tuple[int, int], int] = {}
        for c, chunk in enumerate(choice_chunks(ids)):
            for i in chunk:
                used[c, row_of[i]] = used.get((c, row_of[i]), 0) + max(len(ids[i]) - 1, 0)
        return max(used.values(), default=0)
