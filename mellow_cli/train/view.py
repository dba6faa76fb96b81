"""The training view: each row's prefix (runtime/prefix.py's PrefixRow, as its family lays it out)
followed by its answer tokens, run with gradients and without a KV cache, so that the logits at
every answer position are the ones teacher-forced inference (runtime/generate.py's Session) gives.

A row is [embeds | query | answer tokens but the last], right-padded to the batch's longest:
- `embeds` sit at positions 0..L-1; the answer's token j at the row's `answer_position + j`;
- a `query` (TinyMU's last `!` pad) sits at its own `query_position`, sees `embeds` only, and no
  token sees it, not even itself; its output predicts the first answer token (else the last of
  `embeds` does);
- attention is otherwise causal, so padding, which follows every real token, is seen by none.

Rows that are all alike (the same length, no query, the answer right after the prefix: every
Mellow batch) take the plain causal forward over [prefix | answer], as they always have.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F

from mellow_cli.runtime.prefix import PrefixRow


def answer_logits(lm, prefix: torch.Tensor, answer_ids: torch.Tensor) -> torch.Tensor:
    """Rows alike, prefix (B, P, H): (B, A, vocab) logits predicting each answer token, from the
    last prefix position on. Right padding needs no attention mask: attention is causal, so
    padding only follows the tokens whose logits are read."""
    answer = lm.embed(answer_ids[:, :-1])  # the last token predicts nothing we train
    x = torch.cat([prefix, answer.to(prefix.dtype)], dim=1)
    return lm(inputs_embeds=x, logits_to_keep=answer_ids.shape[1]).logits


def row_logits(lm, rows: Sequence[PrefixRow], answer_ids: torch.Tensor) -> torch.Tensor:
    """(B, A, vocab) logits predicting each of the rows' answer tokens answer_ids (B, A)."""
    if _alike(rows):
        return answer_logits(lm, torch.stack([r.embeds for r in rows]), answer_ids)
    x, positions, mask, first = _layout(lm, rows, answer_ids)
    cos, sin = lm.model.rotary_emb.span(0, int(positions.max()) + 1, x.dtype)
    cos, sin = cos[positions], sin[positions]  # (B, T, 1, D): each row at its own positions
    for layer in lm.model.layers:
        x = layer(x, cos, sin, None, mask[:, None])
    reads = first[:, None] + torch.arange(answer_ids.shape[1], device=x.device)
    hidden = x[torch.arange(len(rows), device=x.device)[:, None], reads]
    return lm.head(lm.model.norm(hidden))


def _alike(rows: Sequence[PrefixRow]) -> bool:
    length = rows[0].length
    return all(r.query is None and r.length == length and r.answer_position == length for r in rows)


def _layout(lm, rows: Sequence[PrefixRow], answer_ids: torch.Tensor):
    """-> inputs (B, T, H), rotary positions (B, T), who sees whom (B, T, T), and each row's slot
    that predicts its first answer token (B,)."""
    answer = lm.embed(answer_ids[:, :-1])
    dtype, device = rows[0].embeds.dtype, rows[0].embeds.device
    seqs, places, firsts = [], [], []
    for r, tokens in zip(rows, answer):
        asked = [r.query[None].to(dtype)] if r.query is not None else []
        seqs.append(torch.cat([r.embeds, *asked, tokens.to(dtype)]))
        places.append([*range(r.length), *([r.query_position] if asked else []),
                       *range(r.answer_position, r.answer_position + len(tokens))])
        firsts.append(r.length - 1 + len(asked))
    width = max(len(s) for s in seqs)
    x = torch.stack([F.pad(s, (0, 0, 0, width - len(s))) for s in seqs])
    positions = torch.tensor([p + [0] * (width - len(p)) for p in places], device=device)
    mask = torch.ones(width, width, dtype=torch.bool, device=device).tril().repeat(len(rows), 1, 1)
    for i, r in enumerate(rows):
        if r.query is not None:
            mask[i, :, r.length] = False  # the query's key: seen by no token, itself included
    return x, positions, mask, torch.tensor(firsts, device=device)
