"""Samsone's prompt: the authors' normalisation (`SamsoneModel._normalise_prompt`), then
" answer: " (the configs' `response_prefix`), tokenised as is, with no chat template and no
special tokens, in the model's pruned ids.

The normalisation is what lets the pruned vocabulary spell a prompt: it has no capitals, no
non-ASCII and no long runs of spaces, dashes or hashes. Answer choices go through it too
(vocabulary.py's `ModelTokenizer`), as the authors' training did with every response.
"""

from __future__ import annotations

import re

ANSWER_PREFIX = " answer: "


def normalise(text: str) -> str:
    """Lower case, non-ASCII characters deleted, runs of 4+ whitespace characters -> one space,
    3+ dashes -> one, 3+ hashes -> one, in the authors' order (an em dash between two spaces
    leaves the two spaces: they are not a run of four)."""
    text = re.sub(r"[^\x00-\x7F]", "", text.lower())
    text = re.sub(r"\s{4,}", " ", text)
    return re.sub(r"#{3,}", "#", re.sub(r"-{3,}", "-", text))


def prompt_text(prompt: str) -> str:
    """The text after the audio: the normalised prompt and " answer: ", whose trailing space is a
    token of its own (the answer starts on a fresh token, as in training)."""
    return normalise(prompt) + ANSWER_PREFIX


def prompt_ids(tokenizer, prompt: str) -> list[int]:
    """A prompt -> the model ids after the audio. `tokenizer` is vocabulary.py's `ModelTokenizer`;
    the text is spelled exactly (normalising again could merge the prompt's trailing spaces with
    the prefix's into a run of four)."""
    return tokenizer.spell(prompt_text(prompt))
