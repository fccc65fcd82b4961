"""`serve`: a Flask app behind waitress. Uploads are checked before they are decoded, and the
model runs on micro-batches gathered from concurrent requests by one batching thread.
"""
from __future__ import annotations

import json
import logging
import os
import queue
import socket
import threading
import time
from concurrent.futures import Future
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from flask import Flask, g, jsonify, request
from PIL import Image
from werkzeug.exceptions import HTTPException

from pipeline.preprocess import ImageError, decode_image
from pipeline.recognizer import Recognizer

log = logging.getLogger("captcha-crnn.serve")


@dataclass(frozen=True)
class Limits:
    max_bytes: int = 2 * 1024 * 1024  # one request's body
    max_files: int = 64
    max_pixels: int = 4_000_000  # per image, checked from the header before decoding
    max_beam: int = 32


class UploadError(Exception):
    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status


UPLOAD_STATUS = {"unreadable": 415, "format": 415, "too_large": 413, "corrupt": 400}


def open_upload(data: bytes, limits: Limits) -> Image.Image:
    """Bytes from a client -> decoded PIL image, or UploadError with the right status."""
    if not data:
        raise UploadError(400, "empty file")
    try:
        return decode_image(data, limits.max_pixels)
    except ImageError as e:
        raise UploadError(UPLOAD_STATUS[e.kind], str(e).split(" (")[0] if e.kind == "corrupt" else str(e)) from None


class MicroBatcher:
    """Gathers preprocessed images from many request threads into one model call."""

    def __init__(self, recognizer: Recognizer, max_batch: int = 32, max_wait: float = 0.002):
        self.recognizer = recognizer
        self.max_batch = max_batch
        self.max_wait = max_wait
        self._queue: queue.Queue = queue.Queue()
        threading.Thread(target=self._run, daemon=True, name="micro-batcher").start()

    def submit(self, array: np.ndarray, beam: int) -> Future:
        future: Future = Future()
        self._queue.put((array, beam, future))
        return future

    def _run(self) -> None:
        while True:
            items = [self._queue.get()]
            deadline = time.perf_counter() + self.max_wait
            while len(items) < self.max_batch:
                remaining = deadline - time.perf_counter()
                try:
                    items.append(self._queue.get(timeout=remaining) if remaining > 0 else self._queue.get_nowait())
                except queue.Empty:
                    break
            for beam in {beam for _, beam, _ in items}:
                group = [(a, f) for a, b, f in items if b == beam]
                try:
                    preds = self.recognizer.predict_arrays(np.stack([a for a, _ in group]), beam)
                    for (_, future), pred in zip(group, preds):
                        future.set_result(pred)
                except Exception as e:  # noqa: BLE001 - hand any failure to the waiting requests
                    for _, future in group:
                        future.set_exception(e)


def read_metrics(path: Path, model_sha256: str) -> dict | None:
    """The evaluate stage's metrics, if they are this very model's (evaluate records its sha256)."""
    try:
        metrics = json.loads(Path(path).read_text())
    except (OSError, ValueError):
        return None
    return metrics if isinstance(metrics, dict) and metrics.get("model_sha256") == model_sha256 else None


def create_app(recognizer: Recognizer, limits: Limits = Limits(), metrics_path: Path | None = None,
               batcher: MicroBatcher | None = None) -> Flask:
    app = Flask("captcha-crnn", static_folder=None)  # nothing from the disk but the model's answers
    app.config["MAX_CONTENT_LENGTH"] = limits.max_bytes
    batcher = batcher or MicroBatcher(recognizer)

    def error(status: int, message: str):
        response = jsonify({"error": message})
        response.status_code = status
        return response

    @app.errorhandler(HTTPException)
    def http_error(e: HTTPException):
        return error(e.code or 500, e.description or e.name)

    @app.errorhandler(UploadError)
    def upload_error(e: UploadError):
        return error(e.status, str(e))

    @app.before_request
    def start_timer():
        g.started = time.perf_counter()

    @app.after_request
    def log_request(response):
        ms = (time.perf_counter() - g.get("started", time.perf_counter())) * 1e3
        log.info("%s %s %d %.1fms", request.method, request.path, response.status_code, ms)
        return response

    @app.get("/healthz")
    def healthz():
        return {"status": "ok"}

    @app.get("/model")
    def model_info():
        info = recognizer.describe()
        metrics = read_metrics(metrics_path, recognizer.model_sha256) if metrics_path else None
        if metrics:
            info["test_metrics"] = {k: metrics.get(k) for k in ("seq_accuracy", "char_accuracy", "cer", "n")}
        return info

    @app.post("/predict")
    def predict():
        beam = request.args.get("beam", "1")
        if not (beam.isascii() and beam.isdigit()) or not 1 <= int(beam) <= limits.max_beam:
            raise UploadError(400, f"beam must be an integer from 1 to {limits.max_beam}")
        multipart = (request.content_type or "").startswith("multipart/")
        files = request.files.getlist("file") if multipart else []
        if multipart and not files:
            raise UploadError(400, "no multipart field named 'file'")
        if files:
            if len(files) > limits.max_files:
                raise UploadError(413, f"{len(files)} files in one request; at most {limits.max_files}")
            blobs = [f.read() for f in files]
        else:  # the body is the image, whatever its content type (curl --data-binary sends a form type)
            blobs = [request.get_data(cache=False)]
            if not blobs[0]:
                raise UploadError(400, "empty body: send an image as multipart field 'file' or as the body")
        arrays = [recognizer.preprocess(open_upload(b, limits)) for b in blobs]
        futures = [batcher.submit(a, int(beam)) for a in arrays]
        results = [{"text": p.text, "confidence": round(p.confidence, 6)} for p in (f.result() for f in futures)]
        return results[0] if len(files) <= 1 else {"results": results}

    return app


def serve(model: Path, host: str, port: int, workers: int = 1, threads: int = 8, onnx: bool | None = None,
          limits: Limits = Limits(), metrics_path: Path | None = Path("reports/metrics.json")) -> None:
    """Run the app under waitress; with workers > 1, that many processes share one listening socket."""
    import waitress

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(process)d %(message)s")
    sock = socket.create_server((host, port), reuse_port=False)
    children = []
    for _ in range(max(0, workers - 1)):
        pid = os.fork()
        if pid == 0:
            children = []
            break
        children.append(pid)
    # each process loads its own model, after the fork
    recognizer = Recognizer(model, onnx=onnx, threads=max(1, (os.cpu_count() or 1) // max(1, workers)))
    app = create_app(recognizer, limits, metrics_path)
    log.info("serving %s (%s) on http://%s:%d", model, recognizer.backend, host, sock.getsockname()[1])
    try:
        waitress.serve(app, sockets=[sock], threads=threads, ident="captcha-crnn", _quiet=True)
    finally:
        for pid in children:
            os.kill(pid, 15)
