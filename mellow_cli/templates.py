"""The authors' prompt and answer text for the official data format, drawn anew for every epoch.

Follows `AudioTextDataset._create_answer_input` of the official training release (soham97/mellow,
branch `training`, data/audiotext_dataset.py, MIT licence), case for case; the paraphrase lists
are in template_lists.py. `input` is matched exactly (no trimming, no case folding), as there:

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
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

from mellow_cli import template_lists as T

Pick = Callable[[Sequence[str]], str]

_PARAPHRASED = {
    "explain the difference in few words": T.WORDONLY,
    "explain the difference in a sentence": T.LONGLINEONLY,
    "explain the difference in detail": T.DETAILONLY,
}
EMOTION_SLOT = "emo_emo_emo"


@dataclass(frozen=True)
class OfficialText:
    """A row's text fields as the official format stores them."""

    input: str
    answer: str = ""
    caption1: str = ""
    caption2: str = ""


def realize(row: OfficialText, pick: Pick) -> tuple[str, str]:
    """(prompt, answer) for one draw."""
    text = row.input
    if text == "caption both audios":
        answer = f"The audio 1 is {row.caption1.lower()}. The audio 2 is {row.caption2.lower()}."
        return pick(T.BOTH), answer.replace("..", ".")
    if text == "caption first audio":
        return pick(T.FIRST), f"The audio 1 is {row.caption1.lower()}.".replace("..", ".")
    if text == "caption second audio":
        return pick(T.SECOND), f"The audio 2 is {row.caption2.lower()}.".replace("..", ".")
    if text in _PARAPHRASED:
        return pick(_PARAPHRASED[text]), row.answer
    if EMOTION_SLOT in text:
        return text.replace(EMOTION_SLOT, pick(T.EMOTION)), row.answer
    return text.lower(), row.answer.lower()


def first(items: Sequence[str]) -> str:
    """The deterministic draw: what a row's text is checked with before training."""
    return items[0]
