"""The `generate` stage: render synthetic captchas into shards, then build the manifest.

Every sample is a pure function of (data.seed, split, index), so any subset of shards can be
rendered anywhere, in any order, by any number of workers, and give the same bytes. Its label and
its rendering draw from two independent streams: were they one, the renderer's random colours and
warps would replay the numbers that chose the label, and the image would give its label away
outside the glyphs (tests/test_independence.py).
"""
from __future__ import annotations

import multiprocessing
import random
import shutil
import sys
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import click
from tqdm import tqdm

from pipeline import outputs
from pipeline.cli import command, params_option, quiet_option, run
from pipeline.data.seeds import derive_seed
from pipeline.data.shards import Sample, scan_shards, shard_path, write_manifest, write_shard
from pipeline.data.styles import check_fonts, renderer_for
from pipeline.errors import PipelineError
from pipeline.files import check_writable, folder_lock, remove_stale_temp_files, write_text
from pipeline.params import DataParams, load_params


@dataclass(frozen=True)
class ShardJob:
    split: str
    index: int  # shard index within the split
    start: int  # first sample index within the split
    count: int


def plan_shards(data: DataParams) -> list[ShardJob]:
    """All shards of all splits, in global order (train, val, test)."""
    jobs = []
    for split, total in data.splits.items():
        for index, start in enumerate(range(0, total, data.shard_size)):
            jobs.append(ShardJob(split, index, start, min(data.shard_size, total - start)))
    return jobs


def sample_spec(data: DataParams, split: str, i: int) -> tuple[str, str, int]:
    """(key, label, render seed) of sample i of a split. Characters are uniform per position, but
    in the train split those of data.emphasis are drawn that many times as often (val and test
    stay uniform: they measure the task as it is)."""
    rng = random.Random(derive_seed(data.seed, split, i, "label"))
    length = rng.randint(data.min_length, data.max_length)
    if split == "train" and data.emphasis:
        weights = [data.emphasis.get(c, 1.0) for c in data.charset]
        label = "".join(rng.choices(data.charset, weights, k=length))
    else:
        label = "".join(rng.choice(data.charset) for _ in range(length))
    return f"{split}_{i:08d}", label, derive_seed(data.seed, split, i, "render")


def render_shard(data: DataParams, job: ShardJob, root: Path) -> int:
    renderer = renderer_for(data)

    def samples():
        for i in range(job.start, job.start + job.count):
            key, label, seed = sample_spec(data, job.split, i)
            yield Sample(key, renderer.png(label, seed), label, {"source": "synthetic", "seed": seed})

    path = shard_path(root, job.split, job.index)
    write_shard(path, samples())
    return job.count


def parse_range(text: str, total: int) -> range:
    """'a:b' (either side may be empty) or 'n' -> a range of global shard indices."""
    try:
        if ":" in text:
            lo, hi = text.split(":", 1)
            return range(int(lo) if lo else 0, min(int(hi) if hi else total, total))
        return range(int(text), int(text) + 1)
    except ValueError:
        raise PipelineError(f"--shards: expected START:END or N, got {text!r}") from None


def generate(data: DataParams, shards: str | None = None, manifest_only: bool = False,
             root: Path = outputs.SHARDS, manifest: Path = outputs.MANIFEST, progress: bool = True) -> dict:
    """Render the shards (all, or a range with `shards`), then write the manifest. A full run or
    --manifest-only locks the folder for itself; --shards runs share it with each other only."""
    check_fonts(data)
    with folder_lock(root, exclusive=shards is None):
        # before anything is deleted: a folder we cannot write must not cost the manifest
        check_writable(manifest.parent, *([] if manifest_only else [root, *sorted(root.glob("*/"))]))
        if shards is None:  # a killed run's half-written manifest, beside the folder
            for stale in manifest.parent.glob(f".{manifest.name}.tmp-*"):
                stale.unlink(missing_ok=True)
        remove_stale_temp_files(root, any_writer=shards is None)
        return _generate(data, shards, manifest_only, root, manifest, progress)


def clear_outputs(root: Path, manifest: Path) -> None:
    manifest.unlink(missing_ok=True)
    if root.exists():
        shutil.rmtree(root)


def write_nothing_rendered(root: Path = outputs.SHARDS, manifest: Path = outputs.MANIFEST) -> None:
    """The stage's outputs when training reads no synthetic data: an empty manifest, and a note
    in the shards folder (so that DVC has a folder to track), in seconds instead of minutes."""
    with folder_lock(root, exclusive=True):
        check_writable(manifest.parent, root)
        clear_outputs(root, manifest)
        root.mkdir(parents=True)
        write_text(root / "NOT_RENDERED", f"train.sources does not read {manifest}: nothing rendered.\n")
        write_manifest([], manifest)
    print(f"{manifest} is not in train.sources: no synthetic data rendered", file=sys.stderr)


def _generate(data: DataParams, shards: str | None, manifest_only: bool, root: Path, manifest: Path,
              progress: bool) -> dict:
    jobs = plan_shards(data)
    started = time.perf_counter()
    if not manifest_only:
        selected = jobs if shards is None else [jobs[i] for i in parse_range(shards, len(jobs))]
        if shards is None:  # a full run replaces every shard and the manifest, stale ones included
            clear_outputs(root, manifest)
        _render(data, selected, root, progress)
        if shards is not None:
            print(f"rendered {len(selected)} of {len(jobs)} shards; when all are done, "
                  f"run `generate --manifest-only` to write the manifest", file=sys.stderr)
            return {"shards": len(selected)}
    missing = [shard_path(root, j.split, j.index) for j in jobs if not shard_path(root, j.split, j.index).exists()]
    if missing:
        raise PipelineError(f"{missing[0]}: shard missing ({len(missing)} of {len(jobs)}); render it with --shards")
    rows = scan_shards([(str(shard_path(root, j.split, j.index)), j.split) for j in jobs], data.workers)
    write_manifest(rows, manifest)
    summary = summarize(rows, time.perf_counter() - started)
    print(format_summary(summary), file=sys.stderr)
    return summary


def _render(data: DataParams, jobs: list[ShardJob], root: Path, progress: bool) -> None:
    bar = tqdm(total=sum(j.count for j in jobs), unit="img", disable=not progress, file=sys.stderr,
               desc="generate", smoothing=0.1)
    with bar:
        if data.workers == 1 or len(jobs) <= 1:
            for job in jobs:
                bar.update(render_shard(data, job, root))
            return
        ctx = multiprocessing.get_context("fork")
        with ctx.Pool(min(data.workers, len(jobs))) as pool:
            results = [pool.apply_async(render_shard, (data, job, root)) for job in jobs]
            for r in results:
                bar.update(r.get())


def summarize(rows: list[dict], seconds: float) -> dict:
    return {
        "per_split": dict(Counter(r["split"] for r in rows)),
        "lengths": dict(sorted(Counter(r["length"] for r in rows).items())),
        "seconds": round(seconds, 1),
        "images_per_second": round(len(rows) / seconds, 1) if seconds else None,
    }


def format_summary(s: dict) -> str:
    splits = ", ".join(f"{k} {v}" for k, v in s["per_split"].items())
    lengths = ", ".join(f"{k}: {v}" for k, v in s["lengths"].items())
    return f"samples: {splits}; label lengths: {lengths}; {s['seconds']} s ({s['images_per_second']} img/s)"


@command("generate")
@params_option
@click.option("--shards", default=None, metavar="START:END",
              help="render only these global shard indices (train, then val, then test); no manifest")
@click.option("--manifest-only", is_flag=True, help="rebuild data/manifest.parquet from the shards")
@quiet_option
def cli(params_path, shards, manifest_only, quiet):
    """Render synthetic captchas into data/shards/ and write data/manifest.parquet."""
    params = load_params(params_path)
    if str(outputs.MANIFEST) not in params.train.sources:  # e.g. fine-tuning on ingested captchas alone
        write_nothing_rendered()
        return
    generate(params.data, shards=shards, manifest_only=manifest_only, progress=not quiet)


if __name__ == "__main__":  # python -m pipeline.stages.NAME, as dvc.yaml runs the stages
    run(__spec__.name)
