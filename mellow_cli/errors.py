"""Errors a user can act on. Each prints as one line, `mellow: error: <message>`, never a traceback.

Anything else that escapes is a bug, and the CLI says so (the traceback only with --debug).
"""


class MellowError(Exception):
    """A problem with the user's input or environment, described in one line."""

    exit_code = 1


class UsageError(MellowError):
    """Bad arguments: exit 2, as argparse/click do."""

    exit_code = 2


class AudioError(MellowError):
    """A clip that cannot be used. The message names the file first: `<path>: <problem>`."""

    def __init__(self, path, problem: str):
        self.path = str(path)
        self.problem = problem
        super().__init__(f"{self.path}: {problem}")


class ModelError(MellowError):
    """A model or checkpoint that cannot be found, fetched or loaded."""
