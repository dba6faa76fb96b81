"""`mellow serve`: the model kept loaded behind an OpenAI-style HTTP endpoint.

    GET  /                       a page to try it in a browser (page.py), without the key
    GET  /health                 {"status": "ok", ...}, without the key
    GET  /v1/models              the one model served
    POST /v1/chat/completions    the OpenAI chat format, with `input_audio` content parts

The last message must be the user's: one or two `{"type": "input_audio", "input_audio":
{"data": <base64>, "format": "wav"}}` parts and the question as text. Greedy decoding unless
`temperature` > 0 (then `top_p` and `seed` apply), so an answer equals `mellow ask`'s by default.
`"mellow": {"choices": [...]}` picks one of the choices by likelihood and returns every choice's
probability. Requests go to serve_batch.py's worker, which answers those waiting together.

Errors are OpenAI's shape, `{"error": {"message", "type", "param", "code"}}`: 400 for a body,
message or clip that cannot be used, 401 without the right key, 413 for too much audio, 422 for a
value out of range, 500 when the model fails. The app is a plain Starlette app (`build_app`), so
tests run it in a thread; `serve` runs it under uvicorn, which drains requests on SIGTERM/Ctrl-C.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import contextlib
import hmac
import json
import time
import uuid
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Optional

from mellow_cli.runtime.options import MAX_SEED, MAX_TOKENS
from mellow_cli.runtime.options import DecodingOptions
from mellow_cli.errors import AudioError

if TYPE_CHECKING:
    from mellow_cli.api import Model

FORMATS = ("wav", "flac", "mp3", "ogg")
MAX_CHOICES = 100
MAX_TEMPERATURE = 2.0  # OpenAI's range
DEFAULT_MAX_AUDIO_SECONDS = 300.0
GRACE_SECONDS = 30  # how long requests in flight may take to finish once the server is told to stop


@dataclass(frozen=True)
class ServeSettings:
    api_key: Optional[str] = None  # None: no key asked
    max_batch: int = 8  # requests answered together at most
    max_audio_seconds: float = DEFAULT_MAX_AUDIO_SECONDS  # per clip; longer is refused (413)

    @property
    def max_body_bytes(self) -> int:
        """Two clips of `max_audio_seconds` as 48 kHz stereo 16-bit WAV, in base64, and room for
        the text: a body past this is refused before it is read whole."""
        return int(2 * self.max_audio_seconds * 48000 * 2 * 2 * 4 / 3) + 65536


class ApiError(Exception):
    """A request the server will not answer, with its HTTP status and OpenAI's error fields."""

    TYPES = {400: "invalid_request_error", 401: "authentication_error", 404: "not_found_error",
             405: "invalid_request_error", 413: "invalid_request_error", 422: "invalid_request_error",
             500: "server_error", 503: "server_error"}

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.TYPES.get(self.status, "invalid_request_error"),
                          "param": self.param, "code": self.code}}


# --- the request ------------------------------------------------------------------------------


@dataclass(frozen=True)
class AudioPart:
    data: str  # base64, as sent
    format: str
    where: str  # e.g. messages[0].content[1], for error messages


@dataclass(frozen=True)
class ChatRequest:
    audio: tuple[AudioPart, ...]  # one or two
    question: str
    options: DecodingOptions
    choices: Optional[tuple[str, ...]] = None
    stream: bool = False
    include_usage: bool = False


def parse_chat(body: Any) -> ChatRequest:
    """A decoded JSON body -> ChatRequest, or ApiError (400 missing or mistyped, 422 out of range)."""
    if not isinstance(body, dict):
        raise ApiError(400, "the body must be a JSON object")
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise ApiError(400, "messages: give a list with the user's message last", "messages")
    audio, question = _user_message(messages[-1], f"messages[{len(messages) - 1}]")
    mellow = _typed(body, "mellow", dict, "an object") or {}
    choices = _choices(mellow.get("choices")) if "choices" in mellow else None
    if body.get("n") not in (None, 1):
        raise ApiError(422, "n: only one answer per request", "n")
    stream_options = _typed(body, "stream_options", dict, "an object") or {}
    return ChatRequest(audio=audio, question=question, options=_options(body), choices=choices,
                       stream=bool(_typed(body, "stream", bool, "true or false")),
                       include_usage=bool(_typed(stream_options, "include_usage", bool, "true or false")))


def _user_message(message: Any, where: str) -> tuple[tuple[AudioPart, ...], str]:
    if not isinstance(message, dict) or message.get("role") != "user":
        raise ApiError(400, f"{where}: the last message must be the user's (role \"user\")", "messages")
    content = message.get("content")
    parts = [{"type": "text", "text": content}] if isinstance(content, str) else content
    if not isinstance(parts, list):
        raise ApiError(400, f"{where}.content: give a list of parts (input_audio and text)", "messages")
    audio, texts = [], []
    for i, part in enumerate(parts):
        here = f"{where}.content[{i}]"
        kind = part.get("type") if isinstance(part, dict) else None
        if kind == "text" and isinstance(part.get("text"), str):
            texts.append(part["text"])
        elif kind == "input_audio" and isinstance(part.get("input_audio"), dict):
            audio.append(_audio_part(part["input_audio"], here))
        else:
            raise ApiError(400, f"{here}: expected {{\"type\": \"text\", \"text\": ...}} or "
                           f"{{\"type\": \"input_audio\", \"input_audio\": {{...}}}}", "messages")
    if not 1 <= len(audio) <= 2:
        raise ApiError(400, f"{where}: give one or two input_audio parts (got {len(audio)})", "messages")
    question = " ".join(t.strip() for t in texts if t.strip())
    if not question:
        raise ApiError(400, f"{where}: the question (a text part) is missing or empty", "messages")
    return tuple(audio), question


def _audio_part(spec: dict, where: str) -> AudioPart:
    data, fmt = spec.get("data"), spec.get("format", "wav")
    if not isinstance(data, str) or not data:
        raise ApiError(400, f"{where}.input_audio.data: give the audio file's bytes in base64", "messages")
    if fmt not in FORMATS:
        raise ApiError(400, f"{where}.input_audio.format: {fmt!r} is not one of {', '.join(FORMATS)}", "messages")
    return AudioPart(data, fmt, where)


def _choices(value: Any) -> tuple[str, ...]:
    if not isinstance(value, list) or not all(isinstance(c, str) for c in value):
        raise ApiError(400, "mellow.choices: give a list of strings", "mellow.choices")
    from mellow_cli.io.inputs import choices_problem

    items = tuple(c.strip() for c in value)  # the rule of every reader of choices, and a cap per request
    if choices_problem(items) or len(items) > MAX_CHOICES:
        raise ApiError(422, f"mellow.choices: give 2 to {MAX_CHOICES} non-empty choices", "mellow.choices")
    return items


def _options(body: dict) -> DecodingOptions:
    default = DecodingOptions()
    max_tokens = _number(body, "max_completion_tokens", 1, MAX_TOKENS, integer=True)
    max_tokens = _number(body, "max_tokens", 1, MAX_TOKENS, integer=True) if max_tokens is None else max_tokens
    temperature = _number(body, "temperature", 0.0, MAX_TEMPERATURE)
    top_p = _number(body, "top_p", 0.0, 1.0)
    seed = _number(body, "seed", 0, MAX_SEED, integer=True)
    sample = bool(temperature)  # greedy unless asked for a temperature above 0, as `mellow ask`
    return DecodingOptions(
        max_tokens=default.max_tokens if max_tokens is None else max_tokens, sample=sample,
        temperature=temperature if sample else default.temperature,
        top_p=default.top_p if top_p is None else top_p, seed=seed)


def _typed(body: dict, key: str, kind: type, what: str) -> Any:
    value = body.get(key)
    if value is not None and not isinstance(value, kind):
        raise ApiError(400, f"{key}: must be {what}", key)
    return value


def _number(body: dict, key: str, low, high, integer: bool = False):
    """body[key] (None when absent or null) within [low, high]: 400 if not a number, 422 if out of range."""
    value = body.get(key)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int if integer else (int, float)):
        raise ApiError(400, f"{key}: must be {'an integer' if integer else 'a number'}", key)
    if not low <= value <= high:
        raise ApiError(422, f"{key}: {value} is out of range ({low} to {high})", key)
    return value


# --- the audio --------------------------------------------------------------------------------


def decode_clip(model: "Model", part: AudioPart, max_seconds: float):
    """base64 -> the model's 10 s clip, through the same reader as `mellow ask` (a file on disk
    for the length of the call). 400 for anything unusable, 413 for too long a recording."""
    import tempfile

    from mellow_cli.io.audio import audio_duration

    try:
        data = base64.b64decode(part.data, validate=True)
    except (binascii.Error, ValueError):
        raise ApiError(400, f"{part.where}.input_audio.data: not valid base64", "messages") from None
    with tempfile.NamedTemporaryFile(prefix="mellow-serve-", suffix=f".{part.format}") as f:
        f.write(data)
        f.flush()
        try:
            seconds = audio_duration(f.name)
            if seconds > max_seconds:
                raise ApiError(413, f"{part.where}: {seconds:.0f} s of audio; this server takes at most "
                               f"{max_seconds:g} s per clip", "messages", "audio_too_long")
            return model.load_clip(f.name)
        except AudioError as e:
            raise ApiError(400, f"{part.where}: {e.problem}", "messages", "invalid_audio") from None


# --- the app ----------------------------------------------------------------------------------


def build_app(model: "Model", settings: ServeSettings = ServeSettings(), on_batch=None):
    """The Starlette app: its lifespan starts the model worker and, at shutdown, lets it finish
    what is queued."""
    from starlette.applications import Starlette
    from starlette.exceptions import HTTPException
    from starlette.routing import Route

    from mellow_cli.serve import page
    from mellow_cli.serve.worker import Batcher

    batcher = Batcher(model, settings.max_batch, on_batch)

    @contextlib.asynccontextmanager
    async def lifespan(app):
        batcher.start()
        try:
            yield
        finally:
            await asyncio.get_running_loop().run_in_executor(None, batcher.stop)

    async def health(request):
        return _json({"status": "stopping" if batcher.stopping else "ok", "model": model.name})

    async def models(request):
        _authorize(request, settings)
        return _json({"object": "list", "data": [_model_card(model)]})

    async def chat(request):
        _authorize(request, settings)
        return await _chat(request, model, settings, batcher)

    async def api_error(request, exc: ApiError):
        return _json(exc.body(), exc.status)

    async def http_error(request, exc: HTTPException):
        return _json(ApiError(exc.status_code, str(exc.detail)).body(), exc.status_code)

    return Starlette(
        routes=[page.route(model.name, settings.max_audio_seconds),
                Route("/health", health), Route("/v1/models", models),
                Route("/v1/chat/completions", chat, methods=["POST"])],
        exception_handlers={ApiError: api_error, HTTPException: http_error},
        lifespan=lifespan,
    )


def _json(obj: dict, status: int = 200):
    from starlette.responses import JSONResponse

    return JSONResponse(obj, status_code=status)


def _model_card(model: "Model") -> dict:
    return {"id": model.name, "object": "model", "created": 0, "owned_by": "mellow-cli"}


def _authorize(request, settings: ServeSettings) -> None:
    if settings.api_key is None:
        return
    given = request.headers.get("authorization", "")
    scheme, _, token = given.partition(" ")
    if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode(), settings.api_key.encode()):
        raise ApiError(401, "missing or wrong API key: send `Authorization: Bearer <key>`", code="invalid_api_key")


async def _read_body(request, limit: int) -> Any:
    """The JSON body, refused (413) as soon as it passes `limit` bytes."""
    declared = request.headers.get("content-length")
    if declared and declared.isdigit() and int(declared) > limit:
        raise ApiError(413, f"the request body is over {limit} bytes", code="request_too_large")
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise ApiError(413, f"the request body is over {limit} bytes", code="request_too_large")
        chunks.append(chunk)
    try:
        return json.loads(b"".join(chunks))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ApiError(400, f"the body is not valid JSON ({e})") from None


async def _chat(request, model: "Model", settings: ServeSettings, batcher):
    from starlette.concurrency import run_in_threadpool

    from mellow_cli.serve.worker import Failed, Pending

    if batcher.stopping:
        raise ApiError(503, "the server is shutting down")
    chat = parse_chat(await _read_body(request, settings.max_body_bytes))
    loop, events = asyncio.get_running_loop(), asyncio.Queue()
    with batcher.preparing():
        clips = [await run_in_threadpool(decode_clip, model, part, settings.max_audio_seconds) for part in chat.audio]
        pending = Pending(clips[0], clips[1] if len(clips) > 1 else None, chat.question, chat.options,
                          emit=lambda event: _deliver(loop, events, event, pending), choices=chat.choices)
        batcher.submit(pending)
    reply = _Reply(model.name)
    try:
        first = await events.get()  # a failure before the first piece still gets its own status
        if isinstance(first, Failed):
            raise ApiError(first.status, first.message)
        if chat.stream:
            return _sse(reply.stream(first, events, chat.include_usage, pending))
        return _json(await reply.whole(first, events))
    except BaseException:
        pending.cancelled.set()
        raise


def _deliver(loop, events: asyncio.Queue, event, pending) -> None:
    """From the worker thread: hand an event to the request's loop; a loop that is gone means
    nobody is listening any more."""
    try:
        loop.call_soon_threadsafe(events.put_nowait, event)
    except RuntimeError:
        pending.cancelled.set()


def _sse(chunks):
    from starlette.responses import StreamingResponse

    return StreamingResponse(chunks, media_type="text/event-stream",
                             headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})


class _Reply:
    """One request's answer in OpenAI's shapes: a whole `chat.completion`, or its chunks."""

    def __init__(self, model_name: str):
        self.head = {"id": f"chatcmpl-{uuid.uuid4().hex}", "created": int(time.time()), "model": model_name}

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
        return {**self.head, "object": "chat.completion", "choices": [choice], "usage": _usage(event), **extra}

    async def stream(self, event, events: asyncio.Queue, include_usage: bool, pending):
        from mellow_cli.serve.worker import Failed, Finished

        try:
            yield self._chunk({"role": "assistant", "content": ""})
            while not isinstance(event, (Finished, Failed)):
                _, extra = _add("", {}, event)
                yield self._chunk({"content": event if isinstance(event, str) else event.choice}, **extra)
                event = await events.get()
            if isinstance(event, Failed):
                yield _event(ApiError(event.status, event.message).body())
            else:
                yield self._chunk({}, finish_reason=event.reason)
                if include_usage:
                    yield _event({**self.head, "object": "chat.completion.chunk", "choices": [], "usage": _usage(event)})
            yield "data: [DONE]\n\n"
        finally:
            pending.cancelled.set()  # a client gone mid-answer frees its row in the batch

    def _chunk(self, delta: dict, finish_reason: str | None = None, **extra) -> str:
        choice = {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish_reason}
        return _event({**self.head, "object": "chat.completion.chunk", "choices": [choice], **extra})


def _add(text: str, extra: dict, event) -> tuple[str, dict]:
    """A text piece, or a choice result with its probabilities under `mellow`."""
    if isinstance(event, str):
        return text + event, extra
    return text + event.choice, {"mellow": {"choices": event.as_dict()}}


def _usage(done) -> dict:
    return {"prompt_tokens": done.prompt_tokens, "completion_tokens": done.completion_tokens,
            "total_tokens": done.prompt_tokens + done.completion_tokens}


def _event(obj: dict) -> str:
    return f"data: {json.dumps(obj, ensure_ascii=False)}\n\n"


# --- running it -------------------------------------------------------------------------------


def make_server(app, verbose: bool = False):
    """A uvicorn server for `app` (bind the socket yourself and pass it to `server.run`)."""
    import uvicorn

    config = uvicorn.Config(app, log_level="info" if verbose else "warning", access_log=verbose,
                            timeout_graceful_shutdown=GRACE_SECONDS, lifespan="on")
    return uvicorn.Server(config)


def bind(host: str, port: int):
    """A listening-ready socket on host:port (port 0: any free one), so the address is known,
    and said, before the server starts."""
    import socket

    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host, port))
    return sock
