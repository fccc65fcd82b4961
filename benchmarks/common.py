"""What the benchmarks share: params with dotted KEY=VALUE settings, the host's kind, and a real
`serve` process started, waited for and stopped."""
from __future__ import annotations

import contextlib
import json
import os
import shlex
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import click

from pipeline.files import write_text
from pipeline.model.settings import load_model_params
from pipeline.params import dump_yaml, parse_value


def set_dotted(tree: dict, key: str, value) -> None:
    *parents, leaf = key.split(".")
    for name in parents:
        tree = tree.setdefault(name, {})
    tree[leaf] = value


def parse_override(text: str) -> tuple[str, object]:
    """'section.key=value' -> (key, value as params.yaml reads it: YAML 1.2 floats)."""
    key, sep, value = text.partition("=")
    if not sep:
        raise click.BadParameter(f"expected KEY=VALUE, got {text!r}")
    return key, parse_value(value)


def parse_variant(text: str) -> tuple[str, dict]:
    """'NAME KEY=VALUE ...' -> (NAME, {KEY: value}): a variant run beside others."""
    name, *settings = shlex.split(text)
    return name, dict(parse_override(s) for s in settings)


def write_params(raw: dict, path: Path) -> None:
    write_text(path, dump_yaml(raw))
    load_model_params(path)  # validated like any params file


@contextlib.contextmanager
def in_folder(folder: Path):
    """Run the block with `folder` as the working directory (the stages read params.yaml there)."""
    before = os.getcwd()
    os.chdir(folder)
    try:
        yield
    finally:
        os.chdir(before)


def host_kind() -> str:
    """'bf16' where the CPU computes in bf16 natively (avx512_bf16 or AMX), else 'AVX2-only'."""
    import torch

    return "bf16" if torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported() else "AVX2-only"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def get_json(url: str, timeout: float = 5) -> dict:
    with urllib.request.urlopen(url, timeout=timeout) as r:
        return json.loads(r.read())


@contextlib.contextmanager
def serve_process(model: Path, *args: str, seconds: float = 120):
    """`python -m pipeline serve --model MODEL ARGS` on a free port, healthy, as (url, process);
    stopped at the end of the block."""
    port = free_port()
    process = subprocess.Popen([sys.executable, "-m", "pipeline", "serve", "--model", str(model), "--port", str(port),
                                *args], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + seconds
        while True:
            if process.poll() is not None:
                raise SystemExit(f"serve exited with status {process.returncode} before it was healthy")
            try:
                get_json(f"{url}/healthz", timeout=1)
                break
            except OSError:
                if time.monotonic() > deadline:
                    raise SystemExit(f"serve was not healthy within {seconds:.0f} s") from None
                time.sleep(0.2)
        yield url, process
    finally:
        process.terminate()
        process.wait()


def wait_for_model(url: str, sha256: str, seconds: float = 120) -> None:
    """Until serve at `url` answers with the model of this sha256 (after a SIGHUP reload)."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        try:
            if get_json(f"{url}/model")["model_sha256"] == sha256:
                return
        except OSError:
            pass
        time.sleep(0.5)
    raise SystemExit(f"serve did not come up with model {sha256[:12]}")
