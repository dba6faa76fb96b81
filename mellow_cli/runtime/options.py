"""How an answer is decoded: the options every command and the API share, as a frozen dataclass,
and the bounds that turn absurd values into usage errors before any work. Imports nothing heavy:
the CLI reads it to build its options.
"""

from __future__ import annotations

from dataclasses import dataclass

# Bounds that every way in (the CLI's options, the server's fields, training's recipe) applies
# before any work: no answer longer than the model's context, no seed torch cannot take.
MAX_TOKENS = 4096
MAX_SEED = 2**63 - 1
# An answer's budget where neither its caller nor its model says otherwise (a model's family
# gives its authors' own: Model.answer_options).
DEFAULT_MAX_TOKENS = 300


@dataclass(frozen=True)
class DecodingOptions:
    max_tokens: int | None = None  # token budget per answer; None: the model's own (its authors')
    sample: bool = False  # False: greedy, token for token what the reference loop produces
    temperature: float = 1.0  # only with sample=True
    top_p: float = 0.8  # nucleus mass kept, only with sample=True (reference default)
    top_k: int = 0  # keep the k most likely tokens before top-p; 0 keeps all
    seed: int | None = None  # seeds the sampler; same seed, same sample

    @property
    def budget(self) -> int:
        """The token budget in force: max_tokens, or DEFAULT_MAX_TOKENS where none was given."""
        return DEFAULT_MAX_TOKENS if self.max_tokens is None else self.max_tokens
