"""`mellow bench`: benchmarks (mellow_cli/bench/) behind one sub-command each."""

from __future__ import annotations

from typing import Annotated, Optional

import typer

from .cli_options import (
    DebugOpt,
    Device,
    DeviceOpt,
    ModelOpt,
    QuietOpt,
    ThreadsOpt,
    VerboseOpt,
)
from .errors import MellowError

bench_app = typer.Typer(help="Score a model on a benchmark or measure its speed.", no_args_is_help=True, rich_markup_mode=None)


@bench_app.command("mmau")
def bench_mmau(
    data: Annotated[Optional[str], typer.Option("--data", help="mmau-test-mini.json (the official file).")] = None,
    audio_dir: Annotated[Optional[str], typer.Option("--audio-dir", help="Folder the items' audio_id paths are relative to.")] = None,
    model: ModelOpt = "v0",
    device: DeviceOpt = Device.auto,
    quiet: QuietOpt = False,
    verbose: VerboseOpt = False,
    debug: DebugOpt = False,
) -> None:
    """Score a model on MMAU with the benchmark's official matcher.

    \b
    Example:
      mellow bench mmau --data mmau-test-mini.json --audio-dir mmau/ --mode choices
    """
    raise MellowError("`mellow bench mmau` is not available in this version yet")


@bench_app.command("speed")
def bench_speed(
    model: ModelOpt = "v0",
    device: DeviceOpt = Device.auto,
    threads: ThreadsOpt = None,
    quiet: QuietOpt = False,
    verbose: VerboseOpt = False,
    debug: DebugOpt = False,
) -> None:
    """Measure load time, encoder time, time to first token and tokens/s on this machine.

    \b
    Example:
      mellow bench speed --model v0 --threads 4
    """
    raise MellowError("`mellow bench speed` is not available in this version yet")
