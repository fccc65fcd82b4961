from __future__ import annotations

import io
import json
import shutil
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
import yaml
from click.testing import CliRunner
from PIL import Image

from pipeline.__main__ import cli
from pipeline.data.captcha_style import Renderer
from pipeline.data.shards import iter_tar
from pipeline.errors import PipelineError
from pipeline.model.settings import load_model_params
from pipeline.params import load_params
from pipeline.stages.evaluate import evaluate
from pipeline.stages.ingest import ingest
from pipeline.stages.train import train
from tests.conftest import write_params
from tests.helpers import encode

RENDER = Renderer(128, 64)


def make_folder(folder: Path) -> dict[str, str]:
    """A messy folder; returns {file: label} of the files that must be kept."""
    folder.mkdir(parents=True)
    good = {
        "AB12_0001.png": encode("AB12", 1),
        "CD34_x.jpg": encode("CD34", 2, "JPEG"),
        "EF56_x.gif": encode("EF56", 3, "GIF", "P"),
        "GH78_x.bmp": encode("GH78", 4, "BMP"),
        "IJ90_x.webp": encode("IJ90", 5, "WEBP"),
        "KL12_rgba.png": encode("KL12", 6, "PNG", "RGBA"),
        "MN34_grey.png": encode("MN34", 7, "PNG", "L"),
        "sub/OP56_deep.png": encode("OP56", 8),
    }
    wide = np.asarray(RENDER.image("QR78", 9).convert("L")).astype(np.uint16) * 257
    out = io.BytesIO()
    Image.fromarray(wide).save(out, format="PNG")
    good["QR78_16bit.png"] = out.getvalue()
    for name, data in good.items():
        (folder / name).parent.mkdir(parents=True, exist_ok=True)
        (folder / name).write_bytes(data)
    (folder / "AB12_copy.png").write_bytes(good["AB12_0001.png"])  # duplicate: kept once
    (folder / "ST90_trunc.png").write_bytes(encode("ST90", 10)[:200])  # corrupt
    (folder / "ab#1_x.png").write_bytes(encode("AB11", 11))  # '#' and lowercase not in charset
    (folder / "UV12_a.png").write_bytes(encode("UV12", 12))
    (folder / "WX34_b.png").write_bytes(encode("UV12", 12))  # same image, other label: conflict
    (folder / "ABCDEFG_long.png").write_bytes(encode("ABCD", 13))  # longer than max_length 5
    (folder / "notes.txt").write_text("ignored")
    return {name: name.split("/")[-1].split("_")[0] for name in good}


INVALID = {"ST90_trunc.png", "ab#1_x.png", "UV12_a.png", "WX34_b.png", "ABCDEFG_long.png"}


def shard_labels(out: Path) -> dict[str, str]:
    found = {}
    for shard in sorted(out.rglob("*.tar")):
        for s in iter_tar(shard):
            meta = json.loads(s["json"])
            found[meta["original"]] = s["txt"].decode()
            assert Image.open(io.BytesIO(s["png"])).format == "PNG"
    return found


def test_invalid_files_stop_the_stage_and_are_all_reported(workdir):
    expected = make_folder(workdir / "captchas")
    result = CliRunner().invoke(cli, ["ingest", "captchas"])
    assert result.exit_code == 2
    assert result.output.strip().splitlines()[-1].startswith("error: captchas: 5 invalid")
    report = json.loads((workdir / "reports/ingest.invalid.json").read_text())
    assert {x["file"] for x in report["invalid"]} == INVALID
    assert not (workdir / "data").exists() and not (workdir / "reports/ingest.json").exists()
    assert expected  # the valid ones are written once the bad ones are skipped:
    result = CliRunner().invoke(cli, ["ingest", "captchas", "--skip-invalid"])
    assert result.exit_code == 0, result.output
    assert shard_labels(workdir / "data/ingest") == expected
    report = json.loads((workdir / "reports/ingest.json").read_text())
    assert report["duplicates"] == [{"file": "AB12_copy.png", "same_as": "AB12_0001.png"}]
    assert report["ignored"] == ["notes.txt"]
    rows = pq.read_table(workdir / "data/ingest/manifest.parquet").to_pylist()
    assert len(rows) == len(expected) and {r["source"] for r in rows} == {"ingest"}
    formats = {r["original"]: r["format"] for r in rows}
    assert formats["CD34_x.jpg"] == "JPEG" and formats["EF56_x.gif"] == "GIF" and formats["AB12_0001.png"] == "PNG"
    original = (workdir / "captchas/AB12_0001.png").read_bytes()
    kept = [s["png"] for shard in (workdir / "data/ingest").rglob("*.tar") for s in iter_tar(shard)]
    assert original in kept  # PNG bytes are kept as they were


def test_labels_from_csv_and_case_folding(workdir):
    folder = workdir / "real"
    folder.mkdir()
    labels = {"a.png": "ab12", "b.jpg": "CD34", "c.png": "EF56"}
    for i, (name, label) in enumerate(labels.items()):
        (folder / name).write_bytes(encode(label.upper(), i, "JPEG" if name.endswith("jpg") else "PNG"))
    (workdir / "labels.csv").write_text("path,label\n" + "".join(f"{k},{v}\n" for k, v in labels.items()))
    write_params(workdir, {"ingest": {"labels": "labels.csv", "case": "keep"}})
    params = load_params("params.yaml")
    with pytest.raises(PipelineError):
        ingest(params.data, params.ingest, source=folder)
    report = json.loads((workdir / "reports/ingest.invalid.json").read_text())
    assert report["invalid"] == [{"file": "a.png", "reason": "characters not in data.charset: 'ab' "
                                  "(set ingest.case: upper to fold the labels to upper case)"}]
    write_params(workdir, {"ingest": {"labels": "labels.csv", "case": "upper"}})
    params = load_params("params.yaml")
    ingest(params.data, params.ingest, source=folder)
    assert shard_labels(workdir / "data/ingest") == {k: v.upper() for k, v in labels.items()}


def test_adding_images_never_moves_an_existing_one(workdir):
    folder = workdir / "grow"
    folder.mkdir()
    params = load_params("params.yaml")

    def splits():
        rows = pq.read_table(workdir / "data/ingest/manifest.parquet").to_pylist()
        return {r["original"]: r["split"] for r in rows}

    for i in range(40):
        (folder / f"A{i:03d}_x.png").write_bytes(encode(f"A{i:03d}", i))
    ingest(params.data, params.ingest, source=folder)
    before = splits()
    assert set(before.values()) == {"train", "val", "test"}
    for i in range(40, 80):
        (folder / f"B{i:03d}_x.png").write_bytes(encode(f"B{i:03d}", i))
    ingest(params.data, params.ingest, source=folder)
    after = splits()
    assert len(after) == 80 and all(after[k] == v for k, v in before.items())


def test_tiny_end_to_end_with_both_sources(tiny_copy):
    folder = tiny_copy / "captchas"
    for i in range(120):
        label = "".join("0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZ"[(i * 5 + j * 11) % 36] for j in range(4))
        (folder / f"{label}_{i}.png").parent.mkdir(exist_ok=True)
        (folder / f"{label}_{i}.png").write_bytes(encode(label, 1000 + i))  # LABEL_n.png naming
    sources = {"data/manifest.parquet": 1, "data/ingest/manifest.parquet": 2}
    (tiny_copy / "pretrained").mkdir()
    shutil.copy(tiny_copy / "models/model.pt", tiny_copy / "pretrained/model.pt")
    write_params(tiny_copy, {"train": {"sources": sources, "init_from": "pretrained/model.pt"}})
    params = load_params("params.yaml")
    ingest(params.data, params.ingest, source=folder)
    summary = train(params, progress=False)
    assert summary["images_seen"] > 240
    metrics = evaluate(params, progress=False)
    assert set(metrics["per_source"]) == {"synthetic", "ingest"}
    assert metrics["per_source"]["synthetic"]["n"] == 60
    assert metrics["n"] == 60 + metrics["per_source"]["ingest"]["n"]


def test_init_from_another_charset_keeps_the_trunk_and_the_shared_rows(tiny_copy):
    import torch

    from pipeline.model import checkpoint
    from pipeline.stages.train import Paths, build

    (tiny_copy / "pretrained").mkdir()
    shutil.copy(tiny_copy / "models/model.pt", tiny_copy / "pretrained/model.pt")
    old = checkpoint.read(tiny_copy / "pretrained/model.pt")
    charset = "0123456789abc"  # digits shared with the pretrained 0-9A-Z, three letters new
    folder = tiny_copy / "site"
    folder.mkdir()
    for i in range(60):
        label = "".join(charset[(i * 7 + j * 3) % len(charset)] for j in range(4))
        (folder / f"{label}_{i}.png").write_bytes(encode(label, 3000 + i))
    write_params(tiny_copy, {"data": {"charset": charset},
                             "ingest": {"source": "site", "case": "keep"},
                             "train": {"init_from": "pretrained/model.pt"}})
    only_ingested = yaml.safe_load(Path("params.yaml").read_text())
    only_ingested["train"]["sources"] = {"data/ingest/manifest.parquet": 1}
    Path("params.yaml").write_text(yaml.safe_dump(only_ingested))
    model = build(load_params("params.yaml"), Paths())
    new = model.state_dict()
    trunk = [k for k in new if "classifier" not in k]
    assert trunk and all(torch.equal(new[k], old["state_dict"][k]) for k in trunk)
    weight = next(k for k in new if k.endswith("classifier.weight"))
    assert new[weight].shape[0] == len(charset) + 1
    assert torch.equal(new[weight][:11], old["state_dict"][weight][:11])  # the blank and 0-9
    assert not any(torch.equal(new[weight][11 + i], old["state_dict"][weight][11 + i]) for i in range(3))
    params = load_params("params.yaml")
    ingest(params.data, params.ingest)
    trained = sum(row["split"] == "train" for row in pq.read_table("data/ingest/manifest.parquet").to_pylist())
    summary = train(params, progress=False)  # one epoch over the ingested captchas alone
    assert summary["images_seen"] == trained and trained > 30
    assert torch.load("models/model.pt", weights_only=True)["charset"] == charset


@pytest.mark.parametrize("override, message", [
    ({"init_from": "models/model.pt"}, "is this stage's own output"),
    ({"init_from": "models/last.pt"}, "is this stage's own output"),
])
def test_init_from_refuses_the_stages_own_outputs(tiny_copy, override, message):

    write_params(tiny_copy, {"train": override})
    with pytest.raises(PipelineError, match=message):
        train(load_params("params.yaml"), progress=False)


def test_init_from_another_arch_is_one_line(tiny_copy):

    (tiny_copy / "pretrained").mkdir()
    shutil.copy(tiny_copy / "models/model.pt", tiny_copy / "pretrained/model.pt")
    write_params(tiny_copy, {"model": {"fast": {"hidden": 32}}, "train": {"init_from": "pretrained/model.pt"}})
    with pytest.raises(PipelineError, match="train.init_from: pretrained/model.pt is arch 'fast'"):
        train(load_params("params.yaml"), progress=False)


def test_tall_images_are_stored_scaled_down_to_max_height(workdir):
    folder = workdir / "big"
    folder.mkdir()
    big = Image.open(io.BytesIO(encode("AB12", 1))).resize((640, 320))
    big.save(folder / "AB12_0.png")
    Image.open(io.BytesIO(encode("CD34", 2))).save(folder / "CD34_0.png")  # 128x64: kept as it is
    write_params(workdir, {"ingest": {"max_height": 64}})
    params = load_params("params.yaml")
    ingest(params.data, params.ingest, source=folder)
    sizes = {s["txt"].decode(): Image.open(io.BytesIO(s["png"])).size
             for shard in (workdir / "data/ingest").rglob("*.tar") for s in iter_tar(shard)}
    assert sizes == {"AB12": (128, 64), "CD34": (128, 64)}


def test_ingested_labels_have_their_own_length_and_charset_bounds(workdir):
    folder = workdir / "long"
    folder.mkdir()
    for i, label in enumerate(["ABCDEFG", "AB12", "ABCDEFGHJ", "AB@1", "AB#1"]):
        (folder / f"{label}_{i}.png").write_bytes(encode(label.replace("@", "A").replace("#", "A"), i))
    # data.max_length (5) and data.charset bound the synthetic labels; ingest's own the ingested ones
    raw = yaml.safe_load(write_params(workdir, {"ingest": {"max_length": 8, "extra_chars": "@A"}}).read_text())
    raw["ingest"]["fractions"] = {"train": 1.0}
    raw["train"]["sources"] = {"data/ingest/manifest.parquet": 1}
    (workdir / "params.yaml").write_text(yaml.safe_dump(raw))
    params = load_params("params.yaml")
    assert params.data.max_length == 5 and params.label_max_length == 8
    assert params.model_charset == params.data.charset + "@"
    with pytest.raises(PipelineError):
        ingest(params.data, params.ingest, source=folder)
    report = json.loads((workdir / "reports/ingest.invalid.json").read_text())
    assert report["invalid"] == [
        {"file": "AB#1_4.png", "reason": "characters not in data.charset + ingest.extra_chars: '#'"},
        {"file": "ABCDEFGHJ_2.png", "reason": "label of 9 characters is longer than ingest.max_length 8"}]
    ingest(params.data, params.ingest, source=folder, skip_invalid=True)
    assert sorted(shard_labels(workdir / "data/ingest").values()) == ["AB12", "AB@1", "ABCDEFG"]
    train(params, progress=False)  # the model is built, and recorded, for both
    saved = torch.load("models/model.pt", weights_only=True)
    assert saved["max_length"] == 8 and saved["charset"] == params.data.charset + "@"
    # the model's width is checked against the longer bound
    write_params(workdir, {"ingest": {"max_length": 30}})
    with pytest.raises(PipelineError, match="model.fast.width: .* labels of 30"):
        load_model_params("params.yaml")


def test_a_plain_csv_giving_one_path_two_labels_or_nothing_is_refused(workdir):
    folder = workdir / "real"
    folder.mkdir()
    for i, label in enumerate(["AB12", "CD34"]):
        (folder / f"{i}.png").write_bytes(encode(label, i))
    (workdir / "labels.csv").write_text("path,label\n0.png,AB12\n1.png,CD34\n0.png,AB13\n")
    write_params(workdir, {"ingest": {"labels": "labels.csv"}})
    params = load_params("params.yaml")
    with pytest.raises(PipelineError, match=r"labels.csv:4: 0.png is labelled 'AB13' here and 'AB12' on line 2"):
        ingest(params.data, params.ingest, source=folder)
    (workdir / "labels.csv").write_text("path,label\n0.png,AB12\n1.png,CD34\n0.png,AB12\n")  # the same twice: fine
    assert ingest(params.data, params.ingest, source=folder)["kept"] == 2
    before = sorted(p.read_bytes() for p in (workdir / "data/ingest").rglob("*.tar"))
    (workdir / "labels.csv").write_text("path,label\n")
    with pytest.raises(PipelineError, match="labels no image of .*left as it was"):
        ingest(params.data, params.ingest, source=folder)
    assert sorted(p.read_bytes() for p in (workdir / "data/ingest").rglob("*.tar")) == before


def test_a_failing_ingest_leaves_the_previous_one_untouched(workdir, monkeypatch):
    """A file named in bytes that are not UTF-8 is one invalid file, found before anything is
    written; and a failure while writing (a full disk) leaves the last ingest's shards and manifest
    as they were, since the new ones are swapped in only once complete."""
    import os

    from pipeline.data import shards as shards_module

    folder = workdir / "captchas"
    folder.mkdir()
    for i, label in enumerate(["AB12", "CD34", "EF56"]):
        (folder / f"{label}_{i}.png").write_bytes(encode(label, i))
    params = load_params("params.yaml")
    ingest(params.data, params.ingest, source=folder)

    def snapshot():
        return {p: p.read_bytes() for p in sorted((workdir / "data/ingest").rglob("*")) if p.is_file()}

    before = snapshot()
    with open(os.path.join(os.fsencode(folder), b"GH78_\xff.png"), "wb") as f:
        f.write(encode("GH78", 9))
    result = CliRunner().invoke(cli, ["ingest", "captchas"])
    assert result.exit_code == 2 and "1 invalid" in result.output
    report = json.loads((workdir / "reports/ingest.invalid.json").read_text())
    assert report["invalid"] == [{"file": "GH78_\\xff.png", "reason": "file name is not UTF-8; rename it"}]
    assert snapshot() == before
    (folder / "IJ90_4.png").write_bytes(encode("IJ90", 4))

    def full_disk(*args, **kwargs):
        raise PipelineError("data/ingest/manifest.parquet: cannot write (No space left on device)")

    monkeypatch.setattr(shards_module, "write_manifest", full_disk)
    with pytest.raises(PipelineError, match="No space left"):
        ingest(params.data, params.ingest, source=folder, skip_invalid=True)
    assert snapshot() == before
    assert not [p for p in (workdir / "data").iterdir() if p.name.startswith(".ingest.new")]


def test_ingest_reads_every_path_the_label_page_writes(tiny_copy, tiny_dataset):
    """Names with leading spaces or backslashes are kept exactly as the page wrote them."""
    from pipeline.tools.label import create_app, open_session

    folder = tiny_copy / "site"
    folder.mkdir()
    names = {" lead.png": "AB12", "a\\b.png": "CD34", "plain.png": "EF56"}
    for i, (name, label) in enumerate(names.items()):
        (folder / name).write_bytes(encode(label, i))
    page = create_app(open_session(folder, tiny_dataset / "models/model.pt", None, who="t")).test_client()
    for name, label in names.items():
        assert page.post("/api/answer", json={"path": name, "label": label}).status_code == 200
    write_params(tiny_copy, {"ingest": {"source": "site", "labels": "site/labels.csv"}})
    params = load_params("params.yaml")
    report = ingest(params.data, params.ingest)
    assert report["invalid"] == [] and report["kept"] == 3
    originals = {row["original"]: row["label"] for row in pq.read_table("data/ingest/manifest.parquet").to_pylist()}
    assert originals == names


def test_a_second_ingest_while_one_runs_says_so(workdir):
    from pipeline.files import folder_lock

    folder = workdir / "captchas"
    folder.mkdir()
    (folder / "AB12_0.png").write_bytes(encode("AB12", 0))
    params = load_params("params.yaml")
    with folder_lock(Path(params.ingest.out), exclusive=True):  # the other ingest, writing
        with pytest.raises(PipelineError, match="data/ingest: another run is writing it; wait for it to end"):
            ingest(params.data, params.ingest, source=folder)
    ingest(params.data, params.ingest, source=folder)
