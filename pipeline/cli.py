"""What every command's click layer shares: one-line errors with exit status 2, and the common
options. Each command lives beside its logic (pipeline/stages/*, pipeline/tools/*) and runs as
`python -m pipeline NAME` or, as dvc.yaml calls the stages, `python -m pipeline.stages.NAME`, so
that a stage's entry point imports that stage alone."""
from __future__ import annotations

import importlib
from pathlib import Path

import click

from pipeline import outputs
from pipeline.errors import PipelineError


class Command(click.Command):
    """A click command whose PipelineError or unnamed disk fault ends in one line, exit status 2."""

    def invoke(self, ctx):
        try:
            return super().invoke(ctx)
        except PipelineError as e:
            click.echo(f"error: {e}", err=True)
            ctx.exit(2)
        except OSError as e:  # a disk or permission fault the command did not name itself
            click.echo(f"error: {e.filename or ''}: {e.strerror or e}".replace("error: : ", "error: "), err=True)
            ctx.exit(2)


def command(name: str):
    """@command("generate"): a click command of this project."""
    return click.command(name, cls=Command)


def run(module: str) -> None:
    """`python -m pipeline.stages.NAME`: run that module's command alone. The module is imported by
    its own name, so that what it defines is not a second copy living in `__main__`."""
    cli = importlib.import_module(module).cli
    cli(prog_name=f"python -m pipeline {cli.name}")


params_option = click.option("--params", "params_path", default="params.yaml", show_default=True,
                             type=click.Path(path_type=Path), help="params file to read")
model_option = click.option("--model", "model_path", default=str(outputs.MODEL), show_default=True,
                            type=click.Path(path_type=Path), help="checkpoint to load")
onnx_option = click.option("--onnx/--torch", "onnx", default=None,
                           help="force onnxruntime or torch [default: ONNX when exported from this checkpoint]")
quiet_option = click.option("--quiet", is_flag=True, help="no progress bar")
