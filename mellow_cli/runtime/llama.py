"""SmolLM2-135M (a Llama) in plain torch, with the module and parameter names of transformers'
`LlamaForCausalLM`, so the language model's keys in every family's checkpoint load into it unchanged.

Why not transformers' class itself: importing `transformers.LlamaForCausalLM` costs about 4 s on a
2-core CPU (it pulls in torch._dynamo, torch.distributed and scipy), longer than loading the whole
cached model. The network is small and standard; tests/test_llama.py checks it against
transformers' `LlamaForCausalLM` logit for logit, on random and on the real SmolLM2 weights, and
transformers stays the baseline that benchmarks compare against.

One forward serves training (the whole sequence, causally) and inference (prefill, decode steps
and choice scoring against a KV cache held inside each attention module, as in gpt-fast);
generate.py only drives it.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn


@dataclass(frozen=True)
class LMConfig:
    """A SmolLM2's sizes under transformers' names. Every family's config carries these fields
    (so the family's config builds its language model directly); this one builds a language model
    alone (the per-machine checks of the C step, tests, benchmarks)."""

    vocab_size: int = 49152
    hidden_size: int = 576
    intermediate_size: int = 1536
    num_hidden_layers: int = 30
    num_attention_heads: int = 9
    num_key_value_heads: int = 3
    max_position_embeddings: int = 8192
    rope_theta: float = 100000.0
    rms_norm_eps: float = 1e-5
    eos_token_id: int = 0  # `<|endoftext|>`
    name: str = "smollm2-135m"


class RMSNorm(nn.Module):
    """transformers' LlamaRMSNorm: normalise in float32, scale in the input's dtype."""

    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dtype == torch.float32 and self.weight.dtype == torch.float32:
            return F.rms_norm(x, (x.shape[-1],), self.weight, self.eps)  # one kernel, the same sums
        h = x.float()
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * h.to(x.dtype)


class RotaryEmbedding(nn.Module):
    """cos/sin tables of Llama's rotary position embedding ("rotate half" layout)."""

    def __init__(self, cfg: LMConfig, device=None):
        super().__init__()
        dim = cfg.hidden_size // cfg.num_attention_heads
        # Computed on the CPU even inside `with torch.device("meta")`: see frontend.constant.
        exponent = torch.arange(0, dim, 2, dtype=torch.int64, device="cpu").float() / dim
        inv_freq = 1.0 / (cfg.rope_theta**exponent)
        # Not in the checkpoint: recomputed on the weights' device after a meta build (init_rotary).
        self.register_buffer("inv_freq", inv_freq.to(device or torch.get_default_device()), persistent=False)
        self._table: tuple[torch.Tensor, torch.Tensor] | None = None

    @torch.no_grad()
    def forward(self, x: torch.Tensor, position_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """position_ids (B, T) -> cos, sin (B, T, head_dim) in x's dtype."""
        freqs = position_ids[..., None].float() * self.inv_freq.float()
        emb = torch.cat([freqs, freqs], dim=-1)
        return emb.cos().to(x.dtype), emb.sin().to(x.dtype)

    def span(self, start: int, end: int, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """cos and signed sin (end - start, 1, head_dim) for positions start .. end-1, to multiply
        activations laid out (B, T, heads, head_dim) (see `rotate`); sliced from a table computed
        once (and grown when a longer sequence comes), so a decode step allocates none."""
        table = self._table
        if table is None or table[0].shape[0] < end or table[0].dtype != dtype or table[0].device != self.inv_freq.device:
            length = max(end, 1024 if table is None else 2 * table[0].shape[0])
            positions = torch.arange(length, device=self.inv_freq.device)[None]
            cos, sin = self(torch.empty(0, dtype=dtype), positions)
            half = sin.shape[-1] // 2
            signed = torch.cat([-sin[0, :, :half], sin[0, :, half:]], dim=-1)  # negation is exact
            self._table = (cos[0, :, None], signed[:, None])
        return self._table[0][start:end], self._table[1][start:end]


def rotate(x: torch.Tensor, cos: torch.Tensor, signed_sin: torch.Tensor) -> torch.Tensor:
    """Llama's "rotate half": x * cos + (-x2, x1) * sin, with x2's minus sign kept in the table
    (`span`), so the swap of halves is one roll and the products and sums are the reference's."""
    return x * cos + x.roll(x.shape[-1] // 2, dims=-1) * signed_sin


def causal_mask(queries: int, seen: int, device=None) -> torch.Tensor:
    """(queries, seen) bool: the last `queries` of `seen` positions, each seeing the keys up to
    its own position (a prefill's, choices after a cached prefix, a prefill's last few)."""
    return torch.ones(queries, seen, dtype=torch.bool, device=device).tril(seen - queries)


# A weight matrix prepared for inference (precision.py makes them): called on activations (B, T, in)
# it returns (B, T, out) in their dtype; `nbytes` is what one product reads.
Matrix = Callable[[torch.Tensor], torch.Tensor]


def project(x: torch.Tensor, matrix: Matrix | None, *linears: nn.Linear) -> torch.Tensor:
    """x through the prepared matrix if there is one, else through the modules (training), their
    outputs side by side as the prepared matrix stacks them."""
    if matrix is not None:
        return matrix(x)
    outputs = [m(x) for m in linears]
    return outputs[0] if len(outputs) == 1 else torch.cat(outputs, dim=-1)


class KVCache(nn.Module):
    """One layer's keys and values for `max_len` positions of `batch` rows, written in place."""

    def __init__(self, batch: int, kv_heads: int, max_len: int, head_dim: int, dtype, device):
        super().__init__()
        shape = (batch, kv_heads, max_len, head_dim)
        self.register_buffer("k", torch.zeros(shape, dtype=dtype, device=device), persistent=False)
        self.register_buffer("v", torch.zeros(shape, dtype=dtype, device=device), persistent=False)

    def update(self, start, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Store k, v (B, kv_heads, T, D) at start .. start+T of every row; everything cached up to
        there. `start` may instead be a `Slots`: each token at a slot of its own cache row."""
        if isinstance(start, Slots):
            rows, slots = start.rows[:, None], start.slots
            self.k[rows, :, slots] = k.transpose(1, 2)
            self.v[rows, :, slots] = v.transpose(1, 2)
            return self.k[start.rows], self.v[start.rows]
        end = start + k.shape[2]
        self.k[:, :, start:end] = k
        self.v[:, :, start:end] = v
        return self.k[:, :, :end], self.v[:, :, :end]


@dataclass(frozen=True)
class Slots:
    """Where new tokens go when rows differ: token t of batch row b is stored at slot slots[b, t]
    of cache row rows[b] (LlamaForCausalLM.forward_rows)."""

    rows: torch.Tensor  # (B,) int64
    slots: torch.Tensor  # (B, T) int64


class Attention(nn.Module):
    def __init__(self, cfg: LMConfig):
        super().__init__()
        self.head_dim = cfg.hidden_size // cfg.num_attention_heads
        kv = cfg.num_key_value_heads * self.head_dim
        self.sizes = (cfg.hidden_size, kv, kv)
        self.q_proj = nn.Linear(cfg.hidden_size, cfg.hidden_size, bias=False)
        self.k_proj = nn.Linear(cfg.hidden_size, kv, bias=False)
        self.v_proj = nn.Linear(cfg.hidden_size, kv, bias=False)
        self.o_proj = nn.Linear(cfg.hidden_size, cfg.hidden_size, bias=False)
        self.qkv: Matrix | None = None  # q, k, v as one matrix, and o, for inference (prepare)
        self.out: Matrix | None = None
        self.kv_cache: KVCache | None = None
        # Several queries' attention against the cache, the same arithmetic as the
        # scaled_dot_product_attention below (passes.Attend), or None; set by precision.apply.
        self.attend: Callable | None = None

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, start: int | None,
                mask: torch.Tensor | None, keep: int = 0) -> torch.Tensor:
        """The output at every position of x, or at its last `keep` (0: all); every position's
        keys and values are made, and cached, either way."""
        b, t, _ = x.shape
        qkv = project(x, self.qkv, self.q_proj, self.k_proj, self.v_proj)
        heads = qkv.view(b, t, -1, self.head_dim)  # q's heads, then k's, then v's
        q_heads = self.sizes[0] // self.head_dim
        kv_heads = self.sizes[1] // self.head_dim
        qk = rotate(heads[:, :, : q_heads + kv_heads], cos, sin)  # q and k in one pass
        q, k = qk[:, :, :q_heads].transpose(1, 2), qk[:, :, q_heads:].transpose(1, 2)
        v = heads[:, :, q_heads + kv_heads :].transpose(1, 2)
        first = t - keep if 0 < keep < t else 0  # the first position whose output is wanted
        if first:
            qk, q = qk[:, first:].contiguous(), q[:, :, first:]
        y = None
        if start is not None:
            k, v = self.kv_cache.update(start, k, v)
            if t - first > 1 and self.attend is not None and isinstance(start, int):  # a prefill, in C where set up
                y = self.attend(qk, q_heads, self.kv_cache, start + first)
        if y is None:
            # Without a cache, or from position 0 (prefill), the mask is plain causal; a decode
            # step (one query) sees every key; several queries after a cached prefix get `mask`;
            # a prefill's last queries see the keys up to their own positions (the last, all).
            if first:
                mask = None if t - first == 1 else causal_mask(t - first, k.shape[2], x.device)
            causal = mask is None and t - first > 1
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal, enable_gqa=True)
            y = y.transpose(1, 2).reshape(b, t - first, -1)
        return project(y, self.out, self.o_proj)


class MLP(nn.Module):
    """SwiGLU with SiLU, as SmolLM2."""

    def __init__(self, cfg: LMConfig):
        super().__init__()
        self.gate_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=False)
        self.up_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=False)
        self.down_proj = nn.Linear(cfg.intermediate_size, cfg.hidden_size, bias=False)
        self.gate_up: Matrix | None = None  # gate and up as one matrix, and down (prepare)
        self.down: Matrix | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = project(x, self.gate_up, self.gate_proj, self.up_proj).chunk(2, dim=-1)
        return project(F.silu(gate) * up, self.down, self.down_proj)


class DecoderLayer(nn.Module):
    def __init__(self, cfg: LMConfig):
        super().__init__()
        self.self_attn = Attention(cfg)
        self.mlp = MLP(cfg)
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        # This forward over several positions a row against the cache, with the elementwise
        # work in C between bfloat16 products (passes.PrefillLayer), or None; set by precision.apply.
        self.prefill: Callable | None = None

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, start: int | None = None,
                mask: torch.Tensor | None = None, keep: int = 0) -> torch.Tensor:
        """The layer's output at every position of x, or at its last `keep` (see Attention)."""
        if self.prefill is not None and isinstance(start, int) and x.shape[1] > 1:
            y = self.prefill(self, x, cos, sin, start, keep)
            if y is not None:
                return y
        mixed = self.self_attn(self.input_layernorm(x), cos, sin, start, mask, keep)
        x = x[:, x.shape[1] - mixed.shape[1]:] + mixed
        return x + self.mlp(self.post_attention_layernorm(x))


class LlamaModel(nn.Module):
    def __init__(self, cfg: LMConfig):
        super().__init__()
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(cfg) for _ in range(cfg.num_hidden_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.rotary_emb = RotaryEmbedding(cfg)


@dataclass
class CausalLMOutput:
    logits: torch.Tensor  # (B, T, vocab), or the last `logits_to_keep` positions


class LlamaForCausalLM(nn.Module):
    """The language model: `model.*` and a `lm_head` tied to the token embedding.

    One forward serves every use. Without `start` it runs the whole sequence causally (training,
    and the reference's re-run-everything view). With `start` it runs positions start .. start+T-1
    against the KV cache that `setup_cache` put inside each attention module: prefill (start 0,
    the whole prefix), a decode step (T = 1) and choice scoring (T = a choice's tokens). Once
    prepared in half precision or int8, a decode step (of any number of rows) runs as one call
    into C where the machine can build it (runtime/fused.py, which also scores choices for
    generate.py): the same arithmetic on the same cache, without the per-operation overhead
    that is a third of an eager step. A prefill's attention (Attention.attend) and, between
    bfloat16 products, the rest of its layers (DecoderLayer.prefill) can run there too."""

    def __init__(self, cfg: LMConfig):
        super().__init__()
        self.config = cfg  # the sizes under their transformers names, which these are
        self.model = LlamaModel(cfg)
        self.lm_head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        self.lm_head.weight = self.model.embed_tokens.weight
        self.head_matrix: Matrix | None = None
        self.fused = None  # a one-call decode step (runtime/fused.py), set by precision.apply

    def embed(self, input_ids: torch.Tensor) -> torch.Tensor:
        """Token embeddings (..., H) in the activations' dtype: rows of the table, or, once
        `prepare` has dropped the table, the same rows of the head's matrix (the two are tied)."""
        if self.model.embed_tokens.weight.numel() == 0 and self.head_matrix is not None:
            return self.head_matrix.lookup(input_ids).to(self.model.embed_tokens.weight.dtype)
        return self.model.embed_tokens(input_ids)

    def setup_cache(self, batch: int, max_len: int, dtype: torch.dtype | None = None) -> None:
        """A fresh KV cache in every layer for `batch` rows of up to `max_len` positions."""
        c, w = self.config, self.model.embed_tokens.weight
        head_dim = c.hidden_size // c.num_attention_heads
        for layer in self.model.layers:
            layer.self_attn.kv_cache = KVCache(batch, c.num_key_value_heads, max_len, head_dim,
                                               dtype or w.dtype, w.device)

    def select_cache_rows(self, index: torch.Tensor) -> None:
        """Keep the given batch rows of every layer's cache (a row may be taken many times)."""
        for layer in self.model.layers:
            cache = layer.self_attn.kv_cache
            cache.k, cache.v = cache.k[index], cache.v[index]

    def forward(self, input_ids: torch.Tensor | None = None, inputs_embeds: torch.Tensor | None = None,
                logits_to_keep: int = 0, start: int | None = None) -> CausalLMOutput:
        if self.fused is not None and self.fused.takes(input_ids, inputs_embeds, start):
            return CausalLMOutput(self.fused(input_ids[:, 0], start))
        return CausalLMOutput(self.head(self.hidden(input_ids, inputs_embeds, start, logits_to_keep), logits_to_keep))

    def hidden(self, input_ids: torch.Tensor | None = None, inputs_embeds: torch.Tensor | None = None,
               start: int | None = None, keep: int = 0) -> torch.Tensor:
        """Final hidden states (B, T, H) after the last norm, or of the last `keep` positions: the
        last layer then computes only those (its keys and values still go to the cache for every
        position), as no later layer reads the others (a prefill keeps one: 1/30 of its work)."""
        x = self.embed(input_ids) if inputs_embeds is None else inputs_embeds
        t = x.shape[1]
        cos, sin = self.model.rotary_emb.span(start or 0, (start or 0) + t, x.dtype)
        mask = None
        if start and t > 1:  # query i (at start + i) sees keys 0 .. start + i
            mask = causal_mask(t, start + t, x.device)
        last = len(self.model.layers) - 1
        for i, layer in enumerate(self.model.layers):
            x = layer(x, cos, sin, start, mask, keep if i == last else 0)
        return self.model.norm(x)

    def forward_rows(self, x: torch.Tensor, rows: torch.Tensor, positions: torch.Tensor, slots: torch.Tensor,
                     seen: torch.Tensor, own: bool = True) -> torch.Tensor:
        """New tokens of rows that differ, against the cache: x (B, T, H) their embeddings; token t
        of batch row b belongs to cache row rows[b], sits at rotary position positions[b, t], is
        stored at slot slots[b, t], and sees that cache row's slots 0 .. seen[b]-1 and, with `own`,
        the slots of its row's tokens up to itself (without: none of them, not even its own: a
        query whose key no token reads). -> float32 logits (B, T, vocab)."""
        batch, tokens, _ = x.shape
        cos, sin = self.model.rotary_emb.span(0, int(positions.max()) + 1, x.dtype)
        cos, sin = cos[positions], sin[positions]  # (B, T, 1, D)
        width = self.model.layers[0].self_attn.kv_cache.k.shape[2]
        keys = torch.arange(width, device=x.device)
        mask = (keys < seen[:, None, None]).expand(batch, tokens, width).clone()
        if own:
            earlier = torch.ones(tokens, tokens, dtype=torch.bool, device=x.device).tril()
            mask.scatter_(2, slots[:, None, :].expand(batch, tokens, tokens), earlier.expand(batch, -1, -1))
        where = Slots(rows, slots)
        for layer in self.model.layers:
            x = layer(x, cos, sin, where, mask[:, None])
        return self.head(self.model.norm(x)).float()

    def head(self, hidden: torch.Tensor, logits_to_keep: int = 0) -> torch.Tensor:
        """Logits (B, T, vocab) of the last `logits_to_keep` positions (0: all)."""
        hidden = hidden[:, -logits_to_keep:] if logits_to_keep else hidden
        return project(hidden, self.head_matrix, self.lm_head)

    @torch.no_grad()
    def prepare(self, matrix: Callable[[torch.Tensor], Matrix],
                release: Callable[[list[torch.Tensor]], object] | None = None,
                head: Callable[[torch.Tensor], Matrix] | None = None) -> "LlamaForCausalLM":
        """For inference: every layer's q, k, v as one matrix and gate, up as another (four
        products per layer instead of seven), each made by `matrix` from the float weights, which
        are then dropped (the prepared matrices are the only copy), each layer's handed to
        `release` first (loading frees their memory-mapped pages); the output head is made by
        `head` (default: `matrix`). Training needs the modules' own weights: prepare a copy, or
        load again."""
        for layer in self.model.layers:
            attn, mlp = layer.self_attn, layer.mlp
            originals = [m.weight.detach() for m in layer.modules() if isinstance(m, nn.Linear)]
            attn.qkv = matrix(torch.cat([attn.q_proj.weight, attn.k_proj.weight, attn.v_proj.weight]))
            attn.out = matrix(attn.o_proj.weight)
            mlp.gate_up = matrix(torch.cat([mlp.gate_proj.weight, mlp.up_proj.weight]))
            mlp.down = matrix(mlp.down_proj.weight)
            for m in (attn.q_proj, attn.k_proj, attn.v_proj, attn.o_proj, mlp.gate_proj, mlp.up_proj, mlp.down_proj):
                m.weight = nn.Parameter(m.weight.new_empty(0), requires_grad=False)
            if release is not None:
                release(originals)
            del originals
        self.head_matrix = (head or matrix)(self.lm_head.weight)
        if hasattr(self.head_matrix, "lookup"):
            # The head keeps the table's values as a plain matrix (half precision, say): token
            # embeddings are read from it and the table itself goes (113 MB in float32 for v0).
            # The parameter stays, empty, to name the activations' dtype and device.
            table = self.model.embed_tokens.weight.detach()
            self.model.embed_tokens.weight = nn.Parameter(table.new_empty(0), requires_grad=False)
            self.lm_head.weight = self.model.embed_tokens.weight
            if release is not None:
                release([table])
            del table
        return self

    @property
    def prepared(self) -> bool:
        return self.head_matrix is not None

    def matrices(self) -> list:
        """The prepared matrices, in the order a step reads them."""
        found = []
        for layer in self.model.layers:
            found += [layer.self_attn.qkv, layer.self_attn.out, layer.mlp.gate_up, layer.mlp.down]
        return [*found, self.head_matrix] if self.prepared else []


def init_rotary(lm: LlamaForCausalLM) -> None:
    """Give the rotary table real values on the weights' device (after a meta-device build)."""
    lm.model.rotary_emb = RotaryEmbedding(lm.config, device=lm.model.embed_tokens.weight.device)


def transformers_twin(lm: LlamaForCausalLM):
    """transformers' own `LlamaForCausalLM` holding the same weights (shared, not copied): the
    reference that tests check this module against and the baseline benchmarks race."""
    from transformers import LlamaConfig
    from transformers import LlamaForCausalLM as Reference

    cfg = lm.config
    config = LlamaConfig(
        vocab_size=cfg.vocab_size,
        hidden_size=cfg.hidden_size,
        intermediate_size=cfg.intermediate_size,
        num_hidden_layers=cfg.num_hidden_layers,
        num_attention_heads=cfg.num_attention_heads,
        num_key_value_heads=cfg.num_key_value_heads,
        max_position_embeddings=cfg.max_position_embeddings,
        rope_parameters={"rope_type": "default", "rope_theta": cfg.rope_theta},
        rms_norm_eps=cfg.rms_norm_eps,
        tie_word_embeddings=True,
        bos_token_id=cfg.eos_token_id,  # SmolLM2 uses `<|endoftext|>` for both
        eos_token_id=cfg.eos_token_id,
        pad_token_id=None,  # SmolLM2 has none; `!` (our padding) is a real, trained token
    )
    config._attn_implementation = "sdpa"
    with torch.device("meta"):
        twin = Reference(config)
    twin.load_state_dict(lm.state_dict(), strict=True, assign=True)
    twin.lm_head.weight = twin.model.embed_tokens.weight
    with torch.device(lm.model.embed_tokens.weight.device):  # its table is not in the state dict
        twin.model.rotary_emb = type(twin.model.rotary_emb)(config)
    return twin.eval()
