"""The benchmarks: report tables, and the yardstick's styles and fine-tuning path (the figures themselves are measured by `make bench` and `make bench-yardstick`, not here)."""
import math

import pytest
import torch

from benchmarks.speed import format_tables, train_rate
from pipeline.model import ARCHS
from tests.conftest import REPO, default_params


def fake_report() -> dict:
    train = {f"{a}/{p}": r for a in ARCHS for p, r in (("fp32", 100.0), ("bf16", 200.0))}
    train["fast/bf16/contiguous"] = 150.0
    loader = {f"{a}/{w}_workers": 1000.0 * (w + 1) for a in ARCHS for w in (0, 1, 2)}
    inference = {f"{b}_{t}_threads": {"batch1_model_ms": 1.0, "batch1_png_to_text_ms": 1.5,
                                      "batch64_images_per_second": 900.0}
                 for b in ("torch", "onnxruntime") for t in (1, 2)}
    return {"date": "2026-11-22", "machine": {"cpu": "test cpu", "cores": 2, "torch": "2.13.0"},
            "generation": {"images_per_second": {"bare_loop": 400.0, "stage_1_worker": 300.0, "stage_2_workers": 570.0},
                           "ratio_1_worker_vs_bare": 0.75, "ratio_2_vs_1_workers": 1.9},
            "training_images_per_second": train, "loader_images_per_second": loader, "inference": inference,
            "http": {"clients": 16, "seconds": 30.0, "requests": 9000, "requests_per_second": 300.0, "p50_ms": 40.0,
                     "p99_ms": 80.0, "errors_5xx": 0, "rss_mb_before": 280.0, "rss_mb_after": 281.0}}


def test_tables_show_every_arch_with_loader_headroom():
    text = format_tables(fake_report())
    for arch in ARCHS:
        # slowest loader (0 workers, 1000 img/s) over the bf16 step (200 img/s)
        assert f"| `{arch}` | 100 | 200 | 1,000 / 2,000 / 3,000 | 5x |" in text
    assert "| `generate`, 2 workers | 570 | 1.90x 1 worker |" in text
    assert "| onnxruntime, 2 threads | 1.0 ms | 1.5 ms | 900 img/s |" in text
    assert "CUDA" not in text


def test_tables_add_cuda_when_measured():
    report = fake_report()
    cuda = {f"{a}/{p}": r for a in ARCHS for p, r in (("fp32", 5000.0), ("fp16", 9000.0))}
    report["cuda_training_images_per_second"] = {"mixed_precision": "fp16", **cuda}
    text = format_tables(report)
    assert "CUDA img/s, fp32 / fp16 (batch 256) |" in text
    assert "| `fast` | 100 | 200 | 1,000 / 2,000 / 3,000 | 5x | 5,000 / 9,000 |" in text


def test_cuda_only_report_prints_its_table():
    cuda = {f"{a}/{p}": r for a in ARCHS for p, r in (("fp32", 5000.0), ("bf16", 7000.0))}
    report = {"date": "2026-11-22", "machine": {"cpu": "x", "cores": 16, "torch": "2.11", "gpu": "H100"},
              "cuda_training_images_per_second": {"mixed_precision": "bf16", **cuda}}
    text = format_tables(report)
    assert text.startswith("2026-11-22, x, 16 cores, H100, torch 2.11")
    assert "| `multihead` | 5,000 | 7,000 |" in text


def test_train_rate_times_the_training_stages_own_step(monkeypatch):
    """Each arch's rate is its batch over the step time of pipeline.stages.train's train_step, which
    runs (a warm-up, then `steps` timed) and moves the weights."""
    import benchmarks.speed as speed

    params = default_params()
    for arch in ARCHS:
        steps, moved = [], []

        def step(model, optimizer, *args, **kwargs):
            before = [p.detach().clone() for p in model.parameters()]
            loss = speed_train_step(model, optimizer, *args, **kwargs)
            moved.append(any(not torch.equal(a, p) for a, p in zip(before, model.parameters())))
            steps.append(loss.item())
            return loss

        speed_train_step = speed.train_step
        monkeypatch.setattr(speed, "train_step", step)
        times = iter([0.0, 0.5, 1.0, 1.25, 2.0, 2.1])  # perf_counter around the timed steps: 0.5, 0.25, 0.1 s
        monkeypatch.setattr(speed.time, "perf_counter", lambda: next(times))
        rate = train_rate(params, params.model.with_arch(arch), "fp32", batch=2, steps=3)
        monkeypatch.undo()
        assert len(steps) == 4 and all(moved) and all(math.isfinite(x) for x in steps), arch
        assert rate == pytest.approx(2 / 0.25), arch  # the median step


def test_record_run_renders_a_prefix_that_is_an_ordinary_dataset(tmp_path):
    """benchmarks.record sizes the train split by time; the shards it keeps must be exactly those
    that `generate` renders for the final params, so `dvc exp run` with them reproduces the data."""
    import json
    import os
    import subprocess
    import sys

    from pipeline.data.shards import read_manifest
    from pipeline.params import load_params
    from pipeline.stages.generate import generate
    from tests.conftest import REPO, write_params

    write_params(tmp_path, {"data": {"min_length": 4, "max_length": 4, "shard_size": 20,
                                     "splits": {"train": 0, "val": 20, "test": 20}}})
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    result = subprocess.run(
        [sys.executable, "-m", "benchmarks.record", "--generate-minutes", "0", "--chunk-shards", "2",
         "--train-minutes", "0.05", "--set", "train.epochs=3", "--set", "train.batch_size=16"],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    summary = json.loads((tmp_path / "reports/record.json").read_text())
    assert summary["train_images"] == 40  # one chunk of 2 shards: the budget was spent at once
    assert "-S data.splits.train=40" in summary["dvc_exp_run"] and "-S train.epochs=3" in summary["dvc_exp_run"]
    assert summary["metrics"]["n"] == 20 and summary["train"]["images_seen"] <= 3 * 40
    splits = read_manifest(tmp_path / "data/manifest.parquet")["split"].to_pylist()
    assert (splits.count("train"), splits.count("val"), splits.count("test")) == (40, 20, 20)

    final = load_params(tmp_path / "reports/record-params.yaml")
    assert final.data.splits.train == 40 and final.train.max_minutes == 0.05
    generate(final.data, root=tmp_path / "again", manifest=tmp_path / "again.parquet", progress=False)
    for shard in ("train/train-000000.tar", "train/train-000001.tar", "test/test-000000.tar"):
        assert (tmp_path / "again" / shard).read_bytes() == (tmp_path / "data/shards" / shard).read_bytes()


def test_yardstick_styles_are_deterministic_and_fine_tuning_runs(tiny_dataset, tmp_path):
    from benchmarks.yardstick import STYLES, accuracy, doubled_read_once, fine_tune, read_with_model, render_style

    assert doubled_read_once(["AAB1", "xXy", "ABC", "AAB2"], ["AB1", "XY", "AB", "AAB2"]) == "2 of 3"

    for name in STYLES:
        first = render_style(name, "test", 3)
        assert first == render_style(name, "test", 3), name
        assert first != render_style(name, "train", 3), name
        assert all(label.isalnum() for label, _ in first)
    train = render_style("digits", "train", 40)
    tuned = fine_tune(tiny_dataset / "models/model.pt", tiny_dataset / "models/model.pt", train, 0.002,
                      tmp_path / "work", REPO)
    readings, _ = read_with_model(tuned, [png for _, png in train[:5]])
    assert len(readings) == 5 and 0 <= accuracy([t for t, _ in train[:5]], readings) <= 1


def test_the_simulated_site_judges_each_captcha_once_from_its_true_label():
    from benchmarks.site_loop import site_app
    from benchmarks.yardstick import render_one

    client = site_app("serif").test_client()
    first, second = client.get("/captcha"), client.get("/captcha")
    assert first.headers["Content-Type"] == "image/png" and first.headers["X-Captcha-Id"] == "0"
    label, png = render_one("serif", "site", 1)
    assert second.data == png
    assert client.post("/answer", json={"id": "1", "text": label.upper()}).json == {"correct": True}  # any case
    assert client.post("/answer", json={"id": "1", "text": label}).json == {"correct": False}  # once
    assert client.post("/answer", json={"id": "0", "text": label + "X"}).json == {"correct": False}
    assert client.get("/captcha").headers["X-Captcha-Id"] == "2"  # answered ids are never issued again


def test_the_http_load_runs_a_real_serve_process(tiny_dataset):
    from benchmarks.speed import http_load, request_bodies

    result = http_load(tiny_dataset / "models/model.pt", seconds=1.0, clients=2, workers=1,
                       bodies=request_bodies("captcha", 4))
    assert result["requests"] >= 4 and result["non_200"] == 0 and result["requests_per_second"] > 0


def test_the_site_loop_plays_types_retrains_and_swaps(tmp_path):
    """One round against the simulated site through a real serve process: verdicts become labels,
    a person types rejected ones within the budget, the retrained model is swapped in."""
    import json
    import subprocess
    import sys

    out = tmp_path / "loop.json"
    result = subprocess.run([sys.executable, "-m", "benchmarks.site_loop", "--style", "serif", "--rounds", "1",
                             "--per-round", "12", "--minutes", "0.05", "--typed", "3", "--test", "10",
                             "--unlabelled", "--set", "train.epochs=1", "--out", str(out)],
                            cwd=REPO, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads(out.read_text())
    (row,) = report["rounds"]
    accepted = round(row["site_accepted"] * 12)
    assert row["labels_from_verdicts"] <= accepted and row["typed"] == min(3, 12 - accepted)
    assert row["keystrokes"] >= 4 * row["typed"]  # at least 3 characters and Enter each
    assert report["settings"] == {"train.epochs": 1, "ingest.unlabelled": True}


def test_accuracy_variants_of_the_data_render_their_own(tmp_path, monkeypatch):
    import json

    from click.testing import CliRunner

    from benchmarks.accuracy import main
    from tests.conftest import write_params

    monkeypatch.chdir(tmp_path)
    write_params(tmp_path, {"data": {"splits": {"train": 120, "val": 60, "test": 60}}})
    result = CliRunner().invoke(main, ["--minutes", "0.05", "--variant", "plain train.epochs=1", "--variant",
                                       "wide data.width=160 train.epochs=1", "--out", "bench"])
    assert result.exit_code == 0, result.output
    report = json.loads((tmp_path / "bench/accuracy.json").read_text())["results"]
    assert report["plain"]["n"] == report["wide"]["n"] == 60
    assert (tmp_path / "bench/wide/manifest.parquet").exists() and not (tmp_path / "bench/plain/manifest.parquet").exists()
    import pyarrow.parquet as pq

    assert set(pq.read_table(tmp_path / "bench/wide/manifest.parquet")["width"].to_pylist()) == {160}


def test_generate_process_times_the_stage_against_the_bare_loop():
    import json

    from click.testing import CliRunner

    from benchmarks.generate_process import main

    result = CliRunner().invoke(main, ["--n", "20", "--repeats", "2"])
    assert result.exit_code == 0, result.output
    rows = [json.loads(line) for line in result.output.splitlines()]
    assert len(rows) == 3 and all(r["bare_s"] > 0 and r["generate_s"] > 0 for r in rows[:2])
    assert rows[2]["median_ratio"] == sum(r["ratio"] for r in rows[:2]) / 2
