"""The page `mellow serve` shows at `/`: pick, drop or record one or two clips, type a question
(and choices), and watch the answer stream in from the server's own `POST /v1/chat/completions`,
beside each clip's waveform and the curl and openai calls that would ask the same. It uses only
the documented endpoints, so what works here works from any client; behind `--api-key` it asks
for the key once, when the server first refuses it.

The page is the shell of io/html.py (the shared style sheet and drawing code) with its own script,
page.js beside this file; it is built once per server and needs nothing from the network.
"""

from __future__ import annotations

from pathlib import Path

# The page talks to its own server and plays the clips it was given; nothing else.
POLICY = ("default-src 'none'; script-src 'unsafe-inline'; style-src 'unsafe-inline'; img-src data: blob:; "
          "media-src blob: data:; connect-src 'self'; base-uri 'none'; form-action 'none'")


def page_text(model_name: str, max_audio_seconds: float, max_tokens: int) -> str:
    from mellow_cli.io.html import shell

    script = (Path(__file__).parent / "page.js").read_text(encoding="utf-8")
    data = {"model": model_name, "max_audio_seconds": max_audio_seconds, "max_tokens": max_tokens}
    return shell("serve", f"mellow · {model_name}", data, [script], policy=POLICY)


def route(model_name: str, max_audio_seconds: float, max_tokens: int):
    """`GET /`: the page, without the key (it holds nothing; its requests carry the key)."""
    from starlette.responses import HTMLResponse
    from starlette.routing import Route

    text = page_text(model_name, max_audio_seconds, max_tokens)

    async def page(request):
        return HTMLResponse(text, headers={"Cache-Control": "no-cache"})

    return Route("/", page)
