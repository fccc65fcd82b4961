from __future__ import annotations

import dataclasses
import os
import subprocess
import sys
from pathlib import Path

import pyarrow.compute as pc
import pytest
import torch

from pipeline.charset import Charset
from pipeline.data.captcha_style import Renderer
from pipeline.data.shards import read_manifest, split_shards
from pipeline.data.stream import ShardStream, loader_workers, make_loader
from pipeline.errors import PipelineError
from pipeline.model import ARCHS, build_model, checkpoint, output_steps, steps_needed
from pipeline.model.preprocess import Preprocess
from pipeline.params import load_params
from pipeline.read.decode import greedy_decode
from pipeline.stages.train import Paths, train
from pipeline.training.losses import sequence_loss
from tests.conftest import REPO, default_params, write_params

CHARSET = Charset("0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZ")


@pytest.mark.parametrize("arch", list(ARCHS))
def test_each_architecture_builds_runs_and_has_enough_steps(arch):
    settings = default_params().model.with_arch(arch).settings
    model = build_model(arch, settings, CHARSET.num_classes, 6)
    out = model(torch.zeros(3, settings.channels, settings.height, settings.width))
    assert out.shape[0] == 3 and out.shape[2] == CHARSET.num_classes
    assert out.shape[1] == output_steps(arch, settings, 6) >= steps_needed(arch, 6)


@pytest.mark.parametrize("arch", ["fast", "multihead"])
def test_overfits_64_samples(arch):
    """Loss, targets, lengths and decoding agree: 64 fixed images are learnt to 100%."""
    torch.manual_seed(0)
    renderer = Renderer(128, 64)
    labels = ["".join(CHARSET.chars[(i * 7 + j * 13) % 36] for j in range(4 + i % 2)) for i in range(64)]
    labels[:4] = ["6666", "AABB", "O0O0", "1111"]
    # small inputs keep this quick; the full-size models are covered by the build test above
    overrides = {"fast": {"width": 64, "conv": [16, 32, 48, 64], "hidden": 64, "dropout": 0.0},
                 "multihead": {"height": 32, "width": 64, "channels": 1, "dropout": 0.0}}[arch]
    settings = dataclasses.replace(default_params().model.with_arch(arch).settings, **overrides)
    pre = Preprocess.of(settings)
    images = torch.from_numpy(pre.batch([renderer.png(lab, i) for i, lab in enumerate(labels)]))
    targets = torch.tensor([c for lab in labels for c in CHARSET.encode(lab)])
    lengths = torch.tensor([len(lab) for lab in labels])
    model = build_model(arch, settings, CHARSET.num_classes, 5)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    decoded: list[str] = []
    for step in range(400):
        model.train()
        loss = sequence_loss(model(images), targets, lengths, ARCHS[arch].ctc)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        if step % 25 == 24:
            model.eval()
            with torch.no_grad():
                probs = model(images).softmax(-1).numpy()
            decoded = [CHARSET.decode(ids) for ids, _ in greedy_decode(probs, ARCHS[arch].ctc)]
            if decoded == labels:
                return
    pytest.fail(f"not learnt after 400 steps: {sum(a == b for a, b in zip(decoded, labels))}/64")


def test_stream_reads_every_sample_exactly_once_with_2_workers(tiny_dataset, monkeypatch):
    monkeypatch.chdir(tiny_dataset)
    manifest = read_manifest(Path("data/manifest.parquet"))
    shards = [s for s, _ in split_shards(manifest, "train")]
    expected = sorted(manifest.filter(pc.equal(manifest["split"], "train"))["key"].to_pylist())
    stream = ShardStream(shards, lambda png, label, rng: (torch.zeros(1).numpy(), [1]), 7, shuffle=True,
                         shuffle_buffer=50, seed=3)
    loader = make_loader(stream, 2)
    for epoch in range(2):
        stream.set_epoch(epoch)
        keys = [k for batch in loader for k in batch[4]]
        assert sorted(keys) == expected
        if epoch == 0:
            first = keys
    assert keys != first  # reshuffled per epoch


def test_fewer_shards_than_ranks_is_a_clear_error():
    assert loader_workers(3, 1, 8, "train") == 3  # fewer workers rather than idle ones
    with pytest.raises(PipelineError, match="shard"):
        loader_workers(1, 2, 2, "train")


def test_resume_after_an_interruption_gives_the_same_weights(tiny_dataset, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tiny_dataset)
    # the shipped loader workers and dropout: a worker started before or after the resume, and
    # dropout drawing from torch's random state, must not make the two runs differ
    params = load_params(write_params(tmp_path, {"train": {"epochs": 2, "augment": 0.5, "workers": 1},
                                                 "model": {"fast": {"dropout": 0.1}}}))

    whole = Paths(*(tmp_path / "whole" / name for name in ("model.pt", "last.pt", "h.tsv", "t.json")))
    train(params, whole, progress=False)
    err = capsys.readouterr().err
    assert "epoch 2: loss" in err and "epoch 1/2" not in err and "epoch 2/2" not in err  # no bar (`--quiet`)

    class Interrupt(Exception):
        pass

    def stop_after_first(epoch):
        if epoch == 1:
            raise Interrupt

    parts = Paths(*(tmp_path / "parts" / name for name in ("model.pt", "last.pt", "h.tsv", "t.json")))
    with pytest.raises(Interrupt):
        train(params, parts, on_epoch_end=stop_after_first, progress=False)
    resumed = dataclasses.replace(params, train=dataclasses.replace(params.train, resume=True))
    summary = train(resumed, parts, progress=False)
    assert summary["epochs_run"] == 2
    for kept in ("last", "model"):  # the weights, and their moving average
        a, b = checkpoint.read(getattr(whole, kept))["state_dict"], checkpoint.read(getattr(parts, kept))["state_dict"]
        assert a.keys() == b.keys()
        for k in a:
            assert torch.equal(a[k], b[k]), (kept, k)


def test_checkpoint_loads_with_weights_only_and_carries_inference_settings(tiny_dataset):
    ckpt = torch.load(tiny_dataset / "models/model.pt", weights_only=True)
    assert {"arch", "settings", "charset", "preprocess", "state_dict", "max_length"} <= set(ckpt)
    bundle = checkpoint.load(tiny_dataset / "models/model.pt")
    assert bundle.preprocess.height == 32 and bundle.charset.chars == CHARSET.chars


def test_same_params_same_metrics(tiny_dataset, tmp_path, monkeypatch):
    monkeypatch.chdir(tiny_dataset)
    params = load_params(tiny_dataset / "params.yaml")
    runs = []
    for name in ("a", "b"):
        paths = Paths(*(tmp_path / name / f for f in ("model.pt", "last.pt", "h.tsv", "t.json")))
        train(params, paths, progress=False)
        runs.append(paths.history.read_text().split("\n"))
    strip = lambda rows: [r.rsplit("\t", 3)[0] for r in rows]  # drop the timing columns
    assert strip(runs[0]) == strip(runs[1])


def test_time_budget_stops_training_with_an_annealed_learning_rate(tiny_dataset, tmp_path, monkeypatch):
    monkeypatch.chdir(tiny_dataset)
    params = load_params(write_params(tmp_path, {"train": {"epochs": 1000, "max_minutes": 0.05}}))
    paths = Paths(*(tmp_path / f for f in ("model.pt", "last.pt", "h.tsv", "t.json")))
    summary = train(params, paths, progress=False)
    assert summary["stopped"] == "max_minutes" and summary["epochs_run"] < 1000
    assert 3.0 <= summary["train_seconds"] < 30
    last_lr = float(paths.history.read_text().splitlines()[-1].split("\t")[3])
    assert last_lr < params.train.lr / 10


def test_torchrun_two_cpu_processes(tiny_dataset, tmp_path):
    work = tmp_path / "ddp"
    work.mkdir()
    (work / "data").symlink_to(tiny_dataset / "data")
    write_params(work, {"train": {"epochs": 1, "workers": 1, "device": "cpu"}})
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    result = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
         "-m", "pipeline", "train", "--quiet"],
        cwd=work, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert sorted(p.name for p in (work / "models").iterdir()) == ["last.pt", "model.pt"]
    import json

    summary = json.loads((work / "reports/train.json").read_text())
    assert summary["ranks"] == 2 and summary["images_seen"] == 240


def test_the_budget_projection_ignores_the_loader_start_up():
    from pipeline.stages.train import overruns

    # 30 s until the first step is done (workers starting), then 0.1 s a step: 130 s for 1,001 steps
    state = {"step": 11, "first_step_s": 30.0}
    assert not overruns(state, 31.0, budget=200, total_steps=1001)  # time alone (31/200) is ahead of steps (11/1001)
    assert overruns(state, 31.0, budget=120, total_steps=1001)
    assert not overruns({"step": 1, "first_step_s": 30.0}, 30.0, budget=1, total_steps=1001)  # no pace yet
