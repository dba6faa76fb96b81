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


@dataclass(frozen=True)
class DecodingOptions:
    max_tokens: int = 300  # token budget per answer (the reference's max_len)
    sample: bool = False  # False: greedy, token for token what the reference loop produces
    temperature: float = 1.0  # only with sample=True
    top_p: float = 0.8  # nucleus mass kept, only with sample=True (reference default)
    top_k: int = 0  # keep the k most likely tokens before top-p; 0 keeps all
    seed: int | None = None  # seeds the sampler; same seed, same sample
