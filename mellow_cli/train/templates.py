"""The authors' prompt and answer text for the official data format, drawn anew for every epoch.

Follows `AudioTextDataset._create_answer_input` of the official training release (soham97/mellow,
branch `training`, data/audiotext_dataset.py, MIT licence), case for case. `input` is matched
exactly (no trimming, no case folding), as there:

| `input` | prompt | answer |
| --- | --- | --- |
| caption both audios | a BOTH paraphrase | "The audio 1 is <caption1>. The audio 2 is <caption2>." (captions lower-cased) |
| caption first audio | a FIRST paraphrase | "The audio 1 is <caption1>." |
| caption second audio | a SECOND paraphrase | "The audio 2 is <caption2>." |
| explain the difference in few words | a WORDONLY paraphrase | `answer` as written |
| explain the difference in a sentence | a LONGLINEONLY paraphrase | `answer` as written |
| explain the difference in detail | a DETAILONLY paraphrase | `answer` as written |
| anything containing emo_emo_emo | `input` with it replaced by an EMOTION prompt | `answer` as written |
| anything else | `input` lower-cased | `answer` lower-cased |

In the caption answers ".." becomes "." (a caption that already ends with a full stop).
Where the authors call `random.choice`, `pick` is called with the same list; data.py passes a
generator seeded by (seed, epoch, row), so a resumed run draws what an uninterrupted one did.

The paraphrase lists are data, in templates.json: copied from the same release (`data/template.py`)
in the same order and with the same repeats, so a uniform draw from a list weights each prompt as
the authors' `random.choice` does. Only the lists their loader draws from are kept. The file is
read once, at the first draw or the first use of a list's name (`templates.BOTH` and so on).
"""

from __future__ import annotations

import functools
import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from importlib import resources

Pick = Callable[[Sequence[str]], str]

_PARAPHRASED = {  # the list drawn from for each of these inputs
    "explain the difference in few words": "WORDONLY",
    "explain the difference in a sentence": "LONGLINEONLY",
    "explain the difference in detail": "DETAILONLY",
}
EMOTION_SLOT = "emo_emo_emo"


@functools.cache
def _lists() -> dict[str, tuple[str, ...]]:
    """The lists by name (BOTH, FIRST, SECOND, WORDONLY, LONGLINEONLY, DETAILONLY, EMOTION), as
    the package's templates.json holds them."""
    with resources.files(__package__).joinpath("templates.json").open(encoding="utf-8") as f:
        return {name: tuple(items) for name, items in json.load(f).items()}


def __getattr__(name: str) -> tuple[str, ...]:
    # The lists' names are module attributes read at first use, not at import; other names
    # (the dunders that tools probe a module for) never read the file.
    if name.isupper() and name in _lists():
        return _lists()[name]
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


@dataclass(frozen=True)
class OfficialText:
    """A row's text fields as the official format stores them."""

    input: str
    answer: str = ""
    caption1: str = ""
    caption2: str = ""


def realize(row: OfficialText, pick: Pick) -> tuple[str, str]:
    """(prompt, answer) for one draw."""
    text, lists = row.input, _lists()
    if text == "caption both audios":
        answer = f"The audio 1 is {row.caption1.lower()}. The audio 2 is {row.caption2.lower()}."
        return pick(lists["BOTH"]), answer.replace("..", ".")
    if text == "caption first audio":
        return pick(lists["FIRST"]), f"The audio 1 is {row.caption1.lower()}.".replace("..", ".")
    if text == "caption second audio":
        return pick(lists["SECOND"]), f"The audio 2 is {row.caption2.lower()}.".replace("..", ".")
    if text in _PARAPHRASED:
        return pick(lists[_PARAPHRASED[text]]), row.answer
    if EMOTION_SLOT in text:
        return text.replace(EMOTION_SLOT, pick(lists["EMOTION"])), row.answer
    return text.lower(), row.answer.lower()


def first(items: Sequence[str]) -> str:
    """The deterministic draw: what a row's text is checked with before training."""
    return items[0]
