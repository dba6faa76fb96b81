"""`mellow serve`: the model kept loaded behind an OpenAI-style HTTP endpoint.

    GET  /                       a page to try it in a browser (page.py), without the key
    GET  /health                 {"status": "ok", "model": NAME}, without the key
    GET  /v1/models              the one model served
    POST /v1/chat/completions    the OpenAI chat format, with `input_audio` content parts
    POST /ask                    the same question as a form upload, for curl -F (upload.py)

The last message must be the user's: one or two `{"type": "input_audio", "input_audio":
{"data": <base64>, "format": "wav"}}` parts and the question as text. Greedy decoding unless
`temperature` > 0 (then `top_p` and `seed` apply), so an answer equals `mellow ask`'s by default.
`"mellow": {"choices": [...]}` picks one of the choices by likelihood and returns every choice's
probability. request.py checks a request on its own (body, fields, text, clips); then it goes
to worker.py's worker, which answers those waiting together; http.py runs the app.

Every request's cost is bounded (ServeSettings: clips, their decoded samples, text, choice tokens,
requests in hand, time to send), and every refusal is OpenAI's shape, `{"error": {"message",
"type", "param", "code"}}`, with its status: 400 for a body, message or clip that cannot be used,
401 without the right key, 408 for a body sent too slowly, 413 for too much audio or text, 422 for
a value out of range, 500 when the model fails, 503 when busy or stopping, 507 for a full disk.
Each request, once answered, is told to `on_request` as an Access (method, path, status,
seconds, tokens): `mellow serve` prints it as one line. The app is a plain Starlette app
(`build_app`), so tests run it in a thread.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import hmac
import json
import logging
import time
import uuid
from collections.abc import Callable
from typing import TYPE_CHECKING

from mellow_cli.serve.access import TOKENS, Access, Logged
from mellow_cli.serve.limits import ServeSettings
from mellow_cli.serve.request import ApiError, choice_tokens, decode_clip, parse_chat, read_json

if TYPE_CHECKING:
    from mellow_cli.api import Model

RETRY_AFTER_SECONDS = 2  # what a client refused for a full queue is told to wait
log = logging.getLogger("uvicorn.error")  # where uvicorn's own messages go


def served_name(name: str) -> str:
    """The model's name as the server gives it (/health needs no key): a published name or a
    hub id as typed; a local checkpoint or folder by its own name only, since its path would tell
    anyone where the server's files are."""
    from pathlib import Path

    from mellow_cli.models.catalogue import PUBLISHED

    path = Path(name).expanduser()
    if name in PUBLISHED or not path.exists():
        return name
    return (path.stem if path.is_file() else path.resolve().name) or "model"


# --- the app ----------------------------------------------------------------------------------


class _State:
    """What the app holds while it runs: the worker, the requests in hand, the clips decoding."""

    def __init__(self, model: "Model", settings: ServeSettings, on_batch):
        from mellow_cli.serve.worker import Batcher

        self.model, self.settings = model, settings
        self.name = settings.alias or served_name(model.name)
        self.batcher = Batcher(model, settings.max_batch, on_batch, settings.max_batch_choice_tokens)
        self.decoding = asyncio.Semaphore(settings.max_decoding)
        self.in_hand = 0

    def admit(self):
        """Count a request in, or refuse it (503, Retry-After) when `max_queue` are in hand; the
        function returned counts it out."""
        if self.batcher.stopping:
            raise ApiError(503, "the server is shutting down", code="shutting_down")
        if self.in_hand >= self.settings.max_queue:
            raise ApiError(503, f"the server has {self.in_hand} requests in hand, its limit: try again shortly",
                           code="server_busy", headers={"Retry-After": str(RETRY_AFTER_SECONDS)})
        self.in_hand += 1
        released = False

        def release() -> None:
            nonlocal released
            if not released:
                released = True
                self.in_hand -= 1
        return release


def build_app(model: "Model", settings: ServeSettings = ServeSettings(), on_batch=None,
              on_request: Callable[[Access], None] | None = None):
    """The Starlette app: its lifespan starts the model worker and, at shutdown, lets it finish
    what is queued; each request answered is told to `on_request`. `app.state.mellow` is what
    http.make_server needs of it."""
    from starlette.applications import Starlette
    from starlette.exceptions import HTTPException
    from starlette.middleware import Middleware
    from starlette.routing import Route

    from mellow_cli.serve import page

    state = _State(model, settings, on_batch)

    @contextlib.asynccontextmanager
    async def lifespan(app):
        state.batcher.start()
        try:
            yield
        finally:
            await asyncio.get_running_loop().run_in_executor(None, state.batcher.stop)

    async def health(request):
        return _json({"status": "stopping" if state.batcher.stopping else "ok", "model": state.name})

    async def models(request):
        _authorize(request, settings)
        return _json({"object": "list", "data": [{"id": state.name, "object": "model", "created": 0,
                                                  "owned_by": "mellow-cli"}]})

    async def chat(request):
        _authorize(request, settings)
        return await _chat(request, state)

    async def ask(request):
        _authorize(request, settings)
        return await _chat(request, state, form=True)

    async def api_error(request, exc: ApiError):
        return _json(exc.body(), exc.status, exc.headers)

    async def http_error(request, exc: HTTPException):
        return _json(ApiError(exc.status_code, str(exc.detail)).body(), exc.status_code)

    async def internal_error(request, exc: Exception):  # a bug: the client gets JSON, the log the traceback
        return _json(ApiError(500, "internal error: the server's log says more").body(), 500)

    app = Starlette(
        routes=[page.route(state.name, settings.max_audio_seconds, settings.max_tokens),
                Route("/health", _guarded(health)), Route("/v1/models", _guarded(models)),
                Route("/v1/chat/completions", _guarded(chat), methods=["POST"]),
                Route("/ask", _guarded(ask), methods=["POST"])],
        exception_handlers={ApiError: api_error, HTTPException: http_error, Exception: internal_error},
        middleware=[Middleware(Logged, on_request=on_request)] if on_request else [],
        lifespan=lifespan,
    )
    app.state.mellow = state
    return app


def _guarded(handler):
    """`handler`, with the failures of the machine it runs on as OpenAI errors: a full disk 507,
    no memory 503, another OS error 500, each with one line in the log and no traceback."""
    async def run(request):
        try:
            return await handler(request)
        except OSError as e:
            full = e.errno in (errno.ENOSPC, errno.EDQUOT)
            log.error("a request failed: %s", e.strerror or e)
            raise (ApiError(507, "the server's disk is full", code="disk_full") if full else
                   ApiError(500, f"the server could not answer ({e.strerror or type(e).__name__})")) from None
        except MemoryError:
            log.error("a request failed: out of memory")
            raise ApiError(503, "the server ran out of memory for this request", code="out_of_memory") from None
    return run


def _json(obj: dict, status: int = 200, headers: dict | None = None):
    from starlette.responses import JSONResponse

    return JSONResponse(obj, status_code=status, headers=headers)


def _authorize(request, settings: ServeSettings) -> None:
    if settings.api_key is None:
        return
    given = request.headers.get("authorization", "")
    scheme, _, token = given.partition(" ")
    if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode(), settings.api_key.encode()):
        raise ApiError(401, "missing or wrong API key: send `Authorization: Bearer <key>`", code="invalid_api_key")


# --- one chat request -------------------------------------------------------------------------


class _Gone(Exception):
    """The client hung up before its answer was ready."""


async def _chat(request, state: _State, form: bool = False):
    """One question: a JSON chat request, or (`form`) an upload to /ask, answered in its shape."""
    from starlette.concurrency import run_in_threadpool

    from mellow_cli.serve.worker import Failed

    if "content-length" in request.headers and "transfer-encoding" in request.headers:
        # Two lengths: a proxy in front may have read the other one, so where this body ends,
        # and the next request starts, is not certain.
        raise ApiError(400, "give Content-Length or Transfer-Encoding, not both", code="ambiguous_length",
                       headers={"Connection": "close"})
    release = state.admit()
    pending = None
    try:
        body = await _read_body(request, state.settings)
        # In a thread: a body of a hundred megabytes takes the parser a second or two, during
        # which the other requests' streams and /health go on.
        chat = within_cap(await run_in_threadpool(_parse, body, request.headers.get("content-type", ""), form,
                                                  state.settings.max_tokens), state)
        pending, events = await _prepare(chat, state)
        first = await _unless_gone(request, events.get())
        if isinstance(first, Failed):  # before the first piece: its own status, streamed or not
            raise ApiError(first.status, first.message)
        reply = _Reply(state.name, request.scope)
        if chat.stream:
            response = _sse(reply.stream(first, events, chat.include_usage))
        else:
            answer = await _unless_gone(request, reply.whole(first, events))
            response = _json(_plain(answer, chat) if form else answer)
    except _Gone:
        response = _json(ApiError(499, "the client went away").body(), 499)  # never sent: for the log
    except BaseException:
        _done(release, pending)
        raise
    return _Finally(response, lambda: _done(release, pending))


def _parse(body: bytes, content_type: str, form: bool, max_tokens: int):
    from mellow_cli.serve.upload import parse_form

    return parse_form(body, content_type, max_tokens) if form else parse_chat(read_json(body), max_tokens)


def within_cap(chat, state: _State):
    """A request that names no max_tokens gets the model's own answer budget (its authors'), or
    the server's --max-tokens if that is less."""
    from dataclasses import replace

    if chat.options.max_tokens is not None:
        return chat
    own = state.model.answer_options(chat.options).max_tokens
    return replace(chat, options=replace(chat.options, max_tokens=min(own, state.settings.max_tokens)))


def _plain(answer: dict, chat) -> dict:
    """/ask's answer: the question and the answer as `mellow ask -f json` names them, with each
    choice's probability under `scores` (keyed by choice) when it had choices."""
    scored = answer.get("mellow", {}).get("choices")
    out = {"model": answer["model"], "audio": [part.where.removeprefix("file ") for part in chat.audio],
           "question": chat.question, "answer": answer["choices"][0]["message"]["content"]}
    if scored:
        out["choices"] = [c["choice"] for c in scored]
        out["scores"] = {c["choice"]: c["probability"] for c in scored}
    return {**out, "finish_reason": answer["choices"][0]["finish_reason"], "usage": answer["usage"]}


def _done(release, pending) -> None:
    release()
    if pending is not None:
        pending.cancelled.set()  # a client gone mid-answer frees its row in the batch


async def _read_body(request, settings: ServeSettings) -> bytes:
    """The body, refused (413) as soon as it passes the limit, and (408) when it takes longer
    than `body_seconds` to arrive."""
    limit = settings.max_body_bytes
    declared = request.headers.get("content-length")
    if declared and declared.isdigit() and int(declared) > limit:
        raise ApiError(413, f"the request body is over {limit} bytes", code="request_too_large")

    async def read() -> bytes:
        chunks, size = [], 0
        async for chunk in request.stream():
            size += len(chunk)
            if size > limit:
                raise ApiError(413, f"the request body is over {limit} bytes", code="request_too_large")
            chunks.append(chunk)
        return b"".join(chunks)

    try:
        return await asyncio.wait_for(read(), settings.body_seconds)
    except asyncio.TimeoutError:
        raise ApiError(408, f"the request body did not arrive within {settings.body_seconds:g} s", code="timeout",
                       headers={"Connection": "close"}) from None


async def _prepare(chat, state: _State):
    """Encode the request's text and decode its clips (in threads, `max_decoding` clips at a
    time), then hand it to the worker: (its Pending, the queue its events arrive on)."""
    from starlette.concurrency import run_in_threadpool

    from mellow_cli.serve.worker import Pending

    model, settings = state.model, state.settings
    tokens = await run_in_threadpool(choice_tokens, model, chat, settings)
    loop, events = asyncio.get_running_loop(), asyncio.Queue()
    with state.batcher.preparing():
        clips = []
        for part in chat.audio:
            async with state.decoding:
                clips.append(await run_in_threadpool(decode_clip, model, part, settings))
        pending = Pending(clips[0], clips[1] if len(clips) > 1 else None, chat.question, chat.options,
                          emit=lambda event: _deliver(loop, events, event, pending), choices=chat.choices,
                          choice_tokens=tokens)
        state.batcher.submit(pending)
    return pending, events


async def _unless_gone(request, awaitable):
    """`awaitable`'s result, or _Gone as soon as the client hangs up (its body is read by then,
    so the next message is the disconnect)."""
    task = asyncio.ensure_future(awaitable)
    gone = asyncio.ensure_future(_disconnected(request.receive))
    try:
        await asyncio.wait({task, gone}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        gone.cancel()
        if not task.done():
            task.cancel()
    if task.done() and not task.cancelled():
        return task.result()
    raise _Gone


async def _disconnected(receive) -> None:
    while (await receive())["type"] != "http.disconnect":
        pass


def _deliver(loop, events: asyncio.Queue, event, pending) -> None:
    """From the worker thread: hand an event to the request's loop; a loop that is gone means
    nobody is listening any more."""
    try:
        loop.call_soon_threadsafe(events.put_nowait, event)
    except RuntimeError:
        pending.cancelled.set()


class _Finally:
    """A response that runs `then` once it is sent, or abandoned (a stream whose client left,
    or the server's stop), whatever happened."""

    def __init__(self, response, then):
        self.response, self.then = response, then

    async def __call__(self, scope, receive, send):
        try:
            await self.response(scope, receive, send)
        finally:
            self.then()


def _sse(chunks):
    from starlette.responses import StreamingResponse

    return StreamingResponse(chunks, media_type="text/event-stream",
                             headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})


class _Reply:
    """One request's answer in OpenAI's shapes: a whole `chat.completion`, or its chunks. Its
    tokens are noted in the request's `scope` for the access line (access.py)."""

    def __init__(self, model_name: str, scope: dict):
        self.head = {"id": f"chatcmpl-{uuid.uuid4().hex}", "created": int(time.time()), "model": model_name}
        self.scope = scope

    async def whole(self, event, events: asyncio.Queue) -> dict:
        from mellow_cli.serve.worker import Failed, Finished

        text, extra = "", {}
        while not isinstance(event, Finished):
            if isinstance(event, Failed):
                raise ApiError(event.status, event.message)
            text, extra = _add(text, extra, event)
            event = await events.get()
        choice = {"index": 0, "message": {"role": "assistant", "content": text}, "logprobs": None,
                  "finish_reason": event.reason}
        return {**self.head, "object": "chat.completion", "choices": [choice], "usage": self._usage(event), **extra}

    async def stream(self, event, events: asyncio.Queue, include_usage: bool):
        from mellow_cli.serve.worker import Failed, Finished

        yield self._chunk({"role": "assistant", "content": ""})
        while not isinstance(event, (Finished, Failed)):
            _, extra = _add("", {}, event)
            yield self._chunk({"content": event if isinstance(event, str) else event.choice}, **extra)
            event = await events.get()
        if isinstance(event, Failed):
            yield _event(ApiError(event.status, event.message).body())
        else:
            yield self._chunk({}, finish_reason=event.reason)
            usage = self._usage(event)
            if include_usage:
                yield _event({**self.head, "object": "chat.completion.chunk", "choices": [], "usage": usage})
        yield "data: [DONE]\n\n"

    def _usage(self, done) -> dict:
        usage = {"prompt_tokens": done.prompt_tokens, "completion_tokens": done.completion_tokens,
                 "total_tokens": done.prompt_tokens + done.completion_tokens}
        self.scope[TOKENS] = usage
        return usage

    def _chunk(self, delta: dict, finish_reason: str | None = None, **extra) -> str:
        choice = {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish_reason}
        return _event({**self.head, "object": "chat.completion.chunk", "choices": [choice], **extra})


def _add(text: str, extra: dict, event) -> tuple[str, dict]:
    """A text piece, or a choice result with its probabilities under `mellow`."""
    if isinstance(event, str):
        return text + event, extra
    return text + event.choice, {"mellow": {"choices": event.as_dict()}}


def _event(obj: dict) -> str:
    return f"data: {json.dumps(obj, ensure_ascii=False)}\n\n"

