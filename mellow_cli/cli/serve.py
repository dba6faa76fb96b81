"""`mellow serve`: parse the options, load the model once, bind, and hand over to serve/app.py and serve/http.py.

Starlette and uvicorn are an optional extra (`pip install "mellow-cli[serve]"`); without them
the command says how to install them in one line. They, and torch, load only when it runs.
"""

from __future__ import annotations

from typing import Annotated, Optional

import typer

from mellow_cli.cli.options import (
    DebugOpt,
    Device,
    DeviceOpt,
    Dtype,
    DtypeOpt,
    ModelOpt,
    QuietOpt,
    ThreadsOpt,
    VerboseOpt,
    load_model,
    setup,
)
from mellow_cli.errors import MellowError, UsageError

LOOPBACK = ("127.0.0.1", "::1", "localhost")


def serve(
    model: ModelOpt = "v0",
    host: Annotated[str, typer.Option("--host", help="Address to listen on. The default answers this machine only; 0.0.0.0 opens the server to the network (set --api-key).")] = "127.0.0.1",
    port: Annotated[int, typer.Option("--port", "-p", min=0, max=65535, help="TCP port (0: any free port, printed at start).")] = 8080,
    api_key: Annotated[Optional[str], typer.Option("--api-key", envvar="MELLOW_API_KEY", help="Ask every request for `Authorization: Bearer KEY` (also MELLOW_API_KEY, which keeps it out of the process list).")] = None,
    max_batch: Annotated[int, typer.Option("--max-batch", min=1, max=256, help="Requests answered together at most; those waiting while a batch runs form the next one.")] = 8,
    max_audio_seconds: Annotated[float, typer.Option("--max-audio-seconds", min=1.0, max=86400.0, help="Longest recording a request may send, per clip (the model hears its first 10 s); longer gets 413.")] = 300.0,
    max_queue: Annotated[int, typer.Option("--max-queue", min=1, max=100000, help="Requests in hand at once (reading, decoding, waiting or being answered); more get 503 with Retry-After.")] = 64,
    device: DeviceOpt = Device.auto,
    dtype: DtypeOpt = Dtype.auto,
    threads: ThreadsOpt = None,
    quiet: QuietOpt = False,
    verbose: VerboseOpt = False,
    debug: DebugOpt = False,
) -> None:
    """Answer questions over HTTP in the OpenAI chat format, the model kept loaded.

    Requests that arrive together are answered as one batch. Ctrl-C or SIGTERM stops taking new
    connections and lets the requests in flight finish.

    \b
    Examples:
      mellow serve
      mellow serve --model v0 --port 9000 --api-key "$KEY"
      curl -s localhost:8080/v1/models
    """
    from mellow_cli.cli import render

    setup(quiet, verbose, threads)
    try:
        import starlette  # noqa: F401
        import uvicorn  # noqa: F401
    except ImportError:
        raise MellowError('mellow serve needs its extra: pip install "mellow-cli[serve]"') from None
    from mellow_cli.serve.app import build_app
    from mellow_cli.serve.limits import ServeSettings
    from mellow_cli.serve.http import bind, make_server

    if host not in LOOPBACK and api_key is None:
        render.warn(f"--host {host} without --api-key: anyone who can reach this port can use the model")
    try:
        sock = bind(host, port)
    except OSError as e:
        raise UsageError(f"--host {host} --port {port}: cannot listen there ({e.strerror or e})") from None
    loaded = load_model(model, device, dtype)
    settings = ServeSettings(api_key=api_key, max_batch=max_batch, max_audio_seconds=max_audio_seconds,
                             max_queue=max_queue)
    app = build_app(loaded, settings, on_batch=lambda n: render.debug(f"batch of {n}"))
    where, bound = sock.getsockname()[:2]
    shown = f"[{where}]" if ":" in where else where
    render.info(f"serving {loaded.name} at http://{shown}:{bound}/v1 (Ctrl-C stops)")
    try:
        make_server(app, verbose).run(sockets=[sock])
    except KeyboardInterrupt:  # uvicorn drained the requests, then re-raised Ctrl-C
        render.info("stopped")
        raise typer.Exit(130) from None
