"""`python -m pipeline COMMAND`: the click layer, one command per stage; each reads params.yaml (or
--params) and calls its stage (pipeline/stages/), which builds on the core (pipeline/*.py)."""
from __future__ import annotations

import sys
from pathlib import Path

import click

from pipeline.errors import PipelineError
from pipeline.params import load_params


class _Group(click.Group):
    def invoke(self, ctx):
        try:
            return super().invoke(ctx)
        except PipelineError as e:
            click.echo(f"error: {e}", err=True)
            ctx.exit(2)
        except OSError as e:  # a disk or permission fault the stage did not name itself
            click.echo(f"error: {e.filename or ''}: {e.strerror or e}".replace("error: : ", "error: "), err=True)
            ctx.exit(2)


params_option = click.option("--params", "params_path", default="params.yaml", show_default=True,
                             type=click.Path(path_type=Path), help="params file to read")


@click.group(cls=_Group)
def cli():
    """Train and serve CRNN captcha recognizers (see README)."""


@cli.command()
@params_option
@click.option("--shards", default=None, metavar="START:END",
              help="render only these global shard indices (train, then val, then test); no manifest")
@click.option("--manifest-only", is_flag=True, help="rebuild data/manifest.parquet from the shards")
@click.option("--quiet", is_flag=True, help="no progress bar")
def generate(params_path, shards, manifest_only, quiet):
    """Render synthetic captchas into data/shards/ and write data/manifest.parquet."""
    from pipeline.stages.generate import MANIFEST, generate as run, write_nothing_rendered

    params = load_params(params_path)
    if str(MANIFEST) not in params.train.sources:  # e.g. fine-tuning on ingested captchas alone
        write_nothing_rendered()
        return
    run(params.data, shards=shards, manifest_only=manifest_only, progress=not quiet)


@cli.command()
@click.argument("source", required=False, type=click.Path(path_type=Path))
@params_option
@click.option("--labels", type=click.Path(path_type=Path), default=None,
              help="CSV/TSV of path,label (paths relative to SOURCE); default: labels from file names")
@click.option("--skip-invalid", is_flag=True, help="skip invalid files (listed in reports/ingest.json)")
def ingest(source, params_path, labels, skip_invalid):
    """Ingest a folder of labelled captchas into data/ingest/ (shards + manifest)."""
    from pipeline.stages.ingest import ingest as run

    params = load_params(params_path)
    run(params.data, params.ingest, source=source, labels=labels, skip_invalid=skip_invalid)


@cli.command()
@params_option
@click.option("--quiet", is_flag=True, help="no progress bar")
def train(params_path, quiet):
    """Train on the shards; write models/model.pt (best on val) and reports/train*."""
    from pipeline.stages.train import train as run

    run(load_params(params_path), progress=not quiet)


@cli.command()
@params_option
@click.option("--quiet", is_flag=True, help="no progress bar")
@click.option("--model", "model_path", default=None, type=click.Path(path_type=Path),
              help="score this checkpoint instead; print its metrics, write no report")
@click.option("--folder", default=None, type=click.Path(path_type=Path),
              help="score a labelled folder instead of the test split (labels from --labels or file names)")
@click.option("--labels", default=None, type=click.Path(path_type=Path),
              help="with --folder: CSV/TSV of path,label [default: FOLDER/labels.csv if present]")
@click.option("--case", type=click.Choice(["upper", "lower"]), default=None,
              help="with --folder: compare letters case-insensitively")
def evaluate(params_path, quiet, model_path, folder, labels, case):
    """Score models/model.pt on the test split; write reports/metrics.json and pictures."""
    import json

    from pipeline.stages.evaluate import Paths, evaluate as run, score_folder

    params = load_params(params_path)
    if folder is not None:
        labels = labels or (folder / "labels.csv" if (folder / "labels.csv").exists() else None)
        metrics = score_folder(model_path or Paths().model, folder, labels, params.ingest.pattern,
                               params.evaluate.thresholds, case)
    elif model_path is not None:
        metrics = run(params, Paths(model=model_path), progress=not quiet, write=False)
    else:
        run(params, progress=not quiet)
        return
    click.echo(json.dumps(metrics, indent=1))


@cli.command()
@params_option
def export(params_path):
    """Export models/model.pt to models/model.onnx and check parity on test images."""
    from pipeline.stages.export import export as run

    run(load_params(params_path))


model_option = click.option("--model", "model_path", default="models/model.pt", show_default=True,
                            type=click.Path(path_type=Path), help="checkpoint to load")
onnx_option = click.option("--onnx/--torch", "onnx", default=None,
                           help="force onnxruntime or torch [default: ONNX when exported from this checkpoint]")


@cli.command()
@click.argument("inputs", nargs=-1, required=True)
@model_option
@onnx_option
@click.option("--beam", default=1, show_default=True, type=click.IntRange(1, 64), help="CTC beam width")
@click.option("--allowed", default=None, help="restrict the output to these characters")
@click.option("--case", type=click.Choice(["upper", "lower"]), default=None,
              help="read letters case-insensitively and answer in this case")
@click.option("--batch-size", default=64, show_default=True, type=click.IntRange(1))
def predict(inputs, model_path, onnx, beam, allowed, case, batch_size):
    """Read images (files, folders, globs); print {"path", "text", "confidence"} per line."""
    from pipeline.stages.predict import check_allowed, expand_inputs, predict_paths
    from pipeline.recognizer import Recognizer

    recognizer = Recognizer(model_path, onnx=onnx)
    check_allowed(recognizer, allowed)
    failures = predict_paths(recognizer, expand_inputs(inputs), batch_size=batch_size, beam=beam,
                             allowed=allowed, case=case)
    sys.exit(1 if failures else 0)


@cli.command()
@model_option
@onnx_option
@click.option("--host", default="127.0.0.1", show_default=True)
@click.option("--port", default=8000, show_default=True, type=int)
@click.option("--workers", default=None, type=click.IntRange(1),
              help="processes, kept up by a supervisor [default: one per core, at most 8]")
@click.option("--threads", default=16, show_default=True, type=click.IntRange(1), help="threads per process")
def serve(model_path, onnx, host, port, workers, threads):
    """Serve POST /predict, GET /healthz and GET /model over HTTP (waitress)."""
    from pipeline.stages.serve import serve as run

    run(model_path, host, port, workers=workers, threads=threads, onnx=onnx)


@cli.command()
@click.argument("folder", type=click.Path(path_type=Path))
@model_option
@click.option("--labels", type=click.Path(path_type=Path), default=None,
              help="the labels CSV to append to [default: FOLDER/labels.csv]; ingest reads it as ingest.labels")
@click.option("--accept-above", type=click.FloatRange(0, 1), default=None,
              help="write readings of at least this confidence as labels without asking (status auto)")
@click.option("--user", default=None, help="who is labelling (the CSV's who column) [default: login name]")
@click.option("--host", default="127.0.0.1", show_default=True)
@click.option("--port", default=8001, show_default=True, type=int)
def label(folder, model_path, labels, accept_above, user, host, port):
    """Label FOLDER's captchas in a web page, the model's reading pre-filled, least confident first."""
    from pipeline.stages.label import label as run

    run(folder, model_path, labels, host, port, accept_above, who=user)


@cli.command()
@click.argument("name")
@params_option
def profile(name, params_path):
    """Write a named set of params (profiles/NAME.yaml: general, finetune) into params.yaml."""
    from pipeline.stages.profile import apply_profile

    changed = apply_profile(name, params_path)
    click.echo(f"{params_path}: " + (", ".join(changed) if changed else "nothing to change"))


def main():
    cli(prog_name="python -m pipeline")


if __name__ == "__main__":
    sys.exit(main())
