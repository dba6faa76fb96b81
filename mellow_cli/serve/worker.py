"""The model side of `mellow serve`: one worker thread owns the model and answers requests in
batches, so eight clients waiting at once cost about one prefill and one shared run of decode
steps instead of eight of each.

Requests arrive on a thread-safe queue. The worker takes everything waiting (up to
`max_batch`, and choices of at most `max_choice_tokens` in all: a request past that waits for the
next batch), scores the multiple-choice rows with `Model.choose_batch`, then runs the
generation rows together: one `Model.prefix` for all of them, one prefill (runtime/generate.py's
Session: rows of other lengths each keep to their own), then decode steps in which each
row draws its next token with its own options (greedy rows take the argmax, as `mellow ask` does;
sampling rows their own seeded generator). A row that ends (end of text, its token budget, or its
client gone) leaves the batch and the KV cache keeps only the rows still running. Requests that
arrive meanwhile wait for the next batch. Each row's text goes to its own callback, which the
HTTP side turns into a put on that request's asyncio queue: the worker never waits for a client.

A failure while answering a batch reaches only the rows it concerns: rows whose scores are not
finite fail alone, and when a run fails as a whole, each of its rows that has heard nothing yet is
answered again on its own, so the one that caused it gets the error and the others their answers.
When the server stops, `drain` lets the rows run until shortly before its grace period ends, then
ends each (finish reason "length"), so every stream gets its last chunk and `data: [DONE]`.
"""

from __future__ import annotations

import contextlib
import queue
import threading
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Callable, Iterator, Optional, Sequence

from mellow_cli.api import Question
from mellow_cli.errors import MellowError
from mellow_cli.runtime.options import DecodingOptions

if TYPE_CHECKING:
    import numpy as np

    from mellow_cli.api import Model


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


STOPPING = Failed("the server is shutting down", 503)

Event = "str | ChoiceResult | Finished | Failed"  # what a request's callback receives, in order


@dataclass(eq=False)  # each is its own request, whatever its fields hold (numpy arrays do not compare to a bool)
class Pending:
    """One request in the worker's hands. `emit` is called from the worker thread, through
    `tell`, with text pieces, then a ChoiceResult (choice rows) or nothing, then Finished or
    Failed."""

    clip1: "np.ndarray"
    clip2: "Optional[np.ndarray]"
    question: str
    options: DecodingOptions
    emit: Callable[[object], None]
    choices: Optional[tuple[str, ...]] = None
    choice_tokens: int = 0  # of its choices, each with the end of text (the batch's cap counts them)
    cancelled: threading.Event = field(default_factory=threading.Event)  # the client went away
    heard: bool = False  # something was sent: answering it again would repeat it
    done: bool = False  # Finished or Failed was sent

    @property
    def row(self) -> Question:
        return Question(self.clip1, self.clip2, self.question)

    def tell(self, event) -> None:
        self.heard = True
        self.done = isinstance(event, (Finished, Failed))
        self.emit(event)


_STOP = object()

# How long the worker, holding a batch, waits for requests whose audio is being decoded at that
# moment (their bodies are in; the wait is server work, never a client's pace). Short against a
# prefill, long enough that requests sent together are answered together.
GATHER_SECONDS = 0.25


class Batcher:
    """The model's only user while the server runs: `submit` from any thread, `drain` when the
    server starts to stop, `stop` to finish what is queued and end the worker."""

    def __init__(self, model: "Model", max_batch: int = 8, on_batch: Callable[[int], None] | None = None,
                 max_choice_tokens: int = 4096):
        self.model = model
        self.max_batch = max_batch
        self.max_choice_tokens = max_choice_tokens  # of the choices scored in one batch
        self.on_batch = on_batch  # told each batch's size (logging)
        self._queue: queue.Queue = queue.Queue()
        self._held: Pending | None = None  # taken, but the first of the next batch (the choice tokens' cap)
        self._stopped = False  # the worker was told to stop: it ends once nothing is left
        self._thread = threading.Thread(target=self._run, name="mellow-model", daemon=True)
        self.stopping = False
        self.cut = threading.Event()  # set: the rows running end now, those waiting are refused
        self._preparing = 0  # requests whose audio is being decoded, soon to be submitted
        self._lock = threading.Lock()

    def start(self) -> None:
        self._thread.start()

    def submit(self, pending: Pending) -> None:
        if self.cut.is_set():  # the worker may be gone already
            pending.tell(STOPPING)
        else:
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

    def drain(self, seconds: float) -> None:
        """The server is stopping: take no more requests, and end the ones in hand after
        `seconds` (see `cut`)."""
        self.stopping = True
        timer = threading.Timer(max(seconds, 0.0), self.cut.set)
        timer.daemon = True
        timer.start()

    def stop(self, timeout: float | None = None) -> None:
        self.stopping = True
        self._queue.put(_STOP)
        self._thread.join(timeout)

    def _run(self) -> None:
        while (batch := self._take()) is not None:
            batch = [p for p in batch if not p.cancelled.is_set()]
            if batch and self.cut.is_set():
                for p in batch:
                    p.tell(STOPPING)
            elif batch:
                if self.on_batch:
                    self.on_batch(len(batch))
                try:
                    answer_batch(self.model, batch, self.cut)
                except Exception as e:  # a bug here would end the worker: the server would hang
                    for p in batch:
                        if not p.done:
                            p.tell(_failure(e))

    def _take(self) -> list[Pending] | None:
        """Block for one request, then take whatever else is waiting or about to be, within the
        batch's caps; None once told to stop with nothing left."""
        first = self._next(None)
        if first is None:
            return None
        batch, tokens, deadline = [first], first.choice_tokens, time.monotonic() + GATHER_SECONDS
        while len(batch) < self.max_batch:
            item = self._next(deadline - time.monotonic() if self._preparing else 0)
            if item is None:
                break
            if tokens + item.choice_tokens > self.max_choice_tokens:
                self._held = item
                break
            batch.append(item)
            tokens += item.choice_tokens
        return batch

    def _next(self, wait: float | None) -> Pending | None:
        """The request held back, else the queue's next within `wait` seconds (None: as long as
        it takes); None if there is none, or the worker was told to stop."""
        if self._held is not None:
            item, self._held = self._held, None
            return item
        if self._stopped:
            return None
        try:
            item = self._queue.get(timeout=wait) if wait is None or wait > 0 else self._queue.get_nowait()
        except queue.Empty:
            return None
        self._stopped = item is _STOP
        return None if self._stopped else item


def answer_batch(model: "Model", batch: Sequence[Pending], cut: threading.Event | None = None) -> None:
    """Answer every request of one batch; a failure reaches the requests it concerns, never the
    worker (the server keeps serving). `cut` set: rows end now (the server is stopping)."""
    cut = cut or threading.Event()
    choosers = [p for p in batch if p.choices]
    writers = [p for p in batch if not p.choices]
    for rows, run in ((choosers, _choose), (writers, _generate)):
        if rows:
            _answer(model, rows, run, cut)


def _answer(model: "Model", rows: Sequence[Pending], run, cut: threading.Event) -> None:
    """`run` the rows together; if that fails, each row that has heard nothing yet is answered
    again alone (one row's input may have failed them all), and the others get the failure."""
    try:
        run(model, rows, cut)
    except Exception as e:  # a bad input or a bug: the clients get a 500 and the worker goes on
        failure = _failure(e)
        fresh = [p for p in rows if not p.heard] if len(rows) > 1 else []
        for p in rows:
            if not p.done and p not in fresh:
                p.tell(failure)
        for p in fresh:
            _answer(model, [p], run, cut)


def _failure(e: Exception) -> Failed:
    if isinstance(e, MellowError):
        return Failed(str(e))
    if isinstance(e, MemoryError):
        return Failed("the server ran out of memory answering this request", 503)
    return Failed(f"internal error: {type(e).__name__}: {e}")


def _choose(model: "Model", rows: Sequence[Pending], cut: threading.Event) -> None:
    results = model.choose_batch([p.row for p in rows], [p.choices for p in rows])
    for p, result in zip(rows, results):
        p.tell(result)
        p.tell(Finished("stop", result.prompt_tokens, 0))


class _Row:
    """A generation row while it runs: its text so far and its sampler."""

    def __init__(self, pending: Pending, tokenizer, device, prompt_tokens: int, budget: int):
        from mellow_cli.runtime.generate import TextStream, _generator

        self.pending = pending
        self.prompt_tokens = prompt_tokens  # the prefix's length: what the request's usage counts
        self.budget = budget  # its tokens at most: the request's max_tokens, or the model's own
        self.text = TextStream(tokenizer)
        # The same generator `mellow ask --sample --seed N` draws from, so a seeded answer repeats.
        self.generator = _generator(pending.options, device)
        self.tokens = 0


def _generate(model: "Model", rows: Sequence[Pending], cut: threading.Event) -> None:
    import torch

    from mellow_cli.runtime.generate import Session

    eos = model.cfg.eos_token_id
    with torch.inference_mode():
        prefix = model.prefix([p.row for p in rows])
        budgets = [model.answer_options(p.options).budget for p in rows]
        session = Session(model.net.lm, prefix, max(budgets))
        device = prefix.embeds.device
        live = [_Row(p, model.tokenizer, device, length, budget)
                for p, length, budget in zip(rows, prefix.lengths, budgets)]
        logits = session.first()
        while live:
            tokens = _next_tokens(logits, live)
            keep = [i for i, (r, t) in enumerate(zip(live, tokens)) if t is not None and _advance(r, t, eos, cut)]
            if not keep:
                return
            if len(keep) < len(live):
                session.keep(keep)
                live, tokens = [live[i] for i in keep], [tokens[i] for i in keep]
            logits = session.step(torch.tensor(tokens, device=device))


def _next_tokens(logits, live: Sequence[_Row]) -> list[int | None]:
    """Each row's next token: the greedy rows' argmax in one call (a row's argmax is the one a
    batch of one would take), each sampling row with its own options and generator. A row whose
    scores are not finite is told so and gets None: the others go on."""
    import torch

    from mellow_cli.runtime.generate import NOT_FINITE, next_token

    finite = torch.isfinite(logits).all(dim=-1).tolist()
    tokens: list[int | None] = [None] * len(live)
    for r, ok in zip(live, finite):
        if not ok:
            r.pending.tell(Failed(NOT_FINITE))
    greedy = [i for i, r in enumerate(live) if r.generator is None and finite[i]]
    if greedy:
        for i, token in zip(greedy, next_token(logits[greedy], DecodingOptions()).tolist()):
            tokens[i] = token
    for i, r in enumerate(live):
        if r.generator is not None and finite[i]:
            tokens[i] = int(next_token(logits[i : i + 1], r.pending.options, r.generator))
    return tokens


def _advance(row: _Row, token: int, eos: int, cut: threading.Event) -> bool:
    """Give one row its next token; False when the row is done (and has been told so). A row
    cut short by the server's stop ends as one its token budget ends."""
    p = row.pending
    if p.cancelled.is_set():
        return False
    if token == eos:
        reason = "stop"
    else:
        row.tokens += 1
        piece = row.text.push(token)
        if piece:
            p.tell(piece)
        if row.tokens < row.budget and not cut.is_set():
            return True
        reason = "length"
    rest = row.text.flush()
    if rest:
        p.tell(rest)
    p.tell(Finished(reason, row.prompt_tokens, row.tokens))
    return False
