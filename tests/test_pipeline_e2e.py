"""End to end through DVC: in a temporary git repo holding this project's files, with tiny params,
`dvc repro` builds every declared output, and `dvc exp run -S` reruns train and not generate."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from tests.conftest import REPO, TINY, merge

OUTPUTS = ["data/manifest.parquet", "data/shards/train/train-000000.tar", "models/model.pt", "models/last.pt",
           "models/model.onnx", "reports/train.json", "reports/train/history.tsv", "reports/metrics.json",
           "reports/confusion.csv", "reports/errors.png", "reports/export.json"]


def run(args, cwd, env):
    result = subprocess.run(args, cwd=cwd, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, f"{args}\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}"
    return result.stdout + result.stderr


@pytest.fixture(scope="module")
def repo(tmp_path_factory):
    dest = tmp_path_factory.mktemp("e2e") / "repo"
    files = subprocess.run(["git", "ls-files", "-co", "--exclude-standard"], cwd=REPO, capture_output=True,
                           text=True, check=True).stdout.split()
    for name in files:
        if (REPO / name).is_file() and not name.startswith("tests/"):
            (dest / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(REPO / name, dest / name)
    params = yaml.safe_load((REPO / "params.yaml").read_text())
    (dest / "params.yaml").write_text(yaml.safe_dump(merge(params, TINY), sort_keys=False))
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
           "PYTHONPATH": str(dest), "GIT_AUTHOR_NAME": "t", "GIT_AUTHOR_EMAIL": "t@t", "GIT_COMMITTER_NAME": "t",
           "GIT_COMMITTER_EMAIL": "t@t", "DVC_NO_ANALYTICS": "1"}
    run(["git", "init", "-q", "-b", "main"], dest, env)
    run(["git", "add", "-A"], dest, env)
    run(["git", "commit", "-q", "-m", "tiny"], dest, env)
    return dest, env


def dvc(repo, *args):
    dest, env = repo
    return run([sys.executable, "-m", "dvc", *args], dest, env)


def test_repro_then_experiment(repo):
    dest, _ = repo
    dvc(repo, "repro")
    for out in OUTPUTS:
        assert (dest / out).is_file(), out
    metrics = json.loads((dest / "reports/metrics.json").read_text())
    assert {"seq_accuracy", "char_accuracy", "cer", "n", "per_length"} <= set(metrics) and metrics["n"] == 60
    assert "Data and pipelines are up to date" in dvc(repo, "status")
    run(["git", "add", "-A"], dest, repo[1])
    run(["git", "commit", "-q", "-m", "repro"], dest, repo[1])

    # a model change, or a new option of a command that is not a stage, reruns no data stage
    for edited in ("pipeline/model/fast.py", "pipeline/tools/serve.py"):
        original = (dest / edited).read_text()
        (dest / edited).write_text(original + "\n# edited\n")
        changed = {line.rstrip(":") for line in dvc(repo, "status").splitlines() if line and not line[0].isspace()}
        (dest / edited).write_text(original)
        # an architecture reads the teacher too (the teach stage builds its model)
        assert changed == ({"teach", "train", "evaluate", "export"} if "model" in edited
                           else {"Data and pipelines are up to date."}), changed

    log = dvc(repo, "exp", "run", "-S", "train.lr=0.0005")
    assert "Running stage 'train'" in log and "Running stage 'evaluate'" in log
    assert "Running stage 'generate'" not in log
    table = json.loads(dvc(repo, "exp", "show", "--json"))
    found = []
    for commit in table:
        for exp in commit.get("experiments") or []:
            for rev in exp.get("revs", []):
                data = rev.get("data", {})
                lr = data.get("params", {}).get("params.yaml", {}).get("data", {}).get("train", {}).get("lr")
                metrics = data.get("metrics", {}).get("reports/metrics.json", {}).get("data", {})
                found.append((lr, "seq_accuracy" in metrics))
    assert (0.0005, True) in found, found


def test_label_ingest_and_fine_tune_loop(repo):
    """README's loop on a folder of unlabelled captchas: label -> ingest -> fine-tune, through DVC."""
    from pipeline.data.captcha_style import Renderer
    from pipeline.tools.label import open_session

    dest, env = repo
    site = dest / "site"
    site.mkdir()
    renderer = Renderer(128, 64)
    truth = {}
    for i in range(40):
        truth[f"shot{i:03d}.png"] = "".join("0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZ"[(7 * i + 5 * j) % 36] for j in range(4))
        renderer.image(truth[f"shot{i:03d}.png"], 5000 + i).save(site / f"shot{i:03d}.png")
    session = open_session(site, dest / "models/model.pt", None, who="test")
    for item in session.items[:-1]:  # a person answers all but one
        session.answer(item.path, truth[item.path], "labelled")
    shutil.copy(dest / "models/model.pt", dest / "pretrained/model.pt")
    params = yaml.safe_load((dest / "params.yaml").read_text())
    params["train"]["sources"] = {"data/manifest.parquet": 1, "data/ingest/manifest.parquet": 4}
    (dest / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    log = dvc(repo, "exp", "run", "-S", "ingest.source=site", "-S", "ingest.labels=site/labels.csv",
              "-S", "train.init_from=pretrained/model.pt")
    assert "Running stage 'ingest'" in log and "Running stage 'train'" in log
    report = json.loads((dest / "reports/ingest.json").read_text())
    assert report["kept"] == 39 and len(report["unlabelled"]) == 1 and not report["invalid"]
    metrics = json.loads((dest / "reports/metrics.json").read_text())
    assert set(metrics["per_source"]) == {"synthetic", "ingest"}
