"""The `mellow` command: Typer commands (one module per command group), the options they share
(options.py) and the one module that draws on the terminal (render.py). The CLI parses, calls the
layers below, prints; nothing below imports it.
"""

from .entry import app, main

__all__ = ["app", "main"]
