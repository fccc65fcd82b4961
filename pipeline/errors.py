"""The errors a user sees: one line, exit status 2. This module imports nothing of the project."""
from __future__ import annotations


class PipelineError(Exception):
    """Bad params or bad input. The CLI prints it on one line and exits with status 2."""


class ParamsError(PipelineError):
    """A params value is wrong; the message starts with its key, e.g. `data.min_length: ...`."""


def require(condition: bool, key: str, message: str) -> None:
    """Raise ParamsError(`key: message`) unless `condition` holds."""
    if not condition:
        raise ParamsError(f"{key}: {message}")
