"""The public Python API: everything the CLI does, callable from a script or a notebook.

    import mellow_cli
    model = mellow_cli.load_model("v0")                 # a name, a checkpoint path or user/repo
    model.ask("dog.wav", "is there a dog barking?")
    model.ask("a.wav", "which clip is louder?", audio2="b.wav")
    model.choose("street.wav", "what is the main sound?", ["car", "rain", "birds"]).choice

Audio arguments are paths (`-` for stdin) or float32 mono arrays at 32 kHz. Mellow always hears two
clips: without `audio2` a clip is paired with itself. Each clip's embedding is computed once per
model and reused when the same clip appears in many questions.
"""

from __future__ import annotations

import hashlib
import math
import os
from collections import OrderedDict
from dataclasses import dataclass
from typing import TYPE_CHECKING, Iterator, NamedTuple, Optional, Sequence, Union

from mellow_cli.runtime.options import DecodingOptions
from mellow_cli.errors import UsageError
from mellow_cli.settings import pick_device

if TYPE_CHECKING:
    import numpy as np
    import torch

    from mellow_cli.runtime.generate import ChoiceScore
    from mellow_cli.runtime.precision import Precision
    from mellow_cli.runtime.prefix import Prefix

AudioInput = Union[str, os.PathLike, "np.ndarray"]


class Question(NamedTuple):
    """One question about a pair of clips, as the batch methods take them (a plain 3-tuple works too)."""

    audio1: AudioInput
    audio2: Optional[AudioInput]  # None: audio1 paired with itself
    prompt: str




@dataclass(frozen=True)
class ChoiceResult:
    """A multiple-choice answer scored by likelihood: always exactly one of the choices."""

    choice: str  # the most probable choice
    scores: tuple["ChoiceScore", ...]  # per choice: log-probability of its tokens (and the end of text)
    probabilities: tuple[float, ...]  # the model's distribution restricted to these choices
    prompt_tokens: int = 0  # positions the question took before the answer (a request's usage)

    def as_dict(self) -> list[dict]:
        return [
            {"choice": s.text, "probability": round(p, 6), "logprob": round(s.logprob, 4)}
            for s, p in zip(self.scores, self.probabilities)
        ]


def load_model(name: str = "v0", device: str = "auto", dtype: str | None = None, progress: bool = True) -> "Model":
    """Resolve a model name or path, download it once if needed, and load it ready to answer.

    The language model is prepared in `dtype` (None: auto; runtime/precision.py says what each
    means), and the family prepares what else it runs in another precision (models/family.py)."""
    from mellow_cli.files import FilePages
    from mellow_cli.models.family import family_of
    from mellow_cli.runtime import precision
    from mellow_cli.runtime.int8_copy import Int8Copy
    from mellow_cli.store import loading

    target = pick_device(device)
    if dtype is not None and dtype not in precision.NAMES:  # fails before the weights load
        raise UsageError(f"unknown dtype {dtype!r}: use {', '.join(precision.NAMES)}")
    net, files = loading.load(name, device="cpu", progress=progress)
    family = family_of(files.config)
    net = net.to(target)
    chosen = precision.named(dtype or "auto", target, progress)
    release = FilePages(files.weights)
    family.prepare(net, target, chosen, release)
    precision.apply(net.lm, chosen, release, int8_copy=Int8Copy.beside(files))
    return Model(net, family.tokenizer(files.tokenizer_dir, files.config), name=files.name,
                 revision=files.revision, precision=chosen)


class ClipReader:
    """(source, offset=0, duration=None) -> the clip a family hears from `source`: decoded at its
    rate, made mono its way, a window of at most one clip, fitted to its length. An object, not a
    closure, so a DataLoader can hand it to worker processes."""

    def __init__(self, family, cfg):
        self.family, self.cfg = family, cfg

    def __call__(self, source, offset: float = 0.0, duration: float | None = None) -> "np.ndarray":
        from mellow_cli.io.audio import load_clip

        family, cfg = self.family, self.cfg
        return load_clip(source, sr=family.sample_rate(cfg), clip_seconds=family.clip_seconds(cfg),
                         fit=self.fit, mono=family.mono, offset=offset, duration=duration)

    def fit(self, wave: "np.ndarray") -> "np.ndarray":
        return self.family.clip(wave, self.cfg)


class Model:
    """A loaded model of any family with its tokenizer: ask, stream, choose, caption, compare."""

    def __init__(self, net, tokenizer, name: str, revision: str | None = None, clip_cache: int = 256,
                 precision: "Precision | None" = None):
        from mellow_cli.models.family import family_of

        self.net = net.eval()
        self.precision = precision  # how the language model was prepared (None: not prepared)
        self.tokenizer = tokenizer
        self.cfg = net.cfg
        self.family = family_of(net.cfg)
        self.name = name
        self.revision = revision
        self.read_clip = ClipReader(self.family, self.cfg)
        self._clips: OrderedDict[bytes, "torch.Tensor"] = OrderedDict()
        self._clip_cache = clip_cache

    @property
    def device(self) -> "torch.device":
        return self.net.lm.model.embed_tokens.weight.device

    # --- clips and prefixes ----------------------------------------------------------------------

    def load_clip(self, audio: AudioInput) -> "np.ndarray":
        """A path (or `-`) is decoded with the default window; an array is taken as mono audio at
        the model's sample rate."""
        if isinstance(audio, (str, os.PathLike)):
            return self.read_clip(audio)
        return self.family.clip(audio, self.cfg)

    def embed_clips(self, clips: Sequence["np.ndarray"], batch_size: int = 8) -> list["torch.Tensor"]:
        """Each clip's audio tokens (n, hidden); clips seen before come from the cache."""
        import torch

        keys = [hashlib.blake2b(c.astype("float32").tobytes(), digest_size=16).digest() for c in clips]
        # This call's embeddings are held here, not read back from the cache: a batch with more
        # distinct clips than the cache holds evicts its own first clips before the end.
        found = {k: self._clips[k] for k in keys if k in self._clips}
        for k in found:
            self._clips.move_to_end(k)
        todo = list(OrderedDict.fromkeys(k for k in keys if k not in found))
        waves = {k: c for k, c in zip(keys, clips)}
        with torch.inference_mode():
            for i in range(0, len(todo), batch_size):
                chunk = todo[i : i + batch_size]
                wavs = [torch.from_numpy(waves[k]).float().to(self.device) for k in chunk]
                for k, emb in zip(chunk, self.family.encode(self.net, wavs)):
                    found[k] = emb
                    self._remember(k, emb)
        return [found[k] for k in keys]

    def _remember(self, key: bytes, emb: "torch.Tensor") -> None:
        self._clips[key] = emb
        while len(self._clips) > self._clip_cache:
            self._clips.popitem(last=False)

    def prefix(self, questions: Sequence[Question]) -> "Prefix":
        """The language model's input for B questions (audio1, audio2 or None, prompt), as the
        family lays out each question (runtime/prefix.py)."""
        import torch

        from mellow_cli.runtime.prefix import Prefix

        most = self.family.most_clips
        if most is not None and any(len([a for a in (a1, a2) if a is not None]) > most for a1, a2, _ in questions):
            raise UsageError(f"{self.name}: {self.family.title} takes {most} clip{'s' if most > 1 else ''} a question, "
                             "not more")
        first = [self.load_clip(a1) for a1, _, _ in questions]
        second = [None if a2 is None else self.load_clip(a2) for _, a2, _ in questions]
        clips = iter(self.embed_clips(first + [c for c in second if c is not None]))
        heard = [[next(clips)] for _ in first]
        for row, c in zip(heard, second):
            if c is not None:
                row.append(next(clips))
        with torch.inference_mode():
            return Prefix.of([self.family.prefix_row(self.net, row, self.family.prompt_ids(self.tokenizer, q, self.cfg))
                              for row, (_, _, q) in zip(heard, questions)])

    # --- answers ---------------------------------------------------------------------------------

    def answer_options(self, options: DecodingOptions) -> DecodingOptions:
        """`options` with the model's own answer budget where it gives none (its authors': 300
        tokens for Mellow and TinyMU, 100 for Samsone)."""
        from dataclasses import replace

        return options if options.max_tokens is not None else replace(options, max_tokens=self.cfg.default_max_tokens)

    def stream(self, audio: AudioInput, question: str, *, audio2: AudioInput | None = None,
               options: DecodingOptions = DecodingOptions()) -> Iterator[str]:
        """The answer as text pieces, each yielded as soon as it is decoded."""
        from mellow_cli.runtime.generate import stream

        prefix = self.prefix([Question(audio, audio2, question)])
        options = self.answer_options(options)
        for _, piece in stream(self.net.lm, self.tokenizer, prefix, options, self.cfg.eos_token_id):
            yield piece

    def ask(self, audio: AudioInput, question: str, *, audio2: AudioInput | None = None,
            options: DecodingOptions = DecodingOptions()) -> str:
        """The answer to `question` about `audio` (heard beside `audio2`, where the model takes two)."""
        return self.ask_batch([Question(audio, audio2, question)], options)[0]

    def ask_batch(self, questions: Sequence[Question], options: DecodingOptions = DecodingOptions()) -> list[str]:
        """Answers for many questions, decoded together as one batch."""
        from mellow_cli.runtime.generate import generate

        if not questions:
            return []
        prefix = self.prefix(questions)
        options = self.answer_options(options)
        return generate(self.net.lm, self.tokenizer, prefix, options, eos_id=self.cfg.eos_token_id)

    def caption(self, audio: AudioInput, prompt: str | None = None, *,
                options: DecodingOptions = DecodingOptions()) -> str:
        """A caption, by the family's own caption prompt unless `prompt` gives another."""
        return self.ask(audio, prompt or self.family.caption_prompt, options=options)

    def compare(self, audio1: AudioInput, audio2: AudioInput, prompt: str | None = None, *,
                options: DecodingOptions = DecodingOptions()) -> str:
        """How two recordings differ, by the family's own prompt unless `prompt` gives another."""
        return self.ask(audio1, prompt or self.family.compare_prompt, audio2=audio2, options=options)

    def choose(self, audio: AudioInput, question: str, choices: Sequence[str], *,
               audio2: AudioInput | None = None) -> ChoiceResult:
        """Pick one of `choices` by the probability the model gives each as the whole answer
        (its tokens, then the end of text), after the question as asked."""
        return self.choose_batch([Question(audio, audio2, question)], [choices])[0]

    def choose_batch(self, questions: Sequence[Question], choices: Sequence[Sequence[str]]) -> list[ChoiceResult]:
        """`choose` for many rows at once: one prefix pass for the batch, then every (row, choice)
        pair scored together. `choices[i]` belongs to `questions[i]`."""
        from mellow_cli.runtime.generate import score_choices

        if len(questions) != len(choices):
            raise UsageError("give one list of choices per question")
        if any(len(c) < 2 for c in choices):
            raise UsageError("give at least two choices")
        if not questions:
            return []
        prefix = self.prefix(questions)
        rows = score_choices(self.net.lm, self.tokenizer, prefix, [list(c) for c in choices], append_eos=True,
                             eos_id=self.cfg.eos_token_id)
        return [_choice_result(scores, length) for scores, length in zip(rows, prefix.lengths)]


def _choice_result(scores: Sequence["ChoiceScore"], prompt_tokens: int = 0) -> ChoiceResult:
    if not all(math.isfinite(s.logprob) for s in scores):
        from mellow_cli.errors import ModelError
        from mellow_cli.runtime.generate import NOT_FINITE

        raise ModelError(NOT_FINITE)
    top = max(s.logprob for s in scores)
    weights = [math.exp(s.logprob - top) for s in scores]
    probabilities = tuple(w / sum(weights) for w in weights)
    best = max(range(len(scores)), key=lambda i: scores[i].logprob)
    return ChoiceResult(choice=scores[best].text, scores=tuple(scores), probabilities=probabilities,
                        prompt_tokens=prompt_tokens)
