"""The `evaluate` stage: the best checkpoint over the test split -> metrics, confusions, errors."""
from __future__ import annotations

import csv
import io
import json
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import click
import pyarrow.compute as pc
import torch
from PIL import Image, ImageDraw, ImageFont
from tqdm import tqdm

from pipeline import outputs
from pipeline.charset import fold_text
from pipeline.cli import command, params_option, quiet_option, run
from pipeline.data.images import load_image
from pipeline.data.labelled_folders import list_folder
from pipeline.data.shards import iter_tar
from pipeline.data.sources import load_sources, require_shards
from pipeline.data.stream import ShardStream, loader_workers, make_loader
from pipeline.device import pick_device, pick_precision
from pipeline.errors import PipelineError
from pipeline.files import atomic_write, check_writable, file_sha256, write_json
from pipeline.model import checkpoint
from pipeline.params import Params, load_params
from pipeline.read.inference import predict_batches
from pipeline.read.metrics import align, compute_metrics
from pipeline.read.recognizer import Recognizer


@dataclass(frozen=True)
class Paths:
    model: Path = outputs.MODEL
    metrics: Path = outputs.METRICS
    confusion: Path = outputs.CONFUSION
    errors: Path = outputs.ERRORS


def evaluate(params: Params, paths: Paths = Paths(), progress: bool = True, write: bool = True) -> dict:
    """Score paths.model on the test split of train.sources; `write`: the stage's reports too."""
    settings = params.evaluate
    if write:
        check_writable(*{p.parent for p in (paths.metrics, paths.confusion, paths.errors)})
    bundle = checkpoint.load(paths.model)
    device = pick_device(settings.device, "evaluate.device")
    precision = pick_precision(settings.precision, device, "evaluate.precision")
    bundle.model.to(device)

    sources = load_sources(params.train.sources)
    shards = require_shards(sources, "test", "evaluate")
    key_source = {key: source.name for source in sources for key in source.keys("test")}
    for warning in charset_warnings(bundle.charset.chars, params.model_charset, paths.model, sources):
        print(f"warning: {warning}", file=sys.stderr)
    n_total = sum(n for _, n in shards)

    def transform(png, label, augment_rng):
        return bundle.preprocess(png), []  # no targets needed: labels are compared as text

    stream = ShardStream([s for s, _ in shards], transform, settings.batch_size)
    loader = make_loader(stream, loader_workers(len(shards), 1, settings.workers, "test"))
    truths, preds, confs, keys = [], [], [], []
    started = time.perf_counter()
    with torch.inference_mode(), tqdm(total=n_total, unit="img", desc="evaluate", file=sys.stderr,
                                      disable=not progress) as bar:
        for truth, pred, conf, key in predict_batches(bundle.model, loader, device, precision,
                                                      bundle.charset, bundle.ctc):
            truths.append(truth)
            preds.append(pred)
            confs.append(conf)
            keys.append(key)
            bar.update(1)
    seconds = time.perf_counter() - started

    metrics = compute_metrics(truths, preds, confs, settings.thresholds)
    metrics["images_per_second"] = round(len(truths) / seconds, 1)
    metrics["device"] = str(device)
    metrics["model_sha256"] = file_sha256(paths.model)  # serve shows these metrics only for this model
    metrics["model"] = {"arch": bundle.arch, "epoch": bundle.info.get("epoch"),
                        "val_seq_accuracy": bundle.info.get("val_seq_accuracy")}
    if len(set(key_source.values())) > 1:
        metrics["per_source"] = {}
        for name in sorted(set(key_source.values())):
            idx = [i for i, k in enumerate(keys) if key_source[k] == name]
            sub = compute_metrics([truths[i] for i in idx], [preds[i] for i in idx], [confs[i] for i in idx])
            metrics["per_source"][name] = {k: sub[k] for k in ("seq_accuracy", "char_accuracy", "cer", "n")}
    if write:
        write_json(paths.metrics, metrics)
        write_confusion(paths.confusion, truths, preds)
        errors = [(k, t, p, c) for k, t, p, c in zip(keys, truths, preds, confs) if t != p][: settings.error_grid]
        write_error_grid(paths.errors, errors, shards)
    print(f"test: seq accuracy {metrics['seq_accuracy']:.4f}, char accuracy {metrics['char_accuracy']:.4f}, "
          f"CER {metrics['cer']:.4f}, n {metrics['n']}", file=sys.stderr)
    return metrics


def score_folder(model: Path, folder: Path, labels: Path | None, pattern: str, thresholds: list[float],
                 case: str | None = None, batch_size: int = 64) -> dict:
    """Score a checkpoint on a labelled folder (labels from `labels`, the `label` command's CSV
    included, or from file names by `pattern`); with `case`, letters compare case-insensitively."""
    listing = list_folder(folder, pattern, labels)
    if not listing.labelled:
        raise PipelineError(f"{folder}: no labelled images to score")
    recognizer = Recognizer(model, onnx=False)
    truths, preds, confs = [], [], []
    for (rel, label), reading in recognizer.read_each(listing.labelled, lambda item: load_image(folder / item[0]),
                                                      batch_size, case=case):
        if isinstance(reading, Exception):
            raise PipelineError(f"{folder / rel}: {reading}")
        truths.append(fold_text(label, case))
        preds.append(reading.text)
        confs.append(reading.confidence)
    metrics = compute_metrics(truths, preds, confs, thresholds)
    metrics.update({"model": str(model), "model_sha256": recognizer.model_sha256, "folder": str(folder),
                    "left_out": {"invalid": len(listing.invalid), "unlabelled": len(listing.unlabelled),
                                 "unreadable": len(listing.unreadable)}})
    return metrics


def charset_warnings(model_chars: str, data_chars: str, model_path: Path, sources) -> list[str]:
    """What can make a score 0 with nothing wrong in the model: an edited checkpoint (its charset the
    same characters in another order than the data's), or test labels it cannot spell."""
    warnings = []
    if model_chars != data_chars and sorted(model_chars) == sorted(data_chars):
        warnings.append(f"{model_path} reads the charset {model_chars!r}: the characters of data.charset "
                        f"{data_chars!r} in another order; unless the model was trained so, its outputs "
                        f"map to the wrong characters")
    labels = "".join("".join(s.table.filter(pc.equal(s.table["split"], "test"))["label"].to_pylist())
                     for s in sources)
    unknown = "".join(sorted(set(labels) - set(model_chars)))
    if unknown:
        warnings.append(f"test labels hold characters {model_path} cannot read: {unknown!r}")
    return warnings


def write_confusion(path: Path, truths: list[str], preds: list[str]) -> None:
    """Every aligned character pair (actual, predicted): DVC's confusion template counts them."""
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow(["actual", "predicted"])
    for t, p in zip(truths, preds):
        writer.writerows(align(t, p)[1])
    atomic_write(path, lambda f: f.write(out.getvalue().encode("utf-8")))


def write_error_grid(path: Path, errors: list[tuple[str, str, str, float]], shards, columns: int = 8) -> None:
    """A grid of misread images, truth and prediction under each."""
    wanted = {k for k, *_ in errors}
    images = {}
    for shard, _ in shards:
        if len(images) == len(wanted):
            break
        for sample in iter_tar(Path(shard)):
            if sample["__key__"] in wanted:
                images[sample["__key__"]] = sample["png"]
    cell_w, cell_h, text_h = 128, 64, 30
    rows = max(1, -(-len(errors) // columns))
    grid = Image.new("RGB", (columns * cell_w, rows * (cell_h + text_h)), "white")
    draw = ImageDraw.Draw(grid)
    font = ImageFont.load_default(size=12)
    if not errors:
        draw.text((8, 8), "no errors on the test split", fill="black", font=font)
    for i, (key, truth, pred, conf) in enumerate(errors):
        x, y = (i % columns) * cell_w, (i // columns) * (cell_h + text_h)
        img = Image.open(io.BytesIO(images[key])).convert("RGB")
        grid.paste(img.resize((cell_w, cell_h)), (x, y))
        draw.text((x + 4, y + cell_h + 1), f"true {truth}", fill="black", font=font)
        draw.text((x + 4, y + cell_h + 15), f"read {pred or '-'} {conf:.2f}", fill="firebrick", font=font)
    buffer = io.BytesIO()
    grid.save(buffer, format="PNG")
    atomic_write(path, lambda f: f.write(buffer.getvalue()))


@command("evaluate")
@params_option
@quiet_option
@click.option("--model", "model_path", default=None, type=click.Path(path_type=Path),
              help="score this checkpoint instead; print its metrics, write no report")
@click.option("--folder", default=None, type=click.Path(path_type=Path),
              help="score a labelled folder instead of the test split (labels from --labels or file names)")
@click.option("--labels", default=None, type=click.Path(path_type=Path),
              help="with --folder: CSV/TSV of path,label [default: FOLDER/labels.csv if present]")
@click.option("--case", type=click.Choice(["upper", "lower"]), default=None,
              help="with --folder: compare letters case-insensitively")
def cli(params_path, quiet, model_path, folder, labels, case):
    """Score models/model.pt on the test split; write reports/metrics.json and pictures."""
    params = load_params(params_path)
    if folder is not None:
        labels = labels or (folder / "labels.csv" if (folder / "labels.csv").exists() else None)
        metrics = score_folder(model_path or Paths().model, folder, labels, params.ingest.pattern,
                               params.evaluate.thresholds, case)
    elif model_path is not None:
        metrics = evaluate(params, Paths(model=model_path), progress=not quiet, write=False)
    else:
        evaluate(params, progress=not quiet)
        return
    click.echo(json.dumps(metrics, indent=1))


if __name__ == "__main__":  # python -m pipeline.stages.NAME, as dvc.yaml runs the stages
    run(__spec__.name)
