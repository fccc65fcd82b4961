"""Nothing outside the glyphs may predict a sample's label.

Why this exists: until 2026-11-29 `generate` seeded a sample's label and its rendering with one
seed, so the `captcha` renderer's random background and text colours replayed the numbers that
chose the label (in the test shards, a background green of 250 meant the first character was
`O`). A model could read the colour instead of the glyph, and train, val and test shared the leak,
so no split could show it. These tests measure the dependence directly on generated data, and hold
every other data path (ingest, the training stream) to the same rule: a sample's split, order and
augmentation never depend on its label.
"""
from __future__ import annotations

import io
import random

import captcha.image
import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image

from pipeline.charset import Charset
from pipeline.data.captcha_style import Renderer
from pipeline.data.seeds import derive_seed
from pipeline.data.shards import Sample, iter_tar, write_shard
from pipeline.data.stream import ShardStream, make_loader
from pipeline.model.preprocess import Preprocess
from pipeline.params import load_params
from pipeline.stages.generate import generate, sample_spec
from pipeline.stages.ingest import ingest
from pipeline.training.augment import DISTORTIONS, Augment
from tests.conftest import write_params

Z_LIMIT = 6.0  # 24 tests of a statistic that is about normal under independence: z > 6 is not chance


def glyph_free_features(image: Image.Image) -> list[int]:
    """Background colour (the most common pixel) and the darkest pixel's colour, coarsely binned:
    what the renderer draws at random besides the characters' shapes."""
    a = np.asarray(image.convert("RGB")).reshape(-1, 3).astype(np.int64)
    codes = (a[:, 0] << 16) | (a[:, 1] << 8) | a[:, 2]
    values, counts = np.unique(codes, return_counts=True)
    background = values[counts.argmax()]
    darkest = a[a.sum(1).argmin()]
    return [background >> 16, (background >> 8) & 255, background & 255, *(darkest // 16)]


def mutual_information(x: np.ndarray, y: np.ndarray) -> float:
    _, x = np.unique(x, return_inverse=True)
    _, y = np.unique(y, return_inverse=True)
    joint = np.bincount(x * (y.max() + 1) + y, minlength=(x.max() + 1) * (y.max() + 1))
    joint = joint.reshape(x.max() + 1, y.max() + 1) / len(x)
    expected = joint.sum(1, keepdims=True) @ joint.sum(0, keepdims=True)
    nz = joint > 0
    return float((joint[nz] * np.log(joint[nz] / expected[nz])).sum())


def dependence(labels: list[str], features: np.ndarray, permutations: int = 200) -> float:
    """The largest z-score, over label positions x features, of their mutual information against
    its permutation null (the label column shuffled): about 0 when independent, large when not."""
    rng = np.random.default_rng(0)
    worst = 0.0
    for position in range(min(map(len, labels))):
        y = np.array([ord(label[position]) for label in labels])
        for column in features.T:
            null = [mutual_information(column, rng.permutation(y)) for _ in range(permutations)]
            worst = max(worst, (mutual_information(column, y) - np.mean(null)) / np.std(null))
    return worst


@pytest.mark.parametrize("style", ["captcha", "mixed"])
def test_generated_images_do_not_predict_their_labels(tmp_path, monkeypatch, style):
    monkeypatch.chdir(tmp_path)
    params = load_params(write_params(tmp_path, {"data": {
        "style": style, "fonts": captcha.image.DEFAULT_FONTS,
        "min_length": 4, "max_length": 4, "shard_size": 500, "splits": {"train": 2000, "val": 0, "test": 0}}}))
    generate(params.data, progress=False)
    labels, features = [], []
    for shard in sorted((tmp_path / "data/shards/train").glob("*.tar")):
        for sample in iter_tar(shard):
            labels.append(sample["txt"].decode())
            features.append(glyph_free_features(Image.open(io.BytesIO(sample["png"]))))
    assert len(labels) == 2000
    z = dependence(labels, np.array(features))
    assert z < Z_LIMIT, f"image colours predict the label (max z {z:.1f})"


def test_the_dependence_measure_catches_a_shared_seed(tmp_path):
    """The control: labels and renders drawn from one seed, as before the fix, are caught."""
    params = load_params(write_params(tmp_path, {"data": {"min_length": 4, "max_length": 4}}))
    renderer = Renderer(params.data.width, params.data.height)
    labels, features = [], []
    for i in range(600):
        seed = derive_seed(params.data.seed, "train", i)
        rng = random.Random(seed)
        rng.randint(4, 4)
        label = "".join(rng.choice(params.data.charset) for _ in range(4))
        labels.append(label)
        features.append(glyph_free_features(renderer.image(label, seed)))
    assert dependence(labels, np.array(features)) > 5 * Z_LIMIT


def test_label_and_render_streams_are_distinct(tmp_path):
    params = load_params(write_params(tmp_path))
    seeds = {sample_spec(params.data, split, i)[2] for split in ("train", "test") for i in range(100)}
    label_seeds = {derive_seed(params.data.seed, split, i, "label") for split in ("train", "test") for i in range(100)}
    assert len(seeds) == 200 and not seeds & label_seeds


def test_ingest_split_key_and_order_ignore_the_labels(workdir):
    """The same images under other labels land in the same splits, keys and order."""
    folder = workdir / "site"
    folder.mkdir()
    renderer = Renderer(128, 64)
    names = []
    for i in range(60):
        names.append(f"img{i:03d}.png")
        renderer.image("WXYZ", i).save(folder / names[-1])
    charset = "0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZ"
    layouts = []
    for trial in range(2):
        rng = random.Random(trial)
        labels = {n: "".join(rng.choice(charset) for _ in range(4)) for n in names}
        (workdir / "labels.csv").write_text("".join(f"{n},{lab}\n" for n, lab in labels.items()))
        params = load_params(write_params(workdir, {"ingest": {"labels": "labels.csv"}}))
        ingest(params.data, params.ingest, source=folder)
        rows = pq.read_table(workdir / "data/ingest/manifest.parquet").to_pylist()
        assert [labels[r["original"]] for r in rows] == [r["label"] for r in rows]
        layouts.append([(r["original"], r["key"], r["split"], r["shard"], r["offset"]) for r in rows])
    assert layouts[0] == layouts[1]
    assert {split for _, _, split, _, _ in layouts[0]} == {"train", "val", "test"}


def test_training_stream_order_and_augmentation_ignore_the_labels(tmp_path):
    """Two copies of the same images under other labels stream in the same order, augmented alike."""
    renderer = Renderer(128, 64)
    pngs = [renderer.png("ABCD", i) for i in range(48)]
    charset = Charset("0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZ")
    preprocess = Preprocess(32, 96, 1)
    augment = Augment(1.0, DISTORTIONS)
    runs = []
    for trial in range(2):
        rng = random.Random(trial)
        labels = ["".join(rng.choice(charset.chars) for _ in range(4)) for _ in pngs]
        shards = []
        for s in range(4):
            path = tmp_path / f"t{trial}" / f"train-{s:06d}.tar"
            write_shard(path, (Sample(f"k{i:03d}", pngs[i], labels[i], {}) for i in range(s * 12, s * 12 + 12)))
            shards.append(str(path))

        def transform(png, label, augment_rng):
            return preprocess(png, augment.draw(augment_rng)), charset.encode(label)

        stream = ShardStream(shards, transform, 8, shuffle=True, shuffle_buffer=16, seed=5)
        stream.set_epoch(1)
        batches = list(make_loader(stream, 2))
        runs.append((torch.cat([b[0] for b in batches]), [k for b in batches for k in b[4]]))
    assert runs[0][1] == runs[1][1]
    assert torch.equal(runs[0][0], runs[1][0])
    assert not torch.equal(runs[0][0][0], torch.from_numpy(preprocess(pngs[int(runs[0][1][0][1:])])))  # augmented
