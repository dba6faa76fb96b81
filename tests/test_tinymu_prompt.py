"""TinyMU's prompt tokens: the authors' tokenizer (SmolLM2 with `!` made a special token), plain
text, truncated to 129."""

from __future__ import annotations

import pytest

from mellow_cli.runtime.tokenizer import Tokenizer
from mellow_cli.models.tinymu.prompt import prompt_ids

TEXTS = [
    "Describe the music you hear.",
    "Wow!!",
    " !",
    "!",
    "!!!",
    "Is it loud! Or soft!? Answer!",
    "tempo!=120 bpm; key: A minor!\n!",
    "<|endoftext|>! and <|im_start|>!x",
    "",
]


@pytest.fixture(scope="module")
def ours(smollm2_dir):
    return Tokenizer(smollm2_dir)


@pytest.fixture(scope="module")
def authors(smollm2_dir):
    """The authors' tokenizer: SmolLM2's, then `add_special_tokens({"pad_token": "!"})`."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(smollm2_dir)
    tok.add_special_tokens({"pad_token": "!"})
    return tok


@pytest.mark.parametrize("text", TEXTS)
def test_prompt_ids_are_the_authors_tokenization(ours, authors, text):
    expected = authors(text, add_special_tokens=True, truncation=True, max_length=129)["input_ids"]
    assert prompt_ids(ours, text) == expected
    assert prompt_ids(authors, text) == expected  # any tokenizer with the same interface


def test_a_bang_is_its_own_token(ours):
    bang = ours.encode("!", add_special_tokens=False)
    assert bang == [17]
    wow = ours.encode("Wow", add_special_tokens=False)
    assert prompt_ids(ours, "Wow!!") == wow + bang + bang
    assert ours.encode("Wow!!", add_special_tokens=False) != wow + bang + bang  # plain SmolLM2: `Wow`, `!!`
    assert prompt_ids(ours, " !") == ours.encode(" ", add_special_tokens=False) + bang


def test_prompt_is_cut_to_129_tokens(ours, authors):
    text = "the quick brown fox! " * 60
    ids = prompt_ids(ours, text)
    assert len(ids) == 129
    assert ids == authors(text, truncation=True, max_length=129)["input_ids"]
    assert prompt_ids(ours, text, limit=10) == ids[:10]
