"""The Flask app: POST /predict, GET /healthz, GET /model, and with --keep POST /feedback. A
request's cost is bounded before work starts: the body by its announced length (kept in memory,
never spooled to disk), images by the pixel counts in their headers, beam search by files x beam.
Requests decode in the server's threads (large ones one at a time, so small ones never queue behind
them); one batching thread runs the model on micro-batches gathered from concurrent requests, and
each request decodes its own CTC output."""
from __future__ import annotations

import hmac
import io
import json
import logging
import queue
import threading
import time
from concurrent.futures import Future
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from flask import Flask, Request, g, jsonify, request
from PIL import Image
from werkzeug.exceptions import HTTPException

from pipeline.data.images import ImageError, load_pixels, open_image
from pipeline.errors import PipelineError
from pipeline.read.recognizer import Recognizer
from pipeline.serving.feedback import AlreadyJudged, Keeper, UnknownId
from pipeline.serving.live_model import LiveModel

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
    """Gathers preprocessed images from many request threads into one model call per model (a
    request names the model it started with: a reload mid-request changes nothing for it). Greedy
    requests get their Prediction (decoded here, batched: cheap); the others (beam search,
    `allowed`, `case`) get their (T, classes) probabilities, for their own thread to decode, so a
    wide beam never holds up the batch."""

    def __init__(self, max_batch: int = 32, max_wait: float = 0.002):
        self.max_batch = max_batch
        self.max_wait = max_wait
        self._queue: queue.Queue = queue.Queue()
        threading.Thread(target=self._run, daemon=True, name="micro-batcher").start()

    def submit(self, recognizer: Recognizer, array: np.ndarray, greedy: bool) -> Future:
        """A Prediction when `greedy` (plain best-path decoding), else the image's probabilities."""
        future: Future = Future()
        self._queue.put((recognizer, array, greedy, future))
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
            by_model: dict[int, list] = {}
            for item in items:
                by_model.setdefault(id(item[0]), []).append(item)
            for group in by_model.values():
                self._answer(group[0][0], group)

    @staticmethod
    def _answer(recognizer: Recognizer, items: list) -> None:
        try:
            probs = recognizer.probs(np.stack([a for _, a, _, _ in items]))
            greedy = [i for i, (_, _, plain, _) in enumerate(items) if plain]
            answers = list(probs)
            for i, prediction in zip(greedy, recognizer.decode(probs[greedy]) if greedy else []):
                answers[i] = prediction
            for (*_, future), answer in zip(items, answers):
                future.set_result(answer)
        except Exception as e:  # noqa: BLE001 - hand any failure to the waiting requests
            for *_, future in items:
                future.set_exception(e)


QUERY_KEYS = {"beam", "allowed", "case"}  # as predict's --beam, --allowed, --case


class InMemoryRequest(Request):
    """Multipart files stay in memory (werkzeug spools those over 500 KB to a temporary file);
    the body's size is capped before it is read."""

    def _get_file_stream(self, total_content_length, content_type, filename=None, content_length=None):
        return io.BytesIO()


def json_body(req: Request):
    """The request's JSON, or None when it is none: not JSON, not UTF-8, or nested past Python's
    recursion limit ("[" * 1500 parses to a RecursionError, which is no server fault)."""
    try:
        return json.loads(req.get_data(cache=True))
    except (ValueError, RecursionError):
        return None


def bearer_matches(header: str, token: str) -> bool:
    """`Authorization: Bearer <token>`, the scheme in any case (RFC 9110), compared in constant time."""
    scheme, _, given = header.partition(" ")
    return scheme.lower() == "bearer" and hmac.compare_digest(given.strip().encode("latin-1", "replace"),
                                                              token.encode("latin-1", "replace"))


def check_feedback_token(token: str | None) -> None:
    """A token that could guard nothing (empty) or never match (not visible ASCII: a header arrives
    as latin-1 bytes) is refused at start-up, as a short one is."""
    if token is None:
        return
    if not token:
        raise PipelineError("--feedback-token (or CAPTCHA_CRNN_FEEDBACK_TOKEN) is set but empty: unset it, "
                            "or give at least 16 characters")
    if not all(33 <= ord(c) <= 126 for c in token):
        raise PipelineError("--feedback-token: visible ASCII characters only (no spaces, no accents): an HTTP "
                            "header could never match it")
    if len(token) < 16:
        raise PipelineError("--feedback-token: at least 16 characters (it guards what training learns)")


def read_metrics(path: Path, model_sha256: str) -> dict | None:
    """The evaluate stage's metrics, if they are this very model's (evaluate records its sha256)."""
    try:
        metrics = json.loads(Path(path).read_text())
    except (OSError, ValueError):
        return None
    return metrics if isinstance(metrics, dict) and metrics.get("model_sha256") == model_sha256 else None


def create_app(model: Recognizer | LiveModel, limits: Limits = Limits(), metrics_path: Path | None = None,
               batcher: MicroBatcher | None = None, health=None, keeper: Keeper | None = None,
               feedback_token: str | None = None) -> Flask:
    """`model`: a Recognizer, or a LiveModel that SIGHUP reloads. `health`: what /healthz adds to its
    answer (the supervisor's count of missing workers). `keeper`: keep every answered captcha and
    take the site's verdicts on POST /feedback (with `feedback_token`: only from who holds it)."""
    app = Flask("captcha-crnn", static_folder=None)  # nothing from the disk but the model's answers
    app.request_class = InMemoryRequest
    app.config["MAX_CONTENT_LENGTH"] = limits.max_bytes
    live = model if isinstance(model, LiveModel) else LiveModel(model)
    batcher = batcher or MicroBatcher()
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
        extra = {**(health() if health else {}), **live.health()}
        if keeper:
            extra["kept"] = keeper.budget.stats()
        degraded = extra.get("workers_down") or extra.get("reload_error")
        return {"status": "degraded" if degraded else "ok", **extra}

    @app.get("/model")
    def model_info():
        recognizer = live.current
        info = {**recognizer.describe(), "model_sha256": recognizer.model_sha256}
        metrics = read_metrics(metrics_path, recognizer.model_sha256) if metrics_path else None
        if metrics:
            info["test_metrics"] = {k: metrics.get(k) for k in ("seq_accuracy", "char_accuracy", "cer", "n")}
        return info

    @app.post("/predict")
    def predict():
        recognizer = live.current  # this request's model, whatever a reload does meanwhile
        unknown = sorted(set(request.args) - QUERY_KEYS)
        if unknown:
            raise UploadError(400, f"unknown query key {unknown[0]!r} (known: {', '.join(sorted(QUERY_KEYS))})")
        beam = request.args.get("beam", "1")
        if not (beam.isascii() and beam.isdigit()) or not 1 <= int(beam) <= limits.max_beam:
            raise UploadError(400, f"beam must be an integer from 1 to {limits.max_beam}")
        beam = int(beam)
        allowed, case = request.args.get("allowed") or None, request.args.get("case") or None
        if case not in (None, "upper", "lower"):
            raise UploadError(400, f"case must be upper or lower, got {case[:20]!r}")
        if allowed is not None:
            unknown_chars = recognizer.charset.unknown(allowed[:1000])
            if len(allowed) > 1000 or unknown_chars:
                raise UploadError(400, f"allowed: characters not in the model's charset: {unknown_chars[:50]!r}")
        greedy = beam == 1 and allowed is None and case is None
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
        answers = [f.result() for f in [batcher.submit(recognizer, a, greedy) for a in arrays]]
        predictions = answers if greedy else recognizer.decode(np.stack(answers), beam, allowed, case)
        results = [{"text": p.text, "confidence": round(p.confidence, 6)} for p in predictions]
        if keeper:
            for result, blob, image in zip(results, blobs, images):
                try:
                    captcha_id = keeper.keep(blob, image.format, result["text"], result["confidence"],
                                             recognizer.model_sha256)
                except (OSError, PipelineError) as e:  # a full disk costs the id, not the answer
                    log.warning("--keep: %s", e)
                    continue
                if captcha_id is not None:  # None: larger than the whole budget, not kept
                    result["id"] = captcha_id
        return results[0] if len(files) <= 1 else {"results": results}

    @app.post("/feedback")
    def feedback():
        if keeper is None:
            raise UploadError(404, "feedback needs serve --keep FOLDER")
        if feedback_token is not None and not bearer_matches(request.headers.get("Authorization", ""), feedback_token):
            raise UploadError(401, "feedback needs the header Authorization: Bearer <serve's --feedback-token>")
        body = json_body(request)
        if not (isinstance(body, dict) and isinstance(body.get("id"), str) and isinstance(body.get("correct"), bool)):
            raise UploadError(400, 'expected JSON {"id": "<the id /predict gave>", "correct": true or false}')
        try:
            status = keeper.verdict(body["id"], body["correct"])
        except UnknownId:
            raise UploadError(404, "unknown id: not one this server gave, or its captcha was dropped") from None
        except AlreadyJudged:
            raise UploadError(409, "this id has its verdict already") from None
        except OSError as e:  # a full or read-only disk: nothing recorded, the verdict can come again
            log.warning("--keep: a verdict not recorded: %s", e)
            raise UploadError(503, "the verdict could not be written (disk full or read-only?); send it again "
                                   "later") from None
        except ValueError as e:  # accepting an empty reading
            raise UploadError(400, str(e)) from None
        return {"id": body["id"], "status": status}

    return app


# -- the HTTP server ---------------------------------------------------------------------------
