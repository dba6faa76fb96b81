"""The model side of `mellow serve`: one worker thread owns the model and answers requests in
batches, so eight clients waiting at once cost about one prefill and one shared run of decode
steps instead of eight of each.

Requests arrive on a thread-safe queue. The worker takes everything waiting (up to
`max_batch`), scores the multiple-choice rows with `Model.choose_batch`, then runs the
generation rows together: one `Model.prefix` for all of them, one prefill, then decode steps in
which each row draws its next token with its own options (greedy rows take the argmax, as `mellow ask` does;
sampling rows their own seeded generator). A row that ends (end of text, its token budget, or its
client gone) leaves the batch and the KV cache keeps only the rows still running. Requests that
arrive meanwhile wait for the next batch. Each row's text goes to its own callback, which the
HTTP side turns into a put on that request's asyncio queue: the worker never waits for a client.
"""

from __future__ import annotations

import contextlib
import queue
import threading
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Callable, Iterator, Optional, Sequence

from mellow_cli.api import Question
from mellow_cli.runtime.options import DecodingOptions
from mellow_cli.errors import MellowError

if TYPE_CHECKING:
    import numpy as np

    from mellow_cli.api import ChoiceResult, Model


@dataclass(frozen=True)
class Finished:
    """The end of one answer: why it stopped ("stop": end of text; "length": its token budget)
    and what it cost, in tokens (usage)."""

    reason: str
    prompt_tokens: int
    completion_tokens: int


@dataclass(frozen=True)
class Failed:
    """The model could not answer this request (bad numbers, a bug): a message for the client."""

    message: str
    status: int = 500


Event = "str | ChoiceResult | Finished | Failed"  # what a request's callback receives, in order


@dataclass
class Pending:
    """One request in the worker's hands. `emit` is called from the worker thread with text
    pieces, then a ChoiceResult (choice rows) or nothing, then Finished or Failed."""

    clip1: "np.ndarray"
    clip2: "Optional[np.ndarray]"
    question: str
    options: DecodingOptions
    emit: Callable[[object], None]
    choices: Optional[tuple[str, ...]] = None
    cancelled: threading.Event = field(default_factory=threading.Event)  # the client went away

    @property
    def row(self) -> Question:
        return Question(self.clip1, self.clip2, self.question)


_STOP = object()

# How long the worker, holding a batch, waits for requests whose audio is being decoded at that
# moment (their bodies are in; the wait is server work, never a client's pace). Short against a
# prefill, long enough that requests sent together are answered together.
GATHER_SECONDS = 0.25


class Batcher:
    """The model's only user while the server runs: `submit` from any thread, `stop` to finish
    what is queued and end the worker."""

    def __init__(self, model: "Model", max_batch: int = 8, on_batch: Callable[[int], None] | None = None):
        self.model = model
        self.max_batch = max_batch
        self.on_batch = on_batch  # told each batch's size (logging)
        self._queue: queue.Queue = queue.Queue()
        self._thread = threading.Thread(target=self._run, name="mellow-model", daemon=True)
        self.stopping = False
        self._preparing = 0  # requests whose audio is being decoded, soon to be submitted
        self._lock = threading.Lock()

    def start(self) -> None:
        self._thread.start()

    def submit(self, pending: Pending) -> None:
        self._queue.put(pending)

    @contextlib.contextmanager
    def preparing(self) -> Iterator[None]:
        """Around decoding a request's audio and submitting it: a batch being formed waits
        (up to GATHER_SECONDS) for it."""
        with self._lock:
            self._preparing += 1
        try:
            yield
        finally:
            with self._lock:
                self._preparing -= 1

    def stop(self, timeout: float | None = None) -> None:
        self.stopping = True
        self._queue.put(_STOP)
        self._thread.join(timeout)

    def _run(self) -> None:
        while True:
            batch, stop = self._take()
            batch = [p for p in batch if not p.cancelled.is_set()]
            if batch:
                if self.on_batch:
                    self.on_batch(len(batch))
                answer_batch(self.model, batch)
            if stop:
                return

    def _take(self) -> tuple[list[Pending], bool]:
        """Block for one request, then take whatever else is waiting or about to be."""
        first = self._queue.get()
        if first is _STOP:
            return [], True
        batch, deadline = [first], time.monotonic() + GATHER_SECONDS
        while len(batch) < self.max_batch:
            wait = deadline - time.monotonic() if self._preparing else 0
            try:
                item = self._queue.get(timeout=wait) if wait > 0 else self._queue.get_nowait()
            except queue.Empty:
                break
            if item is _STOP:
                return batch, True
            batch.append(item)
        return batch, False


def answer_batch(model: "Model", batch: Sequence[Pending]) -> None:
    """Answer every request of one batch; a failure reaches the requests it concerns, never the
    worker (the server keeps serving)."""
    choosers = [p for p in batch if p.choices]
    writers = [p for p in batch if not p.choices]
    for rows, run in ((choosers, _choose), (writers, _generate)):
        if not rows:
            continue
        try:
            run(model, rows)
        except MellowError as e:
            _fail(rows, Failed(str(e)))
        except Exception as e:  # a bug: the clients get a 500 and the worker goes on
            _fail(rows, Failed(f"internal error: {type(e).__name__}: {e}"))


def _fail(rows: Sequence[Pending], failure: Failed) -> None:
    for p in rows:
        p.emit(failure)


def _choose(model: "Model", rows: Sequence[Pending]) -> None:
    results = model.choose_batch([p.row for p in rows], [p.choices for p in rows])
    for p, result in zip(rows, results):
        p.emit(result)
        p.emit(Finished("stop", result.prompt_tokens, 0))


class _Row:
    """A generation row while it runs: its text so far and its sampler."""

    def __init__(self, pending: Pending, tokenizer, device, prompt_tokens: int):
        from mellow_cli.runtime.generate import TextStream, _generator

        self.pending = pending
        self.prompt_tokens = prompt_tokens  # the prefix's length: what the request's usage counts
        self.text = TextStream(tokenizer)
        # The same generator `mellow ask --sample --seed N` draws from, so a seeded answer repeats.
        self.generator = _generator(pending.options, device)
        self.tokens = 0


def _generate(model: "Model", rows: Sequence[Pending]) -> None:
    import torch

    from mellow_cli.runtime.generate import Session

    eos = model.cfg.eos_token_id
    with torch.inference_mode():
        prefix = model.prefix([p.row for p in rows])
        session = Session(model.net.lm, prefix, max(p.options.max_tokens for p in rows))
        device = prefix.embeds.device
        live = [_Row(p, model.tokenizer, device, length) for p, length in zip(rows, prefix.lengths)]
        logits = session.first()
        while live:
            tokens = _next_tokens(logits, live)
            keep = [i for i, (r, t) in enumerate(zip(live, tokens)) if _advance(r, t, eos)]
            if not keep:
                return
            if len(keep) < len(live):
                session.keep(keep)
                live, tokens = [live[i] for i in keep], [tokens[i] for i in keep]
            logits = session.step(torch.tensor(tokens, device=device))


def _next_tokens(logits, live: Sequence[_Row]) -> list[int]:
    """Each row's next token: the greedy rows' argmax in one call (a row's argmax is the one a
    batch of one would take), each sampling row with its own options and generator."""
    from mellow_cli.runtime.generate import next_token

    tokens = [0] * len(live)
    greedy = [i for i, r in enumerate(live) if r.generator is None]
    if greedy:
        for i, token in zip(greedy, next_token(logits[greedy], DecodingOptions()).tolist()):
            tokens[i] = token
    for i, r in enumerate(live):
        if r.generator is not None:
            tokens[i] = int(next_token(logits[i : i + 1], r.pending.options, r.generator))
    return tokens


def _advance(row: _Row, token: int, eos: int) -> bool:
    """Give one row its next token; False when the row is done (and has been told so)."""
    p = row.pending
    if p.cancelled.is_set():
        return False
    if token == eos:
        reason = "stop"
    else:
        row.tokens += 1
        piece = row.text.push(token)
        if piece:
            p.emit(piece)
        if row.tokens < p.options.max_tokens:
            return True
        reason = "length"
    rest = row.text.flush()
    if rest:
        p.emit(rest)
    p.emit(Finished(reason, row.prompt_tokens, row.tokens))
    return False
