"""Shared fixtures: tiny params files and a tiny generated dataset, made once per session.

Every params file a test writes is the repository's params.yaml (the only place defaults live)
with the TINY values and the test's own on top."""
from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest
import yaml

from pipeline.params import read_yaml

REPO = Path(__file__).resolve().parents[1]
REPO_PARAMS = read_yaml(REPO / "params.yaml")

TINY = {
    "data": {"min_length": 4, "max_length": 5, "workers": 2, "shard_size": 60,
             "splits": {"train": 240, "val": 60, "test": 60}},
    "model": {"arch": "fast", "fast": {"conv": [8, 16, 32, 48], "hidden": 48, "dropout": 0.0}},
    "train": {"epochs": 1, "batch_size": 32, "workers": 0, "lr": 3.0e-3, "precision": "fp32"},
    "evaluate": {"batch_size": 64, "workers": 0},
    "export": {"parity_samples": 32},
}


def merge(base: dict, override: dict) -> dict:
    out = dict(base)
    for k, v in override.items():
        out[k] = merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def write_params(folder: Path, override: dict | None = None) -> Path:
    path = Path(folder) / "params.yaml"
    path.write_text(yaml.safe_dump(merge(merge(REPO_PARAMS, TINY), override or {}), sort_keys=False))
    return path


def default_params():
    """The repository's params.yaml, loaded, its model section checked."""
    from pipeline.model.settings import load_model_params

    return load_model_params(REPO / "params.yaml")


@pytest.fixture
def workdir(tmp_path, monkeypatch):
    """A fresh working directory with the tiny params.yaml."""
    write_params(tmp_path)
    monkeypatch.chdir(tmp_path)
    return tmp_path


@pytest.fixture(scope="session")
def tiny_dataset(tmp_path_factory):
    """A generated tiny dataset (shards + manifest) and a briefly trained model, read-only."""
    from pipeline.params import load_params
    from pipeline.stages.generate import generate
    from pipeline.stages.train import train

    root = tmp_path_factory.mktemp("tiny")
    params_path = write_params(root, {"train": {"epochs": 2}})
    cwd = os.getcwd()
    os.chdir(root)
    try:
        params = load_params(params_path)
        generate(params.data, progress=False)
        train(params, progress=False)
    finally:
        os.chdir(cwd)
    return root


def digits_site(folder: Path, labelled: int, unlabelled: int) -> Path:
    """A site's captchas that ddddocr's trunk reads zero-shot: the yardstick's `digits` style, the
    labelled ones named by their labels, the unlabelled ones by names the label pattern skips."""
    from benchmarks.yardstick import render_style

    folder.mkdir(parents=True)
    for i, (label, png) in enumerate(render_style("digits", "train", labelled)):
        (folder / f"{label}_{i}.png").write_bytes(png)
    for i, (_label, png) in enumerate(render_style("digits", "unlabelled", unlabelled)):
        (folder / f"_u{i}.png").write_bytes(png)
    return folder


def fine_tune_params(folder: Path, site: str, train: dict | None = None, **ingest) -> Path:
    """params.yaml in `folder` for a fine-tune of ddddocr's trunk on `site` alone (the finetune
    profile's route, narrowed for speed), with train and ingest settings on top."""
    path = write_params(folder, {"model": {"arch": "ddddocr", "ddddocr": {"width": 128}},
                                 "ingest": {"source": site, "case": "upper", "max_length": 6,
                                            "fractions": {"train": 0.7, "val": 0.3, "test": 0.0}, **ingest},
                                 "train": {"init_from": "ddddocr", "batch_size": 16, "lr": 3.0e-4, **(train or {})}})
    raw = read_yaml(path)
    raw["train"]["sources"] = {"data/ingest/manifest.parquet": 1}  # the site's captchas alone
    path.write_text(yaml.safe_dump(raw, sort_keys=False))
    return path


@pytest.fixture(scope="session")
def recognizer(tiny_dataset):
    """The tiny model, read with torch."""
    from pipeline.read.recognizer import Recognizer

    return Recognizer(tiny_dataset / "models/model.pt", onnx=False)


# the limits of the served app in the hostile-input tests
SERVE_LIMITS = dict(max_bytes=2_000_000, max_connections=40, max_connections_per_client=8, idle_timeout=1,
                    request_timeout=2)


@pytest.fixture(scope="module")
def server_url(recognizer):
    """The tiny model served by the hardened waitress server, in a thread."""
    import socket
    import threading

    from pipeline.serving.app import Limits, create_app
    from pipeline.serving.http import make_server

    limits = Limits(**SERVE_LIMITS)
    sock = socket.create_server(("127.0.0.1", 0))
    server = make_server(create_app(recognizer, limits), sock, 4, limits)
    threading.Thread(target=server.run, daemon=True).start()
    yield f"http://127.0.0.1:{sock.getsockname()[1]}"
    server.task_dispatcher.shutdown(timeout=1)


@pytest.fixture
def tiny_copy(tiny_dataset, tmp_path, monkeypatch):
    """A writable copy of the tiny dataset folder, as the working directory."""
    dest = tmp_path / "work"
    shutil.copytree(tiny_dataset, dest)
    monkeypatch.chdir(dest)
    return dest
