"""`generate` as a whole process against a bare ImageCaptcha loop: what the stage costs beyond the
`captcha` package's own rendering.

Each repeat runs, one after the other in fresh interpreters (interleaved, so drift in the machine's
load hits both alike): a bare loop of `ImageCaptcha.generate_image` on N random 4-character labels
of params.yaml's data size and charset, and `python -m pipeline.stages.generate` with one worker
writing N captchas (params.yaml's data section, with only the split sizes, lengths and workers
changed). Prints the median ratio of the bare loop's seconds to the stage's.

    python -m benchmarks.generate_process [--n 2000] [--repeats 5]
"""
from __future__ import annotations

import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import click

from benchmarks.common import host_kind, write_params
from pipeline.params import read_yaml

BARE_LOOP = """
import random, sys
from captcha.image import ImageCaptcha
n, width, height, charset = int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]), sys.argv[4]
captcha, rng = ImageCaptcha(width=width, height=height), random.Random(0)
for _ in range(n):
    captcha.generate_image("".join(rng.choice(charset) for _ in range(4)))
"""


def seconds(command: list[str], cwd: Path, env: dict) -> float:
    started = time.perf_counter()
    subprocess.run(command, cwd=cwd, env=env, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return time.perf_counter() - started


@click.command(help=__doc__)
@click.option("--n", default=2000, show_default=True, help="captchas per run")
@click.option("--repeats", default=5, show_default=True)
def main(n: int, repeats: int) -> None:
    repo = Path(__file__).resolve().parents[1]
    raw = read_yaml(repo / "params.yaml")
    data = raw["data"]
    data.update(workers=1, shard_size=n, min_length=4, max_length=4, splits={"train": n, "val": 0, "test": 0})
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        write_params(raw, work / "params.yaml")
        (work / "bare.py").write_text(BARE_LOOP)
        env = dict(os.environ, PYTHONPATH=str(repo))
        for _ in range(repeats):
            bare = seconds([sys.executable, "bare.py", str(n), str(data["width"]), str(data["height"]),
                            data["charset"]], work, env)
            stage = seconds([sys.executable, "-m", "pipeline.stages.generate", "--quiet"], work, env)
            shutil.rmtree(work / "data")
            rows.append({"bare_s": round(bare, 2), "generate_s": round(stage, 2), "ratio": round(bare / stage, 3)})
            print(json.dumps(rows[-1]), flush=True)
    print(json.dumps({"date": time.strftime("%Y-%m-%d"), "host": host_kind(), "n": n,
                      "median_ratio": statistics.median(r["ratio"] for r in rows)}))


if __name__ == "__main__":
    main()
