"""TinyMU's prompt tokens: plain text (no chat template, nothing added), SmolLM2's tokenizer with
`!` made a special token, cut to 129 tokens.

The authors' tokenizer is SmolLM2's after `add_special_tokens({"pad_token": "!"})`
(xiquan-li/TinyMU, src/train_accelerate.py `get_model_and_tokenizer`; src/models/m2t.py
`generate`). A special token is matched before the rest of the text is split, so every `!` is
its own token (id 17) and the text between two `!` is tokenised on its own: "Wow!!" is `Wow`,
`!`, `!` where plain SmolLM2 gives `Wow`, `!!`. The model was trained on prompts tokenised that
way, so ours are too; the caller's tokenizer is left as it is.
"""

from __future__ import annotations

from mellow_cli.models.tinymu.config import TinyMUConfig

SPECIAL = "!"  # the authors' padding token, which their tokenizer matches as a special token


def prompt_ids(tokenizer, text: str, limit: int = TinyMUConfig.prompt_tokens) -> list[int]:
    """The prompt's token ids (model ids = SmolLM2's), truncated to `limit` as the authors'
    `truncation=True, max_length=129`. Padding is not added: see network.TinyMU.prefix_row."""
    bang = _ids(tokenizer, SPECIAL)
    ids: list[int] = []
    for i, piece in enumerate(text.split(SPECIAL)):
        if i:
            ids += bang
        ids += _ids(tokenizer, piece)
    return ids[:limit]


def _ids(tokenizer, text: str) -> list[int]:
    # SmolLM2's tokenizer adds no BOS or EOS, so the pieces' ids concatenate to the whole text's.
    return tokenizer(text, add_special_tokens=False)["input_ids"] if text else []


class BangTokenizer:
    """The tokenizer TinyMU reads prompts and answer choices with: SmolLM2's, with every `!` its
    own token (`prompt_ids`' rule); decoding is SmolLM2's. The interface of runtime.tokenizer's
    Tokenizer, so generation and choice scoring use it as they use any other."""

    def __init__(self, base):
        self.base = base

    def __call__(self, text: str, add_special_tokens: bool = True) -> dict[str, list[int]]:
        return {"input_ids": self.encode(text, add_special_tokens)}

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return prompt_ids(self.base, text, limit=len(text) + 1)

    def decode(self, ids, skip_special_tokens: bool = False) -> str:
        return self.base.decode(ids, skip_special_tokens=skip_special_tokens)
