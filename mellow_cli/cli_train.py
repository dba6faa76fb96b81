"""`mellow train`: parse the options, hand the run to train.py, report progress on stderr."""

from __future__ import annotations

from typing import Annotated, Optional

import typer

from .cli_options import (
    DebugOpt,
    Device,
    DeviceOpt,
    ModelOpt,
    QuietOpt,
    SeedOpt,
    VerboseOpt,
)
from .errors import MellowError


def train(
    data: Annotated[Optional[str], typer.Argument(metavar="DATA", help="Training rows: ReasonAQA JSON or JSONL with audio1, audio2, question, answer.", show_default=False)] = None,
    model: ModelOpt = "v0",
    device: DeviceOpt = Device.auto,
    seed: SeedOpt = None,
    quiet: QuietOpt = False,
    verbose: VerboseOpt = False,
    debug: DebugOpt = False,
) -> None:
    """Fine-tune the model on your own recordings and questions.

    \b
    Example:
      mellow train rows.jsonl --audio-root clips/ --val-fraction 0.05
    """
    raise MellowError("`mellow train` is not available in this version yet")
