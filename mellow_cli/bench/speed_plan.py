"""`mellow bench speed`'s steps, counted before the first one runs, and an estimate of the time
the rest will take, said as each step starts, so that a run of several minutes says how long it
will be (a float32 run of v0 with the defaults takes minutes on a laptop; `--quick` about one).

The estimate comes from the run's own first figures: a load, one clip through the encoder, the
time to a first token and one decode step. Each later step's cost is a formula in them and the
sizes asked for (its runs, clips, tokens); nothing is guessed before those figures exist, and the
estimate is said as "about", since a batch is cheaper per clip than one clip, and transformers'
loop slower per token than ours.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

LOAD, ENCODER, FIRST_TOKEN, ENCODER_BATCH, CAPTIONS, BASELINE, DECODE, AGREEMENT = (
    "load", "encoder", "first token", "encoder batch", "captions", "baseline", "decode", "agreement")


@dataclass(frozen=True)
class Sizes:
    """What `bench speed` was asked to run."""

    tokens: int  # per timed decode run
    repeat: int  # timed runs per figure, after one warm-up
    batch_size: int  # clips per batch
    prompts: int  # clips compared with float32 (0: none)
    baseline: bool  # race transformers' generate


# `--quick`: each figure once, on few tokens and a small batch, a short agreement check: about a
# minute for v0 on a laptop's CPU, baseline included. Options given beside it still win.
QUICK = Sizes(tokens=16, repeat=1, batch_size=2, prompts=2, baseline=True)


@dataclass(frozen=True)
class Figures:
    """The first figures, in seconds, that the estimate is made of."""

    load: float  # one load of the model
    clip: float  # one clip through the encoder
    first_token: float  # a decoded clip to its first token
    step: float  # one decode step after it


def steps(sizes: Sizes, agreement: bool) -> list[tuple[str, str]]:
    """(key, what it measures) for each step, in order."""
    b = sizes.batch_size
    plan = [(LOAD, "loading the model twice"), (ENCODER, "encoder, one clip"),
            (FIRST_TOKEN, "time to first token"), (ENCODER_BATCH, f"encoder, batch of {b}"),
            (CAPTIONS, f"captions, batch of {b}")]
    if sizes.baseline:
        plan.append((BASELINE, "importing transformers for the baseline (float32)"))
    runs = f"{sizes.repeat} run{'s' * (sizes.repeat > 1)}"
    plan.append((DECODE, f"decode, {sizes.tokens} tokens, {runs}" + (" each, racing transformers" if sizes.baseline else "")))
    if agreement:
        plan.append((AGREEMENT, f"agreement with float32 over {sizes.prompts} clips"))
    return plan


def cost(key: str, sizes: Sizes, f: Figures) -> float:
    """About how many seconds step `key` takes (warm-ups included)."""
    runs, b = sizes.repeat + 1, sizes.batch_size
    answer = f.first_token + sizes.tokens * f.step
    return {
        LOAD: 2 * f.load,
        ENCODER: runs * f.clip,
        FIRST_TOKEN: runs * f.first_token,
        ENCODER_BATCH: runs * b * f.clip,
        CAPTIONS: runs * (b * f.clip + f.first_token + 2 * sizes.tokens * f.step),
        BASELINE: 2 * f.load + 3.0,  # the float32 model loaded again, transformers imported
        DECODE: sizes.repeat * answer * (3 if sizes.baseline else 1),  # transformers' loop: about 2x ours
        AGREEMENT: f.load + sizes.prompts * 2 * (answer + f.first_token),  # answers and choices, both models
    }[key]


def duration(seconds: float) -> str:
    """`40 s`, `7 min`, `1 h 5 min`."""
    if seconds < 90:
        return f"{max(1, round(seconds))} s"
    minutes = round(seconds / 60)
    return f"{minutes} min" if minutes < 60 else f"{minutes // 60} h {minutes % 60} min"


class Progress:
    """Says each step as it starts, numbered out of the whole, with the time the rest should take
    once the first figures are known; `log` says a line."""

    def __init__(self, sizes: Sizes, agreement: bool, log: Callable[[str], None],
                 clock: Callable[[], float] = time.perf_counter):
        self.sizes, self.log, self.clock = sizes, log, clock
        self.plan = steps(sizes, agreement)
        self.figures: Figures | None = None
        self.started = clock()
        log(f"{len(self.plan)} steps: " + "; ".join(what for _, what in self.plan))

    def start(self, key: str) -> None:
        keys = [k for k, _ in self.plan]
        i = keys.index(key)
        line = f"step {i + 1}/{len(self.plan)}: {self.plan[i][1]}"
        if self.figures is not None:
            left = sum(cost(k, self.sizes, self.figures) for k in keys[i:])
            line += f" (about {duration(left)} left)"
        self.log(line)

    def skip(self, key: str, why: str) -> None:
        """A step the run turns out not to need (agreement, when auto chose float32)."""
        self.plan = [(k, what) for k, what in self.plan if k != key]
        self.log(f"{len(self.plan)} steps: {why}")

    def know(self, figures: Figures) -> None:
        self.figures = figures

    def done(self) -> None:
        self.log(f"done in {duration(self.clock() - self.started)}")
