"""Samsone's pruned vocabulary, its tokenizer and the prompt normalisation, against the
reference's map and token ids (golden set) and the authors' rules."""

from __future__ import annotations

import numpy as np
import pytest

from mellow_cli.errors import UsageError
from mellow_cli.runtime.tokenizer import Tokenizer
from mellow_cli.models.samsone.prompt import ANSWER_PREFIX, normalise, prompt_ids, prompt_text
from mellow_cli.models.samsone.vocabulary import ModelTokenizer, Vocabulary, kept


@pytest.fixture(scope="module")
def base(smollm2_dir) -> Tokenizer:
    return Tokenizer(smollm2_dir)


@pytest.fixture(scope="module")
def tokenizer(base) -> ModelTokenizer:
    return ModelTokenizer(base)


def test_pruned_map_is_the_references(tokenizer, base, samsone_golden):
    assert base.all_special_ids == list(range(17)) and base.get_vocab()["<|im_end|>"] == 2
    vocabulary = tokenizer.vocabulary
    assert len(vocabulary) == 34111
    assert np.array_equal(np.array(vocabulary.to_tokenizer), samsone_golden["pruned_to_smollm"])
    assert vocabulary.to_tokenizer[:49] == tuple(range(49))  # A..Z (49-74) are the first dropped
    assert vocabulary.to_model[75] == 49 and 49 not in vocabulary.to_model
    assert vocabulary.tokenizer_ids([0, 34110]) == [0, 49151]


def test_the_rules_one_by_one():
    assert kept("Ġthe") and kept("ĊĊĠ") and kept("--") and kept("#")
    assert not kept("The")  # a capital
    assert not kept("ĊĊĠĠ") and not kept("Ċ\t\t ")  # four whitespace characters in a row
    assert not kept("Ġcafé")  # non-ASCII besides Ġ Ċ ĉ
    assert not kept("---") and not kept("-#-")  # three dashes or hashes
    vocab = {"<|endoftext|>": 0, "a": 1, "B": 2, "Weird": 3, "c": 4}
    vocabulary = Vocabulary.from_tokens(vocab, special_ids=[3])
    assert vocabulary.to_tokenizer == (0, 1, 3, 4)  # a special token is kept whatever it holds
    assert dict(vocabulary.to_model) == {0: 0, 1: 1, 3: 2, 4: 3}


@pytest.mark.parametrize("case", range(4))
def test_golden_prompt_text_and_ids(tokenizer, base, samsone_golden, case):
    prompt = str(samsone_golden[f"case{case}_prompt"])
    assert prompt_text(prompt) == str(samsone_golden[f"case{case}_post_text"])
    assert base.encode(prompt_text(prompt), add_special_tokens=False) == samsone_golden[f"case{case}_post_ids_smollm"].tolist()
    assert prompt_ids(tokenizer, prompt) == samsone_golden[f"case{case}_post_ids_pruned"].tolist()


def test_answer_prefix_ends_with_a_lone_space_token(tokenizer, base):
    ids = tokenizer.vocabulary.tokenizer_ids(prompt_ids(tokenizer, "Is it raining?"))
    assert ids[-3:] == [2988, 42, 216]  # "Ġanswer", ":", "Ġ"
    assert prompt_text("X").endswith(ANSWER_PREFIX)


@pytest.mark.parametrize("text,expected", [
    ("What's happening — describe it!", "what's happening  describe it!"),  # the em dash goes, its spaces stay
    ("Rain & thunder!", "rain & thunder!"),
    ("a    b", "a b"),  # four spaces -> one
    ("a   b", "a   b"),  # three stay
    ("a\t\n \tb", "a b"),
    ("Options ---- (A)", "options - (a)"),
    ("a -- b ### c ## d", "a -- b # c ## d"),
    ("Café  — naïve", "caf   nave"),  # removal first, so these three spaces are no run of four
    ("a \u2014  \u2014 b", "a b"),  # ... and these four are
])
def test_normalisation(text, expected):
    assert normalise(text) == expected


def test_decode_drops_special_tokens_and_strips(tokenizer, samsone_golden):
    for case in range(4):
        ids = samsone_golden[f"case{case}_greedy_ids_pruned"].tolist()
        assert tokenizer.decode(ids) == str(samsone_golden[f"case{case}_text"])
    ids = tokenizer.encode("a dog barks")
    assert tokenizer.decode([2, *ids, 0]) == "a dog barks"  # <|im_end|> and <|endoftext|> dropped
    assert tokenizer.decode(tokenizer.encode("  a dog barks\n")) == "a dog barks"


def test_round_trip_through_model_ids(tokenizer):
    for text in ["a dog barks twice, then a car passes.", "(a) rain (b) wind", "it's 3:45 pm"]:
        ids = tokenizer(text, add_special_tokens=True)["input_ids"]
        assert max(ids) < 34111 and tokenizer.encode(text) == ids
        assert tokenizer.decode(ids) == text


def test_choices_are_normalised_so_they_can_be_spelled(tokenizer):
    """Generation and choice scoring call the tokenizer on raw answer choices."""
    assert tokenizer("Dog Barking — LOUD", add_special_tokens=False)["input_ids"] == tokenizer.encode("dog barking  loud")
    with pytest.raises(UsageError):
        tokenizer.spell("Dog")  # exactly as given, a capital has no token


def test_unspellable_text_is_one_line_naming_the_piece(tokenizer):
    with pytest.raises(UsageError) as error:
        tokenizer.encode("which clip is louder?\r\n")
    message = str(error.value)
    assert "\n" not in message and "'\\r\\n'" in message and "louder" in message  # CR LF: one token
    with pytest.raises(UsageError, match=r"\.\.\.'$"):
        prompt_ids(tokenizer, "\x00" + "long " * 40)
