"""Bad data inside shards and manifests, and disk and permission faults: each stops its stage
with one line naming the shard, sample, manifest or file (exit 2), never a worker traceback."""
from __future__ import annotations

import os
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import yaml
from click.testing import CliRunner

from pipeline.__main__ import cli
from pipeline.data.shards import Sample, iter_tar, write_shard
from tests.conftest import write_params

SHARD = Path("data/shards/train/train-000000.tar")


def run(*args):
    result = CliRunner().invoke(cli, [*args])
    lines = result.output.strip().splitlines()
    return result.exit_code, lines


def one_line_error(*args) -> str:
    code, lines = run(*args)
    assert code == 2 and len(lines) == 1 and lines[0].startswith("error: "), lines
    return lines[0]


@pytest.fixture
def data(tiny_copy):
    """The tiny dataset's copy as working directory; training streams through one loader worker,
    so errors cross the worker boundary as they do with the shipped params."""
    write_params(Path("."), {"train": {"workers": 1, "epochs": 1}, "evaluate": {"workers": 1}})
    return Path(".")


def rewrite_first_sample(shard: Path, **changes) -> str:
    samples = [Sample(s["__key__"], s["png"], s["txt"].decode(), {}) for s in iter_tar(shard)]
    samples[0] = Sample(**{**samples[0].__dict__, **changes})
    write_shard(shard, samples)
    return samples[0].key


def test_truncated_shard(data):
    blob = SHARD.read_bytes()
    SHARD.write_bytes(blob[: len(blob) // 2 + 100])
    assert one_line_error("train", "--quiet").startswith(f"error: {SHARD}: unreadable shard")


def test_missing_shard(data):
    SHARD.unlink()
    assert one_line_error("train", "--quiet") == f"error: {SHARD}: shard listed in data/manifest.parquet not found"


def test_zeroed_png_inside_a_valid_shard(data):
    key = rewrite_first_sample(SHARD, png=bytes(400))
    line = one_line_error("train", "--quiet")
    assert line.startswith(f"error: {SHARD}: sample {key}: ") and "image" in line


def test_label_outside_the_charset(data):
    key = rewrite_first_sample(SHARD, label="AB!k")
    line = one_line_error("train", "--quiet")
    assert line == f"error: {SHARD}: sample {key}: label 'AB!k' has characters not in the charset: '!k'"


def test_manifest_listing_a_shard_twice(data):
    table = pq.read_table("data/manifest.parquet")
    shards = table["shard"].to_pylist()
    other = sorted(set(s for s in shards if "/train/" in s))
    doubled = [other[0] if s == other[1] else s for s in shards]  # shard 1's rows now say shard 0
    pq.write_table(table.set_column(table.schema.get_field_index("shard"), "shard", pa.array(doubled)),
                   "data/manifest.parquet")
    line = one_line_error("train", "--quiet")
    assert "shard positions listed more than once" in line and "rebuild the manifest" in line


def test_evaluate_warns_of_a_checkpoint_whose_charset_differs(data):
    params = yaml.safe_load(Path("params.yaml").read_text())
    params["data"]["charset"] = params["data"]["charset"][::-1]  # the same characters, another order
    Path("params.yaml").write_text(yaml.safe_dump(params))
    code, lines = run("evaluate", "--quiet")
    assert code == 0
    assert any(line.startswith("warning: models/model.pt reads the charset") for line in lines), lines


# -- disk and permission faults: simulated where files are opened for writing, since the tests
# may run as root, whom file permissions do not stop ------------------------------------------

@pytest.fixture
def unwritable(monkeypatch):
    """unwritable(folder, errno): writing a file under `folder` fails as a read-only or full disk does."""
    import builtins
    import errno as errnos

    import pipeline.files

    def make(folder: str, code: int = errnos.EACCES):
        def guarded_open(path, mode="r", *args, **kwargs):
            if any(c in mode for c in "wa+") and Path(path).resolve().is_relative_to(Path(folder).resolve()):
                raise OSError(code, os.strerror(code), str(path))
            return builtins.open(path, mode, *args, **kwargs)

        monkeypatch.setattr(pipeline.files, "open", guarded_open, raising=False)

    return make


def test_train_checks_that_models_is_writable_before_training(data, unwritable):
    unwritable("models")
    assert one_line_error("train", "--quiet") == "error: models: cannot write (Permission denied)"


def test_generate_into_a_read_only_folder_keeps_the_manifest(data, unwritable):
    before = Path("data/manifest.parquet").read_bytes()
    unwritable("data/shards")
    assert one_line_error("generate", "--quiet").startswith("error: data/shards")
    assert Path("data/manifest.parquet").read_bytes() == before
    unwritable("data")
    assert one_line_error("generate", "--quiet") == "error: data/.shards.lock: cannot write (Permission denied)"


def test_a_full_disk_is_one_line(data, unwritable):
    import errno

    unwritable("reports", errno.ENOSPC)
    for command in ("evaluate", "export"):
        assert one_line_error(command) == "error: reports: cannot write (No space left on device)"


def test_a_write_that_fails_midway_leaves_nothing_half_written(tmp_path, monkeypatch):
    import errno

    from pipeline.errors import PipelineError
    from pipeline.files import write_json

    def fill(f):
        f.write(b"{")
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    import pipeline.files

    with pytest.raises(PipelineError, match=r"out.json: cannot write \(No space left on device\)"):
        pipeline.files.atomic_write(tmp_path / "out.json", fill)
    assert list(tmp_path.iterdir()) == []
    write_json(tmp_path / "out.json", {"a": 1})
    assert [p.name for p in tmp_path.iterdir()] == ["out.json"]
