"""`predict`: read files, folders and globs; print one JSON line per image."""
from __future__ import annotations

import glob
import json
import os
import sys
from pathlib import Path
from typing import Iterable, Iterator, TextIO

import click

from pipeline.cli import command, model_option, onnx_option, run
from pipeline.data.images import image_paths
from pipeline.errors import PipelineError
from pipeline.read.recognizer import Recognizer


def expand_inputs(inputs: Iterable[str]) -> Iterator[Path]:
    """Paths as given; folders for their entries with an image extension (sorted); globs expanded.
    Nothing is skipped in silence: a FIFO, a dangling or looping link is yielded, and reading it
    reports why it is not an image."""
    for item in inputs:
        path = Path(item)
        if path.is_dir():
            yield from image_paths(path)
        elif os.path.lexists(path):
            yield path
        else:
            matches = sorted(glob.glob(item, recursive=True))
            if not matches:
                yield path  # reported as unreadable below
            yield from (Path(m) for m in matches if not Path(m).is_dir())


def predict_paths(recognizer: Recognizer, paths: Iterable[Path], out: TextIO | None = None,
                  batch_size: int = 64, beam: int = 1, allowed: str | None = None, case: str | None = None) -> int:
    """Write one JSON object per path (to stdout as it is at the call), in batches as they are read;
    return the number of unreadable files."""
    out = out or sys.stdout
    failures = 0
    for path, reading in recognizer.read_each(paths, batch_size=batch_size, beam=beam, allowed=allowed, case=case):
        if isinstance(reading, Exception):
            failures += 1
            out.write(json.dumps({"path": str(path), "error": str(reading)}) + "\n")
        else:
            out.write(json.dumps({"path": str(path), "text": reading.text,
                                  "confidence": round(reading.confidence, 6)}) + "\n")
        out.flush()
    return failures


def check_allowed(recognizer: Recognizer, allowed: str | None) -> None:
    try:
        recognizer.charset.mask(allowed)
    except ValueError as e:
        raise PipelineError(f"--allowed: {e}") from None


@command("predict")
@click.argument("inputs", nargs=-1, required=True)
@model_option
@onnx_option
@click.option("--beam", default=1, show_default=True, type=click.IntRange(1, 64), help="CTC beam width")
@click.option("--allowed", default=None, help="restrict the output to these characters")
@click.option("--case", type=click.Choice(["upper", "lower"]), default=None,
              help="read letters case-insensitively and answer in this case")
@click.option("--batch-size", default=64, show_default=True, type=click.IntRange(1))
def cli(inputs, model_path, onnx, beam, allowed, case, batch_size):
    """Read images (files, folders, globs); print {"path", "text", "confidence"} per line."""
    recognizer = Recognizer(model_path, onnx=onnx)
    check_allowed(recognizer, allowed)
    failures = predict_paths(recognizer, expand_inputs(inputs), batch_size=batch_size, beam=beam,
                             allowed=allowed, case=case)
    sys.exit(1 if failures else 0)


if __name__ == "__main__":  # python -m pipeline.tools.NAME
    run(__spec__.name)
