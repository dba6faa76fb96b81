"""Text generation over a prefix (runtime/prefix.py): prefill, decode step, sampling, streaming text,
and scoring of answer choices. Only the language model half runs here.

Shaped after pytorch-labs/gpt-fast (`prefill`, `decode_one_token`, `generate`): each drives the
language model's one forward (runtime/llama.py) against the static KV cache inside its attention
modules, so a step costs one position instead of the whole sequence and does not depend on
transformers' cache API (which changes between major versions). How the matrices are stored and
multiplied (--dtype) is precision.py's business; the loop here is the same for all.

Greedy decoding gives token for token what the reference loop gives (soham97/mellow, `wrapper.py:
_generate_batch`): that loop re-runs the full sequence each step and takes the argmax after a top-p
filter that can never remove the top token, so it is greedy whatever its temperature and top_p
say. Sampling here is an opt-in extra.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from mellow_cli.runtime.options import DecodingOptions
from mellow_cli.errors import ModelError, UsageError

if TYPE_CHECKING:
    from mellow_cli.runtime.prefix import Prefix

EOS_TOKEN_ID = 0  # `<|endoftext|>`, where SmolLM2 ends an answer


# --- prefill and decode over the language model's one forward (runtime/llama.py) ---------------


def activation_dtype(lm) -> torch.dtype:
    """What the hidden states and the KV cache are held in: the embedding's dtype (float32 on a
    CPU whatever the matrices are stored in, see precision.py)."""
    return lm.model.embed_tokens.weight.dtype


def prefill(lm, prefix: torch.Tensor) -> torch.Tensor:
    """The whole (B, P, H) prefix into the cache set up by `lm.setup_cache` -> float32 logits
    (B, vocab) for the first new token."""
    return lm(inputs_embeds=prefix.to(activation_dtype(lm)), logits_to_keep=1, start=0).logits[:, 0].float()


def decode_one_token(lm, token: torch.Tensor, pos: int) -> torch.Tensor:
    """token (B,) at position `pos` -> float32 logits (B, vocab) for the next one."""
    return lm(input_ids=token[:, None], start=pos).logits[:, 0].float()


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
    # Shifted so the top token is 0 and in float64: a tiny temperature then sends the others to
    # -inf (greedy in the limit) instead of overflowing every logit into inf - inf = NaN.
    logits = (logits.double() - logits.max(dim=-1, keepdim=True).values.double()) / options.temperature
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


class Session:
    """One batch's answers, token by token: its prefix in the KV cache, then a token per row at a
    time (prefix.py says how rows that differ are laid out). A batch whose rows are alike runs
    as it always has: one prefill, then decode steps at one position for every row."""

    def __init__(self, lm, prefix: "Prefix | torch.Tensor", extra: int):
        """`extra`: cache slots after the longest prefix (the answer's longest, or the choices')."""
        from mellow_cli.runtime.prefix import Prefix

        self.lm = lm
        self.prefix = prefix if isinstance(prefix, Prefix) else Prefix.uniform(prefix)
        self.rows = list(range(self.prefix.batch))  # which cache row each live row is
        self.slots = list(self.prefix.lengths)  # each live row's next cache slot
        self.positions = list(self.prefix.positions)  # and the rotary position there
        lm.setup_cache(self.prefix.batch, self.prefix.width + extra, activation_dtype(lm))

    def first(self) -> torch.Tensor:
        """The prefix into the cache -> float32 logits (B, vocab) for each row's first token."""
        p, lm = self.prefix, self.lm
        embeds = p.embeds.to(activation_dtype(lm))
        if p.alike:
            return prefill(lm, embeds)
        # Right-padded rows: causal attention keeps the padding out of every real position, and
        # each row's answer overwrites its padding's slots before anything reads them.
        keep = p.width - min(p.lengths) + 1
        hidden = lm.hidden(inputs_embeds=embeds, start=0, keep=keep)
        last = torch.tensor([n - 1 - (p.width - keep) for n in p.lengths], device=embeds.device)
        # Each row's last position through the head alone, as a row's own prefill takes it.
        logits = lm.head(hidden[torch.arange(p.batch, device=embeds.device), last][:, None])[:, 0].float()
        if p.query_rows:
            rows = list(p.query_rows)
            at = [p.lengths[r] for r in rows]  # a slot the first answer token then overwrites
            logits[rows] = self._run(None, rows, list(p.query_positions), at, at, own=False,
                                     embeds=p.queries.to(embeds.dtype))
        return logits

    def step(self, tokens: torch.Tensor) -> torch.Tensor:
        """Each live row's next token (B,) -> float32 logits (B, vocab) for the one after."""
        if self.prefix.alike and len(set(self.slots)) == 1:
            logits = decode_one_token(self.lm, tokens, self.slots[0])
        else:
            logits = self._run(tokens, list(range(len(self.rows))), self.positions, self.slots, self.slots, own=True)
        self.slots = [s + 1 for s in self.slots]
        self.positions = [q + 1 for q in self.positions]
        return logits

    def keep(self, live: list[int]) -> None:
        """Only these live rows go on (their indexes among the live rows)."""
        self.lm.select_cache_rows(torch.tensor(live, device=self.prefix.embeds.device))
        self.rows = [self.rows[i] for i in live]
        self.slots = [self.slots[i] for i in live]
        self.positions = [self.positions[i] for i in live]

    def _run(self, ids, rows: list[int], positions: list[int], slots: list[int], seen: list[int], own: bool,
             embeds: torch.Tensor | None = None) -> torch.Tensor:
        """One token for each of cache rows `rows` at its own position and slot, seeing its
        row's first `seen` slots (and itself, with `own`): through the one-call step where the
        model has it, else torch's layers."""
        fused = getattr(self.lm, "fused", None)
        if fused is not None and fused.ready():
            return fused.forward(ids, rows, positions, slots, list(range(len(rows))) if own else [-1] * len(rows),
                                 max(seen), seen, embeds=embeds)
        device = self.prefix.embeds.device
        x = (self.lm.embed(ids[:, None]) if embeds is None else embeds[:, None]).to(activation_dtype(self.lm))

        def column(values):
            return torch.tensor(values, device=device)

        return self.lm.forward_rows(x, column(rows), column(positions)[:, None], column(slots)[:, None],
                                    column(seen), own)[:, 0]


@torch.inference_mode()
def generate_tokens(
    lm, prefix: "Prefix | torch.Tensor", options: DecodingOptions = DecodingOptions(), eos_id: int = EOS_TOKEN_ID
) -> Iterator[torch.Tensor]:
    """Yields the next token of every row, (B,), step by step, until every row has produced
    `eos_id` or `options.budget` steps. Rows that are done keep being fed, as in the
    reference loop, so a batch yields the same tokens as the reference; callers cut at eos."""
    session = Session(lm, prefix, options.budget)
    device = session.prefix.embeds.device
    generator = _generator(options, device)
    done = torch.zeros(session.prefix.batch, dtype=torch.bool, device=device)
    logits = session.first()
    for step in range(options.budget):
        token = next_token(logits, options, generator)
        yield token
        done |= token == eos_id
        if done.all() or step + 1 == options.budget:
            return
        logits = session.step(token)


class TextStream:
    """One row's tokens -> text pieces. A piece is released only when the decoded text so far no
    longer ends in an incomplete UTF-8 character (U+FFFD), so a multi-byte character is never
    split, and the pieces joined equal `tokenizer.decode` of all the row's tokens, except for
    an incomplete character at the very end, which is dropped."""

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
        """Whatever is still held back. An answer cut by max_tokens can stop inside a multi-byte
        character; its first bytes decode only to U+FFFD, so that character is left out: an
        answer holds whole characters only."""
        return self._release(self.tokenizer.decode(self.ids).rstrip("\ufffd"))

    def _release(self, text: str) -> str:
        piece, self.sent = text[len(self.sent):], text
        return piece


def stream(
    lm, tokenizer, prefix: "Prefix | torch.Tensor", options: DecodingOptions = DecodingOptions(),
    eos_id: int = EOS_TOKEN_ID,
) -> Iterator[tuple[int, str]]:
    """Yields (row, text piece) as text becomes final; a row's text ends before its first eos."""
    rows = [TextStream(tokenizer) for _ in range(len(prefix))]
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
    lm, tokenizer, prefix: "Prefix | torch.Tensor", options: DecodingOptions = DecodingOptions(),
    eos_id: int = EOS_TOKEN_ID,
) -> list[str]:
    """One answer per prefix row (`stream` gives the same text as it comes)."""
    texts = [""] * len(prefix)
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
    lm, tokenizer, prefix: "Prefix | torch.Tensor", choices: Sequence[str] | Sequence[Sequence[str]],
    append_eos: bool = False, eos_id: int = EOS_TOKEN_ID,
) -> list[list[ChoiceScore]]:
    """Log-probability of each candidate answer given each prefix row (teacher forcing: the
    training view). `choices` is one list for every row, or one list per row. The prefix is run
    once; its cache is copied to every (row, choice) pair, which then run as one batch.
    `append_eos` also scores the end of text after the choice, so "dog" and "dog barking" differ."""
    per_row = _choices_per_row(choices, len(prefix))
    row_of, ids = [], []
    for r, row_choices in enumerate(per_row):
        for text in row_choices:
            tokens = tokenizer(text, add_special_tokens=False)["input_ids"] + ([eos_id] if append_eos else [])
            if not tokens:
                raise UsageError(f"answer choice {text!r} has no tokens")
            row_of.append(r)
            ids.append(tokens)
    logprobs = iter(_choice_logprobs(lm, prefix, row_of, ids))
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


def _choice_logprobs(lm, prefix: "Prefix | torch.Tensor", row_of: list[int], ids: list[list[int]]) -> list[torch.Tensor]:
    """Per choice, the log-probability of each of its tokens (a 1-D tensor). Only these are kept:
    logits over the whole vocabulary exist for a bounded number of positions at a time, whatever
    the number and length of the choices."""
    row_of = [int(r) for r in row_of]
    fused = getattr(lm, "fused", None)
    session = Session(lm, prefix, fused.slots_needed(row_of, ids) if fused is not None else max(map(len, ids)))
    p = session.prefix
    first = session.first().log_softmax(dim=-1)  # predicts each choice's token 0
    heads = first[row_of, torch.tensor([t[0] for t in ids], device=first.device)]
    # After token 0: in C, each choice in slots of its own after its row's prefix (fused.py), no
    # copy of the prefix's cache per choice; else torch's forward, a few choices at a time.
    if fused is not None and fused.ready():
        later = fused.choice_logprobs(row_of, ids, p.width if p.alike else list(p.lengths), list(p.positions))
    else:
        later = _later_logprobs(lm, p, row_of, ids)
    return [torch.cat([head[None], rest]) for head, rest in zip(heads, later)]


# Torch's forward scores a few choices at a time, each on a copy of its row's cache: v0's is about
# 20 MB a choice in float32, and a pass's logits are (choices x longest x vocab) floats.
CHOICES_AT_ONCE = 8
POSITIONS_AT_ONCE = 256  # choices x the longest of them, padding included


def _later_logprobs(lm, prefix: "Prefix", row_of: list[int], ids: list[list[int]]) -> list[torch.Tensor]:
    """Per choice, the log-probabilities of its tokens after the first, through torch's forward
    on copies of the cache's rows (filled by the prefix)."""
    device = prefix.embeds.device
    later = [torch.empty(0) for _ in ids]
    order = sorted(range(len(ids)), key=lambda i: len(ids[i]))  # similar lengths together: less padding
    for chunk in _torch_chunks([len(ids[i]) for i in order]):
        chosen = [order[i] for i in chunk]
        longest = len(ids[chosen[-1]])
        if longest == 1:
            continue
        # Right-padded: padding only follows a choice's tokens, and causal attention keeps it out
        # of every position we read.
        tokens = torch.tensor([ids[i] + [0] * (longest - len(ids[i])) for i in chosen], device=device)
        rows = [row_of[i] for i in chosen]
        with _cache_rows(lm, torch.tensor(rows, device=device)):
            if prefix.alike:
                logits = lm.head(lm.hidden(input_ids=tokens[:, :-1], start=prefix.width))
            else:
                lengths = torch.tensor([prefix.lengths[r] for r in rows], device=device)
                positions = torch.tensor([prefix.positions[r] for r in rows], device=device)
                offsets = torch.arange(longest - 1, device=device)
                logits = lm.forward_rows(lm.embed(tokens[:, :-1]), torch.arange(len(rows), device=device),
                                         positions[:, None] + offsets, lengths[:, None] + offsets, lengths)
        logprobs = logits.float().log_softmax(dim=-1).gather(-1, tokens[:, 1:, None])[..., 0]
        for i, row in zip(chosen, logprobs):
            later[i] = row[: len(ids[i]) - 1]
    return later


def _torch_chunks(lengths: list[int]) -> list[list[int]]:
    """Consecutive indices of `lengths` (ascending) in groups of at most CHOICES_AT_ONCE whose
    count times their longest stays within POSITIONS_AT_ONCE (a longer choice goes alone)."""
    chunks: list[list[int]] = []
    for i, n in enumerate(lengths):
        if chunks and len(chunks[-1]) < CHOICES_AT_ONCE and (len(chunks[-1]) + 1) * n <= POSITIONS_AT_ONCE:
            chunks[-1].append(i)
        else:
            chunks.append([i])
    return chunks


@contextlib.contextmanager
def _cache_rows(lm, index: torch.Tensor) -> Iterator[None]:
    """Inside the block, every layer's cache holds rows `index` of itself (copies; a row may come
    many times); after it, the rows it held before."""
    caches = [layer.self_attn.kv_cache for layer in lm.model.layers]
    held = [(c.k, c.v) for c in caches]
    lm.select_cache_rows(index)
    try:
        yield
    finally:
        for cache, (k, v) in zip(caches, held):
            cache.k, cache.v = k, v
