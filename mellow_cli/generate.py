"""Text generation over Mellow's prefix embeddings: prefill, decode step, sampling, streaming text,
and scoring of answer choices. Only the language model half runs here.

Shaped after pytorch-labs/gpt-fast (`prefill`, `decode_one_token`, `generate`). The forward pass
is a short Llama forward over the language model's own modules and weights (model/llama.py: RMS
norms, rotary table, projections) with a static KV cache of our own: each step costs one position
instead of the whole sequence, it does not depend on transformers' cache API (which changes between
major versions), and it can read float16 matrices while computing in float32 (`fp16_weights`).

Greedy decoding gives token for token what the reference loop gives (soham97/mellow, `wrapper.py:
_generate_batch`): that loop re-runs the full sequence each step and takes the argmax after a top-p
filter that can never remove the top token, so it is greedy whatever its temperature and top_p
say. Sampling here is an opt-in extra.

On CPU one decode step is bound by reading the weights (538 MB in float32). Measured on a 2-core
AVX2 machine (benchmarks/decode_speed.py): float32 runs at about MKL's matrix-vector bandwidth,
slightly ahead of transformers' `generate`; float16 matrices double that; bfloat16 without
AVX512-BF16 and torch.compile (inductor's CPU matrix-vector code) were both slower, so neither is
used.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from mellow_cli.config import DecodingOptions
from mellow_cli.errors import ModelError, UsageError
from mellow_cli.model.llama import rotate

EOS_TOKEN_ID = 0  # `<|endoftext|>` (MellowConfig.eos_token_id)


# --- KV cache and forward pass ---------------------------------------------------------------


@dataclass
class KVCache:
    """Keys and values of every layer for `max_len` positions, plus the rotary table for them."""

    k: torch.Tensor  # (layers, batch, kv_heads, max_len, head_dim)
    v: torch.Tensor
    cos: torch.Tensor  # (max_len, head_dim)
    sin: torch.Tensor

    @classmethod
    def empty(cls, lm, batch: int, max_len: int) -> "KVCache":
        c = lm.config
        head_dim = c.hidden_size // c.num_attention_heads
        w = lm.model.embed_tokens.weight
        shape = (c.num_hidden_layers, batch, c.num_key_value_heads, max_len, head_dim)
        positions = torch.arange(max_len, device=w.device)[None]
        cos, sin = lm.model.rotary_emb(w[:1], positions)
        return cls(w.new_zeros(shape), w.new_zeros(shape), cos[0].to(w.dtype), sin[0].to(w.dtype))

    def rows(self, index: torch.Tensor) -> "KVCache":
        """A copy holding the given batch rows (one row may appear many times)."""
        return KVCache(self.k[:, index], self.v[:, index], self.cos, self.sin)


def _attention(attn, x, cache: KVCache, layer: int, start: int, mask) -> torch.Tensor:
    b, t, _ = x.shape
    d = cache.k.shape[-1]
    q = _linear(attn.q_proj, x).view(b, t, -1, d).transpose(1, 2)
    k = _linear(attn.k_proj, x).view(b, t, -1, d).transpose(1, 2)
    v = _linear(attn.v_proj, x).view(b, t, -1, d).transpose(1, 2)
    cos, sin = cache.cos[start : start + t], cache.sin[start : start + t]
    q, k = rotate(q, cos, sin), rotate(k, cos, sin)
    end = start + t
    cache.k[layer, :, :, start:end] = k
    cache.v[layer, :, :, start:end] = v
    keys, values = cache.k[layer, :, :, :end], cache.v[layer, :, :, :end]
    y = F.scaled_dot_product_attention(q, keys, values, attn_mask=mask, enable_gqa=True)
    return _linear(attn.o_proj, y.transpose(1, 2).reshape(b, t, -1))


def _mlp(mlp, x: torch.Tensor) -> torch.Tensor:
    # SwiGLU, as LlamaMLP with SmolLM2's `silu`
    return _linear(mlp.down_proj, F.silu(_linear(mlp.gate_proj, x)) * _linear(mlp.up_proj, x))


def _linear(module, x: torch.Tensor) -> torch.Tensor:
    """module's weight applied to x. Weights may be float16 (see `fp16_weights`) while activations
    stay float32: one position runs the float16 matrix-vector kernel (half the bytes to read),
    several positions (prefill) run float32 on a temporary upcast, which is faster than float16
    matrix-matrix on CPUs without native half arithmetic."""
    w = module.weight
    if w.dtype == x.dtype:
        return F.linear(x, w)
    if x.shape[-2] == 1:
        return F.linear(x.to(w.dtype), w).to(x.dtype)
    return F.linear(x, w.to(x.dtype))


def _causal_mask(start: int, t: int, device) -> torch.Tensor | None:
    """Query i (at position start + i) sees keys 0 .. start + i. None for one query (sees all)."""
    if t == 1:
        return None
    return torch.ones(t, start + t, dtype=torch.bool, device=device).tril(diagonal=start)


def forward(lm, x: torch.Tensor, start: int, cache: KVCache) -> torch.Tensor:
    """inputs_embeds (B, T, H) at positions start .. start+T-1 -> final hidden states (B, T, H);
    writes the T new keys/values into `cache`, attends to everything cached before them."""
    mask = _causal_mask(start, x.shape[1], x.device)
    for i, layer in enumerate(lm.model.layers):
        x = x + _attention(layer.self_attn, layer.input_layernorm(x), cache, i, start, mask)
        x = x + _mlp(layer.mlp, layer.post_attention_layernorm(x))
    return lm.model.norm(x)


def prefill(lm, prefix: torch.Tensor, cache: KVCache) -> torch.Tensor:
    """The whole (B, P, H) prefix at once -> float32 logits (B, vocab) for the first new token."""
    hidden = forward(lm, prefix.to(cache.k.dtype), 0, cache)
    return _linear(lm.lm_head, hidden[:, -1:])[:, 0].float()


def decode_one_token(lm, token: torch.Tensor, pos: int, cache: KVCache) -> torch.Tensor:
    """token (B,) at position `pos` -> float32 logits (B, vocab) for the next one."""
    hidden = forward(lm, lm.model.embed_tokens(token[:, None]), pos, cache)
    return _linear(lm.lm_head, hidden)[:, 0].float()


def fp16_weights(lm):
    """Opt-in speed: store the matrices that decoding reads (projections, MLP, output head) in
    float16, in place; embeddings, norms, activations and the KV cache stay float32. Each decode
    step then reads half the bytes (about 2x tokens/s on an AVX2 CPU), but the logits move by
    ~1e-2, so greedy output may part from the reference's at a near tie. Afterwards only this
    module's loop can run the model (transformers' own forward cannot mix the dtypes)."""
    head = lm.model.embed_tokens.weight.detach().to(torch.float16)
    lm.lm_head.weight = torch.nn.Parameter(head, requires_grad=False)  # unties: embedding stays float32
    for module in lm.model.layers.modules():
        if isinstance(module, torch.nn.Linear):
            module.weight = torch.nn.Parameter(module.weight.detach().to(torch.float16), requires_grad=False)
    return lm


NOT_FINITE = ("the model's scores became NaN or infinite: the weights or the audio hold values far out of "
              "range (try --dtype float32)")


# --- choosing the next token -----------------------------------------------------------------


def next_token(
    logits: torch.Tensor, options: DecodingOptions, generator: torch.Generator | None = None
) -> torch.Tensor:
    """(B, vocab) -> (B,): argmax unless options.sample; else temperature, top-k, top-p, draw."""
    if not torch.isfinite(logits).all():
        raise ModelError(NOT_FINITE)
    if not options.sample or options.temperature <= 0:
        return logits.argmax(dim=-1)
    logits = logits / options.temperature
    if options.top_k > 0:
        kth = logits.topk(min(options.top_k, logits.shape[-1]), dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if options.top_p < 1.0:
        logits = _top_p(logits, options.top_p)
    return torch.multinomial(logits.softmax(dim=-1), 1, generator=generator)[:, 0]


def _top_p(logits: torch.Tensor, top_p: float) -> torch.Tensor:
    # Keep the most likely tokens until their mass reaches top_p (the token crossing it is kept,
    # as in the reference's filter), drop the rest.
    ordered, order = logits.sort(dim=-1, descending=True)
    probs = ordered.softmax(dim=-1)
    mass_before = probs.cumsum(dim=-1) - probs
    ordered = ordered.masked_fill(mass_before > top_p, float("-inf"))
    return torch.full_like(logits, float("-inf")).scatter(-1, order, ordered)


def _generator(options: DecodingOptions, device) -> torch.Generator | None:
    if not options.sample:
        return None
    generator = torch.Generator(device=device)
    if options.seed is None:
        generator.seed()
    else:
        generator.manual_seed(options.seed)
    return generator


# --- the loop ----------------------------------------------------------------------------------


@torch.inference_mode()
def generate_tokens(
    lm, prefix: torch.Tensor, options: DecodingOptions = DecodingOptions(), eos_id: int = EOS_TOKEN_ID
) -> Iterator[torch.Tensor]:
    """Yields the next token of every row, (B,), step by step, until every row has produced
    `eos_id` or `options.max_tokens` steps. Rows that are done keep being fed, as in the
    reference loop, so a batch yields the same tokens as the reference; callers cut at eos."""
    batch, length, _ = prefix.shape
    cache = KVCache.empty(lm, batch, length + options.max_tokens)
    generator = _generator(options, prefix.device)
    done = torch.zeros(batch, dtype=torch.bool, device=prefix.device)
    logits = prefill(lm, prefix, cache)
    for step in range(options.max_tokens):
        token = next_token(logits, options, generator)
        yield token
        done |= token == eos_id
        if done.all() or step + 1 == options.max_tokens:
            return
        logits = decode_one_token(lm, token, length + step, cache)


class TextStream:
    """One row's tokens -> text pieces. A piece is released only when the decoded text so far no
    longer ends in an incomplete UTF-8 character (U+FFFD), so a multi-byte character is never
    split, and the pieces joined equal `tokenizer.decode` of all the row's tokens."""

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        self.ids: list[int] = []
        self.sent = ""

    def push(self, token_id: int) -> str:
        self.ids.append(token_id)
        text = self.tokenizer.decode(self.ids)
        if text.endswith("\ufffd") or not text.startswith(self.sent):
            return ""
        return self._release(text)

    def flush(self) -> str:
        """Whatever is still held back (at the end, a dangling byte is final)."""
        return self._release(self.tokenizer.decode(self.ids))

    def _release(self, text: str) -> str:
        piece, self.sent = text[len(self.sent):], text
        return piece


def stream(
    lm, tokenizer, prefix: torch.Tensor, options: DecodingOptions = DecodingOptions(),
    eos_id: int = EOS_TOKEN_ID,
) -> Iterator[tuple[int, str]]:
    """Yields (row, text piece) as text becomes final; a row's text ends before its first eos."""
    rows = [TextStream(tokenizer) for _ in range(prefix.shape[0])]
    done = [False] * len(rows)
    for tokens in generate_tokens(lm, prefix, options, eos_id):
        for i, token in enumerate(tokens.tolist()):
            done[i] = done[i] or token == eos_id
            piece = "" if done[i] else rows[i].push(token)
            if piece:
                yield i, piece
    for i, row in enumerate(rows):
        piece = row.flush()
        if piece:
            yield i, piece


def generate(
    lm, tokenizer, prefix: torch.Tensor, options: DecodingOptions = DecodingOptions(),
    eos_id: int = EOS_TOKEN_ID,
) -> list[str]:
    """One answer per prefix row (`stream` gives the same text as it comes)."""
    texts = [""] * prefix.shape[0]
    for i, piece in stream(lm, tokenizer, prefix, options, eos_id):
        texts[i] += piece
    return texts


# --- scoring answer choices --------------------------------------------------------------------


@dataclass(frozen=True)
class ChoiceScore:
    text: str
    logprob: float  # sum of the log-probabilities of the choice's tokens after the prefix
    mean_logprob: float  # the same per token, so long and short choices compare
    tokens: int


@torch.inference_mode()
def score_choices(
    lm, tokenizer, prefix: torch.Tensor, choices: Sequence[str] | Sequence[Sequence[str]],
    append_eos: bool = False, eos_id: int = EOS_TOKEN_ID,
) -> list[list[ChoiceScore]]:
    """Log-probability of each candidate answer given each prefix row (teacher forcing: the
    training view). `choices` is one list for every row, or one list per row. The prefix is run
    once; its cache is copied to every (row, choice) pair, which then run as one batch.
    `append_eos` also scores the end of text after the choice, so "dog" and "dog barking" differ."""
    per_row = _choices_per_row(choices, prefix.shape[0])
    row_of, ids = [], []
    for r, row_choices in enumerate(per_row):
        for text in row_choices:
            tokens = tokenizer(text, add_special_tokens=False)["input_ids"] + ([eos_id] if append_eos else [])
            if not tokens:
                raise UsageError(f"answer choice {text!r} has no tokens")
            row_of.append(r)
            ids.append(tokens)
    logprobs = iter(_choice_logprobs(lm, prefix, torch.tensor(row_of, device=prefix.device), ids))
    return [
        [ChoiceScore(text, float(lp.sum()), float(lp.mean()), len(lp)) for text, lp in zip(row, logprobs)]
        for row in per_row
    ]


def _choices_per_row(choices, batch: int) -> list[list[str]]:
    if not choices:
        raise UsageError("no answer choices given")
    if all(isinstance(c, str) for c in choices):
        return [list(choices)] * batch
    if len(choices) != batch:
        raise UsageError(f"got {len(choices)} lists of choices for {batch} prompts")
    return [list(c) for c in choices]


def _choice_logprobs(lm, prefix, row_of: torch.Tensor, ids: list[list[int]]) -> list[torch.Tensor]:
    """Per choice, the log-probability of each of its tokens (a 1-D tensor)."""
    batch, length, _ = prefix.shape
    longest = max(len(t) for t in ids)
    cache = KVCache.empty(lm, batch, length + longest)
    first = prefill(lm, prefix, cache).log_softmax(dim=-1)[row_of]  # predicts each choice's token 0
    tokens = torch.tensor([t + [0] * (longest - len(t)) for t in ids], device=prefix.device)
    steps = [first]
    if longest > 1:
        # Choices are right-padded: padding only follows a choice's tokens, and causal attention
        # keeps it out of every position we read.
        cache = cache.rows(row_of)
        hidden = forward(lm, lm.model.embed_tokens(tokens[:, :-1]), length, cache)
        steps += _linear(lm.lm_head, hidden).float().log_softmax(dim=-1).unbind(dim=1)
    logprobs = torch.stack(steps, dim=1).gather(-1, tokens[..., None])[..., 0]  # (N, longest)
    return [row[: len(t)] for row, t in zip(logprobs, ids)]
