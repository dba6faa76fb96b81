"""What the language model reads before an answer: one `PrefixRow` per question, as a family
lays it out (models/family.py), and `Prefix`, a batch of them as the runtime runs it.

Rows of one batch may differ in length (TinyMU's audio tokens follow the clip's length, Samsone's
prompt is as long as its text) and in where the answer's positions start: a row is right-padded
to the longest, and each row's answer tokens go to its own next cache slot, at its own rotary
position, seeing its own prefix only. So an answer never depends on the other rows of its batch.
A batch whose rows are all alike (every Mellow batch) runs exactly as a batch of one length does.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Sequence

if TYPE_CHECKING:
    import torch


@dataclass(frozen=True)
class PrefixRow:
    """One question's input to the language model, before the answer."""

    embeds: "torch.Tensor"  # (L, hidden): positions 0..L-1, cached; every later token sees them
    # An extra input whose output predicts the first answer token and which no token ever sees,
    # not even itself (TinyMU's last `!` pad: the reference masks it as a key but reads its
    # query); None: the last of `embeds` predicts the first answer token.
    query: "torch.Tensor | None" = None
    query_position: int | None = None  # the rotary position of `query`
    next_position: int | None = None  # of the first answer token; None: L

    @property
    def length(self) -> int:
        return self.embeds.shape[0]

    @property
    def answer_position(self) -> int:
        return self.length if self.next_position is None else self.next_position


@dataclass(frozen=True)
class Prefix:
    """A batch of prefix rows, right-padded into one tensor."""

    embeds: "torch.Tensor"  # (B, P, hidden), P the longest row's length
    lengths: tuple[int, ...]  # each row's L: its slots 0..L-1 hold its prefix
    positions: tuple[int, ...]  # each row's rotary position of its first answer token
    query_rows: tuple[int, ...] = ()  # the rows that have a query
    queries: "torch.Tensor | None" = None  # (len(query_rows), hidden)
    query_positions: tuple[int, ...] = ()

    @classmethod
    def of(cls, rows: Sequence[PrefixRow]) -> "Prefix":
        import torch

        longest = max(r.length for r in rows)
        embeds = rows[0].embeds.new_zeros(len(rows), longest, rows[0].embeds.shape[1])
        for i, r in enumerate(rows):
            embeds[i, : r.length] = r.embeds
        asked = [i for i, r in enumerate(rows) if r.query is not None]
        return cls(embeds, tuple(r.length for r in rows), tuple(r.answer_position for r in rows), tuple(asked),
                   torch.stack([rows[i].query for i in asked]) if asked else None,
                   tuple(rows[i].query_position for i in asked))

    @classmethod
    def uniform(cls, embeds: "torch.Tensor") -> "Prefix":
        """Rows of one length (B, P, hidden), the answers at position P."""
        batch, length, _ = embeds.shape
        return cls(embeds, (length,) * batch, (length,) * batch)

    @property
    def batch(self) -> int:
        return self.embeds.shape[0]

    def __len__(self) -> int:
        return self.batch

    @property
    def width(self) -> int:
        return self.embeds.shape[1]

    @property
    def alike(self) -> bool:
        """Every row fills the width, has no query, and answers from position P: the batch runs
        as one length, with one position per step for every row."""
        return not self.query_rows and all(n == self.width for n in self.lengths) and \
            all(p == self.width for p in self.positions)

    def to(self, dtype: "torch.dtype") -> "Prefix":
        from dataclasses import replace

        return replace(self, embeds=self.embeds.to(dtype),
                       queries=None if self.queries is None else self.queries.to(dtype))
