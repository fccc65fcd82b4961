"""What several test modules use: captcha images, a stand-in recognizer, and serve or label
processes started and waited for."""
from __future__ import annotations

import io
import socket
import subprocess
import sys
import threading
import time
import urllib.request

import numpy as np

from pipeline.data.captcha_style import Renderer

RENDER = Renderer(128, 64)


def captcha_png(text: str, seed: int) -> bytes:
    """A captcha of the default style, as generate writes it."""
    return RENDER.png(text, seed)


def encode(text: str, seed: int, fmt: str = "PNG", mode: str | None = None) -> bytes:
    """A captcha saved in another format or mode, as a site might serve it."""
    image = RENDER.image(text, seed)
    if mode:
        image = image.convert(mode)
    out = io.BytesIO()
    image.save(out, format=fmt, **({"lossless": True} if fmt == "WEBP" else {}))
    return out.getvalue()


class EchoRecognizer:
    """Answers with a digest of each image's pixels, so any mix-up between requests shows."""

    model_sha256 = "echo"

    def __init__(self, preprocess):
        self.preprocess = preprocess
        self.batch_sizes = []
        self.decoding_threads = set()

    def probs(self, batch):
        self.batch_sizes.append(len(batch))
        return np.array([[[float(a.sum())]] for a in batch])

    def decode(self, probs, beam=1, allowed=None, case=None):
        from pipeline.read.recognizer import Prediction

        self.decoding_threads.add(threading.current_thread().name)
        return [Prediction(f"{p[0, 0]:.3f}", 1.0) for p in probs]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for(condition, seconds: float = 20) -> bool:
    """Poll `condition` until it holds (True) or the time is up (False); errors count as not yet."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        try:
            if condition():
                return True
        except OSError:
            pass
        time.sleep(0.1)
    return False


def answers(url: str) -> bool:
    with urllib.request.urlopen(url, timeout=1) as r:
        return r.status == 200


def start_serve(model, port, *args):
    return subprocess.Popen([sys.executable, "-m", "pipeline", "serve", "--model", str(model),
                             "--port", str(port), *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE)


def wait_healthy(port: int, proc, seconds: float = 60) -> None:
    def up() -> bool:
        assert proc.poll() is None, proc.stderr.read().decode()
        return answers(f"http://127.0.0.1:{port}/healthz")

    assert wait_for(up, seconds), "server did not come up"


TOKEN = "a-token-of-at-least-16"  # serve --feedback-token in the feedback tests


def feedback(client, captcha_id, correct, token=TOKEN):
    """POST /feedback through a Flask test client, with the token when one is given."""
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    return client.post("/feedback", json={"id": captcha_id, "correct": correct}, headers=headers)
