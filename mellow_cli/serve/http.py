"""Running `mellow serve`'s app under uvicorn, with what a port open to others needs.

uvicorn (HTTP/1.1 through h11) keeps a connection as long as bytes trickle in, and one that never
sends anything forever. Its protocol here adds, per connection: a deadline for each request's
line and headers (`head_seconds`, from the connection or the end of the previous answer; past it,
408 and the connection closes), and a cap on connections with no request in progress
(`max_idle_connections`; past it, the longest idle are closed). Idle keep-alive connections close
after `keep_alive_seconds` (uvicorn's own timer); a body's deadline is the app's (serve.py). A
request uvicorn cannot parse gets OpenAI's JSON error shape, as every other refusal does.

At shutdown the server stops taking connections, then tells the worker to drain: the answers in
flight end a second before the grace period does, so each stream still gets its last chunk and
`data: [DONE]` before uvicorn closes what is left.
"""

from __future__ import annotations

import functools
import json
import time

import uvicorn
from uvicorn.protocols.http.h11_impl import H11Protocol

CUT_BEFORE_SECONDS = 1.0  # before the grace period ends: time for the last chunks to be written


def make_server(app, verbose: bool = False) -> uvicorn.Server:
    """A uvicorn server for `app` (serve.build_app; bind the socket yourself and pass it to
    `server.run`), with the limits of the app's ServeSettings."""
    state = app.state.mellow
    settings = state.settings
    config = uvicorn.Config(
        # The app writes its own access lines (access.py): uvicorn's would repeat them.
        app, log_level="info" if verbose else "warning", access_log=False, lifespan="on",
        timeout_graceful_shutdown=settings.grace_seconds, timeout_keep_alive=settings.keep_alive_seconds,
        http=functools.partial(_Protocol, head_seconds=settings.head_seconds,
                               max_idle=settings.max_idle_connections))
    return _Server(config, state.batcher)


def bind(host: str, port: int):
    """A listening-ready socket on host:port (port 0: any free one), so the address is known,
    and said, before the server starts."""
    import socket

    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host, port))
    return sock


class _Server(uvicorn.Server):
    def __init__(self, config: uvicorn.Config, batcher):
        super().__init__(config)
        self.batcher = batcher

    async def shutdown(self, sockets=None) -> None:
        self.batcher.drain(self.config.timeout_graceful_shutdown - CUT_BEFORE_SECONDS)
        await super().shutdown(sockets)


class _Protocol(H11Protocol):
    """uvicorn's HTTP/1.1 protocol with a deadline for each request's head and a cap on idle
    connections (see the module's docstring)."""

    def __init__(self, *args, head_seconds: float, max_idle: int, **kwargs):
        super().__init__(*args, **kwargs)
        self.head_seconds, self.max_idle = head_seconds, max_idle
        self.idle_since: float | None = None  # None: a request is in progress
        self.head_bytes = 0  # of the next request, before its head is complete
        self.head_timer = None

    def connection_made(self, transport) -> None:
        super().connection_made(transport)
        self._idle()

    def data_received(self, data: bytes) -> None:
        if self.idle_since is not None:
            self.head_bytes += len(data)
        super().data_received(data)

    def handle_events(self) -> None:
        cycle = self.cycle
        super().handle_events()
        if self.cycle is not cycle:  # a request's head arrived: it is no longer idle
            self.idle_since, self.head_bytes = None, 0
            if self.head_timer is not None:
                self.head_timer.cancel()

    def on_response_complete(self) -> None:
        self._idle()  # first: the base class may go straight on to a pipelined request
        super().on_response_complete()

    def connection_lost(self, exc) -> None:
        if self.head_timer is not None:
            self.head_timer.cancel()
        self.idle_since = None
        super().connection_lost(exc)

    def send_400_response(self, msg: str) -> None:
        self._refuse(400, "Bad Request", f"not an HTTP request this server can read ({msg})")

    def _idle(self) -> None:
        if self.head_timer is not None:
            self.head_timer.cancel()
        self.idle_since, self.head_bytes = time.monotonic(), 0
        self.head_timer = self.loop.call_later(self.head_seconds, self._head_late)
        idle = sorted((c for c in self.connections if getattr(c, "idle_since", None) is not None),
                      key=lambda c: c.idle_since)
        for c in idle[: max(len(idle) - self.max_idle, 0)]:
            c.transport.close()

    def _head_late(self) -> None:
        if self.transport.is_closing():
            return
        if self.head_bytes:  # a request under way, too slowly: say why
            self._refuse(408, "Request Timeout", f"the request's line and headers did not arrive within "
                         f"{self.head_seconds:g} s")
        self.transport.close()

    def _refuse(self, status: int, reason: str, message: str) -> None:
        """An error in OpenAI's shape, written as is (outside any request h11 knows), then close."""
        body = json.dumps({"error": {"message": message, "type": "invalid_request_error", "param": None,
                                     "code": "timeout" if status == 408 else "bad_request"}}).encode()
        head = (f"HTTP/1.1 {status} {reason}\r\ncontent-type: application/json\r\ncontent-length: {len(body)}\r\n"
                "connection: close\r\n\r\n").encode()
        self.transport.write(head + body)
        self.transport.close()
