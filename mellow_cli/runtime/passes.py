"""step.c's work over many positions, between oneDNN's products: a prefill's attention, and
the rest of its layers where they multiply in bfloat16; the choices of a batch go the same way.

A prefill is bound by arithmetic, where oneDNN's products are the fast ones. Around them torch
spent two fifths of a 389-position prefill: its flash attention (~75 ms) and ~20 elementwise
operations a layer, several only widening the bfloat16 products' outputs and rounding the next
inputs back. `Attend` is step.c's attention for many queries (any precision but float32),
`PrefillLayer` the passes between a layer's bfloat16 products (norms, rotary and the cache,
attention, SwiGLU, residual sums). Where the heads' outputs go to a bfloat16 product and the CPU
has AVX512-BF16, the attention's two dot products take bfloat16 inputs too (`bfloat16_dots`
says exactly what that computes). Both use the library fused.py builds; each process checks
them against torch's attention and layers before using them (`attention`).
"""

from __future__ import annotations

import torch

from mellow_cli.runtime.choices import choice_layout
from mellow_cli.runtime.fused import library, random_state, status

ATTENTION_BOUND = 1e-5  # the same for attention, which is float32 throughout (step.c: ~3e-7)
# And for a bfloat16 prefill through PrefillLayer against torch's layers (see prefill_error):
# 0 measured; a norm over one element too few moves it by 2e-2, truncating instead of rounding
# to bfloat16 by 1e-2, SwiGLU without SiLU by 0.2.
PREFILL_BOUND = 2e-3


_checked: list = []  # [(an Attend or None, what happened)], once per process


def attention() -> "Attend | None":
    """step.c's attention for many queries, where fused.py's library is here, its vectors are
    the CPU's own registers (else torch's flash kernel is the faster one) and, checked once per
    process, its attention and bfloat16 layers agree with torch's; else None (torch's run)."""
    if not _checked:
        _checked.append(_check())
    return _checked[0][0]


def prefill_status() -> str:
    """What a prefill's attention and layers run on here, and why (`mellow env`)."""
    attention()
    return _checked[0][1]


def _check() -> tuple["Attend | None", str]:
    lib = library()
    if lib is None:
        return None, "torch's (" + status().removeprefix("torch's (")
    if not lib.mellow_attention_native():
        return None, "torch's (step.c's 16-lane vectors are not this CPU's registers: torch's kernels are the faster)"
    attend = Attend(lib)
    if attention_error(attend) >= ATTENTION_BOUND or prefill_error(lib) >= PREFILL_BOUND:
        return None, "torch's (step.c's prefill passes built here disagreed with torch's, so torch's run)"
    dots = "; its dot products in bfloat16 there (AVX512-BF16)" if lib.mellow_attention_bf16_dots() else ""
    return attend, ("step.c's attention for every precision but float32; its passes between the products "
                    f"where several rows multiply in bfloat16{dots}")


@torch.inference_mode()
def attention_error(attend: "Attend") -> float:
    """The largest difference between `attend` and torch's attention over the same cache, relative
    to the largest output, for a prefill (queries from position 0) and for queries after three
    cached positions, with two rows and two query heads per key/value head."""
    import torch.nn.functional as F

    from mellow_cli.runtime.llama import KVCache, causal_mask

    generator = torch.Generator().manual_seed(1)
    batch, heads, kv_heads, head_dim, tokens = 2, 4, 2, 16, 21
    worst = 0.0
    for start in (0, 3):
        qk = torch.randn(batch, tokens, heads + kv_heads, head_dim, generator=generator)
        cache = KVCache(batch, kv_heads, start + tokens + 2, head_dim, torch.float32, "cpu")
        cache.k.normal_(generator=generator)
        cache.v.normal_(generator=generator)
        k, v = cache.k[:, :, : start + tokens], cache.v[:, :, : start + tokens]
        mask = causal_mask(tokens, start + tokens)
        expected = F.scaled_dot_product_attention(qk[:, :, :heads].transpose(1, 2), k, v, attn_mask=mask,
                                                  enable_gqa=True).transpose(1, 2).reshape(batch, tokens, -1)
        got = attend(qk, heads, cache, start)
        worst = max(worst, float((got - expected).abs().max() / expected.abs().max()))
    return worst


def bfloat16_dots(qk: torch.Tensor, heads: int, cache, start: int) -> torch.Tensor:
    """What step.c's attention computes, in torch, where it takes bfloat16 dot products (a
    bfloat16 output on a CPU with AVX512-BF16; `Attend`'s arguments, float32 out). The scores are
    the dot products of q and k rounded to bfloat16, summed in float32; the softmax is float32;
    its weights, rounded to bfloat16, weigh the values (rounded too: exact where a bfloat16
    product made them), and the float32 sum of the unrounded weights divides. On SmolLM2 this
    moves MMAU choices' log-probabilities no further from float32's than the bfloat16 products
    already do. For the checks, not for speed."""
    from mellow_cli.runtime.llama import causal_mask

    batch, tokens, _, head_dim = qk.shape
    kv_heads, seen = cache.k.shape[1], start + tokens

    def rounded(x):
        return x.to(torch.bfloat16).float()

    group = heads // kv_heads
    q = rounded(qk[:, :, :heads].transpose(1, 2))
    k = rounded(cache.k[:, :, :seen]).repeat_interleave(group, dim=1)
    v = rounded(cache.v[:, :, :seen]).repeat_interleave(group, dim=1)
    scores = (q @ k.transpose(-1, -2)) * head_dim**-0.5
    causal = causal_mask(tokens, seen)
    weights = (scores - scores.masked_fill(~causal, float("-inf")).amax(-1, keepdim=True)).exp() * causal
    out = (rounded(weights) @ v) / weights.sum(-1, keepdim=True)
    return out.transpose(1, 2).reshape(batch, tokens, heads * head_dim)


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
    from mellow_cli.runtime.llama import LlamaForCausalLM, LMConfig
    from mellow_cli.runtime.matrices import Precision, packed_available, prepare

    # 88: SwiGLU runs in 16-lane vectors and a tail
    cfg = LMConfig(vocab_size=96, hidden_size=64, intermediate_size=88, num_hidden_layers=2,
                   num_attention_heads=4, num_key_value_heads=2)
    generator = torch.Generator().manual_seed(seed)
    lm = LlamaForCausalLM(cfg)
    lm.load_state_dict(random_state(cfg, generator))
    prepare(lm.eval(), Precision("bfloat16", "bfloat16", "bfloat16", "bfloat16",
                                 packed=packed_available(torch.bfloat16)))
    prompt = torch.randn(2, 21, cfg.hidden_size, generator=generator)

    # Torch's layers, with the attention step.c's does (torch's own where it takes float32 dots)
    reference = bfloat16_dots if lib.mellow_attention_bf16_dots() else None

    def run(layer_pass):
        for layer in lm.model.layers:
            layer.prefill = layer_pass
            layer.self_attn.attend = None if layer_pass else reference
        lm.setup_cache(2, 23)
        hidden = lm.hidden(inputs_embeds=prompt, start=0)
        return [hidden] + [t.clone() for layer in lm.model.layers for t in (layer.self_attn.kv_cache.k,
                                                                             layer.self_attn.kv_cache.v)]

    layer_pass = PrefillLayer(Attend(lib))
    expected, got = run(None), run(layer_pass)
    worst = max(float((g - e).abs().max() / e.abs().max()) for g, e in zip(got, expected))

    # Choices through the layer pass, each row's after its prefix in slots of its own, against
    # torch's layers on a copy of the row's cache per choice.
    # Each choice has two tokens or more before its last: torch's layers run a single token as a
    # decode step, with torch's attention, not the one step.c's does for choices.
    row_of, ids = [0, 1, 1, 1], [[5, 7, 9], [11, 13, 15], [17, 19, 21, 23], [25]]
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

    def __init__(self, attend: Attend):
        self.lib, self.attend = attend.lib, attend

    def __call__(self, layer, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, start: int,
                 keep: int = 0) -> torch.Tensor | None:
        """DecoderLayer.forward's arguments (cos and sin: RotaryEmbedding.span of the new
        positions): every row's next positions start.. of its own cache row; the output at each
        row's last `keep` of them (0: all)."""
        cache = layer.self_attn.kv_cache
        batch, tokens, _ = x.shape
        if not self.fits(layer, x, cos, sin):
            return None
        t = torch.arange(tokens).repeat(batch)
        index = torch.stack([t, torch.arange(batch).repeat_interleave(tokens), start + t])
        d = layer.self_attn.head_dim
        heads = layer.self_attn.sizes[0] // d
        first = tokens - keep if 0 < keep < tokens else 0
        return self._layer(layer, x, cos, sin, index, lambda qk: self.attend(qk.view(batch, tokens - first, -1, d), heads,
                                                                           cache, start + first, torch.bfloat16), first)

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
               attend, first: int = 0) -> torch.Tensor:
        """The layer, with k and v stored at (row, slot) = index[1], index[2], rotary row index[0]
        of cos and sin, and `attend` (rotated q and k -> the heads' outputs in bfloat16); the
        output at each row's positions from `first` on, the others' keys and values cached."""
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
        if first:  # from here on only the positions whose output is wanted
            qk, x = qk[:, first:].contiguous(), x[:, first:].contiguous()
            tokens, n = tokens - first, batch * (tokens - first)
            normed = torch.empty(batch, tokens, hidden, dtype=torch.bfloat16)
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


def _bfloat16(product: torch.Tensor) -> torch.Tensor:
    """A product's output as PrefillLayer reads it (its matrices give bfloat16 for bfloat16)."""
    if product.dtype != torch.bfloat16:
        raise ValueError(f"a bfloat16 product gave {product.dtype}: PrefillLayer is for bfloat16 prefills")
    return product.contiguous()
