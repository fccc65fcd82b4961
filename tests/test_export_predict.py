from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from pipeline.__main__ import cli
from pipeline.data.shards import iter_tar
from pipeline.params import load_params
from pipeline.read.recognizer import Recognizer
from pipeline.stages.export import export
from tests.conftest import write_params


def test_onnx_export_parity_and_automatic_choice(tiny_copy):
    result = export(load_params("params.yaml"))
    assert result["text_mismatches"] == 0 and result["max_abs_logit_diff"] < 1e-3
    onnx_rec = Recognizer("models/model.pt")
    assert onnx_rec.backend == "onnxruntime"  # exported from this checkpoint: picked automatically
    torch_rec = Recognizer("models/model.pt", onnx=False)
    images = [s["png"] for s in iter_tar(next((tiny_copy / "data/shards/test").glob("*.tar")))][:20]
    batch = torch_rec.preprocess.batch(images)
    assert np.abs(onnx_rec.probs(batch) - torch_rec.probs(batch)).max() < 1e-4
    assert [p.text for p in onnx_rec.predict(images)] == [p.text for p in torch_rec.predict(images)]
    # a retrained checkpoint no longer matches the export: torch is used
    (tiny_copy / "models/model.pt").write_bytes((tiny_copy / "models/last.pt").read_bytes())
    assert Recognizer("models/model.pt").backend == "torch"


def test_predict_folder_with_a_corrupt_file(tiny_copy):
    folder = tiny_copy / "imgs"
    folder.mkdir()
    samples = list(iter_tar(next((tiny_copy / "data/shards/test").glob("*.tar"))))[:5]
    for s in samples:
        (folder / f"{s['__key__']}.png").write_bytes(s["png"])
    (folder / "broken.png").write_bytes(samples[0]["png"][:100])
    (folder / "notes.txt").write_text("not an image, and not listed: wrong extension")
    result = CliRunner().invoke(cli, ["predict", "--torch", str(folder), "--beam", "3"])
    assert result.exit_code == 1
    lines = [json.loads(line) for line in result.stdout.splitlines()]
    assert len(lines) == 6
    errors = [x for x in lines if "error" in x]
    assert [e["path"].endswith("broken.png") for e in errors] == [True]
    good = [x for x in lines if "error" not in x]
    assert all(set(x) == {"path", "text", "confidence"} and 0 <= x["confidence"] <= 1 for x in good)


def test_evaluate_errors_name_the_evaluate_keys(tiny_copy):
    write_params(tiny_copy, {"evaluate": {"precision": "fp16"}})
    result = CliRunner().invoke(cli, ["evaluate", "--quiet"])
    assert result.exit_code == 2
    assert result.output.strip() == "error: evaluate.precision: fp16 is for CUDA; use bf16 or fp32 on CPU"
    assert not (tiny_copy / "reports/metrics.json").exists()


@pytest.mark.parametrize("make, message", [
    (lambda: {"format": 1, "arch": "fast"}, "checkpoint lacks settings"),
    (lambda: __import__("collections").OrderedDict(a=1), "not a captcha-crnn checkpoint"),
])
def test_bad_checkpoints_are_one_line(tmp_path, make, message):
    import torch

    path = tmp_path / "bad.pt"
    torch.save(make(), path)
    result = CliRunner().invoke(cli, ["predict", "--model", str(path), str(path)])
    assert result.exit_code == 2 and message in result.output and len(result.output.strip().splitlines()) == 1


class Payload:
    def __reduce__(self):
        return (print, ("this ran while loading",))


def test_a_checkpoint_that_would_run_code_is_refused_in_one_line(tmp_path):
    import torch

    path = tmp_path / "evil.pt"
    torch.save({"format": 1, "payload": Payload()}, path)
    result = CliRunner().invoke(cli, ["predict", "--model", str(path), str(path)])
    assert result.exit_code == 2 and "this ran" not in result.output
    assert result.output.strip().splitlines() == [
        f"error: {path}: refused: it holds objects other than tensors and plain data, which could run code "
        f"when loaded; not a captcha-crnn checkpoint"]


def test_evaluate_scores_another_model_or_a_labelled_folder_and_writes_nothing(tiny_copy):
    from pipeline.data.captcha_style import Renderer

    before = {p: p.read_bytes() for p in Path("reports").rglob("*") if p.is_file()}
    result = CliRunner().invoke(cli, ["evaluate", "--quiet", "--model", "models/last.pt"])
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["n"] == 60
    site = Path("site")
    site.mkdir()
    renderer = Renderer(128, 64)
    labels = ["AB12", "CD34", "EF56"]
    for i, label in enumerate(labels):
        renderer.image(label, 7000 + i).save(site / f"shot{i}.png")
    (site / "labels.csv").write_text("path,label\n" + "".join(f"shot{i}.png,{t.lower()}\n" for i, t in enumerate(labels)))
    result = CliRunner().invoke(cli, ["evaluate", "--folder", "site", "--case", "upper"])
    assert result.exit_code == 0, result.output
    metrics = json.loads(result.stdout)
    assert metrics["n"] == 3 and metrics["folder"] == "site" and metrics["model"] == "models/model.pt"
    assert {p: p.read_bytes() for p in Path("reports").rglob("*") if p.is_file()} == before
    result = CliRunner().invoke(cli, ["evaluate", "--folder", "nowhere"])
    assert result.exit_code == 2 and result.output.strip() == "error: nowhere: folder not found"


def test_predict_names_every_file_it_cannot_read_and_never_hangs(tiny_copy):
    """FIFOs, links to devices, dangling and looping links, files over the size limit: each one JSON
    error line (in a folder and given by name), exit status 1, nothing read whole."""
    import os

    folder = tiny_copy / "odd"
    folder.mkdir()
    good = next(iter(iter_tar(next((tiny_copy / "data/shards/test").glob("*.tar")))))["png"]
    (folder / "good.png").write_bytes(good)
    os.mkfifo(folder / "fifo.png")
    (folder / "zero.png").symlink_to("/dev/zero")
    (folder / "dangling.png").symlink_to(folder / "missing.png")
    (folder / "loop.png").symlink_to(folder / "loop.png")
    with open(folder / "huge.png", "wb") as f:
        f.truncate(3 * 2**30)  # sparse: 3 GB announced, nothing on disk
    for args in ([str(folder)], [str(folder / name) for name in sorted(os.listdir(folder))]):
        result = CliRunner().invoke(cli, ["predict", "--torch", *args])
        assert result.exit_code == 1, result.output
        lines = {Path(x["path"]).name: x for x in map(json.loads, result.stdout.splitlines())}
        assert set(lines) == {"good.png", "fifo.png", "zero.png", "dangling.png", "loop.png", "huge.png"}
        assert "text" in lines["good.png"]
        assert "not a regular file" in lines["fifo.png"]["error"] and "not a regular file" in lines["zero.png"]["error"]
        assert "No such file" in lines["dangling.png"]["error"] and "symbolic links" in lines["loop.png"]["error"]
        assert "over the limit" in lines["huge.png"]["error"]


def test_predict_holds_one_large_image_at_a_time(tiny_copy, tmp_path):
    """Memory grows with the batch's model inputs, not with the images: 12 images of 4000x4000
    pixels (16 MB each decoded) cost predict about what one costs."""
    import subprocess
    import sys

    from PIL import Image

    from tests.conftest import REPO

    big = tmp_path / "big"
    big.mkdir()
    for i in range(12):
        Image.new("L", (4000, 4000), 255 - i).save(big / f"{i:02d}.png")

    def peak_rss_mb(*paths) -> float:
        # the high-water mark of this process image (ru_maxrss would start at the forking parent's)
        code = ("import sys; from pipeline.__main__ import main; sys.argv = ['x', 'predict', *sys.argv[1:]];"
                "\ntry: main()\nexcept SystemExit: pass"
                "\nprint([l.split()[1] for l in open('/proc/self/status') if l.startswith('VmHWM')][0], file=sys.stderr)")
        result = subprocess.run([sys.executable, "-c", code, "--model", "models/model.pt", "--torch", *map(str, paths)],
                                cwd=tiny_copy, env={**__import__("os").environ, "PYTHONPATH": str(REPO)},
                                capture_output=True, text=True, timeout=300)
        assert result.stdout.count("\n") == len(paths), result.stderr
        return int(result.stderr.strip().splitlines()[-1]) / 1024

    one, twelve = peak_rss_mb(big / "00.png"), peak_rss_mb(*sorted(big.iterdir()))
    assert twelve - one < 60, (one, twelve)
