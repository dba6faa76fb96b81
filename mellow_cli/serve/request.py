"""What one request to `mellow serve` asks, checked on its own before it costs the model anything.

The body's JSON is read within the parser's limits; the OpenAI chat format is parsed with a
strict type for every field read (`n: true` is not 1); the text is encoded and its choices
counted in tokens here, per request, so text the tokenizer cannot take is that request's 400 and
never its batch's failure; each clip's header is read before its samples, so a few kilobytes
declaring 8 channels at 655 kHz are refused instead of decoded, and clips are decoded from
memory (no temporary file). Every refusal is an ApiError: an HTTP status and OpenAI's error
fields. The limits are ServeSettings' (limits.py); docs/serve.md lists them.
"""

from __future__ import annotations

import base64
import binascii
import json
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Optional

from mellow_cli.errors import AudioError
from mellow_cli.runtime.options import MAX_SEED, MAX_TOKENS, DecodingOptions

if TYPE_CHECKING:
    import numpy as np

    from mellow_cli.api import Model
    from mellow_cli.serve.limits import ServeSettings

FORMATS = ("wav", "flac", "mp3", "ogg")
MAX_CHOICES = 100
MAX_TEMPERATURE = 2.0  # OpenAI's range


class ApiError(Exception):
    """A request the server will not answer, with its HTTP status and OpenAI's error fields
    (and headers for the response: Retry-After, Connection)."""

    TYPES = {401: "authentication_error", 404: "not_found_error", 500: "server_error", 503: "server_error",
             507: "server_error"}

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None,
                 headers: dict | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code
        self.headers = headers or {}

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.TYPES.get(self.status, "invalid_request_error"),
                          "param": self.param, "code": self.code}}


# --- the body ---------------------------------------------------------------------------------


def read_json(data: bytes) -> Any:
    """The body's JSON value: 400 for whatever the parser refuses, its limits included (nesting
    deeper than its recursion allows, integers past 4,300 digits), and for NaN and Infinity,
    which are not JSON."""
    try:
        return json.loads(data, parse_constant=_not_json)
    except RecursionError:
        raise ApiError(400, "the body's JSON is nested too deeply") from None
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ApiError(400, f"the body is not valid JSON ({e})") from None
    except ValueError as e:  # an integer too long to convert, or NaN/Infinity
        raise ApiError(400, f"the body's JSON holds a value that cannot be read ({e})") from None


def _not_json(name: str):
    raise ValueError(f"{name} is not a JSON number")


# --- the request ------------------------------------------------------------------------------


@dataclass(frozen=True)
class AudioPart:
    data: str | bytes  # base64 text, as a JSON body sends it; or the file's bytes, as an upload does
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


def parse_chat(body: Any, max_tokens: int = MAX_TOKENS) -> ChatRequest:
    """A decoded JSON body -> ChatRequest, or ApiError (400 missing or mistyped, 422 out of range).
    `max_tokens`: the most the body may name (decoding_options)."""
    if not isinstance(body, dict):
        raise ApiError(400, "the body must be a JSON object")
    _typed(body, "model", str, "a string")
    messages = _typed(body, "messages", list, "a list with the user's message last")
    if not messages:
        raise ApiError(400, "messages: give a list with the user's message last", "messages")
    audio, question = _user_message(messages[-1], f"messages[{len(messages) - 1}]")
    mellow = _typed(body, "mellow", dict, "an object") or {}
    choices = checked_choices(mellow.get("choices"), "mellow.choices") if "choices" in mellow else None
    _number(body, "n", 1, 1, integer=True)
    stream_options = _typed(body, "stream_options", dict, "an object") or {}
    return ChatRequest(audio=audio, question=question, options=decoding_options(body, max_tokens), choices=choices,
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
            texts.append(checked_text(part["text"], f"{here}.text", "messages"))
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
    if not isinstance(fmt, str) or fmt not in FORMATS:
        raise ApiError(400, f"{where}.input_audio.format: give one of {', '.join(FORMATS)}", "messages")
    return AudioPart(data, fmt, where)


def checked_choices(value: Any, param: str) -> tuple[str, ...]:
    """A request's choices (a list of strings, under `param`), stripped: the rule of every reader
    of choices, and a cap per request."""
    if not isinstance(value, list) or not all(isinstance(c, str) for c in value):
        raise ApiError(400, f"{param}: give a list of strings", param)
    from mellow_cli.io.inputs import choices_problem

    items = tuple(checked_text(c, f"{param}[{i}]", param).strip() for i, c in enumerate(value))
    if choices_problem(items) or len(items) > MAX_CHOICES:
        raise ApiError(422, f"{param}: give 2 to {MAX_CHOICES} non-empty choices", param)
    return items


def checked_text(value: str, where: str, param: str) -> str:
    """`value`, if it can be written as UTF-8: JSON's escapes can spell a lone surrogate
    ("\\ud800"), which is a valid JSON string but no text, and no tokenizer takes it."""
    try:
        value.encode("utf-8")
    except UnicodeEncodeError as e:
        raise ApiError(400, f"{where}: not valid Unicode (a lone surrogate U+{ord(value[e.start]):04X} at character "
                       f"{e.start})", param, "invalid_text") from None
    return value


def decoding_options(body: dict, cap: int = MAX_TOKENS) -> DecodingOptions:
    """The decoding fields of a request (`max_tokens` or `max_completion_tokens`, `temperature`,
    `top_p`, `seed`), each checked. A request may name at most `cap` tokens (422 beyond, naming the
    server's option); one naming none is left at None, for the app to give it the model's own
    budget, or `cap` if that is less (app.py: within_cap)."""
    default = DecodingOptions()
    max_tokens = _number(body, "max_completion_tokens", 1, cap, integer=True, limit="mellow serve --max-tokens")
    if max_tokens is None:
        max_tokens = _number(body, "max_tokens", 1, cap, integer=True, limit="mellow serve --max-tokens")
    temperature = _number(body, "temperature", 0.0, MAX_TEMPERATURE)
    top_p = _number(body, "top_p", 0.0, 1.0)
    seed = _number(body, "seed", 0, MAX_SEED, integer=True)
    sample = bool(temperature)  # greedy unless asked for a temperature above 0, as `mellow ask`
    return DecodingOptions(
        max_tokens=max_tokens, sample=sample,
        temperature=temperature if sample else default.temperature,
        top_p=default.top_p if top_p is None else top_p, seed=seed)


def _typed(body: dict, key: str, kind: type, what: str) -> Any:
    value = body.get(key)
    if value is not None and not isinstance(value, kind):
        raise ApiError(400, f"{key}: must be {what}", key)
    return value


def _number(body: dict, key: str, low, high, integer: bool = False, limit: str = ""):
    """body[key] (None when absent or null) within [low, high]: 400 if not a number (true and
    false are not), 422 if out of range (`limit`: what sets `high`, named when it is passed)."""
    value = body.get(key)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int if integer else (int, float)):
        raise ApiError(400, f"{key}: must be {'an integer' if integer else 'a number'}", key)
    if not low <= value <= high:
        setter = f"; this server's limit, set by {limit}" if limit and value > high else ""
        raise ApiError(422, f"{key}: {value} is out of range ({low} to {high}{setter})", key)
    return value


# --- its text, encoded alone ------------------------------------------------------------------


def choice_tokens(model: "Model", chat: ChatRequest, settings: "ServeSettings") -> int:
    """Encode the request's text as the model will, and count its choices' tokens (each with the
    end of text, as they are scored): 413 past `max_text_chars` (before any encoding), 400 for
    text the tokenizer refuses, 422 past a choice's or the request's cap of choice tokens."""
    chars = len(chat.question) + sum(map(len, chat.choices or ()))
    if chars > settings.max_text_chars:
        raise ApiError(413, f"{chars} characters of question and choices; this server takes at most "
                       f"{settings.max_text_chars}", "messages", "text_too_long")
    _encode(model, chat.question, "the question", "messages")
    total = 0
    for i, choice in enumerate(chat.choices or ()):
        tokens = len(_encode(model, choice, f"mellow.choices[{i}]", "mellow.choices", special=False)) + 1
        if tokens > settings.max_choice_tokens:
            raise ApiError(422, f"mellow.choices[{i}]: {tokens} tokens; a choice may have at most "
                           f"{settings.max_choice_tokens}", "mellow.choices", "choice_too_long")
        total += tokens
    if total > settings.max_request_choice_tokens:
        raise ApiError(422, f"mellow.choices: {total} tokens in all; a request's choices may have at most "
                       f"{settings.max_request_choice_tokens}", "mellow.choices", "choices_too_long")
    return total


def _encode(model: "Model", text: str, what: str, param: str, special: bool = True) -> list[int]:
    try:
        return model.tokenizer(text, add_special_tokens=special)["input_ids"]
    except Exception as e:  # the tokenizer's own refusal, whatever its type: this request's text
        raise ApiError(400, f"{what}: the tokenizer cannot encode it ({type(e).__name__}: {e})", param,
                       "invalid_text") from None


# --- its audio --------------------------------------------------------------------------------


def decode_clip(model: "Model", part: AudioPart, settings: "ServeSettings") -> "np.ndarray":
    """base64 -> the model's clip, read as `mellow ask` reads a file but from memory. The
    header is read first: 413 for a recording longer than `max_audio_seconds`, or whose window
    would decode to more than `max_clip_samples` samples; 400 for anything unusable."""
    from mellow_cli.io.audio import AudioBytes, probe

    try:
        data = part.data if isinstance(part.data, bytes) else base64.b64decode(part.data, validate=True)
    except (binascii.Error, ValueError):
        raise ApiError(400, f"{part.where}.input_audio.data: not valid base64", "messages") from None
    clip, family, cfg = AudioBytes(part.where, data), model.family, model.cfg
    try:
        found = probe(clip, sr=family.sample_rate(cfg), clip_seconds=family.clip_seconds(cfg))
        if found.seconds > settings.max_audio_seconds:
            raise ApiError(413, f"{part.where}: {found.seconds:.0f} s of audio; this server takes at most "
                           f"{settings.max_audio_seconds:g} s per clip", "messages", "audio_too_long")
        if found.decoded > settings.max_clip_samples:
            raise ApiError(413, f"{part.where}: {found.channels} channels at {found.samplerate} Hz decode to "
                           f"{found.decoded} samples; this server decodes at most {settings.max_clip_samples} "
                           "per clip", "messages", "audio_too_large")
        return model.read_clip(clip)
    except AudioError as e:
        raise ApiError(400, f"{part.where}: {e.problem}", "messages", "invalid_audio") from None
