"""SmolLM2's tokenizer, read straight from `tokenizer.json` with the `tokenizers` library.

transformers' fast tokenizer wraps this same library; using it directly keeps transformers' 3 s
import off every `mellow ask`. The interface is the small part of transformers' that we use:
`tokenizer(text, add_special_tokens=...)["input_ids"]` and `tokenizer.decode(ids)`, with
transformers' defaults (special tokens kept when decoding, no space clean-up: SmolLM2's config).
"""

from __future__ import annotations

from pathlib import Path

from mellow_cli.errors import ModelError


class Tokenizer:
    def __init__(self, folder: str | Path):
        from tokenizers import Tokenizer as _Tokenizer

        path = Path(folder) / "tokenizer.json"
        try:
            self._tok = _Tokenizer.from_file(str(path))
        except Exception as e:  # missing, truncated or foreign file
            raise ModelError(f"{path}: cannot load the tokenizer ({e})") from None

    def __call__(self, text: str, add_special_tokens: bool = True) -> dict[str, list[int]]:
        return {"input_ids": self.encode(text, add_special_tokens)}

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return self._tok.encode(text, add_special_tokens=add_special_tokens).ids

    def decode(self, ids, skip_special_tokens: bool = False) -> str:
        return self._tok.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def get_vocab(self) -> dict[str, int]:
        """Every token, added ones included -> its id (transformers' `get_vocab`)."""
        return self._tok.get_vocab(with_added_tokens=True)

    @property
    def all_special_ids(self) -> list[int]:
        """Ids of the added tokens marked special."""
        return sorted(i for i, t in self._tok.get_added_tokens_decoder().items() if t.special)
