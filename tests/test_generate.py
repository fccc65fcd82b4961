from __future__ import annotations

import dataclasses
import os
import tarfile
from collections import Counter
from pathlib import Path

import captcha.image
import pyarrow.parquet as pq
import pytest
import yaml
from click.testing import CliRunner

from pipeline.__main__ import cli
from pipeline.data.shards import Sample, iter_tar, write_shard
from pipeline.model.settings import load_model_params
from pipeline.params import load_params, read_yaml
from pipeline.stages.generate import sample_spec
from tests.conftest import default_params, write_params

SMALL = {"data": {"shard_size": 40, "splits": {"train": 120, "val": 40, "test": 50}}}


def tree_bytes(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def run_generate(folder: Path, override: dict, *args: str):
    write_params(folder, override)
    return CliRunner().invoke(cli, ["generate", "--quiet", "--params", str(folder / "params.yaml"), *args],
                              catch_exceptions=False)


@pytest.mark.parametrize("style", ["captcha", "mixed"])
def test_same_bytes_whatever_the_workers(tmp_path, monkeypatch, style):
    trees = []
    for workers in (1, 2):
        folder = tmp_path / f"w{workers}"
        folder.mkdir()
        monkeypatch.chdir(folder)
        data = {**SMALL["data"], "workers": workers, "style": style, "fonts": captcha.image.DEFAULT_FONTS}
        result = run_generate(folder, {**SMALL, "data": data})
        assert result.exit_code == 0, result.output
        trees.append(tree_bytes(folder / "data"))
    assert trees[0] == trees[1]
    assert "manifest.parquet" in trees[0] and "shards/test/test-000001.tar" in trees[0]


def test_subset_of_shards_then_manifest_gives_the_same_bytes(tmp_path, monkeypatch):
    full, parts = tmp_path / "full", tmp_path / "parts"
    for folder in (full, parts):
        folder.mkdir()
    monkeypatch.chdir(full)
    assert run_generate(full, SMALL).exit_code == 0
    monkeypatch.chdir(parts)
    # 3 + 1 + 2 shards: render them as two "machines" would, in reverse order, then the manifest
    assert run_generate(parts, SMALL, "--shards", "3:").exit_code == 0
    assert not (parts / "data/manifest.parquet").exists()
    assert run_generate(parts, SMALL, "--shards", "0:3").exit_code == 0
    assert run_generate(parts, SMALL, "--manifest-only").exit_code == 0
    assert tree_bytes(full / "data") == tree_bytes(parts / "data")


def test_manifest_matches_shards(tiny_dataset):
    params = load_params(tiny_dataset / "params.yaml")
    table = pq.read_table(tiny_dataset / "data/manifest.parquet").to_pylist()
    required = {"key", "split", "shard", "label", "length", "width", "height", "sha256", "source"}
    assert required <= set(table[0])
    keys = [r["key"] for r in table]
    assert len(keys) == len(set(keys))
    assert Counter(r["split"] for r in table) == {"train": 240, "val": 60, "test": 60}
    import hashlib

    in_shards = {}
    for shard in sorted({r["shard"] for r in table}):
        for s in iter_tar(tiny_dataset / shard):
            assert "." not in s["__key__"]
            in_shards[s["__key__"]] = (shard, s["txt"].decode(), hashlib.sha256(s["png"]).hexdigest())
    assert set(in_shards) == set(keys)
    for r in table:
        assert in_shards[r["key"]] == (r["shard"], r["label"], r["sha256"])
        assert (r["width"], r["height"]) == (params.data.width, params.data.height)
        assert r["source"] == "synthetic"
        assert r["length"] == len(r["label"])


def test_labels_honour_charset_and_lengths_and_are_uniform():
    data = dataclasses.replace(default_params().data, charset="ABCDEFGH0123", min_length=3, max_length=6)
    labels = [sample_spec(data, "train", i)[1] for i in range(6000)]
    assert all(3 <= len(lab) <= 6 and set(lab) <= set(data.charset) for lab in labels)
    lengths = Counter(len(lab) for lab in labels)
    assert set(lengths) == {3, 4, 5, 6}
    # chi-square per position over the labels long enough to have it (df = 11; p=0.001 at 31.3)
    for pos in range(3):
        counts = Counter(lab[pos] for lab in labels)
        expected = sum(counts.values()) / len(data.charset)
        chi2 = sum((counts.get(c, 0) - expected) ** 2 / expected for c in data.charset)
        assert chi2 < 31.3, (pos, chi2)
    chi2_len = sum((n - 1500) ** 2 / 1500 for n in lengths.values())
    assert chi2_len < 16.3  # df = 3, p = 0.001


@pytest.mark.parametrize("override, key", [
    ({"data": {"colour": 1}}, "data.colour"),
    ({"data": {"min_length": 6, "max_length": 4}}, "data.min_length"),
    ({"data": {"charset": ""}}, "data.charset"),
    ({"data": {"charset": "ABCA"}}, "data.charset"),
    ({"data": {"width": 0}}, "data.width"),
    ({"data": {"shard_size": -5}}, "data.shard_size"),
    ({"data": {"splits": {"train": -1}}}, "data.splits.train"),
    ({"data": {"fonts": ["/no/such/font.ttf"]}}, "data.fonts[0]"),
    ({"data": {"charset": "AB\u4e2d"}}, "data.charset"),
    ({"data": {"workers": "two"}}, "data.workers"),
    ({"nonsense": {}}, "nonsense"),
    ({"model": {"fast": {"conv": [16, 32, 64]}}}, "model.fast.conv"),
    ({"model": {"fast": {"channels": 2}}}, "model.fast.channels"),
    ({"model": {"fast": {"hidden": -5}}}, "model.fast.hidden"),
    ({"model": {"fast": {"dropout": 1.5}}}, "model.fast.dropout"),
    ({"model": {"fast": {"width": 24}}, "data": {"max_length": 8}}, "model.fast.width"),
    ({"model": {"crnn": {"height": 64}}}, "model.crnn.height"),
    ({"model": {"arch": "vgg"}}, "model.arch"),
    ({"train": {"sources": {"data/manifest.parquet": 0}}}, "train.sources.data/manifest.parquet"),
    ({"train": {"lr": float("nan")}}, "train.lr"),
    ({"train": {"lr": float("inf")}}, "train.lr"),
    ({"evaluate": {"workers": -1}}, "evaluate.workers"),
    ({"export": {"parity_samples": 0}}, "export.parity_samples"),
    ({"export": {"atol": float("nan")}}, "export.atol"),
    ({"export": {"opset": 99}}, "export.opset"),
    ({"data": {"splits": {"train": 10**21}}}, "data.splits.train"),
    ({"data": {"width": 100000}}, "data.width"),
    ({"data": {"workers": 100000}}, "data.workers"),
    ({"train": {"batch_size": 10**10}}, "train.batch_size"),
    ({"model": {"fast": {"hidden": 10**7}}}, "model.fast.hidden"),
])
def test_bad_params_exit_2_naming_the_key(tmp_path, monkeypatch, override, key):
    monkeypatch.chdir(tmp_path)
    write_params(tmp_path, override)
    # model settings are checked where models are built: by train, never by the data stages
    command = "train" if key.startswith("model.") else "generate"
    result = CliRunner().invoke(cli, [command, "--quiet"])
    assert result.exit_code == 2
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith(f"error: {key}"), result.output
    assert not (tmp_path / "data").exists() and not (tmp_path / "models").exists()


@pytest.mark.parametrize("section, key", [("train", "epochs"), ("data", "seed"), ("model", "fast")])
def test_a_missing_key_is_an_error_not_a_default(tmp_path, monkeypatch, section, key):
    """params.yaml is the only place defaults live: without a key, no stage guesses one."""


    monkeypatch.chdir(tmp_path)
    raw = yaml.safe_load(write_params(tmp_path).read_text())
    del raw[section][key]
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(raw))
    result = CliRunner().invoke(cli, ["train" if section == "model" else "generate", "--quiet"])
    assert result.exit_code == 2
    assert result.output.strip() == f"error: {section}.{key}: missing" + (
        ": the settings of the chosen arch" if section == "model" else
        " (params.yaml gives every key; see the repository's)")


@pytest.mark.parametrize("content, message", [
    (b"data:\n  seed: 1\n  seed: 2\n", 'not valid YAML (found duplicate key "seed"'),
    (b"data:\n  charset: \"\xff\"\n", "not UTF-8 text"),
])
def test_a_bad_params_file_is_one_line_naming_it(tmp_path, monkeypatch, content, message):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "params.yaml").write_bytes(content)
    result = CliRunner().invoke(cli, ["generate", "--quiet"])
    assert result.exit_code == 2 and result.output.startswith(f"error: params.yaml: {message}"), result.output
    assert len(result.output.strip().splitlines()) == 1


def test_interrupted_shard_leaves_nothing_that_looks_finished(tmp_path):
    def samples():
        for i in range(10):
            if i == 5:
                raise KeyboardInterrupt
            yield Sample(f"k{i}", b"\x89PNG fake", "AB", {})

    target = tmp_path / "train" / "train-000000.tar"
    with pytest.raises(KeyboardInterrupt):
        write_shard(target, samples())
    assert list(tmp_path.rglob("*")) == [tmp_path / "train"]


def test_killed_generate_leaves_only_complete_shards(tmp_path):
    """A real process killed mid-run: every .tar present is a complete, readable shard."""
    import os
    import signal
    import subprocess
    import sys
    import time

    write_params(tmp_path, {"data": {"shard_size": 200, "workers": 1, "splits": {"train": 2000, "val": 0, "test": 0}}})
    proc = subprocess.Popen([sys.executable, "-m", "pipeline", "generate", "--quiet"], cwd=tmp_path,
                            stderr=subprocess.DEVNULL)
    shards = tmp_path / "data/shards/train"
    deadline = time.time() + 60
    while time.time() < deadline and not list(shards.glob("*.tar")):
        time.sleep(0.05)
    time.sleep(0.3)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    finished = list(shards.glob("*.tar"))
    assert finished, "no shard was finished before the kill"
    assert len(finished) < 10, "the run finished before it was killed"
    for shard in finished:
        with tarfile.open(shard) as tar:
            assert len(tar.getnames()) == 3 * 200
    assert not (tmp_path / "data/manifest.parquet").exists()


def test_two_runs_never_write_one_folder_and_stale_temp_files_go(tmp_path, monkeypatch):
    """A full run locks data/shards for itself: a second run stops at once, naming the folder.
    Runs of --shards share the folder with each other; the temporary files of killed runs are removed."""
    import subprocess
    import sys

    from pipeline.files import folder_lock

    monkeypatch.chdir(tmp_path)
    write_params(tmp_path, SMALL)
    with folder_lock(tmp_path / "data/shards", exclusive=False):  # a --shards run elsewhere
        result = CliRunner().invoke(cli, ["generate", "--quiet"])
        assert result.exit_code == 2
        assert result.output.strip() == "error: data/shards: another run is writing it; wait for it to end"
        assert CliRunner().invoke(cli, ["generate", "--quiet", "--shards", "0:1"]).exit_code == 0
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True,
                          text=True).stdout.strip()
    stale = tmp_path / f"data/shards/train/.train-000001.tar.tmp-{dead}"
    live = tmp_path / f"data/shards/train/.train-000002.tar.tmp-{os.getpid()}"
    stale.write_bytes(b"half a shard")
    live.write_bytes(b"being written")
    assert CliRunner().invoke(cli, ["generate", "--quiet", "--shards", "0:1"]).exit_code == 0
    assert not stale.exists() and live.exists()  # a live writer's file is left alone
    assert CliRunner().invoke(cli, ["generate", "--quiet"]).exit_code == 0
    assert not list((tmp_path / "data").rglob("*.tmp-*"))


def test_nothing_is_rendered_when_training_reads_no_synthetic_data(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    write_params(tmp_path)
    params = yaml.safe_load(Path("params.yaml").read_text())
    params["train"]["sources"] = {"data/ingest/manifest.parquet": 1}
    Path("params.yaml").write_text(yaml.safe_dump(params))
    result = CliRunner().invoke(cli, ["generate", "--quiet"])
    assert result.exit_code == 0 and "no synthetic data rendered" in result.output
    assert pq.read_table("data/manifest.parquet").num_rows == 0
    assert [p.name for p in Path("data/shards").iterdir()] == ["NOT_RENDERED"]


@pytest.mark.parametrize("name", ["general", "finetune", "student"])
def test_profiles_write_their_keys_and_keep_the_rest(tmp_path, monkeypatch, name):
    import shutil

    from tests.conftest import REPO

    monkeypatch.chdir(tmp_path)
    shutil.copy(REPO / "params.yaml", "params.yaml")
    before = Path("params.yaml").read_text()
    result = CliRunner().invoke(cli, ["profile", name])
    assert result.exit_code == 0, result.output
    params = load_model_params(Path("params.yaml"))
    profile = read_yaml(REPO / "profiles" / f"{name}.yaml")
    assert dict(params.train.sources) == profile["train"]["sources"]
    assert params.model.arch == profile["model"]["arch"] and params.model.settings.keep_aspect is True
    assert "# Grouped by stage" in Path("params.yaml").read_text() != before  # comments kept


@pytest.mark.parametrize("name", ["general", "student"])
def test_a_profile_after_finetune_leaves_none_of_its_trunk_levers(tmp_path, monkeypatch, name):
    """A from-scratch model with the trunk at finetune's fraction of the rate would learn slowly."""
    import shutil

    from tests.conftest import REPO

    monkeypatch.chdir(tmp_path)
    shutil.copy(REPO / "params.yaml", "params.yaml")
    for profile in ("finetune", name):
        assert CliRunner().invoke(cli, ["profile", profile]).exit_code == 0
    train = load_model_params(Path("params.yaml")).train
    assert train.init_from == "" and train.freeze == [] and train.trunk_lr == 1.0


def test_a_bad_profile_changes_nothing(tmp_path, monkeypatch):
    import shutil

    from tests.conftest import REPO

    monkeypatch.chdir(tmp_path)
    shutil.copy(REPO / "params.yaml", "params.yaml")
    before = Path("params.yaml").read_text()
    Path("bad.yaml").write_text("train: {lr: -1.0}\n")
    result = CliRunner().invoke(cli, ["profile", "bad.yaml"])
    assert result.exit_code == 2 and result.output.startswith("error: train.lr")
    Path("bad.yaml").write_text("train: {learning_rate: 1.0}\n")
    result = CliRunner().invoke(cli, ["profile", "bad.yaml"])
    assert result.exit_code == 2 and "train.learning_rate: not a key" in result.output
    assert Path("params.yaml").read_text() == before


@pytest.mark.parametrize("text, message", [
    ("data:\n" + "".join(f"  k{i}: {i}\n" for i in range(20_000)), "section missing"),  # the key check was quadratic
    ("data:\n" + "".join(f"  k{i}: {i}\n" for i in range(300_000)), "bytes; a params file is at most 1,048,576"),
    ("data: " + "[" * 100_000, "nested too deeply"),
])
def test_pathological_params_files_end_in_one_line(tmp_path, monkeypatch, text, message):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "params.yaml").write_text(text)
    result = CliRunner().invoke(cli, ["generate", "--quiet"])
    assert result.exit_code == 2 and message in result.output and len(result.output.strip().splitlines()) == 1


def test_emphasis_draws_its_characters_more_often_in_training_only():
    base = dataclasses.replace(default_params().data, charset="ABCDEFGH0O", min_length=4, max_length=4)
    data = dataclasses.replace(base, emphasis={"O": 4.0, "0": 4.0})
    train = Counter("".join(sample_spec(data, "train", i)[1] for i in range(3000)))
    test = Counter("".join(sample_spec(data, "test", i)[1] for i in range(3000)))
    share = (train["O"] + train["0"]) / sum(train.values())
    assert abs(share - 8 / 16) < 0.03  # weights 4 + 4 of 8 + 8
    assert abs((test["O"] + test["0"]) / sum(test.values()) - 2 / 10) < 0.03
    assert [sample_spec(data, "test", i) for i in range(50)] == [sample_spec(base, "test", i) for i in range(50)]
    assert [sample_spec(data, "train", i) for i in range(50)] != [sample_spec(base, "train", i) for i in range(50)]
