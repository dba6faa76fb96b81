"""The `mellow` command: parse arguments, call the core (api.py), hand results to render.py.

Nothing heavy is imported at module level: torch, transformers and numpy load inside the commands
that need them, so `mellow --help` answers at once. Every user-facing failure is a MellowError,
printed by `main` as one line on stderr; only --debug shows a traceback.
"""

from __future__ import annotations

import sys
from typing import Annotated, Optional

import typer

from mellow_cli.version import __version__
from mellow_cli.cli.answer import ask, caption, compare
from mellow_cli.cli.bench import bench_app
from mellow_cli.cli.env import config_app, env
from mellow_cli.cli.models import models_app
from mellow_cli.cli.report import report
from mellow_cli.cli.serve import serve
from mellow_cli.cli.train import train
from mellow_cli.errors import MellowError

app = typer.Typer(
    name="mellow",
    help="Ask questions about sounds. Answers come from Mellow, a small audio-language model "
    "that runs on a laptop CPU.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    rich_markup_mode=None,
    context_settings={"help_option_names": ["-h", "--help"]},
)


# The commands, in the order --help lists them.
app.command(no_args_is_help=True)(ask)
app.command(no_args_is_help=True)(compare)
app.command(no_args_is_help=True)(caption)
app.command(no_args_is_help=True)(report)
app.command()(serve)
app.command()(train)
app.add_typer(bench_app, name="bench")
app.add_typer(models_app, name="models")
app.add_typer(config_app, name="config")
app.command()(env)


def _version(value: bool) -> None:
    if value:
        import platform
        from importlib import metadata

        try:
            torch = metadata.version("torch")
        except metadata.PackageNotFoundError:
            torch = "not installed"
        typer.echo(f"mellow {__version__} (Python {platform.python_version()}, torch {torch}); `mellow env` tells more")
        raise typer.Exit()


@app.callback()
def _root(
    version: Annotated[Optional[bool], typer.Option("--version", callback=_version, is_eager=True, help="Print the version and exit.")] = None,
) -> None:
    """Ask questions about sounds, caption and compare recordings, from the command line."""
    from mellow_cli.cli import render

    render.configure()  # every command starts at the default verbosity, even the second in one process


def _click_exceptions():
    try:  # recent Typer vendors its own copy of click
        from typer._click import exceptions
    except ImportError:
        from click import exceptions
    return exceptions


def main(argv: Optional[list[str]] = None) -> None:
    """Entry point: run the app, turning every failure into one line on stderr and an exit code."""
    from mellow_cli.io import outputs
    from mellow_cli.cli import render

    click = _click_exceptions()
    argv = sys.argv[1:] if argv is None else argv
    render.configure()  # each run starts from the defaults (and no timings), even in one process
    debug = "--debug" in argv
    try:
        # Without standalone mode click returns a command's typer.Exit code instead of raising it.
        result = app(args=argv, prog_name="mellow", standalone_mode=False)
        code = result if isinstance(result, int) else 0
        render.timings()  # -v: where the time went, on stderr
        with outputs.writing(outputs.STDOUT):  # a result still buffered fails here, while it can be said
            sys.stdout.flush()
    except typer.Exit as e:
        code = e.exit_code
    except (SystemExit, BrokenPipeError) as e:
        if isinstance(e, SystemExit) and not isinstance(e.__context__, BrokenPipeError):
            raise
        # Click turns a closed stdout into exit 1 (the flush above raises it as is). The reader
        # went away (`mellow caption *.wav | head -1`): stop quietly, as Unix filters do, with the
        # status a shell reports for SIGPIPE; stdout goes to /dev/null so the interpreter's flush
        # at exit cannot complain.
        import os

        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        code = 141
    except (typer.Abort, KeyboardInterrupt):
        render.error("interrupted")
        code = 130
    except click.NoArgsIsHelpError as e:  # bare `mellow` or `mellow ask`: the help, as usual
        e.show()
        code = e.exit_code
    except click.ClickException as e:  # usage errors: one line, with where to look
        hint = f" (see: {e.ctx.command_path} --help)" if getattr(e, "ctx", None) else ""
        render.error(e.format_message() + hint)
        code = e.exit_code
    except MellowError as e:
        if debug:
            raise
        render.error(str(e))
        code = e.exit_code
    except Exception as e:  # a bug: still one line; the traceback only with --debug
        if debug:
            raise
        render.error(f"unexpected {type(e).__name__}: {e} (run again with --debug for the traceback)")
        code = 1
    sys.exit(code)
