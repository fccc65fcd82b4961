"""`make bench-accuracy`: accuracy per CPU minute, variants side by side on this machine.

Every variant (an architecture, or params.yaml with some keys changed) trains on the same generated
data for the same wall-clock budget (the learning-rate schedule follows the budget, see
train.max_minutes), one after another in this one process, then is scored on the same test split.
Writes reports/bench/accuracy.json (the table) and reports/bench/curves.tsv (val accuracy against
training time; a DVC plot).

    python -m benchmarks.accuracy [--minutes 10] [--archs fast,crnn,...]
    python -m benchmarks.accuracy --minutes 8 --variant default \\
        --variant 'batch64 train.batch_size=64 train.lr=2e-3' --variant 'half-data train_samples=50000'

A variant is a name and KEY=VALUE settings (dotted params keys, values as params.yaml reads them);
`train_samples=N` trains on the first N captchas of the train split only (whole shards), so that
fewer distinct captchas seen more often can be set against more seen once. A variant that sets
data.* keys renders data of its own into its folder (not counted in its minutes) and is scored on
its own test split: the seed's configuration, say, 192 x 64 renders:

    python -m benchmarks.accuracy --minutes 21 --variant default --variant 'seed-size data.width=192'
"""
from __future__ import annotations

import json
import os
import time
from pathlib import Path

import click
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from benchmarks.common import host_kind, parse_variant, set_dotted, write_params
from pipeline import outputs
from pipeline.files import write_json, write_text
from pipeline.model import ARCHS
from pipeline.model.settings import load_model_params as load_params
from pipeline.params import read_yaml
from pipeline.stages.evaluate import Paths as EvalPaths
from pipeline.stages.evaluate import evaluate
from pipeline.stages.generate import generate
from pipeline.stages.train import Paths as TrainPaths
from pipeline.stages.train import train

SUBSET = "train_samples"  # a variant key that is not a params key


def subset_manifest(manifest: Path, samples: int, out: Path) -> Path:
    """A copy of `manifest` whose train split is its first shards holding `samples` captchas."""
    table = pq.read_table(manifest)
    train = table.filter(pc.equal(table["split"], "train"))
    shards = list(dict.fromkeys(train["shard"].to_pylist()))
    keep, count = [], 0
    for shard in shards:
        if count >= samples:
            break
        keep.append(shard)
        count += pc.sum(pc.equal(train["shard"], shard)).as_py()
    kept = pc.or_(pc.not_equal(table["split"], "train"), pc.is_in(table["shard"], value_set=pa.array(keep)))
    out.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(table.filter(kept), out)
    return out


def variant_params(raw: dict, settings: dict, folder: Path) -> Path:
    """params.yaml with the variant's settings, written into its folder; a variant of the data
    params has its data rendered there (train.sources then names that manifest)."""
    raw = json.loads(json.dumps(raw))  # a deep copy
    for key, value in settings.items():
        if key == SUBSET:
            manifest = subset_manifest(outputs.MANIFEST, int(value), folder / "manifest.parquet")
            raw["train"]["sources"] = {str(manifest): 1}
        else:
            set_dotted(raw, key, value)
    path = folder / "params.yaml"
    write_params(raw, path)
    if any(key.startswith("data.") for key in settings):
        manifest = folder / "manifest.parquet"
        if not manifest.exists():
            generate(load_params(path).data, root=folder / "shards", manifest=manifest, progress=False)
        raw["train"]["sources"] = {str(manifest): 1}
        write_params(raw, path)
    return path


@click.command(help=__doc__)
@click.option("--minutes", default=10.0, show_default=True, help="training budget per variant")
@click.option("--archs", default=",".join(ARCHS), show_default=True,
              help="comma-separated architectures (without --variant)")
@click.option("--variant", "variant_texts", multiple=True, metavar="'NAME KEY=VALUE ...'")
@click.option("--params", "params_path", default="params.yaml", show_default=True,
              help="data, train and evaluate settings")
@click.option("--out", default="reports/bench", show_default=True)
def main(minutes, archs, variant_texts, params_path, out):
    raw = read_yaml(Path(params_path))
    variants = [parse_variant(v) for v in variant_texts] or [(a, {"model.arch": a}) for a in archs.split(",")]
    if not outputs.MANIFEST.exists():
        generate(load_params(params_path).data)
    out = Path(out)
    table, curves = {}, ["variant\tminutes\tval_seq_accuracy"]
    for name, settings in variants:
        folder = out / name
        folder.mkdir(parents=True, exist_ok=True)
        budget = {"train.epochs": 1000, "train.max_minutes": minutes, "train.patience": 0}
        params = load_params(variant_params(raw, {**budget, **settings}, folder))
        paths = TrainPaths(folder / "model.pt", folder / "last.pt", folder / "history.tsv", folder / "train.json")
        started = time.perf_counter()
        summary = train(params, paths, progress=False)
        metrics = evaluate(params, EvalPaths(paths.model, folder / "metrics.json", folder / "confusion.csv",
                                             folder / "errors.png"))
        table[name] = {"settings": settings, "test_seq_accuracy": metrics["seq_accuracy"],
                       "test_char_accuracy": metrics["char_accuracy"], "n": metrics["n"],
                       "images_seen": summary["images_seen"], "epochs": summary["epochs_run"],
                       "train_minutes": round(summary["train_seconds"] / 60, 1),
                       "wall_minutes": round((time.perf_counter() - started) / 60, 1),
                       "images_per_second": summary["images_per_second"], "parameters": summary["parameters"],
                       "precision": summary["precision"], "o0_errors": o0_errors(folder / "confusion.csv")}
        for row in read_history(paths.history):
            curves.append(f"{name}\t{float(row['elapsed_s']) / 60:.2f}\t{row['val_seq_accuracy']}")
        write_json(out / "accuracy.json", {"minutes": minutes, "cpu_count": os.cpu_count(), "host": host_kind(),
                                           "results": table})
        write_text(out / "curves.tsv", "\n".join(curves) + "\n")
        print(json.dumps({name: table[name]}), flush=True)
    print(format_table(table))


def o0_errors(confusion: Path) -> str:
    """'k of n': character errors that are O read as 0 or 0 as O, of all character errors (the
    confusion CSV: one row per aligned character pair)."""
    _header, *rows = confusion.read_text().splitlines()
    errors = [tuple(row.split(",", 1)) for row in rows]
    errors = [(a, b) for a, b in errors if a != b]
    return f"{sum({a, b} == {'O', '0'} for a, b in errors)} of {len(errors)}"


def read_history(path: Path) -> list[dict]:
    header, *rows = path.read_text().splitlines()
    names = header.split("\t")
    return [dict(zip(names, r.split("\t"))) for r in rows]


def format_table(table: dict) -> str:
    lines = ["| variant | test seq. accuracy | O/0 of char errors | images seen | img/s | parameters |",
             "|---|---|---|---|---|---|"]
    for name, r in table.items():
        lines.append(f"| {name} | {r['test_seq_accuracy']:.2%} | {r['o0_errors']} | {r['images_seen']:,} "
                     f"| {r['images_per_second']:.0f} | {r['parameters']:,} |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
