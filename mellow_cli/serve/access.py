"""`mellow serve`'s access lines: each HTTP request, once answered, as one line (method, path,
status, seconds, and the answer's tokens), the way web servers log theirs; the CLI prints them
unless -q. A pure ASGI middleware around the app, so it sees every request, refused or answered,
and the moment its answer's last byte was sent (a stream's too).
"""

from __future__ import annotations

import time
from dataclasses import dataclass

TOKENS = "mellow.usage"  # where a request's scope keeps its answer's usage, for its access line


@dataclass(frozen=True)
class Access:
    """One request, answered: what its access line says."""

    method: str
    path: str
    status: int | None  # None: no answer was sent (the connection closed first)
    seconds: float  # from the request's head to its answer's last byte
    usage: dict | None  # the answer's tokens (prompt_tokens, completion_tokens), for chat requests

    def line(self) -> str:
        tokens = f" {self.usage['prompt_tokens']}+{self.usage['completion_tokens']} tokens" if self.usage else ""
        return f"{self.method} {self.path} {self.status or '-'} {self.seconds:.2f}s{tokens}"


class Logged:
    """ASGI middleware: tells `on_request` of each HTTP request once its answer is sent (or it
    failed: a bug's 500 is sent by Starlette's outer handler, after this one)."""

    def __init__(self, app, on_request):
        self.app, self.on_request = app, on_request

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        start, status = time.perf_counter(), None

        async def sending(message):
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, sending)
        except Exception:
            status = status or 500
            raise
        finally:
            self.on_request(Access(scope["method"], scope["path"], status, time.perf_counter() - start,
                                   scope.get(TOKENS)))
