"""The errors a user sees: one line, exit status 2. This module imports nothing of the project."""
from __future__ import annotations


class PipelineError(Exception):
    """Bad params or bad input. The CLI prints it on one line and exits with status 2."""

    def __str__(self) -> str:
        # Raised in a DataLoader worker, it is re-raised in the main process with the worker's
        # traceback as its message; the user sees our line, its last.
        message = super().__str__()
        if "\nOriginal Traceback" in message:
            message = message.rstrip().splitlines()[-1].partition(": ")[2]
        return message


class DataError(PipelineError):
    """Bad data: a shard, a sample or a manifest row; the message names it."""


class ParamsError(PipelineError):
    """A params value is wrong; the message starts with its key, e.g. `data.min_length: ...`."""


def require(condition: bool, key: str, message: str) -> None:
    """Raise ParamsError(`key: message`) unless `condition` holds."""
    if not condition:
        raise ParamsError(f"{key}: {message}")
