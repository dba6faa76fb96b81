"""Samsone's pruned vocabulary: the 34,111 SmolLM2 tokens it kept, renumbered 0, 1, 2, ... in the
tokenizer's order, and a tokenizer that speaks those ids.

The rule is the authors' (`inference/models.py` `_build_pruned_token_map`, also
`scripts/vocabulary/create_prune_map.py`): walk the tokenizer's vocabulary by id and keep a token
if it is special, or if it has no ASCII capital, no run of 4+ whitespace characters (byte-level
Ġ, Ċ, ĉ count as whitespace), no character outside ASCII other than those three, and no run of
3+ dashes or hashes. The map follows from tokenizer.json alone, so it is rebuilt, not stored.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

from mellow_cli.errors import UsageError
from mellow_cli.models.samsone.prompt import normalise

# Any of these drops a token: the four tests of the reference in one pattern. "A capital in the
# token with everything but ASCII letters and digits removed" is "an ASCII capital in the token".
_DROPPED = re.compile(r"[A-Z]|[\sĠĊĉ]{4,}|[^\x00-\x7FĠĊĉ\s]|[-#]{3,}")


def kept(token: str) -> bool:
    return _DROPPED.search(token) is None


@dataclass(frozen=True, eq=False)
class Vocabulary:
    """Model ids <-> tokenizer ids."""

    to_tokenizer: tuple[int, ...]  # model id -> tokenizer id, increasing
    to_model: Mapping[int, int]  # tokenizer id -> model id, for the kept tokens only

    @classmethod
    def from_tokens(cls, vocab: Mapping[str, int], special_ids: Iterable[int] = ()) -> "Vocabulary":
        """`vocab`: every token (added tokens included) -> tokenizer id."""
        special = set(special_ids)
        ids = tuple(i for token, i in sorted(vocab.items(), key=lambda item: item[1]) if i in special or kept(token))
        return cls(ids, {t: m for m, t in enumerate(ids)})

    @classmethod
    def from_tokenizer(cls, tokenizer) -> "Vocabulary":
        """From anything with transformers' `get_vocab()` and `all_special_ids` (our Tokenizer has both)."""
        return cls.from_tokens(tokenizer.get_vocab(), tokenizer.all_special_ids)

    def __len__(self) -> int:
        return len(self.to_tokenizer)

    def tokenizer_ids(self, model_ids: Iterable[int]) -> list[int]:
        return [self.to_tokenizer[int(i)] for i in model_ids]


class ModelTokenizer:
    """A tokenizer (model/tokenizer.py's interface) in Samsone's model ids, so generation and
    choice scoring run unchanged. Text is normalised like a prompt before it is tokenised (an
    answer choice "Dog" becomes "dog", which the vocabulary can spell); decoding drops special
    tokens and strips surrounding whitespace, as the authors' `SamsoneModel.__call__` returns text."""

    def __init__(self, base, vocabulary: Vocabulary | None = None):
        self.base = base
        self.vocabulary = vocabulary or Vocabulary.from_tokenizer(base)

    def __call__(self, text: str, add_special_tokens: bool = True) -> dict[str, list[int]]:
        return {"input_ids": self.encode(text, add_special_tokens)}

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return self.spell(normalise(text), add_special_tokens)

    def spell(self, text: str, add_special_tokens: bool = False) -> list[int]:
        """`text` exactly as given -> model ids; UsageError if a token is not in the vocabulary."""
        ids = self.base.encode(text, add_special_tokens=add_special_tokens)
        missing = [i for i in ids if i not in self.vocabulary.to_model]
        if missing:
            pieces = ", ".join(repr(self.base.decode([i])) for i in dict.fromkeys(missing[:3]))
            shown = text if len(text) <= 60 else text[:57] + "..."
            raise UsageError(f"Samsone's vocabulary cannot spell {pieces} in {shown!r}")
        return [self.vocabulary.to_model[i] for i in ids]

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = True) -> str:
        return self.base.decode(self.vocabulary.tokenizer_ids(ids), skip_special_tokens=skip_special_tokens).strip()
