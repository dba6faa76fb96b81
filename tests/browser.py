"""A real headless browser for the page tests: the system's Chromium driven by Playwright (never a
downloaded browser), and a page opener that blocks and records every request leaving `allowed`
and every console error, so a test can say the page needed nothing but itself.

    with chromium() as browser:
        seen = open_page(browser, "file:///tmp/page.html")
        assert seen.errors == [] and seen.blocked == []
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from pathlib import Path

CHROMIUM = "/usr/bin/chromium"
ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
        "--disable-background-networking", "--disable-component-update", "--disable-sync",
        # a fake microphone, for the serve page's recording button
        "--use-fake-device-for-media-stream", "--use-fake-ui-for-media-stream",
        "--autoplay-policy=no-user-gesture-required"]


@contextlib.contextmanager
def chromium():
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=ARGS)
        try:
            yield browser
        finally:
            browser.close()


@dataclass
class Opened:
    page: object
    errors: list = field(default_factory=list)  # console errors and uncaught exceptions
    blocked: list = field(default_factory=list)  # requests that would have left `allowed`
    requests: list = field(default_factory=list)  # every request made


def open_page(browser, url: str, allowed: tuple[str, ...] = ("file:", "data:", "blob:"), width: int = 1200,
              height: int = 800, wait_ready: bool = True) -> Opened:
    """`url` in a new page: requests whose URL does not start with one of `allowed` are aborted and
    recorded; returns once the page has set `document.body.dataset.ready`."""
    page = browser.new_page(viewport={"width": width, "height": height})
    seen = Opened(page)
    page.on("console", lambda m: seen.errors.append(m.text) if m.type == "error" else None)
    page.on("pageerror", lambda e: seen.errors.append(str(e)))
    page.on("request", lambda r: seen.requests.append(r.url))

    def route(r):
        if r.request.url.startswith(allowed):
            r.continue_()
        else:
            seen.blocked.append(r.request.url)
            r.abort()

    page.route("**/*", route)
    page.goto(url)
    if wait_ready:
        page.wait_for_function("() => document.body.dataset.ready === '1'", timeout=30_000)
    return seen


def screenshot(opened: Opened, folder: Path, name: str, full_page: bool = False) -> Path:
    """Save what the page shows as `folder/name.png` (a test artifact) and say where."""
    path = Path(folder) / f"{name}.png"
    opened.page.screenshot(path=str(path), full_page=full_page)
    print(f"screenshot: {path}")
    return path
