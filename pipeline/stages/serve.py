"""`serve`: a Flask app behind waitress, hardened against clients that misbehave.

A request's cost is bounded before work starts: the body by its announced length (kept in memory,
never spooled to disk), images by the pixel counts in their headers, beam search by files x beam.
Requests decode in waitress's threads (large ones one at a time, so small ones never queue behind
them); one batching thread runs the model on micro-batches gathered from concurrent requests, and
each request decodes its own CTC output. Connections are capped in all and per client address,
idle ones are closed, and a request must arrive whole within a deadline. With several workers a
supervisor forks them, replaces any that dies, and they die with it.
"""
from __future__ import annotations

import ctypes
import io
import json
import logging
import os
import queue
import signal
import socket
import sys
import threading
import time
from concurrent.futures import Future
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from flask import Flask, Request, g, jsonify, request
from PIL import Image
from waitress.adjustments import Adjustments
from waitress.channel import HTTPChannel
from waitress.server import TcpWSGIServer
from waitress.task import ErrorTask, ThreadedTaskDispatcher
from werkzeug.exceptions import HTTPException

from pipeline.errors import PipelineError
from pipeline.preprocess import ImageError, load_pixels, open_image
from pipeline.recognizer import Recognizer

log = logging.getLogger("captcha-crnn.serve")


@dataclass(frozen=True)
class Limits:
    max_bytes: int = 2 * 1024 * 1024  # one request's body, refused on its announced length
    max_files: int = 64
    max_pixels: int = 4_000_000  # per image, read from the header before decoding
    max_request_pixels: int = 16_000_000  # all images of one request
    large_request_pixels: int = 1_000_000  # requests above this decode one at a time per process
    max_beam: int = 32
    max_beam_work: int = 256  # files x beam in one request
    max_connections: int = 1000  # per process
    max_connections_per_client: int = 64  # per client IP address
    idle_timeout: int = 15  # seconds a kept-alive connection may wait for its next request
    request_timeout: int = 10  # seconds from a request's first byte to its last


class UploadError(Exception):
    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status


UPLOAD_STATUS = {"unreadable": 415, "format": 415, "too_large": 413, "corrupt": 400}


def open_upload(data: bytes, limits: Limits) -> Image.Image:
    """Bytes from a client -> PIL image with its header checked, not yet decoded."""
    if not data:
        raise UploadError(400, "empty file")
    try:
        return open_image(data, limits.max_pixels)
    except ImageError as e:
        raise UploadError(UPLOAD_STATUS[e.kind], str(e)) from None


def decode_upload(image: Image.Image) -> Image.Image:
    try:
        return load_pixels(image)
    except ImageError as e:
        raise UploadError(UPLOAD_STATUS[e.kind], str(e).split(" (")[0]) from None


class MicroBatcher:
    """Gathers preprocessed images from many request threads into one model call. Greedy requests
    get their Prediction (decoded here, batched: cheap); beam-search requests get their (T, classes)
    probabilities, for their own thread to decode, so a wide beam never holds up the batch."""

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
            try:
                probs = self.recognizer.probs(np.stack([a for a, _, _ in items]))
                greedy = [i for i, (_, beam, _) in enumerate(items) if beam == 1]
                answers = list(probs)
                for i, prediction in zip(greedy, self.recognizer.decode(probs[greedy]) if greedy else []):
                    answers[i] = prediction
                for (_, _, future), answer in zip(items, answers):
                    future.set_result(answer)
            except Exception as e:  # noqa: BLE001 - hand any failure to the waiting requests
                for _, _, future in items:
                    future.set_exception(e)


class InMemoryRequest(Request):
    """Multipart files stay in memory (werkzeug spools those over 500 KB to a temporary file);
    the body's size is capped before it is read."""

    def _get_file_stream(self, total_content_length, content_type, filename=None, content_length=None):
        return io.BytesIO()


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
    app.request_class = InMemoryRequest
    app.config["MAX_CONTENT_LENGTH"] = limits.max_bytes
    batcher = batcher or MicroBatcher(recognizer)
    large_requests = threading.Lock()

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
        beam = int(beam)
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
        if len(blobs) * beam > limits.max_beam_work:
            raise UploadError(413, f"{len(blobs)} files at beam {beam}: files x beam is at most {limits.max_beam_work}")
        images = [open_upload(b, limits) for b in blobs]
        pixels = sum(im.width * im.height for im in images)
        if pixels > limits.max_request_pixels:
            raise UploadError(413, f"{pixels} pixels in one request; at most {limits.max_request_pixels}")
        with large_requests if pixels > limits.large_request_pixels else nullcontext():
            arrays = [recognizer.preprocess(decode_upload(im)) for im in images]
        answers = [f.result() for f in [batcher.submit(a, beam) for a in arrays]]
        predictions = answers if beam == 1 else recognizer.decode(np.stack(answers), beam)
        results = [{"text": p.text, "confidence": round(p.confidence, 6)} for p in predictions]
        return results[0] if len(files) <= 1 else {"results": results}

    return app


# -- the HTTP server ---------------------------------------------------------------------------

class JsonErrorTask(ErrorTask):
    """waitress's own refusals (body too large, bad request line) as JSON, like the app's."""

    def execute(self):
        e = self.request.error
        body = json.dumps({"error": f"{e.reason}: {e.body}"}).encode()
        self.status = f"{e.code} {e.reason}"
        self.response_headers.append(("Content-Type", "application/json"))
        self.set_close_on_finish()
        self.content_length = len(body)
        self.write(body)


class GuardedChannel(HTTPChannel):
    """A connection that remembers when its request in progress began arriving."""

    error_task_class = JsonErrorTask
    reading_since: float | None = None

    def received(self, data):
        if self.request is None and data and self.reading_since is None:
            self.reading_since = time.time()
        result = super().received(data)
        if self.request is None:
            self.reading_since = None
        return result


class GuardedServer(TcpWSGIServer):
    """waitress's server, plus a cap on connections per client address and a deadline for a
    request to arrive whole (a client trickling a byte at a time never counts as idle)."""

    channel_class = GuardedChannel

    def __init__(self, *args, per_client: int, request_timeout: float, **kwargs):
        self.per_client = per_client
        self.request_timeout = request_timeout
        super().__init__(*args, **kwargs)

    def handle_accept(self):
        try:
            accepted = self.accept()
        except OSError:
            return
        if accepted is None:
            return
        conn, addr = accepted
        client = addr[0]
        if sum(1 for ch in self.active_channels.values() if ch.addr[0] == client) >= self.per_client:
            log.warning("refused a connection from %s: %d open already", client, self.per_client)
            conn.close()
            return
        self.channel_class(self, conn, addr, self.adj, map=self._map)

    def maintenance(self, now):
        super().maintenance(now)  # closes connections idle for longer than channel_timeout
        cutoff = now - self.request_timeout
        for channel in list(self.active_channels.values()):
            if channel.reading_since is not None and channel.reading_since < cutoff:
                channel.will_close = True


def listen(host: str, port: int) -> socket.socket:
    try:
        return socket.create_server((host, port))
    except OSError as e:
        raise PipelineError(f"serve: cannot listen on {host}:{port}: {e.strerror or e}") from None


def make_server(app: Flask, sock: socket.socket, threads: int, limits: Limits) -> GuardedServer:
    adj = Adjustments(
        sockets=[sock], threads=threads, ident="captcha-crnn",
        connection_limit=limits.max_connections, channel_timeout=limits.idle_timeout, cleanup_interval=1,
        max_request_body_size=limits.max_bytes + 1,  # waitress refuses at >= its value
        inbuf_overflow=limits.max_bytes + 65536,  # bodies stay in memory, never spooled to disk
        max_request_header_size=65536, asyncore_use_poll=True)
    dispatcher = ThreadedTaskDispatcher()
    dispatcher.set_thread_count(threads)
    return GuardedServer(app, {}, _sock=sock, dispatcher=dispatcher, adj=adj, bind_socket=False,
                         sockinfo=(sock.family, sock.type, sock.proto, sock.getsockname()),
                         per_client=limits.max_connections_per_client, request_timeout=limits.request_timeout)


def serve_worker(sock: socket.socket, model: Path, threads: int, onnx: bool | None, limits: Limits,
                 metrics_path: Path | None, torch_threads: int) -> None:
    recognizer = Recognizer(model, onnx=onnx, threads=torch_threads)
    app = create_app(recognizer, limits, metrics_path)
    log.info("serving %s (%s) on http://%s:%d", model, recognizer.backend, *sock.getsockname()[:2])
    make_server(app, sock, threads, limits).run()


def die_with_parent() -> None:
    """Ask Linux to SIGTERM this process when its parent dies, even by SIGKILL."""
    parent = os.getppid()
    try:
        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass  # not Linux: the supervisor's SIGTERM still stops the workers
    if os.getppid() != parent:
        os._exit(0)


def supervise(workers: int, start_worker, quick_failure_s: float = 10.0) -> None:
    """Fork `workers` processes running start_worker(); replace any that exits, stop them all on
    SIGTERM/SIGINT. A worker that fails at start-up (exit 2, a config error it has printed) stops all."""
    children: dict[int, float] = {}
    stopping = False

    def stop(*_):
        nonlocal stopping
        stopping = True
        for pid in list(children):
            try:
                os.kill(pid, signal.SIGTERM)
            except ProcessLookupError:
                pass

    def spawn():
        pid = os.fork()
        if pid == 0:
            signal.signal(signal.SIGTERM, signal.SIG_DFL)
            signal.signal(signal.SIGINT, signal.SIG_DFL)
            die_with_parent()
            code = 1
            try:
                start_worker()
                code = 0
            except PipelineError as e:
                print(f"error: {e}", file=sys.stderr)
                code = 2
            finally:
                sys.stderr.flush()
                os._exit(code)
        children[pid] = time.monotonic()

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    for _ in range(workers):
        spawn()
    failed_at_start = False
    while children:
        try:
            pid, status = os.wait()
        except ChildProcessError:
            break
        started = children.pop(pid, None)
        if started is None or stopping:
            continue
        code = os.waitstatus_to_exitcode(status)
        if code == 2 and time.monotonic() - started < quick_failure_s:
            failed_at_start = True
            stop()
            continue
        log.warning("worker %d exited (%s); starting another", pid, code)
        time.sleep(0.5)  # a worker that keeps crashing must not spin the machine
        spawn()
    if failed_at_start:
        sys.exit(2)


def default_workers() -> int:
    """One process per core (measured fastest on 2 cores: README), at most 8."""
    return max(1, min(8, os.cpu_count() or 1))


def serve(model: Path, host: str, port: int, workers: int | None = None, threads: int = 16,
          onnx: bool | None = None, limits: Limits = Limits(),
          metrics_path: Path | None = Path("reports/metrics.json")) -> None:
    """Listen on host:port; one process serves, or a supervisor keeps `workers` processes serving
    the one listening socket (each loads its own model after the fork)."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(process)d %(message)s")
    workers = workers or default_workers()
    if not Path(model).is_file():
        raise PipelineError(f"{model}: checkpoint not found")
    sock = listen(host, port)
    torch_threads = max(1, (os.cpu_count() or 1) // workers)

    def start_worker():
        serve_worker(sock, model, threads, onnx, limits, metrics_path, torch_threads)

    if workers == 1:
        start_worker()
    else:
        supervise(workers, start_worker)
