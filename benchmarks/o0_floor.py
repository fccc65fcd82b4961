"""How separable are O and 0 in the default style at all? The floor under the default task's errors.

Captchas are rendered exactly as `generate` renders them (the `captcha` package, params.yaml's
size, fonts and font sizes; label and rendering from independent seeds), but every character is
O or 0, drawn uniformly. A small CNN learns to tell, at each of the four positions, which one it
is, until its val error stops falling; it reads the captcha either as rendered (128 x 64, gray) or
as the default model does (the default model's preprocessing: 32 x 96, squashed). Its error on
test captchas of their own seeds is the floor: how often even a model that sees nothing but O and
0, trained on as many as it needs, confuses the two. For the default task, where a character is O
or 0 with probability 2/36, a per-character O/0 error e caps 4-character full-sequence accuracy
near (1 - 2e/36)^4 (the other 34 characters assumed read perfectly).

    python -m benchmarks.o0_floor [--train 40000] [--epochs 8]
"""
from __future__ import annotations

import json
import multiprocessing
import os
import random
import time
from pathlib import Path

import click
import numpy as np
import torch
from torch import nn

from benchmarks.common import host_kind
from pipeline.data.captcha_style import Renderer
from pipeline.data.seeds import derive_seed
from pipeline.files import write_json
from pipeline.model.preprocess import Preprocess
from pipeline.model.settings import load_model_params

PAIR = "O0"


def sample(args) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(rendered gray 64 x 128, as the model reads it, the 4 bits: 1 where the character is 0)."""
    data, split, i, model_input = args
    rng = random.Random(derive_seed(data.seed, "o0-floor", split, i, "label"))
    label = "".join(rng.choice(PAIR) for _ in range(4))
    image = Renderer.from_params(data).image(label, derive_seed(data.seed, "o0-floor", split, i, "render"))
    rendered = np.asarray(image.convert("L"), dtype=np.uint8)[None]  # as float32 when a batch is made
    return rendered, model_input(image).astype(np.float16), np.array([c == "0" for c in label], dtype=np.float32)


def render(data, split: str, n: int, model_input) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    jobs = [(data, split, i, model_input) for i in range(n)]
    with multiprocessing.get_context("fork").Pool(os.cpu_count()) as pool:
        parts = pool.map(sample, jobs, chunksize=256)
    return tuple(torch.from_numpy(np.stack(p)) for p in zip(*parts))


class PositionClassifier(nn.Module):
    """Convolutions, pooled to 8 columns, then one logit per character position."""

    def __init__(self, channels: int = 1):
        super().__init__()

        def block(c_in, c_out):
            return [nn.Conv2d(c_in, c_out, 3, padding=1, bias=False), nn.BatchNorm2d(c_out), nn.ReLU()]

        self.features = nn.Sequential(*block(channels, 16), nn.MaxPool2d(2), *block(16, 32), nn.MaxPool2d(2),
                                      *block(32, 64), *block(64, 64), nn.AdaptiveAvgPool2d((1, 8)))
        self.head = nn.Linear(64 * 8, 4)

    def forward(self, x):
        if x.dtype == torch.uint8:  # rendered pixels, normalised as the model's inputs are
            x = (x.float() / 255 - 0.5) / 0.5
        return self.head(self.features(x.float()).flatten(1))


def fit(train_x, train_y, val_x, val_y, epochs: int, seed: int) -> tuple[nn.Module, list[dict]]:
    torch.manual_seed(seed)
    model = PositionClassifier()
    steps = epochs * (len(train_x) // 128)
    optimizer = torch.optim.AdamW(model.parameters(), lr=2e-3, weight_decay=1e-4)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=2e-3, total_steps=steps)
    history, best, best_state = [], 1.0, None
    for epoch in range(epochs):
        model.train()
        order = torch.randperm(len(train_x))
        for start in range(0, len(order) - 127, 128):
            idx = order[start:start + 128]
            loss = nn.functional.binary_cross_entropy_with_logits(model(train_x[idx]), train_y[idx])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            schedule.step()
        error = char_error(model, val_x, val_y)
        history.append({"epoch": epoch + 1, "train_loss": round(loss.item(), 5), "val_char_error": error})
        print(json.dumps(history[-1]), flush=True)
        if error <= best:
            best, best_state = error, {k: v.clone() for k, v in model.state_dict().items()}
    model.load_state_dict(best_state)
    return model, history


@torch.inference_mode()
def char_error(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    model.eval()
    wrong = sum(int(((model(x[s:s + 512]) > 0).float() != y[s:s + 512]).sum()) for s in range(0, len(x), 512))
    return wrong / y.numel()


@click.command(help=__doc__)
@click.option("--train", "n_train", default=40_000, show_default=True, help="training captchas")
@click.option("--val", "n_val", default=4_000, show_default=True)
@click.option("--test", "n_test", default=10_000, show_default=True)
@click.option("--epochs", default=8, show_default=True)
@click.option("--params", "params_path", default="params.yaml", show_default=True)
@click.option("--out", type=click.Path(path_type=Path), default=Path("reports/bench/o0_floor.json"), show_default=True)
def main(n_train, n_val, n_test, epochs, params_path, out):
    params = load_model_params(params_path)
    preprocess = Preprocess.of(params.model.settings)
    torch.set_num_threads(os.cpu_count() or 1)
    started = time.perf_counter()
    sets = {split: render(params.data, split, n, preprocess) for split, n in
            (("train", n_train), ("val", n_val), ("test", n_test))}
    report = {"date": time.strftime("%Y-%m-%d"), "host": host_kind(), "train": n_train, "epochs": epochs,
              "render_seconds": round(time.perf_counter() - started, 1), "inputs": {}}
    for index, name in enumerate(("rendered 64x128", f"model input {preprocess.height}x{preprocess.width}")):
        (train_x, train_y), (val_x, val_y), (test_x, test_y) = (
            (s[index], s[2]) for s in (sets["train"], sets["val"], sets["test"]))
        t = time.perf_counter()
        model, history = fit(train_x, train_y, val_x, val_y, epochs, seed=index)
        error = char_error(model, test_x, test_y)
        report["inputs"][name] = {"test_char_error": error, "n_test_chars": test_y.numel(), "history": history,
                                  "seconds": round(time.perf_counter() - t, 1),
                                  "seq_accuracy_cap_default_task": (1 - 2 * error / 36) ** 4}
        print(f"{name}: O/0 error per character {error:.4%}, caps the default task near "
              f"{(1 - 2 * error / 36) ** 4:.2%}", flush=True)
        write_json(out, report)


if __name__ == "__main__":
    main()
