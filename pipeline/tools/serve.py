"""`serve`: the model over HTTP (pipeline/serving/: the app and its limits, the hardened waitress
server, the supervisor of --workers)."""
from __future__ import annotations

import logging
import multiprocessing
import os
import socket
from pathlib import Path

import click

from pipeline import outputs
from pipeline.cli import command, model_option, onnx_option, run
from pipeline.errors import PipelineError
from pipeline.read.recognizer import Recognizer
from pipeline.serving.app import Limits, create_app
from pipeline.serving.http import listen, make_server
from pipeline.serving.supervisor import default_workers, supervise

log = logging.getLogger("captcha-crnn.serve")


def serve_worker(sock: socket.socket, model: Path, threads: int, onnx: bool | None, limits: Limits,
                 metrics_path: Path | None, torch_threads: int, health=None) -> None:
    recognizer = Recognizer(model, onnx=onnx, threads=torch_threads)
    app = create_app(recognizer, limits, metrics_path, health=health)
    log.info("serving %s (%s) on http://%s:%d", model, recognizer.backend, *sock.getsockname()[:2])
    make_server(app, sock, threads, limits).run()


def serve(model: Path, host: str, port: int, workers: int | None = None, threads: int = 16,
          onnx: bool | None = None, limits: Limits = Limits(),
          metrics_path: Path | None = outputs.METRICS) -> None:
    """Listen on host:port; one process serves, or a supervisor keeps `workers` processes serving
    the one listening socket (each loads its own model after the fork)."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(process)d %(message)s")
    workers = workers or default_workers()
    if not Path(model).is_file():
        raise PipelineError(f"{model}: checkpoint not found")
    sock = listen(host, port)
    torch_threads = max(1, (os.cpu_count() or 1) // workers)

    down = multiprocessing.get_context("fork").RawValue("i", 0)  # workers missing, shared with every worker

    def start_worker():
        health = (lambda: {"workers": workers, "workers_down": down.value}) if workers > 1 else None
        serve_worker(sock, model, threads, onnx, limits, metrics_path, torch_threads, health)

    if workers == 1:
        start_worker()
    else:
        supervise(workers, start_worker, down=down)


@command("serve")
@model_option
@onnx_option
@click.option("--host", default="127.0.0.1", show_default=True)
@click.option("--port", default=8000, show_default=True, type=click.IntRange(1, 65535))
@click.option("--workers", default=None, type=click.IntRange(1),
              help="processes, kept up by a supervisor [default: one per core, at most 8]")
@click.option("--threads", default=16, show_default=True, type=click.IntRange(1), help="threads per process")
def cli(model_path, onnx, host, port, workers, threads):
    """Serve POST /predict, GET /healthz and GET /model over HTTP (waitress)."""
    serve(model_path, host, port, workers=workers, threads=threads, onnx=onnx)


if __name__ == "__main__":  # python -m pipeline.tools.NAME
    run(__spec__.name)
