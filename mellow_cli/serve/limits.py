"""What `mellow serve` is set to: the name it gives its model, who may ask, and what one request,
one connection and one batch may cost, every cap in one frozen dataclass (docs/serve.md's Limits
table lists them with their defaults).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

from mellow_cli.runtime.options import MAX_TOKENS

DEFAULT_MAX_AUDIO_SECONDS = 300.0


@dataclass(frozen=True)
class ServeSettings:
    """The model's name, who may ask, and every limit on what one request, or one connection, may
    cost."""

    alias: Optional[str] = None  # the model's name to clients; None: serve/app.py's served_name
    api_key: Optional[str] = None  # None: no key asked
    max_tokens: int = MAX_TOKENS  # the most a request may name (422 beyond); one naming none gets 300, or this if less
    max_batch: int = 8  # requests answered together at most
    max_queue: int = 64  # requests in hand at once, from their first byte to their answer's last; beyond, 503
    max_audio_seconds: float = DEFAULT_MAX_AUDIO_SECONDS  # per clip; longer is refused (413)
    max_clip_samples: int = 8_000_000  # a clip's window decoded (channels x rate x seconds, from its header); beyond, 413
    max_decoding: int = 2  # clips decoding at once (each holds its samples while it decodes)
    max_text_chars: int = 65_536  # question and choices, before any encoding; beyond, 413
    max_choice_tokens: int = 64  # one choice, with its end of text; beyond, 422
    max_request_choice_tokens: int = 1024  # a request's choices; beyond, 422
    max_batch_choice_tokens: int = 4096  # the choices one batch scores; a request past it waits for the next
    head_seconds: float = 10.0  # to send a request's line and headers; beyond, the connection is closed
    body_seconds: float = 60.0  # to send its body; beyond, 408
    keep_alive_seconds: float = 5.0  # an idle connection between requests is closed after this
    max_idle_connections: int = 32  # connections with no request in progress; beyond, the longest idle close
    grace_seconds: float = 30.0  # at shutdown, for requests in flight; answers are cut a second before

    @property
    def max_body_bytes(self) -> int:
        """Two clips of `max_audio_seconds` as 48 kHz stereo 16-bit WAV, in base64, and room for
        the text: a body past this is refused before it is read whole."""
        return int(2 * self.max_audio_seconds * 48000 * 2 * 2 * 4 / 3) + 4 * self.max_text_chars + 65536
