"""`python -m pipeline COMMAND`: a group that imports only the command it runs. Each command lives
beside its logic: the DVC stages in pipeline/stages/, the other commands in pipeline/tools/."""
from __future__ import annotations

import importlib
import signal
import sys

if sys.argv[1:2] == ["serve"]:  # SIGHUP means "reload" to serve: harmless from the first moment on
    signal.signal(signal.SIGHUP, signal.SIG_IGN)

import click  # noqa: E402

COMMANDS = {
    "generate": "pipeline.stages.generate", "ingest": "pipeline.stages.ingest", "train": "pipeline.stages.train",
    "teach": "pipeline.stages.teach", "evaluate": "pipeline.stages.evaluate", "export": "pipeline.stages.export", "predict": "pipeline.tools.predict",
    "serve": "pipeline.tools.serve", "label": "pipeline.tools.label", "profile": "pipeline.tools.profile",
}


class LazyGroup(click.Group):
    def list_commands(self, ctx):
        return list(COMMANDS)

    def get_command(self, ctx, name):
        return importlib.import_module(COMMANDS[name]).cli if name in COMMANDS else None


@click.group(cls=LazyGroup)
def cli():
    """Train and serve CRNN captcha recognizers (see README)."""


def main():
    cli(prog_name="python -m pipeline")


if __name__ == "__main__":
    sys.exit(main())
