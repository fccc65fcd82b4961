"""`make bench-accuracy`: time to accuracy per architecture on this machine.

Every architecture trains on the same generated data for the same wall-clock budget (the
learning-rate schedule follows the budget, see train.max_minutes), then is scored on the same
test split. Writes reports/bench/accuracy.json (the table) and reports/bench/curves.tsv (val
accuracy against training time; a DVC plot).

    python -m benchmarks.accuracy [--minutes 10] [--archs fast,crnn,...] [--data DIR]
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import time
from pathlib import Path

from pipeline.files import write_json, write_text
from pipeline.model import ARCHS
from pipeline.model.settings import load_model_params as load_params
from pipeline.stages.evaluate import Paths as EvalPaths
from pipeline.stages.evaluate import evaluate
from pipeline.stages.generate import generate
from pipeline.stages.train import Paths as TrainPaths
from pipeline.stages.train import train


def main():
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--minutes", type=float, default=10.0, help="training budget per architecture")
    parser.add_argument("--archs", default=",".join(ARCHS), help="comma-separated architectures")
    parser.add_argument("--params", default="params.yaml", help="data, train and evaluate settings")
    parser.add_argument("--out", default="reports/bench")
    args = parser.parse_args()
    params = load_params(args.params)
    if not Path("data/manifest.parquet").exists():
        generate(params.data)
    out = Path(args.out)
    table, curves = {}, ["arch\tminutes\tval_seq_accuracy"]
    for arch in args.archs.split(","):
        run = dataclasses.replace(
            params,
            model=params.model.with_arch(arch),
            train=dataclasses.replace(params.train, epochs=1000, max_minutes=args.minutes, patience=0),
        )
        folder = out / arch
        paths = TrainPaths(folder / "model.pt", folder / "last.pt", folder / "history.tsv", folder / "train.json")
        started = time.perf_counter()
        summary = train(run, paths)
        metrics = evaluate(run, EvalPaths(paths.model, folder / "metrics.json", folder / "confusion.csv",
                                          folder / "errors.png"))
        table[arch] = {"test_seq_accuracy": metrics["seq_accuracy"], "images_seen": summary["images_seen"],
                       "train_minutes": round(summary["train_seconds"] / 60, 1),
                       "wall_minutes": round((time.perf_counter() - started) / 60, 1),
                       "images_per_second": summary["images_per_second"], "parameters": summary["parameters"],
                       "precision": summary["precision"]}
        for row in read_history(paths.history):
            curves.append(f"{arch}\t{float(row['elapsed_s']) / 60:.2f}\t{row['val_seq_accuracy']}")
        write_json(out / "accuracy.json", {"minutes": args.minutes, "cpu_count": os.cpu_count(), "results": table})
        write_text(out / "curves.tsv", "\n".join(curves) + "\n")
        print(json.dumps({arch: table[arch]}), flush=True)
    print(format_table(table))


def read_history(path: Path) -> list[dict]:
    header, *rows = path.read_text().splitlines()
    names = header.split("\t")
    return [dict(zip(names, r.split("\t"))) for r in rows]


def format_table(table: dict) -> str:
    lines = ["| arch | test seq. accuracy | images seen | img/s | parameters |", "|---|---|---|---|---|"]
    for arch, r in table.items():
        lines.append(f"| {arch} | {r['test_seq_accuracy']:.2%} | {r['images_seen']:,} | {r['images_per_second']:.0f} "
                     f"| {r['parameters']:,} |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
