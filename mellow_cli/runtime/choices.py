"""Where answer choices' tokens go in the KV cache when they are scored together: each choice in
slots of its own after its row's prefix, seeing that prefix and its own earlier tokens, so the
prefix is cached once however many choices follow it (fused.py's FusedStep.choices runs them in
one call into C; passes.py's layers the same way for many tokens), and how many choices go in one
call, so that logits over the whole vocabulary exist for a bounded number of tokens at a time.
"""

from __future__ import annotations


def choice_layout(row_of: list[int], ids: list[list[int]], length, positions=None) -> tuple[list[int], ...]:
    """Where FusedStep.choices puts each choice's tokens but the last, as lists (token, row, pos,
    slot, group) for step.c: choice i follows the prefix of cache row r = row_of[i] (rotary
    positions positions[r], positions[r]+1, ..), in slots of its own after the prefix (length[r]
    slots; one int: every row's) and the row's earlier choices. `positions` default: `length`."""
    lengths = length if isinstance(length, (list, tuple)) else None
    flat, row, pos, slot, group = [], [], [], [], []
    used: dict[int, int] = {}
    for i, (r, tokens) in enumerate(zip(row_of, ids)):
        start = length if lengths is None else lengths[r]
        first = start if positions is None else positions[r]
        for j, token in enumerate(tokens[:-1]):
            flat.append(token)
            row.append(r)
            pos.append(first + j)
            slot.append(start + used.get(r, 0))
            used[r] = used.get(r, 0) + 1
            group.append(i)
    return flat, row, pos, slot, group


# Choice tokens FusedStep.choice_logprobs runs at once: that many rows of logits over the
# vocabulary (v0: 50 MB), and the attention's scratch for as many tokens.
CHOICE_TOKENS_AT_ONCE = 256


def choice_chunks(ids: list[list[int]], budget: int = CHOICE_TOKENS_AT_ONCE) -> list[list[int]]:
    """Indices of consecutive choices in groups whose tokens but the last number at most `budget`
    (a longer choice alone): a choice's tokens see each other only within one call of step.c."""
    chunks: list[list[int]] = []
    size = budget + 1
    for i, tokens in enumerate(ids):
        n = max(len(tokens) - 1, 0)
        if size + n > budget:
            chunks.append([])
            size = 0
        chunks[-1].append(i)
        size += n
    return chunks
