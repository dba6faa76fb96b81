"""The Mellow authors' evaluation protocol: the prompt their evaluation feeds the model and the
scorers it applies, from their training release (GitHub soham97/mellow, branch `training`,
commit c8204d8, MIT licence).

Their evaluation (training/trainer.py, `evaluate_checkpoint`) reads a data file of items
`filepath1, filepath2, input, answer` (data/audiotext_eval_dataset.py), generates greedily, and
hands three parallel lists to the scorer metrics/get_metrics.py picks by the data file's name:
the generations, the answers as the loader returns them (lower-cased), and for MMAU the
benchmark's items (their `task` and `difficulty`). Here the generations are our `model_output`,
the items are the predictions file's records, and the answer is the item's `answer` as their data
files write it: lettered, "b) dog barking" (see `lettered_answer`).

- MMAU (metrics/mmau.py, `evaluate_metric`): right when the text before the first ")" of the
  output equals, lower-cased, the text before the first ")" of the answer: the option letter.
  "(b) dog", "B" or "dog barking" are wrong; "B) anything" is right. Every item is in the
  denominator; figures per task, per difficulty and in total, printed with "%f".
- Other multiple-choice sets (metrics/aqa.py, `evaluate_metric`): the same letter, except that an
  output whose text before ")" is not one letter a-d counts as "a" (their `get_option`).
- Yes/no sets (metrics/aqa.py, `evaluate_metric_binary`): right when the answer, lower-cased, is
  a substring of the output, lower-cased.

An item we could not answer (no `model_output`) counts as wrong: their loop has a generation for
every item, so every item is in their denominator.

The prompt (data/audiotext_eval_dataset.py, `_create_answer_input` and `_tokenize_text`): the
item's input lower-cased, then " <|endoftext|>"; the input is the question with its options
lettered in line (items.prompt), since their MMAU data file (mmau-test-mini_proc2.json) is not
published and its answers are lettered that way. An item without a second clip is paired with a
clip drawn at random from the first clips of the whole data file (`_read_audio`). Their draw uses
Python's global generator over `list(set(...))`, whose order changes between processes, so it
cannot be repeated clip for clip; we draw from a generator seeded with the item's key, so a
resumed or sharded run pairs every item as the first run did.
"""

from __future__ import annotations

import dataclasses
import random

from mellow_cli.bench.items import LETTERS, Item, prompt as lettered_prompt
from mellow_cli.bench.scoring import OUTPUT_KEY, Scorer

END_OF_TEXT = " <|endoftext|>"  # _tokenize_text appends it to every prompt (and answer)
# _create_answer_input rewrites these inputs before lower-casing every one.
_REWRITES = {
    "explain the difference in few words": "Explain the difference between the two audios in few words.",
    "explain the difference in a sentence": "Explain the difference between the two audios in one extended sentence.",
    "explain the difference in detail": "Explain the difference between the two audios in detail.",
    "caption first audio": "caption the audio",
}


def eval_input(text: str) -> str:
    """An input as the model reads it in their evaluation (before tokenizing): rewritten, lower-
    cased, end of text appended."""
    return _REWRITES.get(text, text).lower() + END_OF_TEXT


def prompt(question: str, choices: tuple[str, ...] | list[str]) -> str:
    """Their evaluation prompt for a multiple-choice item."""
    return eval_input(lettered_prompt(question, choices))


def pair_clips(items: list[Item]) -> list[Item]:
    """Their second-clip rule: an item without one gets a clip drawn from the first clips of the
    whole file (its own included, as `random.choice` over their list may pick it)."""
    pool = sorted({item.audio for item in items})
    return [item if item.audio2 is not None else dataclasses.replace(item, audio2=random.Random(item.key).choice(pool))
            for item in items]


def lettered_answer(record: dict) -> str:
    """The answer as their data files write it: the letter of the first choice equal to the
    answer, then ") " and the answer. An answer that is no choice is taken as already written
    that way (a file in their format), so a plain text there matches no letter."""
    answer, choices = record["answer"], record["choices"]
    return f"{LETTERS[choices.index(answer)]}) {answer}" if answer in choices else answer


def _letter(text: str) -> str:
    return text.split(")")[0].lower()


def mmau_correct(record: dict) -> bool:
    """metrics/mmau.py, `evaluate_metric`: `response.split(")")[0].lower() ==
    answer.split(")")[0].lower()`."""
    return _letter(record[OUTPUT_KEY]) == _letter(lettered_answer(record))


def option(response: str) -> str:
    """metrics/aqa.py, `get_option`: the text before ")" when it is one of the letters a-d,
    else "a"."""
    found = _letter(response)
    return found if len(found) == 1 and found in "abcd" else "a"


def aqa_correct(record: dict) -> bool:
    """metrics/aqa.py, `evaluate_metric`: `get_option(response) == answer.split(")")[0].lower()`."""
    return option(record[OUTPUT_KEY]) == _letter(lettered_answer(record))


def binary_correct(record: dict) -> bool:
    """metrics/aqa.py, `evaluate_metric_binary`: `answer.lower() in response.lower()`."""
    return record["answer"].lower() in record[OUTPUT_KEY].lower()


# Their figures are printed by trainer.py's `logger.info("%s: %f", ...)`: six decimals.
MMAU = Scorer("mellow", "the Mellow authors' metric (metrics/mmau.py)", mmau_correct, every_item=True, decimals=6,
              letters=True)
AQA = Scorer("mellow", "the Mellow authors' metric (metrics/aqa.py, letter)", aqa_correct, every_item=True, decimals=6,
             letters=True)
BINARY = Scorer("mellow-binary", "the Mellow authors' metric (metrics/aqa.py, binary)", binary_correct,
                every_item=True, decimals=6)
