"""`POST /ask`: a question asked as a form upload, for the shell,

    curl -F file=@dog.wav -F question="is there a dog barking?" localhost:8080/ask

one or two `file` fields (the audio files' bytes, as they are on disk), the `question`, and
optionally `choices` ("car|rain|birds", as `mellow ask --choices` takes them), `max_tokens`,
`temperature`, `top_p` and `seed`. The body is read within the same limits as a JSON one
(app.py), then parsed here into the same ChatRequest, so every later check (text caps, a clip's
header before its samples, the queue) is the same code. A field this endpoint does not know is
refused, so a typo (`-F max_token=10`) is never silently ignored.

The parser is a small one for `multipart/form-data` (RFC 7578) over a body already in memory:
a client library would spool files to disk, and the server writes no temporary files.
"""

from __future__ import annotations

import math
import re
from email.message import Message
from email.utils import collapse_rfc2231_value
from typing import Any

from mellow_cli.serve.request import (
    ApiError,
    AudioPart,
    ChatRequest,
    checked_choices,
    checked_text,
    decoding_options,
)

FIELDS = ("file", "question", "choices", "max_tokens", "temperature", "top_p", "seed")
INTEGERS = ("max_tokens", "seed")
MAX_PARTS = 16  # two files and every field, with room; a form of thousands of parts is refused
_BOUNDARY = re.compile(r"^[0-9A-Za-z'()+_,\-./:=? ]{1,70}$")  # RFC 2046's characters


def parse_form(body: bytes, content_type: str, max_tokens: int) -> ChatRequest:
    """A multipart body -> ChatRequest, or ApiError (400 for a form that cannot be read or a field
    of the wrong kind, 422 for a value out of range), as parse_chat does for JSON."""
    fields: dict[str, list] = {}
    for name, filename, value in _parts(body, _boundary(content_type)):
        if name not in FIELDS:
            raise ApiError(400, f"unknown form field {name!r}: this endpoint takes {', '.join(FIELDS)}", name)
        if (name == "file") != (filename is not None):
            what = "an uploaded file (-F file=@PATH)" if name == "file" else "text, not a file"
            raise ApiError(400, f"form field {name}: must be {what}", name)
        fields.setdefault(name, []).append((filename, value))
    files = fields.get("file", [])
    if not 1 <= len(files) <= 2:
        raise ApiError(400, f"give one or two audio files as -F file=@PATH (got {len(files)})", "file")
    audio = tuple(AudioPart(data, _format(filename), f"file {filename}") for filename, data in files)
    text = {name: _text(fields, name) for name in FIELDS[1:] if name in fields}
    question = " ".join((text.get("question") or "").split())
    if not question:
        raise ApiError(400, "the question (-F question=...) is missing or empty", "question")
    choices = checked_choices(text["choices"].split("|"), "choices") if "choices" in text else None
    numbers = {name: _number(name, text[name]) for name in ("max_tokens", "temperature", "top_p", "seed")
               if name in text}
    return ChatRequest(audio=audio, question=question, options=decoding_options(numbers, max_tokens),
                       choices=choices)


def _boundary(content_type: str) -> bytes:
    header = Message()
    header["content-type"] = content_type
    boundary = header.get_param("boundary")
    if header.get_content_type() != "multipart/form-data" or not isinstance(boundary, str) \
            or not _BOUNDARY.match(boundary):
        raise ApiError(400, "send the question as multipart/form-data (curl -F), or as JSON to "
                       "/v1/chat/completions", code="bad_form")
    return boundary.encode("ascii")


def _parts(body: bytes, boundary: bytes):
    """(name, filename or None, bytes) of each part, in order; the body is not copied whole."""
    first = b"--" + boundary
    delimiter = b"\r\n" + first
    if body.startswith(first):
        at = len(first)
    else:  # after a preamble
        at = body.find(delimiter)
        if at < 0:
            raise ApiError(400, "the form has no part (its boundary never occurs)", code="bad_form")
        at += len(delimiter)
    for count in range(MAX_PARTS + 1):
        if body.startswith(b"--", at):  # the closing delimiter
            return
        head_end = body.find(b"\r\n\r\n", at)
        end = body.find(delimiter, head_end + 4) if head_end >= 0 else -1
        if end < 0:
            raise ApiError(400, "the form ends before its closing boundary", code="bad_form")
        if count == MAX_PARTS:
            break
        name, filename = _disposition(body[at:head_end])
        yield name, filename, body[head_end + 4:end]
        at = end + len(delimiter)
    raise ApiError(400, f"the form has more than {MAX_PARTS} parts", code="bad_form")


def _disposition(head: bytes) -> tuple[str, str | None]:
    """The part's field name and file name, from its Content-Disposition header."""
    header = Message()
    for line in head.decode("utf-8", errors="replace").split("\r\n"):
        key, _, value = line.partition(":")
        if key.strip().lower() == "content-disposition":
            header["content-disposition"] = value.strip()
    name = header.get_param("name", header="content-disposition")
    filename = header.get_param("filename", header="content-disposition")
    if isinstance(filename, tuple):  # filename*=UTF-8''...
        filename = collapse_rfc2231_value(filename)
    if not isinstance(name, str) or header.get("content-disposition", "").split(";")[0].strip() != "form-data":
        raise ApiError(400, "a form part has no Content-Disposition: form-data with a name", code="bad_form")
    return name, filename if isinstance(filename, str) else None


def _format(filename: str) -> str:
    """The audio format the file name says (the bytes decide how it is read, as for JSON)."""
    return filename.rsplit(".", 1)[-1].lower() if "." in filename else "wav"


def _text(fields: dict, name: str) -> str:
    """A text field given once, as UTF-8."""
    values = fields[name]
    if len(values) > 1:
        raise ApiError(400, f"form field {name}: give it once", name)
    try:
        return checked_text(values[0][1].decode("utf-8"), name, name)
    except UnicodeDecodeError:
        raise ApiError(400, f"form field {name}: not UTF-8 text", name, "invalid_text") from None


def _number(name: str, text: str) -> Any:
    """A number field's value, for decoding_options to check its range."""
    text = text.strip()
    try:
        value = int(text) if name in INTEGERS and re.fullmatch(r"[0-9]{1,19}", text) else float(text)
    except ValueError:
        value = None
    if value is None or isinstance(value, float) and (name in INTEGERS or not math.isfinite(value)):
        kind = "an integer" if name in INTEGERS else "a number"
        raise ApiError(400, f"{name}: must be {kind}", name)
    return value
