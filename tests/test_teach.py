"""A teacher for a small student: the teach stage reads ingest's unlabelled captchas with a teacher
checkpoint (here ddddocr's trunk, which reads the yardstick's digits style zero-shot), and train
learns from its readings: as labels (the confident ones) and as soft targets (train.distill)."""
from __future__ import annotations

import io

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch

from benchmarks.yardstick import packaged_trunk, render_style
from pipeline.data.shards import iter_tar
from pipeline.errors import ParamsError
from pipeline.model import checkpoint
from pipeline.model.settings import load_model_params
from pipeline.params import dump_yaml, load_params, read_yaml
from pipeline.stages.ingest import ingest
from pipeline.stages.teach import teach
from pipeline.stages.train import train
from pipeline.training.distill import resample_steps
from tests.conftest import REPO, digits_site, write_params

STUDENT = {"arch": "fast", "fast": {"height": 32, "width": 96, "keep_aspect": True, "conv": [8, 16, 32, 48],
                                   "hidden": 48, "dropout": 0.0}}


@pytest.fixture
def taught(tmp_path, monkeypatch):
    """A digits site (40 labelled, 60 unlabelled) ingested, ddddocr's trunk as the teacher."""
    monkeypatch.chdir(tmp_path)
    digits_site(tmp_path / "site", 40, 60)
    (tmp_path / "pretrained").mkdir()
    packaged_trunk(tmp_path / "pretrained/teacher.pt", REPO)
    write_params(tmp_path, {"ingest": {"source": "site", "case": "upper", "max_length": 6, "unlabelled": True,
                                       "fractions": {"train": 0.7, "val": 0.3, "test": 0.0}},
                            "teach": {"model": "pretrained/teacher.pt", "soft": True}, "model": STUDENT})
    params = load_params("params.yaml")
    ingest(params.data, params.ingest)
    return tmp_path


def test_without_a_teacher_nothing_is_taught(tiny_copy):
    report = teach(load_params("params.yaml"))
    assert report["teacher"] == "" and pq.read_table("data/teacher/manifest.parquet").num_rows == 0


def test_the_teacher_labels_the_unlabelled_captchas_it_reads_confidently(taught):
    report = teach(load_params("params.yaml"), progress=False)
    assert report["unlabelled"] == 60 and report["soft"] == 60 and report["threshold"] is not None
    rows = pq.read_table("data/teacher/manifest.parquet").to_pylist()
    hard = [row for row in rows if row["split"] == "train"]
    assert len(hard) == report["labelled_by_teacher"] >= 30
    assert all(row["confidence"] >= report["threshold"] for row in hard)
    truth = {label for label, _ in render_style("digits", "unlabelled", 60)}
    assert sum(row["label"] in truth for row in hard) >= 0.9 * len(hard)
    soft = [s for shard in sorted(set(r["shard"] for r in rows if r["split"] == "soft")) for s in iter_tar(shard)]
    probs = np.load(io.BytesIO(soft[0]["npy"]))
    assert len(soft) == 60 and probs.dtype == np.float16 and probs.shape == (24, 37)
    assert np.allclose(probs.astype(np.float32).sum(-1), 1, atol=1e-2)


def test_a_teacher_of_another_charset_is_one_line(taught):
    write_params(taught, {"data": {"charset": "0123456789AB"}, "teach": {"model": "pretrained/teacher.pt"}})
    with pytest.raises(ParamsError, match="^teach.model: pretrained/teacher.pt reads"):
        teach(load_params("params.yaml"), progress=False)


def kl_to_teacher(model_path, soft_samples) -> float:
    """The mean per-step KL divergence of a model's distributions from the teacher's."""
    bundle = checkpoint.load(model_path)
    images = bundle.preprocess.batch([s["png"] for s in soft_samples])
    with torch.inference_mode():
        log_probs = bundle.model(torch.from_numpy(images)).log_softmax(-1)
    targets = torch.from_numpy(np.stack([
        resample_steps(np.load(io.BytesIO(s["npy"])).astype(np.float32), log_probs.shape[1]) for s in soft_samples]))
    return float((targets * (targets.clamp_min(1e-12).log() - log_probs)).sum(-1).mean())


def test_a_student_learns_from_the_teachers_soft_targets(taught):
    """A `fast` student of the trunk's own step count (32 x 96, keep_aspect: 24 steps, as the trunk's
    64 x 192) trains on the teacher's confident readings as labels, and with train.distill it moves
    toward the teacher's distributions, which it does not with the same steps without them."""
    params = load_params("params.yaml")
    teach(params, progress=False)
    rows = pq.read_table("data/teacher/manifest.parquet").to_pylist()
    soft = [s for shard in sorted({r["shard"] for r in rows if r["split"] == "soft"}) for s in iter_tar(shard)]
    kl = {}
    for distill in (0.0, 20.0):
        write_params(taught, {"train": {"epochs": 10, "batch_size": 16, "lr": 3.0e-3, "distill": distill,
                                        "sources": {"data/ingest/manifest.parquet": 1}},
                              "teach": {"model": "pretrained/teacher.pt", "soft": True}, "model": STUDENT})
        raw = read_yaml(taught / "params.yaml")
        raw["train"]["sources"] = {"data/ingest/manifest.parquet": 1, "data/teacher/manifest.parquet": 1}
        (taught / "params.yaml").write_text(dump_yaml(raw))
        summary = train(load_model_params("params.yaml"), progress=False)
        kl[distill] = kl_to_teacher("models/last.pt", soft)
        labelled = sum(r["split"] == "train" for r in pq.read_table("data/ingest/manifest.parquet").to_pylist())
        by_teacher = sum(r["split"] == "train" for r in rows)
        assert summary["images_seen"] == 10 * (labelled + by_teacher)  # the teacher's labels are trained on
        assert bool(summary["distill"]) == bool(distill)
    assert kl[20.0] < 0.75 * kl[0.0], kl  # measured 0.59 against 1.03


def test_resampling_steps_keeps_identity_and_interpolates():
    probs = np.eye(4, dtype=np.float32)[[0, 1, 2, 3]]
    assert np.array_equal(resample_steps(probs, 4), probs)
    doubled = resample_steps(probs, 8)
    assert doubled.shape == (8, 4) and np.allclose(doubled.sum(-1), 1)
    assert doubled[0].argmax() == 0 and doubled[-1].argmax() == 3
