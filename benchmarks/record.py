"""The record run on a machine without DVC: the dvc.yaml stage commands, with the training set
sized by a wall-clock budget for rendering instead of a fixed count.

    python -m benchmarks.record --set model.fast.height=64 ... --generate-minutes 8 --train-minutes 11

Train shards are rendered in chunks until the generation budget is spent; since every sample is a
function of (data.seed, split, index), the first k shards of any plan are the train split of a
plan with k shards, so the run ends with an ordinary dataset and manifest. It writes the params
it used to --params-out and prints the `dvc exp run` line that reproduces the run with DVC.
"""
from __future__ import annotations

import json
import shlex
import subprocess
import sys
import time
from pathlib import Path

import click

from benchmarks.common import parse_override, set_dotted, write_params
from pipeline.files import write_json
from pipeline.params import read_yaml


def stage(*args: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] python -m pipeline {' '.join(args)}", file=sys.stderr, flush=True)
    code = subprocess.run([sys.executable, "-m", "pipeline", *args]).returncode
    if code:  # the stage has printed its error
        raise SystemExit(code)


def exp_run_line(settings: dict) -> str:
    """The `dvc exp run` command line that sets these params, quoted for a POSIX shell."""
    def text(value) -> str:
        return value if isinstance(value, str) else json.dumps(value, separators=(",", ":"))

    return "dvc exp run " + " ".join(f"-S {shlex.quote(f'{key}={text(value)}')}" for key, value in settings.items())


@click.command(help=__doc__)
@click.option("--set", "overrides", multiple=True, metavar="KEY=VALUE", help="a params value, e.g. model.fast.height=64")
@click.option("--generate-minutes", type=float, required=True)
@click.option("--train-minutes", type=float, required=True, help="becomes train.max_minutes")
@click.option("--chunk-shards", type=int, default=64, show_default=True, help="train shards rendered per generate call")
@click.option("--params-out", type=click.Path(path_type=Path), default=Path("reports/record-params.yaml"), show_default=True)
@click.option("--summary-out", type=click.Path(path_type=Path), default=Path("reports/record.json"), show_default=True)
def main(overrides, generate_minutes, train_minutes, chunk_shards, params_out, summary_out) -> None:
    raw = read_yaml(Path("params.yaml"))
    overrides = dict(parse_override(o) for o in overrides)
    for key, value in overrides.items():
        set_dotted(raw, key, value)
    shard_size = raw["data"]["shard_size"]
    plan_path = params_out.with_suffix(".plan.yaml")
    set_dotted(raw, "data.splits.train", 10_000 * shard_size)  # an upper bound; only a prefix is rendered
    write_params(raw, plan_path)

    started = time.perf_counter()
    deadline = started + generate_minutes * 60
    rendered, chunk_seconds = 0, 0.0
    while rendered == 0 or time.perf_counter() + chunk_seconds < deadline:
        t = time.perf_counter()
        stage("generate", "--params", str(plan_path), "--quiet", "--shards", f"{rendered}:{rendered + chunk_shards}")
        rendered += chunk_shards
        chunk_seconds = time.perf_counter() - t
    train_images = rendered * shard_size
    generate_seconds = time.perf_counter() - started

    set_dotted(raw, "data.splits.train", train_images)
    set_dotted(raw, "train.max_minutes", train_minutes)
    write_params(raw, params_out)
    stage("generate", "--params", str(params_out), "--quiet", "--shards", f"{rendered}:")  # val, test
    stage("generate", "--params", str(params_out), "--manifest-only")
    data_seconds = time.perf_counter() - started

    t = time.perf_counter()
    stage("train", "--params", str(params_out), "--quiet")
    train_wall = time.perf_counter() - t
    t = time.perf_counter()
    stage("evaluate", "--params", str(params_out), "--quiet")
    evaluate_wall = time.perf_counter() - t

    final = {**overrides, "data.splits.train": train_images, "train.max_minutes": train_minutes}
    summary = {
        "train_images": train_images, "generate_seconds": round(generate_seconds, 1),
        "generate_images_per_second": round(train_images / generate_seconds, 1),
        "data_seconds": round(data_seconds, 1), "train_wall_seconds": round(train_wall, 1),
        "evaluate_wall_seconds": round(evaluate_wall, 1), "total_seconds": round(time.perf_counter() - started, 1),
        "dvc_exp_run": exp_run_line(final),
        "train": json.loads(Path("reports/train.json").read_text()),
        "metrics": {k: v for k, v in json.loads(Path("reports/metrics.json").read_text()).items()
                    if isinstance(v, (int, float, str))},
    }
    write_json(summary_out, summary)
    print(json.dumps(summary, indent=1))


if __name__ == "__main__":
    main()
