"""A Model whose answers a test writes: the CLI's behaviour (what goes to stdout and stderr,
rows, formats, exit codes) checked against known answers, with no tokenizer and no weights.

    model = install(monkeypatch, ScriptedModel(answers=["a dog barks"]))
    out = mellow("ask", "dog.wav", "what is it?", "--model", "any")
    assert out.stdout == "a dog barks\\n" and model.asked[0].prompt == "what is it?"

The public methods are Model's own (ask, choose, caption, compare call ask_batch and
choose_batch); only those two and `stream` are scripted. Clips are still decoded by the CLI, so
a missing or broken file fails as it does with a real model.
"""

from __future__ import annotations

import math
from typing import Iterator, Sequence

from mellow_cli.api import ChoiceResult, ClipReader, Model, Question
from mellow_cli.models.family import family_of
from mellow_cli.runtime.options import DecodingOptions
from mellow_cli.models.mellow.config import MellowConfig
from mellow_cli.runtime.generate import ChoiceScore


class ScriptedModel(Model):
    """Answers come from `answers` in the order questions are asked (a list of strings is one
    answer streamed in those pieces); `picks` are the choices `choose` names, in order (when they
    run out, the first choice). Every question asked is kept in `asked`, as a Question."""

    def __init__(self, answers: Sequence[str | list[str]] = (), picks: Sequence[str] = (), name: str = "scripted",
                 revision: str | None = "0" * 40):
        # No network and no tokenizer: only what the CLI reads from a model.
        self.cfg = MellowConfig.tiny()
        self.family = family_of(self.cfg)
        self.read_clip = ClipReader(self.family, self.cfg)
        self.name = name
        self.revision = revision
        self.precision = None
        self.answers = list(answers)
        self.picks = list(picks)
        self.asked: list[Question] = []
        self.loaded_as: list[dict] = []  # load_model's arguments, one dict per load

    def _next_answer(self) -> list[str]:
        if not self.answers:
            raise AssertionError("the model was asked more questions than the test scripted")
        answer = self.answers.pop(0)
        return [answer] if isinstance(answer, str) else list(answer)

    def stream(self, audio, question: str, audio2=None, options: DecodingOptions = DecodingOptions()) -> Iterator[str]:
        self.asked.append(Question(audio, audio2, question))
        yield from self._next_answer()

    def ask_batch(self, questions: Sequence[Question], options: DecodingOptions = DecodingOptions()) -> list[str]:
        self.asked += [Question(*q) for q in questions]
        return ["".join(self._next_answer()) for _ in questions]

    def choose_batch(self, questions: Sequence[Question], choices: Sequence[Sequence[str]]) -> list[ChoiceResult]:
        self.asked += [Question(*q) for q in questions]
        return [self._pick(list(c)) for c in choices]

    def _pick(self, choices: list[str]) -> ChoiceResult:
        pick = self.picks.pop(0) if self.picks else choices[0]
        if pick not in choices:
            raise AssertionError(f"scripted pick {pick!r} is not one of {choices}")
        # The pick gets probability 0.7, the others share the rest evenly.
        rest = 0.3 / (len(choices) - 1)
        probabilities = tuple(0.7 if c == pick else rest for c in choices)
        scores = tuple(ChoiceScore(c, math.log(p), math.log(p), 1) for c, p in zip(choices, probabilities))
        return ChoiceResult(choice=pick, scores=scores, probabilities=probabilities)


def install(monkeypatch, model: ScriptedModel) -> ScriptedModel:
    """Make every model load in this test return `model` (as `mellow_cli.load_model` and the CLI's
    --model do), recording the arguments of each load."""

    def load_model(name: str = "v0", device: str = "auto", dtype: str | None = None, progress: bool = True):
        model.loaded_as.append({"name": name, "device": device, "dtype": dtype, "progress": progress})
        return model

    monkeypatch.setattr("mellow_cli.api.load_model", load_model)
    return model
